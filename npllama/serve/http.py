"""The OpenAI-compatible HTTP layer on FastAPI + uvicorn (the optional extra `serve`), over
one Engine whose thread does all the model work; handlers only queue requests and relay tokens.
Imported only by `npllama serve` (FastAPI resolves the handlers' annotations from this module).

Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 bad request,
401 bad key, 404, 413 body too large, 429 queue full, 500 the request failed in the engine (a
pipeline stage died), 503 draining or broken. A stream that fails after its first token ends
with an SSE event {"error": ...} (as OpenAI's and vLLM's do), which the openai client raises.
"""
import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import NpllamaError, UsageError
from ..run.generate import SamplingParams
from ..run.batching import Broken, Draining, Engine, QueueFull, Request

MAX_BODY = 1 << 20
MAX_TOP_LOGPROBS = 20


def body_schema(is_chat: bool) -> dict:
    """The request body in the OpenAPI schema (the handlers read it themselves, to answer a
    malformed one in OpenAI's error shape): what schemathesis fuzzes."""
    # Optional fields may be null, as in OpenAI's API (null: the default).
    number, integer, boolean = {"type": ["number", "null"]}, {"type": ["integer", "null"]}, {"type": ["boolean", "null"]}
    props = {"max_tokens": integer, "temperature": number, "top_p": number, "seed": integer, "stream": boolean,
             "stop": {"type": ["array", "null"], "items": {"type": "string"}},
             "stream_options": {"type": ["object", "null"], "properties": {"include_usage": boolean}}}
    if is_chat:
        props.update(messages={"type": "array", "items": {"type": "object", "properties": {
            "role": {"type": "string"}, "content": {"type": "string"}}, "required": ["role", "content"]}},
            logprobs=boolean, top_logprobs=integer)
    else:
        props.update(prompt={"type": "string"}, logprobs=integer)
    schema = {"type": "object", "properties": props, "required": ["messages" if is_chat else "prompt"]}
    answer = {"description": "the completion; with stream, server-sent events", "content": {
        "application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {}}}}   # events: chunks, [DONE]
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {"200": answer}}


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {}, "code": {"type": "integer"}}}}}
ERRORS = {code: {"description": why, "content": {"application/json": {"schema": ERROR_SCHEMA}}} for code, why in (
    (400, "bad request"), (401, "missing or wrong API key"), (413, "body too large"), (429, "queue full"),
    (500, "the engine failed during the request"), (503, "draining, or the engine stopped"))}


def error(status: int, message: str, kind: str = "invalid_request_error", param=None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


@dataclass
class Ask:
    """What a request body asks for, checked."""
    prompt: list
    max_tokens: int
    sampling: SamplingParams
    n_top: int
    want_logprobs: bool
    stop: list
    stream: bool
    stream_usage: bool = False      # stream_options.include_usage: a last chunk with usage


JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
              dict: "an object"}


def field(body: dict, key: str, kinds: tuple, default=None):
    """body[key] if it is of one of kinds (true and false are no numbers), default if absent
    or null; ValueError naming the field otherwise."""
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        raise ValueError(f"{key} must be {' or '.join(JSON_TYPES[k] for k in kinds)}")
    return v


def parse_prompt(body: dict, is_chat: bool, chat, tokenizer) -> list:
    if is_chat:
        if chat is None:
            raise ValueError("this model has no chat template: use /v1/completions")
        return chat.encode_dialog_prompt(field(body, "messages", (list,), None) or [])
    p = field(body, "prompt", (str, list), None)
    if p is None:
        raise ValueError("prompt is required")
    if isinstance(p, str):
        return tokenizer.encode(p, bos=tokenizer.add_bos)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        raise ValueError("a prompt array must hold token ids (integers)")
    return p


def parse(raw: bytes, is_chat: bool, chat, tokenizer, context: int) -> Ask:
    """A request body -> Ask; ValueError, KeyError, TypeError or an NpllamaError if it is bad."""
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    prompt = parse_prompt(body, is_chat, chat, tokenizer)
    if is_chat:
        n_top, want = field(body, "top_logprobs", (int,), 0), field(body, "logprobs", (bool,), False)
    else:
        n_top = field(body, "logprobs", (int,), None)
        want, n_top = n_top is not None, n_top or 0
    stop = field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(x, str) for x in stop):
        raise ValueError("stop must be a string or an array of strings")
    seed = field(body, "seed", (int,), None)
    sampling = SamplingParams(temperature=float(field(body, "temperature", (int, float), 1.0)),
                              top_p=float(field(body, "top_p", (int, float), 1.0)), seed=seed)
    max_tokens = field(body, "max_tokens", (int,), field(body, "max_completion_tokens", (int,), None))
    max_tokens = context - len(prompt) if max_tokens is None else max_tokens
    if max_tokens < 0 or not 0 <= n_top <= MAX_TOP_LOGPROBS or (seed is not None and seed < 0):
        raise ValueError(f"max_tokens and seed must be >= 0 and logprobs at most {MAX_TOP_LOGPROBS}")
    options = field(body, "stream_options", (dict,), {})
    return Ask(prompt, max_tokens, sampling, n_top, want, [x for x in stop if x], field(body, "stream", (bool,), False),
               field(options, "include_usage", (bool,), False))


