"""npllama serve over HTTP, with clients nobody here wrote: the openai package and curl, on a
small random model (completions) and the real default model (chat), on 127.0.0.1 at a port
the OS picks."""
import json
import shutil
import socket
import subprocess
import threading

import httpx
import numpy as np
import pytest

from npllama import Transformer
from npllama.run.generate import Generator, SamplingParams
from npllama.serve.cli import build, check_host
from oracles import byte_tokenizer, random_weights, small_args

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
ARGS = small_args(dim=64, n_heads=4, n_kv_heads=2, vocab_size=260, max_seq_len=64)
TOK = byte_tokenizer()
KEY = "test-key"


class Server:
    def __init__(self, gen, slots=4, queue=8, api_key=KEY):
        self.app, self.engine = build(gen, (slots, queue), api_key, "tiny")
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            threading.Event().wait(0.05)

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, timeout=60, max_retries=0)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def weights():
    w = random_weights(ARGS, seed=5)
    w["output.weight"][256:] = 0.0
    return w


@pytest.fixture(scope="module")
def tiny(weights):
    s = Server(Generator(Transformer(ARGS, weights, max_batch_size=4), TOK))
    yield s
    s.close()


def alone(weights, prompt, n, seed=None, temperature=0.0):
    g = Generator(Transformer(ARGS, weights), TOK)
    return g.generate(prompt, n, SamplingParams(temperature=temperature, seed=seed), logprobs=True)


def test_completion_equals_generator_alone_with_logprobs(tiny, weights):
    r = tiny.client().completions.create(model="tiny", prompt="Once", max_tokens=10, temperature=0, logprobs=2)
    ref = alone(weights, TOK.encode("Once", bos=TOK.add_bos), 10)
    assert r.choices[0].text == TOK.decode(ref.tokens) and r.usage.completion_tokens == 10
    # 1e-4: a GEMM row against a GEMV, float32 summation order (tests/serve/test_serve_engine.py)
    np.testing.assert_allclose(r.choices[0].logprobs.token_logprobs, ref.logprobs, atol=1e-4, rtol=0)
    # OpenAI's shape keys them by text: two byte tokens that decode to U+FFFD share a key
    assert all(1 <= len(t) <= 2 and max(t.values()) >= lp - 1e-6
               for t, lp in zip(r.choices[0].logprobs.top_logprobs, ref.logprobs))


def test_streaming_concatenates_to_the_same_text(tiny, weights):
    stream = tiny.client().completions.create(model="tiny", prompt="Once", max_tokens=10, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == TOK.decode(alone(weights, TOK.encode("Once", bos=TOK.add_bos), 10).tokens)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10     # include_usage's last chunk
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_string_cuts_the_text_streamed_or_not(tiny, weights):
    full = TOK.decode(alone(weights, TOK.encode("Once", bos=TOK.add_bos), 20).tokens)
    stop = full[5:7]
    expected = full[:full.find(stop)]
    client = tiny.client()
    r = client.completions.create(model="tiny", prompt="Once", max_tokens=20, temperature=0, stop=[stop])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once", max_tokens=20, temperature=0, stop=stop, stream=True))
    assert r.choices[0].text == streamed == expected and r.choices[0].finish_reason == "stop"


def test_concurrent_clients_get_their_tokens_alone(tiny, weights):
    out = {}

    def ask(i):
        r = tiny.client().completions.create(model="tiny", prompt="ab"[: 1 + i % 2] * (i + 1), max_tokens=8,
                                             temperature=0.8, seed=i)
        out[i] = r.choices[0].text
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    for i in range(6):
        ref = alone(weights, TOK.encode("ab"[: 1 + i % 2] * (i + 1), bos=TOK.add_bos), 8, seed=i, temperature=0.8)
        assert out[i] == TOK.decode(ref.tokens)


def test_errors_in_openai_shape(tiny):
    h = {"Authorization": f"Bearer {KEY}"}
    cases = [(httpx.post(tiny.url + "/v1/completions", content=b"{not json", headers=h), 400),
             (httpx.post(tiny.url + "/v1/completions", json={"prompt": "x" * 100}, headers=h), 400),  # > context
             (httpx.post(tiny.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1000}, headers=h), 400),
             (httpx.post(tiny.url + "/v1/chat/completions", json={"messages": []}, headers=h), 400),
             (httpx.post(tiny.url + "/v1/completions", json={"prompt": "x"}), 401),
             (httpx.get(tiny.url + "/v1/nothing", headers=h), 404),
             (httpx.post(tiny.url + "/v1/completions", content=b" " * (2 << 20), headers=h), 413)]
    # wrong JSON types (true is no number) and a negative seed: 400, not a 500 or a default
    cases += [(httpx.post(tiny.url + "/v1/completions", json={"prompt": "x", **bad}, headers=h), 400)
              for bad in ({"seed": -1}, {"temperature": True}, {"max_tokens": [3]}, {"stream": 0}, {"stop": [1]},
                          {"prompt": [1, "a"]}, {"stream_options": []})]
    for r, status in cases:
        assert r.status_code == status, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(tiny.url + "/v1/models", headers=h).json()["data"][0]["id"] == "tiny"
    none = httpx.post(tiny.url + "/v1/completions", json={"prompt": "x", "max_tokens": 0, "top_p": None}, headers=h)
    assert none.json()["usage"]["completion_tokens"] == 0      # 0 is 0 tokens, not the whole context


