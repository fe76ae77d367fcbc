"""Kong external plugin (kong-pdk, Python): asks the verifier's gRPC `verifier.v1.Verifier/Check`.

The slower twin of the Lua plugin in kong/plugins/edge-verifier: the same decisions, but every PDK
call it makes (reading the request, setting a header, exiting) is a MessagePack RPC round trip over
the plugin server's unix socket, on top of the gRPC call itself. See kong/python/README.md.

The plugin translates and decides nothing: `allowed` (with a 2xx `http_status`; another is a 503) sets the verifier's
`upstream_headers` of the reserved `X-Authenticated-*` family (`for_upstream`: the Lua plugin's rule; any other name
is not set, with a warning) on the upstream request (client-sent `X-Authenticated-*`, `X-Kong-Consumer-*`,
`X-Consumer-Groups`, method overrides (`X-HTTP-Method-Override`, `X-HTTP-Method`, `X-Method-Override`,
`X-Forwarded-Method`), underscore spellings of `X-Forwarded-*`, request targets (`X-Original-*`, `X-Rewrite-URL`,
`X-Forwarded-Uri`) and, when no Kong authenticator named a
consumer, `X-Consumer-*` / `X-Credential-Identifier` / `X-Anonymous-Consumer` are cleared first, by name as
well as every one seen, in any spelling with underscores) and authenticates the Kong consumer the verifier
names (`X-Kong-Consumer-Username`, the verifier's `upstream.consumer`) as the Lua plugin does, through
`kong.client.load_consumer` and `kong.client.authenticate`, and hands the client only a DPoP nonce and rate-limit
state (`for_client`); a refusal is relayed with the verifier's status, `response_headers` (but connection headers)
and body, plus what the forward-auth door adds and the Lua plugin relays: `X-Verifier-Reason` and the body's
`Content-Type`, with `Cache-Control: no-store` (the verifier's reuse of a refusal is a gateway's, never the
client's). A request with more headers than can be read is refused (400), as by the Lua plugin: a spoofed
identity header past the limit could not be seen to be cleared. A verifier that cannot be reached, or answers
after the deadline, fails closed with 503; `fail_open` passes only when no connection to the verifier could be set
up (the Check was never sent), never after a deadline or a connection lost under the call (a verifier that crashed on
the request): the credential may have been under check. The client certificate thumbprint sent to the verifier comes
only from the TLS connection Kong terminated, never from a request header.

Checks go over a small pool of gRPC channels per target (`VerifierClient`): the verifier allows 4
streams per connection, and another connection is opened when every one is full, as Envoy does. After a
failed connection attempt no new connection to that target is tried for a growing, jittered back-off
(gRPC's connection back-off, shortened for a sidecar): meanwhile a Check with no connection to use fails
at once as unavailable, so a verifier coming back is not met by one connection per request.

Runs under `kong-python-pluginserver` in its default threaded mode (grpcio is thread-safe; under
`--gevent` grpcio would need `grpc.experimental.gevent.init_gevent()` first).
"""

from __future__ import annotations

import random
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import grpc

from verifier.binding.mtls import thumbprint_from_pem
from verifier.errors import MalformedRequest
from verifier.settings import DEFAULT_GRPC_MAX_CONCURRENT_STREAMS
from verifier.v1 import verifier_pb2, verifier_pb2_grpc

version = "0.1.0"
# After Kong's bundled authenticators (jwt 1450, oauth2 1400, key-auth 1250, openid-connect 1050),
# before what keys on the consumer (acl 950, rate-limiting 910): as the Lua plugin.
priority = 990

# Deadline of one Check (milliseconds): the verifier answers from memory on loopback.
DEFAULT_TIMEOUT_MS = 1000
# Request headers read (kong.request.get_headers' ceiling; its default is 100). Over the plugin
# server's RPC Kong returns only the first result of get_headers, so truncation cannot be seen: a
# request showing this many header lines may have more, and is refused.
MAX_REQUEST_HEADERS = 1000
# Checks in flight per channel before another channel (connection) is opened: the verifier's
# SETTINGS_MAX_CONCURRENT_STREAMS (`grpc_max_concurrent_streams`), which a client cannot read from grpcio.
DEFAULT_STREAMS_PER_CHANNEL = DEFAULT_GRPC_MAX_CONCURRENT_STREAMS
MAX_STREAMS_PER_CHANNEL = 10_000  # the verifier's own ceiling for the setting
# Channels per target: 8 x 4 = 32 Checks in flight, far past what one plugin server sends to a verifier
# answering from memory; more wait at the client for a stream.
DEFAULT_MAX_CHANNELS = 8
MAX_MAX_CHANNELS = 256
# After a failed connection attempt, no new connection to the target before a back-off (milliseconds):
# gRPC's connection back-off (A6: x1.6 per further failure, +-20% jitter) with a first wait of 250 ms
# instead of 1 s and a ceiling of 5 s instead of 120 s: a sidecar verifier on loopback restarts within
# seconds, and one attempt per plugin server every few seconds costs it nothing.
DEFAULT_RECONNECT_BACKOFF_MS = 250
DEFAULT_RECONNECT_BACKOFF_MAX_MS = 5000
MAX_RECONNECT_BACKOFF_MS = 600_000
BACKOFF_MULTIPLIER = 1.6
BACKOFF_JITTER = 0.2  # plugin servers that lost the verifier together do not come back in step

