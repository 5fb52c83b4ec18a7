"""Inspection: trace files and their comparison, golden files, plots, perplexity."""
