"""Benchmark harness for the edge token verifier: ``python -m bench run --scenario jwt-cached`` or ``--all``.

See docs/BENCHMARKS.md for what is measured and why.
"""