Schema = (
    # host:port of the verifier's gRPC listener, e.g. 127.0.0.1:50051 (a sidecar on loopback)
    {"grpc_target": {"type": "string", "required": True}},
    {"timeout": {"type": "integer", "default": DEFAULT_TIMEOUT_MS, "between": [1, 60000], "required": True}},
    # let requests through (without identity) when the verifier is unreachable (never when too slow)
    {"fail_open": {"type": "boolean", "default": False, "required": True}},
    # the verifier named a consumer Kong does not know: refuse (403), or pass as `anonymous`
    {"consumer_not_found": {"type": "string", "default": "refuse", "required": True,
                            "one_of": ["refuse", "anonymous"]}},
    # the anonymous consumer's id or username (Kong's convention)
    {"anonymous": {"type": "string", "len_min": 1}},
    # Checks in flight per gRPC channel (connection) before another is opened: the verifier's
    # grpc_max_concurrent_streams
    {"streams_per_channel": {"type": "integer", "default": DEFAULT_STREAMS_PER_CHANNEL,
                             "between": [1, MAX_STREAMS_PER_CHANNEL], "required": True}},
    # channels (connections) per verifier target, at most; past them Checks wait for a free stream
    {"max_channels": {"type": "integer", "default": DEFAULT_MAX_CHANNELS, "between": [1, MAX_MAX_CHANNELS],
                      "required": True}},
    # ms without a new connection to the verifier after a failed attempt (x1.6 after each further one,
    # +-20%), up to reconnect_backoff_max; Checks with no connection to use meanwhile are unavailable
    {"reconnect_backoff": {"type": "integer", "default": DEFAULT_RECONNECT_BACKOFF_MS,
                           "between": [1, MAX_RECONNECT_BACKOFF_MS], "required": True}},
    {"reconnect_backoff_max": {"type": "integer", "default": DEFAULT_RECONNECT_BACKOFF_MAX_MS,
                               "between": [1, MAX_RECONNECT_BACKOFF_MS], "required": True}},
)

# Request headers that carry a credential or proof: forwarded to the verifier byte for byte.
CREDENTIAL_HEADERS = ("authorization", "dpop", "x-webauthn-assertion")
# Identity the upstream may trust only because this plugin set it.
IDENTITY_PREFIX = "x-authenticated-"
# Cleared by name whether seen or not: what the verifier sets, and what Kong authenticators set
# (the consumer headers only when no authenticator named a consumer), as the Lua plugin.
IDENTITY_HEADERS = (
    "x-authenticated-userid",
    "x-authenticated-scope",
    "x-authenticated-issuer",
    "x-authenticated-roles",
)
CONSUMER_HEADERS = (
    "x-consumer-id",
    "x-consumer-custom-id",
    "x-consumer-username",
    "x-credential-identifier",
    "x-anonymous-consumer",
)
# Set by acl (priority 950, after this plugin) for the consumer it allowed; always cleared.
CONSUMER_GROUPS_HEADER = "x-consumer-groups"
# Answer headers naming the consumer (the verifier's `upstream.consumer`): for this plugin, not the upstream.
CONSUMER_USERNAME_HEADER = "x-kong-consumer-username"
CONSUMER_CUSTOM_ID_HEADER = "x-kong-consumer-custom-id"
NAMING_HEADERS = (CONSUMER_USERNAME_HEADER, CONSUMER_CUSTOM_ID_HEADER)
# Every client header with these prefixes is cleared: identity, and how the verifier names the consumer.
CLEARED_PREFIXES = (IDENTITY_PREFIX, "x-kong-consumer-")
# Method overrides an application framework may honour: the verifier judged the request's real method, so
# the upstream must not be told another one (cleared by name, as the Lua plugin does). X-Forwarded-Method is how the
# Lua plugin and forward-auth gateways tell a verifier the method; Kong never sets it for the upstream.
METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override", "x-forwarded-method")
# Kong sets X-Forwarded-For/-Proto/-Host/-Port/-Path/-Prefix for the upstream itself (from its own state, or kept
# from trusted_ips): those are Kong's. An underscore spelling (X_Forwarded_Host) never is, and CGI-style frameworks
# read it as the dashed one: cleared, as the Lua plugin does.
FORWARDED_PREFIX = "x-forwarded-"
# The request target in a header: applications behind IIS's ARR (X-Original-URL), Symfony and Zend Framework before
# CVE-2018-14773's fixes (X-Original-URL, X-Rewrite-URL) route by it instead of the request line the verifier judged;
# X-Forwarded-Uri is where Traefik-style applications look. Cleared in every spelling, as the Lua plugin does.
TARGET_HEADERS = ("x-rewrite-url", "x-forwarded-uri")
ORIGINAL_PREFIX = "x-original-"
USERID_HEADER = "x-authenticated-userid"
UNKNOWN_CONSUMER_STATUS = 403
UNKNOWN_CONSUMER_MESSAGE = "The verified identity is not a known consumer"
UNEXPECTED_STATUS = 500
UNEXPECTED_MESSAGE = "An unexpected error occurred"
TOO_MANY_HEADERS_STATUS = 400
MALFORMED_STATUS = 400  # a header name, or a value the verifier would be told, is not UTF-8
DEFAULT_PORTS = {"http": 80, "https": 443}
UNAVAILABLE_STATUS = 503
UNAVAILABLE_MESSAGE = "Authorization service unavailable"
# The statuses a refusal is relayed with: what the Lua plugin relays (any answer but a 2xx, which is its allow) and
# kong.response.exit can send. A refusal outside them (an empty answer's 0, a 2xx) is an answer the plugin cannot act
# on: unavailable, as an unreadable one, never a success for the client nor Kong's 500 from exit's own check.
REFUSAL_STATUSES = range(300, 600)
# The statuses of an allow: what the Lua plugin reads as one (a 2xx). An allow with another (none, a refusal's) is
# an answer the plugin cannot act on: unavailable, never a pass.
ALLOW_STATUSES = range(200, 300)
REASON_HEADER = "X-Verifier-Reason"
# Answer headers that describe a connection, not the answer (RFC 9110 section 7.6.1), or that nginx writes itself
# on the way out, and the gateway's reuse lines (nginx's auth cache, a gateway's Cache-Control): never relayed with a
# refusal, as by the Lua plugin (NOT_RELAYED). The client gets REFUSAL_CACHE_CONTROL instead.
NOT_RELAYED = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                         "upgrade", "content-length", "date", "server", "x-accel-expires", "cache-control"})
# Every refusal's Cache-Control to the client, as nginx and the Lua plugin send it: the verifier's reuse of a refusal
# (`cache_max_age_seconds`, `private, max-age=N` at its forward-auth door) is for a gateway; a browser keeping a 401 for
# N seconds would refuse the user's next token (a client's cache is keyed by the URL, not the Authorization header).
REFUSAL_CACHE_CONTROL = "no-store"
# What goes with an answer the plugin gives itself, with no refusal of the verifier's to relay (a request it refuses
# before asking, an unknown consumer, its own failure), as the Lua plugin's: never to be kept by a browser or a shared
# cache, since a retry may be answered otherwise. Its 503 (the verifier unreachable, too slow or unreadable) also says
# when to retry, `Retry-After: 1`, as nginx's and Envoy's shipped configurations answer theirs. Handed to the PDK as a
# dict of its own (the RPC packs a dict, not a read-only view).
OWN_ANSWER_HEADERS = MappingProxyType({"Cache-Control": REFUSAL_CACHE_CONTROL})
UNAVAILABLE_HEADERS = MappingProxyType({"Cache-Control": REFUSAL_CACHE_CONTROL, "Retry-After": "1"})


