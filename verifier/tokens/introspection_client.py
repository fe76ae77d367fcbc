"""The introspection provider's client: RFC 7662 section 2 requests, client authentication, dispatchers.

`IntrospectionHttp` is the single seam to the network (one method, bytes in, status and bytes out);
tests replace it to inject faults, production uses `verifier.tokens.introspection_http.IntrospectionHttpClient`
(a lean HTTP/1.1 client with its own keep-alive pool, built by the composition root). Everything above the
seam (deadlines, the in-flight bound, the circuit breaker, client authentication, JSON decoding) is the same
in tests and in production.

Client authentication: RFC 6749 section 2.3.1 (`client_secret_basic`: each part form-urlencoded
before base64; `client_secret_post`) and RFC 7523 section 2.2 / 3 (`private_key_jwt`: a fresh
assertion per call with iss = sub = client_id, aud = the endpoint, a unique jti and a short exp).

Batch protocol (ours; no RFC defines one), offered by providers that can answer many tokens at once,
and by `verifier.devidp`:

    POST <batch_endpoint>                      client authentication as for RFC 7662
    Content-Type: application/json
    {"tokens": ["<token>", ...], "token_type_hint": "access_token"}

    200 {"results": [<RFC 7662 section 2.2 response>, ...]}   same length and order as "tokens"

With `client_secret_post` and `private_key_jwt` the credentials go as members of the JSON object
(`client_id`, `client_secret` / `client_assertion_type`, `client_assertion`).

A batch call that fails in a way one of its tokens may have caused (`Suspect`: a 4xx but 408 and 429, a 5xx but
503 and 504, a malformed or mismatched answer, an answer too large) is not every token's failure: once a batch of
our own token alone has been answered (the provider is up), the batch is split in halves, each asked again, down to
batches of one, so each token ends with its own answer or its own failure (`BatchDispatcher`). A provider that is
down fails our token too and the batch fails as before: one extra call, not one per token. A timeout, a transport
error, 503, 504, 408 and 429 are never split: they say the provider is down, slow or throttling, and every call
asked again would wait out the same deadline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import string
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar, cast

import jwt

from verifier import loops
from verifier.clock import Clock
from verifier.config.introspection import (
    DEFAULT_MAX_RESPONSE_BYTES,
    ClientAuth,
    IntrospectionConfig,
)
from verifier.errors import ProviderUnavailable
from verifier.observe.metrics import IssuerIntrospectionMetrics
from verifier.tokens.fetch import check_learned_url, url_origin
from verifier.tokens.introspection_breaker import Breaker, BreakerState
from verifier.tokens.jws import holds_lone_surrogate, lone_surrogate

log = logging.getLogger("verifier.introspection")
_R = TypeVar("_R")  # what a call begun at once hands its caller (`ProviderClient._begin`)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"  # RFC 7523 section 2.2
MAX_DISCOVERY_BYTES = 1 << 20  # 1 MiB: a larger discovery document is malformed

Headers = tuple[tuple[str, str], ...]


# Call results that count against the provider in the breaker: its faults, never its refusals. A 4xx
# answers the request (a throttled flood, a refused client, a token the provider will not discuss);
# counting it would let anyone who can send junk tokens open the breaker for everyone (issue #26 G7). Nor is an
# answer too large (`AnswerTooLarge`, "too_large"): its size follows the token's claims.
PROVIDER_FAULTS = frozenset({"timeout", "unreachable", "http_5xx", "malformed"})


def _failure_result(error: ProviderUnavailable) -> str:
    """The metrics result of a failed exchange (the seam's exception)."""
    if isinstance(error, ProviderTimedOut):
        return "timeout"
    return "too_large" if isinstance(error, AnswerTooLarge) else "unreachable"


def _status_result(status: int) -> str:
    """The metrics result for a non-200 answer; 429 is throttling (still 503 retry-later, not a fault)."""
    if status >= 500:
        return "http_5xx"
    return "throttled" if status == 429 else "http_4xx"


def _token_may_cause(status: int) -> bool:
    """Whether a non-200 answer may be one token's doing (a refusal, a crash on its content), not the provider's
    state: not 408, 429 (its deadline, its throttling), 503, 504 (overload, a gateway's timeout) or 1xx-3xx."""
    if status >= 500:
        return status not in (503, 504)
    return status >= 400 and status not in (408, 429)


class Suspect(ProviderUnavailable):
    """A failed answer one of the call's tokens may have caused (`_token_may_cause`, malformed JSON, a batch answer
    that does not match its batch): the same 503 as any provider failure, but a batch that fails with it is split
    (`BatchDispatcher`) rather than failing every token in it."""


class UnencodableAnswer(dict[str, Any]):
    """A decoded answer holding a lone surrogate (an escaped, unpaired `\\ud800`; `jws.holds_lone_surrogate`): no
    header or bucket key can carry its values, so the token is refused (`claim_invalid`), not the provider."""


class HttpRequest(NamedTuple):
    """One outbound call, fully built: the seam does no encoding of its own. (A named tuple, as `HttpReply`:
    one of each per provider call, built at a fraction of a frozen dataclass's cost.)"""

    method: str
    url: str
    headers: Headers
    body: bytes
    timeout: float  # seconds left before the caller gives up
    max_bytes: int  # a longer answer is a failure, not something to buffer


class HttpReply(NamedTuple):
    """Any HTTP answer: the status and at most `max_bytes` of body."""

    status: int
    body: bytes


class ProviderTimedOut(ProviderUnavailable):
    """A seam that keeps the request's deadline itself (`keeps_deadline`) raises this when it passes:
    the same 503 as any provider failure, counted as a timeout."""


class AnswerTooLarge(ProviderUnavailable):
    """A seam raises this for an answer longer than `request.max_bytes`: the same 503 as any provider failure,
    but an answer's size follows the token's claims (its groups, a profile its user writes), not the provider's
    health, so it never counts against the provider in the breaker (a user's bloated tokens would open it for
    everyone)."""


class IntrospectionHttp(Protocol):
    """The network seam: sends one request and returns the answer, whatever its status.

    A seam whose class sets `keeps_deadline = True` promises to end every call by `request.timeout`
    (raising `ProviderTimedOut`); the client then arms no deadline of its own around it. Any other
    seam (a test's) is bounded by the client.
    """

    async def send(self, request: HttpRequest) -> HttpReply:
        """Raises `ProviderUnavailable` on a transport failure or an oversized body (never for a status)."""
        ...


Done = Callable[[HttpReply | ProviderUnavailable], None]  # how an exchange ends: the answer or the failure


class StartsExchanges(Protocol):
    """A seam's optional `start(request, done)` (`IntrospectionHttpClient.start`): begins the exchange now
    and returns a function that drops it (True if it was still under way), or None having done nothing."""

    def __call__(self, request: HttpRequest, done: Done, /) -> Callable[[], bool] | None: ...


class Slots(asyncio.Semaphore):
    """A semaphore whose free slot can also be taken without awaiting (`take_now`: no coroutine, no
    `locked()` scan of the waiters; #24 goal 7)."""

    def take_now(self) -> bool:
        """Takes a slot if one is free and nobody waits for one (a waiter, even a cancelled one, goes first)."""
        # asyncio's own attributes, read and written by name: compiled (mypyc), this class cannot declare them.
        state: Any = self
        if state._value <= 0 or state._waiters:
            return False
        state._value -= 1
        return True

    def give_back(self) -> None:
        """`release()`, without its two Python frames when nobody waits for a slot (the same count either way)."""
        state: Any = self
        if state._waiters:
            self.release()  # wakes the next waiter
        else:
            state._value += 1


def basic_credentials(client_id: str, client_secret: str) -> str:
    """The `Authorization` value for client_secret_basic (RFC 6749 section 2.3.1: urlencode, then base64)."""
    raw = f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(client_secret, safe='')}"
    return "Basic " + base64.b64encode(raw.encode()).decode("ascii")


