"""Benchmarks, run from the repository root: python -m bench.step, python -m bench.hellaswag, bash bench/gpu.sh."""
