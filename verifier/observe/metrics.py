"""Every Prometheus metric in one place (Envoy's jwt_authn stats pattern).

Labels are bounded: door, outcome, reason code, issuer (configured, so finite). Never a subject, a
token or a path. Label children used on the hot path are bound once, up front.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)  # seconds: the interesting range is tens of microseconds to a provider round trip


class _HotPath:
    """Decision counts, latencies and token-cache counts kept as plain Python numbers.

    `prometheus_client` takes a lock on every `inc()`/`observe()` (~1 us each here); the hot path
    does four of them per request. Every update happens on the event-loop thread, and so does the
    scrape (the metrics listener runs on the same loop), so plain dicts are exact and this collector
    exports them as ordinary Prometheus counters and histograms.
    """

    def __init__(self) -> None:
        self.decisions: dict[tuple[str, str, str], int] = {}
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self.cache: dict[tuple[str, str], int] = {}

    def collect(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily(
            "verifier_decisions",
            "Decisions by front door, outcome and reason code.",
            labels=["door", "outcome", "reason"],
        )
        for labels, count in sorted(self.decisions.items()):
            decisions.add_metric(list(labels), count)
        yield decisions
        latency = HistogramMetricFamily(
            "verifier_check_duration_seconds", "Time to decide, per front door.", labels=["door"]
        )
        for door, counts in sorted(self.buckets.items()):
            cumulative, running = [], 0
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                running += count
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
            latency.add_metric([door], cumulative, self.sums[door])
        yield latency
        cache = CounterMetricFamily(
            "verifier_token_cache", "Token cache lookups by cache and result.", labels=["cache", "result"]
        )
        for pair, count in sorted(self.cache.items()):
            cache.add_metric(list(pair), count)
        yield cache


class Metrics:
    """The verifier's metrics, registered in a registry of its own (no global state)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._hot = _HotPath()
        for cache, result in (("positive", "hit"), ("positive", "miss"), ("negative", "hit")):
            self._hot.cache[(cache, result)] = 0
        r.register(self._hot)
        self.jwks_fetches = Counter(
            "verifier_jwks_fetch_total",
            "JWKS fetches by issuer and result.",
            ["issuer", "result"],
            registry=r,
        )
        self.jwks_key_count = Gauge(
            "verifier_jwks_keys",
            "Usable keys held per issuer.",
            ["issuer"],
            registry=r,
        )
        self.jwks_key_age = Gauge(
            "verifier_jwks_key_age_seconds",
            "Seconds since the issuer's keys were fetched.",
            ["issuer"],
            registry=r,
        )
        self.jwks_refresh_interval = Gauge(
            "verifier_jwks_refresh_interval_seconds",
            "Seconds between key refreshes in use per issuer (the provider's Cache-Control max-age, clamped).",
            ["issuer"],
            registry=r,
        )
        self.state_up = Gauge(
            "verifier_state_up",
            "1 when the shared state store answers a ping, else 0 (only with Redis configured).",
            ["backend"],
            registry=r,
        )
        self.signature_checks = Counter(
            "verifier_signature_checks_total",
            "Signature verifications by algorithm and result.",
            ["alg", "result"],
            registry=r,
        )
        self._signature_children: dict[tuple[str, str], Counter] = {}

    def decision(self, door: str, outcome: str, reason: str, seconds: float) -> None:
        """Counts one decision and observes its latency."""
        hot = self._hot
        key = (door, outcome, reason)
        hot.decisions[key] = hot.decisions.get(key, 0) + 1
        counts = hot.buckets.get(door)
        if counts is None:
            counts = hot.buckets[door] = [0] * (len(LATENCY_BUCKETS) + 1)
            hot.sums[door] = 0.0
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        hot.sums[door] += seconds

    def cache_lookup(self, cache: str, result: str) -> None:
        """Counts a token-cache lookup (positive/negative, hit/miss)."""
        key = (cache, result)
        self._hot.cache[key] = self._hot.cache.get(key, 0) + 1

    def cache_count(self, cache: str, result: str) -> int:
        """How many lookups of this kind were counted."""
        return self._hot.cache.get((cache, result), 0)

    def decision_count(self, door: str, outcome: str | None = None) -> int:
        """Decisions counted at a door (optionally of one outcome)."""
        return sum(n for (d, o, _), n in self._hot.decisions.items() if d == door and outcome in (None, o))

    def signature_check(self, alg: str, result: str) -> None:
        """Counts a signature verification (label children bound once)."""
        key = (alg, result)
        child = self._signature_children.get(key)
        if child is None:
            child = self._signature_children[key] = self.signature_checks.labels(alg, result)
        child.inc()

    def jwks_fetch(self, issuer: str, result: str) -> None:
        """Counts a JWKS fetch."""
        self.jwks_fetches.labels(issuer, result).inc()

    def jwks_keys(self, issuer: str, count: int) -> None:
        """Records how many keys an issuer has."""
        self.jwks_key_count.labels(issuer).set(count)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