def client_assertion(config: IntrospectionConfig, audience: str, now: float) -> str:
    """A private_key_jwt client assertion (RFC 7523 section 3) for one call to `audience`."""
    if config.private_key is None:
        raise ValueError("private_key_jwt needs a private key")
    issued = int(now)
    claims = {
        "iss": config.client_id,
        "sub": config.client_id,
        "aud": audience,
        "jti": secrets.token_urlsafe(18),
        "iat": issued,
        "exp": issued + config.assertion_ttl_seconds,
    }
    return jwt.encode(claims, config.private_key, algorithm=config.assertion_alg)


def client_credentials(config: IntrospectionConfig, audience: str, now: float) -> tuple[Headers, dict[str, str]]:
    """The headers and body fields that authenticate the verifier for one call."""
    if config.client_auth is ClientAuth.CLIENT_SECRET_BASIC:
        return (("Authorization", basic_credentials(config.client_id, config.client_secret)),), {}
    if config.client_auth is ClientAuth.CLIENT_SECRET_POST:
        return (), {"client_id": config.client_id, "client_secret": config.client_secret}
    return (), {
        "client_id": config.client_id,
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": client_assertion(config, audience, now),
    }


FORM = ("Content-Type", "application/x-www-form-urlencoded")
JSON = ("Content-Type", "application/json")


