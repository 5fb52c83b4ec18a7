#!/usr/bin/env python3
"""Speed benchmark: the same as `npllama bench` (see --help)."""
import sys

from npllama.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
