"""request attributes -> credential -> verifier -> principal -> policy -> decision.

Data flows one way. Metrics and audit observe the decision; nothing flows back from them.

A token seen before costs one SHA-256, one dict probe and the policy check (`decide_cached`); only
a first-seen token, a sender-constrained token (its DPoP proof is per request), a rate-limited
identity or an opaque token goes through the asynchronous path (`decide`), which may reach the key
store, the introspection client or the shared state it was handed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from verifier import credentials
from verifier.binding.mtls import check_certificate_binding
from verifier.clock import Clock
from verifier.credentials import Credential, TokenScheme
from verifier.decision import Decision, allow, refuse
from verifier.errors import (
    AudienceMismatch,
    Forbidden,
    InternalError,
    InvalidDpopProof,
    InvalidToken,
    MissingToken,
    Overloaded,
    ProviderUnavailable,
    Scheme,
    SenderConstraintFailed,
    UnknownKey,
    VerifierError,
)
from verifier.observe import audit
from verifier.observe.metrics import Metrics
from verifier.policy.ratelimit import RateLimiter
from verifier.policy.roles import RoleMapper
from verifier.policy.rules import CompiledPolicy, PolicySet, auth_time_left, evaluate
from verifier.principal import Principal, roles_of, scopes_of
from verifier.request import RequestAttributes
from verifier.settings import SUPPORTED_ALGORITHMS
from verifier.tokens import jws
from verifier.tokens.cache import ExpiringCache
from verifier.tokens.jwt import JwtVerifier

log = logging.getLogger("verifier.pipeline")

ANONYMOUS = Decision(allowed=True, status=200, reason="anonymous")


class ProofVerifier(Protocol):
    """RFC 9449 DPoP proof verification (verifier.binding.dpop.DpopVerifier)."""

    async def verify(
        self, proof: str | None, *, method: str, url: str, access_token: str, expected_jkt: str | None
    ) -> str:
        """Returns the proof key's thumbprint or raises InvalidDpopProof / UseDpopNonce."""
        ...


class RevocationCheck(Protocol):
    """Revocation entries, checked on every decision (verifier.revocation.Revocations)."""

    def check(self, principal: Principal) -> VerifierError | None:
        """The refusal for a revoked token, or None."""
        ...

    def overrides(self, principal: Principal) -> Mapping[str, Any] | None:
        """Claims announced since the token was issued (CAEP assurance/claims changes), or None."""
        ...


class StepUp(Protocol):
    """Request-bound WebAuthn assertions (verifier.webauthn.WebAuthnService)."""

    async def check_step_up(self, principal: Principal, attrs: RequestAttributes) -> None:
        """Returns when the request carries a valid assertion; raises a WebAuthn challenge otherwise."""
        ...


