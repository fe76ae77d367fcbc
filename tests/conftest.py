"""Fixtures shared by the unit tests; the helpers themselves live in tokenkit.py (importable by name)."""

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from rawprovider import http_fetcher, introspection_http, raw_provider  # noqa: F401
from tokenkit import clock, fetcher, jwks_document, keys, mint, settings  # noqa: F401

from verifier.decision import Decision
from verifier.reasons import ALLOW, CATALOGUE

# Property tests run on loaded 2-core CI machines: an example's wall time says nothing about correctness, and
# Hypothesis's default 200 ms deadline (or its too-slow health check) would turn a slow moment into a red run.
# Tests that set their own settings keep them; the rest inherit these.
hypothesis_settings.register_profile("verifier", deadline=None, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.load_profile("verifier")

# Every decision any test produces (in this process) must carry a catalogued reason: see test_reasons.py.
_uncatalogued: list[str] = []
_new = Decision.__new__


def _checked_new(cls: type[Decision], *args: Any, **kwargs: Any) -> Decision:
    decision = _new(cls, *args, **kwargs)
    if decision.reason != ALLOW and decision.reason not in CATALOGUE:
        _uncatalogued.append(decision.reason)
    return decision


Decision.__new__ = _checked_new  # type: ignore[assignment]


@pytest.fixture(autouse=True)
def _every_decision_reason_is_catalogued() -> Iterator[None]:
    _uncatalogued.clear()
    yield
    assert _uncatalogued == [], f"decisions with reasons outside verifier/reasons.py: {_uncatalogued}"
