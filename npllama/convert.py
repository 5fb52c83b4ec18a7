"""Converters into npllama's checkpoint format, from Meta's .pth (read without torch),
HF safetensors and GGUF. Each source yields (name, array) pairs with Meta's names and
Meta's interleaved RoPE layout, one tensor at a time."""
from __future__ import annotations

import base64
import collections
import glob
import json
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .checkpoint import CheckpointError, write_checkpoint, zip_member_offset
from .config import ConfigError, ModelArgs


@dataclass
class Source:
    """A checkpoint to convert: params, and tensors produced lazily in a fixed order."""
    args: ModelArgs
    names: list[str]
    nbytes: int
    load: Callable[[str], np.ndarray]        # name -> float32/float16 or uint16 (bf16 bits)
    extra_files: dict[str, str] = field(default_factory=dict)    # name in DST -> file to copy
    extra_data: dict[str, bytes] = field(default_factory=dict)     # name in DST -> contents

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.names:
            yield name, self.load(name)


# --- Meta .pth, without torch ----------------------------------------------------------

# torch storage class -> numpy dtype of its elements (BFloat16 as uint16 bits).
TORCH_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": np.uint16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


@dataclass
class _Storage:
    dtype: type
    key: str


@dataclass
class LazyTensor:
    """A tensor of a .pth file whose data stays in the file until asked for."""
    storage: _Storage
    offset: int
    shape: tuple
    stride: tuple

    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.storage.dtype).itemsize


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only what a state dict of tensors needs; a checkpoint is untrusted input."""

    ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "BFloat16Storage"): "BFloat16Storage",
    }
    ALLOWED.update({("torch", name): name for name in TORCH_STORAGES})

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(f"{self.path}: refusing to load global {module}.{name} "
                                  "(only tensor state dicts are accepted)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and pid[1] in TORCH_STORAGES):
            raise CheckpointError(f"{self.path}: unsupported persistent id {pid!r:.80}")
        return _Storage(TORCH_STORAGES[pid[1]], str(pid[2]))


class PthFile:
    """A torch.save zip archive read without torch: the state dict's tensors, mapped lazily."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{path}: not a readable torch zip checkpoint ({e})") from None
        pkl = [n for n in self.zip.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: no data.pkl inside (legacy non-zip torch files are not supported)")
        self.prefix = pkl[0][: -len("data.pkl")]
        byteorder = self.prefix + "byteorder"
        if byteorder in self.zip.namelist() and self.zip.read(byteorder) != b"little":
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        import io
        try:
            state = _RestrictedUnpickler(io.BytesIO(self.zip.read(pkl[0])), path).load()
        except CheckpointError:
            raise
        except Exception as e:  # a malformed pickle: name the file, not pickle's internals
            raise CheckpointError(f"{path}: unreadable data.pkl ({type(e).__name__}: {e})") from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        if not isinstance(state, dict) or not all(isinstance(v, LazyTensor) for v in state.values()):
            raise CheckpointError(f"{path}: not a state dict of tensors")
        self.tensors: dict[str, LazyTensor] = state
        self.size = os.path.getsize(path)

    def array(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        member = f"{self.prefix}data/{t.storage.key}"
        try:
            info = self.zip.getinfo(member)
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name}: storage {member} is missing") from None
        with open(self.path, "rb") as f:
            start = zip_member_offset(self.path, info, f)
        itemsize = np.dtype(t.storage.dtype).itemsize
        count = info.file_size // itemsize
        if start + info.file_size > self.size:
            raise CheckpointError(f"{self.path}: tensor {name}: truncated file ({self.size} bytes)")
        span = t.offset + (sum((n - 1) * s for n, s in zip(t.shape, t.stride)) + 1 if all(t.shape) else 0)
        if span > count:
            raise CheckpointError(f"{self.path}: tensor {name}: extends past its storage")
        storage = np.memmap(self.path, dtype=t.storage.dtype, mode="r", offset=start, shape=(count,))
        view = np.lib.stride_tricks.as_strided(storage[t.offset:], shape=t.shape,
                                               strides=tuple(s * itemsize for s in t.stride))
        return np.ascontiguousarray(view)


# Llama 3 model-parallel sharding (Meta's fairscale layers): column-parallel weights are
# split on the output axis, row-parallel on the input axis, norms are replicated.
MP_CONCAT_AXIS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0,
                  "wo": 1, "w2": 1}


