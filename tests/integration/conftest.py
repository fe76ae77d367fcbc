"""Fixtures for every integration test: the gateway rigs' shared ones (tests/integration/rigs.py)."""

from rigs import issuer, raw, redis_server, upstream  # noqa: F401 - fixtures, requested by name
