"""The introspection provider's HTTP/1.1 client (RFC 9112): one small asyncio protocol on httptools' parser.

Why not aiohttp here: a first-seen opaque token costs the verifier one provider call, and aiohttp's
request machinery (request and response objects, stream readers, header multidicts, its writer) was
most of that call's CPU. This client does one thing, the seam `IntrospectionHttp.send`: write one
prebuilt request, parse the answer with llhttp (through httptools, already the forward-auth door's
parser), hand back the status and the body. Discovery and JWKS stay on the shared aiohttp session.

What it guarantees (each proven in tests/tokens/test_introspection_http.py against a scripted peer):

- the caller's deadline covers connecting, the TLS handshake, writing and reading; a connection that
  did not finish its answer in time is closed, never reused;
- the body is bounded: a declared Content-Length over `max_bytes` is refused before any of it is
  read, a chunked or close-delimited one as soon as it passes the bound (never cut off and parsed);
  the status line and headers (interim 1xx answers included) are bounded by `MAX_HEAD_BYTES`;
- framing is llhttp's, strict: a bad chunk size, two Content-Lengths, Content-Length beside chunked, a
  bare LF are refused; a peer closing before the answer is complete is a failure, not a short body;
- one request at a time per connection (never pipelined); a connection returns to the pool only after
  a complete answer that allows keep-alive (not HTTP/1.0 without keep-alive, not `Connection: close`)
  with nothing after it; the pool is bounded per origin and forgets connections idle `IDLE_SECONDS`;
- 1xx interim answers are skipped (RFC 9110 section 15.2), 101 is refused (nothing asked to switch);
- https with certificate and host-name verification (the system's CAs unless a context is given: an
  issuer's `tls_ca_file` and `jwks_pin_sha256`, see `verifier.app.HttpSessions.introspection_for`);
- nothing of the request goes in an error message: the token travels form-encoded in the body, and
  header values with a line break are refused before anything is sent (no header injection).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import urllib.parse
from collections.abc import Callable, Iterable
from typing import ClassVar, cast

import httptools

from verifier import loops
from verifier.clock import Clock, SystemClock
from verifier.errors import ProviderUnavailable
from verifier.observe.tracing import NO_TRACING, Tracing
from verifier.sweep import Sweep, Timed
from verifier.tokens.introspection_client import (
    AnswerTooLarge,
    Done,
    Headers,
    HttpReply,
    HttpRequest,
    ProviderTimedOut,
    Slots,
)

MAX_HEAD_BYTES = 64 * 1024  # status line + headers, 1xx answers included: a longer head is malformed
IDLE_SECONDS = 4.0  # an idle pooled connection is dropped after this: under Node's 5 s keep-alive default
DEFAULT_CONNECTIONS = 64  # open connections per origin (the aiohttp pool's bound was 64 for every origin)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 section 5.6.2: a header name
_UNSAFE_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # RFC 9110 section 5.5: no CR, LF, NUL or controls
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"  # RFC 3986 pchar and '/': everything else is percent-encoded
_QUERY_SAFE = _PATH_SAFE + "?"


class _Refused(Exception):
    """Raised inside a parser callback: the answer breaks a rule (too large, an upgrade, an encoding)."""


class _TooLarge(_Refused):
    """The answer's body passes `max_bytes`: `AnswerTooLarge` (the token's answer, not the provider's health)."""


