"""verifier/doors/_http_head.c: the forward-auth door's parse of one whole bodyless request, against llhttp.

The C parse takes a strict subset of what llhttp takes and says None for the rest (llhttp then parses it, as
before). Wherever it answers, its answer must be what llhttp and the door's callbacks make of the same bytes: one
keep-alive request, no body, no upgrade, no field twice, the same method, target and fields. Checked on the requests
the shipped gateways send, on a table of near misses, on generated requests and on mutated ones (hypothesis), and
through a running door with the C parse on and off.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httptools
import pytest
from doorkit import http_exchange, running_verifier
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verifier.doors import forward_auth
from verifier.doors.forward_auth import MAX_HEADERS, WHOLE_HEAD


class _Recorder:
    """llhttp's callbacks, recorded as the door's own read them."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.current: dict[str, Any] = {}

    def on_message_begin(self) -> None:
        self.current = {"url": b"", "fields": [], "body": b""}

    def on_url(self, url: bytes) -> None:
        self.current["url"] += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current["fields"].append((name, value))

    def on_body(self, body: bytes) -> None:
        self.current["body"] += body

    def on_message_complete(self) -> None:
        parser = self.parser
        self.current["method"] = parser.get_method()
        self.current["keep_alive"] = parser.should_keep_alive()
        self.current["upgrade"] = parser.should_upgrade()
        self.messages.append(self.current)

    parser: Any = None


def llhttp(data: bytes) -> tuple[bytes, bytes, dict[str, str]] | str:
    """What llhttp and the door's callbacks make of `data` when it is one whole bodyless keep-alive request, no
    upgrade and no field twice: (method, target, fields as `on_headers_complete` builds them); else why not."""
    recorder = _Recorder()
    parser = recorder.parser = httptools.HttpRequestParser(recorder)
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        return "upgrade"
    except httptools.HttpParserError as exc:
        return f"error: {exc}"
    if len(recorder.messages) != 1:
        return f"{len(recorder.messages)} messages"
    message = recorder.messages[0]
    if recorder.current is not message:
        return "a second message begun"
    if not message["keep_alive"] or message["upgrade"] or message["body"]:
        return "closes, upgrades or has a body"
    fields = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in message["fields"]}
    if len(fields) != len(message["fields"]):
        return "a field twice"
    return message["method"], message["url"], fields


needs_c = pytest.mark.skipif(WHOLE_HEAD is None, reason="not built here (test_the_c_parse_is_built_here fails)")


def test_the_c_parse_is_built_here() -> None:
    """CI builds it (`pip install -e .`, setup.py): without it every request goes to llhttp, slower (#24 goal 2)."""
    assert WHOLE_HEAD is not None


def _agrees(data: bytes) -> tuple[bytes, bytes, dict[str, str]] | None:
    """The C parse of `data`, checked against llhttp's wherever it answers."""
    assert WHOLE_HEAD is not None
    taken = WHOLE_HEAD(data, MAX_HEADERS)
    if taken is not None:
        assert taken == llhttp(data), data
    return taken


# What the shipped gateways send (deploy/: nginx auth_request, the Kong Lua plugin, Envoy's HTTP ext_authz).
GATEWAY_REQUESTS = [
    b"GET /v1/forward-auth HTTP/1.1\r\nHost: verifier\r\nX-Original-URI: /api/orders?id=1\r\n"
    b"X-Original-Method: GET\r\nX-Original-Host: api.example.test\r\nX-Original-Proto: https\r\n"
    b"Authorization: Bearer eyJhbGciOiJFUzI1NiJ9.e30.c2ln\r\nConnection: keep-alive\r\n\r\n",
    b"GET /v1/forward-auth HTTP/1.1\r\nHost: 127.0.0.1:8081\r\nUser-Agent: lua-resty-http/0.17.1\r\n"
    b"X-Forwarded-Method: POST\r\nX-Forwarded-Uri: /orders\r\nX-Forwarded-Host: api\r\nX-Forwarded-Port: 8443\r\n"
    b"X-Forwarded-Proto: https\r\nX-Forwarded-For: 192.0.2.1, 10.0.0.1\r\nAuthorization: Bearer abc\r\n\r\n",
    b"POST /v1/forward-auth/api/orders?x=%2F HTTP/1.1\r\nhost: api.example.test\r\n\r\n",
    b"DELETE /v1/forward-auth/a HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\nx-envoy-expected-rq-timeout-ms: 200\r\n"
    b"authorization: DPoP x\r\ndpop: eyJ.e30.sig\r\n\r\n",
    b"HEAD /healthz HTTP/1.1\r\n\r\n",
    b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Empty:\r\nX-Spaces:   a b\r\nX-Obs: caf\xc3\xa9 \xff\r\n\r\n",
]


@needs_c
@pytest.mark.parametrize("data", GATEWAY_REQUESTS)
def test_what_the_shipped_gateways_send_is_parsed_in_c_as_llhttp_parses_it(data: bytes) -> None:
    taken = _agrees(data)
    assert taken is not None
    assert taken[0] == data.split(b" ", 1)[0]