def mp_axis(name: str) -> int | None:
    """Concatenation axis for a model-parallel tensor, None for a replicated one."""
    parts = name.split(".")
    key = parts[-2] if parts[-1] == "weight" else parts[-1]
    return MP_CONCAT_AXIS.get(key)


def read_meta(src: str) -> Source:
    paths = sorted(glob.glob(os.path.join(src, "consolidated.*.pth")))
    if not paths:
        raise CheckpointError(f"{src}: no consolidated.*.pth files")
    args = ModelArgs.from_json(os.path.join(src, "params.json"))
    files = [PthFile(p) for p in paths]
    names = list(files[0].tensors)
    for f in files[1:]:
        if set(f.tensors) != set(names):
            missing = sorted(set(names) ^ set(f.tensors))[:3]
            raise CheckpointError(f"{f.path}: tensor names differ from {files[0].path} ({', '.join(missing)})")

    def load(name: str) -> np.ndarray:
        axis = mp_axis(name)
        if len(files) == 1 or axis is None:
            # Norms are replicated; Meta's copies are not bit-identical, shard 0's is taken.
            return files[0].array(name)
        return np.concatenate([f.array(name) for f in files], axis=axis)

    # merged size: model-parallel pieces add up, replicated tensors count once
    nbytes = sum(f.tensors[n].nbytes() for n in names for f in (files if mp_axis(n) is not None else files[:1]))
    extra = {}
    if os.path.isfile(os.path.join(src, "tokenizer.model")):
        extra["tokenizer.model"] = os.path.join(src, "tokenizer.model")
    return Source(args, [n for n in names if n != "rope.freqs"], nbytes, load, extra)


