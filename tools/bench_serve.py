"""Aggregate decode throughput and time to first token of `npllama serve` at 1, 4 and 16
concurrent openai clients (each streaming one chat answer per round).

    python tools/bench_serve.py [-m PATH] [--tokens 32] [--rounds 2]

Starts `npllama serve --slots 16` on a free loopback port and prints one table row per
concurrency: requests, generated tokens, wall seconds, tokens/s over all clients, p50 and
p99 TTFT.
"""
import argparse
import statistics
import subprocess
import sys
import threading
import time

# Answers longer than --tokens, so every request generates exactly that many.
PROMPTS = ["Write a short story about a robot who learns to paint.", "Explain in detail how a bicycle works.",
           "Describe the city of Paris to a visitor.", "Write a long poem about the sea."]


def start(model):
    cmd = [sys.executable, "-m", "npllama", "serve", "--port", "0", "--slots", "16", "--ctx", "512"]
    p = subprocess.Popen(cmd + (["-m", model] if model else []), stderr=subprocess.PIPE, text=True)
    line = ""
    while "http://" not in line:
        line = p.stderr.readline()
        if not line and p.poll() is not None:
            sys.exit("npllama serve exited")
    return p, line.split()[-1]


def one(client, i, n_tokens, out):
    t0 = time.perf_counter()
    ttft, n = None, 0
    stream = client.chat.completions.create(model="x", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                            max_tokens=n_tokens, temperature=0, stream=True)
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.choices and chunk.choices[0].finish_reason is None:
            n += 1   # one chunk per generated token
    out.append((ttft if ttft is not None else time.perf_counter() - t0, n))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    import openai
    p, url = start(a.model)
    try:
        client = openai.OpenAI(base_url=url, api_key="none", timeout=600, max_retries=0)
        one(client, 0, 4, [])   # warm up
        print("| clients | requests | tokens | seconds | tok/s | TTFT p50 s | TTFT p99 s |")
        print("|---|---|---|---|---|---|---|")
        for c in (1, 4, 16):
            out, t0 = [], time.perf_counter()
            for _ in range(a.rounds):
                threads = [threading.Thread(target=one, args=(client, i, a.tokens, out)) for i in range(c)]
                [t.start() for t in threads]
                [t.join() for t in threads]
            dt = time.perf_counter() - t0
            tokens = sum(n for _, n in out)
            ttfts = [t for t, _ in out]
            print(f"| {c} | {len(out)} | {tokens} | {dt:.1f} | {tokens / dt:.1f} | {statistics.median(ttfts):.2f} "
                  f"| {pct(ttfts, 0.99):.2f} |", flush=True)
    finally:
        p.terminate()
        p.wait(60)


if __name__ == "__main__":
    main()