class Introspector(Protocol):
    """RFC 7662 introspection for one issuer (verifier.tokens.introspection.Introspector)."""

    async def introspect(self, token: str, token_hash: bytes) -> Principal:
        """The principal of an active token, or raises."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """What the request needs, worked out once before any token is looked at."""

    policy: CompiledPolicy | None
    dpop_route: bool  # the route's policy requires DPoP: challenges name DPoP
    step_up: bool = False  # the route requires a request-bound WebAuthn assertion


NO_POLICY = Route(None, False)

# An observer of the steps of one decision (`verifier explain`): (step, details). The service sets none.
Tracer = Callable[[str, Mapping[str, Any]], None]
MAX_MEMOIZED_REFUSALS = 512  # distinct static refusals kept pre-built (descriptions can echo header values)


def _negative_cacheable(error: VerifierError) -> bool:
    # A refusal that no later key fetch can turn into an allow. An unknown kid may become known
    # after a rotation, so it is never remembered.
    return isinstance(error, InvalidToken | AudienceMismatch) and not isinstance(error, UnknownKey)


def _cnf(principal: Principal) -> Mapping[str, Any]:
    cnf = principal.claims.get("cnf")
    return cnf if isinstance(cnf, dict) else {}


class Pipeline:
    """Decides one request."""

    def __init__(
        self,
        *,
        jwt: JwtVerifier,
        positive: ExpiringCache[tuple[Principal, Decision, Credential, bool]],
        negative: ExpiringCache[Decision],
        clock: Clock,
        metrics: Metrics,
        realm: str,
        negative_ttl: float,
        audit_enabled: bool = True,
        policies: PolicySet | None = None,
        role_mappers: Mapping[str, RoleMapper] | None = None,
        dpop: ProofVerifier | None = None,
        dpop_algs: tuple[str, ...] = (),
        rate_limiter: RateLimiter | None = None,
        introspectors: Mapping[str, Introspector] | None = None,
        opaque_issuer: str | None = None,  # the issuer whose introspector takes opaque tokens
        introspect_jwts: frozenset[str] = frozenset(),
        authorization_endpoint: Callable[[str], str] | None = None,
        max_pending: int = 1024,
        deadline: float | None = None,
        edge_max_age: int = 0,
        refusal_max_age: int = 0,
        revocations: RevocationCheck | None = None,
        step_up: StepUp | None = None,
        on_revoked: Callable[[str], None] | None = None,
    ) -> None:
        self._jwt = jwt
        self._positive = positive
        self._negative = negative
        self._clock = clock
        self._metrics = metrics
        self._realm = realm
        self._negative_ttl = negative_ttl
        self._audit = audit_enabled
        self._policies = policies or PolicySet(None)
        self._role_mappers = dict(role_mappers or {})
        self._dpop = dpop
        self._dpop_algs = " ".join(dpop_algs)
        self._rate_limiter = rate_limiter
        self._introspectors = dict(introspectors or {})
        # The one issuer that takes opaque tokens (settings refuse more than one), never just the first.
        self._opaque_issuer = opaque_issuer if opaque_issuer in self._introspectors else None
        self._introspect_jwts = introspect_jwts
        self._authorization_endpoint = authorization_endpoint or (lambda issuer: "")
        self._revocations = revocations
        self._max_pending = max_pending
        self._pending = 0
        self._overloaded = refuse(Overloaded("too many checks in progress"), realm=realm)
        self._deadline = deadline
        self._edge_max_age = edge_max_age
        self._refusal_max_age = refusal_max_age
        self._step_up = step_up
        self._on_revoked = on_revoked or (lambda code: None)
        self._refusals: dict[tuple[type, str, str, bool], Decision] = {}
        self._no_route = refuse(Forbidden("no policy allows this route", code="route_not_allowed"), realm=realm)
        self.trace: Tracer | None = None  # `verifier explain` listens here; off (None) in the service

    # -- the two entry points -------------------------------------------------------------------

    def decide_cached(self, attrs: RequestAttributes, door: str = "") -> Decision | None:
        """The answer without any I/O, or None when `decide_after_miss` must be awaited; never raises."""
        try:
            return self._decide_cached(attrs, door)
        except Exception:  # fail closed on bugs; the traceback has no token in it
            log.exception("internal error while deciding", extra={"event": "internal_error", "route": attrs.route})
            return refuse(InternalError("internal error"), realm=self._realm)

    def _decide_cached(self, attrs: RequestAttributes, door: str) -> Decision | None:
        """The answer without any I/O, or None when the asynchronous path is needed.

        The caches are keyed by a hash of the whole Authorization value, so a token seen before is
        found before its syntax is even looked at; only a miss pays for the credential parsing.
        """
        route = self._route(attrs)
        if isinstance(route, Decision):
            return route
        header = attrs.headers.get("authorization")
        if not header:
            if route.policy is not None and not route.policy.require.authenticated:
                return ANONYMOUS
            return self._refuse(MissingToken("no access token"), None, route)
        key = audit.token_hash(header)
        hit = self._positive.get(key)
        if hit is not None:
            self._metrics.cache_lookup("positive", "hit")
            principal, allowed, credential, plain = hit
            if plain and route is NO_POLICY and self._revocations is None:
                # Nothing per request, no policy, no revocation index: the stored answer stands,
                # unless the token is in its last reuse window (then the max-age must shrink).
                if allowed.cache_max_age <= 0 or principal.expires_at - self._clock.now() >= allowed.cache_max_age:
                    return allowed
                return self._reusable(principal, allowed, route)
            if route.step_up or self._needs_async(principal, credential):
                return None  # a per-request proof (DPoP, WebAuthn) or a counter must be checked
            try:
                judged = self._judge(principal, credential, attrs, route)
            except VerifierError as exc:
                return self._refuse(exc, credential, route)
            return self._answer(principal, judged, allowed, route)
        refused = self._negative.get(key)
        if refused is not None:
            self._metrics.cache_lookup("negative", "hit")
            return refused
        try:
            credential = credentials.extract(attrs)
        except MissingToken as exc:
            if route.policy is not None and not route.policy.require.authenticated:
                return ANONYMOUS
            return self._refuse(exc, None, route)
        except VerifierError as exc:
            return self._refuse(exc, None, route)
        self._metrics.cache_lookup("positive", "miss")
        verified = self._verify_now(credential, key, attrs, door)
        if verified is None or isinstance(verified, Decision):
            return verified
        principal, allowed = verified
        if route.step_up or self._needs_async(principal, credential):
            return None  # the principal is cached now; the per-request proof is checked asynchronously
        try:
            judged = self._judge(principal, credential, attrs, route)
        except VerifierError as exc:
            return self._refuse(exc, credential, route)
        return self._answer(principal, judged, allowed, route)

    async def decide(self, attrs: RequestAttributes, door: str) -> Decision:
        """The full decision; never raises."""
        cached = self.decide_cached(attrs, door)
        if cached is not None:
            return cached
        return await self.decide_after_miss(attrs, door)

    async def decide_after_miss(self, attrs: RequestAttributes, door: str) -> Decision:
        """The asynchronous part, after `decide_cached` said None; never raises.

        Sheds load past `max_pending` concurrent slow checks; past `deadline` seconds answers 503 retry-later.
        """
        try:
            if self._pending >= self._max_pending:
                return self._overloaded
            self._pending += 1
            try:
                async with asyncio.timeout(self._deadline):
                    return await self._decide(attrs, door)
            except TimeoutError:
                # Answer before the gateway gives up (see settings.DEFAULT_DEADLINE_SECONDS); a provider
                # call in flight goes on, shielded, and its answer serves the retry.
                return refuse(ProviderUnavailable("decision deadline passed; retry later"), realm=self._realm)
            finally:
                self._pending -= 1
        except Exception:  # fail closed on bugs; the traceback has no token in it
            log.exception("internal error while deciding", extra={"event": "internal_error", "route": attrs.route})
            return refuse(InternalError("internal error"), realm=self._realm)

    async def authenticate(self, attrs: RequestAttributes) -> Principal:
        """The caller's principal for our own endpoints (WebAuthn registry); raises a refusal.

        The same per-request checks as forward-auth (`_check`: introspection of JWTs, DPoP, revocation,
        certificate binding), without a route policy; the principal returned carries announced claim
        changes.
        """
        credential = credentials.extract(attrs)
        key = audit.token_hash(attrs.headers.get("authorization", ""))
        hit = self._positive.get(key)
        if hit is not None:
            principal = hit[0]
        else:
            verified = await self._verify(credential, key, attrs, "endpoint")
            if isinstance(verified, Decision):
                raise InvalidToken(verified.reason.replace("_", " "), code=verified.reason)
            principal = verified[0]
        return await self._check(principal, credential, attrs, NO_POLICY)

    # -- the steps ------------------------------------------------------------------------------

    def _route(self, attrs: RequestAttributes) -> Route | Decision:
        if not self._policies.enabled:
            return NO_POLICY
        policy = self._policies.match(attrs)
        if self.trace is not None:
            self.trace("route", {"policy": policy})
        if policy is None:
            return self._no_route
        return Route(policy, policy.require.sender_constraint == "dpop", policy.require.step_up == "webauthn")

    def _needs_async(self, principal: Principal, credential: Credential) -> bool:
        return (
            credential.scheme is TokenScheme.DPOP
            or "jkt" in _cnf(principal)
            or self._rate_limiter is not None
            or principal.issuer in self._introspect_jwts
        )

    async def _check(
        self, principal: Principal, credential: Credential, attrs: RequestAttributes, route: Route
    ) -> Principal:
        """Every per-request check on a verified principal, in one place for every caller.

        Forward-auth (`_decide`) and our own endpoints (`authenticate`) both come through here, so the
        checks cannot drift apart: the provider's word on a JWT (`introspect_jwts`), the DPoP proof,
        then the synchronous `_judge`. `decide_cached` runs `_judge` alone, and only for a principal
        `_needs_async` says needs nothing asynchronous.
        """
        if principal.issuer in self._introspect_jwts:
            # Revocation check: the provider's word (cached by the introspector) on every request.
            await self._introspectors[principal.issuer].introspect(credential.token, audit.token_hash(credential.token))
        await self._bind(principal, credential, attrs)
        return self._judge(principal, credential, attrs, route)

    def _judge(
        self, principal: Principal, credential: Credential, attrs: RequestAttributes, route: Route
    ) -> Principal:
        """The synchronous checks on a principal: revocation, certificate binding and the route's policy.

        Returns the principal the policy judged: the admitted one, or, when a CAEP event announced
        changed claims since the token was issued, one whose scopes and roles follow those claims.
        """
        if self._revocations is not None:
            revoked = self._revocations.check(principal)
            if revoked is not None:
                self._on_revoked(revoked.code)
                raise revoked
            override = self._revocations.overrides(principal)
            if override:
                principal = self._overridden(principal, override)
        cnf = _cnf(principal)
        if "x5t#S256" in cnf:
            # Only the thumbprint of the certificate the door verified (or its trusted gateway named).
            check_certificate_binding(cnf, attrs.client_cert_thumbprint)
        if route.policy is not None:
            evaluate(
                route.policy.require,
                principal,
                self._clock.now(),
                authorization_endpoint=self._authorization_endpoint(principal.issuer),
            )
        return principal

    def _overridden(self, principal: Principal, override: Mapping[str, Any]) -> Principal:
        """The principal with announced claims, its scopes and roles derived again as at admission."""
        claims = {**principal.claims, **override}
        if "scope" in override or "scp" in override:
            # The announced scope replaces the token's, whichever of the two claims the token used.
            for name in ("scope", "scp"):
                if name not in override:
                    claims.pop(name, None)
        changed = dataclasses.replace(principal, claims=claims, scopes=scopes_of(claims), roles=roles_of(claims))
        return self._with_roles(changed)

    def _answer(self, admitted: Principal, judged: Principal, allowed: Decision, route: Route) -> Decision:
        """The allow answer for the principal the policy judged (its headers follow announced claims)."""
        if judged is not admitted:
            allowed = allow(judged, cache_max_age=allowed.cache_max_age)
        return self._reusable(judged, allowed, route)

    async def _decide(self, attrs: RequestAttributes, door: str) -> Decision:
        route = self._route(attrs)
        if isinstance(route, Decision):
            return route
        credential = credentials.extract(attrs)  # decide_cached already answered the failures
        key = audit.token_hash(attrs.headers.get("authorization", ""))
        hit = self._positive.get(key)
        if hit is not None:
            principal, allowed, credential, _ = hit
        else:
            verified = await self._verify(credential, key, attrs, door)
            if isinstance(verified, Decision):
                return verified
            principal, allowed = verified
        try:
            judged = await self._check(principal, credential, attrs, route)
            if route.step_up:
                if self._step_up is None:
                    raise InternalError("step-up required but WebAuthn is not configured")
                await self._step_up.check_step_up(judged, attrs)
            if self._rate_limiter is not None:
                await self._rate_limiter.check(judged)
        except VerifierError as exc:
            return self._refuse(exc, credential, route)
        return self._answer(principal, judged, allowed, route)

    def _verify_now(
        self, credential: Credential, key: bytes, attrs: RequestAttributes, door: str
    ) -> tuple[Principal, Decision] | Decision | None:
        """First sight of a JWT whose key is held: verified inline, no task, no await.

        None when the answer needs I/O (an unknown kid may need a key refresh; opaque tokens go to
        introspection): the asynchronous path takes over.
        """
        if not (jws.looks_like_jws(credential.token) or self._opaque_issuer is None):
            return None
        started = time.perf_counter()
        token_key = audit.token_hash(credential.token)
        kid: str | None = None
        alg = issuer = ""
        try:
            parsed = self._jwt.parse(credential.token)
            kid, alg = parsed.kid, parsed.alg
            iss = parsed.payload.get("iss")
            issuer = iss if isinstance(iss, str) else ""
            verified = self._jwt.verify_now(parsed)
            if verified is None:
                return None
            principal = self._with_roles(verified)
        except VerifierError as exc:
            return self._refused(exc, credential, key, attrs, door, started, token_key, issuer, kid, alg)
        return self._admitted(principal, credential, key, attrs, door, started, token_key, issuer, kid, alg)

    async def _verify(
        self, credential: Credential, key: bytes, attrs: RequestAttributes, door: str
    ) -> tuple[Principal, Decision] | Decision:
        """First sight of a token: signature (refreshing keys if need be) or introspection."""
        done = self._verify_now(credential, key, attrs, door)
        if done is not None:
            return done
        started = time.perf_counter()
        token_key = audit.token_hash(credential.token)  # introspection caches and the audit fingerprint
        kid: str | None = None
        alg = issuer = ""
        try:
            if jws.looks_like_jws(credential.token) or self._opaque_issuer is None:
                parsed = self._jwt.parse(credential.token)
                kid, alg = parsed.kid, parsed.alg
                iss = parsed.payload.get("iss")
                issuer = iss if isinstance(iss, str) else ""
                principal = await self._jwt.verify(parsed)
            else:
                issuer = self._opaque_issuer
                alg = "introspection"
                principal = await self._introspectors[issuer].introspect(credential.token, token_key)
            principal = self._with_roles(principal)
        except VerifierError as exc:
            return self._refused(exc, credential, key, attrs, door, started, token_key, issuer, kid, alg)
        return self._admitted(principal, credential, key, attrs, door, started, token_key, issuer, kid, alg)

    def _refused(
        self,
        error: VerifierError,
        credential: Credential,
        key: bytes,
        attrs: RequestAttributes,
        door: str,
        started: float,
        token_key: bytes,
        issuer: str,
        kid: str | None,
        alg: str,
    ) -> Decision:
        if self.trace is not None:
            self.trace("token", {"issuer": issuer, "kid": kid, "alg": alg, "error": error})
        decision = self._refuse(error, credential, NO_POLICY)
        if _negative_cacheable(error):
            self._negative.put(key, decision, self._clock.now() + self._negative_ttl)
        self._record(attrs, door, decision, started, token_key, issuer, kid, alg, "")
        return decision

    def _admitted(
        self,
        principal: Principal,
        credential: Credential,
        key: bytes,
        attrs: RequestAttributes,
        door: str,
        started: float,
        token_key: bytes,
        issuer: str,
        kid: str | None,
        alg: str,
    ) -> tuple[Principal, Decision]:
        if self.trace is not None:
            self.trace("token", {"issuer": issuer, "kid": kid, "alg": alg, "principal": principal})
        # Reuse at the gateway is possible only when nothing per request went into the answer.
        per_request = bool(_cnf(principal)) or self._rate_limiter is not None or issuer in self._introspect_jwts
        allowed = allow(principal, cache_max_age=0 if per_request else self._edge_max_age)
        plain = not self._needs_async(principal, credential) and "x5t#S256" not in _cnf(principal)
        self._positive.put(key, (principal, allowed, credential, plain), principal.expires_at)
        self._record(attrs, door, allowed, started, token_key, issuer, kid, alg, principal.subject, principal.client_id)
        return principal, allowed

    def _with_roles(self, principal: Principal) -> Principal:
        mapper = self._role_mappers.get(principal.issuer)
        if mapper is None:
            return principal
        roles = mapper.roles(principal.claims, principal.subject, principal.scopes, principal.roles)
        return dataclasses.replace(principal, roles=roles)

    async def _bind(self, principal: Principal, credential: Credential, attrs: RequestAttributes) -> None:
        """RFC 9449: a DPoP-bound token needs its proof on every request; no downgrade to Bearer."""
        jkt = _cnf(principal).get("jkt")
        if credential.scheme is TokenScheme.DPOP:
            if not isinstance(jkt, str):
                error = InvalidToken("token is not DPoP-bound", code="token_not_dpop_bound")
                error.scheme = Scheme.DPOP
                raise error
        elif jkt is not None:
            error = SenderConstraintFailed("a DPoP-bound token must be presented with the DPoP scheme")
            error.scheme = Scheme.DPOP
            raise error
        else:
            return
        if self._dpop is None:
            raise InvalidDpopProof("DPoP is not enabled on this verifier")
        url = f"{attrs.scheme}://{attrs.host}{attrs.path.split('?', 1)[0]}"
        await self._dpop.verify(
            attrs.headers.get("dpop"), method=attrs.method, url=url, access_token=credential.token, expected_jkt=jkt
        )

    def _reusable(self, principal: Principal, allowed: Decision, route: Route) -> Decision:
        """The allow answer with how long a gateway may reuse it (issue: decisions the gateway may reuse).

        The smallest of: the configured ceiling (already in `allowed`), the principal's remaining
        lifetime (token `exp`, or an introspection result's freshness), and the time before a
        `max_auth_age_seconds` policy would refuse. `no-store` when the route needs a per-request
        proof (a WebAuthn assertion).
        """
        ceiling = allowed.cache_max_age
        if ceiling <= 0:
            return allowed
        if route.step_up:
            return dataclasses.replace(allowed, cache_max_age=0, memo={})
        now = self._clock.now()
        left = principal.expires_at - now
        if route.policy is not None:
            auth_left = auth_time_left(principal, route.policy.require, now)
            if auth_left is not None:
                left = min(left, auth_left)
        if left >= ceiling:
            return allowed
        return dataclasses.replace(allowed, cache_max_age=max(0, int(left)), memo={})

    def _refuse(self, error: VerifierError, credential: Credential | None, route: Route) -> Decision:
        if self.trace is not None:
            self.trace("refused", {"error": error})
        dpop = route.dpop_route or (credential is not None and credential.scheme is TokenScheme.DPOP)
        static = not (error.challenge_params() or error.extra_headers() or error.extra_body())
        if static:
            memo_key = (type(error), error.code, error.description, dpop)
            memo = self._refusals.get(memo_key)
            if memo is not None:
                return memo
        decision = refuse(
            error,
            realm=self._realm,
            scheme=Scheme.DPOP if dpop else None,
            dpop_algs=self._dpop_algs,
            reusable_for=self._refusal_max_age,
        )
        if static and len(self._refusals) < MAX_MEMOIZED_REFUSALS:
            self._refusals[memo_key] = decision
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
        client_id: str | None = None,
    ) -> None:
        if alg and alg != "introspection":
            label = alg if alg in SUPPORTED_ALGORITHMS else "other"  # header values are attacker-chosen
            self._metrics.signature_check(label, "ok" if decision.allowed else decision.reason)
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
                client_id=client_id,  # with subject "", a client-credentials token: no user
            )


__all__ = ["ANONYMOUS", "Introspector", "Pipeline", "ProofVerifier", "ProviderUnavailable"]
