"""Independent pieces of numpy work run on threads of our own, one per core.

numpy releases the GIL inside its loops and inside BLAS, so a few Python threads keep every
core busy with numpy's elementwise passes, which are single-threaded otherwise: the tiled bf16
widening (npllama/tiled.py) and attention's KV-head groups (ops.blocked_attention). BLAS must
then run each call on one thread: a call that splits itself between BLAS's own threads
waits for all of them at its end, and on a machine where other processes want the cores,
one descheduled thread stalls the call. Attention makes thousands of ~1 ms GEMMs a layer;
with OpenBLAS's two threads on the shared 2-core development machine they ran 5-10x slower
than on one thread each (tools/bench_long.py's machine, see README, Long prompts).

numpy's OpenBLAS keeps one process-wide thread count, which `openblas_set_num_threads` sets:
the library is found among the files mapped into this process (/proc/self/maps), its
symbols under whatever prefix and suffix its wheel gives them, and called through ctypes (no
compiled code of ours), set to 1 while our threads run and restored after. Only a pthreads
(or sequential) build is taken: an OpenMP build keeps a count per calling thread, which our
threads would not see. Where it cannot be done (another BLAS, another OS), `run` does the
work in turn on the calling thread, BLAS threading each call as it will.

NPLLAMA_THREADS=n sets how many threads (default: the cores); 1 turns splitting off.
set_threads(n) (the CLI's -t/--threads) sets both counts, ours and OpenBLAS's, for the process;
the CLI's default is idle_cores(): on a machine other processes keep busy, a thread beyond
the idle cores only waits for a core, and every call waits for its slowest thread.
"""
from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Sequence

from ..errors import UsageError

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_blas: tuple | None = None       # (get_num_threads, set_num_threads) of numpy's OpenBLAS, or ()
_lock = threading.Lock()
_threads: int | None = None      # set_threads(n); None: $NPLLAMA_THREADS or the cores
_blas_default: int | None = None  # OpenBLAS's count before the first set_threads


def threads() -> int:
    """How many threads npllama runs numpy work on: set_threads's, $NPLLAMA_THREADS, or one per core."""
    if _threads is not None:
        return _threads
    value = os.environ.get("NPLLAMA_THREADS", "").strip()
    if not value:
        return os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"NPLLAMA_THREADS must be a positive integer, got {value!r}")
    return int(value)


def cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def idle_cores() -> int:
    """The cores less the machine's load (its 1-minute average of runnable processes), at
    least one: as many threads as can run without waiting for one another."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):   # no load average on this OS
        return cores()
    return max(1, min(cores(), round(cores() - load)))


def set_threads(n: int | None) -> None:
    """Run numpy work on n threads: npllama's own (see run) and, as far as it can be set,
    OpenBLAS's process-wide count, so that -t 1 keeps the process on one core throughout.
    None goes back to the defaults: $NPLLAMA_THREADS or the cores, and OpenBLAS's own count."""
    global _threads, _blas_default
    if n is not None and n < 1:
        raise UsageError(f"the thread count must be >= 1, got {n}")
    get_set = openblas()
    if get_set:
        with _lock:
            if _blas_default is None:
                _blas_default = get_set[0]()
            get_set[1](_blas_default if n is None else n)
    _threads = n


def openblas() -> tuple:
    """(get_num_threads, set_num_threads) of the OpenBLAS numpy uses, or () if there is none
    this can find and hold (see the module's docstring)."""
    global _blas
    if _blas is not None:
        return _blas
    _blas = ()
    try:
        with open("/proc/self/maps") as f:   # address perms offset dev inode [path]
            paths = {fields[5].strip() for fields in (line.split(None, 5) for line in f) if len(fields) == 6}
    except OSError:
        return _blas
    for path in sorted(p for p in paths if "openblas" in os.path.basename(p).lower()):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("", "scipy_"):
            for suffix in ("", "64_", "_64"):
                get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
                layer = getattr(lib, f"{prefix}openblas_get_parallel{suffix}", None)
                if get and put and layer:
                    get.restype = layer.restype = ctypes.c_int
                    put.argtypes = [ctypes.c_int]
                    put.restype = None
                    if layer() in (0, 1):              # 0 sequential, 1 pthreads (2: OpenMP)
                        _blas = (get, put)
                    return _blas
    return _blas


@contextmanager
def single_threaded_blas():
    """BLAS runs each call on its calling thread while inside. The count is process-wide:
    a BLAS call made meanwhile by another thread of the program also runs on one core."""
    get_set = openblas()
    if not get_set:
        yield
        return
    get, put = get_set
    with _lock:
        before = get()
        put(1)
        try:
            yield
        finally:
            put(before)


def run(jobs: Sequence[Callable[[], None]]) -> None:
    """Run the jobs (independent of each other) on threads(), BLAS on one thread meanwhile;
    in order on this thread if there is one job, one thread, or no OpenBLAS to hold."""
    global _pool, _pool_size
    n = threads()
    if min(n, len(jobs)) <= 1 or not openblas():
        for job in jobs:
            job()
        return
    if _pool_size != n:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_size = ThreadPoolExecutor(n, thread_name_prefix="npllama"), n
    with single_threaded_blas():
        for f in [_pool.submit(job) for job in jobs]:
            f.result()