def for_upstream(lname: str) -> bool:
    """Whether an allow's header (name lower-cased) may be set on the upstream request: the reserved identity family
    only (X-Authenticated-*: the fixed four, mapped claims, and the signed assertion, which the verifier keeps under
    the prefix), as the Lua plugin's to_decision. Every client copy of the family is cleared first, so the upstream
    can trust it; any other name the answer gives (X-Consumer-*, Host, X-Forwarded-User) is not set."""
    return lname.startswith(IDENTITY_PREFIX)


def for_client(lname: str) -> bool:
    """Whether an allow's header (name lower-cased) may be set on the client's answer: a fresh DPoP nonce (RFC 9449
    section 8.2) and rate-limit state, as the Lua plugin's is_client_header; never Set-Cookie, Location and such."""
    return lname == "dpop-nonce" or lname.startswith(("ratelimit", "x-ratelimit-"))


class Backoff:
    """gRPC's connection back-off (A6): how long no new connection is tried after failed attempts.

    A plain class: the plugin server loads this file without registering it as a module, where
    `dataclasses` cannot look up its annotations."""

    __slots__ = ("initial_s", "max_s")

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s

    def delay(self, failures: int, spread: float) -> float:
        """Seconds to wait after `failures` (>= 1) consecutive failed attempts; `spread` in [-1, 1]."""
        # the exponent stops growing long before the ceiling stops mattering (1.6**64 ~ 1e13)
        grown = min(self.initial_s * BACKOFF_MULTIPLIER ** min(failures - 1, 64), self.max_s)
        return grown * (1.0 + BACKOFF_JITTER * spread)


# What gRPC's C core says when no connection to the target could be set up (pick_first: every address failed,
# refused, or closed before the HTTP/2 handshake): the Check was never sent. Any other failure, UNAVAILABLE included
# ("Stream removed (Socket closed)": the connection closed under the call, as when the verifier crashes on the
# request or is killed mid-check), may come after the verifier had the request: `fail_open` never passes it.
NEVER_CONNECTED = "failed to connect to all addresses"


def never_sent(exc: grpc.RpcError) -> bool:
    """Whether a failed Check never reached the verifier: no connection could be set up, or none may be tried yet
    (`ReconnectBackoff`). Decided on positive evidence only: an error this does not recognise counts as sent."""
    if isinstance(exc, ReconnectBackoff):
        return True
    if not isinstance(exc, grpc.Call) or exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    return (exc.details() or "").startswith(NEVER_CONNECTED)


class ReconnectBackoff(grpc.RpcError):
    """No connection to the target to use, and none may be tried yet: the verifier is unavailable."""

    def __init__(self, target: str, retry_in_s: float, failures: int) -> None:
        super().__init__(f"no connection to {target}: {failures} failed connection attempt(s), "
                         f"the next in {retry_in_s:.3f} s")


