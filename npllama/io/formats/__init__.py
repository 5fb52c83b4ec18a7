"""Readers of the checkpoint formats npllama converts from (meta_pth, hf, gguf), each over
the one hardened reading layer (untrusted.py) and yielding a Source (source.py) whose
tensor shapes are checked against the params before any tensor data is read."""
