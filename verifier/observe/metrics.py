"""Every Prometheus metric in one place (Envoy's jwt_authn stats pattern).

Labels are bounded: door, outcome, reason code, issuer (configured, so finite). Never a subject, a
token or a path. Label children used on the hot path are bound once, up front.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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


class Metrics:
    """The verifier's metrics, registered in a registry of its own (no global state)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "verifier_decisions_total",
            "Decisions by front door, outcome and reason code.",
            ["door", "outcome", "reason"],
            registry=r,
        )
        self.latency = Histogram(
            "verifier_check_duration_seconds",
            "Time to decide, per front door.",
            ["door"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache = Counter(
            "verifier_token_cache_total",
            "Token cache lookups by cache and result.",
            ["cache", "result"],
            registry=r,
        )
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
        self.signature_checks = Counter(
            "verifier_signature_checks_total",
            "Signature verifications by algorithm and result.",
            ["alg", "result"],
            registry=r,
        )
        self._decision_children: dict[tuple[str, str, str], Counter] = {}
        self._latency_children: dict[str, Histogram] = {}
        self.positive_hit = self.cache.labels("positive", "hit")
        self.positive_miss = self.cache.labels("positive", "miss")
        self.negative_hit = self.cache.labels("negative", "hit")

    def decision(self, door: str, outcome: str, reason: str, seconds: float) -> None:
        """Counts one decision and observes its latency."""
        key = (door, outcome, reason)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(door, outcome, reason)
        child.inc()
        hist = self._latency_children.get(door)
        if hist is None:
            hist = self._latency_children[door] = self.latency.labels(door)
        hist.observe(seconds)

    def jwks_fetch(self, issuer: str, result: str) -> None:
        """Counts a JWKS fetch."""
        self.jwks_fetches.labels(issuer, result).inc()

    def jwks_keys(self, issuer: str, count: int) -> None:
        """Records how many keys an issuer has."""
        self.jwks_key_count.labels(issuer).set(count)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
