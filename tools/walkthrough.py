#!/usr/bin/env python3
"""Layer 0's attention, one head at a time, the way the "Llama 3 from scratch" walkthrough
does it (naklecha/llama3-from-scratch), with npllama's own functions on a loaded model.

    python tools/walkthrough.py [-m DIR] [--dtype bfloat16]

Prints every shape with a one-line explanation and checks at the end that the stacked
per-head attention equals the trace's `layers.0.attention`, computed by the batched model.
With Llama 3's tokenizer the prompt is 17 tokens and the shapes are the walkthrough's
([17, 128] per head, [17, 4096] stacked, for the 8B shape); other models show their own.
"""
import argparse
import math
import os
import sys

import numpy as np

PROMPT = "the answer to the ultimate question of life, the universe, and everything is "


def walkthrough(model, tokens, say=print) -> np.ndarray:
    from npllama.model import ops
    args, rnd = model.args, model.rnd
    T, hd, n_rep = len(tokens), args.head_dim, args.n_heads // args.n_kv_heads
    say(f"tokens {list(tokens)[:6]}... : {T} tokens")
    x = model.embed(np.asarray(tokens))
    say(f"token_embeddings {list(x.shape)}: one {args.dim}-vector per token")
    x = ops.rms_norm(x, model.weight("layers.0.attention_norm.weight"), args.norm_eps, rnd)
    say(f"attention_norm {list(x.shape)}: RMSNorm, then the layer's norm weight")
    q_layer0 = model.weight("layers.0.attention.wq.weight").reshape(args.n_heads, hd, args.dim)
    k_layer0 = model.weight("layers.0.attention.wk.weight").reshape(args.n_kv_heads, hd, args.dim)
    v_layer0 = model.weight("layers.0.attention.wv.weight").reshape(args.n_kv_heads, hd, args.dim)
    say(f"q_layer0 {list(q_layer0.shape)}, k_layer0 {list(k_layer0.shape)}, v_layer0 {list(v_layer0.shape)}: "
        f"{args.n_heads} query heads share {args.n_kv_heads} key/value heads, {n_rep} each")
    freqs_cis = model.freqs_cis[:T]
    say(f"freqs_cis {list(freqs_cis.shape)}: e^(i·t·θ_j), one complex rotation per position and pair")
    mask = ops.causal_mask(T, 0)
    say(f"mask {list(mask.shape)}: -inf above the diagonal, so no token sees a later one")
    heads = []
    for head in range(args.n_heads):
        q_per_token = rnd(x @ q_layer0[head].T)
        k_per_token = rnd(x @ k_layer0[head // n_rep].T)      # key weights shared by n_rep heads
        v_per_token = rnd(x @ v_layer0[head // n_rep].T)      # value weights too
        # Pairs as complex numbers, rotated by their position (Meta's interleaved layout).
        q_rot = ops.apply_rotary_emb(q_per_token[None, :, None], freqs_cis, rnd)[0, :, 0]
        k_rot = ops.apply_rotary_emb(k_per_token[None, :, None], freqs_cis, rnd)[0, :, 0]
        scores = rnd(rnd(q_rot @ k_rot.T) / np.float32(math.sqrt(hd))) + mask
        probs = rnd(ops.softmax(scores))                       # bf16 numerics: probabilities cast to bf16
        qkv_attention = rnd(probs @ v_per_token)
        if head == 0:
            say(f"head 0: q_per_token {list(q_per_token.shape)}, k_per_token {list(k_per_token.shape)}, "
                f"v_per_token {list(v_per_token.shape)}: this head's query, key, value for each token")
            say(f"head 0: q and k rotated {list(q_rot.shape)}: same shape, each pair turned by its position")
            say(f"head 0: scores {list(scores.shape)}: q·kᵀ/√{hd}, masked; softmax rows sum to 1")
            say(f"head 0: qkv_attention {list(qkv_attention.shape)}: probabilities times values")
        heads.append(qkv_attention)
    stacked = np.concatenate(heads, axis=-1)
    say(f"stacked_qkv_attention {list(stacked.shape)}: the {args.n_heads} heads side by side")
    return stacked


def main():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import npllama
    from npllama.text.tokenizer import load as load_tokenizer
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", help="converted model directory (default: npllama's default model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompt", default=PROMPT)
    a = p.parse_args()
    path = a.model or npllama.hub.default_model()
    model = npllama.load(path, dtype=a.dtype)
    tok = load_tokenizer(path)
    tokens = tok.encode(a.prompt, bos=tok.add_bos)
    stacked = walkthrough(model, tokens)
    reference = npllama.trace(model, tokens, layers=[0])["layers.0.attention"]
    err = float(np.abs(stacked - reference).max() / np.abs(reference).max())
    # float32: the per-head and batched matmuls sum in different orders (~1e-7); bf16: such a
    # difference can flip a rounding, one bf16 ulp (2^-8 relative).
    tol = 1e-5 if a.dtype == "float32" else 2 ** -7
    ok = err <= tol
    print(f"check: stacked attention vs trace layers.0.attention: max error {err:.2e} of the scale "
          f"(tolerance {tol:.0e}): {'OK' if ok else 'MISMATCH'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