def logprob_entry(tokenizer, is_chat: bool, token: int, lp: float, top) -> dict:
    """One token's logprobs: chat's content[] entry, or completions' per-token lists."""
    text = lambda t: tokenizer.decode([t])  # noqa: E731
    if is_chat:
        return {"token": text(token), "logprob": lp, "bytes": list(tokenizer.token_bytes(token)),
                "top_logprobs": [{"token": text(t), "logprob": v, "bytes": list(tokenizer.token_bytes(t))}
                                 for t, v in top]}
    by_text = {}   # completions key them by text: the likelier of two tokens that decode alike
    for t, v in top:
        by_text.setdefault(text(t), v)
    return {"tokens": [text(token)], "token_logprobs": [lp], "top_logprobs": [by_text]}


def choice(is_chat: bool, stream: bool, content: str, lps: list, want: bool, finish) -> dict:
    c = {"index": 0, "finish_reason": finish}
    if is_chat:
        c["delta" if stream else "message"] = {"role": "assistant", "content": content}
        c["logprobs"] = {"content": lps} if want else None
    else:
        c["text"] = content
        c["logprobs"] = {k: [v for e in lps for v in e[k]] for k in ("tokens", "token_logprobs", "top_logprobs")} \
            if want else None
    return c


class Relay:
    """One request's tokens, from the engine's thread to the handler's event loop, as text
    pieces: text that could still become a stop string is held back until it cannot."""

    def __init__(self, tokenizer, stop: list):
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        self.decoder, self.stop, self.text, self.sent = tokenizer.stream_decoder(), stop, "", 0
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.peeked: tuple | None = None

    def on_token(self, req, token, lp, top) -> bool:          # engine thread; False: a stop string
        self.text += self.decoder.add(token)
        hits = [self.text.find(s) for s in self.stop if s in self.text]
        if hits:
            self.text = self.text[:min(hits)]
        self.loop.call_soon_threadsafe(self.events.put_nowait, (token, lp, top, bool(hits)))
        return not hits

    def on_done(self, req) -> None:                           # engine thread
        if not any(s in self.text for s in self.stop):
            self.text += self.decoder.flush()                 # an unfinished UTF-8 character, as U+FFFD
        self.loop.call_soon_threadsafe(self.events.put_nowait, None)

    async def peek(self) -> None:
        """Until the first token or the end: a request that fails before any token gets an
        error status, not a 200 stream."""
        self.peeked = (await self.events.get(),)

    async def next_event(self):
        if self.peeked is not None:
            (ev,), self.peeked = self.peeked, None
            return ev
        return await self.events.get()

    async def pieces(self):
        """(text piece, token, logprob, top) per token, then ("rest", None...) once done."""
        while (ev := await self.next_event()) is not None:
            token, lp, top, hit = ev
            end = len(self.text) if hit else max(self.sent, len(self.text) - self.hold)
            piece, self.sent = self.text[self.sent:end], end
            yield piece, (token, lp, top)
        if self.sent < len(self.text):
            yield self.text[self.sent:], None


def usage(ask: Ask, req: Request) -> dict:
    n = len(req.tokens)
    return {"prompt_tokens": len(ask.prompt), "completion_tokens": n, "total_tokens": len(ask.prompt) + n}


def failed(req: Request):
    return error(500, f"the request failed: {req.error}", "server_error")


def add_common_routes(app: FastAPI, engine: Engine, model_name: str, api_key) -> None:
    """The key and size guard, 404 in OpenAI's shape, /health and /v1/models."""
    @app.middleware("http")
    async def guard(request: HTTPRequest, call_next):
        if api_key is not None and request.url.path != "/health" and \
                request.headers.get("authorization") != f"Bearer {api_key}":
            return error(401, "invalid API key", "authentication_error")
        if int(request.headers.get("content-length") or 0) > MAX_BODY:
            return error(413, f"request body over {MAX_BODY} bytes")
        return await call_next(request)

    @app.exception_handler(404)
    async def not_found(request, exc):
        return error(404, f"no route {request.url.path}", "not_found_error")

    @app.get("/health", responses={503: {"description": "the engine stopped (a pipeline stage died)"}})
    async def health():
        if engine.broken:
            return JSONResponse({"status": "error", "error": engine.broken}, 503)
        return {"status": "draining" if engine.draining else "ok", "active": engine.n_active()}

    @app.get("/v1/models", responses={401: ERRORS[401]})
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "npllama"}]}