_UNRESERVED = string.ascii_letters + string.digits + "_.-~"  # what quote_plus leaves as it is


def _form_body(token: str, rest: str) -> bytes:
    """An RFC 7662 section 2.1 body: application/x-www-form-urlencoded, as urlencode writes it (the token
    can break nothing out); `rest` is the hint and any client credentials, encoded. A token of unreserved
    characters only (the usual one) is written as it is, as `quote_plus` would, without its three frames."""
    value = token if not token.strip(_UNRESERVED) else urllib.parse.quote_plus(token)
    return f"token={value}&{rest}".encode("ascii")


class ProviderClient:
    """Talks to one issuer's introspection provider within the deadline, the in-flight bound and the breaker."""

    def __init__(
        self,
        *,
        issuer: str,
        config: IntrospectionConfig,
        endpoint: str | None,
        discovered_endpoint: Callable[[], str] | None,
        discovery_url: str,
        discovered_batch_endpoint: Callable[[], str] | None = None,
        http: IntrospectionHttp,
        clock: Clock,
        breaker: Breaker,
        metrics: IssuerIntrospectionMetrics,
    ) -> None:
        self.issuer = issuer
        self.config = config
        self._endpoint = config.endpoint or endpoint or ""
        self._discovered = discovered_endpoint
        self._discovered_batch = discovered_batch_endpoint
        self.batch_url = config.batch_endpoint  # or the provider's, learned with the RFC 7662 endpoint (`_learn_batch`)
        self._discovery_url = discovery_url
        self._http = http
        self._clock = clock
        self.breaker = breaker
        self._metrics = metrics
        self._slots = Slots(config.max_in_flight)
        # The production client ends each call by its deadline (one timer handle on the exchange): a second
        # deadline around it (an `asyncio.timeout`, ~6 us) would only race it (#24 goal 7).
        self._seam_keeps_deadline = getattr(type(http), "keeps_deadline", False) is True
        self._discovering: asyncio.Task[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # of the last call, kept while it runs (`_call`)
        # The last token the provider answered active (per-token calls): the half-open probe asks about it, not
        # about whichever token comes first after the cool-down (an attacker's the provider fails for would keep
        # the circuit open). One reference: bounded; set only on a call to the provider, never for a cached token.
        self._known_good: str | None = None
        # Before any token was answered active (a fresh worker), the probe asks about a token of our own, made up
        # here: the provider must answer it inactive (RFC 7662 section 2.2), and nobody else can choose or know it.
        self._own_probe = secrets.token_urlsafe(32)
        # A client secret authenticates every call the same way: encoded once, not per first-seen token.
        # A private_key_jwt assertion is fresh per call (its jti, iat and exp).
        self._fixed: tuple[Headers, str] | None = None
        self._post_headers: Headers = ()
        self._batch_fields: dict[str, str] = {}  # a batch body's members beside `tokens` (`start_introspect_batch`)
        self._batch_headers: Headers = ()
        if config.client_auth is not ClientAuth.PRIVATE_KEY_JWT:
            headers, fields = client_credentials(config, "", 0.0)
            self._fixed = headers, urllib.parse.urlencode({"token_type_hint": "access_token", **fields})
            self._post_headers = (*headers, FORM)
            self._batch_fields = {"token_type_hint": "access_token", **fields}
            self._batch_headers = (*headers, JSON)
        # A seam that keeps its deadline and can begin an exchange at once: `start_introspect`.
        start = getattr(http, "start", None) if self._seam_keeps_deadline else None
        self._start = cast(StartsExchanges, start) if callable(start) else None

    async def endpoint(self) -> str:
        """The RFC 7662 endpoint: configured, given, known to the key store's discovery, or fetched (once)."""
        if self._endpoint:
            return self._endpoint
        if self._discovered is not None:
            known = self._discovered()
            if known:
                self._endpoint = check_learned_url(known, issuer=self.issuer, what="introspection_endpoint")
                self._learn_batch(self._discovered_batch() if self._discovered_batch is not None else None, known)
                return known
        if self._discovering is None:
            self._discovering = asyncio.get_running_loop().create_task(self._discover())
        task = self._discovering
        try:
            self._endpoint = await asyncio.shield(task)
        finally:
            if task.done() and self._discovering is task:
                self._discovering = None
        return self._endpoint

    async def _discover(self) -> str:
        doc = await self._call(lambda: ("GET", self._discovery_url, (), b""), max_bytes=MAX_DISCOVERY_BYTES)
        # OIDC Discovery section 4.3: the document must name exactly the issuer we asked about.
        if not isinstance(doc, dict) or doc.get("issuer") != self.issuer:
            raise ProviderUnavailable("discovery issuer does not match the configured issuer")
        endpoint = doc.get("introspection_endpoint")
        endpoint = check_learned_url(endpoint, issuer=self.issuer, what="introspection_endpoint")
        self._learn_batch(doc.get("introspection_batch_endpoint"), endpoint)
        return endpoint

    def _learn_batch(self, value: object, endpoint: str) -> None:
        """Batch mode by default where the provider offers it (#24 goal 7): the batch endpoint its discovery metadata
        names (`introspection_batch_endpoint`: this verifier's batch protocol, not a registered name; the development
        provider's), taken with the RFC 7662 endpoint it came with, unless `batch: false` or one is configured. It must
        be on that endpoint's origin (the client secret goes to both) and pass the outbound URL rule; else it is
        logged and every token keeps its own POST."""
        if not value or not self.config.batch or self.config.batch_endpoint:
            return
        try:
            self.batch_url = check_learned_url(
                value, issuer=self.issuer, what="introspection_batch_endpoint", origin=url_origin(endpoint)
            )
        except ProviderUnavailable as exc:
            event = {"event": "introspection_batch_refused", "issuer": self.issuer}
            log.warning("batch endpoint not used: %s", exc, extra=event)

    async def introspect(self, token: str) -> dict[str, Any]:
        """One RFC 7662 section 2.1 request; the decoded section 2.2 answer (any JSON object).

        When the breaker is half-open, a token of our own goes first as the probe (`_probe_token`; its answer is
        dropped, its failure is this call's): the provider is judged on a token the caller did not choose, not
        on this one, which may be one it fails for. Both calls keep this call's deadline."""
        url = self._endpoint or await self.endpoint()

        def build_for(asked: str) -> Callable[[], tuple[str, str, Headers, bytes]]:
            def build() -> tuple[str, str, Headers, bytes]:
                if self._fixed is not None:
                    rest, headers = self._fixed[1], self._post_headers
                else:
                    creds, fields = client_credentials(self.config, url, self._clock.now())
                    rest = urllib.parse.urlencode({"token_type_hint": "access_token", **fields})
                    headers = (*creds, FORM)
                return "POST", url, headers, _form_body(asked, rest)

            return build

        deadline = None
        if self.breaker.state is BreakerState.HALF_OPEN:
            probe = self._probe_token()
            if probe is not None and probe != token:
                deadline = loops.kept(self._loop).time() + self.config.timeout_seconds
                await self._probe(build_for(probe), deadline)
        answer = await self._call(build_for(token), max_bytes=DEFAULT_MAX_RESPONSE_BYTES, deadline=deadline)
        if not isinstance(answer, dict):
            raise ProviderUnavailable("introspection answer is not a JSON object")
        if answer.get("active") is True:
            self._known_good = token
        return answer

    def _probe_token(self) -> str | None:
        """The token the half-open probe asks about: ours (the last token answered active, else our own made-up
        one) unless the last probe was ours and failed, then None: the caller's (see `introspection_breaker`)."""
        if self.breaker.failed_probes % 2:
            return None
        return self._known_good or self._own_probe

    async def _probe(self, build: Callable[[], tuple[str, str, Headers, bytes]], deadline: float) -> None:
        """Sends the half-open probe; raises if it failed, or if another call is the probe. Its answer is dropped:
        a refusal (a 4xx) is an answer too, and closes the circuit like any other (`_account`)."""
        try:
            await self._call(build, max_bytes=DEFAULT_MAX_RESPONSE_BYTES, deadline=deadline, probe=True)
        except ProviderUnavailable:
            if self.breaker.state is not BreakerState.CLOSED:
                raise

    async def introspect_batch(self, tokens: Sequence[str], deadline: float | None = None) -> list[dict[str, Any]]:
        """One call to the batch endpoint for every token (see the module docstring for the protocol), by
        `deadline` (loop time; default: the timeout from now).

        When the breaker is half-open, a batch of our own token alone goes first as the probe, as in `introspect`:
        the first batch after the cool-down holds whichever tokens came first (in a flood, the attacker's), and
        one token the provider fails for fails the whole batch."""
        url = self.batch_url

        def build_for(asked: Sequence[str]) -> Callable[[], tuple[str, str, Headers, bytes]]:
            def build() -> tuple[str, str, Headers, bytes]:
                headers, fields = client_credentials(self.config, url, self._clock.now())
                body = json.dumps({"tokens": list(asked), "token_type_hint": "access_token", **fields}).encode()
                return "POST", url, (*headers, JSON), body

            return build

        # `deadline` as given: a split batch's halves keep the whole batch's (`BatchDispatcher`)
        if self.breaker.state is BreakerState.HALF_OPEN:
            probe = self._probe_token()
            if probe is not None and probe not in tokens:
                if deadline is None:
                    deadline = loops.kept(self._loop).time() + self.config.timeout_seconds
                await self._probe(build_for((probe,)), deadline)
        answer = await self._call(
            build_for(tokens), max_bytes=DEFAULT_MAX_RESPONSE_BYTES * max(1, len(tokens)), deadline=deadline
        )
        return self._batch_results(tokens, answer)

    def _batch_results(self, tokens: Sequence[str], answer: Any) -> list[dict[str, Any]]:
        """Each token's answer from a batch call's decoded JSON; `Suspect` when it does not match the batch."""
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list) or len(results) != len(tokens):
            raise Suspect("batch introspection answer does not match the batch")
        if not all(isinstance(r, dict) for r in results):
            raise Suspect("batch introspection answer holds a non-object")
        for token, result in zip(tokens, results, strict=True):
            if result.get("active") is True:
                self._known_good = token  # the half-open probe's token
        if type(answer) is UnencodableAnswer:  # which of them: each is refused on its own, the others stand
            results = [UnencodableAnswer(r) if holds_lone_surrogate(r) else r for r in results]
        return results

    def start_introspect_batch(
        self, tokens: Sequence[str], deliver: Callable[[list[dict[str, Any]] | ProviderUnavailable], None]
    ) -> Callable[[], None] | None:
        """`introspect_batch` without a coroutine, when it can begin at once (`start_introspect`'s conditions, and
        the batch endpoint known): the batch is written now and `deliver` gets each token's answer, or the call's
        `ProviderUnavailable` (the caller splits a `Suspect` batch: `BatchDispatcher.failed`), in the callback that
        reads the answer. Returns a function that drops the call, or None having done nothing."""
        url = self.batch_url
        start = self._startable(url)
        if start is None:
            return None
        body = json.dumps({"tokens": tokens, **self._batch_fields}).encode()
        max_bytes = DEFAULT_MAX_RESPONSE_BYTES * max(1, len(tokens))
        request = HttpRequest("POST", url, self._batch_headers, body, self.config.timeout_seconds, max_bytes)
        return self._begin(start, request, lambda answer: self._batch_results(tokens, answer), deliver)

    async def answers_batches(self, deadline: float) -> bool:
        """Whether the batch endpoint answers a batch of our own made-up token alone (`_own_probe`: nobody else can
        choose or know it; RFC 7662 section 2.2 makes it inactive) by `deadline`: is the provider up? Its answer is
        dropped; the call counts in the metrics and the breaker as any other."""
        try:
            await self.introspect_batch((self._own_probe,), deadline)
        except ProviderUnavailable:
            return False
        return True

    def start_introspect(self, token: str, deliver: Callable[[IntrospectionResult], None]) -> Callable[[], None] | None:
        """`introspect` without a coroutine, when it can begin at once (#24 goal 7): the endpoint and a
        client secret known, an in-flight slot free, the breaker closed, and a seam that can start an
        exchange now (`IntrospectionHttpClient.start`: a pooled connection). The request is written now and
        `deliver` gets the decoded answer or the `ProviderUnavailable` in the callback that reads the
        answer: no task, no loop turn between the answer and its waiters. The same request, deadline,
        metrics and breaker accounting as `introspect`. Returns a function that drops the call (`deliver`
        is then never called; the breaker is released), or None having done nothing: then `introspect`."""
        start = self._startable(self._endpoint)
        if start is None:
            return None
        assert self._fixed is not None
        body = _form_body(token, self._fixed[1])
        request = HttpRequest(
            "POST", self._endpoint, self._post_headers, body, self.config.timeout_seconds, DEFAULT_MAX_RESPONSE_BYTES
        )

        def settle(answer: Any) -> IntrospectionResult:
            if not isinstance(answer, dict):
                return ProviderUnavailable("introspection answer is not a JSON object")
            if answer.get("active") is True:
                self._known_good = token  # the half-open probe's token (`introspect`)
            return answer

        return self._begin(start, request, settle, deliver)

    def _startable(self, url: str) -> StartsExchanges | None:
        """The seam's `start` with an in-flight slot taken, when a call to `url` can begin at once: a seam that can
        start exchanges, a client secret (a private_key_jwt assertion is made per call), the URL known, the breaker
        closed (`allow()` without side effects: a probe goes the long way). None: nothing taken."""
        start = self._start
        if (
            start is None
            or self._fixed is None
            or not url
            or self.breaker.state is not BreakerState.CLOSED
            or not self._slots.take_now()
        ):
            return None
        return start

    def _begin(
        self,
        start: StartsExchanges,
        request: HttpRequest,
        settle: Callable[[Any], _R],
        deliver: Callable[[_R | ProviderUnavailable], None],
    ) -> Callable[[], None] | None:
        """Writes `request` (its slot taken by `_startable`); the callback that reads the answer counts it, tells the
        breaker, and hands `deliver` what `settle` makes of the decoded JSON, or the call's `ProviderUnavailable`
        (`settle` may raise one: a `Suspect` answer). Returns the call's drop, or None having released the slot."""

        def answered(outcome: HttpReply | ProviderUnavailable) -> None:
            self._slots.give_back()
            result: _R | ProviderUnavailable
            try:
                if isinstance(outcome, ProviderUnavailable):
                    self._account(_failure_result(outcome))
                    result = outcome
                else:
                    status, answer = self._decode(outcome)
                    self._account(status)
                    result = answer if isinstance(answer, ProviderUnavailable) else settle(answer)
            except ProviderUnavailable as exc:
                result = exc
            except Exception:  # a bug: fail closed, never leave a waiter hanging (as the coroutine path)
                log.exception("introspection call failed", extra={"event": "introspection_error"})
                result = ProviderUnavailable("introspection failed")
            deliver(result)

        drop = start(request, answered)
        if drop is None:
            self._slots.release()
            return None
        self.breaker.allow()  # closed: True

        def cancel() -> None:
            if drop():
                self._slots.release()
                self.breaker.release()

        return cancel

    def _decode(self, reply: HttpReply) -> tuple[str, Any]:
        """The metrics result of an answer and its decoded JSON, or the `ProviderUnavailable` it is."""
        if reply.status != 200:
            status = reply.status
            failed = Suspect if _token_may_cause(status) else ProviderUnavailable
            return _status_result(status), failed(f"HTTP {status} from introspection provider")
        try:
            text = reply.body.decode()  # RFC 8259 section 8.1: UTF-8 (no guessing)
            answer = json.loads(text)  # the provider's: a repeated member is its last (see verifier.tokens.jws)
            if "\\u" in text and isinstance(answer, dict) and lone_surrogate(text, answer):
                answer = UnencodableAnswer(answer)  # rare: looked for only when an escape is there at all
            return "ok", answer
        except (ValueError, RecursionError):
            return "malformed", Suspect("introspection provider sent malformed JSON")

    def _account(self, result: str, probe: bool = False) -> None:
        """Counts one call's result and tells the breaker what it says about the provider (a `probe` of ours is
        judged on whether it was answered at all: a refusal is an answer)."""
        self._metrics.calls[result].inc()
        if result == "ok":
            self.breaker.success()
        elif result in PROVIDER_FAULTS:
            self.breaker.failure()
        elif probe:
            self.breaker.success()
        else:
            self.breaker.release()  # a refusal says nothing about the provider's health

    async def _call(
        self,
        build: Callable[[], tuple[str, str, Headers, bytes]],
        *,
        max_bytes: int,
        deadline: float | None = None,
        probe: bool = False,
    ) -> Any:
        """Waits for an in-flight slot, asks the breaker, sends, decodes; all within one deadline (the given
        loop time, or the timeout from now). A `probe` is a half-open probe of ours (`_account`)."""
        calls = self._metrics.calls
        loop = self._loop = loops.kept(self._loop)
        if deadline is None:
            deadline = loop.time() + self.config.timeout_seconds
        try:
            if self._slots.locked():  # a free slot is taken at once: no timer to arm
                async with asyncio.timeout_at(deadline):
                    await self._slots.acquire()
            else:
                await self._slots.acquire()
        except TimeoutError:
            calls["queue_timeout"].inc()
            raise ProviderUnavailable("introspection queue timed out") from None
        try:
            if not self.breaker.allow():
                calls["circuit_open"].inc()
                raise ProviderUnavailable("introspection provider circuit open")
            result = "ok"
            try:
                method, url, headers, body = build()
                request = HttpRequest(method, url, headers, body, max(deadline - loop.time(), 0.001), max_bytes)
                if self._seam_keeps_deadline:
                    reply = await self._http.send(request)
                else:
                    async with asyncio.timeout_at(deadline):
                        reply = await self._http.send(request)
                result, answer = self._decode(reply)
                if isinstance(answer, ProviderUnavailable):
                    raise answer
                return answer
            except TimeoutError:
                result = "timeout"
                raise ProviderUnavailable("introspection provider timed out") from None
            except ProviderUnavailable as exc:
                if result == "ok":  # else `_decode` named it (a status, malformed JSON)
                    result = _failure_result(exc)
                raise
            except asyncio.CancelledError:
                result = ""
                self.breaker.release()
                raise
            finally:
                if result:
                    self._account(result, probe)
        finally:
            self._slots.release()


