"""Benchmarks: ``python -m uba_fused.bench`` (step throughput) and ``python -m uba_fused.bench.train``."""
