"""The model core: config, ops, the Transformer, its weights and kernels, and the observer the forward pass reports to. Imports nothing of npllama but errors."""
