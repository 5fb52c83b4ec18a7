"""llama.cpp's `llama-eval-callback` output as something to compare a trace with.

The callback prints each graph node's name, type, op and shape (ggml's ne, fastest axis
first), its first and last 3 values along every axis (`%12.4f`) and their sum; nothing
more. So a dump is compared by what it holds: those values and the sum, against the same
entries of the npllama tensor its name maps to (namemaps "llamacpp"), in forward order,
and the first tensor outside tolerance is named."""
from __future__ import annotations

import gzip
import re
import zlib

import numpy as np

from ..errors import UsageError, printable
from ..model.observer import forward_key
from .compare import Tolerance
from .namemaps import MAPS, compiled, map_name, rename

HEADER = re.compile(r"^common_debug_cb_eval:\s+(.+?) = \((\w+)\)\s+(\w+)\(.*\) = \{(\d+), (\d+), (\d+), (\d+)\}$")
EDGE = 3        # values printed at each end of an axis (common_debug_print_tensor's n)
MAX_DUMP_BYTES = 256 << 20   # a dump of an 8B model's prompt is tens of MB; a gzip bomb stops here
MARK = b"common_debug_cb_eval:"
VIEW = re.compile(r"^.+ \((view|permuted|reshaped|transposed|cont|copy[^)]*)\)\[(VIEW|PERMUTE|RESHAPE|TRANSPOSE|"
                  r"SET_ROWS|CPY|CONT)\]$")


