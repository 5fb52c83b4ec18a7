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
        logits = self.model.forward(tokens, start_pos=start_pos, last_only=True)
        dt = time.perf_counter() - t0
        if not np.isfinite(logits).all():
            # A NaN or inf in the weights spreads to every later position: stop rather than
            # sample garbage (argmax of NaNs is token 0).
            where = getattr(self.model, "path", None)
            hint = f"`npllama info {where} --verify`" if where else "`npllama info DIR --verify`"
            raise WeightError(f"the model computed non-finite logits at position {start_pos + tokens.shape[-1] - 1}; "
                              f"its weights may hold a NaN or infinity ({hint} lists the tensors)")
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
               stop_strings: Sequence[str] = (), logprobs: bool = False,
               top_logprobs: int = 0) -> Iterator[tuple[str, int, float | None]]:
        """Yields (text piece, token, logprob) as tokens are generated; the text pieces
        concatenate to the decoded output and never split a UTF-8 character. A stop token is
        not yielded; text from a stop string on is not yielded. top_logprobs=k records the k
        most likely tokens of every step in self.result.top_logprobs (filled before each yield)."""
        sampling = sampling or SamplingParams()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise UsageError("empty prompt: give at least one token (e.g. bos)")
        if max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if any(not s for s in stop_strings):
            raise UsageError("stop strings must be non-empty")
        if top_logprobs < 0:
            raise UsageError(f"top_logprobs must be >= 0, got {top_logprobs}")
        limit = self.model.max_seq_len
        if len(prompt) > limit:
            raise UsageError(f"prompt of {len(prompt)} tokens exceeds the context of {limit} tokens; "
                             f"{ways_to_a_longer_context(limit, self.model.args.max_seq_len)}")
        self.result = Result([], "", "length", [] if logprobs else None, len(prompt),
                             [] if top_logprobs else None)
        if max_new_tokens == 0:
            return
        rng = np.random.default_rng(sampling.seed)
        # Reuse the cached prefix; at least one prompt token is fed, to get logits.
        k = 0
        while k < min(len(self.cached), len(prompt) - 1) and self.cached[k] == prompt[k]:
            k += 1
        self.cached = prompt[:k]
        logits = self._prefill(np.array(prompt[k:]), k)
        self.cached = list(prompt)
        decoder = self.tokenizer.stream_decoder()
        text, held = "", ""
        stops = set(self.tokenizer.stop_ids)
        longest_stop = max((len(s) for s in stop_strings), default=0)
        for _ in range(max_new_tokens):
            token = sample(logits, sampling, rng)
            lp = float(np.log(softmax64(logits)[token])) if logprobs else None
            if token in stops:
                self.result.stop_reason = "stop_token"
                break
            self.result.tokens.append(token)
            if logprobs:
                self.result.logprobs.append(lp)
            if top_logprobs:
                self.result.top_logprobs.append(most_likely(logits, top_logprobs))
            held += decoder.add(token)
            hit = [held.find(s) for s in stop_strings if s in held]
            if hit:
                piece = held[:min(hit)]
                text += piece
                if piece:
                    yield piece, token, lp
                self.result.stop_reason = "stop_string"
                break
            # Hold back text that could still become the start of a stop string.
            cut = max(len(held) - (longest_stop - 1), 0) if longest_stop else len(held)
            piece, held = held[:cut], held[cut:]
            text += piece
            yield piece, token, lp
            if len(self.cached) >= limit:
                break
            logits = self._forward(np.array([token]), len(self.cached), "decode")
            self.cached.append(token)
        if self.result.stop_reason != "stop_string":
            held += decoder.flush()
            text += held
            if held:
                yield held, -1, None
        self.result.text = text

    def generate(self, prompt: Sequence[int], max_new_tokens: int = 256, sampling: SamplingParams | None = None,
                 stop_strings: Sequence[str] = (), logprobs: bool = False, top_logprobs: int = 0) -> Result:
        for _ in self.stream(prompt, max_new_tokens, sampling, stop_strings, logprobs, top_logprobs):
            pass
        return self.result

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 256,
                       sampling: SamplingParams | None = None, logprobs: bool = False) -> list[Result]:
        """Prompts of different lengths together, as Meta's generate does: rows are padded on
        the right, every row keeps its own positions from 0, the shortest prompt sets where
        decoding starts, longer rows keep feeding their prompt tokens, and each row stops on
        its own. Rows sample independently (row i uses seed + i)."""
        sampling = sampling or SamplingParams()
        prompts = [[int(t) for t in p] for p in prompts]
        B = len(prompts)
        if B == 0:
            return []
        if B > self.model.max_batch_size:
            raise UsageError(f"{B} prompts exceed max_batch_size={self.model.max_batch_size}")
        if min(map(len, prompts)) == 0:
            raise UsageError("empty prompt in the batch: give at least one token (e.g. bos)")
        if max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        limit = self.model.max_seq_len
        if max(map(len, prompts)) > limit:
            raise UsageError(f"a prompt of {max(map(len, prompts))} tokens exceeds the context of {limit} tokens; "
                             f"{ways_to_a_longer_context(limit, self.model.args.max_seq_len)}")
        self.cached = []  # the cache now holds other rows' tokens
        total = min(limit, max(len(p) + max_new_tokens for p in prompts))
        pad = -1
        tokens = np.full((B, total), pad, dtype=np.int64)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        rngs = [np.random.default_rng(None if sampling.seed is None else sampling.seed + i) for i in range(B)]
        results = [Result([], "", "length", [] if logprobs else None, len(p)) for p in prompts]
        done = np.array([max_new_tokens == 0] * B)
        stops = set(self.tokenizer.stop_ids)
        prev = min(map(len, prompts))
        feed = np.where(tokens[:, :prev] == pad, 0, tokens[:, :prev])
        logits = self._prefill(feed, 0)
        for cur in range(prev, total):
            for i in range(B):
                if done[i] or cur < len(prompts[i]):
                    continue
                token = sample(logits[i], sampling, rngs[i])
                if token in stops:
                    done[i] = True
                    results[i].stop_reason = "stop_token"
                    continue
                tokens[i, cur] = token
                results[i].tokens.append(token)
                if logprobs:
                    results[i].logprobs.append(float(np.log(softmax64(logits[i])[token])))
                if len(results[i].tokens) >= max_new_tokens:
                    done[i] = True
            if done.all() or cur == total - 1:
                break
            # rows that are done (or padding) feed a dummy token; their outputs are ignored
            step = np.where(tokens[:, cur] == pad, 0, tokens[:, cur])[:, None]
            logits = self._forward(step, cur, "decode")
        for r in results:
            r.text = self.tokenizer.decode(r.tokens)
        return results
