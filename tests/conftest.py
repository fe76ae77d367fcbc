"""Fixtures shared by the unit tests; the helpers themselves live in tokenkit.py (importable by name)."""

from rawprovider import http_fetcher, raw_provider  # noqa: F401
from tokenkit import clock, fetcher, jwks_document, keys, mint, settings  # noqa: F401

