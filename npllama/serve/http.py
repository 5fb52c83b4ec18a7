"""The OpenAI-compatible HTTP layer on FastAPI + uvicorn (the optional extra `serve`), over
one Engine whose thread does all the model work; handlers only queue requests and relay tokens.
Imported only by `npllama serve` (FastAPI resolves the handlers' annotations from this module).

Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 bad request,
401 bad key, 404, 413 body too large, 429 queue full, 503 draining.
"""
import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import NpllamaError, UsageError
from ..generate import SamplingParams
from .engine import Draining, Engine, QueueFull, Request

MAX_BODY = 1 << 20


def error(status: int, message: str, kind: str = "invalid_request_error", param=None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def create_app(engine: Engine, tokenizer, chat, model_name: str, api_key=None):
    app = FastAPI(title="npllama serve")

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

    @app.get("/health")
    async def health():
        return {"status": "draining" if engine.draining else "ok", "active": engine.n_active()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "npllama"}]}

    async def handle(request: HTTPRequest, is_chat: bool):
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            if is_chat and chat is None:
                raise ValueError("this model has no chat template: use /v1/completions")
            if is_chat:
                prompt = chat.encode_dialog_prompt(body["messages"])
            else:
                p = body["prompt"]
                prompt = tokenizer.encode(p, bos=tokenizer.add_bos) if isinstance(p, str) else [int(t) for t in p]
            n_top = int(body.get("top_logprobs") or 0) if is_chat else int(body.get("logprobs") or 0)
            want_lp = bool(body.get("logprobs")) if is_chat else body.get("logprobs") is not None
            stop = body.get("stop") or []
            stop = [stop] if isinstance(stop, str) else list(stop)
            temperature = body.get("temperature")
            sampling = SamplingParams(temperature=1.0 if temperature is None else float(temperature),
                                      top_p=float(body.get("top_p", 1.0)), seed=body.get("seed"))
            max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
            max_tokens = engine.model.max_seq_len - len(prompt) if max_tokens is None else int(max_tokens)
            if max_tokens < 0 or not 0 <= n_top <= 20:
                raise ValueError("max_tokens must be >= 0 and logprobs at most 20")
        except (ValueError, KeyError, TypeError, NpllamaError) as e:
            return error(400, f"bad request: {e}")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        decoder, text = tokenizer.stream_decoder(), [""]

        def on_token(req, token, lp, top):
            piece = decoder.add(token)
            text[0] += piece
            hit = [text[0].find(s) for s in stop if s and s in text[0]]
            loop.call_soon_threadsafe(events.put_nowait, (token, piece, lp, top, bool(hit)))
            return not hit

        req = Request(prompt, max_tokens, sampling, n_top, on_token,
                      lambda r: loop.call_soon_threadsafe(events.put_nowait, None))
        try:
            engine.submit(req)
        except QueueFull as e:
            return error(429, str(e), "rate_limit_error")
        except Draining as e:
            return error(503, str(e), "server_error")
        except UsageError as e:
            return error(400, str(e), param="max_tokens")
        rid, created = f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion" if is_chat else "text_completion"

        def by_text(top):  # OpenAI's completions key them by text: the likelier of two that decode alike
            out = {}
            for t, v in top:
                out.setdefault(tokenizer.decode([t]), v)
            return out

        def logprob_entry(token, lp, top):
            if is_chat:
                tops = [{"token": tokenizer.decode([t]), "logprob": v, "bytes": list(tokenizer.token_bytes(t))}
                        for t, v in top]
                return {"token": tokenizer.decode([token]), "logprob": lp,
                        "bytes": list(tokenizer.token_bytes(token)), "top_logprobs": tops}
            return {"tokens": [tokenizer.decode([token])], "token_logprobs": [lp],
                    "top_logprobs": [by_text(top)]}

        def choice(content, lps, finish):
            c = {"index": 0, "finish_reason": finish}
            if is_chat:
                c["message" if finish is not None and not stream else "delta"] = {"role": "assistant",
                                                                                  "content": content}
                c["logprobs"] = {"content": lps} if want_lp else None
            else:
                c["text"] = content
                c["logprobs"] = ({k: [v for e in lps for v in e[k]] for k in ("tokens", "token_logprobs",
                                                                                "top_logprobs")}
                                 if want_lp else None)
            return c

        def finish_reason():
            return "stop" if req.finish_reason in ("stop", "cancelled") else "length"

        stream = bool(body.get("stream"))

        async def pieces():
            while (ev := await events.get()) is not None:
                token, piece, lp, top, hit = ev
                if hit:
                    full = text[0]
                    cut = min(full.find(s) for s in stop if s and s in full)
                    piece = piece[:max(0, len(piece) - (len(full) - cut))]
                yield piece, logprob_entry(token, lp, top)

        if stream:
            async def sse():
                try:
                    async for piece, lp in pieces():
                        chunk = {"id": rid, "object": kind + ".chunk" if is_chat else kind, "created": created,
                                 "model": model_name, "choices": [choice(piece, [lp] if is_chat else [lp], None)]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    last = {"id": rid, "object": kind + ".chunk" if is_chat else kind, "created": created,
                            "model": model_name, "choices": [choice("", [], finish_reason())]}
                    yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"
                finally:
                    engine.cancel(req)   # a client gone mid-stream frees its slot; a no-op when done
            return StreamingResponse(sse(), media_type="text/event-stream")
        try:
            parts = [p async for p in pieces()]
        finally:
            engine.cancel(req)
        n = len(req.tokens)
        return JSONResponse({"id": rid, "object": kind, "created": created, "model": model_name,
                             "choices": [choice("".join(p for p, _ in parts), [e for _, e in parts],
                                                finish_reason())],
                             "usage": {"prompt_tokens": len(prompt), "completion_tokens": n,
                                       "total_tokens": len(prompt) + n}})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await handle(request, True)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await handle(request, False)

    return app
