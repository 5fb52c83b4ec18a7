"""The mutation fuzzer (tools/fuzz.py) over every reader of untrusted files: hypothesis
draws the mutations, each batch runs in a worker under an address-space limit, and every
case must end in data that re-reads in bounds or in npllama's own error naming a file of
the case. CI (derandomized) runs 10 targets x 2 batches x 30 cases, ~30 s on 2 cores."""
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tools import fuzz

pytestmark = pytest.mark.slow

BATCH = 30
def plan(target):
    kinds = fuzz.TARGETS[target].kinds or fuzz.KINDS
    return st.lists(st.tuples(st.sampled_from(kinds), st.integers(0, 2**32 - 1)), min_size=1, max_size=3)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("seeds"))
    return {t: fuzz.write_seed(t, root) for t in fuzz.TARGETS}


def test_seeds_read_cleanly(seeds, tmp_path):
    # Unmutated, every seed must read without error: otherwise mutations test nothing.
    for target, seed in seeds.items():
        case = str(tmp_path / target / "case")
        fuzz.make_case(seed, case, [])
        (result,) = fuzz.run_batch(target, [case])
        assert result["outcome"] == "ok", (target, result)


@pytest.mark.parametrize("target", list(fuzz.TARGETS))
def test_readers_survive_mutations(target, seeds, tmp_path_factory):
    size = min(BATCH, fuzz.TARGETS[target].batch)

    @settings(max_examples=2, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(st.lists(plan(target), min_size=size, max_size=size))
    def run(plans):
        root = tmp_path_factory.mktemp(f"fuzz-{target}")
        cases = []
        for i, plan in enumerate(plans):
            cases.append(str(root / f"case-{i}"))
            fuzz.make_case(seeds[target], cases[-1], plan)
        results = fuzz.run_batch(target, cases, max(fuzz.BATCH_TIMEOUT, fuzz.CASE_SECONDS * len(cases)))
        bad = [(plans[r["i"]], r["message"], r.get("traceback", "")) for r in results
               if r["outcome"] not in ("ok", "error")]
        assert not bad, bad[0]
        assert len(results) == len(cases)
    run()


@pytest.mark.parametrize("canary,outcome,message", [
    ("canary-exception", "bug", "KeyError"),
    ("canary-crash", "crash", "signal 11"),
    ("canary-memory", "bug", "MemoryError"),        # the address-space limit, not the machine
    ("canary-hang", "crash", "hang"),
])
def test_fuzzer_catches_each_kind_of_failure(tmp_path, canary, outcome, message):
    (tmp_path / "case").mkdir()
    (result,) = fuzz.run_batch(canary, [str(tmp_path / "case")], timeout=5)
    assert result["outcome"] == outcome and message in result["message"]
