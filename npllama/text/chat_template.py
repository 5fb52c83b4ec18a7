"""A checkpoint's own chat template (Jinja, from HF's tokenizer_config.json or a GGUF's
tokenizer.chat_template), rendered as transformers' apply_chat_template renders it: the same
Jinja settings (trim_blocks, lstrip_blocks, loop controls) and globals (raise_exception,
strftime_now, tojson, dict, namespace, bos_token, eos_token, add_generation_prompt, tools,
documents, ...), and control tokens typed in messages encoded as text (transformers'
sanitize_control_tokens=True), so the ids are exactly transformers'.

A template is untrusted code. It runs in jinja2's ImmutableSandboxedEnvironment (no
attribute of Python internals, no mutation of the values passed in), and what it may cost
is bounded:
- every string, list or number it builds (repetition, concatenation, `~`, joins, padding,
  formatting, any filter or method call) is charged to a budget of MAX_BUILT characters per
  render, checked before anything that can grow faster than its inputs is built;
- its output is at most MAX_OUTPUT characters;
- range() gives at most 100000 items (jinja's sandbox);
- rendering stops after TIME_LIMIT seconds, checked on every line of the compiled template
  (a loop with an empty body included), and on deep recursion;
- the template itself is at most MAX_TEMPLATE_CHARS characters.
The sandbox is npllama/text/template_sandbox.py, loaded only in the confined worker.
Any of these, a syntax error or raise_exception is one TokenizerError/UsageError line."""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

from ..errors import TokenizerError, UsageError
from .confined import Confined

MAX_TEMPLATE_CHARS = 1 << 20     # Llama 3.1's chat template is 4.6 kB

MAX_BUILT = 1 << 25          # characters (or list items) a render may build: 32M
MAX_OUTPUT = 1 << 22         # characters of prompt text: 4M, beyond any context window
MAX_INT_BITS = 1 << 16
TIME_LIMIT = 5.0             # seconds; real templates render in milliseconds

# transformers' markers around control tokens found in the caller's strings (private-use
# characters; they are removed from those strings first, as transformers does).
MARK_START, MARK_END = "\U000f0000", "\U000f0001"
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def plain_data(value, where: str = "messages"):
    """JSON-like data (what a template may see of the caller's values); anything else is a
    UsageError. Keys whose value is None are dropped from messages, as transformers does."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise UsageError(f"{where}: keys must be strings")
        return {k: plain_data(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise UsageError(f"{where}: {type(value).__name__} is not JSON data")


class ChatTemplate:
    """The tokenizer's chat_template, compiled once (in a confined worker, which renders it
    per conversation turn); `encode_dialog_prompt` as the built-in chat formats have it."""

    def __init__(self, tokenizer, source: str | None = None):   # tokenizer: a tokenizer.Tokenizer
        self.tokenizer = tokenizer
        self.source = tokenizer.chat_template if source is None else source
        if not isinstance(self.source, str) or len(self.source) > MAX_TEMPLATE_CHARS:
            raise TokenizerError(f"{tokenizer.name}: the chat template is not a string of at most "
                                 f"{MAX_TEMPLATE_CHARS:,} characters")
        # CPU seconds: the tracer's limit, plus one for the compile and the whole-second rlimit.
        self.worker = Confined(f"{tokenizer.name}: chat template", "npllama.text.template_sandbox:Renderer",
                               (self.source, tokenizer.name, TIME_LIMIT), UsageError, cpu=math.ceil(TIME_LIMIT) + 1)
        # Longest first, so a token wins over the tokens it contains (transformers' order).
        control = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self.control_re = re.compile("|".join(map(re.escape, control)) or "(?!)")
        self.markers_re = re.compile(f"{MARK_START}({self.control_re.pattern}){MARK_END}|[{MARK_START}{MARK_END}]")

    def globals(self) -> dict:
        """What transformers passes besides the messages: its special_tokens_map."""
        t = self.tokenizer
        return {f"{k}_token": v for k, v in (("bos", t.bos), ("eos", t.eos), ("unk", t.unk), ("pad", t.pad))
                if v is not None}

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True, tools=None, documents=None,
               **kwargs) -> str:
        """The prompt text, as apply_chat_template(..., tokenize=False) gives it."""
        return self._render(self._messages(messages), add_generation_prompt, tools, documents, kwargs)

    def encode_dialog_prompt(self, messages: Sequence[dict], add_generation_prompt: bool = True, tools=None,
                             documents=None, **kwargs) -> list[int]:
        """The prompt's ids, as apply_chat_template(..., sanitize_control_tokens=True) gives
        them: control tokens written by the template are tokens, ones inside the messages
        (and tools, documents, kwargs) are text."""
        mark = self._mark
        text = self._render(mark(self._messages(messages)), add_generation_prompt, mark(plain_data(tools, "tools")),
                            mark(plain_data(documents, "documents")), mark(plain_data(kwargs, "kwargs")))
        return self._encode_marked(text)

    def _messages(self, messages) -> list[dict]:
        messages = plain_data(list(messages) if isinstance(messages, (list, tuple)) else messages)
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise UsageError("messages must be a non-empty list of dicts")
        out = []
        for m in messages:
            m = {k: v for k, v in m.items() if v is not None}
            reasoning = next((m[k] for k in REASONING_FIELDS if k in m), None)
            if reasoning is not None:  # transformers' aliases, so any template finds it
                m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
            out.append(m)
        return out

    def _mark(self, value):
        if isinstance(value, str):
            value = value.replace(MARK_START, "").replace(MARK_END, "")
            return self.control_re.sub(lambda m: MARK_START + m.group(0) + MARK_END, value)
        if isinstance(value, dict):
            return {k: self._mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._mark(v) for v in value]
        return value

    def _render(self, messages, add_generation_prompt, tools, documents, kwargs) -> str:
        variables = {**self.globals(), **plain_data(kwargs, "kwargs")}
        variables.update(messages=messages, tools=plain_data(tools, "tools"),
                         documents=plain_data(documents, "documents"), add_generation_prompt=add_generation_prompt)
        return self.worker.call(variables)

    def _encode_marked(self, text: str) -> list[int]:
        """transformers' encode_marked_chat: pieces between markers are encoded separately,
        marked control tokens as plain text; each piece after the first is encoded after a
        newline that is then removed (SentencePiece's prefix space, kept for identical ids)."""
        tok = self.tokenizer
        pieces = self.markers_re.split(text)
        newline = tok.encode("\n")
        ids = tok.encode(pieces[0], allowed_special="all")
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            allowed: Any = frozenset() if i % 2 == 1 else "all"
            piece_ids = tok.encode("\n" + piece, allowed_special=allowed)
            ids += piece_ids[len(newline):] if piece_ids[:len(newline)] == newline else \
                tok.encode(piece, allowed_special=allowed)
        return ids
