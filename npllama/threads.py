"""Decode's matrix-vector products split between threads of our own, each running numpy's
BLAS on one core.

A decode step multiplies one vector by each weight matrix: reading the weights is the whole
cost, and every core must read its share at once. numpy and BLAS release the GIL, so
Python threads can each take a block of a matrix's outputs; BLAS must then run each call on
the calling thread alone, or its own threads and ours fight over the cores. numpy's
OpenBLAS (pthreads build) keeps one process-wide thread count, which `openblas_set_num_threads`
sets: it is found in the library numpy loaded and called through ctypes (no compiled code of
ours), set to 1 while our threads run and restored after. Where that cannot be done (another
BLAS, an OpenMP build, no /proc/self/maps), `blas_pinned` is False: a product that is mostly
BLAS is then better left to BLAS's threads in one call.

NPLLAMA_THREADS=n sets how many threads (default: the cores); 1 turns splitting off.
"""
from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from .errors import UsageError

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()


def count() -> int:
    """How many threads decode uses: NPLLAMA_THREADS, else the cores."""
    value = os.environ.get("NPLLAMA_THREADS", "").strip()
    if not value:
        return os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"NPLLAMA_THREADS must be a positive integer, got {value!r}")
    return int(value)


def _openblas_threads():
    """(get, set) for the thread count of the OpenBLAS numpy loaded, or None.

    The library is found among the files mapped into this process; its symbols may carry
    the prefix and suffix of scipy's ILP64 build (numpy's wheels). Only a pthreads build is
    taken: an OpenMP build keeps a count per calling thread, which our threads would not see.
    """
    try:
        with open("/proc/self/maps") as f:   # address perms offset dev inode [path]
            paths = {fields[5].strip() for fields in (line.split(None, 5) for line in f) if len(fields) == 6}
    except OSError:
        return None
    for path in sorted(p for p in paths if "openblas" in os.path.basename(p).lower()):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("", "scipy_"):
            for suffix in ("", "64_", "_64"):
                get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
                parallel = getattr(lib, f"{prefix}openblas_get_parallel{suffix}", None)
                if get and put and parallel:
                    get.restype = parallel.restype = ctypes.c_int
                    put.argtypes = [ctypes.c_int]
                    put.restype = None
                    return (get, put) if parallel() in (0, 1) else None   # 0 sequential, 1 pthreads
    return None


_blas = _openblas_threads()
blas_pinned = _blas is not None      # whether run() can hold BLAS to one thread per call


@contextmanager
def blas_on_one_thread():
    """BLAS runs each call on its calling thread while inside. The count is process-wide:
    a BLAS call made meanwhile by another thread of the program also runs on one core."""
    if _blas is None:
        yield
        return
    get, put = _blas
    with _lock:
        before = get()
        put(1)
        try:
            yield
        finally:
            put(before)


def run(fn, jobs: list[tuple]) -> None:
    """fn(*job) for every job: on count() threads, BLAS on one thread each where it can be
    (blas_pinned); in turn on this thread when count() is 1."""
    global _pool, _pool_size
    if count() == 1 or len(jobs) == 1:
        for job in jobs:
            fn(*job)
        return
    if _pool_size != count():
        _pool, _pool_size = ThreadPoolExecutor(count(), thread_name_prefix="npllama"), count()
    with blas_on_one_thread():
        for f in [_pool.submit(fn, *job) for job in jobs]:
            f.result()
