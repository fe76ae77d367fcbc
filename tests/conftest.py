"""Fixtures shared by the unit tests; the helpers themselves live in tokenkit.py (importable by name)."""

from tokenkit import clock, fetcher, jwks_document, keys, mint, settings  # noqa: F401