class _Channel:
    """One gRPC channel (its own connection) and the Checks this plugin has in flight on it."""

    def __init__(self, target: str) -> None:
        # a local subchannel pool: a channel of its own connection, not the process-wide one that
        # channels with equal arguments share (and not that connection's reconnect back-off)
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.enable_http_proxy", 0), ("grpc.use_local_subchannel_pool", 1)]
        )
        self.stub = verifier_pb2_grpc.VerifierStub(self.channel)
        self.in_flight = 0
        self.retired = False
        self.answered = False  # a Check was answered over it: its connection attempt succeeded


class _Target:
    """One verifier target's channels and its connection back-off."""

    def __init__(self) -> None:
        self.channels: list[_Channel] = []
        self.failures = 0  # consecutive failed connection attempts
        self.retry_at = 0.0  # monotonic seconds: no new connection before
        # a Check failed UNAVAILABLE since the last answer: one connection attempt at a time
        self.suspect = False


class VerifierClient:
    """A small pool of gRPC channels per verifier target, shared by every plugin instance and thread.

    The verifier's gRPC server allows few streams per connection (`grpc_max_concurrent_streams`, 4 by
    default); a call past that waits at the client for a free stream. So, as Envoy's HTTP/2 pool, a Check
    goes on a channel with fewer than `streams` Checks in flight, and another channel (connection) is
    opened when every one is full, up to `max_channels`; past that the least busy channel takes it (and
    grpc queues it for a stream). A channel whose call failed UNAVAILABLE is retired: no new Checks, closed
    once its last one ends. Channels stay open otherwise (at most `max_channels` per target).

    Connection back-off, as gRPC's subchannels (A6): a channel that never answered and fails UNAVAILABLE
    is a failed connection attempt; no new channel to its target is opened for `Backoff.delay` (growing
    with each further failure, reset by any answer). Meanwhile Checks use the channels still open, and
    with none fail at once (`ReconnectBackoff`), touching no socket. A channel that had answered and
    fails (the verifier restarted, its connection was lost) is not counted: the next Check tries one new
    connection at once, as gRPC reconnects at once after losing a working connection. Until something is
    answered again, only one channel that has not answered yet is open (one attempt at a time; more
    Checks queue on it). Only a verifier that cannot be connected to starts a back-off: a request cannot
    (the verifier answers every request, or refuses it with another status).

    The plugin server builds a plugin instance per configuration and never tells it when it is
    dropped, so channels are kept here by target rather than per instance (which would leak them).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 spread: Callable[[], float] = lambda: random.SystemRandom().uniform(-1.0, 1.0)) -> None:
        self._lock = threading.Lock()
        self._targets: dict[str, _Target] = {}
        self._clock = clock
        self._spread = spread

    def check(self, target: str, request: verifier_pb2.CheckRequest, *, timeout_s: float, streams: int,
              max_channels: int, backoff: Backoff) -> verifier_pb2.CheckResponse:
        """`Check` on a channel to `target` with a free stream (see the class); raises grpc.RpcError
        (`ReconnectBackoff` without trying when the target is in back-off with no channel open)."""
        chosen = self._acquire(target, streams, max_channels)
        answered = unavailable = False
        try:
            answer: verifier_pb2.CheckResponse = chosen.stub.Check(request, timeout=timeout_s)
            answered = True
            return answer
        except grpc.RpcError as exc:
            unavailable = isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNAVAILABLE
            raise
        finally:
            self._release(target, chosen, answered=answered, unavailable=unavailable, backoff=backoff)

    def _acquire(self, target: str, streams: int, max_channels: int) -> _Channel:
        with self._lock:
            state = self._targets.get(target)
            if state is None:
                state = self._targets[target] = _Target()
            pool = state.channels
            chosen = next((c for c in pool if c.in_flight < streams), None)
            if chosen is None and len(pool) < max_channels and not (
                state.suspect and any(not c.answered for c in pool)
            ):
                now = self._clock()
                if now >= state.retry_at:
                    chosen = _Channel(target)
                    pool.append(chosen)
                elif not pool:
                    raise ReconnectBackoff(target, state.retry_at - now, state.failures)
            if chosen is None:  # every channel is full and no other may be opened: grpc queues it
                chosen = min(pool, key=lambda c: c.in_flight)
            chosen.in_flight += 1
            return chosen

    def _release(self, target: str, chosen: _Channel, *, answered: bool, unavailable: bool,
                 backoff: Backoff) -> None:
        with self._lock:
            chosen.in_flight -= 1
            state = self._targets[target]
            if answered:
                chosen.answered = True
                state.failures, state.retry_at, state.suspect = 0, 0.0, False
            elif unavailable and not chosen.retired:
                chosen.retired = True
                state.channels.remove(chosen)
                state.suspect = True
                now = self._clock()
                # a channel that never answered: its connection attempt failed. Counted once per back-off:
                # channels opened before it began fail within it, and do not lengthen it.
                if not chosen.answered and now >= state.retry_at:
                    state.failures += 1
                    state.retry_at = now + backoff.delay(state.failures, self._spread())
            close = chosen.retired and chosen.in_flight == 0
        if close:
            chosen.channel.close()  # its last Check has ended: nothing of it is cancelled


# The plugin server imports this module once and has no other place to hold long-lived state.
CLIENT = VerifierClient()

# How the plugin server decodes a string Kong sent that is not UTF-8 (see `_read_what_kong_sends`).
UNDECODABLE = "surrogateescape"
# The kong-pdk releases whose listener `_read_what_kong_sends` is known to fix (pyproject.toml's `kong` extra); any
# other is still checked at start-up (`_listener_fault`), and refused if the fix did not take.
KONG_PDK_KNOWN = "kong-pdk>=0.36,<0.37"
# A frame as Kong sends one, a string in it not UTF-8 (a Latin-1 byte): what the start-up check feeds the listener.
_PROBE_METHOD = "plugin.EdgeVerifierProbe"
_PROBE_VALUE = "3V\udce4xel"


class _LenientMsgpack:
    """The msgpack module as kong_pdk's listener uses it, its `Unpacker` decoding bytes that are not UTF-8."""

    lenient = True  # a module reloaded (another class object) does not wrap the wrapper again

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def Unpacker(self, *args: Any, **kwargs: Any) -> Any:  # msgpack's own name
        """msgpack's Unpacker, strings that are not UTF-8 decoded with surrogate escapes."""
        kwargs.setdefault("unicode_errors", UNDECODABLE)
        return self._real.Unpacker(*args, **kwargs)


