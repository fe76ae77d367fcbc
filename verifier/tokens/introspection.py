"""Opaque access tokens: OAuth 2.0 Token Introspection (RFC 7662) turned into a `Principal`.

Per issuer, one `Introspector`:

- cache: an active answer is reused until min(its `exp`, `positive_ttl_seconds`), an inactive one for
  `negative_ttl_seconds`; both bounded and keyed by the token's SHA-256. Transport failures, 5xx and
  answers without `active` are never remembered.
- single flight: concurrent requests for the same token share one provider call.
- batching, with a batch endpoint (group commit): distinct tokens arriving within `batch_window_seconds` go in one
  call while fewer than `max_batches_in_flight` batch calls are under way; at that bound they gather for a K-th of
  a call's recent duration (at most 25 ms), so at a steady rate each call carries what came in its share of a round
  trip and the provider sees a few calls at a time, not one per token (#24 goal 7: the verifier's CPU per token)
  (see `introspection_client`); a batch call that fails in a way one of its tokens may have caused (a 400, a
  500, a malformed answer) is split in halves once the provider has answered a token of our own, so a token the
  provider chokes on fails alone, not every token that shared its window (`BatchDispatcher`). Without one
  (RFC 7662: one token per POST) each first-seen token is sent at once, within the in-flight bound: a window
  would only delay it.
- failure: a timeout, transport error or non-200 answer is `ProviderUnavailable` (503, fail closed),
  unless `serve_stale_on_error` lets a cached, still-valid active answer stand in; a circuit breaker
  stops calls to a provider that keeps failing (and has answered no call for a short window: failures for
  some tokens alone never open it) and probes it back after a cool-down.

RFC 7662 section 2.2: only `"active": true` (the JSON boolean) means active. The answer's members are read like a
JWT access token's claims (`sub` or `client_id`, `scope`, `aud`, `exp`, `cnf`, `acr`...), and `aud` must name one of
the issuer's audiences, as for a JWT; an `aud` that is neither a string nor a non-empty list of strings, or that
names no audience (`""`, `[""]`), is malformed, never absent. Only an access token's answer is taken
(`_access_token_type`, an allow-list): a `token_type` or `typ` present must name an access token type (Bearer, DPoP,
`access_token`...), a `token_use` present must be `access_token`, and, where `aud` may be absent (`require_audience:
false`), the answer must name its `token_type` (node-oidc-provider's answer for a refresh token names neither).
Anything else (a refresh or ID token: `refresh_token`, Keycloak's `typ: Refresh`, `id_token`, RFC 8693's `N_A`) is
refused, and the refusal is remembered like an inactive answer (`negative_ttl_seconds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, NamedTuple

from verifier import loops
from verifier.clock import Clock
from verifier.config.introspection import ClientAuth, IntrospectionConfig, parse_introspection_config
from verifier.errors import (
    AudienceMismatch,
    ClaimInvalid,
    InternalError,
    InvalidToken,
    MalformedToken,
    ProviderUnavailable,
    TokenExpired,
    TokenNotYetValid,
    VerifierError,
    WrongTokenType,
)
from verifier.numbers import MAX_JSON_NUMBER, json_number
from verifier.observe.metrics import IssuerIntrospectionMetrics
from verifier.principal import Principal, clients_of, roles_of, scopes_of
from verifier.settings import DEFAULT_MAX_TOKEN_BYTES
from verifier.tokens.cache import ExpiringCache
from verifier.tokens.introspection_breaker import Breaker
from verifier.tokens.introspection_client import (
    BatchDispatcher,
    IntrospectionHttp,
    IntrospectionResult,
    ProviderClient,
    UnencodableAnswer,
)

__all__ = [
    "ClientAuth",
    "IntrospectionConfig",
    "Introspector",
    "parse_introspection_config",
]

log = logging.getLogger("verifier.introspection")

# What an answer's `token_type` or `typ` may say (lowered): an access token's type, nothing else. RFC 7662 section
# 2.2 means an access token type (RFC 6749 section 7.1; the IANA registry: `Bearer`, and `DPoP`, RFC 9449): what
# node-oidc-provider, Keycloak, Okta and Hydra answer for access tokens. Some providers name the kind instead
# (`access_token`, RFC 8693 section 3's URI), and Keycloak's answer carries its token's `typ` (`Bearer`, `DPoP`;
# a JWT's RFC 9068 `at+jwt`). An allow-list, not a list of the other kinds: each provider names its refresh and
# ID tokens its own way (`refresh_token`, Keycloak's `Refresh`, `Offline` and `ID`, `id_token`, RFC 8693's `N_A`:
# "not an access token"), and a type we cannot hold to its proof (`PoP`, `mac`) must not pass as a bearer token.
_ACCESS_TOKEN_TYPES = frozenset(
    {
        "bearer",
        "dpop",
        "access_token",
        "urn:ietf:params:oauth:token-type:access_token",
        "at+jwt",
        "application/at+jwt",
    }
)
# The members that name a token's kind, read by `_access_token_type`: RFC 7662's, and Keycloak's (its token's own).
_KIND_MEMBERS = ("token_type", "typ")
# A negative cache entry for an inactive answer: a hit raises a fresh `token_inactive` (an untracked value in a
# cache of up to `negative_entries`; `verifier.tokens.cache`). Any other remembered refusal is its own error.
_INACTIVE = True


class _Cached(NamedTuple):
    """An active answer: fresh until `fresh_until`; after that only a stand-in while the provider is down."""

    principal: Principal
    fresh_until: float


class _Verdict(NamedTuple):
    """What every waiter on one provider call gets: a principal, or an error each waiter raises afresh."""

    principal: Principal | None = None
    error: VerifierError | None = None

    def result(self) -> Principal:
        if self.error is not None:
            # A copy per waiter: one exception object raised in many tasks would share a traceback.
            raise copy.copy(self.error).with_traceback(None)
        assert self.principal is not None
        return self.principal


class _Pending(NamedTuple):
    token: str
    token_hash: bytes


def _audiences(value: Any) -> tuple[str, ...]:
    """`aud`: a string or a non-empty array of strings (RFC 7662 section 2.2; RFC 7519 section 4.1.3), () when absent.
    Anything else (a number, an object, `[]`, a list holding a non-string) is an answer we do not understand,
    refused: counted as absent, it passed where `aud` may be absent (`require_audience: false`). So is one naming
    no audience, `""` or a list of `""` only (Go's unset string): an answer that says nothing, not a mismatch
    (`check_claims` refuses a JWT's the same way)."""
    if value is None:
        return ()
    if isinstance(value, str):
        if value:
            return (value,)
    elif isinstance(value, list) and any(value) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ClaimInvalid("aud is not a non-empty string or a list of strings naming an audience", claim="aud")


def _access_token_type(answer: Mapping[str, Any]) -> str | None:
    """The answer's `token_type`, lowered (None: it names none), once every member that names the token's kind says
    it is an access token: `token_type` and `typ` one of `_ACCESS_TOKEN_TYPES`, `token_use` `access_token`. Absent,
    null or "" (Go's unset) says nothing. Raises `WrongTokenType` (`token_type_invalid`) for another kind,
    `ClaimInvalid` for a member that is not a string. A DPoP token must name its key (RFC 9449 section 6.2)."""
    token_type: str | None = None
    for name in _KIND_MEMBERS:
        value = answer.get(name)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise ClaimInvalid(f"{name} is not a string", claim=name)
        lowered = value.lower()
        if lowered not in _ACCESS_TOKEN_TYPES:
            raise WrongTokenType(f"not an access token ({name})")
        # RFC 9449 section 6.2: a DPoP token's answer names its key (`cnf.jkt`); without it no proof can be asked
        # for, and the token would pass as a bearer token (`verifier.checks.dpop` keys on `cnf.jkt`).
        if lowered == "dpop":
            cnf = answer.get("cnf")
            if not (isinstance(cnf, dict) and isinstance(cnf.get("jkt"), str)):
                raise ClaimInvalid("a DPoP token names no key (cnf.jkt)", claim="cnf")
        if name == "token_type":
            token_type = lowered
    # Ory Hydra (fosite) answers for its refresh tokens too, active, with the grant's `aud` and `token_type`: only
    # `token_use` says which kind it is (Oathkeeper refuses any but access_token; "" is Go's unset).
    token_use = answer.get("token_use")
    if token_use is not None and token_use != "":
        if not isinstance(token_use, str):
            raise ClaimInvalid("token_use is not a string", claim="token_use")
        if token_use.lower() != "access_token":
            raise WrongTokenType("not an access token (token_use)")
    return token_type


def _number(answer: Mapping[str, Any], name: str) -> float | None:
    value = answer.get(name)
    if value is None:
        return None
    if type(value) is int and -MAX_JSON_NUMBER <= value <= MAX_JSON_NUMBER:  # the usual time claim, at once
        return float(value)
    number = json_number(value)
    if number is None:  # NaN, Infinity, 10**400: a provider's answer is parsed by Python's json
        raise ClaimInvalid(f"{name} is not a number", claim=name)
    return number


_MAX_GATHER_SECONDS = 0.025  # the longest a token gathers while the batch calls are at their bound (a slow provider)


class Introspector:
    """Introspects one issuer's opaque tokens, with caches, single flight, batching and a breaker."""

    def __init__(
        self,
        *,
        issuer: str,
        audiences: tuple[str, ...],
        config: IntrospectionConfig,
        endpoint: str | None,
        http: IntrospectionHttp,
        clock: Clock,
        metrics: IssuerIntrospectionMetrics,
        breaker: Breaker,
        discovered_endpoint: Callable[[], str] | None = None,
        discovery_url: str = "",
        discovered_batch_endpoint: Callable[[], str] | None = None,
        leeway_seconds: float = 0.0,
    ) -> None:
        """Endpoint, first found wins: `config.endpoint`, `endpoint`, `discovered_endpoint()` (a late-bound
        lookup in discovery metadata someone else fetched), else discovery fetched here on first use from
        `discovery_url` (the issuer's configured one; default `{issuer}/.well-known/openid-configuration`).
        `http` is the network seam: the root's `IntrospectionHttpClient`, or a test's. `metrics` and
        `breaker` are the root's (`verifier.app.build_introspector`): the breaker reports to the breaker gauge.
        `leeway_seconds` is the issuer's clock skew allowance (`IssuerSettings.leeway_seconds`), on `nbf` and `iat`."""
        self.issuer = issuer
        self.audiences = frozenset(audiences)
        self.leeway_seconds = leeway_seconds
        self.config = config
        self._clock = clock
        self._metrics = metrics
        self.breaker = breaker
        self.client = ProviderClient(
            issuer=issuer,
            config=config,
            endpoint=endpoint,
            discovered_endpoint=discovered_endpoint,
            discovery_url=discovery_url or issuer.rstrip("/") + "/.well-known/openid-configuration",
            discovered_batch_endpoint=discovered_batch_endpoint,
            http=http,
            clock=clock,
            breaker=self.breaker,
            metrics=metrics,
        )
        self._batches = BatchDispatcher(self.client)  # with a batch endpoint
        self._positive: ExpiringCache[_Cached] = ExpiringCache(config.positive_entries, clock)
        # Refused tokens: `_INACTIVE`, or the refusal of an active answer that is no access token's (a refresh
        # token's, a malformed one): each remembered, or a stolen refresh token would be asked about on every request
        # where the pipeline does not remember it (several opaque providers, `introspect_jwts`).
        self._negative: ExpiringCache[VerifierError | bool] = ExpiringCache(config.negative_entries, clock)
        # Single flight: the futures of every request waiting for one token's provider call.
        self._inflight: dict[bytes, list[asyncio.Future[_Verdict]]] = {}
        self._pending: list[_Pending] = []
        self._timer: asyncio.Handle | None = None
        self._batch_calls = 0  # batch calls under way (`_flush`): at `max_batches_in_flight`, tokens gather
        self._call_seconds = 0.0  # a batch call's recent duration (a moving average), for the gathering
        self._tasks: set[asyncio.Task[None]] = set()  # batch calls
        # One token's call (no batch endpoint), by its hash: it removes itself when done, so no done
        # callback (a loop turn per token) is needed to forget it.
        self._calls: dict[bytes, asyncio.Task[None]] = {}
        self._started: dict[bytes, Callable[[], None]] = {}  # calls begun without a task: their cancel
        self._batch_cancels: set[Callable[[], None]] = set()  # batch calls begun without a task (`_start_batch`)
        self._closed = False
        # The loop of the last `introspect` (its futures' and tasks'): kept while it runs, since one process runs
        # one loop at a time and an introspector is used from one thread.
        self._loop: asyncio.AbstractEventLoop | None = None

    async def introspect(self, token: str, token_hash: bytes) -> Principal:
        """The principal of an active token for this issuer's audiences.

        Raises `InvalidToken` (code `token_inactive`) for an inactive token, another `InvalidToken`
        subclass for an unusable answer, `AudienceMismatch`, or `ProviderUnavailable`. The principal's
        `expires_at` is when this answer stops being fresh (min of `exp` and the positive TTL), so
        nothing cached from it outlives the revocation bound; the token's own `exp` is in `claims`.
        """
        cached = self._positive.get(token_hash)
        if cached is not None and self._clock.now() < cached.fresh_until:
            self._metrics.positive_hit.inc()
            return cached.principal
        refused = self._negative.get(token_hash)
        if refused is not None:
            self._metrics.negative_hit.inc()
            if refused is _INACTIVE:
                raise InvalidToken("token is not active", code="token_inactive")
            assert isinstance(refused, VerifierError)
            raise copy.copy(refused)  # a copy per raise: one exception object raised many times keeps each traceback
        if self._closed:
            raise ProviderUnavailable("introspection is shutting down")
        if len(token) > DEFAULT_MAX_TOKEN_BYTES:
            raise MalformedToken("token too large")
        # A future per waiter: one giving up (cancelled) must not cancel the answer the others wait for.
        loop = self._loop = loops.kept(self._loop)
        future: asyncio.Future[_Verdict] = loop.create_future()
        waiters = self._inflight.get(token_hash)
        if waiters is None:
            self._metrics.miss.inc()
            self._inflight[token_hash] = [future]
            if not self.client.batch_url:  # one POST per token (RFC 7662): no window, no batch
                if not self._start_now(token, token_hash):
                    self._calls[token_hash] = loop.create_task(self._one(token, token_hash))
            else:
                self._enqueue(_Pending(token, token_hash))
        else:
            self._metrics.coalesced.inc()
            waiters.append(future)
        verdict = await future
        return verdict.result()

    # -- batching --------------------------------------------------------------------------

    def _enqueue(self, pending: _Pending) -> None:
        """Group commit: below `max_batches_in_flight` batch calls under way, the pending tokens go after the window
        (at the end of this loop turn when it is 0). At it, they gather for a K-th of a batch call's recent duration
        (K the bound, at most `_MAX_GATHER_SECONDS`): at a steady rate about K calls stay under way, each with what
        came in its share of a round trip, and no token waits longer than that share. A full batch goes at once
        either way (`max_in_flight` still bounds the calls)."""
        self._pending.append(pending)
        if len(self._pending) >= self.config.max_batch_size:
            self._flush_now()
        elif self._timer is None:
            loop = self._loop  # set by `introspect`, on this loop: no lookup (a getpid() on CPython 3.11)
            assert loop is not None
            config = self.config
            wait = config.batch_window_seconds
            if self._batch_calls >= config.max_batches_in_flight:
                wait = max(wait, min(self._call_seconds / config.max_batches_in_flight, _MAX_GATHER_SECONDS))
            self._timer = loop.call_later(wait, self._flush_now) if wait > 0 else loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            self._batch_calls += 1
            if not self._start_batch(batch):
                self._start(self._flush(batch))

    def _start(self, call: Coroutine[Any, Any, None]) -> None:
        loop = self._loop  # `_flush_now` runs from `introspect`, its batch timer or a call's end: on this loop
        assert loop is not None
        task = loop.create_task(call)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_now(self, token: str, token_hash: bytes) -> bool:
        """One token's RFC 7662 call begun at once, when the client can (`ProviderClient.start_introspect`):
        its answer is settled and handed to the waiters in the callback that reads it. False: not begun."""

        def answered(result: IntrospectionResult) -> None:
            self._started.pop(token_hash, None)  # forgotten before the waiters wake, as in `_one`
            self._deliver(token_hash, result)

        cancel = self.client.start_introspect(token, answered)
        if cancel is None:
            return False
        self._metrics.batch_size.observe(1)
        self._started[token_hash] = cancel
        return True

    async def _one(self, token: str, token_hash: bytes) -> None:
        """One token's RFC 7662 call (no batch endpoint)."""
        self._metrics.batch_size.observe(1)
        result: IntrospectionResult
        try:
            result = await self.client.introspect(token)
        except ProviderUnavailable as exc:
            result = exc
        except asyncio.CancelledError:
            self._calls.pop(token_hash, None)
            self._fail([token_hash], ProviderUnavailable("introspection is shutting down"))
            raise
        except Exception:  # a bug: fail closed, never leave a waiter hanging
            log.exception("introspection call failed", extra={"event": "introspection_error"})
            result = ProviderUnavailable("introspection failed")
        # Forgotten before the waiters wake: a waiter that asks again for this token starts a call of its own.
        self._calls.pop(token_hash, None)
        self._deliver(token_hash, result)

    def _start_batch(self, batch: list[_Pending]) -> bool:
        """One batch call begun at once, when the client can (`ProviderClient.start_introspect_batch`): its answers
        are settled and handed to the waiters in the callback that reads them, as `_start_now` does for one token.
        A failed call of several tokens goes on in a task (`BatchDispatcher.failed`: split, or every token's
        failure). False: not begun (`_flush` then)."""
        loop = self._loop
        assert loop is not None
        began = loop.time()
        ended = False
        cancel: Callable[[], None] | None = None  # bound below, unless the call ends before `start` returns

        def answered(results: list[dict[str, Any]] | ProviderUnavailable) -> None:
            nonlocal ended
            ended = True
            if cancel is not None:
                self._batch_cancels.discard(cancel)
            self._batch_ended(loop.time() - began)
            if isinstance(results, ProviderUnavailable):
                if len(batch) < 2:
                    self._deliver(batch[0].token_hash, results)
                else:
                    deadline = began + self.config.timeout_seconds  # the whole batch's, splits included
                    self._start(self._dispatch(batch, failure=(results, deadline)))
                return
            for pending, result in zip(batch, results, strict=True):
                self._deliver(pending.token_hash, result)

        cancel = self.client.start_introspect_batch([p.token for p in batch], answered)
        if cancel is None:
            return False
        self._metrics.batch_size.observe(len(batch))
        if not ended:
            self._batch_cancels.add(cancel)
        return True

    def _batch_ended(self, took: float) -> None:
        """A batch call is over: one fewer under way, and its duration in the moving average (`_enqueue`)."""
        self._batch_calls -= 1
        self._call_seconds = took if not self._call_seconds else 0.8 * self._call_seconds + 0.2 * took

    async def _flush(self, batch: list[_Pending]) -> None:
        """One batch call (`_flush_now` counted it in `_batch_calls`), timed for the gathering (`_enqueue`)."""
        loop = self._loop
        assert loop is not None
        began = loop.time()
        self._metrics.batch_size.observe(len(batch))
        try:
            await self._dispatch(batch)
        finally:
            self._batch_ended(loop.time() - began)

    async def _dispatch(
        self, batch: list[_Pending], failure: tuple[ProviderUnavailable, float] | None = None
    ) -> None:
        """The batch's call and its answers to the waiters; after `failure` (the first call's, and the batch's
        deadline), only what follows it: the split, or every token's failure."""
        results: list[IntrospectionResult]
        tokens = [p.token for p in batch]
        try:
            if failure is None:
                answers = await self._batches.dispatch(tokens)
            else:
                answers = await self._batches.failed(tokens, *failure)
            if len(answers) != len(batch):
                raise ProviderUnavailable("introspection dispatcher answered a different number of tokens")
            results = list(answers)
        except ProviderUnavailable as exc:
            results = [exc] * len(batch)
        except asyncio.CancelledError:
            self._fail([p.token_hash for p in batch], ProviderUnavailable("introspection is shutting down"))
            raise
        except Exception:  # a bug: fail closed, never leave a waiter hanging
            log.exception("introspection dispatch failed", extra={"event": "introspection_error"})
            results = [ProviderUnavailable("introspection failed")] * len(batch)
        for pending, result in zip(batch, results, strict=True):
            self._deliver(pending.token_hash, result)

    def _deliver(self, token_hash: bytes, result: IntrospectionResult) -> None:
        """Settles one token's result and hands the verdict to everyone waiting for it."""
        try:
            verdict = self._settle(token_hash, result)
        except Exception:
            log.exception("introspection answer handling failed", extra={"event": "introspection_error"})
            verdict = _Verdict(error=InternalError("internal error"))
        self._wake(token_hash, verdict)

    def _wake(self, token_hash: bytes, verdict: _Verdict) -> None:
        for future in self._inflight.pop(token_hash, ()):
            if not future.done():  # a waiter that gave up is cancelled
                future.set_result(verdict)

    def _fail(self, token_hashes: Iterable[bytes], error: VerifierError) -> None:
        for token_hash in token_hashes:
            self._wake(token_hash, _Verdict(error=error))

    # -- answers ---------------------------------------------------------------------------

    def _settle(self, token_hash: bytes, result: IntrospectionResult) -> _Verdict:
        """Turns one provider result into a verdict, caching what may be cached."""
        if isinstance(result, ProviderUnavailable):
            if self.config.serve_stale_on_error:
                stale = self._positive.get(token_hash)  # present only while still within exp and the stale TTL
                if stale is not None:
                    self._metrics.stale_hit.inc()
                    log.warning(
                        "introspection provider unavailable; serving a cached answer",
                        extra={"event": "introspection_stale", "issuer": self.issuer, "error": result.description},
                    )
                    return _Verdict(principal=stale.principal)
            return _Verdict(error=ProviderUnavailable(result.description))
        now = self._clock.now()
        active = result.get("active")
        if active is not True:
            if active is None:  # section 2.2: REQUIRED. An error object, another endpoint: no verdict, none kept
                return self._settle(token_hash, ProviderUnavailable("introspection answer has no active member"))
            self._positive.discard(token_hash)  # revoked: never serve the old answer, even when stale
            self._negative.put(token_hash, _INACTIVE, now + self.config.negative_ttl_seconds)
            return _Verdict(error=InvalidToken("token is not active", code="token_inactive"))
        try:
            principal, exp = self._principal(result, now)
        except VerifierError as exc:
            # Every refusal of an active answer is the token's (another kind, malformed, expired, not for these
            # audiences), remembered as an inactive answer is; one the clock alone lifts only until then.
            until = now + self.config.negative_ttl_seconds
            if isinstance(exc, TokenNotYetValid):
                until = min(until, exc.valid_from)
            self._positive.discard(token_hash)  # never served stale either
            self._negative.put(token_hash, exc.with_traceback(None), until)
            return _Verdict(error=exc)
        fresh_until = principal.expires_at
        keep_until = (
            min(exp, fresh_until + self.config.stale_ttl_seconds) if self.config.serve_stale_on_error else (fresh_until)
        )
        self._positive.put(token_hash, _Cached(principal, fresh_until), keep_until)
        return _Verdict(principal=principal)

    def _principal(self, answer: Mapping[str, Any], now: float) -> tuple[Principal, float]:
        """Checks an active answer like JWT claims and builds the principal; returns it and the token's exp."""
        if type(answer) is UnencodableAnswer:  # as a JWT's would be (jws): no header, no bucket key can carry it
            raise ClaimInvalid("introspection answer holds a lone surrogate (not Unicode text)")
        iss = answer.get("iss")
        if iss is not None and iss != self.issuer:
            raise InvalidToken("introspection answer names another issuer", code="issuer_mismatch")
        token_type = _access_token_type(answer)
        exp = _number(answer, "exp")
        if exp is not None and now >= exp:
            raise TokenExpired("token expired")
        nbf = _number(answer, "nbf")
        # The provider has just said active: an `nbf` ahead of our clock within the leeway is skew between the two
        # clocks (Hydra's is when the token was asked for, a moment ago), and the pipeline remembers a refusal.
        # `exp` stays exact: a token ending is never a lockout, and nothing cached from it outlives it.
        if nbf is not None and now + self.leeway_seconds < nbf:
            raise TokenNotYetValid("token not yet valid", valid_from=nbf - self.leeway_seconds)
        # Revocation entries reach the tokens issued up to their event (our clock): an `iat` further ahead than the
        # leeway could never be reached (a provider clock running ahead), so it is refused, as a JWT's is.
        iat = _number(answer, "iat")
        if iat is not None and now + self.leeway_seconds < iat:
            raise TokenNotYetValid("token issued in the future", valid_from=iat - self.leeway_seconds)
        # Read later by policies and revocation: a number or absent, not ahead beyond the leeway (a JWT's `auth_time`).
        auth_time = _number(answer, "auth_time")
        if auth_time is not None and now + self.leeway_seconds < auth_time:
            raise TokenNotYetValid(
                "authentication (auth_time) in the future", valid_from=auth_time - self.leeway_seconds
            )
        sub = answer.get("sub")
        if sub is not None and not isinstance(sub, str):
            raise ClaimInvalid("sub is not a string", claim="sub")
        sid = answer.get("sid")  # a string, as a JWT's (`check_claims`): any other escaped every session revocation
        if sid is not None and not isinstance(sid, str):
            raise ClaimInvalid("sid is not a string", claim="sid")
        client, other_client = clients_of(answer)  # `client_id`, else `azp` (Keycloak answers with both)
        if not (sub or client):
            raise ClaimInvalid("token names no subject", claim="sub")
        subject = sub or ""  # a client is not a user: see `Principal`
        audiences = _audiences(answer.get("aud"))
        if not audiences:
            if self.config.require_audience:
                raise ClaimInvalid("aud is required", claim="aud")
            # Without `aud`, `token_type` is all that tells an access token from a refresh token: node-oidc-provider
            # answers its refresh tokens active with the user's `sub` and `scope` but neither member (its access
            # tokens' answers always name their type). An answer naming neither may be one: refused (RFC 6749 1.5).
            if token_type is None:
                raise WrongTokenType("an answer without aud names no token_type (perhaps a refresh token)")
        elif not any(a in self.audiences for a in audiences):
            raise AudienceMismatch("token is not for this audience")
        token_exp = exp if exp is not None else now + self.config.positive_ttl_seconds
        claims = dict(answer)
        del claims["active"]  # present: only `"active": true` gets here
        claims.setdefault("iss", self.issuer)
        principal = Principal(
            issuer=self.issuer,
            subject=subject,
            client_id=client,
            scopes=scopes_of(claims),
            roles=roles_of(claims),
            expires_at=min(token_exp, now + self.config.positive_ttl_seconds),
            claims=claims,
            other_client=other_client,
        )
        return principal, token_exp

    # -- lifecycle -------------------------------------------------------------------------

    async def close(self) -> None:
        """Fails whatever is queued, cancels calls in flight and waits for them to end."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending = []
        tasks = [*self._tasks, *self._calls.values()]
        self._calls.clear()
        started, self._started = self._started, {}
        for cancel in [*started.values(), *self._batch_cancels]:
            cancel()  # their waiters are failed below
        self._batch_cancels.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Queued tokens, and calls cancelled before they began (their task never ran its handler).
        self._fail(list(self._inflight), ProviderUnavailable("introspection is shutting down"))
