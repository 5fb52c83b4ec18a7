"""`npllama serve`: its parser and runner (cli.py calls add_parser)."""
from __future__ import annotations

import contextlib
import ipaddress
import socket
import sys
import threading

from ..errors import MissingDependencyError, TokenizerError, UsageError
from ..run.batching import Engine
from ..text.tokenizer import chat_format


def add_parser(sub, add_model_args, open_model) -> None:
    """The serve command; `open_model(args, max_batch_size=...)` is the CLI's model opener."""
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching",
                       description="Serve /v1/chat/completions, /v1/completions, /v1/models and /health for the "
                       "model given by -m (fixed at start). Needs the extra: pip install 'npllama[serve]'. With "
                       "--ray ADDRESS --stages N the layers run as N pipeline stages on a Ray cluster, with up to "
                       "N microbatches of the running requests in flight at once.")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; any other needs --api-key)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    s.add_argument("--slots", type=int, default=4, help="sequences decoded together (default 4)")
    s.add_argument("--queue", type=int, default=64, help="waiting requests beyond the slots before 429 (default 64)")
    s.add_argument("--microbatch-rows", type=int, default=1, metavar="N",
                   help="with --ray: split the decoding requests into microbatches of no fewer than N rows (default 1:"
                   " one microbatch per stage whatever their size; see README, Serving, for when more pays)")
    add_model_args(s)
    s.set_defaults(func=lambda a: run(a, open_model))


def check_host(host: str, api_key: str | None) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and api_key is None:
        raise UsageError(f"--host {host} is not loopback: give --api-key too")


def build(gen, slots_queue=(4, 64), api_key=None, name="npllama", microbatch_rows=1):
    """(app, engine, stop event, engine thread) for a Generator's model and tokenizer."""
    from .http import create_app   # FastAPI's, the optional extra: imported when serving
    engine = Engine(gen.model, gen.tokenizer.stop_ids, slots_queue[1], microbatch_rows=microbatch_rows)
    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop,), daemon=True, name="npllama-engine")
    thread.start()
    try:
        chat = chat_format(gen.tokenizer)
    except TokenizerError:
        chat = None   # a base model: /v1/chat/completions answers 400

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # After uvicorn's graceful shutdown has let in-flight requests finish (SIGTERM):
        engine.draining = True   # a late request gets 503
        stop.set()
        thread.join()
        if hasattr(gen.model, "close"):
            gen.model.close()    # a Pipeline's stages (Ray actors) go with the server

    app = create_app(engine, gen.tokenizer, chat, name, api_key, lifespan)
    app.state.engine_thread = thread
    return app, engine


def run(a, open_model) -> int:
    try:
        import uvicorn
        import fastapi  # noqa: F401
    except ImportError:
        raise MissingDependencyError("npllama serve needs FastAPI and uvicorn: pip install 'npllama[serve]'") from None
    check_host(a.host, a.api_key)
    if a.slots <= 0 or a.queue < 0 or a.microbatch_rows <= 0:
        raise UsageError("--slots and --microbatch-rows must be >= 1 and --queue >= 0")
    gen = open_model(a, max_batch_size=a.slots)
    app, _ = build(gen, (a.slots, a.queue), a.api_key, a.model or "SmolLM2-135M-Instruct", a.microbatch_rows)
    sock = socket.socket(socket.AF_INET6 if ":" in a.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((a.host, a.port))
    sock.listen(2048)   # connections queue from now on: a client that read the URL below is not refused
    print(f"npllama serve: http://{a.host}:{sock.getsockname()[1]}/v1", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0
