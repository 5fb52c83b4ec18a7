"""Independent pieces of numpy work run on threads of our own, one per core.

numpy releases the GIL inside its loops and inside BLAS, so a few Python threads keep every
core busy with numpy's elementwise passes, which are single-threaded otherwise. BLAS must
then run each call on one thread: a call that splits itself between BLAS's own threads
waits for all of them at its end, and on a machine where other processes want the cores,
one descheduled thread stalls the call. Attention makes thousands of ~1 ms GEMMs a layer;
with OpenBLAS's two threads on the shared 2-core development machine they ran 5-10x slower
than on one thread each (tools/bench_long.py's machine, see README, Long prompts).

numpy's OpenBLAS (under whatever prefix its wheel gives it) is found among the libraries
this process has loaded (/proc/self/maps) and told openblas_set_num_threads(1) for the
duration; where it cannot be (another BLAS, another OS), the work runs on one thread.
"""
from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Sequence

_pool: ThreadPoolExecutor | None = None
_blas: tuple | None = None       # (get_num_threads, set_num_threads) of numpy's OpenBLAS, or ()


def threads() -> int:
    """How many threads npllama runs numpy work on: $NPLLAMA_THREADS, or one per core."""
    return int(os.environ.get("NPLLAMA_THREADS", os.cpu_count() or 1))


def openblas() -> tuple:
    """(get_num_threads, set_num_threads) of the OpenBLAS numpy uses, or () if there is none
    this can find."""
    global _blas
    if _blas is None:
        _blas = ()
        try:
            with open("/proc/self/maps") as f:
                paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
        except OSError:
            paths = []
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"),
                                   ("openblas", "")):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    set_.argtypes = [ctypes.c_int]
                    _blas = (get, set_)
                    return _blas
    return _blas


@contextmanager
def single_threaded_blas():
    get_set = openblas()
    if not get_set:
        yield
        return
    get, set_ = get_set
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


def run(jobs: Sequence[Callable[[], None]]) -> None:
    """Run the jobs (independent of each other) on threads(), BLAS on one thread meanwhile;
    in order on this thread if there is one job, one thread, or no OpenBLAS to tell."""
    global _pool
    n = min(threads(), len(jobs))
    if n <= 1 or not openblas():
        for job in jobs:
            job()
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(threads(), thread_name_prefix="npllama")
    with single_threaded_blas():
        for f in [_pool.submit(job) for job in jobs]:
            f.result()