class _ProbeSocket:
    """A connection from Kong as the listener reads it (`recv`, `send`): one frame, then the end."""

    def __init__(self, frame: bytes) -> None:
        self._frames = [frame]
        self.sent: list[bytes] = []

    def recv(self, _n: int) -> bytes:
        return self._frames.pop() if self._frames else b""

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)


class _ProbeServer:
    """The plugin server as the listener calls it: `logger`, and one method per RPC (`plugin.EdgeVerifierProbe`)."""

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self.logger = self

    def edge_verifier_probe(self, value: Any) -> str:
        self.seen.append(value)
        return "ok"

    def debug(self, *_: Any) -> None:
        """The listener logs each RPC at debug level: nothing to log here."""

    warn = error = info = debug


def _listener_fault(listener: Any) -> str | None:
    """None when kong_pdk's listener, as it will read Kong's connections, hands a plugin a string that is not UTF-8
    (surrogate escapes); else what is wrong. A frame as Kong packs it goes through the listener's own `Server.handle`
    (the code every RPC from Kong takes), so a kong-pdk that reads frames another way than `_LenientMsgpack` reaches
    (its Unpacker imported by name, strict decoding asked for, another module) is caught here, not by a request."""
    import msgpack  # kong-pdk's own dependency: the plugin runs under its plugin server

    frame = msgpack.packb([0, 1, _PROBE_METHOD, [_PROBE_VALUE]], unicode_errors=UNDECODABLE)
    server, sock = _ProbeServer(), _ProbeSocket(frame)
    try:
        listener.Server(server).handle(sock, None)
    except Exception as exc:
        return f"the listener failed on a frame that is not UTF-8: {type(exc).__name__}: {exc}"
    if server.seen != [_PROBE_VALUE] or not sock.sent:
        return f"the listener did not hand the plugin a string that is not UTF-8 (got {server.seen!r})"
    return None


# Why this process must not serve (`Plugin` refuses to start an instance), or None; see `_read_what_kong_sends`.
LISTENER_FAULT: str | None = None


def _read_what_kong_sends() -> None:
    """Kong's lua-MessagePack packs every Lua string as a msgpack str, byte for byte, and kong_pdk's listener decodes
    them as strict UTF-8: a request with a header value or target that is not UTF-8 (a Latin-1 User-Agent,
    kong-python-pdk#146) raised in the listener before any plugin ran and closed Kong's connection, which Kong
    logs and then proxies the request, unchecked and with the client's identity headers. Decoded with surrogate
    escapes, it reaches `Plugin.access`, which refuses such a value when it would tell the verifier it.

    The fix wraps an internal of kong-pdk (`kong_pdk.listener.msgpack`), known to work with `KONG_PDK_KNOWN`. It is
    checked, not assumed: a frame that is not UTF-8 is fed through the listener (`_listener_fault`), and if the
    plugin would not see it `LISTENER_FAULT` says why and `Plugin` refuses every instance. Kong answers a plugin
    whose instance cannot start with 500 on each request (its `get_instance_id` raises under the access phase);
    a plugin server that read such frames strictly would instead let Kong proxy them unchecked."""
    global LISTENER_FAULT
    try:
        import kong_pdk.listener as listener
    except Exception as exc:  # no kong-pdk, or one without that module: nothing is known of how it reads
        LISTENER_FAULT = f"kong_pdk.listener cannot be imported: {type(exc).__name__}: {exc}"
        return
    real = getattr(listener, "msgpack", None)
    if real is not None and not getattr(real, "lenient", False):
        listener.msgpack = _LenientMsgpack(real)
    LISTENER_FAULT = _listener_fault(listener)
    if LISTENER_FAULT is not None:
        print(f"edge_verifier: refusing to serve, every request on its routes will be answered 500 by Kong: "
              f"{LISTENER_FAULT}; this kong-pdk is not one the plugin is known to work with ({KONG_PDK_KNOWN})",
              file=sys.stderr, flush=True)


_read_what_kong_sends()


def _utf8(value: str, what: str) -> str:
    """`value`, or `MalformedRequest` when Kong sent bytes that are not UTF-8 (surrogate escapes, `UNDECODABLE`):
    a gRPC string cannot carry them, and the verifier must judge the bytes the upstream gets."""
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise MalformedRequest(f"{what} is not UTF-8") from None
    return value


def _value(result: Any) -> Any:
    """A PDK call's value under either plugin-server style: Lua-style `(data, err)` or plain data.

    msgpack decodes arrays to lists, so a tuple can only be the Lua-style pair.
    """
    if isinstance(result, tuple):
        data, err = result
        if err:
            raise RuntimeError(f"PDK call failed: {err}")
        return data
    return result


