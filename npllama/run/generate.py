"""Generation: prefill the prompt in one forward pass, then decode token by token with the
KV cache; greedy, temperature, top-p (Meta's sample_top_p) and top-k sampling."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from ..errors import UsageError, WeightError
from ..model.model import Transformer, ways_to_a_longer_context
from ..progress import Progress
from ..text.tokenizer import Tokenizer


def softmax64(logits: np.ndarray) -> np.ndarray:
    # float64: probabilities for sampling and log-probabilities lose nothing to rounding.
    x = logits.astype(np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def top_p_filter(probs: np.ndarray, p: float) -> np.ndarray:
    """Meta's sample_top_p: keep the smallest set of most likely tokens whose mass reaches p
    (a token is dropped when the mass before it already exceeds p), renormalised."""
    order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order]
    mask = np.cumsum(sorted_probs) - sorted_probs > p
    sorted_probs = np.where(mask, 0.0, sorted_probs)
    out = np.zeros_like(probs)
    out[order] = sorted_probs
    return out / out.sum()


def most_likely(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens and their log-probabilities (of the unfiltered distribution,
    as `logprobs`), most likely first; equal ones in id order."""
    logp = np.log(softmax64(logits))
    k = min(k, len(logp))
    top = np.argpartition(-logp, k - 1)[:k]
    top = top[np.lexsort((top, -logp[top]))]
    return [(int(t), float(logp[t])) for t in top]


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


@dataclass
class SamplingParams:
    temperature: float = 0.0      # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                # 0: off
    seed: int | None = None

    def __post_init__(self):
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise UsageError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}")


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from (vocab,) logits."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    probs = softmax64(top_k_filter(logits.astype(np.float64), params.top_k) / params.temperature)
    if params.top_p < 1:
        probs = top_p_filter(probs, params.top_p)
    return int(rng.choice(len(probs), p=probs))


@dataclass
class Result:
    tokens: list[int]
    text: str
    stop_reason: str                       # "stop_token", "stop_string", "length"
    logprobs: list[float] | None = None
    prompt_tokens: int = 0
    top_logprobs: list[list[tuple[int, float]]] | None = None   # per token: the k most likely (id, logprob)


@dataclass
class Timings:
    """Forward-pass time only: tokenization and sampling are excluded (llama-bench style)."""
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generated_seconds: float = 0.0

    def line(self) -> str:
        rate = lambda n, s: f"{n / s:.1f} tok/s" if s > 0 else "- tok/s"  # noqa: E731
        return (f"prompt: {self.prompt_tokens} tokens, {rate(self.prompt_tokens, self.prompt_seconds)} | "
                f"generated: {self.generated_tokens} tokens, {rate(self.generated_tokens, self.generated_seconds)}")


