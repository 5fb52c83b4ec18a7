#!/usr/bin/env python3
"""Write a converted npllama model as a llama-architecture GGUF, e.g. to run llama.cpp's
llama-bench on exactly the weights npllama's benchmark uses.

    python tools/export_gguf.py DIR OUT.gguf [--type f32|f16|bf16|q8_0]

q/k stay in Meta's interleaved layout, which is what GGUF stores; Llama 3.1 rope scaling
becomes llama.cpp's rope_freqs tensor. The tokenizer is written only as "none" (llama.cpp
then runs without a vocabulary, enough for llama-bench). The whole model passes through
memory once (gguf's writer holds it): fine for 1B/3B, not for 8B in float32.
"""
import argparse
import os
import sys

import numpy as np


def export(src: str, dst: str, out_type: str = "f32") -> None:
    import gguf

    import npllama
    from npllama import bf16, checkpoint
    from npllama.formats.names import meta_to_gguf
    args = npllama.ModelArgs.from_json(os.path.join(src, "params.json"))
    tensors = checkpoint.open_tensors(src)
    w = gguf.GGUFWriter(dst + ".partial", "llama")
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.ffn_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_rope_dimension_count(args.head_dim)
    w.add_vocab_size(args.vocab_size)
    w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[out_type])
    w.add_tokenizer_model("none")
    if args.use_scaled_rope:
        # llama.cpp's form of Llama 3.1 scaling: a divisor per rotation frequency.
        from npllama.ops import rope_frequencies
        scaling = dict(factor=args.rope_scaling_factor, low_freq_factor=args.low_freq_factor,
                       high_freq_factor=args.high_freq_factor,
                       original_max_position_embeddings=args.original_max_position_embeddings)
        plain = rope_frequencies(args.head_dim, args.rope_theta)
        w.add_tensor("rope_freqs.weight", (plain / rope_frequencies(args.head_dim, args.rope_theta, scaling))
                     .astype(np.float32))
    for name, arr in tensors.items():
        x = bf16.from_bits(arr) if arr.dtype == np.uint16 else np.asarray(arr, dtype=np.float32)
        if out_type == "q8_0" and x.ndim == 2:
            q = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(meta_to_gguf(name), gguf.quants.quantize(x, q), raw_dtype=q)
        elif out_type == "bf16" and x.ndim == 2:
            w.add_tensor(meta_to_gguf(name), bf16.to_bits(x), raw_dtype=gguf.GGMLQuantizationType.BF16)
        elif out_type == "f16" and x.ndim == 2:
            w.add_tensor(meta_to_gguf(name), x.astype(np.float16))
        else:
            w.add_tensor(meta_to_gguf(name), np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(dst + ".partial", dst)


def main():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--type", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    a = p.parse_args()
    export(a.src, a.dst, a.type)
    print(f"wrote {a.dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
