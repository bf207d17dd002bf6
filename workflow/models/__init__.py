"""Networks trained by the benchmarks."""
