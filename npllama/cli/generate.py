"""`npllama generate` and `npllama chat`: text out, streamed as it is sampled."""
from __future__ import annotations

import json
import sys

from ..errors import UsageError
from ..run.generate import Options
from ..text.tokenizer import chat_format
from .common import (add_model_args, add_sampling_args, add_token_args, at_least, encode_prompt, open_model, piece,
                     prompt_or_tokens, sampling_params, utf8)


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt (streams text)",
                       description="Generate text from a prompt, streaming it to stdout; a tokens/s line goes "
                       "to stderr.")
    g.add_argument("prompt", nargs="?", type=utf8)
    add_model_args(g)
    add_sampling_args(g)
    add_token_args(g)
    g.add_argument("--show-ids", action="store_true", help="one line per token: the prompt's ids, then each "
                   "generated id with its text and log-probability")
    g.add_argument("--logprobs", type=at_least(0), default=0, metavar="K", help="also the K most likely tokens of "
                   "every step, with their log-probabilities (implies one line per token)")
    g.add_argument("--json", action="store_true", help="one JSON object per generated token, then one with the "
                   "whole result")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="send the prompt as a user message in the model's chat format "
                      "(default for instruct models)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="plain completion of the prompt")
    g.add_argument("--stop", action="append", type=utf8, metavar="TEXT", help="stop at this text (repeatable)")
    g.add_argument("--system", type=utf8, help="system prompt (implies --chat)")
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="interactive multi-turn chat",
                        description="Chat with the model: one user message per line of stdin (Ctrl-D or "
                        "Ctrl-C ends). The KV cache is kept across turns.")
    add_model_args(ch)
    add_sampling_args(ch)
    ch.add_argument("--system", type=utf8, help="system prompt")
    ch.set_defaults(func=cmd_chat)


