"""Continuous batching: requests join and leave the running batch at every decode step.

Each request holds one cache row (a slot) of a Transformer made with max_batch_size = the
number of slots. A step admits waiting requests into free slots (copying the longest prefix
any slot already holds: a shared system prompt is prefilled once), feeds up to
prefill_per_step prompt tokens (each prompt alone, in its own row, a chunk a step: a long
prompt does not stall the streams already running), then runs ONE forward pass
(Transformer.forward_rows) for every decoding request, each at its own position with its own
cache rows, and samples each row with the request's own generator (generate.sample, seeded as
Generator.stream seeds it).

Same tokens as alone: the attention of each row is exactly its single-sequence attention; the
projections are one GEMM over all rows, and BLAS may sum a row of a GEMM in another order
than the GEMV of a single sequence. tests/serve/test_serve_engine.py measures it: see README,
Serving, for whether the logprobs are bit-identical.

Over a Pipeline (npllama serve --ray, a model with submit_rows/collect) the decode step keeps
up to one microbatch per stage in flight: the runnable requests are split into microbatches
(of at least microbatch_rows rows), each submitted without waiting, and a step collects the
oldest ones until fewer than one per stage are left in flight, then submits their rows' next
tokens at once; so stage 1 runs one microbatch while stage 0 runs the next. Prompt chunks are
submitted the same way, so that prefill, too, keeps both stages busy. A request's rows are
computed by the same stage models as on one machine, so its tokens are the same.
A forward pass that fails (a stage died) fails every request and leaves the engine broken:
requests get the error, new ones are refused, /health says so.
"""
from __future__ import annotations

import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import NpllamaError, UsageError, printable
from .generate import SamplingParams, most_likely, sample, softmax64


class QueueFull(NpllamaError, RuntimeError):
    """The bounded queue of waiting requests is full (HTTP 429)."""


class Draining(NpllamaError, RuntimeError):
    """The engine is shutting down and takes no new request (HTTP 503)."""


class Broken(NpllamaError, RuntimeError):
    """A forward pass failed (a pipeline stage died): the engine takes no new request (HTTP 503)."""


@dataclass
class Request:
    """One sequence: its prompt, how to sample it, and what it produced so far.
    on_token(request, token, logprob, top) is called from the engine's thread per token;
    on_done(request) once, with finish_reason set ("stop", "length", "cancelled" or "error",
    the error's message then in `error`)."""
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    top_logprobs: int = 0
    on_token: Callable | None = None
    on_done: Callable | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    slot: int | None = None
    cancelled: bool = False
    error: str | None = None
    fed: int = 0                 # prompt tokens in its cache row so far (chunked prefill)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.sampling.seed)


