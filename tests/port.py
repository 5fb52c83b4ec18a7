"""A porter's Llama 3 in PyTorch, written apart from npllama (after Meta's model.py: its own KV
cache, forward(tokens, start_pos)), with the four classic porting bugs as switches. Module
paths follow Meta's reference, so the "meta" name map traces it; nn.Identity probes at
trace-name paths (layers.0.q_rotated ...) expose what Meta computes as plain functions.

bugs: "rope" (rotate-half RoPE on Meta-layout q/k), "gqa" (keys/values repeated whole,
`repeat`, instead of per head, `repeat_interleave`), "eps" (RMSNorm's eps outside the
square root), "mask" (the causal mask built without the start_pos offset; skipped for one
token, as Meta's code skips it).
"""
import math

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, weight, eps, bug):
        super().__init__()
        self.weight, self.eps, self.bug = nn.Parameter(weight), eps, bug

    def forward(self, x):
        if self.bug:
            return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.eps) * self.weight
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def linear(w):
    m = nn.Linear(w.shape[1], w.shape[0], bias=False)
    m.weight.data = w
    return m


def rope(x, pos, theta, rotate_half):
    # x (B, T, H, hd): Meta's interleaved pairs (2j, 2j+1), or the rotate-half bug's (j, j + hd/2).
    hd = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.outer(pos.float(), freqs)[None, :, None, :]        # (1, T, 1, hd/2)
    if rotate_half:
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        return x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin
    re, im = x[..., 0::2], x[..., 1::2]
    out = torch.stack([re * angles.cos() - im * angles.sin(), re * angles.sin() + im * angles.cos()], -1)
    return out.flatten(-2)


class Block(nn.Module):
    def __init__(self, i, args, w, bugs, max_seq_len):
        super().__init__()
        p = f"layers.{i}."
        self.args, self.bugs = args, bugs
        self.attention_norm = RMSNorm(w[p + "attention_norm.weight"], args.norm_eps, "eps" in bugs)
        self.ffn_norm = RMSNorm(w[p + "ffn_norm.weight"], args.norm_eps, "eps" in bugs)
        self.attention = nn.Module()
        for n in ("wq", "wk", "wv", "wo"):
            setattr(self.attention, n, linear(w[p + f"attention.{n}.weight"]))
        self.feed_forward = nn.Module()
        for n in ("w1", "w2", "w3"):
            setattr(self.feed_forward, n, linear(w[p + f"feed_forward.{n}.weight"]))
        for probe in ("q_rotated", "k_rotated", "scores", "probs"):
            setattr(self, probe, nn.Identity())
        shape = (1, max_seq_len, args.n_kv_heads, args.head_dim)
        self.cache_k, self.cache_v = torch.zeros(shape), torch.zeros(shape)

    def attend(self, x, start_pos):
        a, B, T = self.args, x.shape[0], x.shape[1]
        q = self.attention.wq(x).view(B, T, a.n_heads, a.head_dim)
        k = self.attention.wk(x).view(B, T, a.n_kv_heads, a.head_dim)
        v = self.attention.wv(x).view(B, T, a.n_kv_heads, a.head_dim)
        pos = torch.arange(start_pos, start_pos + T)
        q = self.q_rotated(rope(q, pos, a.rope_theta, "rope" in self.bugs))
        k = self.k_rotated(rope(k, pos, a.rope_theta, "rope" in self.bugs))
        self.cache_k[:B, start_pos:start_pos + T], self.cache_v[:B, start_pos:start_pos + T] = k, v
        keys, values = self.cache_k[:B, :start_pos + T], self.cache_v[:B, :start_pos + T]
        rep = a.n_heads // a.n_kv_heads
        if "gqa" in self.bugs:
            keys, values = keys.repeat(1, 1, rep, 1), values.repeat(1, 1, rep, 1)
        else:
            keys, values = keys.repeat_interleave(rep, dim=2), values.repeat_interleave(rep, dim=2)
        scores = q.transpose(1, 2) @ keys.permute(0, 2, 3, 1) / math.sqrt(a.head_dim)   # (B, H, T, S)
        if T > 1:
            offset = 0 if "mask" in self.bugs else start_pos
            scores = scores + torch.full((T, start_pos + T), float("-inf")).triu(offset + 1)
        probs = self.probs(torch.softmax(self.scores(scores).float(), -1))
        out = (probs @ values.transpose(1, 2)).transpose(1, 2).reshape(B, T, -1)
        return self.attention.wo(out)

    def forward(self, x, start_pos):
        h = x + self.attend(self.attention_norm(x), start_pos)
        f = self.feed_forward
        g = self.ffn_norm(h)
        return h + f.w2(nn.functional.silu(f.w1(g)) * f.w3(g))


class Port(nn.Module):
    def __init__(self, args, weights, bugs=(), max_seq_len=64):
        super().__init__()
        w = {k: torch.tensor(v) for k, v in weights.items()}
        self.tok_embeddings = nn.Embedding.from_pretrained(w["tok_embeddings.weight"])
        self.layers = nn.ModuleList(Block(i, args, w, set(bugs), max_seq_len) for i in range(args.n_layers))
        self.norm = RMSNorm(w["norm.weight"], args.norm_eps, "eps" in bugs)
        self.output = linear(w.get("output.weight", w["tok_embeddings.weight"]))

    @torch.no_grad()
    def forward(self, tokens, start_pos):
        h = self.tok_embeddings(torch.as_tensor(tokens).reshape(1, -1))
        for layer in self.layers:
            h = layer(h, start_pos)
        return self.output(self.norm(h))                    # (1, T, vocab)