# --- HF safetensors ------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
SAFETENSORS_MAX_HEADER = 100_000_000  # bytes: the safetensors library refuses longer headers


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """The header of a .safetensors file and the offset its data starts at. Parsed here so
    that bf16 tensors (which safetensors' numpy API cannot return) map like the rest, and
    held to the rules the safetensors library holds it to: a JSON object of {name: {dtype,
    shape, data_offsets}} (and a string-to-string __metadata__) whose tensors, in offset
    order, tile the data exactly, each as many bytes as its shape and dtype say."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, SAFETENSORS_MAX_HEADER):
            raise CheckpointError(f"{path}: header length {n} exceeds the file or the format's limit")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    natural = lambda x: type(x) is int and x >= 0  # noqa: E731  (not a float, not a bool)
    for name, meta in header.items():
        if not (isinstance(meta, dict) and isinstance(meta.get("dtype"), str)
                and isinstance(meta.get("shape"), list) and all(map(natural, meta["shape"]))
                and isinstance(meta.get("data_offsets"), list) and len(meta["data_offsets"]) == 2
                and all(map(natural, meta["data_offsets"]))):
            raise CheckpointError(f"{path}: tensor {name}: corrupt safetensors entry {str(meta)[:200]}")
        if meta["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name}: unsupported dtype {meta['dtype']}")
    end = 0
    for name, meta in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        begin, stop = meta["data_offsets"]
        if begin != end:
            raise CheckpointError(f"{path}: tensor {name}: data_offsets {meta['data_offsets']} leave a gap or overlap "
                                  f"(the tensors before it end at {end})")
        if stop - begin != math.prod(meta["shape"]) * np.dtype(SAFETENSORS_DTYPES[meta["dtype"]]).itemsize:
            raise CheckpointError(f"{path}: tensor {name}: data_offsets {meta['data_offsets']} do not match its "
                                  f"shape and dtype")
        end = stop
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: the tensors cover {end} bytes of data, the file holds {size - 8 - n} "
                              "(truncated, or bytes no tensor owns)")
    return header, 8 + n


def hf_to_meta_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo HF's q/k permutation (rotate-half layout -> Meta's interleaved pairs)."""
    out_dim, dim = w.shape
    hd = out_dim // n_heads
    return np.ascontiguousarray(w.reshape(n_heads, 2, hd // 2, dim).transpose(0, 2, 1, 3).reshape(out_dim, dim))


HF_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def hf_name_to_meta(name: str) -> str | None:
    if name.startswith("model.layers."):
        _, _, i, rest = name.split(".", 3)
        module, _, leaf = rest.rpartition(".")
        if module in HF_NAMES and leaf == "weight":
            return f"layers.{i}.{HF_NAMES[module]}.weight"
        if rest.endswith("rotary_emb.inv_freq"):
            return None  # recomputed from the params
    fixed = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    raise CheckpointError(f"unknown HF tensor {name} (not a Llama checkpoint?)")


def hf_config_to_args(cfg: dict, path: str = "config.json") -> ModelArgs:
    try:
        return _hf_config_to_args(cfg, path)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing {e.args[0]}") from None


def _hf_config_to_args(cfg: dict, path: str) -> ModelArgs:
    if cfg.get("model_type") not in (None, "llama"):
        raise CheckpointError(f"{path}: model_type {cfg.get('model_type')!r} is not llama")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kw = dict(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
              n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
              vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"],
              norm_eps=cfg.get("rms_norm_eps", 1e-5),
              rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
              max_seq_len=min(int(cfg.get("max_position_embeddings", 2048)), 8192))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        kw.update(use_scaled_rope=True, rope_scaling_factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                  high_freq_factor=rope["high_freq_factor"],
                  original_max_position_embeddings=rope["original_max_position_embeddings"])
    elif rope_type != "default":
        raise CheckpointError(f"{path}: rope type {rope_type!r} is not supported (default and llama3 are)")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != cfg["hidden_size"] // cfg["num_attention_heads"]:
        raise CheckpointError(f"{path}: head_dim {head_dim} != hidden_size / num_attention_heads")
    try:
        return ModelArgs(**kw)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_hf(src: str) -> Source:
    cfg_path = os.path.join(src, "config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read ({e})") from None
    args = hf_config_to_args(cfg, cfg_path)
    files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
    index_path = os.path.join(src, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            files = sorted({os.path.join(src, v) for v in json.load(f)["weight_map"].values()})
    if not files:
        raise CheckpointError(f"{src}: no .safetensors files")
    where: dict[str, tuple[str, dict, int]] = {}
    for path in files:
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: listed in the index but missing")
        header, data_start = read_safetensors_header(path)
        for name, meta in header.items():
            meta_name = hf_name_to_meta(name)
            if meta_name is not None:
                where[meta_name] = (path, meta, data_start)
    if cfg.get("tie_word_embeddings") and "output.weight" in where:
        del where["output.weight"]  # HF may save the tied copy too

    def load(name: str) -> np.ndarray:
        path, meta, data_start = where[name]
        begin, end = meta["data_offsets"]
        dtype = SAFETENSORS_DTYPES[meta["dtype"]]
        shape = tuple(meta["shape"])
        arr = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape) if shape and end > begin \
            else np.zeros(shape, dtype)
        arr = np.array(arr) if dtype != np.float64 else arr.astype(np.float32)
        if name.endswith("attention.wq.weight"):
            return hf_to_meta_qk(arr, args.n_heads)
        if name.endswith("attention.wk.weight"):
            return hf_to_meta_qk(arr, args.n_kv_heads)
        return arr

    nbytes = sum(m["data_offsets"][1] - m["data_offsets"][0] for _, m, _ in where.values())
    extra = {}
    for tok in ("tokenizer.model", os.path.join("original", "tokenizer.model")):
        if os.path.isfile(os.path.join(src, tok)):
            extra["tokenizer.model"] = os.path.join(src, tok)
            break
    return Source(args, list(where), nbytes, load, extra)


# --- GGUF ----------------------------------------------------------------------------------

GGUF_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}


def gguf_name_to_meta(name: str) -> str:
    fixed = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_NAMES and parts[3] == "weight":
        return f"layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.weight"
    raise CheckpointError(f"unknown GGUF tensor {name}")


def gguf_field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf(src: str) -> Source:
    import gguf
    path = src
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct errors/... for damaged files
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: architecture {arch!r} is not llama")
    g = lambda k, d=None: gguf_field(reader, f"llama.{k}", d)  # noqa: E731
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    n_heads = g("attention.head_count")
    try:
        args = ModelArgs(dim=g("embedding_length"), n_layers=g("block_count"), n_heads=n_heads,
                         n_kv_heads=g("attention.head_count_kv", n_heads),
                         vocab_size=g("vocab_size") or len(tokens), hidden_dim=g("feed_forward_length"),
                         norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
                         rope_theta=float(g("rope.freq_base", 10000.0)),
                         max_seq_len=min(int(g("context_length", 2048)), 8192))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    rope_dim = g("rope.dimension_count")
    if rope_dim is not None and rope_dim != args.head_dim:
        raise CheckpointError(f"{path}: partial rotary embeddings (rope dim {rope_dim}) are not supported")
    rope_freqs = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    if rope_freqs:
        args = gguf_rope_scaling(args, np.asarray(rope_freqs[0].data, dtype=np.float32), path)
    by_name = {gguf_name_to_meta(t.name): t for t in reader.tensors if t.name != "rope_freqs.weight"}

    def load(name: str) -> np.ndarray:
        t = by_name[name]
        if t.tensor_type == gguf.GGMLQuantizationType.F16:
            return np.array(t.data.view(np.float16))
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            return np.array(t.data.view(np.uint16))
        # GGUF stores q/k already in Meta's interleaved layout: no permutation here.
        return np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)

    nbytes = sum(int(t.n_elements) * 4 for t in reader.tensors)
    extra = {}
    if tokens is not None:
        spec = gguf_tokenizer_spec(reader, path)
        extra["tokenizer.json"] = json.dumps(spec).encode()
    return Source(args, list(by_name), nbytes, load, extra_data=extra)