def read_dump(path: str) -> str | None:
    """A llama-eval-callback dump's text (gzipped or not), or None when path is not one (its
    first line is not a node's). Reads at most MAX_DUMP_BYTES of text."""
    try:
        with open(path, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            f = gzip.GzipFile(fileobj=raw) if gz else raw
            text = f.read(len(MARK))
            if text != MARK:
                return None
            text += f.read(MAX_DUMP_BYTES + 1 - len(MARK))
    except (IsADirectoryError, FileNotFoundError, PermissionError):
        return None
    except (OSError, EOFError, zlib.error) as e:
        raise UsageError(f"{path}: not a readable gzip file ({e})") from None
    if len(text) > MAX_DUMP_BYTES:
        raise UsageError(f"{path}: over {MAX_DUMP_BYTES >> 20} MiB of dump text")
    return text.decode("utf-8", "replace")


def shown(n: int) -> list[int]:
    return list(range(n)) if n <= 2 * EDGE else [*range(EDGE), *range(n - EDGE, n)]


def parse(text: str, where: str = "dump") -> dict[str, dict]:
    """{node name[OP]: {"ne": (ne0..ne3), "values": (rows, cols) array, "sum": float}} for
    every float node the dump printed; a name and op printed again is kept as `name[OP]#2`
    (#3 ...), for trace_names to refuse when it maps to a trace tensor."""
    out, node, key = {}, None, None
    for n, line in enumerate(text.splitlines(), 1):
        m = HEADER.match(line)
        if m:
            name, op, ne = m.group(1), m.group(3), tuple(int(m.group(i)) for i in range(4, 8))
            node = {"ne": ne, "rows": [], "sum": None} if m.group(2) in ("f32", "f16", "bf16") else None
            key = f"{name}[{op}]"
            key = next(f"{key}#{k}" for k in range(2, len(out) + 3) if f"{key}#{k}" not in out) if key in out else key
            if node is not None:
                out[key] = node
        elif node is not None and line.strip().startswith("[") and line.strip().endswith("],") and "[" not in \
                line.strip()[1:]:
            node["rows"].append([number(v, where, n) for v in line.strip()[1:-2].replace("...,", "").split(",")
                                 if v.strip()])
        elif node is not None and line.strip().startswith("sum = "):
            node["sum"] = number(line.split("=")[1], where, n)
    for key, node in out.items():
        try:
            node["values"] = np.array(node.pop("rows"), dtype=np.float64)
        except ValueError:
            raise UsageError(f"{where}: {key}: ragged values (not llama-eval-callback output)") from None
        if node["sum"] is None:
            raise UsageError(f"{where}: {key}: no sum line (not llama-eval-callback output)")
    return out


def number(text: str, where: str, line: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{where}: line {line}: {text.strip()[:40]!r} is not a number") from None


def trace_names(dump: dict) -> dict[str, str]:
    """trace name -> the dump node it is; a node without an op suffix in the map (`attn_norm-0`)
    is looked up by its bare name. Two nodes that are one trace tensor (a node printed twice,
    or renamed onto another's name) are refused: a dump must be of one forward pass."""
    out = {}
    for key, (known, target) in node_names(dump).items():
        if target is not None and target in out:
            raise UsageError(printable(f"dump: {target} is both node {out[target]} and node {key} "
                                       "(a dump must be of one forward pass)"))
        if target is not None:
            out[target] = key
    return out


def node_names(dump: dict) -> dict[str, tuple[bool, str | None]]:
    """Each node's (known, trace name or None): known to the llamacpp name map, or a view of
    a tensor (ggml names it `<name> (view)`, `(permuted)`, `(reshaped)` ...: the KV cache
    and the attention's layout changes), which holds no values of its own to compare."""
    table, out = compiled("llamacpp"), {}
    for printed in dump:
        key = re.sub(r"#\d+$", "", printed)     # a node printed again (parse) maps as the first
        known, target = map_name(key, table)
        if not known:
            known, target = map_name(key.rsplit("[", 1)[0], table)
        out[printed] = (True, None) if not known and VIEW.match(key) else (known, target)
    return out


def dumpable(name: str) -> bool:
    """Whether a trace tensor is one a llama.cpp dump names (a target of the llamacpp map)."""
    template = re.sub(r"^layers\.\d+\.", "layers.{i}.", name)
    return any(target == template for _, target in MAPS["llamacpp"])


def sampled(x: np.ndarray, ne: tuple, name: str) -> tuple[np.ndarray, float]:
    """The entries of npllama's tensor x the dump printed for a node of shape ne, and x's sum:
    x laid out as ggml (ne3, ne2, ne1, ne0); a node of one position (llama.cpp keeps only
    the last row before the head) compared with x's last; probabilities over more key slots
    (the whole KV cache) padded with zeros."""
    x = np.asarray(x, dtype=np.float64)
    if name.endswith("probs") and x.shape[-1] < ne[0]:
        x = np.concatenate([x, np.zeros((*x.shape[:-1], ne[0] - x.shape[-1]))], -1)
    if x.ndim == 2 and x.shape[0] > 1 and ne[1] == 1:
        x = x[-1:]
    if x.size != int(np.prod(ne)):
        raise UsageError(f"shape {x.shape} does not hold the dump's ggml shape {list(ne)}")
    g = x.reshape(ne[::-1])
    rows = [g[i3, i2, i1][shown(ne[0])] for i3 in range(ne[3]) for i2 in shown(ne[2]) for i1 in shown(ne[1])]
    return np.array(rows), float(x.sum())


def compare_dump(dump: dict, tr: dict, rtol: float, out=None, allow_missing: bool = False, atol: float = 0.0,
                 allow_unknown: bool = False, names: str | None = None) -> tuple:
    """Each node of the dump against the trace tr (under its name map `names`), in forward
    order: printed values within atol + rtol * max |trace tensor| + half the print's last
    digit, and the sum within atol * size + rtol * sum |trace tensor| + 1e-3. Strict whichever side
    is the reference: the dump's mapped nodes the trace lacks, and the trace's tensors a
    dump names that this one lacks, fail unless allow_missing, and a node the llamacpp map does not know fails unless allow_unknown.
    Returns (all within, first outside, rows)."""
    Tolerance(rtol, atol)   # finite and >= 0, as everywhere
    tr, _, _ = rename(tr, names or tr.get("__meta__", {}).get("names"))
    mapped = trace_names(dump)
    unknown = [key for key, (known, _) in node_names(dump).items() if not known]
    rows, first = [], None
    for name, key in sorted(mapped.items(), key=lambda kv: forward_key(kv[0])):
        if name in tr:
            rows.append(dump_row(name, key, dump[key], tr[name], rtol, atol))
            first = first or (None if rows[-1][-1] else name)
    missing = ([n for n in mapped if n not in tr],     # the dump's nodes the trace lacks, and the reverse
               sorted((n for n in tr if forward_key(n) is not None and dumpable(n) and n not in mapped), key=forward_key))
    if not rows:
        raise UsageError("the dump shares no tensor with the trace")
    if out is not None:
        print_dump_report(rows, first, missing, unknown, allow_missing, allow_unknown, out)
    ok = first is None and (allow_missing or not any(missing)) and (allow_unknown or not unknown)
    return ok, first, rows


def dump_row(name: str, key: str, node: dict, x, rtol: float, atol: float) -> tuple:
    """(name, node, max error relative to max |x|, sum error, within) for one node."""
    ours, total = sampled(x, node["ne"], name)
    x64 = np.asarray(x, np.float64)
    scale = float(np.abs(x64).max()) if x64.size else 0.0
    err = float(np.abs(ours - node["values"]).max()) if ours.shape == node["values"].shape else np.inf
    err = np.inf if np.isnan(err) else err           # a NaN printed or computed is never agreement
    sum_err = abs(total - node["sum"])
    sum_err = np.inf if np.isnan(sum_err) else sum_err
    ok = err <= atol + rtol * scale + 5e-5 and sum_err <= atol * x64.size + rtol * float(np.abs(x64).sum()) + 1e-3
    return name, key, err / max(scale, 1e-30), sum_err, ok


def print_dump_report(rows, first, missing, unknown, allow_missing, allow_unknown, out) -> None:
    print(f"{'tensor':<28} {'llama.cpp node':<24} {'max rel':>10} {'sum err':>11}", file=out)
    for name, key, rel, sum_err, ok in rows:
        mark = "  <-- first outside tolerance" if name == first else ("  x" if not ok else "")
        print(printable(f"{name:<28} {key:<24} {rel:10.2e} {sum_err:11.3e}{mark}"), file=out)
    print(f"compared {len(rows)} of the dump's {len(rows) + len(missing[0])} mapped tensors; "
          + ("all within tolerance" if first is None else f"first outside tolerance: {first}"), file=out)
    verdict, fix = ("allowed", "") if allow_missing else ("FAIL", " (--allow-missing compares only the shared ones)")
    for names, where in zip(missing, ("missing from the trace", "of the trace's tensors missing from the dump")):
        if names:
            print(printable(f"{verdict}: {len(names)} {where}, e.g. {', '.join(names[:3])}{fix}"), file=out)
    if unknown:
        print(printable(f"{'allowed' if allow_unknown else 'FAIL'}: {len(unknown)} node(s) of the dump are not in "
                        f"the llamacpp name map, e.g. {', '.join(unknown[:3])}"
                        + ("" if allow_unknown else " (--allow-unknown ignores them)")), file=out)