@dataclass
class Generator:
    """Runs a Transformer and a Tokenizer together. Remembers which tokens its cache holds
    (batch row 0), so a prompt that extends the previous one (a chat) is prefilled only
    from where they differ."""
    model: Transformer
    tokenizer: Tokenizer
    cached: list[int] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    progress: object = None     # a stream (stderr) for a long prefill's progress line, or None

    def _forward(self, tokens: np.ndarray, start_pos: int, phase: str) -> np.ndarray:
        t0 = time.perf_counter()
        with np.errstate(all="ignore"):   # a NaN or overflow on the way is reported below, in one line
            logits = self.model.forward(tokens, start_pos=start_pos, last_only=True)
        dt = time.perf_counter() - t0
        if not np.isfinite(logits).all():
            # A NaN or inf in the weights spreads to every later position: stop rather than
            # sample garbage (argmax of NaNs is token 0).
            where = getattr(self.model, "path", None)
            hint = f"`npllama info {where} --verify`" if where else "`npllama info DIR --verify`"
            raise WeightError(f"the model computed non-finite logits at position {start_pos + tokens.shape[-1] - 1}; "
                              f"its weights may hold a NaN or infinity ({hint} lists those tensors) or values so "
                              "large that a sum overflows (`npllama trace` names the first tensor that does)")
        n = tokens.shape[-1] * (tokens.shape[0] if tokens.ndim == 2 else 1)
        if phase == "prompt":
            self.timings.prompt_tokens += n
            self.timings.prompt_seconds += dt
        else:
            self.timings.generated_tokens += tokens.shape[0] if tokens.ndim == 2 else 1
            self.timings.generated_seconds += dt
        return logits

    def _prefill(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        """The prompt tokens (T,) or (B, T) from start_pos -> the last position's logits.
        With a progress stream, a prompt longer than the model's prefill chunk is fed a chunk
        per call with a progress line between them: forward itself would run these same
        chunks through the cache one after another, so the logits are the same."""
        n, T = getattr(self.model, "prefill_chunk", 0), tokens.shape[-1]
        if self.progress is None or not 0 < n < T:
            return self._forward(tokens, start_pos, "prompt")
        bar = Progress("prefill", T, "tokens", stream=self.progress)
        for s in range(0, T, n):
            logits = self._forward(tokens[..., s:s + n], start_pos + s, "prompt")
            bar.update(min(s + n, T))
        bar.close()
        return logits

    def stream(self, prompt: Sequence[int], max_new_tokens: int = 256, sampling: SamplingParams | None = None,
               stop_strings: Sequence[str] = (), logprobs: bool = False, top_logprobs: int = 0) -> "Stream":
        """A generation from one prompt, as a Stream: iterate it for (text piece, token,
        logprob) as tokens come; its `result` is filled as it goes."""
        return self.start([prompt], Options(max_new_tokens, sampling, stop_strings, logprobs, top_logprobs))

    def generate(self, prompt: Sequence[int], max_new_tokens: int = 256, sampling: SamplingParams | None = None,
                 stop_strings: Sequence[str] = (), logprobs: bool = False, top_logprobs: int = 0) -> Result:
        return self.stream(prompt, max_new_tokens, sampling, stop_strings, logprobs, top_logprobs).run().result

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 256,
                       sampling: SamplingParams | None = None, logprobs: bool = False,
                       stop_strings: Sequence[str] = (), top_logprobs: int = 0) -> list[Result]:
        """Prompts of different lengths together, as Meta's generate does: rows are padded on
        the right, every row keeps its own positions from 0, the shortest prompt sets where
        decoding starts, longer rows keep feeding their prompt tokens, and each row stops on
        its own. Rows sample independently (row i uses seed + i)."""
        if len(prompts) == 0:
            return []
        return self.start(prompts, Options(max_new_tokens, sampling, stop_strings, logprobs, top_logprobs)).run().results

    def start(self, prompts: Sequence[Sequence[int]], opts: "Options") -> "Stream":
        """The Stream of a generation from these prompts (one or a batch), checked before any
        model work."""
        prompts = [[int(t) for t in p] for p in prompts]
        if min(map(len, prompts)) == 0:
            raise UsageError("empty prompt: give at least one token (e.g. bos)")
        if len(prompts) > getattr(self.model, "max_batch_size", 1):
            raise UsageError(f"{len(prompts)} prompts exceed max_batch_size={self.model.max_batch_size}")
        limit, longest = self.model.max_seq_len, max(map(len, prompts))
        if longest > limit:
            raise UsageError(f"a prompt of {longest} tokens exceeds the context of {limit} tokens; "
                             f"{ways_to_a_longer_context(limit, self.model.args.max_seq_len)}")
        seed = opts.sampling.seed
        outputs = [Output(self.tokenizer, len(p), opts, np.random.default_rng(None if seed is None else seed + i))
                   for i, p in enumerate(prompts)]
        return Stream(outputs, self._run(prompts, outputs))

    def _reuse(self, prompt: list[int]) -> int:
        """How many leading tokens of a single prompt the cache already holds (at least one
        prompt token is fed, to get logits); the cache is then taken to hold just those."""
        k = 0
        while k < min(len(self.cached), len(prompt) - 1) and self.cached[k] == prompt[k]:
            k += 1
        self.cached = prompt[:k]
        return k

    def _run(self, prompts: list[list[int]], outputs: list["Output"]) -> Iterator[tuple[int, str, int, float | None]]:
        """The one generation loop, for one prompt or a batch -> (row, text piece, token, logprob)
        per generated token. Decoding starts after the shortest prompt; a longer row feeds its
        own prompt tokens until it has none left."""
        B, single = len(prompts), len(prompts) == 1
        start = self._reuse(prompts[0]) if single else 0
        if not single:
            self.cached = []  # the cache now holds other rows' tokens
        total = min(self.model.max_seq_len, max(len(p) + outputs[0].opts.max_new_tokens for p in prompts))
        prev = min(map(len, prompts))
        if all(o.done for o in outputs) or prev >= total:
            return
        tokens = np.zeros((B, total), dtype=np.int64)  # (B, total); done rows feed dummy 0s
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        logits = self._prefill(tokens[:, start:prev], start)      # (B, vocab)
        if single:
            self.cached = list(prompts[0])
        for cur in range(prev, total):
            for i, out in enumerate(outputs):
                if not out.done and cur >= len(prompts[i]):
                    piece, token, lp = out.step(logits[i])
                    if token is not None:
                        tokens[i, cur] = token
                        if piece or out.result.stop_reason != "stop_string":
                            yield i, piece, token, lp
            if all(o.done for o in outputs) or cur == total - 1:
                break
            logits = self._forward(tokens[:, cur:cur + 1], cur, "decode")
            if single:
                self.cached.append(int(tokens[0, cur]))
        for i, out in enumerate(outputs):
            tail = out.finish()
            if tail:
                yield i, tail, -1, None