def gguf_rope_scaling(args: ModelArgs, divisors: np.ndarray, path: str) -> ModelArgs:
    """llama.cpp stores Llama 3.1 rope scaling as a divisor per frequency (rope_freqs). Accept
    it when it is Meta's scaling (low/high frequency factors 1 and 4 over 8192 positions) with
    the factor its largest divisor; anything else is refused rather than approximated."""
    import dataclasses
    from .ops import rope_frequencies
    scaled = dataclasses.replace(args, use_scaled_rope=True, rope_scaling_factor=float(divisors.max()))
    scaling = dict(factor=scaled.rope_scaling_factor, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    plain = rope_frequencies(args.head_dim, args.rope_theta)
    expected = plain / rope_frequencies(args.head_dim, args.rope_theta, scaling)
    if divisors.shape != expected.shape or not np.allclose(divisors, expected, rtol=1e-5):
        raise CheckpointError(f"{path}: rope_freqs.weight is not Llama 3.1's rope scaling; not supported")
    return scaled


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes (bytes_to_unicode), inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return {c: b for b, c in enumerate(chars)}


def gguf_tokenizer_spec(reader, path: str) -> dict:
    """npllama's tokenizer.json from a GGUF's byte-level BPE vocabulary (tokenizer.ggml.*)."""
    from .tokenizer import PRE_TOKENIZERS
    model = gguf_field(reader, "tokenizer.ggml.model")
    pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
    if model != "gpt2":
        raise CheckpointError(f"{path}: tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' is)")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{path}: pre-tokenizer {pre!r} is not supported ({', '.join(PRE_TOKENIZERS)} are)")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    types = gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = gguf_field(reader, "tokenizer.ggml.merges") or []
    ids = {t: i for i, t in enumerate(tokens)}
    merged = [ids.get(a + b, -1) for a, b in (m.split(" ", 1) for m in merges)]
    if any(x >= y for x, y in zip(merged, merged[1:])) or -1 in merged:
        # tiktoken ranks pairs by the merged token's id; that is BPE's merge order only if
        # merged ids increase with merge priority.
        raise CheckpointError(f"{path}: BPE merges are not in token-id order; cannot express as tiktoken ranks")
    byte_of = gpt2_byte_decoder()
    CONTROL, USER_DEFINED = 3, 4
    out, special = [], {}
    for i, (t, kind) in enumerate(zip(tokens, types)):
        if kind in (CONTROL, USER_DEFINED):
            special[t] = i
            out.append(None)
        else:
            try:
                out.append(base64.b64encode(bytes(byte_of[c] for c in t)).decode())
            except KeyError:
                raise CheckpointError(f"{path}: token {i} {t!r} is not in GPT-2's byte alphabet") from None
    name = lambda key: tokens[gguf_field(reader, key)] if gguf_field(reader, key) is not None else None  # noqa: E731
    template = gguf_field(reader, "tokenizer.chat_template") or ""
    chat, default_system = None, None
    if "<|im_start|>" in template:
        chat = "chatml"
        m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.S)
        default_system = m.group(1) if m else None
    elif "<|start_header_id|>" in template:
        chat = "llama3"
    eos = name("tokenizer.ggml.eos_token_id")
    stop = [eos] + [t for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")
                    if t in special and t != eos]
    return {"pat_str": PRE_TOKENIZERS[pre], "tokens": out, "special_tokens": special,
            "bos": name("tokenizer.ggml.bos_token_id"), "eos": eos, "stop": stop,
            "add_bos": bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", True)),
            "chat_format": chat, "chat_default": bool(template), "default_system": default_system}