class Completions:
    """The two completion endpoints over one engine: parse, queue, answer whole or streamed."""

    def __init__(self, engine: Engine, tokenizer, chat, model_name: str):
        self.engine, self.tokenizer, self.chat, self.model_name = engine, tokenizer, chat, model_name

    async def handle(self, request: HTTPRequest, is_chat: bool):
        try:
            ask = parse(await request.body(), is_chat, self.chat, self.tokenizer, self.engine.model.max_seq_len)
        except (ValueError, KeyError, TypeError, NpllamaError) as e:
            return error(400, f"bad request: {e}")
        relay = Relay(self.tokenizer, ask.stop)
        req = Request(ask.prompt, ask.max_tokens, ask.sampling, ask.n_top, relay.on_token, relay.on_done)
        try:
            self.engine.submit(req)
        except QueueFull as e:
            return error(429, str(e), "rate_limit_error")
        except (Draining, Broken) as e:
            return error(503, str(e), "server_error")
        except UsageError as e:
            return error(400, str(e), param="max_tokens")
        # Until the answer (or a stream's first token) is ready; a stream then finds a client
        # gone when a write fails.
        watch = asyncio.create_task(self.cancel_on_disconnect(request, req))
        try:
            respond = self.stream_response if ask.stream else self.whole_response
            return await respond(ask, req, relay, is_chat)
        finally:
            watch.cancel()

    async def cancel_on_disconnect(self, request: HTTPRequest, req: Request) -> None:
        """A client that goes away before its answer is ready frees its slot. The body is read: the next ASGI message is the
        disconnect (request.is_disconnected() never sees it behind the middleware)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.engine.cancel(req)

    def head(self, is_chat: bool, stream: bool) -> dict:
        kind = "chat.completion" if is_chat else "text_completion"
        return {"id": f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": kind + ".chunk" if is_chat and stream else kind, "created": int(time.time()),
                "model": self.model_name}

    @staticmethod
    def finish(req) -> str:
        return "length" if req.finish_reason == "length" else "stop"

    async def stream_response(self, ask, req, relay, is_chat):
        try:
            await relay.peek()
        except BaseException:
            self.engine.cancel(req)
            raise
        if req.finish_reason == "error" and not req.tokens:
            return failed(req)
        return StreamingResponse(self.sse(ask, req, relay, is_chat), media_type="text/event-stream")

    async def sse(self, ask, req, relay, is_chat):
        top = self.head(is_chat, True)
        entry = lambda t: [logprob_entry(self.tokenizer, is_chat, *t)] if t else []  # noqa: E731
        try:
            async for piece, tok in relay.pieces():
                yield f"data: {json.dumps({**top, 'choices': [choice(is_chat, True, piece, entry(tok), ask.want_logprobs, None)]})}\n\n"  # noqa: E501
            if req.finish_reason == "error":
                yield f"data: {failed(req).body.decode()}\n\n"
                return
            last = choice(is_chat, True, "", [], ask.want_logprobs, self.finish(req))
            yield f"data: {json.dumps({**top, 'choices': [last]})}\n\n"
            if ask.stream_usage:
                yield f"data: {json.dumps({**top, 'choices': [], 'usage': usage(ask, req)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.engine.cancel(req)   # a client gone mid-stream frees its slot; a no-op once done

    async def whole_response(self, ask, req, relay, is_chat):
        try:
            parts = [p async for p in relay.pieces()]
        finally:
            self.engine.cancel(req)
        if req.finish_reason == "error":
            return failed(req)
        lps = [logprob_entry(self.tokenizer, is_chat, *t) for _, t in parts if t]
        return JSONResponse({**self.head(is_chat, False),
                             "choices": [choice(is_chat, False, "".join(p for p, _ in parts), lps,
                                                ask.want_logprobs, self.finish(req))],
                             "usage": usage(ask, req)})


def create_app(engine: Engine, tokenizer, chat, model_name: str, api_key=None, lifespan=None):
    app = FastAPI(title="npllama serve", lifespan=lifespan)
    add_common_routes(app, engine, model_name, api_key)
    completions = Completions(engine, tokenizer, chat, model_name)

    @app.post("/v1/chat/completions", openapi_extra=body_schema(True), responses=ERRORS)
    async def chat_completions(request: HTTPRequest):
        return await completions.handle(request, True)

    @app.post("/v1/completions", openapi_extra=body_schema(False), responses=ERRORS)
    async def text_completions(request: HTTPRequest):
        return await completions.handle(request, False)

    return app
