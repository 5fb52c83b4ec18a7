"""Other formats' byte-level BPE tokenizers as npllama's tokenizer.json (tokenizer.check_spec):
HF's tokenizer.json with tokenizer_config.json and generation_config.json, and a GGUF's
tokenizer.ggml.* vocabulary. Every file is untrusted: sizes are bounded, anything malformed
is a TokenizerError naming the file, and no regex from a file is ever compiled (the
pre-tokenizer must be one of npllama's table, recognised by its exact description)."""
from __future__ import annotations

import base64
import hashlib
import os

from ..errors import TokenizerError
from ..untrusted import describe, inside, read_bounded, read_json
from .tokenizer import LLAMA3_PAT_STR, LLAMA3_RANKS, LLAMA3_SHA256, chat_format_of
from . import chat_template

MAX_HF_TOKENIZER_BYTES = 100 * 1024**2   # Llama 3's tokenizer.json is 9 MB
MAX_CONFIG_BYTES = 16 * 1024**2          # Llama 3's tokenizer_config.json is 50 kB

# HF pre-tokenizers npllama has a regex for, by their tokenizer.json description (trim_offsets,
# which moves offsets but never ids, left out).
HF_PRE_TOKENIZERS = {
    "llama3": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_PAT_STR}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
    "gpt2": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]},
}
# GGUF's tokenizer.ggml.pre names (llama.cpp's) for the same pre-tokenizers.
GGUF_PRE_TOKENIZERS = {"llama-bpe": "llama3", "llama3": "llama3", "gpt2": "gpt2", "default": "gpt2",
                       "smollm": "smollm"}


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


def is_llama3_vocabulary(token_bytes: list) -> bool:
    """Whether ids 0..127999 are exactly Meta's Llama 3 ranks (tokenizer.model's sha256)."""
    if len(token_bytes) < LLAMA3_RANKS or None in token_bytes[:LLAMA3_RANKS]:
        return False
    h = hashlib.sha256()
    for i, b in enumerate(token_bytes[:LLAMA3_RANKS]):
        h.update(base64.b64encode(b) + b" %d\n" % i)
    return h.hexdigest() == LLAMA3_SHA256


def check_rankable(token_bytes: list, merges: list[tuple[bytes, bytes]], path: str) -> None:
    """tiktoken merges the adjacent pair whose merged bytes have the lowest id, so its ranks
    are the ids. That is this BPE's merge order if the merged ids increase with merge
    priority (as BPE training makes them: each merge adds the next id; tested on SmolLM2's
    vocabulary), or if the vocabulary is Meta's Llama 3 one (then tiktoken with these ranks
    is Meta's tokenizer itself; HF's Llama 3 files list merges derived from it). A vocabulary
    that is neither is refused rather than tokenized differently from its own BPE."""
    ids = {b: i for i, b in enumerate(token_bytes) if b is not None}
    merged = [ids.get(a + b, -1) for a, b in merges]
    if -1 not in merged and all(x < y for x, y in zip(merged, merged[1:])):
        return
    if is_llama3_vocabulary(token_bytes):
        return
    raise TokenizerError(f"{path}: BPE merges are not in token-id order; cannot express as tiktoken ranks")


def _stops(special: dict[str, int], eos: str, eos_ids, path: str) -> list[str]:
    """Control token names to stop on: the eos token and every id the generation config lists."""
    by_id = {i: t for t, i in special.items()}
    ids = eos_ids if isinstance(eos_ids, list) else [] if eos_ids is None else [eos_ids]
    stop = [eos]
    for i in ids:
        if type(i) is not int or i not in by_id:
            raise TokenizerError(f"{path}: eos_token_id {i!r} is not one of the tokenizer's control tokens")
        stop.append(by_id[i])
    return list(dict.fromkeys(stop))


# --- GGUF --------------------------------------------------------------------------------

