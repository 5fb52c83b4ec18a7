"""Tokenizers on tiktoken: Meta's Llama 3 tokenizer (tokenizer.model) and byte-level BPE
tokenizers described by a converted checkpoint's tokenizer.json (written from an HF
tokenizer.json or a GGUF vocabulary by npllama/tokenizer_import.py), with their chat formats."""
from __future__ import annotations

import base64
import codecs
import hashlib
import io
import json
import os
from typing import Iterable, Iterator, Sequence

import regex

# The Llama 3 tokenizer.model (as in Meta's llama-models 0.3.0).
LLAMA3_RANKS = 128000
LLAMA3_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
LLAMA3_PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Meta's names (Llama 3.1+), ids from 128000; 3.0's names agree on the ids that matter.
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                  "<|image|>"]
LLAMA3_SPECIAL += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIAL))]

# Pre-tokenizers of byte-level BPE vocabularies, by name, as one tiktoken regex each. A
# checkpoint's tokenizer names one of these; no regex is ever read from a file (a hostile
# pattern can backtrack for hours on the `regex` module's path, and one with groups changes
# what findall returns).
GPT2_PAT_STR = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# SmolLM (HF: Digits(individual_digits) then ByteLevel; llama.cpp: "\p{N}" then GPT-2's): every
# digit alone, and whitespace before a digit ends its run as it would at the end of a piece.
SMOLLM_PAT_STR = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
PRE_TOKENIZERS = {"llama3": LLAMA3_PAT_STR, "gpt2": GPT2_PAT_STR, "smollm": SMOLLM_PAT_STR}

# Meta splits long inputs so tiktoken's regex never sees a huge piece (it can panic).
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


from .chat_template import MAX_TEMPLATE_CHARS, ChatTemplate
from .confined import Confined
from ..errors import TokenizerError, UsageError  # noqa: F401  (TokenizerError re-exported)
from ..untrusted import describe, inside, read_bounded, read_json


def split_whitespaces_or_nonwhitespaces(s: str, max_len: int) -> Iterator[str]:
    """Pieces of s with no more than max_len consecutive whitespace or non-whitespace
    characters (Meta's _split_whitespaces_or_nonwhitespaces)."""
    run, run_is_space, start = 0, s[0].isspace() if s else False, 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if run_is_space ^ is_space:
            run, run_is_space = 1, is_space
        else:
            run += 1
            if run > max_len:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


