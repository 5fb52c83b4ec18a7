"""Tokenizers on tiktoken: Meta's Llama 3 tokenizer (tokenizer.model) and byte-level BPE
tokenizers described by a checkpoint (tokenizer.json, written by the GGUF converter), with
their chat formats."""
from __future__ import annotations

import base64
import codecs
import hashlib
import json
import os
from typing import Iterable, Iterator, Sequence

import tiktoken

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

# Pre-tokenizers of byte-level BPE vocabularies, by GGUF's tokenizer.ggml.pre, as one
# tiktoken regex each.
GPT2_PAT_STR = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# SmolLM (HF: Digits(individual_digits) then ByteLevel; llama.cpp: "\p{N}" then GPT-2's): every
# digit alone, and whitespace before a digit ends its run as it would at the end of a piece.
SMOLLM_PAT_STR = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
PRE_TOKENIZERS = {"smollm": SMOLLM_PAT_STR, "gpt2": GPT2_PAT_STR, "default": GPT2_PAT_STR,
                  "llama-bpe": LLAMA3_PAT_STR, "llama3": LLAMA3_PAT_STR}

# Meta splits long inputs so tiktoken's regex never sees a huge piece (it can panic).
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


from .errors import TokenizerError, UsageError  # noqa: F401  (TokenizerError re-exported)


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


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """`base64 rank` lines. Read here, not with tiktoken's loader, which copies the file into
    a shared cache directory keyed by its path."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise TokenizerError(f"{path}: no such file") from None
    ranks = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(f"{path}: line {n} is not `base64 rank` (a sentencepiece model from Llama 2?)") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


class Tokenizer:
    """A tiktoken Encoding plus the control tokens a model needs: bos, stop tokens, chat format."""

    def __init__(self, ranks: dict[bytes, int], pat_str: str, special_tokens: dict[str, int], bos: str | None,
                 eos: str, stop: Sequence[str], chat_format: str | None, name: str = "tokenizer",
                 add_bos: bool = True, chat_default: bool = False, default_system: str | None = None):
        self.special_tokens = dict(special_tokens)
        self.model = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.n_words = self.model.n_vocab
        self.absent_bytes = b""  # single bytes the vocabulary lacks (see from_json)
        self.bos_id = self.special_tokens[bos] if bos else None
        self.eos_id = self.special_tokens[eos]
        self.stop_ids = [self.special_tokens[s] for s in stop]
        self.chat_format = chat_format
        self.add_bos = add_bos and self.bos_id is not None
        # An instruct model's generate wraps the prompt in the chat format by default.
        self.chat_default = chat_default
        self.default_system = default_system

    @classmethod
    def llama3(cls, path: str) -> "Tokenizer":
        ranks = read_tiktoken_ranks(path)
        if len(ranks) == LLAMA3_RANKS:
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if digest != LLAMA3_SHA256:
                raise TokenizerError(f"{path}: has Llama 3's 128000 ranks but not its contents (sha256 {digest})")
        special = {tok: len(ranks) + i for i, tok in enumerate(LLAMA3_SPECIAL)}
        return cls(ranks, LLAMA3_PAT_STR, special, bos="<|begin_of_text|>", eos="<|end_of_text|>",
                   stop=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], chat_format="llama3",
                   name=os.path.basename(path))

    @classmethod
    def from_json(cls, path: str) -> "Tokenizer":
        """npllama's tokenizer.json: a byte-level BPE as tiktoken ranks, with its control tokens.

        "tokens" lists every id's bytes (base64; null for control tokens, which are named
        in "special_tokens"). A BPE vocabulary whose merges are ranked in id order is exactly
        tiktoken's rank table. Bytes the vocabulary lacks (HF drops them) get ranks past the
        vocabulary and are dropped from encode's output too."""
        try:
            with open(path) as f:
                spec = json.load(f)
            ranks = {base64.b64decode(t): i for i, t in enumerate(spec["tokens"]) if t is not None}
            n = len(spec["tokens"])
            missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
            ranks.update({b: n + i for i, b in enumerate(missing)})
            tok = cls(ranks, spec["pat_str"], spec["special_tokens"], spec.get("bos"), spec["eos"], spec["stop"],
                      spec.get("chat_format"), name=os.path.basename(path), add_bos=spec.get("add_bos", True),
                      chat_default=spec.get("chat_default", False), default_system=spec.get("default_system"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TokenizerError(f"{path}: not a valid npllama tokenizer.json ({type(e).__name__}: {e})") from None
        tok.n_words = n
        tok.absent_bytes = b"".join(missing)
        return tok

    def encode(self, s: str, bos: bool = False, eos: bool = False, allowed_special: str | set = frozenset()) -> list[int]:
        """Text to ids. Text that looks like a control token (`<|eot_id|>` typed by a user)
        is plain text unless allowed_special names it (or is "all")."""
        if not isinstance(s, str):
            raise TypeError(f"encode takes a str, got {type(s).__name__}")
        ids: list[int] = [self.bos_id] if bos and self.bos_id is not None else []
        if self.absent_bytes and not allowed_special and self._has_absent_bytes(s):
            ids.extend(self._encode_dropping_absent_bytes(s))
        else:
            for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
                for piece in split_whitespaces_or_nonwhitespaces(s[i:i + TIKTOKEN_MAX_ENCODE_CHARS],
                                                                 MAX_NO_WHITESPACES_CHARS):
                    ids.extend(self.model.encode(piece, allowed_special=allowed_special, disallowed_special=()))
            if self.absent_bytes:
                ids = [t for t in ids if t < self.n_words]
        if eos:
            ids.append(self.eos_id)
        return ids

    def _has_absent_bytes(self, s: str) -> bool:
        data = s.encode("utf-8", "surrogatepass")
        return len(data.translate(None, self.absent_bytes)) != len(data)

    def _encode_dropping_absent_bytes(self, s: str) -> list[int]:
        """HF's BPE drops bytes its vocabulary lacks inside each pre-tokenized piece, then
        merges what is left. tiktoken cannot skip a byte mid-merge, so such text is split
        here (the `regex` module, as tiktoken's own pure-Python path does) and each piece is
        merged without those bytes."""
        import regex
        ids = []
        for piece in regex.findall(self.model._pat_str, s):
            data = piece.encode("utf-8", "surrogatepass").translate(None, self.absent_bytes)
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
    if tokenizer.chat_format == "llama3":
        return ChatFormat(tokenizer)
    if tokenizer.chat_format == "chatml":
        return ChatMLFormat(tokenizer, default_system)
    raise UsageError(f"this tokenizer has no chat format ({tokenizer.chat_format!r})")


def load(path: str) -> Tokenizer:
    """The tokenizer of a converted checkpoint directory (or a tokenizer file itself)."""
    if os.path.isdir(path):
        from .formats.untrusted import inside, open_regular
        for name, loader in (("tokenizer.json", Tokenizer.from_json), ("tokenizer.model", Tokenizer.llama3)):
            if os.path.lexists(os.path.join(path, name)):
                file = inside(path, name, "tokenizer", TokenizerError)  # no link leading out of the model
                open_regular(file, TokenizerError).close()               # nor a FIFO that would block
                return loader(file)
        raise TokenizerError(f"{path}: no tokenizer.model or tokenizer.json")
    return Tokenizer.from_json(path) if path.endswith(".json") else Tokenizer.llama3(path)