class _Expiry(Timed):
    """An exchange's deadline (`_Connection.begin`): at `due` the connection's exchange times out, unless it
    ended first (`cancel`). Timed by the client's `Sweep`: one timer for its connections' exchanges."""

    __slots__ = ("_connection",)

    def __init__(self, due: float, connection: _Connection) -> None:
        super().__init__(due)
        self._connection: _Connection | None = connection

    def armed(self) -> bool:
        return self._connection is not None

    def expire(self) -> None:
        connection, self._connection = self._connection, None
        self.handle = None
        if connection is not None:
            connection.time_out()

    def cancel(self) -> None:
        self._connection = None  # the queue keeps no connection alive
        self.disarm()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to one origin; one exchange at a time.

    An exchange ends in one call of its `done` callback, from the protocol callback that settles it (the
    answer's last bytes read, the deadline, the connection lost): no task, no future in between (#24 goal 7).
    """

    def __init__(self, sweep: Sweep | None = None) -> None:
        self._sweep = sweep or Sweep()  # its client's: one timer for the exchanges of all its connections
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()  # a connection lives on the loop that made it
        self._done: Done | None = None  # the exchange under way
        self._expiry: _Expiry | None = None
        self._reply: HttpReply | None = None  # a complete answer, handed over once its read is parsed
        self.reusable = False  # set by a complete answer that allows keep-alive
        self.closed = False
        self.idle_since = 0.0
        self._max_bytes = 0
        self._fed = 0  # bytes received before the final answer's headers were complete
        self._reset()

    def _reset(self) -> None:
        """Per-message state (an interim 1xx answer resets it too)."""
        self._head = 0  # bytes of status lines and headers parsed (1xx answers included)
        self._body: list[bytes] = []
        self._size = 0
        self._final = False  # the final (non-1xx) answer's headers are in
        self._interim = False
        self._framed = False  # Content-Length or Transfer-Encoding: else the body ends when the peer closes
        self._length = 0

    # -- the exchange ----------------------------------------------------------------------

    def begin(self, request: bytes, max_bytes: int, deadline: float, done: Done) -> None:
        """Writes `request`; `done` gets the whole answer, or the failure, once. At `deadline` (the loop's
        clock) the connection is dropped and the exchange fails. Not `asyncio.timeout`, nor a timer handle of its
        own: the deadline is swept (`verifier.sweep`), within 1 ms of its time."""
        if self._transport is None or self._done is not None or self.closed:
            raise ProviderUnavailable("introspection provider connection is not ready")
        self._reset()
        self._fed = 0
        self._max_bytes = max_bytes
        self._reply = None
        self.reusable = False
        self._done = done
        self._expiry = expiry = _Expiry(deadline, self)
        self._sweep.arm(self._loop, expiry)
        self._transport.write(request)

    def deadline(self, timeout: float) -> float:
        """`timeout` seconds from now on the loop's clock (what `begin` takes)."""
        return self._loop.time() + timeout

    def abandon(self, done: Done) -> bool:
        """Drops the exchange `done` belongs to, if it is still under way (its answer would come unread),
        and says so: `done` is not called. Another exchange's callback changes nothing."""
        if self._done is not done:
            return False
        self._done = None
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.close()
        return True

    async def exchange(self, request: bytes, max_bytes: int, deadline: float) -> HttpReply:
        """`begin` awaited: the answer, or the failure raised."""
        waiter: asyncio.Future[HttpReply | ProviderUnavailable] = self._loop.create_future()

        def done(outcome: HttpReply | ProviderUnavailable) -> None:
            if not waiter.done():  # cancelled, and the answer came before the task woke to abandon it
                waiter.set_result(outcome)

        self.begin(request, max_bytes, deadline, done)
        try:
            outcome = await waiter
        finally:
            self.abandon(done)  # cancelled: the stream is in an unknown state
        if isinstance(outcome, ProviderUnavailable):
            raise outcome
        return outcome

    def _settle(self, outcome: HttpReply | ProviderUnavailable) -> None:
        done, self._done = self._done, None
        if done is None:
            return
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        done(outcome)

    def close(self) -> None:
        """Drops the connection at once (an unfinished answer must not be read by the next request)."""
        self.closed = True
        self.reusable = False
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, description: str, error: type[ProviderUnavailable] = ProviderUnavailable) -> None:
        self.close()  # before the answer, if any, is handed over: the stream broke a rule after it
        self._settle(self._reply or error(f"introspection provider {description}"))

    def time_out(self) -> None:
        self._fail("timed out", ProviderTimedOut)

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses

    def data_received(self, data: bytes) -> None:
        if self._done is None:  # bytes nobody asked for: the stream is out of step
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("switched protocols")
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refused):
                self._fail(str(cause), AnswerTooLarge if isinstance(cause, _TooLarge) else ProviderUnavailable)
            else:
                self._fail("sent a malformed answer")
            return
        except httptools.HttpParserError:
            self._fail("sent a malformed answer")
            return
        if self._reply is not None:  # the whole answer, and nothing after it in this read
            self._settle(self._reply)
        elif not self._final:  # everything so far is head: bounds what the parser buffers across reads
            self._fed += len(data)
            if self._fed > MAX_HEAD_BYTES:
                self._fail("sent an oversized head")

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost decides what the end means

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self._done is None:
            return
        if self._final and not self._framed and exc is None:  # RFC 9112 section 6.3 rule 8: ends at close
            self._settle(HttpReply(self._parser.get_status_code(), b"".join(self._body)))
        elif exc is not None:
            self._settle(ProviderUnavailable(f"introspection provider unreachable ({type(exc).__name__})"))
        else:
            self._settle(ProviderUnavailable("introspection provider closed the connection mid-answer"))

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.reusable or self._reply is not None:
            self.reusable = False  # a second answer to one request: never reuse this stream
            raise _Refused("sent more than one answer")

    def on_status(self, status: bytes) -> None:
        self._count_head(len(status) + 15)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        lowered = name.lower()
        if lowered == b"content-length":
            self._framed = True
            self._length = int(value)  # llhttp has checked the digits
        elif lowered == b"transfer-encoding":
            self._framed = True
        elif lowered == b"content-encoding" and value.strip().lower() != b"identity":
            raise _Refused("sent an encoded body (identity was asked for)")

    def _count_head(self, size: int) -> None:
        self._head += size
        if self._head > MAX_HEAD_BYTES:
            raise _Refused("sent an oversized head")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101:
                raise _Refused("switched protocols")
            self._interim = True
            return
        self._final = True
        if self._length > self._max_bytes:
            raise _TooLarge("answer too large")

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max_bytes:
            raise _TooLarge("answer too large")
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._interim:  # RFC 9110 section 15.2: a final answer follows
            head = self._head
            self._reset()
            self._head = head  # the bound covers every interim answer too
            return
        self.reusable = self._parser.should_keep_alive()
        self._reply = HttpReply(self._parser.get_status_code(), b"".join(self._body))  # settled after the read