@dataclass
class Options:
    """What a generation asks for, checked once when it is made (before any model work)."""
    max_new_tokens: int = 256
    sampling: SamplingParams | None = None
    stop_strings: Sequence[str] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        self.sampling = self.sampling or SamplingParams()
        self.stop_strings = tuple(self.stop_strings)
        if self.max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if any(not s for s in self.stop_strings):
            raise UsageError("stop strings must be non-empty")
        if self.top_logprobs < 0:
            raise UsageError(f"top_logprobs must be >= 0, got {self.top_logprobs}")


class Output:
    """One sequence of a generation: samples its tokens from the logits it is given, decodes
    them into text pieces that never split a UTF-8 character, and holds back text that could
    still become the start of a stop string. Its `result` is filled as it goes."""

    def __init__(self, tokenizer: Tokenizer, n_prompt: int, opts: Options, rng: np.random.Generator):
        self.opts, self.rng = opts, rng
        self.result = Result([], "", "length", [] if opts.logprobs else None, n_prompt,
                             [] if opts.top_logprobs else None)
        self.decoder, self.stops, self.held = tokenizer.stream_decoder(), set(tokenizer.stop_ids), ""
        self.longest_stop = max(map(len, opts.stop_strings), default=0)
        self.done = opts.max_new_tokens == 0

    def step(self, logits: np.ndarray) -> tuple[str, int | None, float | None]:
        """The next token from (vocab,) logits -> (text piece, token, logprob); token None
        when it is a stop token (which is not part of the output)."""
        o, r = self.opts, self.result
        token = sample(logits, o.sampling, self.rng)
        if token in self.stops:
            r.stop_reason, self.done = "stop_token", True
            return "", None, None
        lp = float(np.log(softmax64(logits)[token])) if o.logprobs else None
        r.tokens.append(token)
        if o.logprobs:
            r.logprobs.append(lp)
        if o.top_logprobs:
            r.top_logprobs.append(most_likely(logits, o.top_logprobs))
        self.done = len(r.tokens) >= o.max_new_tokens
        return self._text(self.decoder.add(token)), token, lp

    def _text(self, new: str) -> str:
        self.held += new
        hits = [self.held.find(s) for s in self.opts.stop_strings if s in self.held]
        if hits:
            piece, self.held = self.held[:min(hits)], ""
            self.result.stop_reason, self.done = "stop_string", True
        else:
            cut = max(len(self.held) - (self.longest_stop - 1), 0) if self.longest_stop else len(self.held)
            piece, self.held = self.held[:cut], self.held[cut:]
        self.result.text += piece
        return piece

    def finish(self) -> str:
        """The text still held back (and the decoder's tail), unless a stop string ended it."""
        if self.result.stop_reason == "stop_string":
            return ""
        tail, self.held = self.held + self.decoder.flush(), ""
        self.result.text += tail
        return tail


class Stream:
    """A generation as it runs. Iterating yields (text piece, token, logprob) of its first
    sequence (a single prompt's only one) per generated token, then (tail, -1, None) for text
    held back to the end; the pieces concatenate to its text. `result` (`results`, one per
    prompt) is filled as it goes and complete once the stream is exhausted (`run()`)."""

    def __init__(self, outputs: list[Output], steps: Iterator[tuple[int, str, int, float | None]]):
        self.outputs, self._steps = outputs, steps

    @property
    def result(self) -> Result:
        return self.outputs[0].result

    @property
    def results(self) -> list[Result]:
        return [o.result for o in self.outputs]

    def __iter__(self) -> Iterator[tuple[str, int, float | None]]:
        for row, piece, token, lp in self._steps:
            if row == 0:
                yield piece, token, lp

    def run(self) -> "Stream":
        for _ in self._steps:
            pass
        return self
