"""npllama bench: npllama timed against its peers (llama.cpp, torch) on the same machine."""
