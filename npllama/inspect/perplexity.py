"""Perplexity and KL divergence exactly as llama.cpp's `llama-perplexity` computes them, and
its KL-divergence base file, so either program can score the other's logits.

The method (llama.cpp tools/perplexity/perplexity.cpp, `perplexity`): tokenize the whole
text once, with the tokenizer's add-bos rule; cut it into n_chunk = len // n_ctx chunks of
n_ctx tokens (the rest is dropped); run each chunk as a fresh sequence at positions
0..n_ctx-1, its first token replaced by bos when the tokenizer adds one; score only the
second half, the logits at positions first = n_ctx/2 .. n_ctx-2 against the next token
(n_ctx - 1 - first tokens a chunk, each with at least n_ctx/2 tokens of context).
PPL = exp(mean nll), and its uncertainty PPL * sqrt(var(nll) / (count - 1)).

The base file (`llama-perplexity --kl-divergence-base FILE`), native byte order (little-endian):

    "_logits_"                     8 bytes
    n_ctx, n_vocab, n_chunk        int32 each
    tokens                         int32 x n_chunk*n_ctx, as tokenized (no bos replacement)
    per chunk, per scored row      nv = 2*((n_vocab + 1)/2) + 4 uint16:
        [0:2] float32 scale, [2:4] float32 min_log_prob, [4:4+n_vocab] uint16 q, zero padding
        log p_i = scale * q_i + min_log_prob, quantized over the 16 nats below the top logit
        (logits further down are q = 0).
"""
from __future__ import annotations

import contextlib
import json
import math
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..errors import NonFiniteError, UsageError
from ..io.atomic import staged_file
from ..untrusted import file_size, open_regular

MAGIC = b"_logits_"
HEADER = struct.Struct("<8siii")
LOG_PROB_RANGE = np.float32(16)   # nats below the top logit that the base file resolves