class _Target:
    """One URL, split once: where to connect and the request head's fixed part."""

    __slots__ = ("host", "line", "origin", "port", "tls")

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ProviderUnavailable("introspection provider URL is not http(s)")
        if parts.username is not None or parts.password is not None:
            raise ProviderUnavailable("introspection provider URL carries credentials; they are not sent")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise ProviderUnavailable("introspection provider URL has a bad port") from None
        host = parts.hostname
        authority = f"[{host}]" if ":" in host else host
        if port != (443 if scheme == "https" else 80):
            authority += f":{port}"
        target = urllib.parse.quote(parts.path or "/", safe=_PATH_SAFE)
        if parts.query:
            target += "?" + urllib.parse.quote(parts.query, safe=_QUERY_SAFE)
        self.host, self.port, self.tls = host, port, scheme == "https"
        self.origin = (scheme, host, port)
        self.line = f" {target} HTTP/1.1\r\nHost: {authority}\r\n"


def _header_lines(headers: Iterable[tuple[str, str]]) -> str:
    """`Name: value` lines; a name that is not a token or a value with a control character is refused."""
    lines = []
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or _UNSAFE_VALUE.search(value):
            raise ProviderUnavailable("refused to send a malformed request header")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)


class IntrospectionHttpClient:
    """The production `IntrospectionHttp` seam: pooled keep-alive HTTP/1.1 connections, per origin.

    It keeps each call's deadline itself (`keeps_deadline`: `ProviderTimedOut` when `request.timeout`
    passes, waiting for a connection slot, connecting or exchanging), so its caller arms none around it.

    Built by the composition root (`verifier.app.HttpSessions`) and closed by it. `tls` replaces the
    default verifying context (the system's CAs): an issuer's `tls_ca_file` and pinned keys, with
    `https_only` (plain http URLs refused); `default_headers` go on every request (User-Agent).
    `clock` times how long a pooled connection has been idle (deadlines are the event loop's).
    """

    keeps_deadline: ClassVar[bool] = True  # ClassVar: compiled (mypyc), a bare class attribute is an instance's

    def __init__(
        self,
        *,
        default_headers: Headers = (),
        tls: ssl.SSLContext | None = None,
        https_only: bool = False,
        connections: int = DEFAULT_CONNECTIONS,
        idle_seconds: float = IDLE_SECONDS,
        tracing: Tracing = NO_TRACING,
        clock: Clock | None = None,
    ) -> None:
        self._clock = clock or SystemClock()
        self._fixed = _header_lines((*default_headers, ("Accept", "application/json"), ("Accept-Encoding", "identity")))
        self._tls = tls
        self._https_only = https_only
        self._connections = connections
        self._idle_seconds = idle_seconds
        self._tracing = tracing
        self._targets: dict[str, _Target] = {}
        self._lines: dict[Headers, str] = {}  # a client's credentials are the same headers on every call
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._slots: dict[tuple[str, str, int], Slots] = {}
        self._busy: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # of the last `send`, kept while it runs
        self._sweep = Sweep()  # its connections' exchange deadlines (`_Expiry`), under one timer

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) >= 64:  # endpoints are configured or discovered: few; never grow unbounded
                self._targets.clear()
            target = _Target(url)
            if self._https_only and not target.tls:  # an issuer's CA file and pins mean nothing over plain http
                raise ProviderUnavailable("an issuer with TLS rules (pins, CA file) is called over https only")
            self._targets[url] = target
        return target

    def _encode(self, request: HttpRequest, target: _Target) -> bytes:
        lines = self._lines.get(request.headers)
        if lines is None:
            if len(self._lines) >= 64:  # one set per issuer (its credentials, its content type): few
                self._lines.clear()
            lines = self._lines[request.headers] = _header_lines(request.headers)
        head = request.method + target.line + self._fixed + lines
        if request.body or request.method == "POST":
            head += f"Content-Length: {len(request.body)}\r\n"
        return (head + "\r\n").encode("latin-1") + request.body

    def _slots_for(self, origin: tuple[str, str, int]) -> Slots:
        slots = self._slots.get(origin)
        if slots is None:
            slots = self._slots[origin] = Slots(self._connections)
        return slots

    async def send(self, request: HttpRequest) -> HttpReply:
        """One exchange within `request.timeout`; a transport failure or a broken rule is `ProviderUnavailable`."""
        what = "introspection" if request.method == "POST" else "discovery"
        with self._tracing.fetch(what, request.method, request.url):
            target = self._target(request.url)
            data = self._encode(request, target)
            loop = self._loop = loops.kept(self._loop)
            deadline = loop.time() + request.timeout
            try:
                return await self._exchange(loop, target, data, request.max_bytes, deadline)
            except TimeoutError:
                raise ProviderTimedOut("introspection provider timed out") from None

    def start(self, request: HttpRequest, done: Done) -> Callable[[], bool] | None:
        """`send` without a coroutine, when it can begin at once: a connection slot is free and a pooled
        connection is open (and tracing is off: a span covers `send`). The request is written now; `done`
        gets the answer or the failure from the callback that settles it, within `request.timeout`.
        Returns a function that drops the exchange if still under way (`done` is then never called; True),
        or None, having done nothing: then `send`."""
        if self._tracing is not NO_TRACING:
            return None
        try:
            target = self._target(request.url)
            data = self._encode(request, target)
        except ProviderUnavailable:
            return None  # `send` raises it
        origin = target.origin
        slots = self._slots_for(origin)
        if not slots.take_now():
            return None
        connection = self._pooled(origin, self._clock.monotonic())
        if connection is None:
            slots.release()
            return None

        def finished(outcome: HttpReply | ProviderUnavailable) -> None:
            self._busy.discard(connection)
            slots.give_back()
            if isinstance(outcome, HttpReply):
                self._keep(connection, origin)
            else:
                connection.close()
            done(outcome)

        def drop() -> bool:
            if not connection.abandon(finished):
                return False
            self._busy.discard(connection)
            slots.release()
            return True

        self._busy.add(connection)
        connection.begin(data, request.max_bytes, connection.deadline(request.timeout), finished)
        return drop

    async def _exchange(
        self, loop: asyncio.AbstractEventLoop, target: _Target, data: bytes, max_bytes: int, deadline: float
    ) -> HttpReply:
        slots = self._slots_for(target.origin)
        if slots.locked():  # waiting for a connection counts against the deadline
            async with asyncio.timeout_at(deadline):
                await slots.acquire()
        else:
            await slots.acquire()
        try:
            connection = self._pooled(target.origin, self._clock.monotonic())
            if connection is None:
                async with asyncio.timeout_at(deadline):  # connecting and the TLS handshake too
                    connection = await self._connect(target)
            self._busy.add(connection)
            try:
                reply = await connection.exchange(data, max_bytes, deadline)
            except BaseException:  # a failure or the deadline: the stream is in an unknown state
                connection.close()
                raise
            finally:
                self._busy.discard(connection)
            self._keep(connection, target.origin)
            return reply
        finally:
            slots.release()

    def _keep(self, connection: _Connection, origin: tuple[str, str, int]) -> None:
        """Back to the pool after a complete answer that allows keep-alive; else closed."""
        if connection.reusable and not connection.closed:
            now = connection.idle_since = self._clock.monotonic()
            idle = self._idle.setdefault(origin, [])
            while idle and (idle[0].closed or idle[0].idle_since < now - self._idle_seconds):
                idle.pop(0).close()  # the oldest first: a quiet spell must not keep a burst's sockets open
            idle.append(connection)
        else:
            connection.close()

    def _pooled(self, origin: tuple[str, str, int], now: float) -> _Connection | None:
        """The most recently used idle connection still open and fresh; stale ones are closed."""
        idle = self._idle.get(origin)
        if not idle:
            return None
        fresh_since = now - self._idle_seconds
        while idle:
            connection = idle.pop()
            if connection.closed:  # the provider closed it while it was idle
                continue
            if connection.idle_since >= fresh_since:
                return connection
            connection.close()
            for stale in idle:  # older than this one: as stale
                stale.close()
            idle.clear()
        return None

    def _new_connection(self) -> _Connection:
        return _Connection(self._sweep)

    async def _connect(self, target: _Target) -> _Connection:
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if target.tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()  # verifies the chain and the host name
            tls = self._tls
        try:
            _, connection = await loop.create_connection(
                self._new_connection, target.host, target.port, ssl=tls, server_hostname=target.host if tls else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise ProviderUnavailable(f"introspection provider unreachable ({type(exc).__name__})") from exc
        return connection

    async def close(self) -> None:
        """Closes every connection, idle or in use."""
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
        for connection in list(self._busy):
            connection.close()
