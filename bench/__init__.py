"""Benchmarks and reliability soaks for Yoi (``python -m bench``, ``python -m bench.soak``)."""
