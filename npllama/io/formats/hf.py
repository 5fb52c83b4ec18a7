"""HF checkpoints: config.json and model*.safetensors (with model.safetensors.index.json
when sharded). Headers are parsed here, not by the safetensors library, so that bf16
tensors (which its numpy API cannot return) map like the rest; they are held to the
rules safetensors itself enforces: a JSON object of known dtypes and shapes whose data
offsets tile the data buffer exactly, without overlap or gap."""
from __future__ import annotations

import glob
import os
import struct

import numpy as np

from ...errors import CheckpointError, ConfigError
from ...model.config import ModelArgs
from ...text.tokenizer import spec_json
from ...text.tokenizer_import import hf_tokenizer_spec
from ...untrusted import (check_extent, check_shape, describe, field, file_size, inside, map_array, numel, open_inside,
                          open_regular, parse_json, read_json)
from .names import hf_to_meta, hf_to_meta_qk
from .source import Source

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
MAX_HEADER_BYTES = 100_000_000    # safetensors' own limit


def read_safetensors_header(path: str, f=None) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int]], int]:
    """{name: (dtype, shape, byte offset in the file)} of a .safetensors file, and its size;
    read from the open file f when given (left open), else from path."""
    if f is None:
        with open_regular(path) as f:
            return read_safetensors_header(path, f)
    size = file_size(f)
    f.seek(0)
    raw = f.read(8)
    if len(raw) != 8:
        raise CheckpointError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", raw)
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise CheckpointError(f"{path}: header length {n} exceeds the file")
    header = parse_json(f.read(n), f"{path}: header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ is not an object of strings")
    data_start, data_size = 8 + n, size - 8 - n
    spans, out = [], {}
    for name, meta in header.items():
        where = f"{path}: tensor {describe(name)}"
        kind = field(meta, "dtype", str, where)
        if kind not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {describe(kind)} ({', '.join(SAFETENSORS_DTYPES)} are)")
        dtype = np.dtype(SAFETENSORS_DTYPES[kind])
        shape = check_shape(field(meta, "shape", list, where), where)
        offsets = field(meta, "data_offsets", list, where)
        if len(offsets) != 2 or any(not isinstance(o, int) or isinstance(o, bool) for o in offsets):
            raise CheckpointError(f"{where}: data_offsets {describe(offsets)} is not [begin, end]")
        begin, end = offsets
        check_extent(begin, end - begin, data_size, where)
        if end - begin != numel(shape) * dtype.itemsize:
            raise CheckpointError(f"{where}: {end - begin} bytes do not hold shape {shape} of {kind}")
        spans.append((begin, end, name))
        out[name] = (dtype, shape, data_start + begin)
    covered = 0
    for begin, end, name in sorted(spans):
        if begin != covered:
            raise CheckpointError(f"{path}: tensor {describe(name)} starts at {begin}, not where the previous ends "
                                  f"({covered}): overlapping or gapped data")
        covered = end
    if covered != data_size:
        raise CheckpointError(f"{path}: tensors cover {covered} of the {data_size} data bytes")
    return out, size