def gguf_tokenizer_spec(field, path: str) -> dict:
    """npllama's tokenizer spec from a GGUF's byte-level BPE vocabulary (tokenizer.ggml.*);
    field(key, default) reads one GGUF metadata value."""
    model, pre = field("tokenizer.ggml.model"), field("tokenizer.ggml.pre", "default")
    _check_gguf_types(field, path)
    if model != "gpt2":
        raise TokenizerError(f"{path}: tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' is)")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise TokenizerError(f"{path}: pre-tokenizer {pre!r} is not supported ({', '.join(GGUF_PRE_TOKENIZERS)} are)")
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = field("tokenizer.ggml.merges") or []
    if not isinstance(tokens, list) or not isinstance(types, list) or not isinstance(merges, list) or \
            len(types) != len(tokens) or not all(isinstance(t, str) for t in tokens):
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens and token_type disagree")
    if len(set(tokens)) != len(tokens):
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens lists a token twice")
    CONTROL, USER_DEFINED = 3, 4
    token_bytes, special = [], {}
    for i, (t, kind) in enumerate(zip(tokens, types)):
        if kind in (CONTROL, USER_DEFINED):
            special[t] = i
            token_bytes.append(None)
        else:
            token_bytes.append(_gpt2_bytes(t, path, i))
    check_rankable(token_bytes, _merge_pairs(merges, path), path)

    def name(key):
        i = field(key)
        if i is None:
            return None
        if type(i) is not int or not 0 <= i < len(tokens) or tokens[i] not in special:
            raise TokenizerError(f"{path}: {key} {i!r} is not a control token of the vocabulary")
        return tokens[i]

    eos = name("tokenizer.ggml.eos_token_id")
    if eos is None:
        raise TokenizerError(f"{path}: no tokenizer.ggml.eos_token_id")
    template = field("tokenizer.chat_template") or None
    # A GGUF names one eos; its chat's end-of-turn tokens stop generation too.
    stop = [eos] + [t for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")
                    if t in special and t != eos]
    return {"pre_tokenizer": GGUF_PRE_TOKENIZERS[pre], "tokens": _b64(token_bytes), "special_tokens": special,
            "bos": name("tokenizer.ggml.bos_token_id"), "eos": eos, "pad": name("tokenizer.ggml.padding_token_id"),
            "unk": name("tokenizer.ggml.unknown_token_id"), "stop": stop,
            "add_bos": bool(field("tokenizer.ggml.add_bos_token", True)), "chat_template": template,
            "chat_format": chat_format_of(special), "chat_default": template is not None}


def _check_gguf_types(field, path: str) -> None:
    """The tokenizer metadata have the types GGUF's writers give them."""
    for key, default, kind in (("tokenizer.ggml.pre", "default", str), ("tokenizer.ggml.tokens", None, list),
                               ("tokenizer.ggml.merges", [], list), ("tokenizer.ggml.token_type", [], list),
                               ("tokenizer.chat_template", "", str)):
        value = field(key, default)
        if not isinstance(value, kind):
            raise TokenizerError(f"{path}: {key} is {type(value).__name__}, not a {kind.__name__}")


def _gpt2_table() -> dict[int, int]:
    """str.translate table from GPT-2's stand-ins to the bytes (as latin-1 characters); the
    other characters below 256 map to one that latin-1 cannot encode, so they are refused."""
    table = {i: 0xFFFF for i in range(256)}
    table.update({ord(c): b for c, b in gpt2_byte_decoder().items()})
    return table


GPT2_TABLE = _gpt2_table()


def _gpt2_bytes(t: str, path: str, where) -> bytes:
    try:
        return t.translate(GPT2_TABLE).encode("latin-1")
    except (UnicodeEncodeError, AttributeError):
        raise TokenizerError(f"{path}: token {where!r}: {t!r} is not in GPT-2's byte alphabet") from None


def _b64(token_bytes: list) -> list:
    return [None if b is None else base64.b64encode(b).decode() for b in token_bytes]


# --- HF tokenizer.json ---------------------------------------------------------------------

def _without_trim_offsets(d):
    if isinstance(d, dict):
        return {k: _without_trim_offsets(v) for k, v in d.items() if k != "trim_offsets"}
    if isinstance(d, list):
        return [_without_trim_offsets(v) for v in d]
    return d


