"""The Llama 3 tokenizer and chat format against Meta's own (llama-models 0.3.0, which also
ships the real tokenizer.model)."""
import os
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from npllama.text.tokenizer import ChatFormat, Tokenizer, TokenizerError, split_whitespaces_or_nonwhitespaces
from text_strategies import RECENT_TEXT, TEXT


@pytest.fixture(scope="module")
def model_path():
    import llama_models.llama3
    return os.path.join(os.path.dirname(llama_models.llama3.__file__), "tokenizer.model")


@pytest.fixture(scope="module")
def ours(model_path):
    return Tokenizer.llama3(model_path)


@pytest.fixture(scope="module")
def meta(model_path):
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    return MetaTokenizer(Path(model_path))


@pytest.fixture(scope="module")
def meta_chat(meta):
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
    return MetaChatFormat(meta)


def test_known_vector(ours):
    assert ours.encode("This is a test sentence.", bos=True, eos=True) == [128000, 2028, 374, 264, 1296, 11914, 13,
                                                                           128001]
    assert ours.decode([128000, 2028, 374, 264, 1296, 11914, 13, 128001]) == \
        "<|begin_of_text|>This is a test sentence.<|end_of_text|>"


def test_special_token_ids(ours, meta):
    assert ours.special_tokens == meta.special_tokens
    for name, i in [("<|begin_of_text|>", 128000), ("<|end_of_text|>", 128001), ("<|start_header_id|>", 128006),
                    ("<|end_header_id|>", 128007), ("<|eot_id|>", 128009), ("<|finetune_right_pad_id|>", 128004),
                    ("<|eom_id|>", 128008), ("<|python_tag|>", 128010)]:
        assert ours.special_tokens[name] == i
    assert sorted(ours.stop_ids) == sorted(meta.stop_tokens) and ours.n_words == meta.n_words == 128256


def test_chat_vector(ours):
    # Meta's test_encode_dialog vector (llama_models/llama3/tests/api/test_tokenizer.py).
    tokens = ChatFormat(ours).encode_dialog_prompt([{"role": "system", "content": "This is a test sentence."},
                                                    {"role": "user", "content": "This is a response."}])
    assert tokens == [128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009, 128006, 882,
                      128007, 271, 2028, 374, 264, 2077, 13, 128009, 128006, 78191, 128007, 271]




@settings(max_examples=200, deadline=None)
@given(RECENT_TEXT)
def test_recently_assigned_characters_equal_meta(ours, meta, s):
    assert ours.encode(s) == meta.encode(s, bos=False, eos=False)


@settings(max_examples=400, deadline=None)
@given(TEXT)
def test_ids_equal_meta_and_round_trip(ours, meta, s):
    ids = ours.encode(s, bos=True, eos=False)
    assert ids == meta.encode(s, bos=True, eos=False)
    assert ours.decode(ids[1:]) == s


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["user", "system", "assistant", "tool"]), min_size=1, max_size=4), st.data())
def test_chat_format_equals_meta(ours, meta_chat, roles, data):
    from llama_models.datatypes import RawMessage
    messages = [{"role": r, "content": data.draw(TEXT)} for r in roles]
    expected = meta_chat.encode_dialog_prompt([RawMessage(**m) for m in messages]).tokens
    assert ChatFormat(ours).encode_dialog_prompt(messages) == expected


def test_special_token_lookalikes_are_text_unless_allowed(ours):
    typed = ours.encode("<|eot_id|>")
    assert 128009 not in typed and ours.decode(typed) == "<|eot_id|>"
    assert ours.encode("<|eot_id|>", allowed_special="all") == [128009]


def test_long_inputs_do_not_panic(ours, meta):
    for s in ["a" * 300_000, " " * 100_000 + "x", ("word " * 90_000), "😀" * 50_000]:
        ids = ours.encode(s)
        assert ids == meta.encode(s, bos=False, eos=False)
        assert ours.decode(ids) == s


def test_split_keeps_text_and_bounds_runs():
    s = "a" * 10 + " " * 7 + "b" * 3
    pieces = list(split_whitespaces_or_nonwhitespaces(s, 4))
    assert "".join(pieces) == s and max(map(len, pieces)) <= 8


def test_decode_mid_character_and_streaming(ours):
    ids = ours.encode("héllo 😀 中文!")
    # some single tokens are partial UTF-8 sequences: decoding any prefix never raises
    for n in range(len(ids) + 1):
        ours.decode(ids[:n])
    dec = ours.stream_decoder()
    pieces = [dec.add(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == "héllo 😀 中文!"
    assert "\ufffd" not in "".join(pieces)
    emoji = ours.encode("😀")
    assert len(emoji) > 1 and dec.add(emoji[0]) == ""  # emitted only once complete
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([128256])


def test_wrong_files_are_clear_errors(tmp_path, model_path):
    (tmp_path / "sp.model").write_bytes(b"\x0b\x00\xffsentencepiece\n")
    with pytest.raises(TokenizerError, match="line 1 is not `base64 rank`"):
        Tokenizer.llama3(str(tmp_path / "sp.model"))
    data = Path(model_path).read_bytes().splitlines()
    (a, ra), (b, rb) = data[5].split(), data[6].split()
    data[5], data[6] = a + b" " + rb, b + b" " + ra  # two merges swapped: a different tokenizer
    (tmp_path / "edited.model").write_bytes(b"\n".join(data))
    with pytest.raises(TokenizerError, match="not its contents"):
        Tokenizer.llama3(str(tmp_path / "edited.model"))
    with pytest.raises(TokenizerError, match="no such file"):
        Tokenizer.llama3(str(tmp_path / "missing.model"))


def test_tokenizer_files_are_read_bounded_regular_files(tmp_path, monkeypatch):
    import base64
    import npllama.text.tokenizer as T
    os.mkfifo(tmp_path / "fifo")   # open() would wait for a writer forever
    for loader in (Tokenizer.llama3, Tokenizer.from_json):
        with pytest.raises(TokenizerError, match="fifo: not a regular file"):
            loader(str(tmp_path / "fifo"))
    ranks = [bytes([b]) for b in range(256) if b != 0x41]   # tiktoken would panic encoding "A"
    (tmp_path / "no-a.model").write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(ranks)))
    with pytest.raises(TokenizerError, match="no-a.model: byte 0x41 has no rank"):
        Tokenizer.llama3(str(tmp_path / "no-a.model"))
    monkeypatch.setattr(T, "MAX_SPEC_BYTES", 1000)
    with pytest.raises(TokenizerError, match="no-a.model: 2,.* bytes, more than the 1,000 accepted"):
        Tokenizer.llama3(str(tmp_path / "no-a.model"))


def test_no_tiktoken_cache_copy(model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    Tokenizer.llama3(model_path)
    assert not (tmp_path / "cache").exists()
