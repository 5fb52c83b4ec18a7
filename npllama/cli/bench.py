"""`npllama bench`: prefill and decode speed on random weights at real shapes (the runner is
npllama.bench.peers)."""
from __future__ import annotations

from ..bench import peers


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="prefill/decode speed on random weights at real shapes",
                       description="Build (once, cached) a random-weight bf16 checkpoint at a real shape and "
                       "report prefill tok/s for a 128-token prompt (pp128), decode tok/s over 32 tokens (tg32), "
                       "load time and peak RSS, with median and range over repetitions.")
    b.add_argument("--shape", default="tiny", choices=["tiny", "llama3.2-1b", "llama3.2-3b", "llama3-8b"])
    b.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    b.add_argument("--weights", choices=["auto", "resident", "tiled"], default="auto")
    b.add_argument("--reps", type=int, default=3)
    b.add_argument("--vs", action="append", metavar="PEER", help="also run PEER on the same weights: torch")
    b.add_argument("--llama-bench", metavar="PATH", help="also run llama.cpp's llama-bench program PATH on a GGUF "
                   "export of the same weights, its repetitions interleaved with npllama's")
    b.add_argument("--gguf-type", choices=["f32", "f16", "bf16", "q8_0"], help="the GGUF llama-bench runs on "
                   "(default: f32, or bf16 when npllama holds the weights tiled)")
    b.add_argument("--bound", action="store_true", help="measure bandwidth (every core streaming) and GEMM "
                   "rate; print the limits and each implementation's share")
    b.add_argument("--workdir", help="where the checkpoints are cached (default: the npllama cache /bench)")
    b.add_argument("--json", help="also write the results here")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=peers.main)