def cmd_generate(a) -> int:
    per_token = bool(a.json or a.show_ids or a.logprobs)
    opts = Options(a.max_new_tokens, sampling_params(a), a.stop or (), logprobs=per_token, top_logprobs=a.logprobs)
    gen = open_model(a)
    prompt, echo = generate_prompt(a, gen)
    stream = gen.start([prompt], opts)
    if per_token:
        per_token_output(gen, prompt, stream, a.json)
    else:
        sys.stdout.write(echo)
        for text_piece, _, _ in stream:
            sys.stdout.write(text_piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    # With nothing to generate the prompt is not run: its length is all there is to report.
    print(gen.timings.line() if a.max_new_tokens else f"prompt: {len(prompt)} tokens (not run: --max-new-tokens 0)",
          file=sys.stderr)
    return 0


def generate_prompt(a, gen) -> tuple[list[int], str]:
    """(the prompt's tokens, the text to echo before the continuation): ids as given, the
    prompt in the chat format (--chat, --system, or an instruct model's default), or raw."""
    tok = gen.tokenizer
    text, ids = prompt_or_tokens(a, gen)
    if a.chat is False and a.system is not None:
        raise UsageError("--system fills the chat format's system message; it does not go with --raw")
    if ids is not None:
        if a.chat or a.system is not None:
            raise UsageError("--chat (or --system) does not apply to --tokens/--tokens-file: the ids are the whole prompt")
        return ids, tok.decode(ids)
    if a.chat if a.chat is not None else tok.chat_default or a.system is not None:
        system = [{"role": "system", "content": a.system}] if a.system is not None else []
        return chat_format(tok, tok.default_system).encode_dialog_prompt(
            system + [{"role": "user", "content": text}]), ""
    return encode_prompt(tok, text), text


def per_token_output(gen, prompt: list[int], stream, as_json: bool) -> None:
    """One line per token. Text: the prompt's ids, `---`, then each generated id with its
    piece and, with --logprobs K, its log-probability and the K most likely. --json: one
    object per generated token, then one with the whole result."""
    tok, out = gen.tokenizer, sys.stdout
    if not as_json:
        for t in prompt:
            print(f"{t:>7}  {json.dumps(piece(tok, t), ensure_ascii=False)}", file=out)
        print("---", file=out)
    shown = 0
    for _ in stream:
        shown = show_tokens(tok, stream.result, shown, as_json)
    show_tokens(tok, stream.result, shown, as_json)
    if as_json:
        r, t = stream.result, gen.timings
        print(json.dumps({"prompt_ids": list(prompt), "ids": r.tokens, "text": r.text, "stop_reason": r.stop_reason,
                          "prompt_tokens": t.prompt_tokens, "prompt_seconds": t.prompt_seconds,
                          "generated_tokens": t.generated_tokens, "generated_seconds": t.generated_seconds},
                         ensure_ascii=False), file=out)


def show_tokens(tok, r, shown: int, as_json: bool) -> int:
    """Print the result r's tokens from `shown` on, one line each; returns how many are shown."""
    out = sys.stdout
    for i in range(shown, len(r.tokens)):
        t, top = r.tokens[i], (r.top_logprobs[i] if r.top_logprobs else [])
        if as_json:
            line = {"id": t, "piece": piece(tok, t), "logprob": r.logprobs[i]}
            if r.top_logprobs:
                line["top"] = [{"id": u, "piece": piece(tok, u), "logprob": lp} for u, lp in top]
            print(json.dumps(line, ensure_ascii=False), file=out, flush=True)
        else:
            alts = ", ".join(f"{u} {json.dumps(piece(tok, u), ensure_ascii=False)} {lp:.4f}" for u, lp in top)
            print(f"{t:>7}  {json.dumps(piece(tok, t), ensure_ascii=False):<20} {r.logprobs[i]:9.4f}"
                  + (f"  | {alts}" if alts else ""), file=out, flush=True)
    return len(r.tokens)


def cmd_chat(a) -> int:
    sampling = sampling_params(a)
    gen = open_model(a)
    fmt = chat_format(gen.tokenizer, gen.tokenizer.default_system)
    system = [{"role": "system", "content": a.system}] if a.system else []
    messages = list(system)
    interactive, refused = sys.stdin.isatty(), 0
    try:
        for n, raw in enumerate(iter(lambda: prompt_line(interactive), b""), 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                # As for a prompt argument: the tokenizer would make the bytes U+FFFD unsaid.
                print(f"npllama chat: stdin line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start}); "
                      "line skipped", file=sys.stderr)
                refused += 1
                continue
            if line.strip():
                messages = chat_turn(gen, fmt, system, messages + [{"role": "user", "content": line}],
                                     a.max_new_tokens, sampling)
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 1 if refused else 0


def prompt_line(interactive: bool) -> bytes:
    """The next line of stdin as bytes (b"" at its end), after a "> " prompt on a terminal."""
    if interactive:
        print("> ", end="", flush=True)
    if hasattr(sys.stdin, "buffer"):
        return sys.stdin.buffer.readline()
    return sys.stdin.readline().encode("utf-8", "surrogateescape")   # a text stream put in its place


def chat_turn(gen, fmt, system: list[dict], messages: list[dict], max_new_tokens: int, sampling) -> list[dict]:
    """Answer the last user message, streaming; returns the conversation with the answer."""
    prompt = fmt.encode_dialog_prompt(messages)
    if len(prompt) >= gen.model.max_seq_len:
        print(f"npllama: the conversation ({len(prompt)} tokens) outgrew the context of "
              f"{gen.model.max_seq_len}; starting over from this message", file=sys.stderr)
        messages = system + messages[-1:]
        prompt = fmt.encode_dialog_prompt(messages)
    stream = gen.stream(prompt, max_new_tokens, sampling)
    for text_piece, _, _ in stream:
        sys.stdout.write(text_piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(gen.timings.line(), file=sys.stderr)
    gen.timings.__init__()
    return messages + [{"role": "assistant", "content": stream.result.text}]

