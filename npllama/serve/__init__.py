"""npllama serve: continuous batching (engine.py, numpy only). The HTTP layer is not here yet."""
