"""Aggregate decode throughput and time to first token of OpenAI-compatible servers at a
number of concurrent openai clients (each streaming one chat answer per round, greedy).

    python tools/bench_serve.py [-m PATH] [--clients 1,4,16] [--tokens 32] [--rounds 2] [--slots 4]
    python tools/bench_serve.py -m F32.gguf --llama-server /path/to/llama-server      # beside llama.cpp
    python tools/bench_serve.py --ray HOST:PORT --stages 1,2 --clients 1,2,4          # the Ray pipeline
    python tools/bench_serve.py --ray HOST:PORT --clients 8,16 --slots 16 --repeat 8  # long prompts

Every server is started first (on a free loopback port) and all run the same rounds: for each
concurrency, round by round, the servers take turns (their order alternates), so a noisy
machine slows them alike. `npllama serve --slots SLOTS -t THREADS` (with --ray: one server per
--stages count, each its own pipeline on the cluster) and, with --llama-server, `llama-server
-m GGUF -t THREADS -np SLOTS` on the same file. One table row per server and concurrency:
requests, generated tokens, wall seconds, tokens/s over all clients, p50 and p99 TTFT.
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

# Answers longer than --tokens, so every request generates that many (or close: a model may stop).
PROMPTS = ["Write a short story about a robot who learns to paint.", "Explain in detail how a bicycle works.",
           "Describe the city of Paris to a visitor.", "Write a long poem about the sea."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_npllama(model, slots, threads, ctx, ray=None, stages=None, rows=None):
    cmd = [sys.executable, "-m", "npllama", "serve", "--port", "0", "--slots", str(slots), "--ctx", str(ctx),
           "-t", str(threads)] + (["-m", model] if model else [])
    cmd += ["--ray", ray, "--stages", str(stages)] if ray else []
    cmd += ["--microbatch-rows", str(rows)] if rows else []
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    line = ""
    while "http://" not in line:
        line = p.stderr.readline()
        if not line and p.poll() is not None:
            sys.exit("npllama serve exited")
    threading.Thread(target=p.stderr.read, daemon=True).start()   # keep draining its stderr
    return p, line.split()[-1]


def start_llama(binary, gguf, slots, threads):
    import httpx
    port = free_port()
    p = subprocess.Popen([binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
                          "-np", str(slots)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1200):
        if p.poll() is not None:
            sys.exit("llama-server exited")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return p, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    sys.exit("llama-server did not start")


def prompt(i: int, repeat: int) -> str:
    """Client i's question; with repeat > 1 that many times over, numbered so that no two
    clients share more than the chat template's prefix (a prefill-bound load)."""
    text = PROMPTS[i % len(PROMPTS)]
    return text if repeat == 1 else f"{i}. " + " ".join([text] * repeat)


def one(client, i, n_tokens, out, repeat=1):
    """One streamed chat answer -> out gets (TTFT seconds, tokens generated)."""
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    stream = client.chat.completions.create(model="x", messages=[{"role": "user", "content": prompt(i, repeat)}],
                                            max_tokens=n_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if getattr(chunk, "usage", None) is not None:
            usage = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        if ttft is None and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.choices[0].finish_reason is None and chunk.choices[0].delta.content is not None:
            chunks += 1   # npllama: one chunk per generated token
    out.append((ttft if ttft is not None else time.perf_counter() - t0, usage if usage is not None else chunks))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def round_of(client, c, n_tokens, out, repeat=1) -> float:
    """c clients at once, one request each -> wall seconds."""
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(client, i, n_tokens, out, repeat)) for i in range(c)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return time.perf_counter() - t0


def row(name, c, out, per_round) -> str:
    """per_round: (tokens, seconds) of each round."""
    tokens, ttfts, seconds = sum(n for _, n in out), [t for t, _ in out], sum(t for _, t in per_round)
    rates = [n / t for n, t in per_round]
    return (f"| {name} | {c} | {len(out)} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} | "
            f"{statistics.median(rates):.1f} ({min(rates):.1f}–{max(rates):.1f}) | "
            f"{statistics.median(ttfts):.2f} | {pct(ttfts, 0.99):.2f} |")


def servers(a):
    """(name, process, url) of every server the arguments ask for, started."""
    if a.ray:
        return [(f"npllama --ray, {s} stage{'s' * (s > 1)}" + (f", microbatches >= {r} rows" if r and s > 1 else ""),
                 *start_npllama(a.model, a.slots, a.threads, a.ctx, a.ray, s, r))
                for s in a.stages for r in (a.microbatch_rows if s > 1 else [None])]
    started = [("npllama", *start_npllama(a.model, a.slots, a.threads, a.ctx))]
    if a.llama_server:
        started.append(("llama-server", *start_llama(a.llama_server, a.model, a.slots, a.threads)))
    return started


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", help="npllama's -m (with --llama-server: the .gguf both serve)")
    ap.add_argument("--llama-server", metavar="BIN", help="also llama.cpp's llama-server, on the same -m GGUF")
    ap.add_argument("--ray", metavar="ADDRESS", help="npllama serve --ray ADDRESS, once per --stages count")
    ap.add_argument("--stages", type=ints, default=[1, 2])
    ap.add_argument("--clients", type=ints, default=None, help="concurrencies (default 1,4,16; with --ray 1,2,4)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="each client's prompt this many times over, numbered "
                    "(default 1: the short prompts as they are)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--microbatch-rows", type=ints, default=[None], metavar="LIST",
                    help="with --ray: a server per value of npllama serve --microbatch-rows at each --stages > 1")
    ap.add_argument("--slots", type=int, default=4, help="sequences each server decodes together (default 4)")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ctx", type=int, default=512)
    a = ap.parse_args()
    if a.repeat < 1:
        sys.exit(f"--repeat must be >= 1, got {a.repeat}")
    if a.llama_server and not (a.model or "").endswith(".gguf"):
        sys.exit("--llama-server needs -m FILE.gguf (both servers serve that file)")
    import openai
    started = servers(a)
    try:
        bench(a, [(name, openai.OpenAI(base_url=url, api_key="none", timeout=1200, max_retries=0))
                  for name, _, url in started])
    finally:
        for _, p, _ in started:
            p.terminate()
            p.wait(60)


def bench(a, clients):
    for _, client in clients:
        one(client, 0, 4, [])   # warm up
    print(f"{a.tokens} tokens a request, {a.rounds} rounds, {a.slots} slots, {a.threads} threads"
          + (f", prompts {a.repeat} times over" if a.repeat > 1 else ""))
    print("| server | clients | requests | tokens | seconds | tok/s | tok/s a round: median (range) | TTFT p50 s | "
          "TTFT p99 s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in a.clients or ([1, 2, 4] if a.ray else [1, 4, 16]):
        results = {name: ([], []) for name, _ in clients}
        for r in range(a.rounds):
            for name, client in clients[::-1] if r % 2 else clients:   # alternate who goes first
                out, per_round = results[name]
                before = sum(n for _, n in out)
                seconds = round_of(client, c, a.tokens, out, a.repeat)
                per_round.append((sum(n for _, n in out) - before, seconds))
        for name, (out, per_round) in results.items():
            print(row(name, c, out, per_round), flush=True)


if __name__ == "__main__":
    main()
