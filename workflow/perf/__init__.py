"""Benchmark commands: ``python -m workflow bench NAME`` measures speed against a baseline
measured in the same run and writes the figures into a section of BENCHMARKS.md."""
