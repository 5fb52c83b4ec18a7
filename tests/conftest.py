import os

import pytest
from hypothesis import settings

from npllama.model import parallel

# CI runs the same examples every time (a red CI must be reproducible); local runs explore.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")



@pytest.fixture(autouse=True)
def fresh_thread_count():
    """A command run in-process sets the process-wide thread counts (-t, parallel.set_threads);
    later tests must see the process's own again: the BLAS thread count changes summation
    order, and tests compare bit for bit across processes."""
    yield
    parallel.set_threads(None)
