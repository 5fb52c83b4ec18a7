"""npllama serve over a real two-node Ray cluster started on this machine (`ray start --head`
and `ray start --address` on loopback, one CPU each, token authentication): the engine over
two stages, with microbatches in flight, gives each request the one-machine engine's tokens;
the HTTP server and the `npllama serve --ray` command answer over it; a stage killed
mid-request gives the requests in flight a 5xx / an error event in OpenAI's error shape, then
/health 503 and 503 for new requests, and nothing hangs."""
import os
import signal
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest

from npllama import Transformer
from npllama.io import checkpoint
from npllama.run import distributed
from npllama.run.batching import Engine, Request
from npllama.run.distributed import Pipeline
from npllama.run.generate import Generator, SamplingParams
from oracles import byte_tokenizer, random_weights, small_args, write_byte_model
from ray_cluster import two_node_cluster
from test_serve_engine import run_mix, watch_inflight
from test_serve_http import KEY, Server

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.ray, pytest.mark.slow]
ARGS = small_args(dim=64, n_heads=4, n_kv_heads=2, n_layers=4, vocab_size=260, max_seq_len=256)
TOK = byte_tokenizer()
# A GEMM over other rows than the one-machine engine's (other microbatches): float32
# summation order only, a few ulps of logits ~10 (tests/serve/test_serve_engine.py's bound).
TOL = 1e-4


@pytest.fixture(scope="module")
def cluster():
    import ray
    with two_node_cluster() as (address, env):
        distributed.connect(address)
        try:
            assert len([n for n in ray.nodes() if n["Alive"]]) == 2
            yield address, env
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A byte-tokenizer model whose stop tokens never win (their logits are 0): every request
    runs to its max_tokens, so a request is still running when a stage is killed."""
    tmp = tmp_path_factory.mktemp("m")
    tokenizer = os.path.join(write_byte_model(str(tmp / "b"), ARGS), "tokenizer.json")
    w = random_weights(ARGS, seed=7)
    w["output.weight"][256:] = 0.0
    path = str(tmp / "m")
    checkpoint.write_checkpoint(path, ARGS, iter(w.items()), 0, len(w), extra_files={"tokenizer.json": tokenizer},
                                quiet=True)
    return path


def counting(pipe):
    """Counts the microbatches in flight on pipe (all collected in the end)."""
    pipe.flying = 0
    submit, collect = pipe.submit_rows, pipe.collect

    def submit_rows(*a, **k):
        pipe.flying += 1
        return submit(*a, **k)

    def collected(handle):
        pipe.flying -= 1
        return collect(handle)
    pipe.submit_rows, pipe.collect = submit_rows, collected


def mix():
    rng = np.random.default_rng(3)
    return [(step, Request([256] + rng.integers(0, 256, n).tolist(), m,
                           SamplingParams(temperature=t, seed=i)))
            for i, (step, n, m, t) in enumerate([(0, 3, 12, 0.0), (0, 9, 7, 0.8), (0, 1, 15, 0.0), (0, 5, 10, 0.0),
                                                 (4, 6, 9, 0.8), (9, 2, 6, 0.0)])]


def test_engine_over_two_nodes_gives_the_one_machine_tokens(cluster, model):
    one, piped = mix(), mix()
    run_mix(Engine(Transformer(ARGS, checkpoint.open_tensors(model), max_seq_len=64, max_batch_size=4), []), one)
    with Pipeline(model, 2, max_seq_len=64, max_batch_size=4, timeout=120) as pipe:
        counting(pipe)
        engine = Engine(pipe, [])
        watch_inflight(engine)
        run_mix(engine, piped)
    for (_, a), (_, b) in zip(one, piped):
        assert b.tokens == a.tokens and len(b.tokens) == b.max_tokens
        np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=0, atol=TOL)
    # two decode microbatches were in the two stages at once, and prompt chunks too
    assert engine.most_decoding == 2 and engine.most_prefilling >= 2 and pipe.flying == 0


def test_cli_serves_over_the_cluster(cluster, model):
    address, env = cluster
    cmd = [sys.executable, "-m", "npllama", "serve", "-m", model, "--ray", address, "--stages", "2", "--port", "0",
           "--slots", "2", "--ctx", "64", "--api-key", KEY]
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or "http://" not in lines[-1]:
            lines.append(p.stderr.readline())
            assert lines[-1] or p.poll() is None, "".join(lines)
        client = openai.OpenAI(base_url=lines[-1].split()[-1], api_key=KEY, timeout=120, max_retries=0)
        answers = [client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
                   for prompt in ("Hi", "Hello")]
    finally:
        p.send_signal(signal.SIGTERM)             # drains, closes the pipeline, exits
        # uvicorn re-raises the signal after its graceful shutdown, to the handler ray.init
        # installed in the driver, which exits with status 15 (alone: killed by SIGTERM)
        assert p.wait(120) in (0, 15)
    assert "stage 0 (layers 0..1) on node" in "".join(lines) and "stage 1 (layers 2..3)" in "".join(lines)
    gen = Generator(Transformer(ARGS, checkpoint.open_tensors(model), max_seq_len=64), TOK)
    for prompt, text in zip(("Hi", "Hello"), answers):
        assert text == TOK.decode(gen.generate(TOK.encode(prompt, bos=True), 8).tokens)


def wait_for(condition, seconds=120):
    for _ in range(int(seconds / 0.05)):
        if condition():
            return True
        threading.Event().wait(0.05)
    return False


def test_a_stage_killed_mid_request_is_a_5xx_not_a_hang(cluster, model):
    pipe = Pipeline(model, 2, max_seq_len=256, max_batch_size=4)     # no timeout: a death is seen at once
    s = Server(Generator(pipe, TOK), slots=4, queue=4)
    h, answers = {"Authorization": f"Bearer {KEY}"}, []
    whole = threading.Thread(target=lambda: answers.append(httpx.post(
        s.url + "/v1/completions", json={"prompt": "a", "max_tokens": 250, "temperature": 0}, headers=h,
        timeout=120)))
    try:
        whole.start()
        assert wait_for(lambda: any(r.tokens for r in list(s.engine.active.values())))
        stream = s.client().completions.create(model="m", prompt="b", max_tokens=250, temperature=0, stream=True)
        first = next(iter(stream))
        os.kill(pipe.info[1]["pid"], signal.SIGKILL)
        with pytest.raises(openai.APIError, match=r"^the request failed: stage 1 \(layers 2\.\.3\) .* died"):
            for _ in stream:
                pass
        whole.join(120)
        health = httpx.get(s.url + "/health", timeout=30)
        after = httpx.post(s.url + "/v1/completions", json={"prompt": "c"}, headers=h, timeout=30)
    finally:
        s.close()                                 # also closes the pipeline
    assert first.choices[0].finish_reason is None and not whole.is_alive()
    assert answers[0].status_code == 500 and set(answers[0].json()["error"]) == {"message", "type", "param", "code"}
    assert "stage 1 (layers 2..3)" in answers[0].json()["error"]["message"]
    assert health.status_code == 503 and "died" in health.json()["error"]
    assert after.status_code == 503 and after.json()["error"]["type"] == "server_error"
    assert not s.engine.active and not s.engine.waiting
