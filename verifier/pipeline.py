"""request attributes -> credential -> verifier -> principal -> (policy) -> decision.

Data flows one way. Metrics and audit observe the decision; nothing flows back from them. A token
seen before costs one SHA-256 and one dict probe (`decide_cached`); only a first-seen token goes to
the verifier, which may await the key store.
"""

from __future__ import annotations

import logging
import time

from verifier import credentials
from verifier.clock import Clock
from verifier.decision import Decision, allow, refuse
from verifier.errors import AudienceMismatch, InternalError, InvalidToken, UnknownKey, VerifierError
from verifier.observe import audit
from verifier.observe.metrics import Metrics
from verifier.principal import Principal
from verifier.request import RequestAttributes
from verifier.settings import SUPPORTED_ALGORITHMS
from verifier.tokens.cache import ExpiringCache
from verifier.tokens.jwt import JwtVerifier

log = logging.getLogger("verifier.pipeline")


def _negative_cacheable(error: VerifierError) -> bool:
    # A refusal that no later key fetch can turn into an allow. An unknown kid may become known
    # after a rotation, so it is never remembered.
    return isinstance(error, InvalidToken | AudienceMismatch) and not isinstance(error, UnknownKey)


class Pipeline:
    """Decides one request."""

    def __init__(
        self,
        *,
        jwt: JwtVerifier,
        positive: ExpiringCache[tuple[Principal, Decision]],
        negative: ExpiringCache[Decision],
        clock: Clock,
        metrics: Metrics,
        realm: str,
        negative_ttl: float,
        audit_enabled: bool = True,
    ) -> None:
        self._jwt = jwt
        self._positive = positive
        self._negative = negative
        self._clock = clock
        self._metrics = metrics
        self._realm = realm
        self._negative_ttl = negative_ttl
        self._audit = audit_enabled

    def decide_cached(self, attrs: RequestAttributes) -> Decision | None:
        """The answer without any I/O, or None when the token must be verified."""
        try:
            credential = credentials.extract(attrs)
        except VerifierError as exc:
            return refuse(exc, realm=self._realm)
        key = audit.token_hash(credential.token)
        hit = self._positive.get(key)
        if hit is not None:
            self._metrics.positive_hit.inc()
            return hit[1]
        refused = self._negative.get(key)
        if refused is not None:
            self._metrics.negative_hit.inc()
            return refused
        return None

    async def decide(self, attrs: RequestAttributes, door: str) -> Decision:
        """The full decision; never raises."""
        try:
            cached = self.decide_cached(attrs)
            if cached is not None:
                return cached
            return await self._verify(attrs, door)
        except Exception:  # fail closed on bugs; the traceback has no token in it
            log.exception("internal error while deciding", extra={"event": "internal_error", "route": attrs.route})
            return refuse(InternalError("internal error"), realm=self._realm)

    async def _verify(self, attrs: RequestAttributes, door: str) -> Decision:
        credential = credentials.extract(attrs)
        key = audit.token_hash(credential.token)
        self._metrics.positive_miss.inc()
        started = time.perf_counter()
        kid: str | None = None
        alg = ""
        issuer = ""
        try:
            parsed = self._jwt.parse(credential.token)
            kid, alg = parsed.kid, parsed.alg
            iss = parsed.payload.get("iss")
            issuer = iss if isinstance(iss, str) else ""
            principal = await self._jwt.verify(parsed)
        except VerifierError as exc:
            decision = refuse(exc, realm=self._realm)
            if _negative_cacheable(exc):
                self._negative.put(key, decision, self._clock.now() + self._negative_ttl)
            self._record(attrs, door, decision, started, key, issuer, kid, alg, "")
            return decision
        decision = allow(principal)
        self._positive.put(key, (principal, decision), principal.expires_at)
        self._record(attrs, door, decision, started, key, issuer, kid, alg, principal.subject)
        return decision

    def _record(
        self,
        attrs: RequestAttributes,
        door: str,
        decision: Decision,
        started: float,
        key: bytes,
        issuer: str,
        kid: str | None,
        alg: str,
        subject: str,
    ) -> None:
        if alg:
            label = alg if alg in SUPPORTED_ALGORITHMS else "other"  # header values are attacker-chosen
            self._metrics.signature_checks.labels(label, "ok" if decision.allowed else decision.reason).inc()
        if self._audit:
            audit.signature_check(
                issuer=issuer,
                kid=kid,
                alg=alg,
                subject=subject,
                route=attrs.route,
                decision=decision.outcome,
                reason=decision.reason,
                latency_seconds=time.perf_counter() - started,
                token_hash_=key,
                door=door,
            )
