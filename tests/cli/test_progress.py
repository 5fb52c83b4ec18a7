"""Progress of long work: a handful of lines in a log (not one per tensor or chunk), one
redrawn line on a terminal, and a long prefill that reports progress computes the logits it
would have computed without."""
import io

import numpy as np

from npllama import Transformer
from npllama.io import checkpoint
from npllama.progress import Progress
from npllama.run.generate import Generator
from oracles import byte_tokenizer, random_weights, small_args


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_a_line_every_few_seconds_not_one_per_step():
    clock, log = Clock(), io.StringIO()
    bar = Progress("convert", 1000, "steps", stream=log, every=5.0, clock=clock)
    for i in range(1, 1001):
        clock.t = i * 0.012                      # 12 s of work in 1000 steps
        bar.update(i, detail="layers.0.attention.wq.weight")
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 3                       # at 5 s, at 10 s, and the end
    assert lines[-1].startswith("convert: 1,000 / 1,000 steps") and "\r" not in log.getvalue()


def test_quick_work_in_a_log_is_silent_and_a_terminal_line_is_redrawn():
    log = io.StringIO()
    bar = Progress("prefill", 10, "tokens", stream=log, clock=Clock())
    bar.update(10)
    bar.close()
    assert log.getvalue() == ""
    clock, term = Clock(), Terminal()
    bar = Progress("prefill", 10, "tokens", stream=term, clock=clock)
    for i in range(1, 11):
        clock.t = i
        bar.update(i)
    bar.close()
    out = term.getvalue()
    assert out.count("\r") == 11 and out.endswith("\n") and out.count("\n") == 1


def test_detail_from_a_file_is_made_printable():
    clock, log = Clock(), io.StringIO()
    bar = Progress("convert", 2, "tensors", stream=log, clock=clock)
    clock.t = 10
    bar.update(1, detail="evil\x1b]0;title\x07\nnpllama: fake")
    assert "\x1b" not in log.getvalue() and "\x07" not in log.getvalue()
    assert log.getvalue().count("\n") == 1


def test_converting_many_tensors_into_a_log_prints_a_summary_not_a_line_each(tmp_path, capsys):
    args = small_args()
    weights = random_weights(args, seed=1)
    checkpoint.write_checkpoint(str(tmp_path / "ck"), args, iter(weights.items()),
                                sum(w.nbytes for w in weights.values()), len(weights))
    err = capsys.readouterr().err.splitlines()
    assert len(weights) > 10 and len(err) == 1 and err[0].startswith("convert: ")


def test_prefill_with_progress_gives_the_same_logits():
    args = small_args(vocab_size=260, max_seq_len=64)
    weights = random_weights(args, seed=3)
    prompt = np.random.default_rng(0).integers(0, 256, 37)
    quiet = Generator(Transformer(args, weights, prefill_chunk=8), byte_tokenizer())
    shown = Generator(Transformer(args, weights, prefill_chunk=8), byte_tokenizer(), progress=Terminal())
    # Both feed the same 8-token chunks through the same cache in the same order (forward
    # chunks a long prompt itself), so the logits are the same bits, not merely close.
    np.testing.assert_array_equal(quiet._prefill(prompt, 0), shown._prefill(prompt, 0))
    assert "prefill: 37 / 37 tokens" in shown.progress.getvalue()