def _values(v: Any) -> list[str]:
    """A header's values: Kong sends each as a list (a string, or true for an empty value, otherwise)."""
    if isinstance(v, list):
        return [str(x) for x in v]
    if v is True or v is None:
        return [""]
    return [str(v)]


def _joined(headers: Sequence[verifier_pb2.Header]) -> dict[str, str]:
    """Headers for kong.response.exit; repeated names become one comma-joined field, which means the
    same (RFC 9110 section 5.3) and is what nginx before 1.23 can send for WWW-Authenticate."""
    out: dict[str, str] = {}
    spelling: dict[str, str] = {}
    for h in headers:
        if h.name.lower() in NOT_RELAYED:
            continue
        key = spelling.setdefault(h.name.lower(), h.name)
        out[key] = f"{out[key]}, {h.value}" if key in out else h.value
    return out


def _judged_host(host: str, sent: Any) -> str:
    """The host the verifier is told: nginx's $host (kong.request.get_host: an absolute-form request line's
    authority, else Host). Kong's router routes by the Host header instead, and preserve_host passes that header
    upstream, so when the two name different hosts (`GET http://api.example.test/ HTTP/1.1` with
    `Host: admin.example.test`) both are told, comma-joined, as the Lua plugin does: the verifier refuses a
    request whose host readings fall under different policies."""
    values = _values(sent) if sent is not None else []
    if not values or values == [host]:
        return host
    # nginx refuses a second Host line; the header's host as $host spells it: lower case, no port, no final dot
    name = ", ".join(values).lower()
    name = re.sub(r"\]:\d*$", "]", name) if name.startswith("[") else re.sub(r":\d*$", "", name)
    name = name.removesuffix(".")
    return host if name == host else f"{host},{name}"


def _client_cert_thumbprint(kong: Any, scheme: str) -> str:
    """`x5t#S256` of the certificate the client presented to Kong's own TLS listener, or ""."""
    if scheme != "https":
        return ""  # a plain-http connection carries no client certificate
    pem = _value(kong.nginx.get_var("ssl_client_raw_cert"))
    if not pem or not isinstance(pem, str):
        return ""
    try:
        return thumbprint_from_pem(pem)
    except MalformedRequest:
        return ""  # fail closed: a certificate-bound token is then refused


def _authenticate(kong: Any, consumer: Mapping[str, Any], credential: dict[str, str] | None, *,
                  anonymous: bool) -> None:
    """kong.client.authenticate plus the upstream headers Kong's authenticators set. Consumer groups an
    earlier authenticator's consumer brought are dropped first (Kong's authenticate keeps groups
    already set); a Kong before 3.4 has no consumer groups, nor the call."""
    try:
        _value(kong.client.set_authenticated_consumer_groups(None))
    except Exception as exc:  # the PDK's error type depends on the plugin server's style
        kong.log.debug(f"consumer groups not reset: {exc}")
    _value(kong.client.authenticate(consumer, credential))
    fields = (
        ("X-Consumer-ID", consumer.get("id")),
        ("X-Consumer-Custom-ID", consumer.get("custom_id")),
        ("X-Consumer-Username", consumer.get("username")),
        ("X-Credential-Identifier", credential["id"] if credential else None),
        ("X-Anonymous-Consumer", "true" if anonymous else None),
    )
    for name, value in fields:
        if value:
            kong.service.request.set_header(name, str(value))
        else:
            kong.service.request.clear_header(name)


def _bounded(config: Mapping[str, Any], name: str, default: int, maximum: int) -> int:
    """An integer setting in [1, maximum] (as `Schema` says; a plugin server does not check it)."""
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ValueError(f"config.{name} must be an integer between 1 and {maximum}, not {value!r}")
    return value


