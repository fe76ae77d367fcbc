"""Every Prometheus metric in one place (Envoy's jwt_authn stats pattern).

Labels are bounded: door, outcome, reason code, issuer (configured, so finite), delivery, event
short name, a fixed result vocabulary. Never a subject, a jti, a token or a path. Label children used
on the hot path are bound once, up front. No other module creates a metric:
tests/test_composition_root.py fails when one does.
"""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from verifier.config.state import Purpose

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
    "too_large",
    "circuit_open",
    "queue_timeout",
)


class _HotPath:
    """Decision counts, latencies, token-cache and signature-check counts kept as plain Python numbers.

    `prometheus_client` takes a lock on every `inc()`/`observe()` (~1 us each here); the hot path
    does four of them per request, a first-seen token one more. Every update happens on the event-loop
    thread, and so does the scrape (the metrics listener runs on the same loop), so plain dicts are
    exact and this collector exports them as ordinary Prometheus counters and histograms.
    """

    def __init__(self) -> None:
        self.decisions: dict[tuple[str, str, str], int] = {}
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self.cache: dict[tuple[str, str], int] = {}
        self.signatures: dict[tuple[str, str], int] = {}

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
        signatures = CounterMetricFamily(
            "verifier_signature_checks", "Signature verifications by algorithm and result.", labels=["alg", "result"]
        )
        for pair, count in sorted(self.signatures.items()):
            signatures.add_metric(list(pair), count)
        yield signatures


class _ReplayStore:
    """`verifier_replay_store_full_total{purpose}`: new one-time values the replay store refused because
    their purpose's part was full of live ones (503 `replay_store_full`). `purpose` is one of the three
    `Purpose` values (dpop, webauthn, revocation), each always exported, never a value a client chose.
    Read from the store's own counts at each scrape (they are bumped on the event loop's thread, as the
    scrape runs). With Redis the bound is every replica's together and each replica counts the refusals it
    answered."""

    def __init__(self) -> None:
        self.refused: Callable[[], Mapping[Purpose, int]] = lambda: {}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "verifier_replay_store_full",
            "New one-time values refused because the replay store's part for their purpose "
            "(dpop: DPoP proof jtis; webauthn: challenges; revocation: SET and logout-token jtis) was full.",
            labels=["purpose"],
        )
        refused = self.refused()
        for purpose in Purpose:
            family.add_metric([purpose.value], refused.get(purpose, 0))
        yield family


class _BucketStore:
    """`verifier_rate_limit_store_full_total{issuer}`: new identities' first requests refused because Redis held
    their `issuers[]` entry's share of `state.redis_max_buckets` rate-limit buckets (503 `state_unavailable`),
    counted by the replica that refused. `issuer` is a configured entry (a template as written, never a tenant
    or a `sub`), each always exported. Read from the store's own counts at each scrape; nothing with the local
    stores (they evict idle buckets instead)."""

    def __init__(self) -> None:
        self.refused: Callable[[], Mapping[str, int]] = lambda: {}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "verifier_rate_limit_store_full",
            "New identities refused because Redis held as many rate-limit buckets as their issuer entry's share "
            "of state.redis_max_buckets allows.",
            labels=["issuer"],
        )
        for issuer, count in sorted(self.refused().items()):
            family.add_metric([issuer], count)
        yield family