def _token_name(value, path: str, key: str) -> str | None:
    """tokenizer_config.json's bos_token etc.: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{path}: {key} must be a token string")
    return value


def _hf_file(src: str, name: str) -> str | None:
    """src/name if the folder has it: a name inside the folder (no link leading out); it is
    then read as a regular file (a FIFO or directory in its place is an error, not absent)."""
    if not os.path.lexists(os.path.join(src, name)):
        return None
    return inside(src, name, "tokenizer file", TokenizerError)


def hf_tokenizer_spec(src: str) -> dict | None:
    """npllama's tokenizer spec from an HF folder's tokenizer.json (None if it has none),
    with tokenizer_config.json's control tokens and chat_template (or chat_template.jinja),
    and generation_config.json's eos ids (else config.json's). Plain prompts start with bos
    when tokenizer.json's post-processor adds it (transformers 5 ignores add_bos_token)."""
    path = _hf_file(src, "tokenizer.json")
    if path is None:
        return None
    tj = read_json(path, TokenizerError, MAX_HF_TOKENIZER_BYTES)

    def bad(why: str) -> TokenizerError:
        return TokenizerError(f"{path}: {why}")

    pre = _hf_pre_tokenizer(tj, bad)
    token_bytes, special = _hf_vocabulary(tj["model"], tj.get("added_tokens") or [], path, bad)
    cfg_path = os.path.join(src, "tokenizer_config.json")
    cfg, gen, model_cfg = (_optional_json(src, n) for n in ("tokenizer_config.json", "generation_config.json",
                                                             "config.json"))
    bos = _token_name(cfg.get("bos_token"), cfg_path, "bos_token")
    eos = _token_name(cfg.get("eos_token"), cfg_path, "eos_token")
    post_bos = _post_processor_bos(tj.get("post_processor"))
    bos = bos or (post_bos if post_bos in special else None)
    eos_ids = gen.get("eos_token_id", model_cfg.get("eos_token_id"))
    if eos is None:
        by_id = {i: t for t, i in special.items()}
        first_eos = eos_ids[0] if isinstance(eos_ids, list) and eos_ids else eos_ids
        eos = by_id.get(first_eos) if type(first_eos) is int else None
        if eos is None:
            raise TokenizerError(f"{cfg_path}: no eos_token (nor an eos_token_id in generation_config.json)")
    template = _chat_template(src, cfg, cfg_path)
    return {"pre_tokenizer": pre, "tokens": _b64(token_bytes), "special_tokens": special, "bos": bos, "eos": eos,
            "pad": _token_name(cfg.get("pad_token"), cfg_path, "pad_token"),
            "unk": _token_name(cfg.get("unk_token"), cfg_path, "unk_token"),
            "stop": _stops(special, eos, eos_ids, os.path.join(src, "generation_config.json")),
            "add_bos": post_bos is not None, "chat_template": template, "chat_format": chat_format_of(special),
            "chat_default": template is not None}


def _optional_json(src: str, name: str) -> dict:
    """An HF folder's optional JSON object file ({} when absent)."""
    p = _hf_file(src, name)
    if p is None:
        return {}
    d = read_json(p, TokenizerError, MAX_CONFIG_BYTES)
    if not isinstance(d, dict):
        raise TokenizerError(f"{p}: not a JSON object")
    return d


def _hf_pre_tokenizer(tj, bad) -> str:
    """The name of the pre-tokenizer table entry a byte-level BPE tokenizer.json describes
    exactly (no regex from the file is compiled); anything else is refused."""
    if not isinstance(tj, dict) or not isinstance(tj.get("model"), dict):
        raise bad("not an HF tokenizer.json (no model)")
    model = tj["model"]
    if model.get("type", "BPE") != "BPE" or model.get("byte_fallback") or model.get("dropout") is not None or \
            model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise bad("only byte-level BPE tokenizers (Llama 3's, GPT-2's) are supported")
    if tj.get("normalizer") is not None:
        raise bad("a normalizer is not supported (byte-level BPE tokenizers have none)")
    decoder = tj.get("decoder")
    if not isinstance(decoder, dict) or decoder.get("type") != "ByteLevel":
        raise bad("the decoder is not byte-level")
    pre = next((name for name, d in HF_PRE_TOKENIZERS.items() if _without_trim_offsets(tj.get("pre_tokenizer")) == d),
               None)
    if pre is None:
        raise bad(f"pre-tokenizer {str(tj.get('pre_tokenizer'))[:200]} is not one npllama has "
                  f"({', '.join(HF_PRE_TOKENIZERS)})")
    return pre