class Plugin:
    """The edge-verifier access handler, one instance per plugin configuration."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        """Reads the configuration Kong validated against `Schema`; refuses to start when the plugin server could not be
        made to hand on requests that are not UTF-8 (`LISTENER_FAULT`): Kong then answers each request 500."""
        if LISTENER_FAULT is not None:
            raise RuntimeError(f"edge_verifier cannot serve under this plugin server: {LISTENER_FAULT} "
                               f"(known to work: {KONG_PDK_KNOWN})")
        self.target = str(config["grpc_target"])
        self.timeout_s = int(config.get("timeout") or DEFAULT_TIMEOUT_MS) / 1000.0
        self.fail_open = bool(config.get("fail_open", False))
        self.anonymous = str(config["anonymous"]) if config.get("anonymous") else None
        self.consumer_not_found = str(config.get("consumer_not_found") or "refuse")
        if self.consumer_not_found == "anonymous" and not self.anonymous:
            # Kong validates the Lua plugin's schema with this check; here the plugin itself must
            raise ValueError("config.anonymous is required when config.consumer_not_found is 'anonymous'")
        self.streams = _bounded(config, "streams_per_channel", DEFAULT_STREAMS_PER_CHANNEL, MAX_STREAMS_PER_CHANNEL)
        self.max_channels = _bounded(config, "max_channels", DEFAULT_MAX_CHANNELS, MAX_MAX_CHANNELS)
        initial = _bounded(config, "reconnect_backoff", DEFAULT_RECONNECT_BACKOFF_MS, MAX_RECONNECT_BACKOFF_MS)
        ceiling = _bounded(config, "reconnect_backoff_max", DEFAULT_RECONNECT_BACKOFF_MAX_MS,
                           MAX_RECONNECT_BACKOFF_MS)
        if ceiling < initial:
            raise ValueError(f"config.reconnect_backoff_max ({ceiling}) must be at least "
                             f"config.reconnect_backoff ({initial})")
        self.backoff = Backoff(initial / 1000.0, ceiling / 1000.0)

    def access(self, kong: Any) -> None:
        """Ask the verifier about this request; pass it with identity, or answer for the verifier.

        Any failure is answered (500), never left to Kong: a handler that raises ends its thread without a word
        to the plugin server, whose step then waits forever, and Kong, its RPC read timed out, logs the error
        and proxies the request as if the plugin had passed it."""
        try:
            self._access(kong)
        except MalformedRequest as exc:  # bytes that are not UTF-8 where they could not be cleared or told
            kong.response.exit(MALFORMED_STATUS, {"message": str(exc)}, dict(OWN_ANSWER_HEADERS))
        except Exception as exc:  # a PDK call's error (Kong's datastore down, say) or a bug: fail closed
            kong.log.err(f"edge-verifier failed: {type(exc).__name__}: {exc}")
            kong.response.error(UNEXPECTED_STATUS, UNEXPECTED_MESSAGE, dict(OWN_ANSWER_HEADERS))

    def _access(self, kong: Any) -> None:
        headers = _value(kong.request.get_headers(MAX_REQUEST_HEADERS)) or {}
        if sum(len(_values(v)) for v in headers.values()) >= MAX_REQUEST_HEADERS:
            kong.response.exit(TOO_MANY_HEADERS_STATUS, {"message": "Too many request headers"},
                               dict(OWN_ANSWER_HEADERS))
            return
        clear = dict.fromkeys((*IDENTITY_HEADERS, CONSUMER_GROUPS_HEADER, *NAMING_HEADERS, *METHOD_OVERRIDE_HEADERS))
        for name in headers:
            # `X_Authenticated_Roles` is X-Authenticated-Roles to CGI-style frameworks (WSGI, Rack, PHP), and
            # Kong's nginx has `underscores_in_headers on`: every spelling is cleared, as the one with dashes.
            # a name Kong could not be told back to clear (nginx drops such names unless ignore_invalid_headers is off)
            lname = _utf8(name, "a header name").lower()
            dashed = lname.replace("_", "-")
            # an underscore spelling of a consumer or X-Forwarded-* header is never Kong's own
            underscored_kongs = dashed != lname and (dashed in CONSUMER_HEADERS or dashed.startswith(FORWARDED_PREFIX))
            if (dashed.startswith((*CLEARED_PREFIXES, ORIGINAL_PREFIX)) or dashed in clear or dashed in TARGET_HEADERS
                    or underscored_kongs):
                clear[lname] = None
        earlier = _value(kong.client.get_consumer())
        if not earlier:
            clear.update(dict.fromkeys(CONSUMER_HEADERS))
        for name in clear:
            kong.service.request.clear_header(name)

        request = self._check_request(kong, headers)
        try:
            answer = CLIENT.check(self.target, request, timeout_s=self.timeout_s, streams=self.streams,
                                  max_channels=self.max_channels, backoff=self.backoff)
        except grpc.RpcError as exc:
            # in reconnect back-off the verifier is as unavailable as when a connection attempt fails
            backing_off = isinstance(exc, ReconnectBackoff)
            code = grpc.StatusCode.UNAVAILABLE if backing_off else exc.code() if isinstance(exc, grpc.Call) else None
            why = f"{code} ({exc})" if backing_off else str(code)
            if self.fail_open and never_sent(exc):
                kong.log.warn(f"verifier unavailable: {why}; fail_open lets the request pass")
                return
            kong.log.err(f"verifier unavailable: {why}")
            kong.response.error(UNAVAILABLE_STATUS, UNAVAILABLE_MESSAGE, dict(UNAVAILABLE_HEADERS))
            return

        if not answer.allowed:
            if answer.http_status not in REFUSAL_STATUSES:
                kong.log.err(f"verifier refused with status {answer.http_status}, which is no refusal's")
                kong.response.error(UNAVAILABLE_STATUS, UNAVAILABLE_MESSAGE, dict(UNAVAILABLE_HEADERS))
                return
            headers = _joined(answer.response_headers)
            given = {k.lower() for k in headers}
            # what the forward-auth door adds to a refusal, and so the Lua plugin tells the client: the reason, the
            # body's type, and no-store (never the verifier's reuse, which is a gateway's)
            if answer.reason and REASON_HEADER.lower() not in given:
                headers[REASON_HEADER] = answer.reason
            headers["Cache-Control"] = REFUSAL_CACHE_CONTROL
            if answer.body and "content-type" not in given:
                headers["Content-Type"] = "application/json"
            # always a string body: a nil inside the RPC's argument array would end Kong's unpack() early
            kong.response.exit(answer.http_status, answer.body, headers)
            return

        if answer.http_status not in ALLOW_STATUSES:
            kong.log.err(f"verifier allowed with status {answer.http_status}, which is no allow's")
            kong.response.error(UNAVAILABLE_STATUS, UNAVAILABLE_MESSAGE, dict(UNAVAILABLE_HEADERS))
            return

        # a name the verifier repeats (in any spelling) keeps its last spelling and value, as the Lua plugin's
        identity: dict[str, tuple[str, str]] = {}
        named: list[tuple[str, str]] = []
        for h in answer.upstream_headers:
            lname = h.name.lower()
            if lname in NAMING_HEADERS:
                named.append((lname, h.value))
            elif for_upstream(lname):
                identity[lname] = (h.name, h.value)
            else:
                kong.log.warn(f"the verifier's answer names {h.name!r} for the upstream, outside X-Authenticated-*: "
                              "not set")
        for name, value in identity.values():
            kong.service.request.set_header(name, value)
        userid = identity[USERID_HEADER][1] if USERID_HEADER in identity else ""
        # a verifier whose proto has `answer_headers` (for the gateway, never the upstream) names the
        # consumer there; one without it, among upstream_headers (above)
        named += [(h.name.lower(), h.value) for h in getattr(answer, "answer_headers", ())
                  if h.name.lower() in NAMING_HEADERS]
        if named and not self._authenticate_named(kong, named, userid):
            return
        if not named and not earlier and userid:
            # no consumer named, none set by an earlier authenticator: the verified user id becomes a credential
            # without consumer, as the Lua plugin does (rate-limiting's `limit_by: credential`, the log's
            # `authenticated_entity`)
            _value(kong.client.authenticate(None, {"id": userid}))
        for h in answer.response_headers:  # an allow may carry a DPoP-Nonce and rate-limit state for the client
            if for_client(h.name.lower()):
                kong.response.set_header(h.name, h.value)
            else:
                kong.log.warn(f"the verifier's answer names {h.name!r} for the client on an allow: not set")

    def _authenticate_named(self, kong: Any, named: list[tuple[str, str]], userid: str) -> bool:
        """Authenticate the consumer the verifier named, or follow `consumer_not_found`; False when the
        request was answered here."""
        if len(named) > 1:
            kong.log.err("the verifier's answer names more than one consumer")
            kong.response.error(UNEXPECTED_STATUS, UNEXPECTED_MESSAGE, dict(OWN_ANSWER_HEADERS))
            return False
        ((header, value),) = named
        if header == CONSUMER_CUSTOM_ID_HEADER:
            # the PDK over the plugin server has no lookup by custom_id (the Lua plugin has)
            kong.log.err("the verifier names consumers by custom_id: only the Lua plugin can find them")
            kong.response.error(UNEXPECTED_STATUS, UNEXPECTED_MESSAGE, dict(OWN_ANSWER_HEADERS))
            return False
        consumer = _value(kong.client.load_consumer(value, True)) if value else None
        if consumer and consumer.get("username") != value:
            # load_consumer tries the name as an id first: a subject equal to another consumer's id
            # found that consumer, which the verifier did not name
            consumer = None
        if consumer:
            credential = {"id": userid, "consumer_id": consumer["id"]} if userid else None
            _authenticate(kong, consumer, credential, anonymous=False)
            return True
        if self.consumer_not_found != "anonymous" or not self.anonymous:
            kong.log.info(f"verifier named the consumer with username '{value}', which Kong does not know: refused")
            kong.response.error(UNKNOWN_CONSUMER_STATUS, UNKNOWN_CONSUMER_MESSAGE, dict(OWN_ANSWER_HEADERS))
            return False
        anonymous = _value(kong.client.load_consumer(self.anonymous, True))
        if not anonymous:
            kong.log.err(f"anonymous consumer '{self.anonymous}' is configured but doesn't exist")
            kong.response.error(UNEXPECTED_STATUS, UNEXPECTED_MESSAGE, dict(OWN_ANSWER_HEADERS))
            return False
        _authenticate(kong, anonymous, None, anonymous=True)
        return True

    def _check_request(self, kong: Any, headers: Mapping[str, Any]) -> verifier_pb2.CheckRequest:
        # The scheme and port the client used, read alike: Kong's own, or a trusted proxy's (`trusted_ips`:
        # X-Forwarded-Proto/-Port of a TLS-terminating load balancer) or `port_maps`', as Kong tells the upstream.
        scheme = _utf8(str(_value(kong.request.get_forwarded_scheme())), "the scheme")
        host = _utf8(_judged_host(str(_value(kong.request.get_host())), headers.get("host")), "the host")
        port = _value(kong.request.get_forwarded_port())  # `port_maps`: `80:8000` behind a Kubernetes Service
        if port and int(port) != DEFAULT_PORTS.get(scheme):
            host = f"{host}:{int(port)}"
        credentials = {}
        for name, v in headers.items():
            lname = name.lower()
            if lname in CREDENTIAL_HEADERS:
                credentials[lname] = _utf8(", ".join(_values(v)), f"the {lname} header")
        return verifier_pb2.CheckRequest(
            method=_utf8(str(_value(kong.request.get_method())), "the method"),
            scheme=scheme,
            host=host,
            path=_utf8(str(_value(kong.request.get_path_with_query())), "the request target"),
            headers=credentials,
            client_address=str(_value(kong.client.get_ip()) or ""),
            client_cert_thumbprint=_client_cert_thumbprint(kong, scheme),
        )


if __name__ == "__main__":
    # a dedicated plugin server for this one plugin: `python edge_verifier.py --help`
    from kong_pdk.cli import start_dedicated_server

    start_dedicated_server("edge_verifier", Plugin, version, priority, list(Schema))
