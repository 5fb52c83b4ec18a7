"""Continuous batching: requests join and leave the running batch at every decode step.

Each request holds one cache row (a slot) of a Transformer made with max_batch_size = the
number of slots. A step admits waiting requests into free slots (each prompt prefilled alone,
in its own row, after copying the longest prefix any slot already holds: a shared system
prompt is prefilled once), then runs ONE forward pass (Transformer.forward_rows) for every
active request, each at its own position with its own cache rows, and samples each row with
the request's own generator (generate.sample, seeded as Generator.stream seeds it).

Same tokens as alone: the attention of each row is exactly its single-sequence attention; the
projections are one GEMM over all rows, and BLAS may sum a row of a GEMM in another order
than the GEMV of a single sequence. tests/test_serve_engine.py measures it: see README,
Serving, for whether the logprobs are bit-identical.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import NpllamaError, UsageError
from .generate import SamplingParams, most_likely, sample, softmax64


class QueueFull(NpllamaError, RuntimeError):
    """The bounded queue of waiting requests is full (HTTP 429)."""


class Draining(NpllamaError, RuntimeError):
    """The engine is shutting down and takes no new request (HTTP 503)."""


@dataclass
class Request:
    """One sequence: its prompt, how to sample it, and what it produced so far.
    on_token(request, token, logprob, top) is called from the engine's thread per token;
    on_done(request) once, with finish_reason set ("stop", "length" or "cancelled")."""
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

    def __post_init__(self):
        self.rng = np.random.default_rng(self.sampling.seed)


class Engine:
    """The slots of one model, the queue in front of them, and the step that runs them."""

    def __init__(self, model, stop_ids: Sequence[int], max_queue: int = 64):  # max_queue: waiting beyond the slots
        self.model, self.stops, self.max_queue = model, set(stop_ids), max_queue
        self.waiting: deque[Request] = deque()
        self.active: dict[int, Request] = {}                       # slot -> request
        self.held: list[list[int]] = [[] for _ in range(model.max_batch_size)]  # tokens in each cache row
        self.lock = threading.Condition()
        self.draining = False

    # --- the request side (any thread) ---------------------------------------------------
    def submit(self, req: Request) -> Request:
        if not req.prompt:
            raise UsageError("empty prompt")
        if len(req.prompt) + max(req.max_tokens, 1) - 1 > self.model.max_seq_len or req.max_tokens < 0:
            raise UsageError(f"prompt of {len(req.prompt)} tokens plus max_tokens {req.max_tokens} exceeds the "
                             f"context of {self.model.max_seq_len} tokens")
        with self.lock:
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
        """Admit, prefill, one batched decode step. False when there was nothing to do."""
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
        for req in admitted:
            self._emit(req, self._prefill(req))
        batch = [r for r in self.active.values() if r.finish_reason is None and not r.cancelled]
        if batch:
            tokens = np.array([[r.tokens[-1]] for r in batch])                 # (B, 1)
            positions = np.array([len(self.held[r.slot]) for r in batch])     # (B,)
            logits = self.model.forward_rows(tokens, positions, [r.slot for r in batch])  # (B, vocab)
            for r, row in zip(batch, logits):
                self.held[r.slot].append(r.tokens[-1])
                self._emit(r, row)
        return bool(admitted or batch)

    def _prefill(self, req: Request) -> np.ndarray:
        """The prompt into req's cache row, from the longest prefix some row holds already
        (at least one token is fed, for the logits) -> the last position's logits (vocab,)."""
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
        self.held[req.slot] = list(req.prompt)
        return self.model.forward_rows(np.array([req.prompt[best:]]), [best], [req.slot])[0]

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
            if req.slot is not None:
                self.active.pop(req.slot, None)
            self.lock.notify_all()
        if req.on_done is not None:
            req.on_done(req)

    def run(self, stop: threading.Event) -> None:
        """Step until stop is set and every request is done (a drain)."""
        while True:
            if not self.step():
                with self.lock:
                    if stop.is_set() and not self.waiting and not self.active:
                        return
                    self.lock.wait(0.05)
