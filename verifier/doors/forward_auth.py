"""HTTP/1.1 forward-auth: the fast door for Kong's Lua plugin, nginx `auth_request`, Traefik/Caddy
forward-auth and Envoy's HTTP ext_authz mode.

An asyncio Protocol over `httptools` (llhttp): no framework, no per-request objects beyond the
attributes, a pre-serialized answer for every cached decision, keep-alive, TCP_NODELAY (without it
Nagle's algorithm adds ~40 ms to every answer) and in-order answers for pipelined requests. A read that
is one whole bodyless keep-alive request is parsed in C instead (`_http_head.c`: a strict subset of what
llhttp takes, everything else left to llhttp), in one call rather than llhttp's ten callbacks.

Every header is a trust decision. The original request is described by ONE declared family of
headers (`http.forwarded_headers`), which the gateway in front must overwrite on every request; the
other family is never read, not even as a fallback, since whatever a gateway does not overwrite
(nginx `auth_request` passes the client's headers through) the client chose:
- `x-forwarded` (default; Kong's plugin, Traefik, Caddy): `X-Forwarded-Method`, `-Uri`, `-Host`
  (+ `-Port`), `-Proto`, and the client address from the first `X-Forwarded-For` element;
- `x-original` (nginx style): `X-Original-Method`, `X-Original-URI`, `X-Original-Host`,
  `X-Original-Proto`; the client address is the peer's (no standard header names it).
A header of the family that is absent falls back to this request: its own method (Envoy HTTP mode),
what follows `/v1/forward-auth` in its target (Envoy appends the original path); the `Host` header; scheme
`http`. A check whose path neither tells (a gateway sending the other family, or without the path header) is
refused, 400 `invalid_request` (`undescribed`), never judged as `/`; so is a check without the family's host
header when a policy names hosts (its `Host` is the verifier's own name behind nginx). `X-Envoy-Original-Path`,
`X-HTTP-Method-Override` and the like are never read.
A header of the family sent twice (a gateway that adds its own beside the client's instead of overwriting it)
is refused, 400 `invalid_request`: which of the two describes the request is unknown (`described_twice`).

The client certificate's thumbprint (RFC 8705 `x5t#S256`) is read only from the header named by
`mtls_thumbprint_header`; by default none is, so a certificate-bound token is refused here unless the
operator declares the header their gateway overwrites.

On an allow, identity headers a client sent (`X-Authenticated-*`) that this answer does not set are
listed in `x-envoy-auth-headers-to-remove` (Envoy HTTP mode removes them; the headers we set
overwrite). Connections whose request does not arrive within `http.header_timeout_seconds`, or that
stay idle for `http.idle_timeout_seconds`, are closed.

A keep-alive request whose raw bytes were answered from memory before is answered again from the
door's answer memo (`verifier.doors.answer_memo`) before it is parsed, while the pipeline says the
answer holds and nothing it read has changed; every other request takes the path above.

Stopping drains (`stop`): the door stops accepting (a listening socket the supervisor bound stays open for
the worker's successor, `verifier.workers`), answers every request it has been sent with `Connection:
close`, gives a connection that has sent nothing yet `FRESH_GRACE_SECONDS` to send its first request (a
client sends it right after connecting), and closes idle keep-alives, which a client may retry on a new
connection (RFC 9112 section 9.3.1; nginx does for its cached upstream connections).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

import httptools

from verifier.decision import Decision, smuggled_identity
from verifier.doors.acceptor import Acceptor, listening_sockets
from verifier.doors.admission import LoopClock
from verifier.doors.answer_memo import AnswerMemo
from verifier.doors.routes import HttpAnswer, HttpRequest, Router
from verifier.observe.metrics import Metrics
from verifier.observe.traceparent import TRACEPARENT, TRACESTATE
from verifier.observe.tracing import DecisionSpan, Tracing
from verifier.pipeline import Pipeline
from verifier.request import RequestAttributes, Undescribed, normalize_authority
from verifier.settings import ForwardAuthSettings

try:  # one whole bodyless keep-alive request parsed in one call (verifier/doors/_http_head.c, built by `pip install`)
    from verifier.doors._http_head import head as _native_head

    WHOLE_HEAD: Callable[[bytes, int], tuple[bytes, bytes, dict[str, str]] | None] | None = _native_head
except ImportError:  # not built (no C compiler): every request goes to llhttp
    WHOLE_HEAD = None

log = logging.getLogger("verifier.forward_auth")

DOOR = "forward_auth"
PREFIX = b"/v1/forward-auth"
MAX_HEADER_BYTES = 32 * 1024  # per request; larger is refused with 431 (tokens are bounded at 8 KiB)
MAX_HEADERS = 128  # header fields per request
MAX_HEADER_NAMES = 1024  # distinct field names kept decoded (a gateway sends a few dozen)
MAX_PIPELINED = 64  # answers pending on one connection before we stop reading from it
LINGER_SECONDS = 1.0  # after a refused request, how long we keep reading before closing
MAX_BODY_BYTES = 64 * 1024  # forward-auth requests carry no body we need; bound what we swallow
TIMER_SLACK_SECONDS = 0.001  # a loop may wake a timer this early (libuv has millisecond timers)
DRAIN_SECONDS = 5.0  # stopping: how long answers still owed get, at most
FRESH_GRACE_SECONDS = 1.0  # stopping: how long a connection that has sent nothing yet gets to send its request
DRAIN_POLL_SECONDS = 0.02  # stopping: how often the connections' state is looked at

_ERROR_ANSWERS = {
    400: b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    404: b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
    413: b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    431: b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
}
_HEALTH_OK = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 8\r\n\r\nSERVING\n"
_HEALTH_NOT = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 12\r\n\r\nNOT_SERVING\n"
# The same answers to HEAD: no content (RFC 9110 section 9.3.2), or the client reads it as the next answer.
_HEALTH_OK_HEAD = _HEALTH_OK.removesuffix(b"SERVING\n")
_HEALTH_NOT_HEAD = _HEALTH_NOT.removesuffix(b"NOT_SERVING\n")


_NONE_REPEATED: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True, slots=True)
class ForwardedHeaders:
    """One family of headers that describes the original request (names lower-case; "" = none)."""

    method: str
    path: str
    host: str
    port: str
    scheme: str
    client: str


FORWARDED_FAMILIES = {
    "x-forwarded": ForwardedHeaders(
        method="x-forwarded-method",
        path="x-forwarded-uri",
        host="x-forwarded-host",
        port="x-forwarded-port",
        scheme="x-forwarded-proto",
        client="x-forwarded-for",
    ),
    "x-original": ForwardedHeaders(
        method="x-original-method",
        path="x-original-uri",
        host="x-original-host",
        port="",
        scheme="x-original-proto",
        client="",
    ),
}
X_FORWARDED = FORWARDED_FAMILIES["x-forwarded"]


def attributes_from_http(
    method: str,
    target: bytes,
    headers: dict[str, str],
    peer: str,
    family: ForwardedHeaders = X_FORWARDED,
    thumbprint_header: str = "",
    hosts_named: bool = False,
) -> RequestAttributes:
    """Builds the original request's attributes from a forward-auth request, reading only `family`.

    `hosts_named`: policies match on hosts, so a check must tell its host in the family's host header. Its `Host`
    is the verifier's own upstream name behind nginx's auth_request (`$proxy_host`): judged on it, a request for a
    host-scoped route met none of the host's policies and fell to a laxer one. Refused (`Undescribed`) instead."""
    get = headers.get
    path = get(family.path)
    if not path:
        if target.startswith(PREFIX):
            suffix = target[len(PREFIX) :].decode("latin-1")
            if not suffix:
                raise Undescribed(f"no {family.path} header and no path after /v1/forward-auth")
            path = suffix if suffix.startswith("/") else "/" + suffix.lstrip("?")
        else:  # not a check (our own endpoints read the family's scheme and host alone)
            path = "/"
    scheme = get(family.scheme, "http").lower()
    host = get(family.host)
    if not host and hosts_named and target.startswith(PREFIX):
        raise Undescribed(f"no {family.host} header, and the policies name hosts")
    if host is None:
        host = get("host", "")
    elif family.port:
        # Kong and Traefik send the port apart; DPoP's htu (RFC 9449) needs it when not the default.
        port = get(family.port)
        if port and ":" not in host.rpartition("]")[2]:  # the scheme's default left out (`normalize_authority`)
            host = f"{host}:{port}"
    client = get(family.client, "").split(",", 1)[0].strip() if family.client else ""
    return RequestAttributes(  # positional (every request builds one): method, scheme, host, path, headers, ...
        (get(family.method) or method).upper(),
        scheme,
        normalize_authority(host, scheme),
        path,
        headers,
        client or peer,  # client_address
        get(thumbprint_header, "") if thumbprint_header else "",  # client_cert_thumbprint
    )


