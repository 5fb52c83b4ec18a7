import os
import sys

# tests/oracles.py holds the independent implementations the tests compare against.
sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import settings  # noqa: E402

# CI runs the same examples every time (a red CI must be reproducible); local runs explore.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