def test_disconnect_mid_stream_frees_the_slot(tiny):
    with httpx.stream("POST", tiny.url + "/v1/completions", json={"prompt": "a", "max_tokens": 60, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        next(r.iter_lines())
    for _ in range(400):   # the engine sees the cancel within a few steps
        if tiny.engine.n_active() == 0:
            break
        threading.Event().wait(0.05)
    assert tiny.engine.n_active() == 0 and not tiny.engine.active


def test_queue_full_is_429_and_draining_503(weights):
    from npllama.run.batching import Request
    s = Server(Generator(Transformer(ARGS, weights, max_batch_size=1), TOK), slots=1, queue=0)
    h = {"Authorization": f"Bearer {KEY}"}
    step = s.engine.step
    s.engine.step = lambda: False                 # the engine thread idles: what is submitted stays
    held = s.engine.submit(Request([256, 1], 3))  # the one slot's worth, no queue beyond it
    try:
        full = httpx.post(s.url + "/v1/completions", json={"prompt": "a"}, headers=h, timeout=30)
        s.engine.cancel(held)
        s.engine.step = step
        while s.engine.n_active():
            threading.Event().wait(0.05)
        s.engine.draining = True
        draining = httpx.post(s.url + "/v1/completions", json={"prompt": "a"}, headers=h, timeout=30)
    finally:
        s.close()
    assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_error"
    assert draining.status_code == 503


def test_non_loopback_host_needs_a_key():
    from npllama.errors import UsageError
    check_host("127.0.0.1", None)
    check_host("::1", None)
    with pytest.raises(UsageError):
        check_host("0.0.0.0", None)
    check_host("0.0.0.0", "k")


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl(tiny):
    out = subprocess.run(["curl", "-s", "--max-time", "60", tiny.url + "/v1/completions", "-H",
                          f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json", "-d",
                          json.dumps({"prompt": "Hi", "max_tokens": 3, "temperature": 0})],
                         capture_output=True, text=True, timeout=90)
    assert json.loads(out.stdout)["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_before_the_answer_frees_the_slot(weights, stream):
    """A client that gives up while its request waits (a whole answer, or a stream's first
    token): the request ends "cancelled" without running."""
    s = Server(Generator(Transformer(ARGS, weights, max_batch_size=1), TOK), slots=1)
    finished, step = [], s.engine.step
    finish = s.engine._finish
    s.engine._finish = lambda req, reason: (finished.append(reason), finish(req, reason))[1]
    s.engine.step = lambda: False                  # the engine idles: the request waits for it
    try:
        with pytest.raises(httpx.ReadTimeout):     # the client gives up and closes the connection
            httpx.post(s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 20, "stream": stream},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=httpx.Timeout(30, read=0.5))
        for _ in range(200):                       # the server sees the disconnect
            if any(r.cancelled for r in s.engine.waiting):
                break
            threading.Event().wait(0.05)
        s.engine.step = step
        for _ in range(400):
            if finished:
                break
            threading.Event().wait(0.05)
    finally:
        s.close()
    assert finished == ["cancelled"] and s.engine.n_active() == 0 and not s.engine.active