def hf_config_to_args(cfg: dict, path: str = "config.json") -> ModelArgs:
    get = lambda key, kind, *default: field(cfg, key, kind, path, ConfigError, *default)  # noqa: E731
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    if cfg.get("model_type") not in (None, "llama"):
        raise ConfigError(f"{path}: model_type {describe(cfg.get('model_type'))} is not llama")
    for key, llama in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, llama) != llama:   # transformers would honour it; npllama's Llama has no such variant
            raise ConfigError(f"{path}: {key} {describe(cfg[key])} is not Llama's ({llama!r})")
    rope = get("rope_parameters", (dict, type(None)), None) or get("rope_scaling", (dict, type(None)), None) or {}
    dim, n_layers, n_heads = get("hidden_size", int), get("num_hidden_layers", int), get("num_attention_heads", int)
    kw = dict(dim=dim, n_layers=n_layers, n_heads=n_heads,
              n_kv_heads=get("num_key_value_heads", (int, type(None)), None) or n_heads,
              vocab_size=get("vocab_size", int), hidden_dim=get("intermediate_size", int),
              norm_eps=get("rms_norm_eps", float, 1e-5),
              rope_theta=field(rope, "rope_theta", float, path, ConfigError, get("rope_theta", float, 10000.0)),
              # the trained context, as it is (the runtime context is chosen when running)
              max_seq_len=get("max_position_embeddings", int, 2048))
    rope_type = field(rope, "rope_type", str, path, ConfigError, field(rope, "type", str, path, ConfigError, "default"))
    if rope_type == "llama3":
        r = lambda key, kind=float: field(rope, key, kind, f"{path}: rope scaling", ConfigError)  # noqa: E731
        kw.update(use_scaled_rope=True, rope_scaling_factor=r("factor"), low_freq_factor=r("low_freq_factor"),
                  high_freq_factor=r("high_freq_factor"),
                  original_max_position_embeddings=r("original_max_position_embeddings", int))
    elif rope_type != "default":
        raise ConfigError(f"{path}: rope type {describe(rope_type)} is not supported (default and llama3 are)")
    head_dim = get("head_dim", (int, type(None)), None)
    if head_dim is not None and n_heads > 0 and head_dim != kw["dim"] // n_heads:
        raise ConfigError(f"{path}: head_dim {head_dim} != hidden_size / num_attention_heads")
    try:
        return ModelArgs(**kw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


INDEX_NAME = "model.safetensors.index.json"


def weight_files(src: str) -> tuple[str | None, dict | None, dict[str, str]]:
    """(index path, its weight_map, {path: name in src}) of the weight files an HF folder's
    converter reads: every file its index names (any name, in any subfolder), or without an
    index every *.safetensors beside config.json. The conversion cache key hashes the same."""
    if os.path.lexists(os.path.join(src, INDEX_NAME)):
        index_path = inside(src, INDEX_NAME)
        weight_map = field(read_json(index_path), "weight_map", dict, index_path)
        files = {}
        for file in weight_map.values():
            files.setdefault(inside(src, file, "shard", where=index_path), file)
        return index_path, weight_map, files
    return None, None, {inside(src, os.path.basename(p)): os.path.basename(p)
                        for p in sorted(glob.glob(os.path.join(glob.escape(src), "*.safetensors")))}


def _tensor_places(src: str, opened: dict, index_path: str, weight_map: dict | None) -> dict:
    """Meta's name -> (file, dtype, shape, offset) of every tensor of the opened safetensors
    files, each where the index maps it, none twice, none the index names missing."""
    where: dict[str, tuple[str, np.dtype, tuple[int, ...], int]] = {}
    for path, f in opened.items():
        header, _ = read_safetensors_header(path, f)
        for name, (dtype, shape, offset) in header.items():
            if weight_map is not None and os.path.join(src, weight_map.get(name, "")) != path:
                raise CheckpointError(f"{index_path}: tensor {describe(name)} in {path} is mapped to "
                                      f"{describe(weight_map.get(name))}")
            meta = hf_to_meta(name)
            if meta is None:
                if name.startswith("model.layers.") and name.endswith("rotary_emb.inv_freq"):
                    continue  # recomputed from the params
                raise CheckpointError(f"{path}: unknown tensor {describe(name)} (not a Llama checkpoint?)")
            if meta in where:
                raise CheckpointError(f"{path}: tensor {describe(name)} is also in {where[meta][0]}")
            where[meta] = (path, dtype, shape, offset)
    if weight_map is not None:
        absent = [n for n in weight_map if hf_to_meta(n) not in where and not n.endswith("rotary_emb.inv_freq")]
        if absent:
            raise CheckpointError(f"{index_path}: tensor {describe(absent[0])} is not in {weight_map[absent[0]]}")
    return where


def read_hf(src: str) -> Source:
    cfg_path = inside(src, "config.json")
    cfg = read_json(cfg_path, ConfigError)
    args = hf_config_to_args(cfg, cfg_path)
    index_path, weight_map, names = weight_files(src)
    if not names:
        raise CheckpointError(f"{src}: no .safetensors files")
    # each file opened once, its descriptor checked: the header and every tensor are read through it
    opened = {path: open_inside(src, names[path], "shard", where=index_path) for path in sorted(names)}
    where = _tensor_places(src, opened, index_path, weight_map)
    if field(cfg, "tie_word_embeddings", bool, cfg_path, ConfigError, False) and "output.weight" in where:
        del where["output.weight"]  # HF may save the tied copy too

    def load(name: str) -> np.ndarray:
        path, dtype, shape, offset = where[name]
        arr = np.array(map_array(opened[path], dtype, offset, shape, f"{path}: tensor {name}"))
        if dtype == np.float64:
            with np.errstate(over="ignore"):   # a value beyond float32 becomes inf, refused by name when written
                arr = arr.astype(np.float32)
        if name.endswith("attention.wq.weight"):
            return hf_to_meta_qk(arr, args.n_heads)
        if name.endswith("attention.wk.weight"):
            return hf_to_meta_qk(arr, args.n_kv_heads)
        return arr

    nbytes = sum(numel(s) * min(d.itemsize, 4) for _, d, s, _ in where.values())
    spec = hf_tokenizer_spec(src)     # tokenizer.json (+ tokenizer_config, generation_config), when there
    extra, data = {}, {}
    if spec is not None:
        data["tokenizer.json"] = spec_json(spec, os.path.join(src, "tokenizer.json"), args.vocab_size)
    else:
        for tok in ("tokenizer.model", os.path.join("original", "tokenizer.model")):
            if os.path.lexists(os.path.join(src, tok)):
                extra["tokenizer.model"] = open_inside(src, tok)   # copied through this checked descriptor
                break
    return Source(src, args, {n: w[2] for n, w in where.items()}, nbytes, load, extra, data)
