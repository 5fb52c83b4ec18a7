#!/usr/bin/env python3
"""Write a llama-architecture GGUF of random weights in one block type, tensor by tensor (an
8B shape writes in the memory of one tensor), for tests and benchmarks of quantized weights.

    python tools/random_gguf.py OUT.gguf --type Q8_0 --preset llama3.2-1b

Types the gguf library can quantize (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, BF16, F32) are
quantized from random float32 weights scaled like a trained model's (npllama.testing's);
K-quants (Q4_K, Q5_K, Q6_K), which it cannot, are random blocks whose float16 scales are set
so that each tensor has that same spread. Norms are F32. For llama.cpp's own quantization of
a file, write F16 and run llama-quantize on it.

--byte-vocab gives the file a tokenizer both llama.cpp and npllama run: byte-level BPE, each
byte of the text one token (256 of them) but " t", merged, and <|bos|>, <|eos|>, BOS added;
--tiny makes the model small enough to record what llama.cpp computes with it:

    python tools/random_gguf.py tiny.gguf --type F32 --tiny --byte-vocab
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from npllama.model.config import ModelArgs  # noqa: E402
from npllama.model.quant import BY_NAME, SCALE_OFFSETS, TYPES, dequantize  # noqa: E402
from npllama.text.tokenizer_import import gpt2_byte_decoder  # noqa: E402

ROWS_PER_CHUNK = 4096   # quantized this many rows at a time: gguf's quantize makes temporaries
SAMPLE_BLOCKS = 1 << 16


def _set_f16(blocks: np.ndarray, offset: int, value) -> None:
    blocks[:, offset:offset + 2] = np.array(value, np.float16).reshape(-1, 1).view(np.uint8)


def random_blocks(rng, qtype: int, rows: int, cols: int, std: float) -> np.ndarray:
    """(rows, row_bytes) random blocks of a K-quant whose values have standard deviation ~std
    and mean ~0: random integers, with d (and dmin, which offsets the unsigned integers) set
    from what the integers give with unit scales."""
    _, block, size = TYPES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    offsets = SCALE_OFFSETS[qtype]
    for off in offsets:
        _set_f16(blocks, off, 0.0)
    _set_f16(blocks, offsets[0], 1.0)
    # The blocks are independent and alike: a sample's spread is the tensor's (and an 8B
    # embedding table is not widened, in float64, to measure it).
    sample = blocks[:SAMPLE_BLOCKS]
    a = dequantize(sample, qtype, block).astype(np.float64)            # d * scale * q
    ratio = 0.0
    if len(offsets) == 2:
        _set_f16(blocks, offsets[0], 0.0)
        _set_f16(blocks, offsets[1], 1.0)
        b = -dequantize(sample, qtype, block).astype(np.float64)       # dmin * min
        ratio = a.mean() / b.mean()
        a = a - ratio * b
        _set_f16(blocks, offsets[1], std / a.std() * ratio)
    _set_f16(blocks, offsets[0], std / a.std())
    return blocks.reshape(rows, -1)


def tensor(rng, name: str, shape: tuple, qtype: int):
    """One tensor as the GGUF stores it: (data, raw GGML type or None)."""
    import gguf
    if len(shape) == 1:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32), None
    std = 1.0 if name == "tok_embeddings.weight" else 1 / np.sqrt(shape[1])
    if qtype in SCALE_OFFSETS and TYPES[qtype][1] == 256:
        return random_blocks(rng, qtype, *shape, std), qtype
    parts = []
    for r in range(0, shape[0], ROWS_PER_CHUNK):
        w = (std * rng.standard_normal((min(ROWS_PER_CHUNK, shape[0] - r), shape[1]))).astype(np.float32)
        parts.append(gguf.quants.quantize(w, gguf.GGMLQuantizationType(qtype)))
    return np.concatenate(parts), qtype


BYTE_VOCAB = 259     # 256 byte tokens, " t", <|bos|>, <|eos|>
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=BYTE_VOCAB, multiple_of=16, norm_eps=1e-5,
            rope_theta=10000.0, max_seq_len=64)


def add_byte_vocab(w) -> None:
    """A byte-level BPE vocabulary: ids 0..255 GPT-2's stand-ins for the bytes in byte order,
    256 " t" (its one merge: llama.cpp refuses a vocabulary without merges), then the control
    tokens <|bos|> (257, added) and <|eos|> (258)."""
    w.add_tokenizer_pre("default")
    w.add_token_list(sorted(gpt2_byte_decoder(), key=gpt2_byte_decoder().get) + ["Ġt", "<|bos|>", "<|eos|>"])
    w.add_token_types([1] * 257 + [3, 3])
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(257)
    w.add_eos_token_id(258)
    w.add_add_bos_token(True)


def write(dst: str, args, qtype: str | int, seed: int = 0, tied: bool = False, types: dict | None = None,
          byte_vocab: bool = False) -> str:
    """A random GGUF of `args` at dst, its matrices in `qtype` (a name such as "Q4_K" or a
    ggml type id) but for those `types` names (Meta's tensor name -> type); byte_vocab: with
    the byte-level vocabulary (add_byte_vocab; args.vocab_size must be BYTE_VOCAB)."""
    import gguf

    from npllama.io.formats.names import meta_to_gguf
    from npllama.model.weights import expected_shapes
    from tools.export_gguf import gguf_writer
    as_id = lambda q: BY_NAME[q] if isinstance(q, str) else q  # noqa: E731
    qtype = as_id(qtype)
    per_name = {n: as_id((types or {}).get(n, qtype)) for n in expected_shapes(args)}
    shapes = {n: s for n, s in expected_shapes(args).items() if not (tied and n == "output.weight")}
    if byte_vocab and args.vocab_size != BYTE_VOCAB:
        raise ValueError(f"the byte vocabulary has {BYTE_VOCAB} tokens, the model {args.vocab_size}")
    w = gguf_writer(dst, args, 0 if qtype == 0 else 1, "gpt2" if byte_vocab else "none")
    if byte_vocab:
        add_byte_vocab(w)
    for name, shape in shapes.items():   # the table first, from the shapes: sizes are known
        raw = per_name[name] if len(shape) == 2 else 0
        _, block, size = TYPES[raw]
        dtype = {0: np.float32, 1: np.float16, 30: np.uint16}.get(raw, np.uint8)
        nbytes = int(np.prod(shape)) // block * size
        byte_shape = shape if dtype is not np.uint8 else (shape[0], shape[1] // block * size)
        w.add_tensor_info(meta_to_gguf(name), byte_shape, np.dtype(dtype), nbytes,
                          raw_dtype=gguf.GGMLQuantizationType(raw) if raw not in (0, 1) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        w.write_tensor_data(tensor(rng, name, shape, per_name[name])[0])
    w.close()
    os.replace(dst + ".partial", dst)
    return dst


def main():
    from npllama.model.config import preset
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dst")
    p.add_argument("--type", default="Q8_0", choices=sorted(BY_NAME))
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--head", choices=sorted(BY_NAME), help="the output head's type (a Q4_K_M file's is Q6_K)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="instead of a preset, TINY (2 layers of 64, vocabulary 259)")
    p.add_argument("--byte-vocab", action="store_true", help="a byte-level vocabulary (needs --tiny's 259 tokens)")
    a = p.parse_args()
    write(a.dst, ModelArgs(**TINY) if a.tiny else preset(a.preset), a.type, a.seed,
          types={"output.weight": a.head} if a.head else None, byte_vocab=a.byte_vocab)
    print(f"wrote {a.dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
