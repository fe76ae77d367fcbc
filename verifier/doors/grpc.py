"""The gRPC doors: our own `verifier.v1.Verifier/Check` and Envoy's `envoy.service.auth.v3.Authorization/Check`
(wire-compatible with Envoy's ext_authz filter), plus standard health checking and reflection.

Both are registered as generic handlers taking the request as bytes; their responses are pre-serialized
bytes memoized on the decision: a cached decision is answered without building or serializing a protobuf
message. Each door keys a request: our own by its bytes (the Kong plugin sends the same bytes for the same
request), Envoy's by the request without the fields Envoy fills anew for every call (`envoy_request`). The
key finds the translation (parse + attributes, `RequestMemo`) and, while the pipeline says the same request
would get the same answer bytes, the answer itself (`AnswerMemo`, as the forward-auth door: not for a
refusal, a per-request check such as a rate limit, nor past a change of state). A Check whose path is empty is
answered 400 `invalid_request` (`GrpcDoors.undescribed`), as forward-auth answers a check whose path nothing tells:
never judged as `/`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import resource
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.type.v3 import http_status_pb2
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from verifier.decision import Decision, smuggled_identity
from verifier.doors.answer_memo import AnswerMemo
from verifier.doors.envoy_request import PER_REQUEST_HEADERS, request_key
from verifier.doors.refusals import GRPC_OK, grpc_code, sheds
from verifier.observe.metrics import Metrics
from verifier.observe.traceparent import TRACEPARENT, TRACESTATE
from verifier.observe.tracing import Tracing
from verifier.pipeline import Pipeline
from verifier.request import DescribedTwice, RequestAttributes, Undescribed, normalize_authority
from verifier.settings import (
    DEFAULT_GRPC_HANDSHAKE_TIMEOUT_SECONDS,
    DEFAULT_GRPC_MAX_CONCURRENT_STREAMS,
    DEFAULT_GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS,
    DEFAULT_GRPC_MAX_CONNECTION_AGE_SECONDS,
    DEFAULT_GRPC_MAX_CONNECTIONS,
    DEFAULT_GRPC_MAX_QUEUED_CALLS,
)
from verifier.v1 import verifier_pb2

OWN_SERVICE = "verifier.v1.Verifier"
ENVOY_SERVICE = "envoy.service.auth.v3.Authorization"
IDENTITY_HEADERS = (
    "x-authenticated-userid",
    "x-authenticated-scope",
    "x-authenticated-issuer",
    "x-authenticated-roles",
)
MAX_CERT_BYTES = 64 * 1024  # a PEM certificate chain larger than this is not one we thumbprint
# What a Check with an empty path did not send, as its refusal says it (`Undescribed`): each door's field.
OWN_UNTOLD = "no path (verifier.v1.CheckRequest.path)"
ENVOY_UNTOLD = "no path (attributes.request.http.path)"
# And an empty host when policies name hosts: judged on no host, the request met none of its host's policies.
OWN_NO_HOST = "no host (verifier.v1.CheckRequest.host), and the policies name hosts"
ENVOY_NO_HOST = "no host (attributes.request.http.host), and the policies name hosts"
# The header Envoy's door reads the request's description from (its scheme), which must come once (`DescribedTwice`).
FORWARDED_PROTO = "x-forwarded-proto"


def cert_thumbprint(url_encoded_pem: str) -> str:
    """RFC 8705 `x5t#S256` of the first certificate in Envoy's URL-encoded PEM (`source.certificate`)."""
    if not url_encoded_pem or len(url_encoded_pem) > MAX_CERT_BYTES:
        return ""
    pem = urllib.parse.unquote(url_encoded_pem)
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = pem.find(begin)
    stop = pem.find(end, start)
    if start < 0 or stop < 0:
        return ""
    try:
        der = base64.b64decode("".join(pem[start + len(begin) : stop].split()), validate=True)
    except ValueError:
        return ""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def _joined(lines: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header lines as one map: names lower-cased, a repeated name's values joined with ", " in the lines' order, as
    the forward-auth door joins repeats (RFC 9110 section 5.3), so two credentials fail the credential's syntax
    instead of one being picked. Joined once at the end, never onto the value so far: a 1 MiB message of 210,000
    lines of one name copied its growing value 210,000 times (~5 s of the event loop, every caller's checks)."""
    values: dict[str, list[str]] = {}
    for name, value in lines:
        values.setdefault(name.lower(), []).append(value)
    return {name: repeats[0] if len(repeats) == 1 else ", ".join(repeats) for name, repeats in values.items()}


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    """The map with lower-case names. Two spellings of one name (`Authorization` and `authorization`) are two lines
    of one field: joined (`_joined`) in the names' order (a map's own order is unspecified). Key by key: `items()`
    of a protobuf map goes through the Mapping mixin's Python iteration (2x slower)."""
    lowered = {name.lower(): headers[name] for name in headers}
    if len(lowered) != len(headers):
        lowered = _joined((name, headers[name]) for name in sorted(headers))
    return lowered


def attributes_from_own(request: verifier_pb2.CheckRequest, hosts_named: bool = False) -> RequestAttributes:
    """Our proto's request -> attributes; raises `Undescribed` for an empty path (judged as `/`, a public `/` let
    every path through: refused, as forward-auth refuses a check whose path nothing tells), and, with `hosts_named`
    (a policy matches on hosts), for an empty host (it met none of its host's policies, and fell to a laxer one)."""
    path = request.path
    if not path:
        raise Undescribed(OWN_UNTOLD)
    if hosts_named and not request.host:
        raise Undescribed(OWN_NO_HOST)
    scheme = request.scheme.lower() or "http"
    return RequestAttributes(
        method=request.method.upper() or "GET",
        scheme=scheme,
        host=normalize_authority(request.host, scheme),
        path=path,
        headers=_lower(request.headers),
        client_address=request.client_address,
        client_cert_thumbprint=request.client_cert_thumbprint,
    )


MAX_MEMO_REQUEST_BYTES = 8 * 1024  # a larger request is parsed on every call: bounds the memo's memory
MAX_MEMO_REQUESTS = 4096  # distinct requests remembered (x 8 KiB at most: 32 MiB); cleared when full


class RequestMemo:
    """A serialized request -> its attributes, bounded (cleared when full).

    Our own door keys it by the request's bytes; the Envoy door by the request without its per-request fields
    (`verifier.doors.envoy_request`). Either way the attributes are a pure function of the key (the
    certificate thumbprint is in it too), so equal keys give equal attributes; only the parse and the
    translation are skipped, never a check. Any change in the request (another token, path, header) is
    another key: a miss, translated as before.
    """

    def __init__(
        self,
        max_entries: int = MAX_MEMO_REQUESTS,
        max_bytes: int = MAX_MEMO_REQUEST_BYTES,
        *,
        hosts_named: bool = False,
    ) -> None:
        self._entries: dict[bytes, RequestAttributes] = {}
        self._max_entries, self._max_bytes = max_entries, max_bytes
        self._hosts_named = hosts_named  # `attributes_from_own`: an empty host is refused
        self.get = self._entries.get  # the remembered attributes of a key, or None (a C call on the hot path)

    def __len__(self) -> int:
        return len(self._entries)

    def attributes(self, data: bytes) -> RequestAttributes:
        """The attributes of a serialized `verifier.v1.CheckRequest`; raises DecodeError when it is not one,
        `Undescribed` when it names no path, or no host a policy needs (never remembered: such a request is translated,
        and refused, each time)."""
        attrs = self._entries.get(data)
        if attrs is None:
            request = verifier_pb2.CheckRequest.FromString(data)
            attrs = self.keep(data, attributes_from_own(request, self._hosts_named))
        return attrs

    def keep(self, key: bytes, attrs: RequestAttributes) -> RequestAttributes:
        """Remembers `attrs` as the translation of `key` (unless the key is too large); returns them."""
        if len(key) <= self._max_bytes:
            if len(self._entries) >= self._max_entries:
                self._entries.clear()
            self._entries[key] = attrs
        return attrs


def attributes_from_envoy(request: ea.CheckRequest, hosts_named: bool = False) -> RequestAttributes:
    """Envoy's `AttributeContext` -> attributes; raises `Undescribed` for an empty path, or an empty host with
    `hosts_named` (as `attributes_from_own`), and `DescribedTwice` for an `x-forwarded-proto` sent more than once."""
    http = request.attributes.request.http
    path = http.path
    if not path:
        raise Undescribed(ENVOY_UNTOLD)
    if hosts_named and not http.host:
        raise Undescribed(ENVOY_NO_HOST)
    # Envoy lower-cases the names; a caller that is not Envoy may not (`Authorization` beside `authorization`).
    headers = _lower(http.headers)
    if not headers and http.header_map.headers:
        # `encode_raw_headers: true` sends header_map instead (values as raw bytes; a repeated line apart). Never
        # both: `GrpcDoors.check_envoy` refuses a request with both (which one would Envoy have forwarded?).
        headers = _joined(
            (h.key, h.raw_value.decode("latin-1") if h.raw_value else h.value) for h in http.header_map.headers
        )
    for name in PER_REQUEST_HEADERS:  # cleared from the key in Envoy's spelling (`request_key`); gone in any
        headers.pop(name, None)
    source = request.attributes.source
    # Envoy's X-Forwarded-Proto (an edge Envoy, `use_remote_address`, sets it from the connection), as HTTP
    # mode reads it: over cleartext HTTP/2 `http.scheme` is the client's own `:scheme`, which can say https.
    forwarded = headers.get(FORWARDED_PROTO)
    if forwarded is not None and "," in forwarded:
        # Sent twice. Envoy joins a repeated x-forwarded-proto with "," into one entry in either form (an inline
        # header of its own; Envoy 1.40 sent `https,http` for two lines, in `header_map` too); two lines of a caller's
        # `header_map` are joined above with ", ", two spellings of the name by `_lower`. No scheme has a comma, and
        # which one the gateway meant is unknown: refused, as forward-auth refuses its family's X-Forwarded-Proto
        # twice (`https, http` judged as one scheme was neither). Checked on a translation only (a memo miss).
        raise DescribedTwice(FORWARDED_PROTO)
    scheme = (forwarded or http.scheme).lower() or "http"
    return RequestAttributes(
        method=http.method.upper() or "GET",
        scheme=scheme,
        host=normalize_authority(http.host, scheme),
        path=path,
        headers=headers,
        client_address=source.address.socket_address.address,
        # Envoy's own view of the TLS peer; a header could have come from the client.
        client_cert_thumbprint=cert_thumbprint(source.certificate),
    )


def own_response(decision: Decision) -> bytes:
    """Our proto's answer, serialized once per decision."""
    data = decision.memo.get("grpc_own")
    if data is None:
        message = verifier_pb2.CheckResponse(
            allowed=decision.allowed,
            http_status=decision.status,
            upstream_headers=[verifier_pb2.Header(name=k, value=v) for k, v in decision.upstream_headers],
            # to the client: a refusal's, or what an allow tells it (the rate-limit state)
            response_headers=[
                verifier_pb2.Header(name=k, value=v)
                for k, v in (decision.client_headers if decision.allowed else decision.response_headers)
            ],
            reason=decision.reason,
            subject=decision.subject,
            roles=list(decision.roles),
            body=decision.body.decode(),
            cache_max_age_seconds=decision.cache_max_age,
            answer_headers=[verifier_pb2.Header(name=k, value=v) for k, v in decision.answer_headers],
        )
        data = decision.memo["grpc_own"] = message.SerializeToString()
    return data


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _envoy_allow(decision: Decision, smuggled: Iterable[str]) -> ea.CheckResponse:
    set_names = {k for k, _ in decision.upstream_headers}
    return ea.CheckResponse(
        status=status_pb2.Status(code=GRPC_OK),
        ok_response=ea.OkHttpResponse(
            # Ours overwrite whatever the client sent under the same names. `answer_headers` (the Kong
            # consumer) are for a Kong plugin, never the upstream: not here.
            headers=[_header(k, v) for k, v in decision.upstream_headers],
            # A client must not smuggle an identity header we did not set this time.
            headers_to_remove=[h for h in IDENTITY_HEADERS if h not in set_names]
            + [h for h in smuggled if h not in IDENTITY_HEADERS],
            # to the client with the upstream's answer (the rate-limit state)
            response_headers_to_add=[_header(k, v) for k, v in decision.client_headers],
        ),
    )


def envoy_response(decision: Decision, request_headers: Mapping[str, str] | None = None) -> bytes:
    """Envoy's answer, serialized once per decision (per request when a client sent identity headers)."""
    if decision.allowed and request_headers:
        smuggled = smuggled_identity(decision, request_headers)
        if smuggled:
            return _envoy_allow(decision, smuggled).SerializeToString()  # type: ignore[no-any-return]
    data = decision.memo.get("grpc_envoy")
    if data is not None:
        return data
    if decision.allowed:
        message = _envoy_allow(decision, ())
    else:
        headers = [_header(k, v) for k, v in decision.response_headers]
        headers.append(_header("x-verifier-reason", decision.reason))
        if decision.body:
            headers.append(_header("content-type", "application/json"))
        headers.append(_header("cache-control", "no-store"))
        message = ea.CheckResponse(
            status=status_pb2.Status(code=grpc_code(decision)),
            denied_response=ea.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=decision.status),
                headers=headers,
                body=decision.body.decode(),
            ),
        )
    serialized: bytes = message.SerializeToString()
    decision.memo["grpc_envoy"] = serialized
    return serialized


