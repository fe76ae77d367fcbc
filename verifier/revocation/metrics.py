"""The revocation metrics, in the registry the composition root hands over.

Labels stay bounded: delivery (push, poll), RFC 8935 error code, event short name, refusal code,
configured transmitter issuer. Never a subject or a jti.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from verifier.observe.metrics import Metrics
from verifier.revocation.entry import Effect


class RevocationMetrics:
    """SETs received/accepted/refused, events applied, requests refused, entries held."""

    def __init__(self, registry: CollectorRegistry) -> None:
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
        self._refusal_children = {
            e.value: self.refusals.labels(e.value) for e in Effect if e is not Effect.CLAIMS_OVERRIDE
        }

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