NEAR_MISSES = {
    "HTTP/1.0": b"GET / HTTP/1.0\r\n\r\n",
    "HTTP/1.0 keep-alive": b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    "connection close": b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    "connection two tokens": b"GET / HTTP/1.1\r\nConnection: keep-alive, te\r\n\r\n",
    # llhttp reads Proxy-Connection as Connection: "close" there closes the connection (the C took it as keep-alive)
    "proxy-connection close": b"GET / HTTP/1.1\r\nProxy-Connection: close\r\n\r\n",
    "proxy-connection two tokens": b"GET / HTTP/1.1\r\nproxy-connection: keep-alive, close\r\n\r\n",
    "upgrade": b"GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
    "upgrade alone": b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
    "chunked": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunked no body yet": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    "content-length body": b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nab",
    "content-length 00": b"GET / HTTP/1.1\r\nContent-Length: 00\r\n\r\n",
    "content-length twice": b"GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
    "repeated field": b"GET / HTTP/1.1\r\nAuthorization: Bearer a\r\nauthorization: Bearer b\r\n\r\n",
    "trailing space": b"GET / HTTP/1.1\r\nX-Forwarded-Uri: /a \r\n\r\n",
    "trailing tab": b"GET / HTTP/1.1\r\nX-Forwarded-Uri: /a\t\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n",
    "bare LF": b"GET / HTTP/1.1\nHost: h\n\n",
    "bare LF in head": b"GET / HTTP/1.1\r\nHost: h\n\r\n",
    "bare CR in value": b"GET / HTTP/1.1\r\nX-A: a\rb\r\n\r\n",
    "NUL in value": b"GET / HTTP/1.1\r\nX-A: a\x00b\r\n\r\n",
    "DEL in value": b"GET / HTTP/1.1\r\nX-A: a\x7fb\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nX-A : a\r\n\r\n",
    "empty name": b"GET / HTTP/1.1\r\n: a\r\n\r\n",
    "pseudo-header name": b"GET / HTTP/1.1\r\nhost: h\r\n:path-like: no\r\n\r\n",
    "two requests": b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
    "a request and a half": b"GET /a HTTP/1.1\r\n\r\nGET /b HT",
    "half a request": b"GET /a HTTP/1.1\r\nHost: h\r\n",
    "bytes after": b"GET /a HTTP/1.1\r\n\r\n\r\n",
    "lower-case method": b"get / HTTP/1.1\r\n\r\n",
    "method llhttp knows, not here": b"PROPFIND / HTTP/1.1\r\n\r\n",
    "CONNECT": b"CONNECT h:443 HTTP/1.1\r\n\r\n",
    "two spaces": b"GET  / HTTP/1.1\r\n\r\n",
    "tab separator": b"GET\t/ HTTP/1.1\r\n\r\n",
    "DEL in target": b"GET /a\x7f HTTP/1.1\r\n\r\n",
    "high byte in target": b"GET /a\x80 HTTP/1.1\r\n\r\n",
    "no target": b"GET  HTTP/1.1\r\n\r\n",
    "asterisk-form": b"OPTIONS * HTTP/1.1\r\n\r\n",
    "absolute-form": b"GET http://h/a HTTP/1.1\r\n\r\n",
    "target not starting with /": b"GET !a HTTP/1.1\r\n\r\n",
    "HTTP/2.0": b"GET / HTTP/2.0\r\n\r\n",
    "lower-case version": b"GET / http/1.1\r\n\r\n",
    "leading CRLF": b"\r\nGET / HTTP/1.1\r\n\r\n",
    "too many fields": b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n",
}


@needs_c
@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_what_is_outside_the_subset_is_left_to_llhttp(name: str) -> None:
    assert _agrees(NEAR_MISSES[name]) is None


@needs_c
def test_the_field_bound_is_the_doors() -> None:
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS))
    taken = _agrees(b"GET / HTTP/1.1\r\n" + fields + b"\r\n")
    assert taken is not None and len(taken[2]) == MAX_HEADERS


def test_a_negative_field_bound_is_refused_not_taken_as_none() -> None:
    """`max_headers` below 0 bounds nothing: a request without fields was answered under it. The door passes
    MAX_HEADERS; any caller passing less than 0 gets a ValueError."""
    if WHOLE_HEAD is None:
        pytest.skip("the C parse is not built here (test_the_c_parse_is_built_here says why)")
    with pytest.raises(ValueError, match="max_headers >= 0"):
        WHOLE_HEAD(b"GET / HTTP/1.1\r\n\r\n", -1)
    assert WHOLE_HEAD(b"GET / HTTP/1.1\r\n\r\n", 0) == (b"GET", b"/", {})


