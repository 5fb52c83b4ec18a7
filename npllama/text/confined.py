"""Untrusted computation in a child process whose memory and CPU time the OS bounds.

A chat template is a program, and a tokenizer's control tokens become a regex that
tiktoken's Rust code compiles: what either costs cannot be proven bounded before it runs
(jinja's C-level filters never return to a line tracer, and Rust aborts the process when an
allocation fails). So they run in a worker: a fresh `python` (not a fork of a process
holding a model and threads; nothing of the caller's __main__ is re-imported) that first
sets its own limits, then reads the work:
- RLIMIT_AS: its address space may grow by at most `memory` bytes past its start-up size;
- RLIMIT_CPU: each request may use at most `cpu` seconds (the soft limit is moved before
  each one; past it the kernel sends SIGXCPU, which kills);
- a wall-clock limit kept by the parent, which kills the worker when a reply is late.
Requests and replies are length-prefixed JSON (plain data both ways: nothing a worker
sends can become an object of the parent). Its stderr goes nowhere (a native crash's text
is the file's text). A worker keeps its state between requests (a template is compiled
once, then rendered per request); one that dies, is killed or runs out of memory becomes
one error naming the file, and the next request starts a new one.

Where the platform has no `resource` module (Windows), the work runs in this process under
the callers' own checks only.
"""
from __future__ import annotations

import importlib
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from typing import Any

from .. import errors

try:
    import resource
except ImportError:   # Windows
    resource = None

MEMORY_LIMIT = 1 << 30      # bytes of address space past the worker's start-up size
CPU_LIMIT = 10              # CPU seconds per request
WALL_LIMIT = 60.0           # seconds per request, start-up included (a loaded machine)
MAX_MESSAGE = 64 * 1024**2  # bytes of JSON either way
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOOT = "import sys; sys.path.insert(0, sys.argv[1]); import npllama.text.confined as c; c.serve()"


# --- the worker ----------------------------------------------------------------------------

def _address_space() -> int:
    """This process's virtual size in bytes (Linux: /proc; elsewhere 0, so the limit is absolute)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _limit_cpu(seconds: int) -> None:
    used = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(used.ru_utime + used.ru_stime) + seconds + 1
    resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.getrlimit(resource.RLIMIT_CPU)[1]))


def _resolve(target: str):
    module, _, name = target.partition(":")
    if not module.startswith("npllama."):
        raise errors.UsageError(f"{target}: not an npllama function")
    return getattr(importlib.import_module(module), name)


def _outcome(f, *args) -> dict:
    try:
        return {"value": f(*args)}
    except errors.NpllamaError as e:
        return {"error": str(e), "kind": type(e).__name__}
    except MemoryError:
        return {"error": "", "kind": "MemoryError"}


def serve() -> None:
    """The worker's main: limits, then {"setup", "args", "memory", "cpu"} makes the state,
    then each request [args] is answered with state(*args)."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)   # stray prints go where stderr goes (nowhere), not into the replies
    inp = sys.stdin.buffer
    setup = json.loads(_read(inp))
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + setup["memory"],) * 2)
    _limit_cpu(setup["cpu"])
    reply = _outcome(_resolve(setup["setup"]), *setup["args"])
    state = reply.pop("value", None)
    _write(out, reply)
    while "error" not in reply:
        try:
            request = json.loads(_read(inp))
        except EOFError:
            return
        _limit_cpu(setup["cpu"])
        reply = _outcome(state, *request)
        _write(out, reply)
        reply.pop("error", None)   # a refused request leaves the state as it was


def _read(f) -> bytes:
    head = f.read(8)
    if len(head) < 8:
        raise EOFError
    return f.read(struct.unpack("<Q", head)[0])


def _write(f, value) -> None:
    data = json.dumps(value).encode()
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


# --- the parent ----------------------------------------------------------------------------

def _how_it_ended(code: int | None, memory: int, cpu: int) -> str:
    if code == -signal.SIGXCPU:
        return f"used more than the {cpu} s of CPU time allowed"
    if code is not None and -code in (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS):
        return f"crashed (signal {-code}; most likely at the {memory >> 20} MiB memory limit, in native code)"
    if code is not None and code < 0:
        return f"was killed (signal {-code})"
    return f"ended without an answer (exit code {code})"


class _Late(Exception):
    """No reply within the wall-clock limit."""


class Confined:
    """state = setup(*args) in a worker under limits, where setup is "npllama.module:name";
    call(*request) returns state(*request) (JSON data in, JSON data out). `where` names the
    file in errors; `error` is the class of the limits' errors."""

    def __init__(self, where: str, setup: str, args: tuple, error=errors.UsageError,
                 memory: int | None = None, cpu: int | None = None, wall: float | None = None):
        self.where, self.setup, self.args, self.error = where, setup, list(args), error
        self.memory, self.cpu, self.wall = memory or MEMORY_LIMIT, cpu or CPU_LIMIT, wall or WALL_LIMIT
        self.lock = threading.Lock()
        self.process = None
        self.local = None   # the state itself, where nothing can confine it
        with self.lock:
            self._start()

    def call(self, *request) -> Any:
        with self.lock:
            if self.local is not None:
                return self.local(*request)
            if self.process is None:
                self._start()
            return self._exchange(list(request))

    def _start(self) -> None:
        if resource is None:
            self.local = _resolve(self.setup)(*self.args)
            return
        self.process = subprocess.Popen([sys.executable, "-c", BOOT, PACKAGE_ROOT], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        weakref.finalize(self, _kill, self.process)
        self._exchange({"setup": self.setup, "args": self.args, "memory": self.memory, "cpu": self.cpu})

    def _exchange(self, message) -> Any:
        try:
            _write(self.process.stdin, message)
            reply = json.loads(self._receive(time.monotonic() + self.wall))
        except _Late:
            self._stop()
            raise self.error(f"{self.where}: stopped after the {self.wall:g} s allowed") from None
        except (OSError, EOFError, ValueError):
            self.process.wait(5)
            how = _how_it_ended(self.process.returncode, self.memory, self.cpu)
            self._stop()
            raise self.error(f"{self.where}: {how}") from None
        if "error" not in reply:
            return reply.get("value")
        if reply["kind"] == "MemoryError" or isinstance(message, dict):
            self._stop()   # out of memory, or the setup was refused: the worker is of no more use
        if reply["kind"] == "MemoryError":
            raise self.error(f"{self.where}: more than the {self.memory >> 20} MiB of memory allowed")
        kind = getattr(errors, reply["kind"], None)
        raise (kind if isinstance(kind, type) and issubclass(kind, errors.NpllamaError) else self.error)(
            reply["error"])

    def _receive(self, deadline: float) -> bytes:
        head = self._read_exactly(8, deadline)
        n = struct.unpack("<Q", head)[0]
        if n > MAX_MESSAGE:
            raise ValueError("reply too long")
        return self._read_exactly(n, deadline)

    def _read_exactly(self, n: int, deadline: float) -> bytes:
        fd, parts, got = self.process.stdout.fileno(), [], 0
        while got < n:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise _Late
            chunk = os.read(fd, min(n - got, 1 << 20))
            if not chunk:
                raise EOFError
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def _stop(self) -> None:
        if self.process is not None:
            _kill(self.process)
        self.process = None

    def close(self) -> None:
        with self.lock:
            self._stop()


def _kill(process) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(5)
    for f in (process.stdin, process.stdout):
        try:
            f.close()
        except OSError:   # unsent bytes to a worker that is gone
            pass
