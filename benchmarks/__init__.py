"""Benchmarks: `python -m benchmarks.NAME`; results are recorded in BENCHMARKS.md."""
