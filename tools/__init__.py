"""Scripts beside the package (run from the repository root): cross-checks, benchmarks,
exporters. `npllama bench --vs torch` runs tools.bench_torch by module name."""
