"""Logits compared by what each side holds: a trace or golden bundle (tokens and float logits
at every position of one sequence run from position 0) or a saved-logits file
(llama-perplexity's --kl-divergence-base, or npllama perplexity's: per chunk, a fresh
sequence's tokens and the 16-bit log-probabilities at its scored positions; its layout in
npllama.inspect.perplexity).

Both become log-probabilities, compared at the positions both hold: a chunk and a sequence
are the same run where their tokens agree (position 0 aside: llama-perplexity runs each
chunk with BOS there when the tokenizer adds one, and stores the text's token), and logits
at position p depend only on tokens 0..p. A base file resolves log p only down to its row's
floor (16 nats below the top logit); below it every entry reads as the floor, so both sides
are compared clipped at the higher floor. The tolerance (compare's: atol + rtol * max |log p|
of the reference row) widens by half a quantization step of each file.

Strict as compare is: the report says how many of the reference's (B's) scored positions it
compared, fails when some have no counterpart in A unless allow_missing, and a comparison
that finds no position in both is an error, never a pass."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from .compare import Tolerance
from .namemaps import rename
from .perplexity import LOG_PROB_RANGE, MAGIC, BaseFile
from .tracefile import load as load_trace


@dataclass
class Run:
    """One sequence as a side holds it: its tokens at positions 0..L-1, and log-probability
    rows for positions first..first+R-1, read by rows()."""
    tokens: np.ndarray
    first: int
    n_rows: int
    rows: object        # () -> (log_probs (R, V) float64, floor (R,), half step (R,))


@dataclass
class Side:
    path: str
    kind: str           # "logits file" or "trace"
    n_vocab: int
    runs: list


def is_logits_file(path: str) -> bool:
    """Whether path is a saved-logits file (starts with llama-perplexity's magic)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except (IsADirectoryError, FileNotFoundError, PermissionError):
        return False


def from_base_file(path: str) -> Side:
    base = BaseFile.open(path)
    first = base.n_ctx // 2
    runs = [Run(base.tokens[i].astype(np.int64), first, base.rows.shape[1], lambda i=i: base_rows(base, i))
            for i in range(len(base.tokens))]
    return Side(path, "logits file", base.n_vocab, runs)


def base_rows(base: BaseFile, i: int) -> tuple:
    """Chunk i's log p = scale * q + min_log_prob in float64 (the exact values the 16-bit
    codes stand for), its floors and half steps. A row's floor is min_log_prob where the
    row was clipped there (its 65536 levels span the full LOG_PROB_RANGE nats below the
    top: entries at the floor may be lower), else -inf (the floor is the row's exact
    minimum). A row whose values are no log-softmax is refused (check_log_softmax)."""
    rows = base.chunk(i)
    head = np.ascontiguousarray(rows[:, :4]).view("<f4").astype(np.float64)     # (R, 2): scale, min
    q = rows[:, 4:4 + base.n_vocab].astype(np.float64)
    lp = head[:, :1] * q + head[:, 1:]
    clipped_at_floor = head[:, 0] * 65535 >= LOG_PROB_RANGE * (1 - 1e-4)
    check_header(head, base.n_vocab, base.path, i)
    return lp, np.where(clipped_at_floor, head[:, 1], -np.inf), head[:, 0] / 2


def check_header(head: np.ndarray, n_vocab: int, path: str, i: int) -> None:
    """Every real log-softmax row has its top log p (scale * 65535 + min: the top entry is
    quantized to the top code) in [-log n_vocab, 0], and a row of one level (scale 0) is
    the uniform distribution, log p = -log n_vocab everywhere (1e-3 for float32 rounding).
    A header that says nothing (scale 0 and minimum 0: every log p 0) is refused, not read
    as agreement."""
    scale, low = head[:, 0], head[:, 1]
    top, uniform = scale * 65535 + low, -np.log(n_vocab)
    ok = (top <= 1e-3) & (top >= uniform - 1e-3) & ((scale > 0) | (np.abs(low - uniform) <= 1e-3))
    if not ok.all():
        r = int(np.argmin(ok))
        raise UsageError(f"{path}: chunk {i + 1}, row {r + 1}: scale {scale[r]:g} and minimum log-probability "
                         f"{low[r]:g} put the top log p at {top[r]:g}, outside [-log n_vocab, 0] = [{uniform:.4g}, 0]"
                         " (malformed: not what llama-perplexity writes)")


def from_trace(path: str, names: str | None = None) -> Side:
    """A trace or golden bundle's tokens and logits (a kept batch axis of one dropped), under
    its name map (names, else its __meta__'s)."""
    tr = load_trace(path)
    tr, _, _ = rename(tr, names or tr.get("__meta__", {}).get("names"))
    if "logits" not in tr or "tokens" not in tr:
        raise UsageError(f"{path}: holds no {'logits' if 'logits' not in tr else 'tokens'}: nothing to compare "
                         "with a logits file")
    logits, tokens = np.asarray(tr["logits"]), np.asarray(tr["tokens"]).reshape(-1)
    logits = logits[0] if logits.ndim == 3 and logits.shape[0] == 1 else logits
    if logits.ndim != 2 or logits.shape[0] != len(tokens) or not np.issubdtype(tokens.dtype, np.integer):
        raise UsageError(f"{path}: logits {logits.shape} and tokens {tokens.shape} are not (T, vocab) and (T,) "
                         "integers")
    return Side(path, "trace", logits.shape[1], [Run(tokens.astype(np.int64), 0, len(tokens),
                                                     lambda: trace_rows(logits))])


def trace_rows(logits: np.ndarray) -> tuple:
    """log_softmax in float64; every entry resolved (floor -inf), exact (no step)."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):   # inf or NaN logits: NaN log p, an infinite error in compare_run
        lp = x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
    return lp, np.full(len(x), -np.inf), np.zeros(len(x))


def load_side(path: str, names: str | None = None) -> Side:
    return from_base_file(path) if is_logits_file(path) else from_trace(path, names)


def token_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    """The first position >= 1 where two runs' tokens differ (position 0 may be BOS in one,
    as llama-perplexity runs it, and the text's token in the other), or None."""
    n = min(len(a), len(b))
    differ = np.nonzero(a[1:n] != b[1:n])[0]
    return int(differ[0]) + 1 if len(differ) else None


def span(ra: Run, rb: Run) -> range:
    """The positions both runs hold log-probabilities for, with the same tokens up to them."""
    d = token_difference(ra.tokens, rb.tokens)
    return range(max(ra.first, rb.first), min(ra.first + ra.n_rows, rb.first + rb.n_rows,
                                              min(len(ra.tokens), len(rb.tokens)) if d is None else d))


def pairs(a: Side, b: Side) -> list:
    """(index of B's run, A's run or None): runs with as many on each side pair in order
    (two files of one text); otherwise each of B's runs takes the run of A that shares the
    most positions with it."""
    if len(a.runs) == len(b.runs):
        return [(j, a.runs[j]) for j in range(len(b.runs))]
    out = []
    for j, rb in enumerate(b.runs):
        best = max(a.runs, key=lambda ra: len(span(ra, rb)))
        out.append((j, best if len(span(best, rb)) else None))
    return out


@dataclass
class Chunk:
    """One of the reference's runs as compared: positions (range, maybe empty), the largest
    error and where (position, vocab id), the first position outside tolerance, how many
    positions' top tokens agree, and notes (tokens that differ)."""
    index: int
    positions: range
    n_rows: int
    max_abs: float = 0.0
    where: tuple | None = None
    first_bad: int | None = None
    bad_token: int | None = None
    detail: str = ""
    same_top: int = 0
    notes: list = field(default_factory=list)
    ok: bool = True


@dataclass
class LogitsReport:
    ok: bool
    first: str | None
    chunks: list
    expected: int = 0
    compared: int = 0
    missing: int = 0
    first_chunk: int | None = None      # its index in the reference's runs
    first_position: int | None = None
    first_token: int | None = None

    def __iter__(self):
        return iter((self.ok, self.first, self.chunks))


def clipped(ra: Run, rb: Run, pos: range) -> tuple:
    """A's and B's log-probs at pos (P, V), both clipped at the higher of the two rows'
    floors, and the extra tolerance of their quantization (P,)."""
    (la, fa, ha), (lb, fb, hb) = ra.rows(), rb.rows()
    ia, ib = np.arange(pos.start, pos.stop) - ra.first, np.arange(pos.start, pos.stop) - rb.first
    floor = np.maximum(fa[ia], fb[ib])[:, None]
    return np.maximum(la[ia], floor), np.maximum(lb[ib], floor), ha[ia] + hb[ib]


def compare_run(chunk: Chunk, ra: Run, rb: Run, tol: Tolerance) -> None:
    """Fill chunk with the comparison of A's run ra and B's rb at chunk.positions."""
    pos = chunk.positions
    x, y, step = clipped(ra, rb, pos)
    with np.errstate(invalid="ignore"):          # -inf - -inf where both are masked: no error
        err = np.where(x == y, 0.0, np.abs(x - y))
    err = np.where(np.isnan(err), np.inf, err)                                    # (P, V)
    scale = np.where(np.isfinite(y), np.abs(y), 0).max(axis=-1)
    limit = np.array([tol.limit(float(s)) for s in scale]) + step
    row_err = err.max(axis=-1)
    r, v = np.unravel_index(int(np.argmax(err)), err.shape)
    chunk.max_abs, chunk.where = float(err[r, v]), (pos.start + int(r), int(v))
    chunk.same_top = int((x.argmax(-1) == y.argmax(-1)).sum())
    bad = np.nonzero(row_err > limit)[0]
    if len(bad):
        i = int(bad[0])
        chunk.first_bad, chunk.bad_token, chunk.ok = pos.start + i, int(np.argmax(err[i])), False
        chunk.detail = describe_position(rb.tokens, pos.start + i, x[i], y[i], chunk.bad_token)


def describe_position(tokens: np.ndarray, p: int, x: np.ndarray, y: np.ndarray, v: int) -> str:
    """What A and B say at position p: the token whose log-probability differs most and each
    side's top token."""
    nxt = f", predicting token {int(tokens[p + 1])}" if p + 1 < len(tokens) else ""
    ta, tb = int(x.argmax()), int(y.argmax())
    return (f"position {p} (input token {int(tokens[p])}{nxt}): token {v} has log p {x[v]:.4f} in A, {y[v]:.4f} "
            f"in B; top token A {ta} ({x[ta]:.4f}), B {tb} ({y[tb]:.4f})")


def compare_logits(a: Side, b: Side, rtol: float = 1e-4, atol: float = 1e-6, ulps: float | None = None,
                   allow_missing: bool = False, out=None) -> LogitsReport:
    """A against the reference B, as log-probabilities at the positions both hold. Coverage
    is counted over the logits file's scored positions (B's, else A's). Raises UsageError
    when no position is in both."""
    if a.n_vocab != b.n_vocab:
        raise UsageError(f"{a.path} has a vocabulary of {a.n_vocab}, {b.path} of {b.n_vocab}")
    tol, ref_is_b = Tolerance(rtol, atol, ulps), b.kind == "logits file" or a.kind != "logits file"
    ref, other = (b, a) if ref_is_b else (a, b)
    chunks = []
    for j, partner in pairs(other, ref):
        rr = ref.runs[j]
        ra, rb = (partner, rr) if ref_is_b else (rr, partner)
        chunk = Chunk(j, span(ra, rb) if partner is not None else range(0), rr.n_rows)
        if partner is None:
            chunk.notes.append(f"no sequence of {other.path} has these tokens at these positions")
        else:
            note_tokens(chunk, ra, rb, rr)
            if len(chunk.positions):
                compare_run(chunk, ra, rb, tol)
        chunks.append(chunk)
    report = summarise(chunks, ref)
    if out is not None:
        print_logits_report(report, a, b, ref, allow_missing, out)
    if not report.compared:
        raise UsageError(nothing_compared(a, b))
    report.ok = report.first is None and (allow_missing or not report.missing)
    return report


def note_tokens(chunk: Chunk, ra: Run, rb: Run, rr: Run) -> None:
    """Tokens that differ: at position 0 a note (BOS), within the reference's scored
    positions a failure (the runs are not of the same text)."""
    if len(ra.tokens) and len(rb.tokens) and ra.tokens[0] != rb.tokens[0]:
        chunk.notes.append(f"position 0: token {int(ra.tokens[0])} in A, {int(rb.tokens[0])} in B (llama-perplexity "
                           "runs each chunk with BOS there when its tokenizer adds one)")
    d = token_difference(ra.tokens, rb.tokens)
    if d is not None and d < rr.first + rr.n_rows:
        chunk.ok = False
        chunk.notes.append(f"DIFFERENT tokens from position {d}: {int(ra.tokens[d])} in A, {int(rb.tokens[d])} in B")


def summarise(chunks: list, ref: Side) -> LogitsReport:
    expected = sum(r.n_rows for r in ref.runs)
    compared = sum(len(c.positions) for c in chunks)
    bad = next((c for c in chunks if not c.ok), None)
    rep = LogitsReport(False, None, chunks, expected, compared, expected - compared)
    rep.first_chunk = None if bad is None else bad.index
    if bad is not None and bad.first_bad is not None:
        rep.first = f"chunk {bad.index + 1}, position {bad.first_bad}"
        rep.first_position, rep.first_token = bad.first_bad, bad.bad_token
    elif bad is not None:
        rep.first = f"chunk {bad.index + 1}: {bad.notes[-1]}"
    return rep


def held(side: Side) -> str:
    """What a side holds, in a phrase."""
    r = side.runs[0]
    if side.kind == "trace":
        return f"logits at positions 0..{r.n_rows - 1} of one sequence"
    return f"log-probabilities at positions {r.first}..{r.first + r.n_rows - 1} of {len(side.runs)} chunk(s) of " \
           f"{len(r.tokens)} tokens"


def nothing_compared(a: Side, b: Side) -> str:
    ra, rb = a.runs[0], b.runs[0]
    d = token_difference(ra.tokens, rb.tokens)
    why = f"their first runs' tokens differ at position {d} ({int(ra.tokens[d])} in A, {int(rb.tokens[d])} in B)" \
        if d is not None else "no position is in both"
    return (f"compared nothing: {a.path} (A) holds {held(a)}, {b.path} (B) {held(b)}; {why}. A trace compares with "
            "a logits file's chunk when it runs that chunk's tokens from position 0 past its scored positions' "
            "start")


def print_logits_report(rep: LogitsReport, a: Side, b: Side, ref: Side, allow_missing: bool, out) -> None:
    print(f"{'chunk':<6} {'positions':<11} {'max abs (nats)':>14}  {'largest error at':<24} {'same top':>8}", file=out)
    for c in rep.chunks:
        span_ = f"{c.positions.start}..{c.positions.stop - 1}" if len(c.positions) else "-"
        where = f"pos {c.where[0]}, token {c.where[1]}" if c.where and c.max_abs > 0 else "-"
        mark = "  <-- first outside tolerance" if c.index == rep.first_chunk else ("  x" if not c.ok else "")
        top = f"{c.same_top}/{len(c.positions)}"
        print(f"{c.index + 1:<6} {span_:<11} {c.max_abs:14.3e}  {where:<24} {top:>8}{mark}", file=out)
        for line in c.notes + ([f"first outside tolerance at {c.detail}"] if c.detail else []):
            print(f"    {line}", file=out)
    which = "B's" if ref is b else "A's"
    print(f"compared {rep.compared} of the logits file's ({which}) {rep.expected} scored positions in "
          f"{sum(1 for c in rep.chunks if len(c.positions))} of its {len(ref.runs)} chunks; "
          + ("all within tolerance" if rep.first is None else f"first outside tolerance: {rep.first}"
             + (f", token {rep.first_token}" if rep.first_token is not None else "")), file=out)
    if rep.missing:
        print(f"{'allowed' if allow_missing else 'FAIL'}: {rep.missing} of its scored positions have no counterpart "
              f"in {'A' if ref is b else 'B'}" + ("" if allow_missing else
                                                  " (allow_missing / --allow-missing compares only the shared ones)"),
              file=out)