class _Connection(asyncio.Protocol):
    """One keep-alive connection from a gateway."""

    __slots__ = (
        "_body",
        "_body_bytes",
        "_closing",
        "_completed",
        "_deadline",
        "_door",
        "_header_bytes",
        "_headers",
        "_held",
        "_loop",
        "_name",
        "_offer",
        "_opened",
        "_parser",
        "_paused",
        "_peer",
        "_pending",
        "_raw",
        "_reading",
        "_repeated",
        "_timer",
        "_transport",
        "_url",
    )

    def __init__(self, door: ForwardAuthDoor) -> None:
        self._door = door
        self._loop = asyncio.get_running_loop()  # asked once: every request moves a deadline
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._raw: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._repeated = _NONE_REPEATED  # this request's field names sent more than once
        self._held = 0  # bytes of this request's reads since the last one a callback saw progress in (`_feed`)
        self._name = ""
        self._body_bytes = 0
        self._body: list[bytes] = []
        self._pending: collections.deque[asyncio.Future[bytes] | bytes] = collections.deque()
        self._closing = False
        self._paused = False
        self._peer = ""
        # One timer per connection (see _tick): `_deadline` is when the connection is closed unless
        # its state changes first: a request being read must arrive by then, an idle keep-alive
        # must be used by then; 0.0 while answers are owed (the pipeline bounds its own work).
        self._reading = False
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # The answer memo (see _received_at_boundary): requests completed so far, and the answer the
        # last one offers to be remembered (bytes, until when, decision), if any.
        self._completed = 0
        self._offer: tuple[bytes, float, Decision] | None = None
        self._opened = 0.0  # when the connection was made (a draining door gives a fresh one a moment)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        self._door.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # unix sockets have no Nagle to turn off
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else ""
        # A connection is opened to send a request: its first one gets the header timeout.
        door = self._door
        loop = self._loop
        now = loop.time()
        self._opened = now
        self._deadline = now + door.header_timeout
        self._timer = loop.call_at(now + door.tick, self._tick)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self._reading:  # the rest of a request llhttp has begun
            self._feed(data)
            return
        memo = self._door.memo
        if memo is not None and not self._pending:
            self._received_at_boundary(memo, data)
        else:
            self._parse(data)

    def _parse(self, data: bytes) -> None:
        """Bytes that start a request: one whole bodyless keep-alive request is parsed in C (`_http_head.c`, which
        takes only a strict subset of what llhttp takes, and says None for anything else), the rest by llhttp."""
        whole_head = WHOLE_HEAD  # read here: a test sets it to None to take llhttp's path alone
        whole = whole_head(data, MAX_HEADERS) if whole_head is not None and len(data) <= MAX_HEADER_BYTES else None
        if whole is None:
            self._feed(data)
        else:  # never fed to llhttp, which stays at the start of a message
            self._whole(*whole)

    def _feed(self, data: bytes) -> None:
        """Parses what arrived; the callbacks below answer each complete request."""
        # httptools holds a header field (or a trailer) until its line ends, so `on_header` alone never bounds
        # one that does not: what a request's reads add without any callback seeing progress is held there.
        progress = self._reading and (self._header_bytes, self._body_bytes, self._completed)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # llhttp ends the HTTP stream at an upgrade (Upgrade with Connection: upgrade, or CONNECT) after
            # `on_message_complete`, which answered that request with `connection: close`: we never switch, and
            # a 400 here would be a second answer to it (the gateway's next request would read it as its own).
            self._closing = True
        except (httptools.HttpParserError, _TooLarge) as exc:
            # httptools wraps an exception raised in a callback: find our own in the chain.
            cause: BaseException | None = exc
            while cause is not None and not isinstance(cause, _TooLarge):
                cause = cause.__cause__ or cause.__context__
            self._fail(cause.status if isinstance(cause, _TooLarge) else 400)
        else:
            if not progress:
                return  # this read began a request: a field that began in it is at most this read long
            if progress != (self._header_bytes, self._body_bytes, self._completed):
                self._held = 0  # likewise
            else:
                self._held += len(data)
                if self._held > MAX_HEADER_BYTES:
                    self._fail(431)

    # the answer memo
    def _received_at_boundary(self, memo: AnswerMemo, data: bytes) -> None:
        """Bytes that start a request, nothing owed: the remembered answer when these exact bytes got one
        that still holds; else parsed, and remembered when they were one whole keep-alive request
        answered from memory (the pipeline says until when: `decide_cached_stable`)."""
        started = time.perf_counter()
        hit = memo.get(data, self._peer)
        if hit is not None:
            assert self._transport is not None
            self._transport.write(hit.answer)
            metrics = self._door.metrics
            metrics.cache_lookup("positive", "hit")  # as the pipeline would have counted it
            metrics.decision(DOOR, hit.outcome, hit.reason, time.perf_counter() - started)
            self._idle()
            return
        completed = self._completed
        self._taken_offer()  # none left over from an earlier request
        self._parse(data)
        offer = self._taken_offer()  # what the parse just above offered, if anything
        if (
            offer is not None
            and self._completed == completed + 1
            and not (self._reading or self._pending or self._closing)
        ):
            answer, valid_until, decision = offer
            memo.store(data, self._peer, answer, valid_until, decision.outcome, decision.reason)

    def _taken_offer(self) -> tuple[bytes, float, Decision] | None:
        """The answer `on_message_complete` offered to be remembered (cleared). A call, not an attribute read
        after `self._offer = None`: a type checker narrows that read to None, and mypyc compiles what it narrows."""
        offer, self._offer = self._offer, None
        return offer

    @property
    def busy(self) -> bool:
        """Whether answers are still owed on this connection."""
        return bool(self._pending)

    def may_close_now(self, now: float) -> bool:
        """Draining: nothing owed and nothing being read, and either a request was answered (an idle
        keep-alive) or none came within `FRESH_GRACE_SECONDS` of connecting."""
        if self._pending or self._reading:
            return False
        return self._completed > 0 or now - self._opened >= FRESH_GRACE_SECONDS

    def close(self) -> None:
        """Closes the connection (shutdown)."""
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._door.connections.discard(self)
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for item in self._pending:
            if isinstance(item, asyncio.Future):
                item.cancel()
        self._pending.clear()

    def _tick(self) -> None:
        """The connection's one timer: closes it past its deadline, else wakes again within `tick`.

        State changes only move `_deadline` (a float store, no timer handle per request); since every
        deadline set is at least `tick` ahead and the timer always wakes within `tick`, it is never late.
        """
        self._timer = None
        transport = self._transport
        if self._closing or transport is None or transport.is_closing():
            return
        loop = self._loop
        now = loop.time()
        deadline = self._deadline
        if deadline and now >= deadline - TIMER_SLACK_SECONDS:
            # A request that never completes (slowloris) or an unused keep-alive: close, no answer
            # (nginx does the same for client_header_timeout and keepalive_timeout).
            self._closing = True
            transport.close()
            return
        wake = now + self._door.tick
        self._timer = loop.call_at(deadline if deadline and deadline < wake else wake, self._tick)

    def _idle(self) -> None:
        """Nothing owed and nothing being read: the keep-alive may stay idle for `idle_timeout`."""
        self._deadline = self._loop.time() + self._door.idle_timeout

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._reading = True
        self._deadline = self._loop.time() + self._door.header_timeout
        self._url = b""
        self._raw = []
        self._repeated = _NONE_REPEATED
        self._header_bytes = 0
        self._body_bytes = 0
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _TooLarge(431)

    def on_header(self, name: bytes, value: bytes) -> None:
        raw = self._raw
        raw.append((name, value))
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES or len(raw) > MAX_HEADERS:
            raise _TooLarge(431)

    def on_headers_complete(self) -> None:
        raw = self._raw
        known = self._door.header_names.get  # a gateway sends the same few names each time: decoded once
        headers = {(known(name) or self._door.header_name(name)): value.decode("latin-1") for name, value in raw}
        if len(headers) != len(raw):
            # A repeated field is joined as RFC 9110 section 5.3 says; a repeated Authorization then
            # fails the credential syntax check instead of one of them being silently picked.
            headers = {}
            repeated = set()
            for name, value in raw:
                key, text = name.decode("latin-1").lower(), value.decode("latin-1")
                old = headers.get(key)
                if old is None:
                    headers[key] = text
                else:
                    headers[key] = f"{old}, {text}"
                    repeated.add(key)
            self._repeated = frozenset(repeated)
        self._headers = headers

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY_BYTES:
            raise _TooLarge(413)
        if door_wants_body(self._url):
            self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        # An upgrade is answered as any request, but closes: the bytes after it are not HTTP to llhttp (`_feed`).
        self._complete(parser.get_method(), parser.should_keep_alive() and not parser.should_upgrade())

    def _whole(self, method: bytes, url: bytes, headers: dict[str, str]) -> None:
        """A request `_http_head.c` parsed whole (`_parse`): what the callbacks above record of it,
        then answered as they answer. It kept its connection open, had no body and no field twice; llhttp, never
        fed it, is still at the start of a message."""
        self._url = url
        self._headers = headers
        self._repeated = _NONE_REPEATED
        self._body = []
        self._complete(method, True)

    def _complete(self, method: bytes, keep_alive: bool) -> None:
        """Answers the request just read (`keep_alive`: as its parse says, before the door's draining)."""
        self._reading = False
        self._completed += 1
        if self._closing:
            return  # requests pipelined behind a "Connection: close" are not answered
        door = self._door
        keep_alive = keep_alive and not door.draining
        url = self._url
        path = url.split(b"?", 1)[0]
        if (
            door.checks
            and (path == PREFIX or path.startswith(PREFIX + b"/"))
            and not ((b"/." in path or b"%2" in path) and _leaves_door(path))
        ):
            try:
                attrs = door.attributes(method.decode("latin-1"), url, self._headers, self._peer)
            except Undescribed as undescribed:  # nothing told the path (or a host policies need): never the hot path
                self._push(door.undescribed(undescribed, keep_alive, head=method == b"HEAD"), keep_alive)
            else:
                started = time.perf_counter()
                if self._repeated and not self._repeated.isdisjoint(door.described_by):
                    self._push(door.described_twice(started, keep_alive, head=method == b"HEAD"), keep_alive)
                elif method == b"HEAD":  # Envoy's HTTP ext_authz asks with the client's own method
                    self._push(self._loop.create_task(self._headless(attrs, started, keep_alive)), keep_alive)
                elif door.clock.busy() > door.shed_after and door.costly(attrs):
                    self._push(door.shed(attrs, started, keep_alive), keep_alive)
                elif door.tracing is not None:  # the one test tracing costs when off
                    self._push(door.decide_traced(attrs, started, keep_alive), keep_alive)
                else:
                    decision, stable_until = door.decide_cached(attrs)
                    if decision is not None:
                        door.observe(decision, started)
                        answer = _answer(decision, keep_alive, attrs.headers)
                        if stable_until and keep_alive:
                            self._offer = (answer, stable_until, decision)
                        self._push(answer, keep_alive)
                    else:
                        self._push(self._loop.create_task(self._slow(attrs, started, keep_alive)), keep_alive, own=True)
        elif path in (b"/healthz", b"/readyz"):
            head = method == b"HEAD"
            if (door.ready if path == b"/readyz" else door.started)():
                self._push(_closing(_HEALTH_OK_HEAD if head else _HEALTH_OK, keep_alive), keep_alive)
            else:
                self._push(_closing(_HEALTH_NOT_HEAD if head else _HEALTH_NOT, keep_alive), keep_alive)
        elif path == b"/livez":
            self._push(_closing(_HEALTH_OK_HEAD if method == b"HEAD" else _HEALTH_OK, keep_alive), keep_alive)
        elif door.router:
            request = HttpRequest(
                method=method.decode("latin-1"),
                path=path.decode("latin-1"),
                query=url.partition(b"?")[2].decode("latin-1"),
                headers=self._headers,
                body=b"".join(self._body),
                peer=self._peer,
            )
            self._push(asyncio.ensure_future(door.route(request, keep_alive)), keep_alive)
        else:
            self._push(_closing(_ERROR_ANSWERS[404], keep_alive), keep_alive)
        if self._pending:
            self._deadline = 0.0  # answers owed: no deadline until they are out
        else:
            self._idle()

    # answers, in request order
    async def _headless(self, attrs: RequestAttributes, started: float, keep_alive: bool) -> bytes:
        """The answer to a check asked with HEAD: decided as any other, its content left out (RFC 9110 section
        9.3.2; `content-length` stays). With the body, the gateway (which asked HEAD and reads none) would take the
        body for the start of the next answer on its pooled connection. Rare: never offered to the answer memo."""
        door = self._door
        answer: bytes | asyncio.Future[bytes]
        if door.clock.busy() > door.shed_after and door.costly(attrs):
            answer = door.shed(attrs, started, keep_alive)
        elif door.tracing is not None:
            answer = door.decide_traced(attrs, started, keep_alive)
        else:
            decision, _ = door.decide_cached(attrs)
            if decision is None:
                answer = await door.decide_slow(attrs, started, keep_alive)
            else:
                door.observe(decision, started)
                answer = _answer(decision, keep_alive, attrs.headers)
        if not isinstance(answer, bytes):
            answer = await answer
        return answer[: answer.index(b"\r\n\r\n") + 4]

    async def _slow(self, attrs: RequestAttributes, started: float, keep_alive: bool) -> bytes:
        """A first-seen token's answer, written by its own task the moment it is ready when it is the next
        one owed: no done callback, so no extra event-loop turn per answer (#24 goal 7). Behind an earlier
        answer still owed, it waits (done) for that one's `_flush`."""
        door = self._door  # `Door.decide_slow`, one coroutine fewer per token, and the loop given (no lookup)
        decision = await door.pipeline.decide_after_miss(attrs, DOOR, self._loop)
        door.observe(decision, started)
        answer = _answer(decision, keep_alive, attrs.headers)
        pending = self._pending
        if pending and pending[0] is asyncio.current_task(self._loop):  # the loop given: no getpid() syscall
            pending.popleft()
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.write(answer)
            self._flush()  # what was owed after it, and the connection's state
        return answer

    def _push(self, item: asyncio.Future[bytes] | bytes, keep_alive: bool, *, own: bool = False) -> None:
        """Queues an answer (bytes) or its future; `own`: a `_slow` task, which writes its answer itself."""
        pending = self._pending
        if not pending and isinstance(item, bytes):
            assert self._transport is not None
            self._transport.write(item)
        else:
            pending.append(item)
            if isinstance(item, asyncio.Future) and not own:
                item.add_done_callback(self._flush)
            if len(pending) >= MAX_PIPELINED and not self._paused and self._transport is not None:
                self._paused = True
                self._transport.pause_reading()
        if not keep_alive:
            self._closing = True
            if not self._pending and self._transport is not None:
                self._transport.close()

    def _flush(self, _: Any = None) -> None:
        transport = self._transport
        pending = self._pending
        if transport is None or transport.is_closing():
            return
        while pending:
            head = pending[0]
            if isinstance(head, asyncio.Future):
                if not head.done():
                    break
                data = b"" if head.cancelled() else head.result()
            else:
                data = head
            pending.popleft()
            transport.write(data)
        if self._paused and len(pending) < MAX_PIPELINED // 2:
            self._paused = False
            transport.resume_reading()
        if self._closing and not pending:
            transport.close()
        elif not pending and not self._reading:
            self._idle()

    def _fail(self, status: int) -> None:
        self._closing = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # an earlier answer already closed the connection: nothing more is owed
        self._pending.append(_ERROR_ANSWERS[status])
        if len(self._pending) == 1:  # nothing else owed: answer now, then linger
            self._pending.clear()
            transport.write(_ERROR_ANSWERS[status])
            # Lingering close: closing with unread request bytes in the socket makes the kernel
            # send a reset that can destroy the answer in flight. Half-close, discard what the
            # client still sends (data_received ignores it), and close after LINGER_SECONDS.
            can_half_close = getattr(transport, "can_write_eof", None)
            if can_half_close is not None and can_half_close():
                transport.write_eof()
                self._loop.call_later(LINGER_SECONDS, transport.close)
            else:
                transport.close()
        else:
            self._flush()


