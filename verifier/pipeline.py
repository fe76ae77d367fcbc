"""request attributes -> credential -> authenticators -> principal -> checks -> decision.

Data flows one way. Metrics and audit observe the decision; nothing flows back from them.

The pipeline is a small driver over two declared lists the composition root hands it: the
authenticators (`verifier.authenticators`), tried in order until one is responsible for the token,
and the checks (`verifier.checks`), run in order on every request. A token seen before costs one
SHA-256, one dict probe and the checks that apply to it (`decide_cached`); only a first-seen token
whose key is not held, an opaque token, or a token one of whose checks needs I/O (a DPoP proof, a
rate-limit counter, step-up, the provider's word) goes through the asynchronous path
(`decide_after_miss`). Which of the three entry points runs which check, and how long a gateway may
reuse an answer, are derived from the checks' declarations, never listed here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from verifier import credentials
from verifier.authenticators import (
    Authenticator,
    JwtAuthenticator,
    NotResponsible,
    Seen,
    issuer_not_trusted,
    none_responsible,
)
from verifier.checks.base import OWN_ENDPOINT, Check, Passed, Route
from verifier.clock import Clock
from verifier.credentials import Credential, TokenScheme
from verifier.decision import Decision
from verifier.doors.refusals import refuse
from verifier.errors import (
    AudienceMismatch,
    Forbidden,
    InternalError,
    InvalidToken,
    MalformedRequest,
    MissingToken,
    Overloaded,
    ProviderUnavailable,
    Scheme,
    TokenNotYetValid,
    UnknownKey,
    VerifierError,
)
from verifier.observe import audit
from verifier.observe.logsink import cut
from verifier.observe.metrics import Metrics
from verifier.observe.tracing import NO_TRACING, Tracing
from verifier.policy.rules import AMBIGUOUS, PolicySet
from verifier.principal import Principal
from verifier.request import RequestAttributes
from verifier.settings import SUPPORTED_ALGORITHMS
from verifier.sweep import Sweep, Timed
from verifier.tokens import jws
from verifier.tokens.cache import ExpiringCache
from verifier.tokens.jwt import JwtVerifier
from verifier.upstream import UpstreamAnswers

log = logging.getLogger("verifier.pipeline")

ANONYMOUS = Decision(allowed=True, status=200, reason="anonymous")
MAX_MEMOIZED_REFUSALS = 512  # distinct static refusals kept pre-built (descriptions can echo header values)


_NO_ROUTES: Mapping[int, Decision] = types.MappingProxyType({})


class Admitted(NamedTuple):
    """What the positive cache holds for a token its authenticator vouched for (until its `exp`).

    A NamedTuple (immutable; `_replace` for a changed copy): one is built for every first-seen token, and a
    frozen dataclass's `__init__` costs several times a tuple's.
    """

    principal: Principal  # with its issuer's roles
    allowed: Decision  # the answer while no check changes the principal; its max-age is the reuse ceiling
    # The scheme the token came under (it decides DPoP challenges). Not the token: a request that finds this
    # record has the same Authorization value (the key is its hash), so its checks read the credential from
    # the request; held here, a token (~0.5-1.5 KB) would stay in memory as long as its record.
    scheme: TokenScheme
    checks: tuple[Check, ...]  # the listed checks that apply to this token, in order; none: `allowed` stands
    mask: int  # the same checks as bits of the pipeline's list (bit i: checks[i]), for one AND per request
    ceiling: int = 0  # seconds a gateway may reuse its allow at most (0: no-store from the start)
    # The answers of routes whose policy changes what the upstream receives, by id of the route's Variant.
    by_route: Mapping[int, Decision] = _NO_ROUTES


class _Deadline(Timed):
    """A decision's deadline (`Pipeline.decide_after_miss`), armed on the current task: `asyncio.timeout`'s
    semantics without its three running-loop lookups (each a getpid() system call on CPython 3.11) and its two
    coroutines per use (#24 goal 7). When it falls due the task is cancelled; that cancellation, and only that one,
    is taken back (`fired`); a cancellation from outside, before or together with it, goes on as a cancellation.
    Timed by its pipeline's `Sweep`: one timer for all of a pipeline's deadlines, all of one length."""

    __slots__ = ("_cancelling", "_state", "_task")

    def __init__(self, task: asyncio.Task[Any], due: float) -> None:
        super().__init__(due)
        self._task: asyncio.Task[Any] | None = task  # let go at `close`: its sweep may hold this a while longer
        self._cancelling = task.cancelling()  # cancellations asked before ours, still pending
        self._state = _ARMED

    def armed(self) -> bool:
        return self._state is _ARMED

    def expire(self) -> None:
        self.handle = None
        task = self._task
        if task is not None:  # else closed: not armed, never expired
            self._state = _EXPIRED
            task.cancel()

    def fired(self) -> bool:
        """On a `CancelledError` in its task: whether it is this deadline's alone (taken back: answer it) rather
        than another's too (let it go on)."""
        if self._state is not _EXPIRED:
            return False
        self._state = _TAKEN_BACK
        task = self._task
        return task is not None and task.uncancel() <= self._cancelling

    def close(self) -> None:
        """Disarmed when the decision is done, however it ended; a cancellation of its own that did not come out
        as `CancelledError` (caught on the way) is taken back all the same, as `asyncio.timeout` does."""
        self.disarm()
        task, self._task = self._task, None  # a finished decision's task is not kept alive by the sweep's queue
        if self._state is _EXPIRED:
            self._state = _TAKEN_BACK
            if task is not None:
                task.uncancel()
        elif self._state is _ARMED:
            self._state = _CLOSED  # its `Sweep` drops it when it comes to it


_ARMED, _EXPIRED, _TAKEN_BACK, _CLOSED = object(), object(), object(), object()  # `_Deadline`'s states


class _Deadlines:
    """A pipeline's decision deadlines: all of one length, so they fall due in the order they were armed, and one
    timer times them all (`verifier.sweep`) instead of one per first-seen check (#24 goal 7)."""

    __slots__ = ("_seconds", "_sweep")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._sweep = Sweep()

    def arm(self, loop: asyncio.AbstractEventLoop) -> _Deadline:
        """A deadline for the current task of ``loop`` (the loop given: no lookup)."""
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a decision deadline needs a task")
        deadline = _Deadline(task, loop.time() + self._seconds)
        self._sweep.arm(loop, deadline)
        return deadline


MISSED_HELD = 1024  # requests between `decide_cached`'s miss and their `decide_after_miss` (Pipeline._missed)


class _Missed(NamedTuple):
    """A request `decide_cached` left to `decide_after_miss` (`Pipeline._missed`): what it worked out."""

    attrs: RequestAttributes  # that request (held: no other object takes its id while it waits)
    routed: tuple[Route, int]
    credential: Credential
    key: bytes  # its positive and negative caches' key
    io_from: int  # the first of the route's authenticators to ask with I/O: those before it said "not responsible"


@dataclasses.dataclass(frozen=True, slots=True)
class Refused:
    """What the negative cache holds for a token no route can take: answered anew on each route, since
    a challenge names the route's own `resource_metadata` and `scope`."""

    error: VerifierError
    scheme: TokenScheme  # the credential's (it decides DPoP challenges); not the `Credential`: one object less


def _without_frames(error: VerifierError) -> VerifierError:
    """``error`` (and the exceptions chained to it) without tracebacks: a cached refusal would otherwise keep
    every frame of the failed check alive, with its locals, for the refusal's lifetime (several KiB a token)."""
    chained: BaseException | None = error
    for _ in range(8):  # a chain is short; the bound stops a cycle someone built by hand
        if chained is None:
            break
        chained.__traceback__ = None
        chained = chained.__cause__ or chained.__context__
    return error


# Refusals the negative cache holds, one copy of each (`_held`); bounded: past the bound, emptied.
MAX_HELD_REFUSALS = 4096
_HELD_REFUSALS: dict[tuple[object, ...], VerifierError] = {}
_PLAIN_ERROR = frozenset(VerifierError().__dict__)  # what every error holds; anything more is its own state


def _held(error: VerifierError) -> VerifierError:
    """``error`` as the negative cache holds it: without frames (`_without_frames`) and, when its type, text,
    code and scheme are all that it holds (no state of its own, e.g. a nonce or a required `acr`), the one copy
    of every equal refusal. A flood of garbage tokens gets a handful of refusals ("signature does not verify",
    "invalid base64url", ...): shared, each refused token's entry is one object for the garbage collector to
    walk instead of three (the error and its `__dict__` beside the entry). Only answers are built from a held
    refusal (never raised again); the chained cause kept is the first one's."""
    error = _without_frames(error)
    if error.__dict__.keys() != _PLAIN_ERROR:
        return error
    key = (type(error), error.args, error.code, error.description, error.scheme)
    try:
        held = _HELD_REFUSALS.get(key)
    except TypeError:  # an unhashable argument: held on its own
        return error
    if held is None:
        if len(_HELD_REFUSALS) >= MAX_HELD_REFUSALS:  # texts that vary (an attacker's `alg`): start afresh, so
            _HELD_REFUSALS.clear()  # the common refusals are shared again (entries keep theirs alive)
        held = _HELD_REFUSALS[key] = error
    return held


# An observer of the steps of one decision (`verifier explain`): (step, details). The service sets none.
Tracer = Callable[[str, Mapping[str, Any]], None]


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """The checks one request runs (a token's, on a route), and what their declarations add up to."""

    checks: tuple[Check, ...]
    from_memory: bool  # every one is answered without I/O: the fast path may answer
    per_request: bool  # one depends on the request itself: the answer is never reused by a gateway
    bounded: tuple[Check, ...]  # the ones that bound reuse themselves (`reuse_left` overridden)

    @classmethod
    def of(cls, checks: tuple[Check, ...]) -> Plan:
        """The plan for these checks, in their order."""
        return cls(
            checks,
            all(c.from_memory for c in checks),
            any(c.per_request for c in checks),
            tuple(c for c in checks if type(c).reuse_left is not Check.reuse_left),
        )


_BEARER = "Bearer "  # RFC 6750 section 2.1, as every gateway and client writes it
_WHOLE_VALUE = b"\x00"  # marks a key hashed from a whole Authorization value (33 bytes: never a bearer key)


def cache_key(authorization: str) -> bytes:
    """The caches' key for an Authorization value, found before its syntax is looked at.

    For `Bearer <rest>` (nearly every request) it is the SHA-256 of `<rest>`: when `<rest>` is the token
    (the usual spelling), the token's own hash, which the audit fingerprint and the introspection caches use
    too (`token_hash`): one SHA-256 per first-seen token instead of two. For any other value, a mark byte and
    the SHA-256 of the whole value, so no two different values share a key either way.
    """
    if authorization.startswith(_BEARER):
        return audit.token_hash(authorization[len(_BEARER) :])
    return _WHOLE_VALUE + audit.token_hash(authorization)


def token_hash(key: bytes, attrs: RequestAttributes, credential: Credential) -> bytes:
    """The SHA-256 of the request's token (`audit.token_hash`), given its `cache_key`: that key itself when
    the Authorization value was exactly `Bearer <token>` (`credentials.extract` strips nothing from a value of
    that length), else hashed here."""
    if len(key) == _HASH_BYTES and len(attrs.headers.get("authorization", "")) == len(_BEARER) + len(credential.token):
        return key
    return audit.token_hash(credential.token)


_HASH_BYTES = 32  # SHA-256
# What `_first_seen_jwt` returns for a request that is not for it (never an answer: the general path decides).
_GENERAL = Decision(allowed=False, status=500, reason="internal_error")
_POSITIVE_MISS = ("positive", "miss")


def _negative_cacheable(error: VerifierError) -> bool:
    # A refusal that no later key fetch can turn into an allow. An unknown kid may become known
    # after a rotation, so it is never remembered.
    return isinstance(error, InvalidToken | AudienceMismatch) and not isinstance(error, UnknownKey)


def _no_role_mapping(principal: Principal) -> Principal:
    return principal


class Pipeline:
    """Decides one request."""

    def __init__(
        self,
        *,
        authenticators: Sequence[Authenticator],
        checks: Sequence[Check],
        positive: ExpiringCache[Admitted],
        negative: ExpiringCache[Refused],
        clock: Clock,
        metrics: Metrics,
        realm: str,
        negative_ttl: float,
        audit_enabled: bool = True,
        policies: PolicySet | None = None,
        with_roles: Callable[[Principal], Principal] = _no_role_mapping,
        dpop_algs: tuple[str, ...] = (),
        max_pending: int = 1024,
        deadline: float | None = None,
        edge_max_age: int = 0,
        refusal_max_age: int = 0,
        upstream: UpstreamAnswers | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._authenticators = tuple(authenticators)
        # Several providers take opaque tokens: a refusal from one says nothing of the others.
        self._opaque_providers = sum(a.sends_to is not None for a in self._authenticators)
        self._by_route: dict[int, tuple[Route, tuple[Authenticator, ...], bool]] = {}
        self._checks = tuple(checks)
        # A check that does not override `for_token` applies to every token: its bit is set once, here.
        every = [type(c).for_token is Check.for_token for c in self._checks]
        self._every_token = sum(1 << i for i, always in enumerate(every) if always)
        self._for_some_tokens = tuple((1 << i, c) for i, c in enumerate(self._checks) if not every[i])
        self._positive = positive
        self._negative = negative
        self._clock = clock
        self._metrics = metrics
        self._realm = realm
        self._negative_ttl = negative_ttl
        self._audit = audit_enabled
        self._policies = policies or PolicySet(None)
        self._with_roles = with_roles
        self._dpop_algs = " ".join(dpop_algs)
        self._max_pending = max_pending
        self._pending = 0
        self._overloaded = refuse(Overloaded("too many checks in progress"), realm=realm)
        self.overloaded = self._overloaded  # a door's own early refusal (forward-auth under a flood)
        self._deadlines = None if deadline is None else _Deadlines(deadline)
        self._edge_max_age = edge_max_age
        self._refusal_max_age = refusal_max_age
        self._upstream = upstream or UpstreamAnswers()
        self._refusals: dict[tuple[type, str, str, Scheme, bool, tuple[tuple[str, str], ...]], Decision] = {}
        default = Route(None, False, challenge=self._policies.default_challenge)  # no policy: the default resource
        self._no_route = refuse(
            Forbidden("no policy allows this route", code="route_not_allowed"),
            realm=realm,
            route_params=default.challenge,
        )
        self._ambiguous_path = refuse(
            MalformedRequest("the request host, path or method reads as different routes"),
            realm=realm,
            route_params=default.challenge,
        )
        # A door's own early refusal: forward-auth asked with a header of its declared family twice (the gateway
        # added its own beside the client's instead of overwriting it), Envoy's with its x-forwarded-proto twice
        # (`verifier.request.DescribedTwice`), so which request to judge is unknown.
        self.described_twice = refuse(
            MalformedRequest("the gateway described the request twice"),
            realm=realm,
            route_params=default.challenge,
        )
        self._default_challenge = default.challenge
        # Worked out once per route and per combination of checks, never per request.
        self._routes: dict[int, tuple[Route, int]] = {}  # id(policy) -> the route and its checks' bits
        self._no_policy = (default, self._mask(default))
        self._own_endpoint = (OWN_ENDPOINT, self._mask(OWN_ENDPOINT))
        self._plans: dict[int, Plan] = {}
        self.trace: Tracer | None = None  # `verifier explain` listens here; off (None) in the service
        # Set by the allow paths of `decide_cached`, read by `decide_cached_stable` (synchronous: no interleaving).
        self._stable_until = 0.0
        # Requests `decide_cached` found to need I/O (a first-seen token), by identity, each taken by its own
        # `decide_after_miss`: their route, credential and cache key, and the fact that no authenticator could
        # answer them without I/O, are not worked out twice (#24 goal 7). A request whose `decide_after_miss`
        # never comes (its connection gone first) is dropped with the rest when MISSED_HELD are held.
        self._missed: dict[int, _Missed] = {}
        self._tracing = tracing  # spans (annotated on first sight only) and the audit line's trace id
        # The fused first-seen path (`_first_seen_jwt`) when the JWT authenticator is asked first: on every route it
        # is (it sends tokens nowhere), so a JWS-looking token is always its.
        first = self._authenticators[0] if self._authenticators else None
        self._jwt_first = first.jwt if isinstance(first, JwtAuthenticator) else None
        self._hot_cache = metrics.hot_cache  # token-cache lookups by (cache, result)
        self._signatures = metrics.hot_signatures  # signature checks by (alg, result)

    def _mask(self, route: Route) -> int:
        return sum(1 << i for i, check in enumerate(self._checks) if check.for_route(route))

    def _plan(self, mask: int) -> Plan:
        plan = self._plans.get(mask)
        if plan is None:
            plan = self._plans[mask] = Plan.of(tuple(c for i, c in enumerate(self._checks) if mask >> i & 1))
        return plan

    # -- the three entry points -----------------------------------------------------------------

    def decide_cached(self, attrs: RequestAttributes, door: str = "") -> Decision | None:
        """The answer without any I/O, or None when `decide_after_miss` must be awaited; never raises."""
        try:
            return self._decide_cached(attrs, door)
        except Exception:  # fail closed on bugs; the traceback has no token in it
            log.exception("internal error while deciding", extra={"event": "internal_error", "route": attrs.route})
            return refuse(InternalError("internal error"), realm=self._realm)

    def decide_cached_stable(self, attrs: RequestAttributes, door: str = "") -> tuple[Decision | None, float]:
        """`decide_cached`, and until when (epoch seconds) the same request would get these same answer bytes
        while nothing it reads changes (`verifier.generation` tells that): 0.0 when it must not be reused
        (a refusal; built for this request alone; a per-request check ran; its max-age already shrinking; a
        first-seen token: its next request is offered instead)."""
        self._stable_until = 0.0
        decision = self.decide_cached(attrs, door)
        if decision is None or not decision.allowed:
            return decision, 0.0
        return decision, self._stable_until

    def _decide_cached(self, attrs: RequestAttributes, door: str) -> Decision | None:
        """The answer without any I/O, or None when the asynchronous path is needed.

        The caches are keyed by a hash of the whole Authorization value, so a token seen before is
        found before its syntax is even looked at; only a miss pays for the credential parsing.
        """
        routed = self._route(attrs)
        if isinstance(routed, Decision):
            return routed
        route = routed[0]
        header = attrs.headers.get("authorization")
        if not header:
            if route.policy is not None and not route.policy.require.authenticated:
                return ANONYMOUS
            return self._refuse(MissingToken("no access token"), None, route)
        key = cache_key(header)
        hit = self._positive.get(key)
        if hit is not None:
            self._metrics.cache_lookup("positive", "hit")
            if not hit.mask and route.upstream is None:
                # No check applies: the stored answer stands, unless the token (or its identity
                # assertion) is in its last reuse window (then `_now` shrinks the max-age or renews the
                # assertion). Inline: the commonest hit of all.
                allowed = hit.allowed
                if allowed.fresh_until - self._clock.now() >= allowed.cache_max_age:
                    self._stable_until = allowed.fresh_until - allowed.cache_max_age  # <= renew_at (`allow`)
                    return allowed
            return self._now(hit, attrs, routed, key)
        refused = self._negative.get(key)
        if refused is not None:
            self._metrics.cache_lookup("negative", "hit")
            return self._refuse(refused.error, refused.scheme, route)
        if self._jwt_first is not None and len(key) == _HASH_BYTES:  # `Bearer <token>`, the JWT authenticator first
            fused = self._first_seen_jwt(self._jwt_first, header, key, attrs, routed, door)
            if fused is not _GENERAL:
                return fused
        try:
            credential = credentials.extract(attrs)
        except MissingToken as exc:
            if route.policy is not None and not route.policy.require.authenticated:
                return ANONYMOUS
            return self._refuse(exc, None, route)
        except VerifierError as exc:
            return self._refuse(exc, None, route)
        self._metrics.cache_lookup("positive", "miss")
        verified = self._verify_now(credential, key, attrs, door, route)
        if isinstance(verified, int):
            missed = self._missed
            if len(missed) >= MISSED_HELD:
                missed.clear()
            missed[id(attrs)] = _Missed(attrs, routed, credential, key, verified)
            return None
        if isinstance(verified, Decision):
            return verified
        decision = self._now(verified, attrs, routed, key)
        # A first-seen token's answer is not offered for reuse by the raw request (`decide_cached_stable`): most
        # tokens are seen once or twice, and each offer costs the door a memo entry (and a flood of fresh tokens
        # would clear the entries of the tokens that do repeat). Its next request, answered from the cache, is.
        self._stable_until = 0.0
        return decision

    async def decide(self, attrs: RequestAttributes, door: str) -> Decision:
        """The full decision; never raises."""
        cached = self.decide_cached(attrs, door)
        if cached is not None:
            return cached
        return await self.decide_after_miss(attrs, door)

    async def decide_after_miss(
        self, attrs: RequestAttributes, door: str, loop: asyncio.AbstractEventLoop | None = None
    ) -> Decision:
        """The asynchronous part, after `decide_cached` said None; never raises. `loop`: the running loop, when
        the caller holds it (else it is looked up: on CPython 3.11 each lookup is a getpid() system call).

        Sheds load past `max_pending` concurrent slow checks; past `deadline` seconds answers 503 retry-later.
        """
        try:
            if self._pending >= self._max_pending:
                return self._overloaded
            deadlines = self._deadlines
            timer = None if deadlines is None else deadlines.arm(loop or asyncio.get_running_loop())
            self._pending += 1
            try:
                return await self._decide(attrs, door)
            except asyncio.CancelledError:
                if timer is None or not timer.fired():
                    raise
                # Answer before the gateway gives up (see settings.DEFAULT_DEADLINE_SECONDS); a provider
                # call in flight goes on, shielded, and its answer serves the retry.
                return refuse(ProviderUnavailable("decision deadline passed; retry later"), realm=self._realm)
            finally:
                self._pending -= 1
                if timer is not None:
                    timer.close()
        except Exception:  # fail closed on bugs; the traceback has no token in it
            log.exception("internal error while deciding", extra={"event": "internal_error", "route": attrs.route})
            return refuse(InternalError("internal error"), realm=self._realm)

    async def authenticate(self, attrs: RequestAttributes) -> Principal:
        """The caller's principal for our own endpoints (WebAuthn registry); raises a refusal.

        The same checks as forward-auth, on the route `OWN_ENDPOINT` (no policy, no step-up, not the
        gateway's rate budget); the principal returned carries announced claim changes.
        """
        credential = credentials.extract(attrs)
        key = cache_key(attrs.headers.get("authorization", ""))
        admitted = self._positive.get(key)
        if admitted is None:
            verified = await self._verify(credential, key, attrs, "endpoint", OWN_ENDPOINT)
            if isinstance(verified, Decision):
                raise InvalidToken(verified.reason.replace("_", " "), code=verified.reason)
            admitted = verified
        plan = self._plan(admitted.mask & self._own_endpoint[1])
        principal, _ = await self._run(admitted.principal, credential, attrs, OWN_ENDPOINT, plan.checks)
        return principal

    def undescribed(self, missing: str) -> Decision:
        """A door's own early refusal of a check whose original path nothing told (`verifier.request.Undescribed`):
        forward-auth asked with neither the declared family's path header nor a path after `/v1/forward-auth`, or a
        gRPC Check with an empty path, so which route to judge is unknown (judged as `/`, a public `/` passed every
        request); or, when policies name hosts, forward-auth asked without the family's host header. Built once per
        door and `missing`: the description names what the gateway did not send."""
        return refuse(
            MalformedRequest(f"the gateway sent {missing}"),
            realm=self._realm,
            route_params=self._default_challenge,
        )

    def known(self, attrs: RequestAttributes) -> str | None:
        """For a span's `cache.hit` (asked only when tracing is on): the issuer of the admitted token a
        cache holds for this request, "" for a remembered refusal, None when no cache knows the token."""
        header = attrs.headers.get("authorization")
        if not header:
            return None
        key = cache_key(header)
        admitted = self._positive.get(key)
        if admitted is not None:
            return admitted.principal.issuer
        return "" if self._negative.get(key) is not None else None

    # -- the steps ------------------------------------------------------------------------------

    def _route(self, attrs: RequestAttributes) -> tuple[Route, int] | Decision:
        """The request's route, with the bits of the checks that apply on it."""
        if not self._policies.enabled:
            return self._no_policy
        policy = self._policies.match(attrs)
        if self.trace is not None:
            self.trace("route", {"policy": policy})
        if policy is None:
            return self._no_route
        if policy is AMBIGUOUS:
            return self._ambiguous_path
        routed = self._routes.get(id(policy))
        if routed is None:
            route = Route(
                policy,
                policy.require.sender_constraint == "dpop",
                policy.require.step_up == "webauthn",
                challenge=policy.challenge,
                upstream=None if policy.upstream is None else self._upstream.variant(policy.upstream),
            )
            routed = self._routes[id(policy)] = (route, self._mask(route))
        return routed

    def _now(
        self, admitted: Admitted, attrs: RequestAttributes, routed: tuple[Route, int], key: bytes
    ) -> Decision | None:
        """An admitted token's answer from memory, or None when one of its checks needs I/O."""
        route, route_mask = routed
        if not admitted.mask:
            # No check applies: the stored answer stands (renewed when its assertion is due), its
            # max-age shrunk in the token's last reuse window.
            return self._reusable(admitted.principal, self._stored(admitted, route, key), route, self._plan(0))
        plan = self._plan(admitted.mask & route_mask)
        if not plan.from_memory:
            return None  # a per-request proof, a counter or the provider: decide_after_miss
        principal = admitted.principal
        try:
            for check in plan.checks:
                principal = check.check_now(principal, attrs, route)
        except VerifierError as exc:
            return self._refuse(exc, admitted.scheme, route)
        return self._answer(admitted, principal, route, plan, key)

    async def _decide(self, attrs: RequestAttributes, door: str) -> Decision:
        missed = self._missed.pop(id(attrs), None)
        if missed is not None and missed.attrs is attrs:  # held, so no other request has its id meanwhile
            # This request's own miss, just now (at most a loop turn ago): its route, credential and key as
            # `decide_cached` worked them out; no authenticator could answer it without I/O then.
            routed, credential, key, io_from = missed.routed, missed.credential, missed.key, missed.io_from
        else:
            found = self._route(attrs)
            if isinstance(found, Decision):
                return found
            routed, io_from = found, None
            credential = credentials.extract(attrs)  # decide_cached already answered the failures
            key = cache_key(attrs.headers.get("authorization", ""))
        route, route_mask = routed
        admitted = self._positive.get(key)  # another request for the same token may have been admitted since
        if admitted is None:
            verified = await self._verify(credential, key, attrs, door, route, io_from=io_from)
            if isinstance(verified, Decision):
                return verified
            admitted = verified
        plan = self._plan(admitted.mask & route_mask)
        try:
            judged, to_client = await self._run(admitted.principal, credential, attrs, route, plan.checks)
        except VerifierError as exc:
            return self._refuse(exc, admitted.scheme, route)
        decision = self._answer(admitted, judged, route, plan, key)
        if to_client and decision.allowed:  # this request's answer alone (a per-request check: no-store)
            decision = decision._replace(client_headers=to_client)
        return decision

    @staticmethod
    async def _run(
        principal: Principal, credential: Credential, attrs: RequestAttributes, route: Route, checks: Sequence[Check]
    ) -> tuple[Principal, tuple[tuple[str, str], ...]]:
        """Every check that applies, in order; each sees the principal the one before returned. With the
        headers the checks have for the client (`Passed`)."""
        to_client: tuple[tuple[str, str], ...] = ()
        for check in checks:
            if check.from_memory:
                principal = check.check_now(principal, attrs, route)
                continue
            passed = await check.check(principal, credential, attrs, route)
            if isinstance(passed, Passed):
                principal, to_client = passed.principal, to_client + passed.client_headers
            else:
                principal = passed
        return principal, to_client

    def _answer(self, admitted: Admitted, judged: Principal, route: Route, plan: Plan, key: bytes) -> Decision:
        """The allow answer for the principal the checks judged (its headers follow announced claims)."""
        if judged is not admitted.principal:  # rare (a CAEP claims change): built for this request alone
            allowed = self._build(judged, route, admitted.ceiling, admitted.scheme)
            decision = self._reusable(judged, allowed, route, plan)
            self._stable_until = 0.0  # an identity assertion in it is minted anew each time
            return decision
        return self._reusable(judged, self._stored(admitted, route, key), route, plan)

    def _build(self, principal: Principal, route: Route, ceiling: int, scheme: TokenScheme) -> Decision:
        """The answer for what the route's upstream receives: an allow, or `upstream_claim_too_large`."""
        variant = route.upstream or self._upstream.default
        try:
            return self._upstream.answer(principal, variant, ceiling, self._clock.now())
        except VerifierError as exc:
            return self._refuse(exc, scheme, route)

    def _stored(self, admitted: Admitted, route: Route, key: bytes) -> Decision:
        """The cache record's answer for this route, built on a route's first use when its policy changes
        what the upstream receives, and again once its identity assertion is due for renewal (stored back
        into the record, so the next request finds it)."""
        variant = route.upstream
        stored = admitted.allowed if variant is None else admitted.by_route.get(id(variant))
        if stored is not None and self._clock.now() < stored.renew_at:
            return stored
        fresh = self._build(admitted.principal, route, admitted.ceiling, admitted.scheme)
        if variant is None:
            updated = admitted._replace(allowed=fresh)
        else:
            updated = admitted._replace(by_route={**admitted.by_route, id(variant): fresh})
        self._positive.put(key, updated, admitted.principal.expires_at)
        return fresh

    def _verify_now(
        self, credential: Credential, key: bytes, attrs: RequestAttributes, door: str, route: Route
    ) -> Admitted | Decision | int:
        """First sight of a token an authenticator can vouch for without I/O: no task, no await.

        When the answer needs I/O (an unknown kid may need a key refresh; an opaque token goes to
        introspection), the asynchronous path takes over (`_verify`), from the authenticator that said so:
        its index among the route's (`_authenticators_for`), returned.
        """
        started = time.perf_counter()
        seen = Seen()
        authenticators, untrusted = self._authenticators_for(route)
        try:
            for index, authenticator in enumerate(authenticators):
                try:
                    verified = authenticator.verify_now(credential.token, seen)
                except NotResponsible:
                    continue
                if verified is None:
                    return index
                break
            else:
                raise issuer_not_trusted() if untrusted else none_responsible(credential.token)
            principal = self._with_roles(verified)
        except VerifierError as exc:
            return self._refused(exc, credential, key, attrs, door, started, seen, route)
        return self._admitted(principal, credential, key, attrs, door, started, seen)

    def _first_seen_jwt(
        self,
        jwt: JwtVerifier,
        header: str,
        key: bytes,
        attrs: RequestAttributes,
        routed: tuple[Route, int],
        door: str,
    ) -> Decision | None:
        """The first sight of `Bearer <JWS>` when the JWT authenticator is asked first: `_verify_now`, `_admitted`
        and `_now` in one function, without the authenticator's `Seen`, its credential parse or a plan walk
        when no check applies (#24 goal 2). The same checks in the same order, the same answer, audit line,
        counts and cache record (tests/test_fused_first_seen.py compares them with the general path's);
        `_GENERAL` for anything else (another spelling or scheme, a token the JWT authenticator does not take,
        a syntax the general path refuses before any signature check, `verifier explain` listening).

        The RFC 6750 b64token syntax is checked only when the parse fails: a token that parses is three strict
        base64url segments (no `=`, `+`, `/`, white space or non-ASCII) joined by two dots, which is b64token.
        """
        token = header[len(_BEARER) :]
        if self.trace is not None or not token.startswith(jws.JWS_START):
            return _GENERAL
        started = time.perf_counter()
        credential = Credential(TokenScheme.BEARER, token)
        route, route_mask = routed
        try:
            parsed = jwt.parse(token)
        except VerifierError as exc:
            if not (credentials.is_b64token(token) and jws.looks_like_jws(token)):
                return _GENERAL
            self._hot_cache[_POSITIVE_MISS] += 1
            return self._refused(exc, credential, key, attrs, door, started, Seen(), route)
        self._hot_cache[_POSITIVE_MISS] += 1
        iss, kid, alg = parsed.payload.get("iss"), parsed.kid, parsed.alg
        issuer = iss if isinstance(iss, str) else ""
        try:
            verified = jwt.verify_now(parsed)
            if verified is None:
                return None
            principal = self._with_roles(verified)
        except VerifierError as exc:
            return self._refused(exc, credential, key, attrs, door, started, Seen(issuer, kid, alg), route)
        admitted = self._admit(principal, credential, key)
        allowed = admitted.allowed
        # The kid of the key that verified it (`principal.kid`): a token without one names none itself.
        self._record(
            attrs, door, allowed, started, key, issuer, principal.kid, alg, principal.subject, principal.client_id,
            principal.other_client,
        )  # fmt: skip
        now = self._clock.now()
        if admitted.mask & route_mask or route.upstream is not None or now >= allowed.renew_at:
            decision = self._now(admitted, attrs, routed, key)  # a check to run, the route's own answer, a renewal
            self._stable_until = 0.0  # as `_decide_cached` says of a first-seen token's answer
            return decision
        # What `_now` answers when no check runs: the stored answer, its max-age cut to the token's life left.
        age, left = allowed.cache_max_age, principal.expires_at - now
        if age <= 0 or left >= age:
            return allowed
        return allowed._replace(cache_max_age=max(0, int(left)))

    def _authenticators_for(self, route: Route) -> tuple[tuple[Authenticator, ...], bool]:
        """The authenticators a token may go to on this route, and whether a provider was left out.

        A provider the route does not trust (`issuers_any`) never sees its tokens; nor does any, when
        the route trusts several that take opaque tokens (an opaque token does not say whose it is).
        Worked out once per route.
        """
        found = self._by_route.get(id(route))
        if found is None or found[0] is not route:
            trusted = [a for a in self._authenticators if a.sends_to is None or route.trusts_issuer(a.sends_to)]
            if sum(a.sends_to is not None for a in trusted) > 1:
                trusted = [a for a in trusted if a.sends_to is None]
            found = self._by_route[id(route)] = (route, tuple(trusted), len(trusted) < len(self._authenticators))
        return found[1], found[2]

    async def _verify(
        self,
        credential: Credential,
        key: bytes,
        attrs: RequestAttributes,
        door: str,
        route: Route,
        *,
        io_from: int | None = None,
    ) -> Admitted | Decision:
        """First sight of a token: the first responsible authenticator, with I/O if need be (`io_from`: what
        `_verify_now` has just said of this token, the first authenticator that needs I/O for it; those before
        it said "not responsible", and each authenticator's `verify` does what its `verify_now` does, and the
        I/O, so they are not asked again)."""
        if io_from is None:
            done = self._verify_now(credential, key, attrs, door, route)
            if not isinstance(done, int):
                return done
            io_from = done
        started = time.perf_counter()
        seen = Seen()
        token_key = token_hash(key, attrs, credential)  # introspection caches and the audit fingerprint
        asked: Authenticator | None = None
        try:
            authenticators = self._authenticators_for(route)[0]  # `_verify_now` answered when none is trusted
            for asked in authenticators[io_from:] if io_from else authenticators:
                try:
                    verified = await asked.verify(credential.token, token_key, seen)
                except NotResponsible:
                    continue
                break
            else:
                raise none_responsible(credential.token)
            principal = self._with_roles(verified)
        except VerifierError as exc:
            # One provider's "inactive" is not another's: with several, the token is not remembered as bad.
            remember = asked is None or asked.sends_to is None or self._opaque_providers < 2
            return self._refused(exc, credential, key, attrs, door, started, seen, route, remember=remember)
        return self._admitted(principal, credential, key, attrs, door, started, seen)

    def _refused(
        self,
        error: VerifierError,
        credential: Credential,
        key: bytes,
        attrs: RequestAttributes,
        door: str,
        started: float,
        seen: Seen,
        route: Route,
        *,
        remember: bool = True,
    ) -> Decision:
        if self.trace is not None:
            self.trace("token", {"issuer": seen.issuer, "kid": seen.kid, "alg": seen.alg, "error": error})
        decision = self._refuse(error, credential.scheme, route)
        if remember and _negative_cacheable(error):
            until = self._clock.now() + self._negative_ttl
            if isinstance(error, TokenNotYetValid):  # the clock alone makes it valid: not remembered past that
                until = min(until, error.valid_from)
            self._negative.put(key, Refused(_held(error), credential.scheme), until)
        token_key = token_hash(key, attrs, credential)
        self._record(attrs, door, decision, started, token_key, seen.issuer, seen.kid, seen.alg, "")
        return decision

    def _admitted(
        self,
        principal: Principal,
        credential: Credential,
        key: bytes,
        attrs: RequestAttributes,
        door: str,
        started: float,
        seen: Seen,
    ) -> Admitted:
        if self.trace is not None:
            self.trace("token", {"issuer": seen.issuer, "kid": seen.kid, "alg": seen.alg, "principal": principal})
        admitted = self._admit(principal, credential, key)
        token_key = token_hash(key, attrs, credential)
        self._record(
            attrs,
            door,
            admitted.allowed,
            started,
            token_key,
            seen.issuer,
            principal.kid,  # the kid of the key that verified it, as `_first_seen_jwt` records
            seen.alg,
            principal.subject,
            principal.client_id,
            principal.other_client,
        )
        return admitted

    def _admit(self, principal: Principal, credential: Credential, key: bytes) -> Admitted:
        """The cache record of a token its authenticator vouched for (the checks that apply to it, its answer),
        stored under `key`."""
        mask = self._every_token
        for bit, check in self._for_some_tokens:
            if check.for_token(principal, credential):
                mask |= bit
        # A per-request check that applies on any route makes the stored answer no-store from the
        # start (built and serialized once); one bound to some routes (step-up) is applied per
        # request by `_reusable`.
        no_store = self._plan(mask & self._no_policy[1]).per_request
        ceiling = 0 if no_store else self._edge_max_age
        allowed = self._build(principal, self._no_policy[0], ceiling, credential.scheme)
        admitted = Admitted(principal, allowed, credential.scheme, self._plan(mask).checks, mask, ceiling)
        self._positive.put(key, admitted, principal.expires_at)
        return admitted

    def _reusable(self, principal: Principal, allowed: Decision, route: Route, plan: Plan) -> Decision:
        """The allow answer with how long a gateway may reuse it (issue: decisions the gateway may reuse).

        The smallest of: the configured ceiling (already in `allowed`), the principal's remaining
        lifetime (token `exp`, or an introspection result's freshness), and what each check that ran
        allows (`Check.reuse_left`). `no-store` when a check that ran is per request.
        """
        ceiling = allowed.cache_max_age
        if plan.per_request:
            return allowed if ceiling <= 0 else allowed._replace(cache_max_age=0)
        now = self._clock.now()
        left = principal.expires_at - now
        for check in plan.bounded:
            bound = check.reuse_left(principal, route, now)
            if bound is not None:
                left = min(left, bound)
        if ceiling <= 0 or left >= ceiling:
            # The same answer until `left` comes down to the ceiling (it falls as the clock runs) or its
            # identity assertion is renewed (`_stored`).
            self._stable_until = min(now + left - max(ceiling, 0), allowed.renew_at)
            return allowed
        return allowed._replace(cache_max_age=max(0, int(left)))

    def _refuse(self, error: VerifierError, scheme: TokenScheme | None, route: Route) -> Decision:
        """The refusal's answer on `route`, for a credential presented under `scheme` (None: no credential)."""
        if self.trace is not None:
            self.trace("refused", {"error": error})
        dpop = route.dpop_route or scheme is TokenScheme.DPOP
        static = not (error.challenge_params() or error.extra_headers() or error.extra_body())
        if static:
            memo_key = (type(error), error.code, error.description, error.scheme, dpop, route.challenge)
            memo = self._refusals.get(memo_key)
            if memo is not None:
                return memo
        decision = refuse(
            error,
            realm=self._realm,
            scheme=Scheme.DPOP if dpop else None,
            dpop_algs=self._dpop_algs,
            reusable_for=self._refusal_max_age,
            route_params=route.challenge,
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
        token_key: bytes,
        issuer: str,
        kid: str | None,
        alg: str,
        subject: str,
        client_id: str | None = None,
        other_client: str | None = None,
    ) -> None:
        """Counts a signature check and writes its audit line; `token_key` is the token's own SHA-256 (`token_hash`).
        `other_client` is a token's second client (`verifier.principal.clients_of`), its `azp` on the line."""
        # A refused token's `iss` is its sender's words (any value, any length): only a verified token's issuer
        # is noted on the span, whose `verifier.issuer` values a trace backend indexes.
        trace_id = self._tracing.token_checked(attrs.headers, issuer if decision.allowed else "")
        if alg and alg != "introspection":
            label = (alg if alg in SUPPORTED_ALGORITHMS else "other", "ok" if decision.allowed else decision.reason)
            signatures = self._signatures  # header values are attacker-chosen: an unknown alg counts as "other"
            signatures[label] = signatures.get(label, 0) + 1
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
                token_hash_=token_key,
                door=door,
                client_id=client_id,  # with subject "", a client-credentials token: no user
                trace_id=trace_id,
                # Both clients the route judged, when the token names two: rare, so off the direct fast path.
                azp=None if other_client is None else cut(other_client),
            )


__all__ = ["ANONYMOUS", "Admitted", "Pipeline", "Plan", "ProviderUnavailable", "Refused"]