def parse_tiktoken_ranks(data: bytes, path: str) -> dict[bytes, int]:
    """`base64 rank` lines (tiktoken's format; tiktoken's own loader would copy the file into
    a shared cache directory keyed by its path). At most MAX_TOKENS of them, read a line at a
    time: a file of empty lines is not a list of millions of empty strings."""
    ranks = {}
    for n, line in enumerate(io.BytesIO(data), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(f"{path}: line {n} is not `base64 rank` (a sentencepiece model from Llama 2?)") from None
        if len(ranks) > MAX_TOKENS:
            raise TokenizerError(f"{path}: more than {MAX_TOKENS:,} ranks")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps")
    missing = next((b for b in range(256) if bytes([b]) not in ranks), None)
    if missing is not None:   # tiktoken would panic on text with that byte (found by the fuzzer)
        raise TokenizerError(f"{path}: byte {missing:#04x} has no rank (a byte-level BPE ranks all 256 bytes)")
    return ranks


# The classes of characters beyond ASCII that the pre-tokenizer regexes tell apart, each
# with an ASCII stand-in of that class alone (no letter of a contraction, no space, no
# newline); None: any other character.
CHARACTER_CLASSES = ((r"\p{L}", "a"), (r"\p{N}", "0"), (r"\s", "\t"), (None, "#"))
_class_probes: list = []


def tiktoken_classes(chars: str) -> list[int]:
    """Each character's class (an index into CHARACTER_CLASSES) as tiktoken's regex engine
    sees it: a probe Encoding per class whose pattern matches that class alone drops, in
    encode_ordinary, every character outside it."""
    import tiktoken  # here, not at the top: a command that reads no text starts without it
    if not _class_probes:
        bytes_only = {bytes([b]): b for b in range(256)}
        _class_probes.extend(tiktoken.Encoding(f"npllama-probe-{i}", pat_str=cls, mergeable_ranks=bytes_only,
                                               special_tokens={})
                             for i, (cls, _) in enumerate(CHARACTER_CLASSES[:-1]))
    members = [set(p.decode(p.encode_ordinary(chars))) for p in _class_probes]
    return [next((k for k, m in enumerate(members) if c in m), len(members)) for c in chars]


def as_tiktoken_encodes(s: str) -> str:
    """s with lone surrogates made U+FFFD, as tiktoken's encode makes them (it cannot encode
    them as UTF-8)."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def split_like_tiktoken(pat_str: str, s: str) -> list[str]:
    """s cut into the pieces tiktoken's regex makes of it, with the `regex` module. The two
    engines carry different Unicode versions: `regex` calls thousands of recently assigned
    characters (U+323B0 among them) letters or numbers where tiktoken's Rust regex, and HF
    tokenizers' Oniguruma, see neither. Such characters are replaced, for the split only, by
    an ASCII stand-in of the class tiktoken gives them, so the pieces are tiktoken's."""
    s = as_tiktoken_encodes(s)
    beyond_ascii = "".join(sorted({c for c in s if c >= "\x80"}))
    if not beyond_ascii:
        return regex.findall(pat_str, s)
    theirs = tiktoken_classes(beyond_ascii)
    ours = [next(k for k, (cls, _) in enumerate(CHARACTER_CLASSES) if cls is None or regex.fullmatch(cls, c))
            for c in beyond_ascii]
    stand_ins = {ord(c): CHARACTER_CLASSES[t][1] for c, t, o in zip(beyond_ascii, theirs, ours) if t != o}
    split = s.translate(stand_ins) if stand_ins else s   # one character for one: the offsets hold
    return [s[m.start():m.end()] for m in regex.finditer(pat_str, split)]


# npllama's tokenizer.json (see check_spec). Version 1 files (written before the table of
# pre-tokenizers, e.g. the default model's in users' caches) carry the pre-tokenizer as its
# regex, "pat_str": read by mapping the exact regexes they were written with to the names.
SPEC_FORMAT, SPEC_VERSION = "npllama-tokenizer", 2
MAX_SPEC_BYTES = 64 * 1024**2    # tokenizer.json or .model: Llama 3's are ~2 MB; a 256k vocabulary ~6 MB
MAX_TOKENS = 1 << 21             # ids; Llama 3 has 128256
MAX_CONTROL_TOKENS = 1 << 16     # Llama 3 has 256; tiktoken takes ~0.2 s per 10,000
# Control tokens up to this many characters in all are compiled here; more, and tiktoken's
# Rust regex (an alternation of them) is first compiled in a confined worker: 6,000 tokens
# of 3,000 characters take it to 3.2 GB and an abort. Llama 3's 256 have 7,000 characters.
MAX_INLINE_CONTROL_CHARS = 1 << 17
CHAT_FORMATS = {"llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                "chatml": ("<|im_start|>", "<|im_end|>")}


def read_spec(path: str) -> tuple[dict, list]:
    """npllama's tokenizer.json, checked (check_spec)."""
    return check_spec(read_json(path, TokenizerError, MAX_SPEC_BYTES), path)


def check_spec(spec, path: str) -> tuple[dict, list]:
    """The spec with its pre-tokenizer named, and every id's bytes (None for control tokens),
    or a TokenizerError naming the file and what is wrong. The format:

        {"format": "npllama-tokenizer", "version": 2,
         "pre_tokenizer": a PRE_TOKENIZERS name,
         "tokens": [base64 bytes of id i, or null for a control token],
         "special_tokens": {control token: id},      every null id named once
         "bos", "eos", "pad", "unk": control token or null (eos required),
         "stop": [control tokens generation stops on],
         "add_bos": bool, "chat_default": bool (generate wraps prompts in the chat format),
         "chat_template": Jinja source or null, "chat_format": "llama3" | "chatml" | null
         (built-in format for checkpoints without a template), "default_system": str or null}
    """
    def bad(why: str) -> TokenizerError:
        return TokenizerError(f"{path}: {why}")

    if not isinstance(spec, dict):
        raise bad("not a JSON object")
    if spec.get("format", SPEC_FORMAT) != SPEC_FORMAT or not isinstance(spec.get("version", 1), int):
        raise bad("not an npllama tokenizer.json")
    if spec.get("version", 1) > SPEC_VERSION:
        raise bad(f"version {spec['version']} is newer than this npllama reads ({SPEC_VERSION})")
    if "pre_tokenizer" not in spec and "pat_str" in spec:
        by_regex = {pat: name for name, pat in PRE_TOKENIZERS.items()}
        if not isinstance(spec["pat_str"], str) or spec["pat_str"] not in by_regex:
            raise bad("its pat_str is not a regex npllama wrote; convert the checkpoint again")
        spec = {**spec, "pre_tokenizer": by_regex[spec["pat_str"]]}
        del spec["pat_str"]
    if not isinstance(spec.get("pre_tokenizer"), str) or spec["pre_tokenizer"] not in PRE_TOKENIZERS:
        raise bad(f"pre_tokenizer {describe(spec.get('pre_tokenizer'))} is not one npllama knows "
                  f"({', '.join(PRE_TOKENIZERS)})")
    tokens, special = spec.get("tokens"), spec.get("special_tokens")
    if not isinstance(tokens, list) or not 0 < len(tokens) <= MAX_TOKENS:
        raise bad(f"tokens must be a list of 1 to {MAX_TOKENS} entries")
    if not isinstance(special, dict) or not all(isinstance(k, str) and k and type(v) is int for k, v in special.items()):
        # an empty name would make tiktoken's special-token regex match everywhere: it never ends
        raise bad("special_tokens must map non-empty token strings to integer ids")
    if len(special) > MAX_CONTROL_TOKENS:
        raise bad(f"{len(special):,} control tokens, more than the {MAX_CONTROL_TOKENS:,} accepted")
    token_bytes = _token_bytes(tokens, bad)
    _check_control_ids(tokens, special, bad)
    _check_fields(spec, special, bad)
    return spec, token_bytes


def _token_bytes(tokens: list, bad) -> list:
    """Each entry's bytes (None for a control token's null), all distinct."""
    token_bytes: list = []
    seen: dict[bytes, int] = {}
    for i, t in enumerate(tokens):
        if t is None:
            token_bytes.append(None)
            continue
        try:
            b = base64.b64decode(t, validate=True) if isinstance(t, str) else None
        except ValueError:
            b = None
        if not b:
            raise bad(f"token {i} is not non-empty base64 bytes or null")
        if b in seen:
            raise bad(f"tokens {seen[b]} and {i} are the same bytes {b!r}")
        seen[b] = i
        token_bytes.append(b)
    return token_bytes


def _check_control_ids(tokens: list, special: dict, bad) -> None:
    """Every control token names a null id of its own, and every null id has a name."""
    named: dict[int, str] = {}
    for name, i in special.items():
        if not 0 <= i < len(tokens):
            raise bad(f"control token {describe(name)} has id {i}, outside 0..{len(tokens) - 1}")
        if tokens[i] is not None:
            raise bad(f"control token {describe(name)} has id {i}, which is an ordinary token")
        if i in named:
            raise bad(f"control tokens {describe(named[i])} and {describe(name)} share id {i}")
        named[i] = name
    unnamed = [i for i, t in enumerate(tokens) if t is None and i not in named]
    if unnamed:
        raise bad(f"id {unnamed[0]} has neither bytes nor a control token name")


def _check_fields(spec: dict, special: dict, bad) -> None:
    """bos/eos/pad/unk and stop are control tokens; flags are booleans; the template and
    system prompt strings (the template within its cap); the chat format one npllama has."""
    for key in ("bos", "pad", "unk", "eos"):
        if spec.get(key) is not None and (not isinstance(spec[key], str) or spec[key] not in special):
            raise bad(f"{key} {describe(spec[key])} is not one of its control tokens")
    if spec.get("eos") is None:
        raise bad("no eos token")
    stop = spec.get("stop")
    if not isinstance(stop, list) or not all(isinstance(s, str) and s in special for s in stop):
        raise bad("stop must list control tokens")
    for key in ("add_bos", "chat_default"):
        if not isinstance(spec.get(key, False), bool):
            raise bad(f"{key} must be true or false")
    for key in ("default_system", "chat_template"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise bad(f"{key} must be a string or null")
    if len(spec.get("chat_template") or "") > MAX_TEMPLATE_CHARS:
        raise bad(f"chat_template is longer than {MAX_TEMPLATE_CHARS:,} characters")
    fmt = spec.get("chat_format")
    if fmt is not None and (not isinstance(fmt, str) or fmt not in CHAT_FORMATS or
                            not all(t in special for t in CHAT_FORMATS[fmt])):
        raise bad(f"chat_format {describe(fmt)} is not one npllama has, or its control tokens are missing")


def spec_json(spec: dict, path: str = "tokenizer.json", vocab_size: int | None = None) -> bytes:
    """A spec as the file npllama writes, checked first so that no unreadable file is written;
    with vocab_size, its ids must fit the model's vocabulary (else generation fails later)."""
    spec = {"format": SPEC_FORMAT, "version": SPEC_VERSION, **spec}
    check_spec(spec, path)
    if vocab_size is not None and len(spec["tokens"]) > vocab_size:
        raise TokenizerError(f"{path}: the tokenizer has {len(spec['tokens']):,} tokens, more than the model's "
                             f"vocabulary of {vocab_size:,}")
    return json.dumps(spec, ensure_ascii=False).encode()


def probe_control_tokens(pre_tokenizer: str, special_tokens: dict[str, int]):
    """tiktoken's tables for these control tokens, built and used once (run confined: a
    breach of its limits is the answer that matters), with the 256 byte ranks alone."""
    import tiktoken  # here, not at the top: a command that reads no text starts without it
    ranks = {bytes([b]): b for b in range(256)}
    probe = tiktoken.Encoding("npllama-probe", pat_str=PRE_TOKENIZERS[pre_tokenizer], mergeable_ranks=ranks,
                              special_tokens={t: (1 << 22) + i for i, t in enumerate(special_tokens)})
    probe.encode("".join(list(special_tokens)[:16]) + " probe", allowed_special="all")
    return lambda: None


def chat_format_of(special_tokens) -> str | None:
    """The built-in chat format whose control tokens a vocabulary has."""
    return next((name for name, need in CHAT_FORMATS.items() if all(t in special_tokens for t in need)), None)


class Tokenizer:
    """A tiktoken Encoding plus the control tokens a model needs: bos, stop tokens, chat format
    (the checkpoint's own chat template, or a built-in format)."""

    def __init__(self, ranks: dict[bytes, int], pre_tokenizer: str, special_tokens: dict[str, int], bos: str | None,
                 eos: str, stop: Sequence[str], chat_format: str | None, name: str = "tokenizer",
                 add_bos: bool = True, chat_default: bool = False, default_system: str | None = None,
                 chat_template: str | None = None, pad: str | None = None, unk: str | None = None):
        import tiktoken  # here, not at the top: a command that reads no text starts without it
        if pre_tokenizer not in PRE_TOKENIZERS:
            raise TokenizerError(f"{name}: pre-tokenizer {pre_tokenizer!r} is not one npllama knows "
                                 f"({', '.join(PRE_TOKENIZERS)})")
        for what, tok in (("bos", bos), ("eos", eos), ("pad", pad), ("unk", unk), *(("stop", s) for s in stop)):
            if tok is not None and tok not in special_tokens:
                raise TokenizerError(f"{name}: {what} token {tok!r} is not one of its control tokens")
        self.name = name
        self.pre_tokenizer = pre_tokenizer
        self.special_tokens = dict(special_tokens)
        if sum(map(len, self.special_tokens)) > MAX_INLINE_CONTROL_CHARS:
            Confined(f"{name}: its control tokens", f"{__name__}:probe_control_tokens",
                     (pre_tokenizer, self.special_tokens), TokenizerError).close()
        self.model = tiktoken.Encoding(name=name, pat_str=PRE_TOKENIZERS[pre_tokenizer], mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.n_words = self.model.n_vocab
        self.absent_bytes = b""  # single bytes the vocabulary lacks (see from_json)
        self.bos, self.eos, self.pad, self.unk = bos, eos, pad, unk
        self.bos_id = self.special_tokens[bos] if bos else None
        self.eos_id = self.special_tokens[eos]
        self.stop_ids = list(dict.fromkeys(self.special_tokens[s] for s in stop))
        self.chat_format = chat_format
        self.chat_template = chat_template
        self.add_bos = add_bos and self.bos_id is not None
        # An instruct model's generate wraps the prompt in the chat format by default.
        self.chat_default = chat_default
        self.default_system = default_system
        self.kind = "byte-level BPE"

    @classmethod
    def llama3(cls, path: str) -> "Tokenizer":
        data = read_bounded(path, MAX_SPEC_BYTES, TokenizerError)
        ranks = parse_tiktoken_ranks(data, path)
        if len(ranks) == LLAMA3_RANKS:
            digest = hashlib.sha256(data).hexdigest()
            if digest != LLAMA3_SHA256:
                raise TokenizerError(f"{path}: has Llama 3's 128000 ranks but not its contents (sha256 {digest})")
        special = {tok: len(ranks) + i for i, tok in enumerate(LLAMA3_SPECIAL)}
        tok = cls(ranks, "llama3", special, bos="<|begin_of_text|>", eos="<|end_of_text|>",
                  stop=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], chat_format="llama3", name=path)
        tok.kind = "Llama 3 tiktoken ranks (tokenizer.model)"
        return tok

    @classmethod
    def from_json(cls, path: str) -> "Tokenizer":
        """npllama's tokenizer.json (see read_spec): a byte-level BPE as tiktoken ranks, with
        its control tokens. Bytes the vocabulary lacks (HF drops them) get ranks past the
        vocabulary and are dropped from encode's output too."""
        spec, token_bytes = read_spec(path)
        return cls.from_spec(spec, token_bytes, name=path)

    @classmethod
    def from_spec(cls, spec: dict, token_bytes: list, name: str = "tokenizer") -> "Tokenizer":
        """A checked spec (check_spec) and its tokens' bytes as a Tokenizer."""
        ranks = {b: i for i, b in enumerate(token_bytes) if b is not None}
        n = len(token_bytes)
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
        ranks.update({b: n + i for i, b in enumerate(missing)})
        tok = cls(ranks, spec["pre_tokenizer"], spec["special_tokens"], spec.get("bos"), spec["eos"], spec["stop"],
                  spec.get("chat_format"), name=name, add_bos=spec.get("add_bos", True),
                  chat_default=spec.get("chat_default", False), default_system=spec.get("default_system"),
                  chat_template=spec.get("chat_template"), pad=spec.get("pad"), unk=spec.get("unk"))
        tok.n_words = n
        tok.absent_bytes = b"".join(missing)
        return tok

    def describe(self) -> str:
        """One line for `npllama info`."""
        return f"{self.kind}, {self.n_words} tokens, pre-tokenizer {self.pre_tokenizer}"

    def encode(self, s: str, bos: bool = False, eos: bool = False, allowed_special: str | set = frozenset()) -> list[int]:
        """Text to ids. Text that looks like a control token (`<|eot_id|>` typed by a user)
        is plain text unless allowed_special names it (or is "all")."""
        if not isinstance(s, str):
            raise TypeError(f"encode takes a str, got {type(s).__name__}")
        ids: list[int] = [self.bos_id] if bos and self.bos_id is not None else []
        drop_absent = bool(self.absent_bytes) and not allowed_special
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_whitespaces_or_nonwhitespaces(s[i:i + TIKTOKEN_MAX_ENCODE_CHARS],
                                                             MAX_NO_WHITESPACES_CHARS):
                if drop_absent and self._has_absent_bytes(piece):
                    ids.extend(self._encode_dropping_absent_bytes(piece))
                else:
                    ids.extend(self.model.encode(piece, allowed_special=allowed_special, disallowed_special=()))
        if self.absent_bytes:
            ids = [t for t in ids if t < self.n_words]
        if eos:
            ids.append(self.eos_id)
        return ids

    def _has_absent_bytes(self, s: str) -> bool:
        data = as_tiktoken_encodes(s).encode("utf-8")   # the bytes tiktoken would merge
        return len(data.translate(None, self.absent_bytes)) != len(data)

    def _encode_dropping_absent_bytes(self, s: str) -> list[int]:
        """HF's BPE drops bytes its vocabulary lacks inside each pre-tokenized piece, then
        merges what is left. tiktoken cannot skip a byte mid-merge, so such text is split
        here into tiktoken's pieces and each is merged without those bytes."""
        ids = []
        for piece in split_like_tiktoken(self.model._pat_str, s):
            data = piece.encode("utf-8").translate(None, self.absent_bytes)
            if data:
                ids.extend(self.model._encode_single_piece(data))
        return ids

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.n_words]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{self.n_words - 1})")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; a sequence ending mid-character decodes with U+FFFD, never raises."""
        return self.model.decode(self._check_ids(ids), errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return self.model.decode_single_token_bytes(self._check_ids([token])[0])

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Feeds ids one at a time; returns text only once its characters are complete."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self.utf8.decode(self.tokenizer.token_bytes(token))

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


# --- chat formats ----------------------------------------------------------------------------

ROLES = ("system", "user", "assistant", "ipython")


def _role(message: dict) -> str:
    role = message.get("role")
    role = "ipython" if role == "tool" else role
    if role not in ROLES:
        raise UsageError(f"unknown role {message.get('role')!r}; expected one of {', '.join(ROLES)} (or tool)")
    if not isinstance(message.get("content"), str):
        raise UsageError(f"message content must be a string, got {type(message.get('content')).__name__}")
    return role


class ChatFormat:
    """Llama 3's chat format, as Meta's llama_models ChatFormat encodes text messages."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_header(self, role: str) -> list[int]:
        t, sp = self.tokenizer, self.tokenizer.special_tokens
        return [sp["<|start_header_id|>"], *t.encode(role), sp["<|end_header_id|>"], *t.encode("\n\n")]

    def encode_message(self, message: dict) -> list[int]:
        end = "<|eom_id|>" if message.get("stop_reason") == "end_of_message" else "<|eot_id|>"
        return [*self.encode_header(_role(message)), *self.tokenizer.encode(message["content"]),
                self.tokenizer.special_tokens[end]]

    def encode_dialog_prompt(self, messages: Sequence[dict]) -> list[int]:
        tokens = [self.tokenizer.special_tokens["<|begin_of_text|>"]]
        for m in messages:
            tokens.extend(self.encode_message(m))
        return tokens + self.encode_header("assistant")


class ChatMLFormat:
    """ChatML (`<|im_start|>role\\n…<|im_end|>\\n`), as SmolLM2's template renders it."""

    def __init__(self, tokenizer: Tokenizer, default_system: str | None = None):
        self.tokenizer = tokenizer
        self.default_system = default_system

    def encode_message(self, message: dict) -> list[int]:
        sp = self.tokenizer.special_tokens
        return [sp["<|im_start|>"], *self.tokenizer.encode(f"{_role(message)}\n{message['content']}"),
                sp["<|im_end|>"], *self.tokenizer.encode("\n")]

    def encode_dialog_prompt(self, messages: Sequence[dict]) -> list[int]:
        messages = list(messages)
        if self.default_system is not None and (not messages or messages[0].get("role") != "system"):
            messages.insert(0, {"role": "system", "content": self.default_system})
        tokens = [t for m in messages for t in self.encode_message(m)]
        return tokens + [self.tokenizer.special_tokens["<|im_start|>"], *self.tokenizer.encode("assistant\n")]


def chat_format(tokenizer: Tokenizer, default_system: str | None = None):
    """How this tokenizer's model wants a conversation: its own chat template when the
    checkpoint has one, else the built-in format its control tokens imply."""
    if tokenizer.chat_template:
        return ChatTemplate(tokenizer)
    if tokenizer.chat_format == "llama3":
        return ChatFormat(tokenizer)
    if tokenizer.chat_format == "chatml":
        return ChatMLFormat(tokenizer, default_system)
    raise TokenizerError(f"{tokenizer.name}: this tokenizer has no chat template or chat format "
                         "(a base model? use generate --raw)")


def load(path: str) -> Tokenizer:
    """The tokenizer of a converted checkpoint directory (or a tokenizer file itself)."""
    if os.path.isdir(path):
        for name, loader in (("tokenizer.json", Tokenizer.from_json), ("tokenizer.model", Tokenizer.llama3)):
            if os.path.lexists(os.path.join(path, name)):
                return loader(inside(path, name, "tokenizer", TokenizerError))  # no link leading out of the model
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model (the checkpoint it was converted "
                             "from had no tokenizer)")
    return Tokenizer.from_json(path) if path.endswith(".json") else Tokenizer.llama3(path)


def from_files(files: dict[str, bytes], name: str) -> Tokenizer:
    """The tokenizer among the files a conversion would write (a GGUF run as it is: its
    tokenizer.json, made in memory by the GGUF reader and checked there), named `name`."""
    if "tokenizer.json" not in files:
        raise TokenizerError(f"{name}: no tokenizer (its GGUF vocabulary is absent or 'none'): it runs token ids "
                             "but cannot generate, chat or trace text")
    try:
        spec = json.loads(files["tokenizer.json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{name}: its tokenizer is not JSON ({e})") from None
    return Tokenizer.from_spec(*check_spec(spec, name), name=name)
