"""The introspection metrics, registered once per registry and shared by every issuer's introspector.

Labels are bounded: the issuer (configured), a fixed result vocabulary, the cache polarity. Never a
token or a subject.
"""

from __future__ import annotations

import weakref

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)  # tokens per dispatch

# Provider call results (the `result` label of verifier_introspection_calls_total).
RESULTS = (
    "ok",
    "timeout",
    "unreachable",
    "http_4xx",
    "throttled",
    "http_5xx",
    "malformed",
    "circuit_open",
    "queue_timeout",
)


class IntrospectionMetrics:
    """The collectors; use `for_registry` so several introspectors share one set per registry."""

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, IntrospectionMetrics] = weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "verifier_introspection_calls_total",
            "HTTP calls to an introspection provider by issuer and result.",
            ["issuer", "result"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "verifier_introspection_batch_size",
            "Distinct tokens per introspection dispatch.",
            ["issuer"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.coalesced = Counter(
            "verifier_introspection_coalesced_total",
            "Requests that waited on an introspection already in flight for the same token.",
            ["issuer"],
            registry=registry,
        )
        self.cache = Counter(
            "verifier_introspection_cache_total",
            "Introspection cache lookups by issuer, polarity (positive, negative, stale) and result.",
            ["issuer", "polarity", "result"],
            registry=registry,
        )
        self.breaker = Gauge(
            "verifier_introspection_breaker_state",
            "Circuit breaker state per issuer: 0 closed, 1 open, 2 half-open.",
            ["issuer"],
            registry=registry,
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> IntrospectionMetrics:
        """The one set of introspection collectors in `registry` (created on first use)."""
        metrics = cls._by_registry.get(registry)
        if metrics is None:
            metrics = cls._by_registry[registry] = cls(registry)
        return metrics


class IssuerIntrospectionMetrics:
    """The label children of one issuer, bound once up front (hot path: no label lookups)."""

    def __init__(self, metrics: IntrospectionMetrics, issuer: str) -> None:
        self.calls = {result: metrics.calls.labels(issuer, result) for result in RESULTS}
        self.batch_size = metrics.batch_size.labels(issuer)
        self.coalesced = metrics.coalesced.labels(issuer)
        self.positive_hit = metrics.cache.labels(issuer, "positive", "hit")
        self.negative_hit = metrics.cache.labels(issuer, "negative", "hit")
        self.stale_hit = metrics.cache.labels(issuer, "stale", "hit")
        self.miss = metrics.cache.labels(issuer, "any", "miss")
        self.breaker = metrics.breaker.labels(issuer)
