"""The `npllama` command line. Each command group is a module that adds its commands with
`add_parser(sub)` and runs them with a `cmd_*` function of the parsed arguments; what they
share (the model arguments and opener, token ids, sampling) is in common.py. Commands turn
arguments into library calls and print results: the checks live in the library, and an
npllama error becomes one line on stderr here."""
from __future__ import annotations

import argparse
import sys

from ..errors import NpllamaError
from ..serve import cli as serve
from ..version import __version__
from . import bench, convert, generate, inspect, memory
from .common import add_model_args, open_model

GROUPS = (convert, generate, inspect, memory, bench)   # in the order `npllama --help` lists them


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="npllama", description="Llama 3 in plain NumPy.")
    p.add_argument("--version", action="version", version=f"npllama {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parser(sub)
    serve.add_parser(sub, add_model_args, open_model)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except NpllamaError as e:  # anything else is a bug, and keeps its traceback
        print(f"npllama: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `npllama compare a b | head`
        sys.stderr.close()
        return 0