def row_width(n_vocab: int) -> int:
    """uint16 entries per scored row in the base file (llama.cpp's nv)."""
    return 2 * ((n_vocab + 1) // 2) + 4


def scored_rows(n_ctx: int) -> int:
    return n_ctx - 1 - n_ctx // 2


def split_chunks(tokens, n_ctx: int, n_chunks: int | None = None) -> np.ndarray:
    """(n_chunk, n_ctx) token ids; llama.cpp asks for at least two chunks' worth."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if n_ctx < 4:
        raise UsageError(f"-c {n_ctx}: the context must be at least 4 tokens (half of it is scored)")
    if len(tokens) < 2 * n_ctx:
        raise UsageError(f"the text is {len(tokens)} tokens; perplexity with -c {n_ctx} needs at least "
                         f"{2 * n_ctx} (as llama-perplexity does)")
    n = len(tokens) // n_ctx if n_chunks is None or n_chunks <= 0 else min(n_chunks, len(tokens) // n_ctx)
    return tokens[:n * n_ctx].reshape(n, n_ctx)


def chunk_logits(model, rows: np.ndarray, n_batch: int) -> np.ndarray:
    """rows (B, n_ctx) token ids, each a fresh sequence from position 0 -> float32 logits
    (B, n_ctx - 1 - first, vocab) at the scored positions first..n_ctx-2.

    Forward passes of at most n_batch tokens a row; the first half, which is context only,
    ends on its own pass with last_only, so the output head runs only where it is scored.
    """
    B, n_ctx = rows.shape
    first = n_ctx // 2
    out, pos = [], 0
    while pos < n_ctx - 1:
        end = min(pos + n_batch, first if pos < first else n_ctx - 1)
        logits = model.forward(rows[:, pos:end], start_pos=pos, last_only=end <= first)
        if end > first:
            out.append(logits)
        pos = end
    return np.concatenate(out, axis=1)


def batching(model, n_ctx: int, n_batch: int | None) -> tuple[int, int]:
    """(tokens per forward pass, chunks per pass), checked against the model. n_batch below
    n_ctx feeds a chunk in pieces; a multiple of n_ctx runs that many chunks side by side as
    batch rows (llama.cpp's n_seq); None is one chunk a pass."""
    n_batch = n_ctx if n_batch is None else n_batch
    if n_batch <= 0 or (n_batch > n_ctx and n_batch % n_ctx):
        raise UsageError(f"--batch {n_batch}: must be below -c {n_ctx} or a multiple of it")
    n_seq = max(1, n_batch // n_ctx)
    if n_seq > model.max_batch_size:
        raise UsageError(f"--batch {n_batch}: {n_seq} chunks at once, but the model holds {model.max_batch_size}")
    if n_ctx > model.max_seq_len:
        raise UsageError(f"-c {n_ctx} exceeds the model's context of {model.max_seq_len}")
    return n_batch, n_seq


def evaluate(model, chunks: np.ndarray, bos_id: int | None, n_batch: int | None = None,
             progress=None) -> Iterator[tuple[np.ndarray, np.ndarray, float]]:
    """Yields (logits (R, vocab) float32, targets (R,), forward seconds) per chunk, in order
    (n_batch: see batching)."""
    n_chunk, n_ctx = chunks.shape
    n_batch, n_seq = batching(model, n_ctx, n_batch)
    first = n_ctx // 2
    t_start = time.perf_counter()
    for i in range(0, n_chunk, n_seq):
        rows = chunks[i:i + n_seq].copy()
        if bos_id is not None:
            rows[:, 0] = bos_id
        t0 = time.perf_counter()
        logits = chunk_logits(model, rows, min(n_batch, n_ctx))
        dt = time.perf_counter() - t0
        if progress is not None:
            done = min(i + n_seq, n_chunk)
            eta = (time.perf_counter() - t_start) / done * (n_chunk - done)
            print(f"perplexity: chunk {done}/{n_chunk}, {dt:.2f} s per pass, ETA {eta:.0f} s", file=progress,
                  flush=True)
        for b in range(len(rows)):
            yield check_logits(logits[b], f"chunk {i + b + 1}"), chunks[i + b, first + 1:], dt / len(rows)


MAX_EXP = math.log(np.finfo(np.float64).max)   # 709.78: exp of more overflows a float


def finite_exp(x: float, what: str) -> float:
    """math.exp(x) for a statistic: one that would overflow (a mean NLL over 709 nats, as
    logits spread over 1e5 nats give) or is NaN is an error naming it, not an OverflowError."""
    if not x <= MAX_EXP:
        raise NonFiniteError(f"{what}: exp({x:.6g}) is not a finite number (the model gives the text a probability "
                             "below anything a float holds: are its weights or logits damaged?)")
    return math.exp(x)


def check_logits(logits: np.ndarray, where: str) -> np.ndarray:
    """The logits of a chunk, refused if any is NaN or infinite (naming the first row and
    token): a NaN weight must not become `PPL = nan` with exit 0."""
    finite = np.isfinite(logits)
    if not finite.all():
        row, token = np.unravel_index(int(np.argmin(finite)), finite.shape)[-2:]
        raise NonFiniteError(f"{where}: the model's logits hold {logits[..., row, token]!s} at scored row {row + 1}, "
                             f"token {token} (NaN or infinite weights, or an overflow in the forward pass)")
    return logits


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, float64 (llama.cpp: float32 logits, the
    exponentials summed in double)."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=-1))
    return lse - x[np.arange(len(x)), targets]


def mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    """llama.cpp's estimate: the mean and the standard error sqrt(var / (count - 1))."""
    if count < 1:
        return 0.0, 0.0
    f = total / count
    df = total2 / count - f * f
    return f, (math.sqrt(df / (count - 1)) if df > 0 and count > 1 else 0.0)


@dataclass
class Perplexity:
    """Running sums over the scored tokens, and the result after every chunk."""
    nll: float = 0.0
    nll2: float = 0.0
    count: int = 0
    chunks: list[float] = field(default_factory=list)   # PPL so far, after each chunk
    seconds: float = 0.0
    tokens: int = 0                                      # tokens run through the model

    def add(self, nll: np.ndarray, seconds: float, n_ctx: int) -> None:
        self.nll += float(nll.sum())
        self.nll2 += float((nll * nll).sum())
        self.count += len(nll)
        self.seconds += seconds
        self.tokens += n_ctx
        self.chunks.append(self.ppl)

    @property
    def ppl(self) -> float:
        return finite_exp(self.nll / self.count, f"perplexity after {len(self.chunks) or 1} chunk(s)")

    @property
    def ppl_err(self) -> float:
        mean, err = mean_and_uncertainty(self.nll, self.nll2, self.count)
        return finite_exp(mean, "perplexity") * err


# --- the base file ----------------------------------------------------------------------

def quantize_log_probs(logits: np.ndarray) -> np.ndarray:
    """(R, vocab) float32 logits -> (R, nv) uint16 base-file rows (llama.cpp's log_softmax
    with a log_prob buffer, in its float32 order of operations)."""
    logits = np.asarray(logits, dtype=np.float32)
    R, V = logits.shape
    mx = logits.max(axis=-1)
    mn = np.maximum(logits.min(axis=-1), mx - LOG_PROB_RANGE)
    log_sum_exp = np.log(np.exp(logits - mx[:, None]).sum(axis=-1, dtype=np.float64)).astype(np.float32)
    min_log_prob = (mn - mx) - log_sum_exp
    scale = (mx - mn) / np.float32(65535)
    out = np.zeros((R, row_width(V)), dtype="<u2")
    out[:, :4] = np.stack([scale, min_log_prob], axis=-1).astype("<f4").view("<u2")
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((np.float32(1) / scale)[:, None] * (logits - mn[:, None]))
    keep = (logits > mn[:, None]) & (scale[:, None] > 0)
    out[:, 4:4 + V] = np.where(keep, np.clip(q, 0, 65535), 0).astype("<u2")
    return out


def dequantize_log_probs(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """(R, nv) base-file rows -> (R, n_vocab) float32 log-probabilities."""
    head = np.ascontiguousarray(rows[:, :4]).view("<f4")            # (R, 2): scale, min_log_prob
    return head[:, :1] * rows[:, 4:4 + n_vocab].astype(np.float32) + head[:, 1:]


@contextlib.contextmanager
def base_writer(path: str, chunks: np.ndarray, n_vocab: int) -> Iterator[Callable[[np.ndarray], None]]:
    """Yields add(logits), which appends a chunk's rows to the base file at path; the file
    appears when the block ends without error, complete (atomic.staged_file)."""
    n_chunk, n_ctx = chunks.shape
    with staged_file(path, "KL-divergence base file") as tmp, open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, n_ctx, n_vocab, n_chunk))
        f.write(chunks.astype("<i4").tobytes())
        yield lambda logits: f.write(quantize_log_probs(logits).tobytes())


# A base file's positions and vocabulary, checked from its header before anything is read:
# 2**26 positions (67M tokens, 200 times wikitext-2's test set; 256 MiB of ids), and a
# vocabulary of 2**21 (Llama 3's is 128,256; npllama's tokenizers allow at most 2**21 ids).
MAX_POSITIONS = 2**26
MAX_VOCAB = 2**21


def token_range(tokens: np.ndarray, rows: int = 4096) -> tuple[int, int]:
    """(min, max) of a mapped (n_chunk, n_ctx) array, read `rows` chunks at a time."""
    low, high = 0, 0
    for i in range(0, len(tokens), rows):
        part = np.asarray(tokens[i:i + rows])
        low, high = (min(low, int(part.min())), max(high, int(part.max()))) if i else (int(part.min()), int(part.max()))
    return low, high


@dataclass
class BaseFile:
    """A base file, checked against its own header; the log-probabilities stay on disk and
    each chunk's rows are checked when read (chunk)."""
    path: str
    n_ctx: int
    n_vocab: int
    tokens: np.ndarray        # (n_chunk, n_ctx) int32
    rows: np.ndarray          # (n_chunk, scored rows, nv) uint16, memory-mapped

    @classmethod
    def open(cls, path: str) -> "BaseFile":
        """Untrusted input: a regular file whose size must be exactly what its header's counts
        make before anything is read past the header; nothing is allocated from a count."""
        with open_regular(path, UsageError) as f:
            size = file_size(f)
            header = f.read(HEADER.size)
            if len(header) < HEADER.size or header[:8] != MAGIC:
                raise UsageError(f"{path}: not a KL-divergence base file (llama-perplexity --kl-divergence-base "
                                 "files start with _logits_)")
            _, n_ctx, n_vocab, n_chunk = HEADER.unpack(header)
            if n_ctx < 4 or n_vocab < 1 or n_chunk < 1:
                raise UsageError(f"{path}: header says n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk}")
            if n_chunk * n_ctx > MAX_POSITIONS or n_vocab > MAX_VOCAB:
                raise UsageError(f"{path}: header says {n_chunk:,} chunks of {n_ctx:,} positions over {n_vocab:,} "
                                 f"tokens, beyond the {MAX_POSITIONS:,} positions and {MAX_VOCAB:,} tokens accepted")
            rows, nv = scored_rows(n_ctx), row_width(n_vocab)
            rows_at = HEADER.size + 4 * n_chunk * n_ctx
            expected = rows_at + 2 * n_chunk * rows * nv
            if size != expected:
                raise UsageError(f"{path}: {size} bytes, but n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk} "
                                 f"make {expected} (truncated or not a base file)")
            # mapped, not read: the ids are checked a chunk at a time and never held whole
            tokens = np.memmap(f, dtype="<i4", mode="r", offset=HEADER.size, shape=(n_chunk, n_ctx))
            low, high = token_range(tokens)
            if low < 0 or high >= n_vocab:
                raise UsageError(f"{path}: token ids {low}..{high} outside the vocabulary of {n_vocab}")
            log_probs = np.memmap(f, dtype="<u2", mode="r", offset=rows_at, shape=(n_chunk, rows, nv))
        return cls(path, n_ctx, n_vocab, tokens, log_probs)

    def chunk(self, i: int) -> np.ndarray:
        """Chunk i's rows (scored rows, nv), each row's scale and minimum checked to be what
        llama.cpp's quantization makes: finite, its 65536 levels spanning at most
        LOG_PROB_RANGE nats, the lowest no further than that below the log-probability of a
        uniform distribution, the highest at most log 1 = 0 (float32 rounding allowed). So
        every log-probability a row gives is finite and every statistic of it too."""
        rows = np.asarray(self.rows[i])
        head = np.ascontiguousarray(rows[:, :4]).view("<f4").astype(np.float64)      # (R, 2)
        scale, low = head[:, 0], head[:, 1]
        with np.errstate(invalid="ignore", over="ignore"):
            ok = np.isfinite(head).all(axis=1) & (scale >= 0) & (scale * 65535 <= LOG_PROB_RANGE * 1.001) & \
                (low >= -LOG_PROB_RANGE - math.log(self.n_vocab) - 1) & (scale * 65535 + low <= 1e-3)
        if not ok.all():
            r = int(np.argmin(ok))
            raise UsageError(f"{self.path}: chunk {i + 1}, row {r + 1}: scale {scale[r]:g} and minimum "
                             f"log-probability {low[r]:g} are not what llama-perplexity writes (damaged file?)")
        return rows


# --- KL divergence against a base file ----------------------------------------------------

class KLDivergence:
    """Per scored token, the quantities llama.cpp's kl_divergence sums: the model's nll, the
    base's, KL(base || model), the change in the correct token's probability (delta-p) and
    whether the top tokens agree."""

    def __init__(self):
        self.values: dict[str, list[np.ndarray]] = {k: [] for k in ("nll", "nll_base", "kld", "p_diff", "same_top")}

    def add(self, logits: np.ndarray, base_rows: np.ndarray, targets: np.ndarray) -> None:
        """One chunk: logits (R, vocab) of the model under test, the base file's rows for it."""
        logits = np.asarray(logits, dtype=np.float32)
        R, V = logits.shape
        r = np.arange(R)
        log_p_base = dequantize_log_probs(np.asarray(base_rows), V)         # (R, V) float32
        mx = logits.max(axis=-1)
        log_z = mx + np.log(np.exp(logits - mx[:, None]).sum(axis=-1, dtype=np.float64)).astype(np.float32)
        nll = log_z - logits[r, targets]                                    # float32, as llama.cpp
        nll_base = -log_p_base[r, targets]
        # KL(base || model) over the tokens the base resolves (log p > -16), as llama.cpp sums it.
        terms = np.exp(log_p_base) * (log_p_base - logits + log_z[:, None])
        kld = np.where(log_p_base > -LOG_PROB_RANGE, terms, 0).sum(axis=-1, dtype=np.float64)
        # np.argmax takes the first of equal maxima, as llama.cpp's strict `>` scans do.
        same = logits.argmax(axis=-1) == log_p_base.argmax(axis=-1)
        for k, v in (("nll", nll), ("nll_base", nll_base), ("kld", kld), ("p_diff", np.exp(-nll) - np.exp(-nll_base)),
                     ("same_top", same)):
            self.values[k].append(np.asarray(v, dtype=np.float64))

    def chunk_line(self, chunk: int) -> str:
        """The running values llama.cpp prints after each chunk."""
        s = self.summary()
        return (f"{chunk:4d}    {s['ppl']:9.4f} ± {s['ppl_err']:9.4f}    {s['ln_ppl_ratio']:10.5f} ± "
                f"{s['ln_ppl_ratio_err']:10.5f}    {s['kld']:10.5f} ± {s['kld_err']:10.5f}    "
                f"{100 * s['p_diff_rms']:6.3f} ± {100 * s['p_diff_rms_err']:6.3f} %    "
                f"{100 * s['same_top']:6.3f} ± {100 * s['same_top_err']:6.3f} %")

    def summary(self) -> dict:
        """Every statistic llama.cpp's kl_divergence prints, by name."""
        v = {k: np.concatenate(a) for k, a in self.values.items()}
        n = len(v["nll"])

        def mu(x):   # llama.cpp's KL-mode estimate gives no uncertainty below 11 values
            mean, err = mean_and_uncertainty(float(x.sum()), float((x * x).sum()), n)
            return mean, (err if n > 10 else 0.0)
        log_ppl, log_ppl_err = mu(v["nll"])
        log_base, log_base_err = mu(v["nll_base"])
        cov = 0.0 if n < 10 else float((v["nll"] * v["nll_base"]).mean() - v["nll"].mean() * v["nll_base"].mean()) / (n - 1)
        ratio_err = math.sqrt(max(log_ppl_err ** 2 + log_base_err ** 2 - 2 * cov, 0.0))
        ppl, ppl_base = finite_exp(log_ppl, "PPL(Q)"), finite_exp(log_base, "PPL(base)")
        ppl_err, ppl_base_err = ppl * log_ppl_err, ppl_base * log_base_err
        kld, kld_err = mu(v["kld"])
        mse, mse_err = mu(v["p_diff"] ** 2)
        p_diff, p_diff_err = mu(v["p_diff"])
        same = float(v["same_top"].mean())
        kl, pd = np.sort(v["kld"]), np.sort(v["p_diff"])
        return {"count": n, "ppl": ppl, "ppl_err": ppl_err, "ppl_base": ppl_base, "ppl_base_err": ppl_base_err,
                "cor": cov / (log_ppl_err * log_base_err) if log_ppl_err * log_base_err > 0 else 0.0,
                "ln_ppl_ratio": log_ppl - log_base, "ln_ppl_ratio_err": ratio_err,
                "ppl_ratio": finite_exp(log_ppl - log_base, "PPL(Q)/PPL(base)"),
                "ppl_ratio_err": finite_exp(log_ppl - log_base, "PPL(Q)/PPL(base)") * ratio_err,
                "ppl_diff": ppl - ppl_base,
                "ppl_diff_err": math.sqrt(max(ppl_err ** 2 + ppl_base_err ** 2 - 2 * ppl * ppl_base * cov, 0.0)),
                "kld": kld, "kld_err": kld_err, "p_diff": p_diff, "p_diff_err": p_diff_err,
                "p_diff_rms": math.sqrt(mse), "p_diff_rms_err": 0.5 / math.sqrt(mse) * mse_err if mse > 0 else 0.0,
                "same_top": same, "same_top_err": math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
                "kld_percentiles": {name: percentile(kl, f) for name, f in KLD_PERCENTILES},
                "p_diff_percentiles": {name: percentile(pd, f) for name, f in P_DIFF_PERCENTILES}}


KLD_PERCENTILES = [("Maximum", 1.0), ("99.9%", 0.999), ("99.0%", 0.99), ("95.0%", 0.95), ("90.0%", 0.9),
                   ("Median", 0.5), ("10.0%", 0.1), (" 5.0%", 0.05), (" 1.0%", 0.01), (" 0.1%", 0.001),
                   ("Minimum", 0.0)]
P_DIFF_PERCENTILES = KLD_PERCENTILES[:5] + [("75.0%", 0.75), ("Median", 0.5), ("25.0%", 0.25)] + KLD_PERCENTILES[6:]


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's: linear between the two nearest ranks (the median: mean of the middle two)."""
    n = len(sorted_values)
    if fraction == 0.5:
        return float(sorted_values[n // 2] if n % 2 else 0.5 * (sorted_values[n // 2] + sorted_values[n // 2 - 1]))
    if fraction <= 0 or fraction >= 1:
        return float(sorted_values[0] if fraction <= 0 else sorted_values[-1])
    p = fraction * (n - 1)
    i = int(p)
    return float((1 - (p - i)) * sorted_values[i] + (p - i) * sorted_values[min(i + 1, n - 1)])


def format_kl_report(s: dict) -> str:
    """The closing statistics in llama.cpp's layout (so the two outputs diff line by line)."""
    lines = ["====== Perplexity statistics ======",
             f"Mean PPL(Q)                   : {s['ppl']:10.6f} ± {s['ppl_err']:10.6f}",
             f"Mean PPL(base)                : {s['ppl_base']:10.6f} ± {s['ppl_base_err']:10.6f}",
             f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s['cor']:6.2f}%",
             f"Mean ln(PPL(Q)/PPL(base))     : {s['ln_ppl_ratio']:10.6f} ± {s['ln_ppl_ratio_err']:10.6f}",
             f"Mean PPL(Q)/PPL(base)         : {s['ppl_ratio']:10.6f} ± {s['ppl_ratio_err']:10.6f}",
             f"Mean PPL(Q)-PPL(base)         : {s['ppl_diff']:10.6f} ± {s['ppl_diff_err']:10.6f}",
             "", "====== KL divergence statistics ======",
             f"Mean    KLD: {s['kld']:10.6f} ± {s['kld_err']:10.6f}"]
    lines += [f"{label(name)}KLD: {v:10.6f}" for name, v in s["kld_percentiles"].items()]
    lines += ["", "====== Token probability statistics ======",
              f"Mean    Δp: {100 * s['p_diff']:6.3f} ± {100 * s['p_diff_err']:5.3f} %"]
    lines += [f"{label(name)}Δp: {100 * v:6.3f}%" for name, v in s["p_diff_percentiles"].items()]
    lines += [f"RMS Δp    : {100 * s['p_diff_rms']:6.3f} ± {100 * s['p_diff_rms_err']:5.3f} %",
              f"Same top p: {100 * s['same_top']:6.3f} ± {100 * s['same_top_err']:5.3f} %"]
    return "\n".join(lines)


def label(name: str) -> str:
    # llama.cpp pads "Median " and "99.9%   " to line the values up.
    return f"{name} " if name in ("Maximum", "Minimum") else (f"{name}  " if name == "Median" else f"{name}   ")


KL_HEADER = ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              "
             "Δp RMS            Same top p")


# --- the two runs `npllama perplexity` makes -------------------------------------------------

def run_perplexity(model, tokens, n_ctx: int = 512, bos_id: int | None = None, n_batch: int | None = None,
                   n_chunks: int | None = None, base_path: str | None = None, as_json: bool = False,
                   out=None, err=None) -> Perplexity:
    """llama-perplexity's run: per-chunk PPL so far and the final estimate on `out`, progress
    and speed on `err`; with base_path, also the base file of these logits."""
    out, err = out or sys.stdout, err or sys.stderr
    chunks = split_chunks(tokens, n_ctx, n_chunks)
    batching(model, n_ctx, n_batch)                 # a bad --batch fails before anything is written
    print(f"perplexity: {len(tokens)} tokens, {len(chunks)} chunks of {n_ctx}, scoring the last "
          f"{scored_rows(n_ctx)} tokens of each", file=err, flush=True)
    result = Perplexity()
    with base_writer(base_path, chunks, model.args.vocab_size) if base_path else contextlib.nullcontext() as add:
        for i, (logits, targets, seconds) in enumerate(evaluate(model, chunks, bos_id, n_batch, progress=err)):
            if add is not None:
                add(logits)
            result.add(token_nll(logits, targets), seconds, n_ctx)
            if as_json:
                print(json.dumps({"chunk": i + 1, "ppl": result.ppl}), file=out, flush=True)
            else:
                print(f"[{i + 1}]{result.ppl:.4f},", end="", file=out, flush=True)
    rate = result.tokens / result.seconds if result.seconds > 0 else float("inf")
    if as_json:
        print(json.dumps({"ppl": result.ppl, "ppl_err": result.ppl_err, "chunks": len(chunks), "n_ctx": n_ctx,
                          "scored_tokens": result.count, "tokens_per_second": rate}), file=out)
    else:
        print(f"\nFinal estimate: PPL = {result.ppl:.4f} +/- {result.ppl_err:.5f}", file=out)
    print(f"perplexity: {result.tokens} tokens in {result.seconds:.1f} s, {rate:.1f} tok/s (forward passes only)"
          + (f"; wrote {base_path}" if base_path else ""), file=err)
    return result


def run_kl_divergence(model, base: BaseFile, bos_id: int | None = None, n_batch: int | None = None,
                      as_json: bool = False, out=None, err=None) -> dict:
    """llama-perplexity --kl-divergence: score the base file's tokens with `model` and
    compare with the base's log-probabilities; returns the statistics (summary())."""
    out, err = out or sys.stdout, err or sys.stderr
    if base.n_vocab != model.args.vocab_size:
        raise UsageError(f"{base.path}: written for a vocabulary of {base.n_vocab} tokens; this model has "
                         f"{model.args.vocab_size}")
    batching(model, base.n_ctx, n_batch)
    print(f"kl-divergence: {base.path}: {len(base.tokens)} chunks of {base.n_ctx}", file=err, flush=True)
    kl = KLDivergence()
    if not as_json:
        print(KL_HEADER, file=out)
    seconds = 0.0
    for i, (logits, targets, dt) in enumerate(evaluate(model, base.tokens, bos_id, n_batch, progress=err)):
        kl.add(logits, base.chunk(i), targets)
        seconds += dt
        if as_json:
            s = kl.summary()
            print(json.dumps({"chunk": i + 1, **{k: s[k] for k in ("ppl", "ln_ppl_ratio", "kld", "p_diff_rms",
                                                                  "same_top")}}), file=out, flush=True)
        else:
            print(kl.chunk_line(i + 1), file=out, flush=True)
    summary = kl.summary()
    if as_json:
        print(json.dumps(summary), file=out)
    else:
        print("\n" + format_kl_report(summary), file=out)
    n = base.tokens.size
    print(f"kl-divergence: {n} tokens in {seconds:.1f} s, {n / seconds if seconds else float('inf'):.1f} tok/s "
          "(forward passes only)", file=err)
    return summary
