"""I/O: the checkpoint formats npllama reads, its own checkpoint, conversion, the model hub and atomic writes."""