class Metrics:
    """The verifier's metrics, registered in a registry of its own (no global state)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._hot = _HotPath()
        for cache, result in (("positive", "hit"), ("positive", "miss"), ("negative", "hit")):
            self._hot.cache[(cache, result)] = 0
        r.register(self._hot)
        self._replay_store = _ReplayStore()
        r.register(self._replay_store)
        self._bucket_store = _BucketStore()
        r.register(self._bucket_store)
        # The plain counts the first-seen path adds to itself (`verifier.pipeline`): token-cache lookups by
        # (cache, result), signature checks by (alg, result).
        self.hot_cache = self._hot.cache
        self.hot_signatures = self._hot.signatures
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
        self.token_cache_entries = Gauge(
            "verifier_token_cache_entries",
            "Entries held by the verified-token (positive) and refused-token (negative) caches.",
            ["cache"],
            registry=r,
        )
        self.state_up = Gauge(
            "verifier_state_up",
            "1 when the shared state store answers a ping, else 0 (only with Redis configured).",
            ["backend"],
            registry=r,
        )

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

    def jwks_fetch(self, issuer: str, result: str) -> None:
        """Counts a JWKS fetch."""
        self.jwks_fetches.labels(issuer, result).inc()

    def jwks_keys(self, issuer: str, count: int) -> None:
        """Records how many keys an issuer has."""
        self.jwks_key_count.labels(issuer).set(count)

    def replay_store(self, refused_full: Callable[[], Mapping[Purpose, int]]) -> None:
        """Exports the replay store's counts, per purpose, of values refused because it was full."""
        self._replay_store.refused = refused_full

    def bucket_store(self, refused_full: Callable[[], Mapping[str, int]]) -> None:
        """Exports the counts, per issuer entry, of new rate-limit buckets refused because Redis held that entry's
        share of its bound."""
        self._bucket_store.refused = refused_full

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class RevocationMetrics:
    """SETs received/accepted/refused, events applied, requests refused, entries held."""

    def __init__(self, registry: CollectorRegistry, refusal_codes: Iterable[str] = ()) -> None:
        self.sets_received = Counter(
            "verifier_ssf_sets_received_total", "SETs received, by delivery.", ["delivery"], registry=registry
        )
        self.sets_accepted = Counter(
            "verifier_ssf_sets_accepted_total", "SETs accepted, by delivery.", ["delivery"], registry=registry
        )
        self.sets_refused = Counter(
            "verifier_ssf_sets_refused_total",
            "SETs refused, by delivery and RFC 8935 error code.",
            ["delivery", "err"],
            registry=registry,
        )
        self.subjects_ignored = Counter(
            "verifier_ssf_subjects_ignored_total",
            "Subjects in accepted SETs ignored because they belong to an issuer outside the transmitter's"
            " subjects_of, by transmitter.",
            ["transmitter"],
            registry=registry,
        )
        self.events = Counter(
            "verifier_ssf_events_total", "Events in accepted SETs, by event type.", ["event"], registry=registry
        )
        self.events_unhandled = Counter(
            "verifier_ssf_events_unhandled_total",
            "Events in accepted SETs acknowledged and not acted on, by event type (other: not a RISC/CAEP type).",
            ["event"],
            registry=registry,
        )
        self.refusals = Counter(
            "verifier_revocation_refusals_total",
            "Requests refused because of a revocation, by code.",
            ["code"],
            registry=registry,
        )
        self.entries = Gauge("verifier_revocation_entries", "Revocation entries held.", registry=registry)
        self.syncs = Counter(
            "verifier_revocation_sync_total", "Full reloads from the store, by result.", ["result"], registry=registry
        )
        self.in_sync = Gauge(
            "verifier_revocation_in_sync",
            "1 while the revocation entries here are known current; 0 while revocation-checked requests are refused"
            " with 503 (not loaded yet, the store unreadable, or the subscription to other replicas' changes lost).",
            registry=registry,
        )
        self.polls = Counter(
            "verifier_ssf_polls_total",
            "Poll requests to transmitters (RFC 8936), by transmitter and result (ok, error).",
            ["transmitter", "result"],
            registry=registry,
        )
        self.key_fetches = Counter(
            "verifier_ssf_jwks_fetch_total",
            "Transmitter key fetches, by transmitter and result.",
            ["transmitter", "result"],
            registry=registry,
        )
        self.logouts = Counter(
            "verifier_backchannel_logouts_total",
            "OpenID Connect back-channel logout requests, by issuer (or unknown) and result (accepted, or the"
            " refusal code).",
            ["issuer", "result"],
            registry=registry,
        )
        self.not_replicated = Counter(
            "verifier_revocation_not_replicated_total",
            "Revocation writes (SSF events, logouts, the kill switch) the Redis primary took but fewer than"
            " state.redis_revocation_replicas replicas confirmed: applied here, not acknowledged (503, retried).",
            registry=registry,
        )
        self._refusal_children = {code: self.refusals.labels(code) for code in refusal_codes}  # exported at 0

    def refusal(self, code: str) -> None:
        """Counts one request refused for revocation."""
        child = self._refusal_children.get(code)
        if child is None:
            child = self._refusal_children[code] = self.refusals.labels(code)
        child.inc()


class TransmitterKeyMetrics(Metrics):
    """What `IssuerKeys` reports about a transmitter's keys, counted among the revocation metrics.

    `IssuerKeys` only calls `jwks_fetch` and `jwks_keys`; the verifier's own metrics (which it would
    otherwise register a second time) are deliberately not created here.
    """

    def __init__(self, metrics: RevocationMetrics) -> None:  # no super().__init__: see the docstring
        self._revocation = metrics

    def jwks_fetch(self, issuer: str, result: str) -> None:
        """Counts a transmitter key fetch."""
        self._revocation.key_fetches.labels(issuer, result).inc()

    def jwks_keys(self, issuer: str, count: int) -> None:
        """Not exported for transmitters."""


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
        self.failed_batches = Counter(
            "verifier_introspection_failed_batches_total",
            "Batch calls of two tokens or more that failed, by handling: split (a failure one token may have caused, "
            "the provider up: asked again in halves, each token its own answer) or failed (every token with it).",
            ["issuer", "handling"],
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
        self.batch_split = metrics.failed_batches.labels(issuer, "split")
        self.batch_failed = metrics.failed_batches.labels(issuer, "failed")
        self.positive_hit = metrics.cache.labels(issuer, "positive", "hit")
        self.negative_hit = metrics.cache.labels(issuer, "negative", "hit")
        self.stale_hit = metrics.cache.labels(issuer, "stale", "hit")
        self.miss = metrics.cache.labels(issuer, "any", "miss")
        self.breaker = metrics.breaker.labels(issuer)


class WebAuthnMetrics:
    """Step-up assertions and registrations, by result (ok or a refusal code)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.assertions = Counter(
            "verifier_webauthn_assertions_total",
            "WebAuthn step-up checks by result (ok or a refusal code).",
            ["result"],
            registry=registry,
        )
        self.registrations = Counter(
            "verifier_webauthn_registrations_total",
            "WebAuthn registrations by result (ok or a refusal code).",
            ["result"],
            registry=registry,
        )