ABORTED = Decision(allowed=False, status=503, reason="aborted")  # a span's outcome when the call was aborted
MAX_METADATA_VALUE_CHARS = 1024  # a trace header longer than this is not one (traceparent.py bounds it again)


def trace_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str | None, str | None]:
    """`traceparent` and `tracestate` from a call's metadata (first of each; binary values ignored)."""
    parent = state = None
    for key, value in metadata or ():
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE_CHARS:
            continue
        if key == TRACEPARENT and parent is None:
            parent = value
        elif key == TRACESTATE and state is None:
            state = value
    return parent, state


class _GenericOnly:
    """A server that takes generic handlers and drops the `add_registered_method_handlers` half of a generated
    `add_*_to_server`: with any registered method on a grpc.aio server, every call (ours included) cost ~47,000
    more instructions (callgrind, ~14% of a cached Check; docs/BENCHMARKS.md). The generic handler serves the
    same methods."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(handlers))

    def add_registered_method_handlers(self, _service: str, _handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        """Dropped on purpose (see the class)."""


def connection_cap(max_connections: int) -> int:
    """`max_connections`, at most half the process's open-file limit (the other doors, the issuers' fetches and
    Redis keep the other half): a cap past the limit would not keep a caller from taking every descriptor."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max_connections if soft == resource.RLIM_INFINITY else max(1, min(max_connections, soft // 2))


