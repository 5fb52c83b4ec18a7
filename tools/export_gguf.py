#!/usr/bin/env python3
"""Write a converted npllama model as a llama-architecture GGUF, e.g. to run llama.cpp's
llama-bench on exactly the weights npllama's benchmark uses.

    python tools/export_gguf.py DIR OUT.gguf [--type f32|f16|bf16|q8_0]

q/k stay in Meta's interleaved layout, which is what GGUF stores; Llama 3.1 rope scaling
becomes llama.cpp's rope_freqs tensor. The tokenizer is written only as "none" (llama.cpp
then runs without a vocabulary, enough for llama-bench). Tensors are converted and written
one at a time (the header first, from their shapes), so memory holds one tensor, not the
model: an 8B model exports in the memory of its embedding table.
"""
import argparse
import os
import sys

import numpy as np


def converted(arr, out_type: str):
    """A checkpoint tensor (bf16 bits as uint16, or float) as the GGUF stores it: (data, the
    GGML type when the writer cannot tell it from the data's dtype). Weight matrices take
    out_type; norms and other 1-D tensors stay F32."""
    import gguf

    from npllama.model import bf16
    T = gguf.GGMLQuantizationType
    t = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[out_type] if arr.ndim == 2 else T.F32
    if t == T.BF16 and arr.dtype == np.uint16:
        return np.ascontiguousarray(arr), t                # already bf16: the bits as they are
    x = bf16.from_bits(arr) if arr.dtype == np.uint16 else np.asarray(arr, dtype=np.float32)
    if t == T.Q8_0:
        return gguf.quants.quantize(x, t), t
    if t == T.BF16:
        return bf16.to_bits(x), t
    return np.ascontiguousarray(x, dtype=np.float16 if t == T.F16 else np.float32), None


def planned(arr, out_type: str):
    """(shape, dtype, bytes, GGML type) that converted(arr) will write, from its first row:
    every row of a tensor converts to the same size."""
    row, raw = converted(arr[:1], out_type)
    return (arr.shape[0], *row.shape[1:]), row.dtype, arr.shape[0] * row.nbytes, raw


def gguf_writer(dst: str, args, file_type: int, tokenizer_model: str = "none"):
    """A GGUFWriter to dst + ".partial" holding llama metadata for `args` (file_type: llama.cpp's
    LLAMA_FTYPE) and the tokenizer model (default "none": the caller adds a vocabulary for
    another); the caller adds the tensors and renames the file."""
    import gguf
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
    w.add_file_type(file_type)
    w.add_tokenizer_model(tokenizer_model)
    return w


def export(src: str, dst: str, out_type: str = "f32") -> None:
    import gguf

    import npllama
    from npllama.io import checkpoint
    from npllama.io.formats.names import meta_to_gguf
    args = npllama.ModelArgs.from_json(os.path.join(src, "params.json"))
    tensors = checkpoint.open_tensors(src)
    w = gguf_writer(dst, args, {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[out_type])
    out = {}                                              # GGUF name -> the tensor to write
    if args.use_scaled_rope:
        # llama.cpp's form of Llama 3.1 scaling: a divisor per rotation frequency.
        from npllama.model.ops import rope_frequencies
        scaling = dict(factor=args.rope_scaling_factor, low_freq_factor=args.low_freq_factor,
                       high_freq_factor=args.high_freq_factor,
                       original_max_position_embeddings=args.original_max_position_embeddings)
        plain = rope_frequencies(args.head_dim, args.rope_theta)
        out["rope_freqs.weight"] = (plain / rope_frequencies(args.head_dim, args.rope_theta, scaling)).astype(np.float32)
    out.update((meta_to_gguf(name), arr) for name, arr in tensors.items())
    # The tensor table precedes the data, so it is written from the shapes alone, and each
    # tensor is converted only when its own data is written.
    for name, arr in out.items():
        shape, dtype, nbytes, raw = planned(arr, out_type)
        w.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for arr in out.values():
        w.write_tensor_data(converted(arr, out_type)[0])
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