IntrospectionResult = dict[str, Any] | ProviderUnavailable


class BatchDispatcher:
    """One HTTP call to the provider's batch endpoint answers the whole batch; a batch that fails in a way one of its
    tokens may have caused is split until each token has its own answer or its own failure.

    The bound, per failed batch of n tokens: one call of our own token (is the provider up?), then at most 2n - 2
    calls (the halves, down to batches of one: a binary tree with n leaves), fewer with few bad tokens (about
    2 log2 n for one); at most twice what the provider would see from a verifier without a batch endpoint (a call
    per token). All of them keep the batch's deadline, its in-flight slots and its breaker: a request waits no
    longer than for one call, a provider that stops answering mid-way stops the splitting (a timeout, 503, an
    open circuit are not split), and no window of time can pile up more than `max_in_flight` calls at once."""

    def __init__(self, client: ProviderClient) -> None:
        self._client = client

    async def dispatch(self, tokens: Sequence[str]) -> Sequence[IntrospectionResult]:
        """The batch's results, in order; never raises `ProviderUnavailable`: a token's failure is its result."""
        client = self._client
        loop = client._loop = loops.kept(client._loop)
        deadline = loop.time() + client.config.timeout_seconds  # the whole batch's, splits included
        try:
            return await client.introspect_batch(tokens, deadline)
        except ProviderUnavailable as exc:
            return await self.failed(tokens, exc, deadline)

    async def failed(
        self, tokens: Sequence[str], exc: ProviderUnavailable, deadline: float
    ) -> Sequence[IntrospectionResult]:
        """The batch's results after its call failed with `exc` (here, or begun by `start_introspect_batch`)."""
        client = self._client
        if len(tokens) < 2:
            return [exc]
        # One of the tokens, or the provider? Our own token alone tells: a provider that fails it is down (or
        # refuses us), and its failure is every token's, as before; one that answers it is up, and the batch's
        # failure is one of its tokens' doing.
        if not isinstance(exc, (Suspect, AnswerTooLarge)) or not await client.answers_batches(deadline):
            client._metrics.batch_failed.inc()
            return [exc] * len(tokens)
        client._metrics.batch_split.inc()
        return await self._split(tokens, deadline)

    async def _split(self, tokens: Sequence[str], deadline: float) -> list[IntrospectionResult]:
        half = len(tokens) // 2
        first, second = await asyncio.gather(self._part(tokens[:half], deadline), self._part(tokens[half:], deadline))
        return [*first, *second]

    async def _part(self, tokens: Sequence[str], deadline: float) -> list[IntrospectionResult]:
        try:
            return list(await self._client.introspect_batch(tokens, deadline))
        except ProviderUnavailable as exc:
            if len(tokens) < 2 or not isinstance(exc, (Suspect, AnswerTooLarge)):
                return [exc] * len(tokens)  # a batch of one: its token's own failure
            return await self._split(tokens, deadline)
