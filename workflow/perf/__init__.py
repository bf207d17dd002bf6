"""Speed measurements: `python -m workflow perf NAME` times this project against a baseline in
the same run and writes one section of BENCHMARKS.md (see ``workflow.cli.PERF``)."""
