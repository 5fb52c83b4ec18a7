#!/usr/bin/env python3
"""Convert a Meta (.pth), HF (safetensors) or GGUF checkpoint: same as `npllama convert`."""
import sys

from npllama.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
