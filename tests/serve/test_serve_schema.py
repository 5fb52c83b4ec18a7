"""schemathesis against `npllama serve`'s own OpenAPI schema, in process, on a small random
model: no generated request may get a 5xx or an answer outside the schema; bounded examples."""
import contextlib

import pytest
from hypothesis import HealthCheck, settings

from npllama import Transformer
from npllama.run.generate import Generator
from npllama.serve.cli import build
from oracles import byte_tokenizer, random_weights, small_args

schemathesis = pytest.importorskip("schemathesis")
ARGS = small_args(dim=32, n_heads=2, n_kv_heads=1, vocab_size=260, max_seq_len=64)
APP, ENGINE = build(Generator(Transformer(ARGS, random_weights(ARGS, seed=1), max_batch_size=2), byte_tokenizer()),
                    (2, 4), None, "tiny")


@contextlib.asynccontextmanager
async def no_drain(app):
    yield


# schemathesis calls the app through a client that runs its shutdown after every call; the
# drain on shutdown (tested in test_serve_smollm2.py) would stop the engine after the first.
APP.router.lifespan_context = no_drain
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_api(case):
    # A schema-valid body may still be refused with a 400 (a prompt plus max_tokens beyond the
    # context, messages on a model without a chat template): not a failure here.
    from schemathesis.specs.openapi.checks import positive_data_acceptance
    case.call_and_validate(excluded_checks=[positive_data_acceptance])


def test_nothing_left_running():
    assert ENGINE.n_active() == 0