class Engine:
    """The slots of one model, the queue in front of them, and the step that runs them."""

    def __init__(self, model, stop_ids: Sequence[int], max_queue: int = 64, prefill_per_step: int = 64,
                 microbatch_rows: int = 1):
        # max_queue: waiting beyond the slots; prefill_per_step: prompt tokens fed per step;
        # microbatch_rows: the fewest rows the decoding requests are split down to over a pipeline
        if prefill_per_step < 1 or microbatch_rows < 1:
            raise UsageError(f"prefill_per_step and microbatch_rows must be >= 1, got {prefill_per_step} and "
                             f"{microbatch_rows}")
        self.model, self.stops, self.max_queue = model, set(stop_ids), max_queue
        self.prefill_per_step, self.microbatch_rows = prefill_per_step, microbatch_rows
        self.waiting: deque[Request] = deque()
        self.active: dict[int, Request] = {}                       # slot -> request
        self.held: list[list[int]] = [[] for _ in range(model.max_batch_size)]  # tokens in each cache row
        self.lock = threading.Condition()
        self.draining = False
        self.broken: str | None = None                             # why the engine stopped
        # A Pipeline (submit_rows/collect) takes one microbatch per stage in flight; a model in
        # this process computes at submission, so one "microbatch" of every row per step.
        self.pipelined = hasattr(model, "submit_rows")
        self.depth = len(model.stages) if self.pipelined else 1
        # (handle or logits, the requests it samples, whether it is a decode microbatch)
        self.inflight: deque[tuple[object, list[Request], bool]] = deque()

    # --- the request side (any thread) ---------------------------------------------------
    def submit(self, req: Request) -> Request:
        if not req.prompt:
            raise UsageError("empty prompt")
        if len(req.prompt) + max(req.max_tokens, 1) - 1 > self.model.max_seq_len or req.max_tokens < 0:
            raise UsageError(f"prompt of {len(req.prompt)} tokens plus max_tokens {req.max_tokens} exceeds the "
                             f"context of {self.model.max_seq_len} tokens")
        with self.lock:
            if self.broken:
                raise Broken(f"the server cannot answer: {self.broken}")
            if self.draining:
                raise Draining("the server is shutting down")
            if len(self.waiting) + len(self.active) >= self.model.max_batch_size + self.max_queue:
                raise QueueFull(f"all {self.model.max_batch_size} slots are busy and {len(self.waiting)} "
                                "requests are waiting already")
            self.waiting.append(req)
            self.lock.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Frees req's slot and cache row at the next step (a client that went away)."""
        with self.lock:
            req.cancelled = True
            self.lock.notify_all()

    def n_active(self) -> int:
        with self.lock:
            return len(self.active) + len(self.waiting)

    # --- the engine side (one thread) ----------------------------------------------------
    def step(self) -> bool:
        """Admit (copying a cached shared prefix), feed up to prefill_per_step prompt tokens,
        submit the decoding rows' next tokens, collect the oldest microbatches in flight. A long
        prompt is fed a chunk a step, between decode steps: the other streams go on. False
        when there was nothing to do."""
        admitted = self._admit()
        for req in admitted:
            self._reuse_prefix(req)
        fed = self._prefill_step()
        submitted = self._submit_ready()
        collected = self._collect(waiting_only=not (admitted or fed or submitted))
        return bool(admitted or fed or submitted or collected)

    def _admit(self) -> list[Request]:
        """Drops cancelled requests, moves waiting ones into free slots -> those admitted."""
        with self.lock:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self._finish(req, "cancelled")
            for req in [r for r in self.active.values() if r.cancelled]:
                self._finish(req, "cancelled")
            admitted = []
            free = [s for s in range(self.model.max_batch_size) if s not in self.active]
            while self.waiting and free:
                req = self.waiting.popleft()
                req.slot = free.pop(0)
                self.active[req.slot] = req
                admitted.append(req)
        return admitted

    def _submit_ready(self) -> int:
        """The runnable requests not in flight, split into as many microbatches as the
        pipeline has room for, each submitted: one new token per row, at the row's own
        position, into its own cache row -> how many rows were submitted."""
        flying = {id(r) for _, group, _ in self.inflight for r in group}
        ready = [r for r in self.active.values() if r.finish_reason is None and not r.cancelled and
                 r.fed == len(r.prompt) and id(r) not in flying]
        # Prefill chunks in flight take no room: the streams decode on while prompts are fed.
        # A split pays only where a stage's time grows with its rows: each microbatch reads
        # the stage's weights again (see README, Serving, for where it did not).
        # Too few rows for one wait for the microbatches in flight, whose rows join them.
        decoding = sum(d for _, _, d in self.inflight)
        room = self.depth - decoding                           # microbatches the pipeline can take
        full = len(ready) // self.microbatch_rows             # microbatches of at least R rows
        wanted = full if full else int(not decoding)           # nothing decoding: submit what there is
        k = min(room, wanted, len(ready))
        for i in range(max(k, 0)):
            group = ready[i * len(ready) // k:(i + 1) * len(ready) // k]
            tokens = np.array([[r.tokens[-1]] for r in group])                 # (b, 1)
            positions = np.array([len(self.held[r.slot]) for r in group])     # (b,)
            rows = [r.slot for r in group]
            run = self.model.submit_rows if self.pipelined else self.model.forward_rows
            self.inflight.append((run(tokens, positions, rows), group, True))
            for r in group:
                self.held[r.slot].append(r.tokens[-1])    # in the cache row once the microbatch has run
        return len(ready) if k > 0 else 0

    def _collect(self, waiting_only: bool) -> bool:
        """The oldest microbatches' logits (b, vocab), each row's next token sampled, until
        fewer than one per stage are in flight: the stages keep work while the driver samples
        and submits. waiting_only (the step submitted nothing): at least the oldest."""
        if not self.inflight:
            return False
        while self.inflight and (len(self.inflight) >= self.depth or waiting_only):
            waiting_only = False
            handle, group, _ = self.inflight.popleft()
            logits = self.model.collect(handle) if self.pipelined else handle
            for r, row in zip(group, logits):
                self._emit(r, row)
        return True

    def _reuse_prefix(self, req: Request) -> None:
        """The longest prefix of req's prompt some cache row holds already, copied into req's
        row (at least one token is left to feed, for the logits)."""
        limit = len(req.prompt) - 1
        best, src = 0, req.slot
        for slot, held in enumerate(self.held):
            k = 0
            while k < min(len(held), limit) and held[k] == req.prompt[k]:
                k += 1
            if k > best:
                best, src = k, slot
        if src != req.slot:
            self.model.copy_rows(src, req.slot, best)
        self.held[req.slot] = req.prompt[:best]
        req.fed = best

    def _prefill_step(self) -> int:
        """Up to prefill_per_step prompt tokens into the cache rows of the requests being
        prefilled, oldest first, a chunk each; a prompt fed to its end samples its first
        token -> how many tokens were fed. Over a pipeline a chunk is submitted like a decode
        microbatch, its first token sampled when collected: stage 0 takes the next chunk while
        stage 1 runs this one, where waiting for it would leave one stage idle at a time."""
        budget = self.prefill_per_step
        for req in [r for r in self.active.values() if r.fed < len(r.prompt) and r.finish_reason is None]:
            if budget == 0:
                break
            chunk, start = req.prompt[req.fed:req.fed + budget], req.fed
            req.fed += len(chunk)
            self.held[req.slot] = req.prompt[:req.fed]   # in the cache row once the chunk has run
            budget -= len(chunk)
            last = [req] if req.fed == len(req.prompt) else []      # whose first token its logits give
            if self.pipelined:
                self.inflight.append((self.model.submit_rows(np.array([chunk]), [start], [req.slot]), last, False))
                continue
            logits = self.model.forward_rows(np.array([chunk]), [start], [req.slot])
            for r in last:
                self._emit(r, logits[0])
        return self.prefill_per_step - budget

    def _emit(self, req: Request, logits: np.ndarray) -> None:
        """Sample req's next token from its logits, as Generator.stream does."""
        if req.finish_reason is not None:
            return
        if req.max_tokens == 0:
            return self._finish(req, "length")
        token = sample(logits, req.sampling, req.rng)
        if token in self.stops:
            return self._finish(req, "stop")
        lp = float(np.log(softmax64(logits)[token]))
        req.tokens.append(token)
        req.logprobs.append(lp)
        top = most_likely(logits, req.top_logprobs) if req.top_logprobs else []
        if req.on_token is not None and req.on_token(req, token, lp, top) is False:
            return self._finish(req, "stop")                               # a stop string
        if len(req.tokens) >= req.max_tokens or len(req.prompt) + len(req.tokens) - 1 >= self.model.max_seq_len:
            self._finish(req, "length")

    def _finish(self, req: Request, reason: str) -> None:
        with self.lock:
            req.finish_reason = req.finish_reason or reason
            if req.slot is not None and self.active.get(req.slot) is req:
                del self.active[req.slot]
            self.lock.notify_all()
        if req.on_done is not None:
            req.on_done(req)

    def fail(self, e: Exception) -> None:
        """A step raised (a stage died, or a bug): every request ends with the error, and the
        engine takes no more (its model's state is unknown: a pipeline's caches are gone)."""
        message = str(e) if isinstance(e, NpllamaError) else f"{type(e).__name__}: {e}"
        with self.lock:
            self.broken = message
            failed = list(self.waiting) + list(self.active.values()) + [r for _, g, _ in self.inflight for r in g]
            self.waiting.clear()
            self.inflight.clear()
        for req in {id(r): r for r in failed}.values():
            if req.finish_reason is None:
                req.error = message
                self._finish(req, "error")
        print(f"npllama serve: the engine stopped: {printable(message)}", file=sys.stderr, flush=True)

    def run(self, stop: threading.Event) -> None:
        """Step until stop is set and every request is done (a drain)."""
        while True:
            try:
                busy = self.step()
            except Exception as e:   # noqa: BLE001 - whatever it was, no request may wait forever
                self.fail(e)
                busy = False
            if not busy:
                with self.lock:
                    if stop.is_set() and not self.waiting and not self.active:
                        return
                    self.lock.wait(0.05)
