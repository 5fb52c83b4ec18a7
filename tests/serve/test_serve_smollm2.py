"""`npllama serve` as a process on the real default model (SmolLM2-135M-Instruct): the openai
client's chat, streamed and not, with logprobs, against npllama's Generator alone on the
checkpoint's chat template; SIGTERM lets an in-flight stream finish, then the server exits."""
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from npllama import hub
from npllama.cli.common import open_model
from npllama.text.tokenizer import chat_format
from oracles import ROOT

pytestmark = [pytest.mark.network, pytest.mark.slow]

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    hub.default_model()   # fetched/converted before the server needs it
    p = subprocess.Popen([sys.executable, "-m", "npllama", "serve", "--port", "0", "--slots", "2", "--ctx", "512"],
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
    line = ""
    timer = threading.Timer(300, p.kill)   # a server that never comes up fails the test, not the run
    timer.start()
    while "http://" not in line:
        line = p.stderr.readline()
        assert line or p.poll() is None, "server exited"
    timer.cancel()
    url = line.split()[-1]
    yield p, url
    if p.poll() is None:
        p.kill()
        p.wait(30)


def alone():
    class A:
        model, dtype, weights_mode, ray, stages, ctx, force_ctx = None, "float32", "auto", None, None, 512, False
    gen = open_model(A)
    prompt = chat_format(gen.tokenizer).encode_dialog_prompt(MESSAGES)
    return gen.tokenizer, gen.generate(prompt, 24, logprobs=True)


def test_chat_stream_and_logprobs_equal_generator_alone(server):
    _, url = server
    client = openai.OpenAI(base_url=url, api_key="none", timeout=300, max_retries=0)
    r = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=24, temperature=0,
                                       logprobs=True, top_logprobs=3)
    tok, ref = alone()
    text = tok.decode(ref.tokens)
    assert r.choices[0].message.content == text and "Paris" in text
    lps = r.choices[0].logprobs.content
    assert [bytes(e.bytes) for e in lps] == [tok.token_bytes(t) for t in ref.tokens]
    # 1e-4: float32 GEMM row against GEMV summation order (tests/serve/test_serve_engine.py)
    np.testing.assert_allclose([e.logprob for e in lps], ref.logprobs, atol=1e-4, rtol=0)
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in lps)
    chunks = list(client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=24, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_sigterm_drains_the_stream_in_flight(server):
    p, url = server
    client = openai.OpenAI(base_url=url, api_key="none", timeout=300, max_retries=0)
    stream = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=16, temperature=0, stream=True)
    first = next(iter(stream))
    p.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert first.choices[0].delta is not None and rest[-1].choices[0].finish_reason in ("stop", "length")
    # uvicorn re-raises the signal once it has shut down gracefully: exit by SIGTERM, after the drain
    assert p.wait(120) in (0, -signal.SIGTERM)