_METHODS = st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"PROPFIND", b"get"])
_SEPARATORS = st.sampled_from([b" ", b" ", b" ", b"  ", b"\t"])
_TARGET_BYTES = st.binary(min_size=0, max_size=24).map(lambda b: bytes(c % 0x80 + (c >= 0xF0) * 0x80 for c in b))
_TARGETS = st.one_of(
    st.sampled_from([b"/v1/forward-auth", b"/healthz", b"*", b"/a?b=c#d", b"http://h/x"]), _TARGET_BYTES
)
_VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1"])
_EOLS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])
_NAMES = st.one_of(
    st.sampled_from(
        [
            b"Host",
            b"Authorization",
            b"authorization",
            b"X-Forwarded-Uri",
            b"Connection",
            b"Proxy-Connection",
            b"Content-Length",
            b"Transfer-Encoding",
            b"Upgrade",
            b"X-Original-URI",
            b"DPoP",
            b"x-a",
            b"X-A",
            b"!#$%&'*+-.^_`|~09",
        ]
    ),
    st.binary(min_size=0, max_size=6),
)
_VALUES = st.one_of(
    st.sampled_from([b"keep-alive", b"Keep-Alive", b"close", b"0", b"00", b"1", b"chunked", b"Bearer x", b""]),
    st.binary(min_size=0, max_size=12),
)
_FIELDS = st.lists(st.tuples(_NAMES, st.sampled_from([b":", b": ", b":  ", b":\t", b" :"]), _VALUES, _EOLS), max_size=8)


@st.composite
def _requests(draw: Any) -> bytes:
    line = draw(_METHODS) + draw(_SEPARATORS) + draw(_TARGETS) + draw(_SEPARATORS) + draw(_VERSIONS) + draw(_EOLS)
    fields = b"".join(name + colon + value + eol for name, colon, value, eol in draw(_FIELDS))
    return line + fields + draw(_EOLS) + draw(st.sampled_from([b"", b"", b"", b"ab", b"GET / HTTP/1.1\r\n\r\n"]))


@needs_c
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests())
def test_generated_requests_get_llhttps_parse_or_none(data: bytes) -> None:
    _agrees(data)


@needs_c
@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(GATEWAY_REQUESTS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3))
def test_mutated_gateway_requests_get_llhttps_parse_or_none(data: bytes, changes: list[tuple[int, int]]) -> None:
    mutated = bytearray(data)
    for at, byte in changes:
        mutated[at % len(mutated)] = byte
    _agrees(bytes(mutated))


@needs_c
@settings(max_examples=500, deadline=None)
@given(st.sampled_from(GATEWAY_REQUESTS), st.integers(0, 10_000))
def test_cut_gateway_requests_are_left_to_llhttp(data: bytes, at: int) -> None:
    """A request cut anywhere (one read of a longer request) is not a whole one."""
    assert _agrees(data[: at % len(data)]) is None


@needs_c
async def test_a_running_door_answers_the_same_with_and_without_the_c_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a running verifier: each request on its own connection, answered with the C parse and again with
    llhttp alone, byte for byte the same answer; and the C parse was the one used for the whole requests."""
    taken: list[bytes] = []

    def counting(data: bytes, max_headers: int) -> Any:
        assert WHOLE_HEAD is not None
        result = WHOLE_HEAD(data, max_headers)
        if result is not None:
            taken.append(data)
        return result

    async with running_verifier() as (app, idp):
        token = idp.mint(sub="alice", scope="read")
        now = int(time.time())
        expired = idp.mint(sub="bob", claims={"iat": now - 1200, "exp": now - 600})
        requests = [
            b"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer %s\r\nX-Forwarded-Uri: /a\r\n\r\n"
            % token.encode(),
            b"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer %s\r\nX-Forwarded-Uri: /a\r\n"
            b"X-Authenticated-Acr: mallory\r\n\r\n" % token.encode(),
            b"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer %s\r\nX-Forwarded-Uri: /a\r\n\r\n"
            % expired.encode(),
            b"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer %s\r\nX-Forwarded-Uri: /a\r\n"
            b"X-Forwarded-Uri: /b\r\n\r\n" % token.encode(),
            b"HEAD /v1/forward-auth HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer %s\r\nX-Forwarded-Uri: /a\r\n\r\n"
            % token.encode(),
            b"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\n\r\n",
            b"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nConnection: close\r\nX-Forwarded-Uri: /a\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: v\r\n\r\n",
            b"GET /nowhere HTTP/1.1\r\nHost: v\r\n\r\n",
        ]
        answers = {}
        for c_parse in (True, False):
            monkeypatch.setattr(forward_auth, "WHOLE_HEAD", counting if c_parse else None)
            answers[c_parse] = [
                await http_exchange(app.ports.http, request, read_until_close=b"close" in request)
                for request in requests
            ]
            await asyncio.sleep(0)
    assert answers[True] == answers[False]
    assert [a.split(b"\r\n", 1)[0] for a in answers[True]][:3] == [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 401 Unauthorized",
    ]
    assert b"x-envoy-auth-headers-to-remove: x-authenticated-acr" in answers[True][1]
    assert len(taken) == len(requests) - 2  # all but the field sent twice and the one that closes