# --- entry point -----------------------------------------------------------------------------

def detect(src: str) -> str:
    if os.path.isfile(src):
        with open(src, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise CheckpointError(f"{src}: not a GGUF file (a Meta or HF checkpoint is a directory)")
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: no such file or directory")
    if glob.glob(os.path.join(src, "consolidated.*.pth")):
        return "meta"
    if os.path.isfile(os.path.join(src, "config.json")) and glob.glob(os.path.join(src, "*.safetensors")):
        return "hf"
    if os.path.isdir(os.path.join(src, "original")) and glob.glob(os.path.join(src, "original", "consolidated.*.pth")):
        return "meta-original"
    raise CheckpointError(f"{src}: neither a Meta checkpoint (consolidated.*.pth + params.json), "
                          "an HF one (config.json + *.safetensors) nor a GGUF file")


def open_source(src: str) -> Source:
    kind = detect(src)
    if kind == "meta-original":
        return read_meta(os.path.join(src, "original"))
    return {"meta": read_meta, "hf": read_hf, "gguf": read_gguf}[kind](src)


def checked(source: Source, src: str) -> Iterator[tuple[str, np.ndarray]]:
    """The source's tensors, each checked against the shapes its params imply, so that no
    inconsistent checkpoint is ever written (the output appears only if all pass)."""
    from .model import expected_shapes
    shapes = expected_shapes(source.args)
    missing = sorted(set(shapes) - set(source.names) - {"output.weight"})
    if missing:
        raise CheckpointError(f"{src}: missing tensor {missing[0]}" + (f" (+{len(missing) - 1} more)" if missing[1:]
                                                                      else ""))
    for name, arr in source.tensors():
        if name not in shapes:
            raise CheckpointError(f"{src}: unexpected tensor {name} for these params")
        if tuple(arr.shape) != shapes[name]:
            raise CheckpointError(f"{src}: tensor {name} has shape {tuple(arr.shape)}, the params say {shapes[name]}")
        yield name, arr


def convert(src: str, dst: str, dtype: str | None = None, force: bool = False,
            shard_bytes: int | None = None, quiet: bool = False) -> dict:
    source = open_source(src)
    kw = {} if shard_bytes is None else {"shard_bytes": shard_bytes}
    return write_checkpoint(dst, source.args, checked(source, src), source.nbytes, len(source.names), dtype=dtype,
                            extra_files=source.extra_files, extra_data=source.extra_data, force=force,
                            quiet=quiet, **kw)