def _closing(answer: bytes, keep_alive: bool) -> bytes:
    """A fixed answer as is, or saying `connection: close` when it ends the connection (RFC 9112 section 9.6)."""
    return answer if keep_alive else answer.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)


_DOOR_SEGMENTS = PREFIX.strip(b"/").split(b"/")


def _leaves_door(path: bytes) -> bool:
    """Whether `path` (no query), read as a gateway normalizes it, names a path outside the door's.

    nginx matches its locations on the target normalized (`%2e` and `%2f` decoded, slashes merged, dot
    segments resolved: RFC 3986 section 5.2.4) but may pass the raw target on: `proxy_pass` without a URI in
    a location such as `/.well-known/oauth-protected-resource` (deploy/nginx, or an operator's copy of it) made
    `/v1/forward-auth/../../.well-known/oauth-protected-resource` a check whose answer, identity headers and
    all, went to the client, asked with X-Forwarded-* headers the client chose. Such a target is not addressed
    to the door. Only called when the path holds a `/.` or a `%2`: a gateway's own target never does.

    nginx ends the path at a `#` (read as a fragment; a request target has none, RFC 9112 section 3.2), so
    `/v1/forward-auth/../../.well-known/oauth-protected-resource#/../../v1/forward-auth` matched its metadata
    location while, read on past the `#`, it stayed in the door: the path leaves the door if either reading does.
    """
    return _resolved_leaves(path) or (b"#" in path and _resolved_leaves(path.partition(b"#")[0]))