def server_options(
    max_streams: int,
    *,
    reuse_port: bool,
    max_queued: int = DEFAULT_GRPC_MAX_QUEUED_CALLS,
    max_age: float = DEFAULT_GRPC_MAX_CONNECTION_AGE_SECONDS,
    max_age_grace: float = DEFAULT_GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS,
    max_connections: int = DEFAULT_GRPC_MAX_CONNECTIONS,
    handshake_timeout: float = DEFAULT_GRPC_HANDSHAKE_TIMEOUT_SECONDS,
) -> list[tuple[str, int]]:
    """The doors' grpc.aio server options (see `GrpcDoors.start`); bench/baselines.py runs its no-op with them."""
    return [
        # Past it a new connection is closed as C core accepts it: the descriptors left are the process's own.
        ("grpc.max_allowed_incoming_connections", connection_cap(max_connections)),
        # A connection's life, then its calls' grace: the only bound on a call whose message never arrives whole
        # (grpc.aio never runs the handler, so the door's deadline never starts) and on a connection holding such
        # calls only. GOAWAY first: a gateway's pool opens the next connection and loses no call.
        ("grpc.max_connection_age_ms", round(max_age * 1000)),
        ("grpc.max_connection_age_grace_ms", round(max_age_grace * 1000)),
        # From the accept: the TLS handshake, then the client's HTTP/2 preface and SETTINGS (C core closes the
        # transport if they have not come by then). The age above starts with the transport, after the TLS
        # handshake: without this a stalled ClientHello held its place of `max_connections` for C core's 120 s.
        ("grpc.server_handshake_timeout_ms", round(handshake_timeout * 1000)),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_receive_message_length", 1 << 20),
        ("grpc.max_concurrent_streams", max_streams),
        # C core's bound on calls received and not yet taken by grpc.aio: past it, a new call is refused (no random
        # early refusal below it: a client inside the bound is never refused)
        ("grpc.server.max_pending_requests", max_queued),
        ("grpc.server.max_pending_requests_hard_limit", max_queued),
        ("grpc.http.overload_protection", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


class GrpcDoors:
    """Both Check services on one grpc.aio server."""

    def __init__(
        self,
        pipeline: Pipeline,
        metrics: Metrics,
        ready: Callable[[], bool],
        tracing: Tracing | None = None,
        answers: Callable[[], AnswerMemo] | None = None,
        *,
        hosts_named: bool = False,
    ) -> None:
        self.pipeline = pipeline
        self.tracing = tracing
        # Chosen once: with tracing off a call costs exactly what it did before tracing existed.
        self._decider = self._decide if tracing is None else self._decide_traced
        self.metrics = metrics
        self.ready = ready
        self.health = health.aio.HealthServicer()
        self.hosts_named = hosts_named  # a policy matches on hosts: a Check with an empty host is refused
        self._own_requests = RequestMemo(hosts_named=hosts_named)
        # Envoy's: a quarter of our own door's entries (1,024 keys of at most 8 KiB, their attributes as large
        # again: ~16 MiB of attacker-chosen requests at most); a repeat is answered by the answer memo first.
        self._envoy_requests = RequestMemo(max_entries=MAX_MEMO_REQUESTS // 4)  # translated by `check_envoy`
        # Remembered answers, one memo per door (their keys are different messages; None: every call is
        # decided). Not with tracing: each call has its span.
        remember = answers if tracing is None else None
        self._own_answers = remember() if remember is not None else None
        self._envoy_answers = remember() if remember is not None else None
        self._server: grpc.aio.Server | None = None
        # (door, what was missing) -> the refusal of a Check with no path, or no host a policy needs (built once)
        self._undescribed: dict[tuple[str, str], Decision] = {}

    async def _decide_traced(self, attrs: RequestAttributes, door: str, context: Any) -> tuple[Decision, float]:
        """A decision inside its span. The parent: the call's own `traceparent` metadata (the gateway's
        ext_authz client span, Envoy with tracing on), else the one in the original request's headers."""
        assert self.tracing is not None
        parent, state = trace_context(context.invocation_metadata() if context is not None else None)
        if parent is None:
            parent, state = attrs.headers.get(TRACEPARENT), attrs.headers.get(TRACESTATE)
        span = self.tracing.decision(door, parent, state, self.pipeline.known(attrs))
        decision: Decision | None = None
        try:
            with span.current():
                decision, _ = await self._decide(attrs, door, context)
        finally:
            # An abort (deadline, shedding) ends the call with a gRPC status instead of an answer.
            span.end(decision if decision is not None else ABORTED)
        return decision, 0.0

    async def _decide(self, attrs: RequestAttributes, door: str, context: Any) -> tuple[Decision, float]:
        """The decision, and until when its answer may be remembered (0.0: not; `Pipeline.decide_cached_stable`)."""
        started = time.perf_counter()
        decision, until = self.pipeline.decide_cached_stable(attrs, door)
        if decision is None:
            # The caller's deadline bounds our own work: a late answer is worth nothing to Envoy.
            remaining = context.time_remaining() if context is not None else None
            try:
                if remaining is None:
                    decision = await self.pipeline.decide_after_miss(attrs, door)
                else:
                    async with asyncio.timeout(max(remaining, 0.0)):
                        decision = await self.pipeline.decide_after_miss(attrs, door)
            except TimeoutError:
                self.metrics.decision(door, "error", "deadline_exceeded", time.perf_counter() - started)
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                raise  # abort raises; this is never reached
        self.metrics.decision(door, decision.outcome, decision.reason, time.perf_counter() - started)
        if context is not None and not decision.allowed and sheds(decision):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded: retry later")
        return decision, until

    def _recall(self, memo: AnswerMemo, key: bytes, door: str) -> bytes | None:
        """The remembered answer for `key`, counted as the pipeline would have counted it; None: not remembered."""
        started = time.perf_counter()
        hit = memo.get(key, "")  # no peer: the client address is in the request (its key)
        if hit is None:
            return None
        metrics = self.metrics
        metrics.cache_lookup("positive", "hit")
        metrics.decision(door, hit.outcome, hit.reason, time.perf_counter() - started)
        return hit.answer

    def undescribed(self, undescribed: Undescribed, door: str) -> Decision:
        """The refusal of a Check whose path is empty, or whose host is when policies name hosts (400 `invalid_request`,
        `Pipeline.undescribed`), counted, never a check: judged as `/` it was `GET /` whatever the request, and a public
        `/` passed them all. An answer, not a failed call, as forward-auth answers it: Envoy relays the 400 whatever its
        `failure_mode_allow`. Off the hot path: a translation (a memo miss) raises it, and a refused request is never
        remembered."""
        key = (door, undescribed.missing)
        decision = self._undescribed.get(key)
        if decision is None:
            decision = self._undescribed[key] = self.pipeline.undescribed(undescribed.missing)
        self.metrics.decision(door, decision.outcome, decision.reason, 0.0)
        return decision

    def described_twice(self, door: str) -> Decision:
        """The refusal of a check in which a header the door reads once came more than once (`DescribedTwice`; 400
        `invalid_request`, forward-auth's `described_twice`), counted, never a check. Off the hot path, as
        `undescribed`: a translation raises it, and a refused request is never remembered."""
        decision = self.pipeline.described_twice
        self.metrics.decision(door, decision.outcome, decision.reason, 0.0)
        return decision

    @staticmethod
    async def _invalid(context: Any, what: str) -> None:
        """Bytes that are not the door's request: INVALID_ARGUMENT (raises)."""
        if context is None:
            raise DecodeError(f"not a {what}")
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a {what}")

    async def check_own(self, request: bytes, context: Any) -> bytes:
        """verifier.v1.Verifier/Check, its request still serialized: the Kong plugin sends the same bytes for the
        same request, so they key both the remembered answer and the translation (`RequestMemo`)."""
        memo = self._own_answers
        if memo is not None:
            remembered = self._recall(memo, request, "grpc")
            if remembered is not None:
                return remembered
        try:
            attrs = self._own_requests.attributes(request)
        except DecodeError:
            await self._invalid(context, "verifier.v1.CheckRequest")
            raise  # abort raises; this is never reached
        except Undescribed as undescribed:
            return own_response(self.undescribed(undescribed, "grpc"))
        decision, until = await self._decider(attrs, "grpc", context)
        answer = own_response(decision)
        if until and memo is not None:
            memo.store(request, "", answer, until, decision.outcome, decision.reason)
        return answer

    async def check_envoy(self, request: bytes, context: Any) -> bytes:
        """envoy.service.auth.v3.Authorization/Check, its request still serialized: keyed without the fields Envoy
        fills anew for every request (`request_key`, which never builds Envoy's whole message); the key finds a
        remembered answer, else the attributes, which are translated from the key itself, parsed as Envoy's message
        (`RequestMemo`): requests that share a key share everything that is judged."""
        try:
            key = request_key(request)
        except DecodeError:
            await self._invalid(context, "envoy.service.auth.v3.CheckRequest")
            raise  # abort raises; this is never reached
        memo = self._envoy_answers
        if memo is not None:
            remembered = self._recall(memo, key, "ext_authz")
            if remembered is not None:
                return remembered
        attrs = self._envoy_requests.get(key)
        if attrs is None:
            # Only a request that passed here is ever remembered, so what is refused below is refused every time.
            try:
                message = ea.CheckRequest.FromString(key)
            except DecodeError:  # a field of Envoy's not what its schema says (a path that is not UTF-8)
                await self._invalid(context, "envoy.service.auth.v3.CheckRequest")
                raise  # abort raises; this is never reached
            if not message.attributes.request.HasField("http"):
                # No HTTP request described (Envoy's network ext_authz filter, one check per TCP connection):
                # nothing to judge. Translated, it was `GET /` on no host, which a public route allowed.
                await self._invalid(context, "envoy.service.auth.v3.CheckRequest describing an HTTP request")
                raise DecodeError("no attributes.request.http")  # abort raises; this is never reached
            if message.attributes.request.http.HasField("header_map") and message.attributes.request.http.headers:
                # Envoy sends one or the other (`encode_raw_headers`): both, disagreeing, and the door would judge
                # one while the caller meant (or forwards) the other. A `header_map` beside `headers` is refused even
                # when empty (Envoy never sends one with the other), and beside a `headers` holding only x-request-id
                # (the keys keep that entry of a request with both forms: `envoy_request._remove`).
                await self._invalid(context, "envoy.service.auth.v3.CheckRequest with its headers in one form")
                raise DecodeError("both headers and header_map")  # abort raises; this is never reached
            try:
                attrs = self._envoy_requests.keep(key, attributes_from_envoy(message, self.hosts_named))
            except Undescribed as undescribed:
                return envoy_response(self.undescribed(undescribed, "ext_authz"))
            except DescribedTwice:
                return envoy_response(self.described_twice("ext_authz"))
        decision, until = await self._decider(attrs, "ext_authz", context)
        answer = envoy_response(decision, attrs.headers)
        if until and memo is not None:
            memo.store(key, "", answer, until, decision.outcome, decision.reason)
        return answer

    def own_handler(self) -> grpc.RpcMethodHandler:
        """`verifier.v1.Verifier/Check`: bytes in and out (without a serializer grpc passes bytes through
        without a call); `check_own` parses the request (memoized), the answer is pre-serialized."""
        return grpc.unary_unary_rpc_method_handler(self.check_own)

    def envoy_handler(self) -> grpc.RpcMethodHandler:
        """`envoy.service.auth.v3.Authorization/Check`: bytes in and out, as `own_handler`."""
        return grpc.unary_unary_rpc_method_handler(self.check_envoy)

    async def start(
        self,
        address: str,
        *,
        reuse_port: bool = False,
        tls: tuple[bytes, bytes, bytes | None] | None = None,
        max_streams: int = DEFAULT_GRPC_MAX_CONCURRENT_STREAMS,
        max_queued: int = DEFAULT_GRPC_MAX_QUEUED_CALLS,
        max_age: float = DEFAULT_GRPC_MAX_CONNECTION_AGE_SECONDS,
        max_age_grace: float = DEFAULT_GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS,
        max_connections: int = DEFAULT_GRPC_MAX_CONNECTIONS,
        handshake_timeout: float = DEFAULT_GRPC_HANDSHAKE_TIMEOUT_SECONDS,
    ) -> int:
        """Builds the server and listens; returns the bound port.

        `max_streams` (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS) is the overload bound: grpc.aio queues every
        accepted call without limit and serves them in order, so under a flood each call waits behind the
        whole queue and expires before its turn (goodput collapses while memory grows). A small per-connection
        limit keeps the excess at the client, refused by the transport before any Python work. Its
        `maximum_concurrent_rpcs` would refuse in Python, at the cost of serving: measured, it collapses too.

        `max_queued` bounds, over all connections, the calls gRPC's C core has received and grpc.aio has not yet
        taken (it takes one per turn of the loop, oldest first): past it a new call is refused in C, before any
        Python work (the caller sees CANCELLED). The stream bound does not bound that queue: a call whose deadline
        passes while it waits frees its stream (the client opens the next) but keeps its place, so over many
        connections the queue grew faster than the door took calls and each call taken had (nearly) run out of
        time (128 connections x 4 streams at 100 ms: 7% of capacity answered in time, the CPU spent on calls that
        expired; docs/BENCHMARKS.md, "Overload over many gRPC connections").

        gRPC's "overload protection" is off: with it, a stream counts against the bound until Python drops its
        call, after the client has read the answer and reused the slot, so a client that keeps to the bound had
        10-30% of its calls refused (grpc-python's callers got UNAVAILABLE "RST_STREAM with error code 7": its
        transparent retry, at most once, did not hide them). Without it the bound counts the streams the
        transport holds open, which is what the client counts.

        `max_age` bounds a connection's life (GOAWAY, then `max_age_grace` for its calls in flight, then closed): a
        call whose message never arrives whole never reaches the door, so nothing else ends it. `max_connections`
        bounds the connections open at once (`connection_cap`): past it a new one is closed as it is accepted.
        `handshake_timeout` bounds a new connection's TLS handshake, preface and SETTINGS, which come before any age.
        """
        options = server_options(
            max_streams,
            reuse_port=reuse_port,
            max_queued=max_queued,
            max_age=max_age,
            max_age_grace=max_age_grace,
            max_connections=max_connections,
            handshake_timeout=handshake_timeout,
        )
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(service, {"Check": handler})
                for service, handler in ((OWN_SERVICE, self.own_handler()), (ENVOY_SERVICE, self.envoy_handler()))
            ]
        )
        # Generic handlers only (see `_GenericOnly`): health checks and reflection as before.
        generic_only = _GenericOnly(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, generic_only)
        names = (OWN_SERVICE, ENVOY_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer((*names, reflection.SERVICE_NAME)), generic_only
        )
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            cert, key, client_ca = tls
            credentials = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
            )
            port = server.add_secure_port(address, credentials)
        await self.set_serving(False)
        await server.start()
        self._server = server
        return int(port)

    async def set_serving(self, serving: bool) -> None:
        """Reports SERVING or NOT_SERVING (overall and per service), as the composition root tells: once the keys
        are in, and for as long as the replica can decide (`App.ready`)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", OWN_SERVICE, ENVOY_SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Stops accepting and lets in-flight calls finish within `grace` seconds."""
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace)