def _hf_vocabulary(model: dict, added, path: str, bad) -> tuple[list, dict[str, int]]:
    """(every id's bytes, None for control tokens; the control tokens by name) from the BPE
    model's vocab and merges and the added tokens, checked to be rankable by tiktoken."""
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list) or not isinstance(added, list):
        raise bad("model.vocab, model.merges or added_tokens has the wrong type")
    ids = list(vocab.values()) + [a.get("id") if isinstance(a, dict) else None for a in added]
    if not all(type(i) is int and 0 <= i < (1 << 21) for i in ids):
        raise bad("a token id is not an integer in 0..2097151")
    token_bytes: list = [None] * (max(ids, default=-1) + 1)
    for t, i in vocab.items():
        if token_bytes[i] is not None:
            raise bad(f"id {i} is given to two tokens")
        token_bytes[i] = _gpt2_bytes(t, path, i)
    special: dict[str, int] = {}
    for a in added:
        t = a.get("content")
        if not isinstance(t, str) or not t or t in special:
            raise bad(f"added token {a.get('id')} has no content or repeats one")
        # Added tokens are control tokens: matched in text only where allowed (chat templates).
        special[t] = a["id"]
        token_bytes[a["id"]] = None
    check_rankable(token_bytes, _merge_pairs(merges, path), path)
    return token_bytes, special


def _merge_pairs(merges: list, path: str) -> list[tuple[bytes, bytes]]:
    """BPE merges as byte pairs: "a b" strings (GGUF's and HF's) or [a, b] lists (HF's newer form)."""
    pairs = []
    for m in merges:
        a, b = (m.split(" ", 1) + [None])[:2] if isinstance(m, str) else (m if isinstance(m, list) and len(m) == 2
                                                                           else (None, None))
        if not isinstance(a, str) or not isinstance(b, str):
            raise TokenizerError(f"{path}: merge {describe(m)} is not two tokens")
        pairs.append((_gpt2_bytes(a, path, m), _gpt2_bytes(b, path, m)))
    return pairs


def _post_processor_bos(post) -> str | None:
    """The control token an HF TemplateProcessing post-processor puts first in a single
    sequence (the bos it adds), or None; anything of another shape adds none."""
    post = post if isinstance(post, dict) else {}
    processors = post.get("processors", [post])
    processors = processors if isinstance(processors, list) else []
    template = next((p for p in processors if isinstance(p, dict) and p.get("type") == "TemplateProcessing"), {})
    single = template.get("single")
    first = single[0] if isinstance(single, list) and single else None
    token = first.get("SpecialToken") if isinstance(first, dict) else None
    name = token.get("id") if isinstance(token, dict) else None
    return name if isinstance(name, str) else None


def _chat_template(src: str, cfg: dict, cfg_path: str) -> str | None:
    """The folder's chat template: chat_template.jinja (transformers >= 4.43 saves it so), else
    tokenizer_config.json's chat_template (a string, or named templates: the "default" one)."""
    jinja = _hf_file(src, "chat_template.jinja")
    if jinja is not None:
        try:
            text = read_bounded(jinja, chat_template.MAX_TEMPLATE_CHARS * 4, TokenizerError).decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{jinja}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return text.replace("\r\n", "\n").replace("\r", "\n")   # read in text mode, as transformers reads it
    t = cfg.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    if t is not None and not isinstance(t, str):
        raise TokenizerError(f"{cfg_path}: chat_template must be a string (or named templates with a default)")
    return t