def _resolved_leaves(path: bytes) -> bool:
    """Whether `path`, `%2e`/`%2f` decoded and its dot segments resolved, names a path outside the door's."""
    decoded = path.replace(b"%2e", b".").replace(b"%2E", b".").replace(b"%2f", b"/").replace(b"%2F", b"/")
    resolved: list[bytes] = []
    for segment in decoded.split(b"/"):
        if segment == b"..":
            if resolved:
                resolved.pop()
        elif segment and segment != b".":
            resolved.append(segment)
    return resolved[: len(_DOOR_SEGMENTS)] != _DOOR_SEGMENTS


def door_wants_body(url: bytes) -> bool:
    """Forward-auth bodies are discarded; the small endpoints get theirs."""
    return not url.startswith(PREFIX)


class _TooLarge(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _answer(decision: Decision, keep_alive: bool, request_headers: Mapping[str, str]) -> bytes:
    end = b"\r\n" if keep_alive else b"connection: close\r\n\r\n"
    if decision.allowed:
        smuggled = smuggled_identity(decision, request_headers)
        if smuggled:
            # Envoy's HTTP ext_authz mode removes these from the upstream request (the names are
            # tokens: llhttp refuses anything else in a field name). Built per request, never memoized.
            remove = ("x-envoy-auth-headers-to-remove: " + ", ".join(smuggled) + "\r\n").encode("latin-1")
            return decision.http_head + remove + end + decision.body
    key = "http_keepalive" if keep_alive else "http_close"
    data = decision.memo.get(key)
    if data is None:
        # The whole answer is memoized, not its head besides (a cached decision's memo lives as long as its token).
        data = decision.head_once() + end + decision.body
        decision.memo[key] = data
    return data


class ForwardAuthDoor:
    """The HTTP forward-auth listener; with `checks=False`, a listener of its router's endpoints alone (admin)."""

    def __init__(
        self,
        pipeline: Pipeline,
        metrics: Metrics,
        ready: Callable[[], bool],
        router: Router | None = None,
        *,
        started: Callable[[], bool] | None = None,
        settings: ForwardAuthSettings | None = None,
        thumbprint_header: str = "",
        tracing: Tracing | None = None,
        memo: AnswerMemo | None = None,
        checks: bool = True,
        hosts_named: bool = False,
    ) -> None:
        settings = settings or ForwardAuthSettings()
        # False: a listener of the router's endpoints alone (the admin listener, `admin.listen`): `/v1/forward-auth`
        # is no check there (404), so a gateway pointed at it by mistake is refused, never answered.
        self.checks = checks
        self.tracing = tracing  # None: off, and no per-request tracing work at all
        # Remembered answers (None: every request is parsed). Not with tracing: each request has its span.
        self.memo = memo if tracing is None else None
        self.family = FORWARDED_FAMILIES[settings.forwarded_headers]
        # The family's fields that describe the original request: each must come once (`described_twice`). Not
        # the client address, a list by nature (only the first element is read; no decision reads it).
        family = self.family
        self.described_by = frozenset(
            n for n in (family.method, family.path, family.host, family.port, family.scheme) if n
        )
        self.thumbprint_header = thumbprint_header
        self.hosts_named = hosts_named  # a policy matches on hosts: a check must tell its host (`attributes_from_http`)
        self.header_timeout = settings.header_timeout_seconds
        self.idle_timeout = settings.idle_timeout_seconds
        self.tick = min(self.header_timeout, self.idle_timeout)  # a connection's timer wakes at least this often
        self.router = router if router is not None else Router()
        self.pipeline = pipeline
        self.metrics = metrics
        self.ready = ready  # `/readyz`: this replica can decide now
        self.started = started or ready  # `/healthz`: started (keys, revocation entries loaded once)
        self.clock = LoopClock()  # overload: how long requests have waited in their sockets (admission.py)
        self.shed_after = settings.shed_after_seconds
        self._acceptor: Acceptor | None = None
        self.connections: set[_Connection] = set()
        self.draining = False  # stopping: every answer closes its connection
        self.header_names: dict[bytes, str] = {}  # raw field name -> its lower-case text (`header_name`)
        # The refusals of a check no header told the path or the host of, by what was missing (each built once).
        self._undescribed: dict[str, Decision] = {}

    def header_name(self, raw: bytes) -> str:
        """A field name as the attributes key it (lower-case text), kept for the next request while fewer
        than `MAX_HEADER_NAMES` are (names are the sender's choice: past that, decoded each time)."""
        name = raw.decode("latin-1").lower()
        if len(self.header_names) < MAX_HEADER_NAMES:
            self.header_names[raw] = name
        return name

    def attributes(self, method: str, target: bytes, headers: dict[str, str], peer: str) -> RequestAttributes:
        """A request's attributes as this door reads them (its header family, its thumbprint header)."""
        return attributes_from_http(
            method, target, headers, peer, self.family, self.thumbprint_header, self.hosts_named
        )

    def decide_cached(self, attrs: RequestAttributes) -> tuple[Decision | None, float]:
        """The answer from memory (None: the slow path), and until when it may be remembered (0.0: not)."""
        if self.memo is None:
            return self.pipeline.decide_cached(attrs, DOOR), 0.0
        return self.pipeline.decide_cached_stable(attrs, DOOR)

    def observe(self, decision: Decision, started: float) -> None:
        """Counts a decision."""
        self.metrics.decision(DOOR, decision.outcome, decision.reason, time.perf_counter() - started)

    def described_twice(self, started: float, keep_alive: bool, *, head: bool = False) -> bytes:
        """The refusal of a request whose declared family came twice (400 `invalid_request`), counted, never a
        check: the gateway added its header beside the client's instead of overwriting it, and joined (RFC 9110
        section 5.3) the two would be judged as one request while the upstream gets another (`/public, /admin`
        met a /public policy). The gRPC doors have one field for each, but for the one header Envoy's reads, its
        `x-forwarded-proto`: refused alike there (`verifier.request.DescribedTwice`)."""
        decision = self.pipeline.described_twice
        self.observe(decision, started)
        answer = _answer(decision, keep_alive, {})
        return answer[: answer.index(b"\r\n\r\n") + 4] if head else answer

    def undescribed(self, undescribed: Undescribed, keep_alive: bool, *, head: bool = False) -> bytes:
        """The refusal of a check whose original path nothing told (400 `invalid_request`), counted, never a check:
        the gateway sends another family than `http.forwarded_headers` declares, or forgot the path header (an
        nginx location without `proxy_set_header X-Forwarded-Uri $request_uri`). Judged as `/` it was `GET /` for
        every request, and a public `/` passed them all. Likewise a check without the family's host header when
        policies name hosts (`attributes_from_http`). The description names the missing header."""
        decision = self._undescribed.get(undescribed.missing)
        if decision is None:
            decision = self._undescribed[undescribed.missing] = self.pipeline.undescribed(undescribed.missing)
        self.observe(decision, time.perf_counter())
        answer = _answer(decision, keep_alive, {})
        return answer[: answer.index(b"\r\n\r\n") + 4] if head else answer

    def costly(self, attrs: RequestAttributes) -> bool:
        """Whether deciding needs a signature check: a token that no cache knows."""
        return bool(attrs.headers.get("authorization")) and self.pipeline.known(attrs) is None

    def shed(self, attrs: RequestAttributes, started: float, keep_alive: bool) -> bytes:
        """The early refusal of an overloaded door: 503 + Retry-After, counted, never a check."""
        decision = self.pipeline.overloaded
        self.observe(decision, started)
        return _answer(decision, keep_alive, attrs.headers)

    async def decide_slow(
        self, attrs: RequestAttributes, started: float, keep_alive: bool, span: DecisionSpan | None = None
    ) -> bytes:
        """A decision that needs verification (first-seen token)."""
        decision = await self.pipeline.decide_after_miss(attrs, DOOR)
        self.observe(decision, started)
        if span is not None:
            span.end(decision)
        return _answer(decision, keep_alive, attrs.headers)

    def decide_traced(
        self, attrs: RequestAttributes, started: float, keep_alive: bool
    ) -> bytes | asyncio.Future[bytes]:
        """A decision inside its span, the gateway's `traceparent` its parent: the answer, or its future."""
        assert self.tracing is not None
        headers = attrs.headers
        span = self.tracing.decision(
            DOOR, headers.get(TRACEPARENT), headers.get(TRACESTATE), self.pipeline.known(attrs)
        )
        with span.current():  # the task below starts in this context: its fetch spans are children
            decision = self.pipeline.decide_cached(attrs, DOOR)
            if decision is None:
                return asyncio.ensure_future(self.decide_slow(attrs, started, keep_alive, span))
        self.observe(decision, started)
        span.end(decision)
        return _answer(decision, keep_alive, headers)

    async def route(self, request: HttpRequest, keep_alive: bool) -> bytes:
        """One of the small endpoints; a handler's crash is a 500, never a dropped connection."""
        try:
            answer = await self.router.dispatch(request)
        except Exception:
            log.exception("endpoint failed", extra={"event": "endpoint_error", "path": request.path})
            answer = HttpAnswer.json(500, {"error": "server_error"})
        return answer.serialize(keep_alive, head=request.method == "HEAD")

    async def start(
        self,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        tls: ssl.SSLContext | None = None,
        sockets: list[socket.socket] | None = None,
        accept: bool = True,
    ) -> int:
        """Listens (with TLS when given a context) on `sockets` when given (bound by the supervisor), else on
        sockets bound here; returns the bound port. Connections are accepted by `acceptor.Acceptor`: all
        that wait, each loop turn (uvloop's own servers take one per turn). Without `accept`, accepting
        waits for `accept()`."""
        self.clock.start()
        self._acceptor = Acceptor(
            sockets if sockets else listening_sockets(host, port, reuse_port=reuse_port),
            lambda: _Connection(self),
            tls=tls,
            # A TLS handshake that stalls holds a connection as a half-sent request would.
            handshake_timeout=self.header_timeout,
        )
        if accept:
            self._acceptor.start()
        return int(self._acceptor.sockets[0].getsockname()[1])

    def accept(self) -> None:
        """Starts accepting (after `start(accept=False)`); nothing once draining."""
        if self._acceptor is not None and not self.draining:
            self._acceptor.start()

    async def stop(self, grace: float = DRAIN_SECONDS) -> None:
        """Drains (the module's docstring): stops accepting, answers what was sent with `Connection: close`
        within `grace` seconds, closes idle connections; whatever is left at `grace` is closed."""
        self.clock.stop()
        self.draining = True
        self.memo = None  # a remembered answer keeps the connection open
        acceptor = self._acceptor
        if acceptor is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await acceptor.drain(grace)
        while self.connections and loop.time() < deadline:
            # A loop turn before each look: a request already in a socket's buffer is read first.
            await asyncio.sleep(DRAIN_POLL_SECONDS)
            now = loop.time()
            for conn in list(self.connections):
                if conn.may_close_now(now):
                    conn.close()
        for conn in list(self.connections):
            conn.close()
