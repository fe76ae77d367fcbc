"""The HTTP forward-auth door over real sockets, against a real (in-process) issuer."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from doorkit import door_settings, http_exchange, running_verifier
from prometheus_client import CollectorRegistry
from support import trickled

from verifier.authenticators import Seen
from verifier.clock import SystemClock
from verifier.config.webauthn import WebAuthnConfig
from verifier.doors.forward_auth import (
    FORWARDED_FAMILIES,
    X_FORWARDED,
    ForwardAuthDoor,
    Undescribed,
    _Connection,
    attributes_from_http,
)
from verifier.errors import MissingToken, ProviderUnavailable, VerifierError
from verifier.observe.metrics import Metrics
from verifier.pipeline import Pipeline
from verifier.principal import Principal
from verifier.settings import (
    FORWARDED_HEADER_FAMILIES,
    PolicySettings,
    Requirements,
    RouteMatch,
)
from verifier.tokens.cache import ExpiringCache

X_ORIGINAL = FORWARDED_FAMILIES["x-original"]


def _request(token: str | None, extra: str = "", target: str = "/v1/forward-auth/", method: str = "GET") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"{method} {target} HTTP/1.1\r\nHost: verifier\r\n{auth}{extra}\r\n".encode()


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _header(answer: bytes, name: str) -> str | None:
    head = answer.split(b"\r\n\r\n", 1)[0].decode()
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.lower() == name.lower():
            return value.strip()
    return None


async def test_allows_a_valid_token_with_identity_headers_and_no_store() -> None:
    async with running_verifier() as (app, idp):
        token = idp.mint(sub="alice", scope="read write")
        answer = await http_exchange(app.ports.http, _request(token, "X-Forwarded-Uri: /things?a=1\r\n"))
        assert _status(answer) == 200
        assert _header(answer, "x-authenticated-userid") == "alice"
        assert _header(answer, "x-authenticated-scope") == "read write"
        assert _header(answer, "x-authenticated-issuer") == idp.issuer
        assert _header(answer, "x-verifier-reason") == "ok"


@pytest.mark.parametrize("alg", ["ES256", "RS256", "EdDSA"])
async def test_each_algorithm_verifies(alg: str) -> None:
    async with running_verifier() as (app, idp):
        answer = await http_exchange(app.ports.http, _request(idp.mint(alg=alg)))
        assert _status(answer) == 200


async def test_missing_token_gets_a_bare_bearer_challenge() -> None:
    async with running_verifier() as (app, _):
        answer = await http_exchange(app.ports.http, _request(None))
        assert _status(answer) == 401
        assert _header(answer, "www-authenticate") == 'Bearer realm="verifier"'
        assert _header(answer, "cache-control") == "no-store"


async def test_expired_token_is_invalid_token_with_a_description() -> None:
    async with running_verifier() as (app, idp):
        token = idp.mint(claims={"exp": 1_000_000_000})
        answer = await http_exchange(app.ports.http, _request(token))
        assert _status(answer) == 401
        assert 'error="invalid_token"' in (_header(answer, "www-authenticate") or "")
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["error"] == "invalid_token"
        assert _header(answer, "x-verifier-reason") == "token_expired"


async def test_wrong_audience_is_forbidden() -> None:
    async with running_verifier() as (app, idp):
        answer = await http_exchange(app.ports.http, _request(idp.mint(aud="https://other.example.test")))
        assert _status(answer) == 403
        assert 'error="insufficient_scope"' in (_header(answer, "www-authenticate") or "")


async def test_tampered_signature_is_refused_and_then_served_from_the_negative_cache() -> None:
    async with running_verifier() as (app, idp):
        token = idp.mint()
        head, payload, sig = token.split(".")
        forged = f"{head}.{payload}.{sig[:-4]}{'AAAA' if not sig.endswith('AAAA') else 'BBBB'}"
        for _ in range(3):
            answer = await http_exchange(app.ports.http, _request(forged))
            assert _status(answer) == 401
            assert _header(answer, "x-verifier-reason") == "signature_invalid"
        labels = {"cache": "negative", "result": "hit"}
        assert app.metrics.registry.get_sample_value("verifier_token_cache_total", labels) == 2


async def test_keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    async with running_verifier() as (app, idp):
        good = idp.mint(sub="p1")
        raw = _request(good) + _request(None) + _request(idp.mint(sub="p2")) + _request(good)
        reader, writer = await asyncio.open_connection("127.0.0.1", app.ports.http)
        writer.write(raw)
        statuses, subjects = [], []
        for _ in range(4):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(_header(head, "content-length") or 0)
            if length:
                await reader.readexactly(length)
            statuses.append(_status(head))
            subjects.append(_header(head, "x-authenticated-userid"))
        writer.close()
        assert statuses == [200, 401, 200, 200]
        assert subjects == ["p1", None, "p2", "p1"]


async def test_http_1_0_without_keep_alive_is_closed_after_the_answer() -> None:
    async with running_verifier() as (app, _):
        answer = await http_exchange(app.ports.http, b"GET /v1/forward-auth/ HTTP/1.0\r\n\r\n", read_until_close=True)
        assert _status(answer) == 401
        assert b"connection: close" in answer


async def test_oversized_headers_get_431_and_garbage_gets_400() -> None:
    async with running_verifier() as (app, _):
        big = _request("a" * 40_000)
        assert _status(await http_exchange(app.ports.http, big, read_until_close=True)) == 431
        assert _status(await http_exchange(app.ports.http, b"\x00\x01garbage\r\n\r\n", read_until_close=True)) == 400


@pytest.mark.parametrize(
    "opening",
    [
        b"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nX-Long: ",  # a value
        b"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nX-",  # a name
        b"POST /v1/forward-auth HTTP/1.1\r\nHost: v\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-Long: ",  # a trailer
    ],
    ids=["value", "name", "trailer"],
)
async def test_a_header_field_that_never_ends_gets_431_within_the_header_limit(opening: bytes) -> None:
    # httptools holds a field until its line ends, so the 32 KiB header limit (checked per field) never saw one
    # that did not: a single X-Long value of 64 MiB, sent in pieces within the header timeout, was buffered whole,
    # copied again for every piece (quadratic: the loop stalled half a second at a time) and never refused.
    async with running_verifier() as (app, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", app.ports.http)
        try:
            writer.write(opening)
            await writer.drain()
            await asyncio.sleep(0.05)  # its own read: the rest only continues the field
            with contextlib.suppress(ConnectionError):
                for _ in range(256):  # 4 MiB, unless refused first
                    writer.write(b"a" * 16384)
                    await writer.drain()
                    if reader.at_eof() or len(reader._buffer) > 0:  # type: ignore[attr-defined]
                        break
            answer = await asyncio.wait_for(reader.read(), 5)
            assert _status(answer) == 431, answer
            assert app.forward_auth.connections == set() or all(c._closing for c in app.forward_auth.connections)
        finally:
            writer.close()
        assert _status(await http_exchange(app.ports.http, _request(None))) == 401  # the door still serves


async def test_a_long_header_within_the_limit_sent_in_small_pieces_is_answered() -> None:
    # The bound above counts only reads in which no field ended: a 30 KiB cookie trickled 512 bytes at a time is
    # a request like any other.
    async with running_verifier() as (app, idp):
        raw = _request(idp.mint(sub="slow"), "Cookie: " + "c" * 30_000 + "\r\n")
        head = await trickled(app.ports.http, raw, 512, 0.001)
        assert _status(head) == 200, head
        assert _header(head, "x-authenticated-userid") == "slow"


async def test_two_authorization_headers_are_a_bad_request() -> None:
    async with running_verifier() as (app, idp):
        token = idp.mint()
        answer = await http_exchange(app.ports.http, _request(token, f"Authorization: Bearer {token}\r\n"))
        assert _status(answer) == 400
        assert _header(answer, "x-verifier-reason") == "invalid_request"


async def test_health_reports_serving_and_unknown_paths_404() -> None:
    async with running_verifier() as (app, _):
        assert _status(await http_exchange(app.ports.http, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")) == 200
        assert _status(await http_exchange(app.ports.http, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")) == 404


@pytest.mark.parametrize(
    "target",
    [
        "/v1/forward-auth/../../.well-known/oauth-protected-resource",
        "/v1/forward-auth/%2e%2E/%2E%2e/.well-known/oauth-protected-resource",
        "/v1/forward-auth/..",
        "/v1/forward-auth//..//..//x",
        "/v1/forward-auth/./../x?y=/v1/forward-auth/",
        # nginx ends the path at `#` (a fragment: its location matched `/.well-known/...`); read on past it, the
        # dot segments came back into the door
        "/v1/forward-auth/../../.well-known/oauth-protected-resource#/../../v1/forward-auth/x",
        "/v1/forward-auth/%2e%2e/%2e%2e/.well-known/oauth-protected-resource#/%2e%2e/%2e%2e/v1/forward-auth",
        "/v1/forward-auth/x/../../../.well-known/oauth-protected-resource#/../../../v1/forward-auth/x/y?z",
    ],
)
async def test_a_target_whose_dot_segments_leave_the_door_is_not_a_check(target: str) -> None:
    """The attacker's view: a gateway that matched its location on the normalized target (nginx's
    `/.well-known/oauth-protected-resource`, proxied without a URI) passes the raw one on. A target that
    starts with the door's path but, its dot segments resolved, names another path is not addressed to the
    door: answering it as a check handed the client the gateway's answer (identity headers and all), asked
    with X-Forwarded-* headers the client chose."""
    async with running_verifier() as (app, idp):
        token = idp.mint(sub="alice", scope="read write")
        answer = await http_exchange(app.ports.http, _request(token, "X-Forwarded-Uri: /things\r\n", target))
        assert _status(answer) == 404, answer
        assert _header(answer, "x-authenticated-userid") is None
        inside = await http_exchange(app.ports.http, _request(token, "", "/v1/forward-auth/a/../b/./c"))
        assert _status(inside) == 200  # dot segments that stay within the door's path: Envoy's appended path


@pytest.mark.parametrize("target", [b"/livez", b"/healthz", b"/readyz", b"/nope"])
@pytest.mark.parametrize("ending", [b"HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\r\n", b"HTTP/1.0\r\n\r\n"])
async def test_a_health_or_not_found_answer_that_closes_says_so(target: bytes, ending: bytes) -> None:
    # The door closed after these answers without `connection: close` in them (a check's answer and a side door's
    # always said it): RFC 9112 section 9.6, the answer that ends a connection says so.
    async with running_verifier() as (app, _):
        answer = await http_exchange(app.ports.http, b"GET " + target + b" " + ending, read_until_close=True)
        assert _header(answer, "connection") == "close", answer
        assert answer.count(b"HTTP/1.1 ") == 1


def test_original_request_comes_from_the_x_forwarded_family_by_default() -> None:
    attrs = attributes_from_http(
        "GET",
        b"/v1/forward-auth",
        {
            "x-forwarded-method": "post",
            "x-forwarded-uri": "/a?b=1",
            "x-forwarded-host": "api",
            "x-forwarded-proto": "HTTPS",
            "x-forwarded-for": "203.0.113.9, 10.0.0.2",
            "host": "verifier",
        },
        "10.0.0.1",
    )
    assert (attrs.method, attrs.path, attrs.host, attrs.scheme) == ("POST", "/a?b=1", "api", "https")
    assert attrs.client_address == "203.0.113.9"


def test_the_x_original_family_is_understood_when_declared() -> None:
    headers = {
        "x-original-method": "DELETE",
        "x-original-uri": "/x",
        "x-original-host": "API.example.test",
        "x-original-proto": "https",
        "host": "h",
    }
    attrs = attributes_from_http("GET", b"/v1/forward-auth", headers, "10.0.0.1", X_ORIGINAL)
    assert (attrs.method, attrs.path, attrs.host, attrs.scheme) == ("DELETE", "/x", "api.example.test", "https")
    assert attrs.client_address == "10.0.0.1"  # no standard x-original header names the client: the peer


# What a client adds to win the route through a gateway that only overwrites the declared family
# (nginx auth_request passes every client header on).
SPOOFED_X_FORWARDED = {
    "x-forwarded-method": "GET",
    "x-forwarded-uri": "/public",
    "x-forwarded-host": "public.example.test",
    "x-forwarded-port": "8443",
    "x-forwarded-proto": "http",
    "x-forwarded-for": "198.51.100.66",
}
SPOOFED_X_ORIGINAL = {
    "x-original-method": "GET",
    "x-original-uri": "/public",
    "x-original-host": "public.example.test",
    "x-original-proto": "http",
}
GATEWAY_X_FORWARDED = {
    "x-forwarded-method": "DELETE",
    "x-forwarded-uri": "/admin/users/7",
    "x-forwarded-host": "admin.example.test",
    "x-forwarded-proto": "https",
}
GATEWAY_X_ORIGINAL = {
    "x-original-method": "DELETE",
    "x-original-uri": "/admin/users/7",
    "x-original-host": "admin.example.test",
    "x-original-proto": "https",
}


@pytest.mark.parametrize(
    ("family", "gateway", "spoofed"),
    [("x-original", GATEWAY_X_ORIGINAL, SPOOFED_X_FORWARDED), ("x-forwarded", GATEWAY_X_FORWARDED, SPOOFED_X_ORIGINAL)],
)
def test_the_other_familys_headers_are_never_read(
    family: str, gateway: dict[str, str], spoofed: dict[str, str]
) -> None:
    headers = {"host": "verifier", **spoofed, **gateway}
    attrs = attributes_from_http("GET", b"/v1/forward-auth", headers, "10.0.0.1", FORWARDED_FAMILIES[family])
    assert (attrs.method, attrs.path, attrs.host, attrs.scheme) == (
        "DELETE",
        "/admin/users/7",
        "admin.example.test",
        "https",
    )


@pytest.mark.parametrize(
    ("family", "spoofed"), [("x-original", SPOOFED_X_FORWARDED), ("x-forwarded", SPOOFED_X_ORIGINAL)]
)
def test_absent_family_headers_fall_back_to_this_request_never_to_the_other_family(
    family: str, spoofed: dict[str, str]
) -> None:
    headers = {"host": "Shop.example.test", **spoofed}
    attrs = attributes_from_http("PUT", b"/v1/forward-auth/orders/7", headers, "10.0.0.1", FORWARDED_FAMILIES[family])
    assert (attrs.method, attrs.path, attrs.host, attrs.scheme, attrs.client_address) == (
        "PUT",
        "/orders/7",
        "shop.example.test",
        "http",
        "10.0.0.1",
    )
    bare = attributes_from_http("POST", b"/v1/forward-auth/", headers, "", FORWARDED_FAMILIES[family])
    assert (bare.method, bare.path) == ("POST", "/")
    with pytest.raises(Undescribed) as undescribed:  # nothing tells the path: never judged as `/`
        attributes_from_http("POST", b"/v1/forward-auth", headers, "", FORWARDED_FAMILIES[family])
    path_header = FORWARDED_FAMILIES[family].path
    assert undescribed.value.missing == f"no {path_header} header and no path after /v1/forward-auth"


@pytest.mark.parametrize("family", [X_FORWARDED, X_ORIGINAL])
def test_method_override_and_envoy_original_path_change_nothing(family: object) -> None:
    base = {"host": "api", "x-forwarded-uri": "/a", "x-original-uri": "/a"}
    tricks = {
        "x-http-method-override": "DELETE",
        "x-method-override": "DELETE",
        "x-envoy-original-path": "/public",
        "x-original-url": "/public",
        "x-rewrite-url": "/public",
    }
    plain = attributes_from_http("GET", b"/v1/forward-auth", base, "", family)  # type: ignore[arg-type]
    tricked = attributes_from_http("GET", b"/v1/forward-auth", {**base, **tricks}, "", family)  # type: ignore[arg-type]
    assert plain._replace(headers={}) == tricked._replace(headers={})
    assert (tricked.method, tricked.path) == ("GET", "/a")


def test_every_declared_family_has_its_headers() -> None:
    assert tuple(FORWARDED_FAMILIES) == FORWARDED_HEADER_FAMILIES


ROUTES = (
    PolicySettings(name="public", match=RouteMatch(path_prefix="/public"), require=Requirements(authenticated=False)),
    PolicySettings(name="admin", match=RouteMatch(path_prefix="/admin"), require=Requirements(roles_any=("admin",))),
)


def _wire(headers: dict[str, str]) -> str:
    return "".join(f"{k}: {v}\r\n" for k, v in headers.items())


@pytest.mark.parametrize(
    ("family", "gateway", "spoofed"),
    [("x-original", GATEWAY_X_ORIGINAL, SPOOFED_X_FORWARDED), ("x-forwarded", GATEWAY_X_FORWARDED, SPOOFED_X_ORIGINAL)],
)
async def test_a_client_cannot_choose_the_judged_route_through_the_door(
    family: str, gateway: dict[str, str], spoofed: dict[str, str]
) -> None:
    options = {"policies": ROUTES, "forward_auth": door_settings(forwarded_headers=family)}
    async with running_verifier(options) as (app, idp):
        # The client's headers first, the gateway's after (as nginx adds proxy_set_header ones).
        extra = _wire(spoofed) + _wire(gateway)
        refused = await http_exchange(app.ports.http, _request(None, extra))
        assert _status(refused) == 401, "no token: the admin route was judged, not the client's /public"
        answer = await http_exchange(app.ports.http, _request(idp.mint(sub="mallory"), extra))
        assert (_status(answer), _header(answer, "x-verifier-reason")) == (403, "role_missing")
        public = await http_exchange(
            app.ports.http, _request(None, _wire({**gateway, FORWARDED_FAMILIES[family].path: "/public/x"}))
        )
        assert _status(public) == 200


# A public landing page and a protected route: a check judged as `/` passes.
LANDING = (
    PolicySettings(name="admin", match=RouteMatch(path_prefix="/admin"), require=Requirements(roles_any=("admin",))),
    PolicySettings(name="landing", match=RouteMatch(path_prefix="/"), require=Requirements(authenticated=False)),
)


@pytest.mark.parametrize(
    ("declared", "sent"), [("x-original", GATEWAY_X_FORWARDED), ("x-forwarded", GATEWAY_X_ORIGINAL)]
)
async def test_a_check_no_header_tells_the_path_of_is_refused_not_judged_as_the_root(
    declared: str, sent: dict[str, str]
) -> None:
    # The verifier declares one family, its gateway sends the other (or an nginx location forgot the path header):
    # every check came with the bare target and no declared path header, was judged `GET /` and passed the landing
    # page's policy, /admin/users/7 with no token included.
    options = {"policies": LANDING, "forward_auth": door_settings(forwarded_headers=declared)}
    async with running_verifier(options) as (app, _):
        header = FORWARDED_FAMILIES[declared].path
        refused = await http_exchange(app.ports.http, _request(None, _wire(sent), target="/v1/forward-auth"))
        assert (_status(refused), _header(refused, "x-verifier-reason")) == (400, "invalid_request"), refused
        assert f"no {header} header" in refused.partition(b"\r\n\r\n")[2].decode()
        metrics = app.metrics.render().decode()
        assert 'reason="invalid_request"' in metrics
        # The declared family's path header: judged as before.
        described = _wire({**sent, header: "/admin/users/7"})
        assert _status(await http_exchange(app.ports.http, _request(None, described, target="/v1/forward-auth"))) == 401
        public = _wire({header: "/welcome"})
        assert _status(await http_exchange(app.ports.http, _request(None, public, target="/v1/forward-auth"))) == 200
        # The target's suffix (Envoy's path_prefix): judged as before.
        for target, status in (("/v1/forward-auth/admin/users/7", 401), ("/v1/forward-auth/", 200)):
            assert _status(await http_exchange(app.ports.http, _request(None, target=target))) == status, target


# The admin host needs the admin role; every other host any signed-in user.
BY_HOST = (
    PolicySettings(
        name="admin-host", match=RouteMatch(hosts=("admin.example.test",)), require=Requirements(roles_any=("admin",))
    ),
    PolicySettings(name="signed-in", match=RouteMatch(path_prefix="/"), require=Requirements(authenticated=True)),
)


@pytest.mark.parametrize("declared", ["x-original", "x-forwarded"])
async def test_a_check_no_header_tells_the_host_of_is_refused_when_policies_name_hosts(declared: str) -> None:
    # nginx's own auth_request example sends `X-Original-URI $request_uri` and nothing else: the check's Host is the
    # verifier's upstream name (`$proxy_host`), never the client's. Judged on it, a request for the admin host met
    # no host-scoped policy and fell to the signed-in one: any user's token passed the admin host.
    family = FORWARDED_FAMILIES[declared]
    options = {"policies": BY_HOST, "forward_auth": door_settings(forwarded_headers=declared)}
    async with running_verifier(options) as (app, idp):
        mallory = idp.mint(sub="mallory")
        for sent in ({family.path: "/users/7"}, {family.path: "/users/7", family.host: ""}):
            refused = await http_exchange(app.ports.http, _request(mallory, _wire(sent), target="/v1/forward-auth"))
            assert (_status(refused), _header(refused, "x-verifier-reason")) == (400, "invalid_request"), refused
            assert f"no {family.host} header" in refused.partition(b"\r\n\r\n")[2].decode()
        # Nor is a `Host` naming the client's host read instead (a gateway passing it): which it is, nothing tells.
        for target in ("/v1/forward-auth", "/v1/forward-auth/users/7"):
            raw = _request(mallory, _wire({family.path: "/users/7"}), target=target)
            refused = await http_exchange(app.ports.http, raw.replace(b"Host: verifier", b"Host: admin.example.test"))
            assert (_status(refused), _header(refused, "x-verifier-reason")) == (400, "invalid_request"), refused
            assert f"no {family.host} header" in refused.partition(b"\r\n\r\n")[2].decode()
        # The host told: the admin host's policy judges it; another host the signed-in one.
        for host, status in (("admin.example.test", 403), ("shop.example.test", 200)):
            told = _wire({family.path: "/users/7", family.host: host})
            answer = await http_exchange(app.ports.http, _request(mallory, told, target="/v1/forward-auth"))
            assert _status(answer) == status, (host, answer)
    # No policy names a host: the host does not choose the route, and a check without the header is judged as before.
    options = {"policies": LANDING, "forward_auth": door_settings(forwarded_headers=declared)}
    async with running_verifier(options) as (app, _):
        untold = _wire({family.path: "/welcome"})
        assert _status(await http_exchange(app.ports.http, _request(None, untold, target="/v1/forward-auth"))) == 200


def test_envoy_http_mode_appends_the_original_path_and_keeps_the_method() -> None:
    attrs = attributes_from_http("PUT", b"/v1/forward-auth/orders/7?x=1", {"host": "shop"}, "")
    assert (attrs.method, attrs.path, attrs.host) == ("PUT", "/orders/7?x=1", "shop")


def test_forwarded_port_joins_the_host_unless_it_is_the_default() -> None:
    def host(**headers: str) -> str:
        return attributes_from_http("GET", b"/v1/forward-auth/", headers, "").host

    assert host(**{"x-forwarded-host": "api", "x-forwarded-port": "8443", "x-forwarded-proto": "https"}) == "api:8443"
    assert host(**{"x-forwarded-host": "api", "x-forwarded-port": "443", "x-forwarded-proto": "https"}) == "api"
    assert host(**{"x-forwarded-host": "api:9", "x-forwarded-port": "8443"}) == "api:9"
    assert host(**{"x-forwarded-host": "[::1]", "x-forwarded-port": "8080"}) == "[::1]:8080"
    assert host(host="h:1", **{"x-forwarded-port": "5"}) == "h:1"


async def test_a_client_sent_thumbprint_header_is_not_a_certificate_by_default() -> None:
    # RFC 8705 section 3: a certificate-bound token without the certificate is invalid_token. By default
    # forward-auth reads no thumbprint header at all, so a client cannot claim the certificate.
    async with running_verifier() as (app, idp):
        token = idp.mint(claims={"cnf": {"x5t#S256": "abc123"}})
        for name in ("X-Client-Cert-Thumbprint", "X-SSL-Client-Thumbprint", "X-Forwarded-Client-Cert"):
            answer = await http_exchange(app.ports.http, _request(token, f"{name}: abc123\r\n"))
            assert _status(answer) == 401, name
            assert _header(answer, "x-verifier-reason") == "sender_constraint_failed"
            assert 'error="invalid_token"' in (_header(answer, "www-authenticate") or "")


async def test_only_the_declared_thumbprint_header_is_read() -> None:
    async with running_verifier({"mtls_thumbprint_header": "x-ssl-client-thumbprint"}) as (app, idp):
        token = idp.mint(claims={"cnf": {"x5t#S256": "abc123"}})
        other = await http_exchange(app.ports.http, _request(token, "X-Client-Cert-Thumbprint: abc123\r\n"))
        assert (_status(other), _header(other, "x-verifier-reason")) == (401, "sender_constraint_failed")
        declared = await http_exchange(app.ports.http, _request(token, "X-SSL-Client-Thumbprint: abc123\r\n"))
        assert _status(declared) == 200
        wrong = await http_exchange(app.ports.http, _request(token, "X-SSL-Client-Thumbprint: zzz\r\n"))
        assert _status(wrong) == 401


HOST_ROUTES = (
    PolicySettings(
        name="admin", match=RouteMatch(hosts=("admin.example.test",)), require=Requirements(roles_any=("admin",))
    ),
    PolicySettings(name="open", match=RouteMatch(path_prefix="/"), require=Requirements(authenticated=False)),
)
HOST_SPELLINGS = ["ADMIN.example.test.", "admin.example.test:443", "Admin.Example.Test.:8443"]


@pytest.mark.parametrize("spelling", HOST_SPELLINGS)
@pytest.mark.parametrize(
    ("family", "header"), [("x-forwarded", "X-Forwarded-Host"), ("x-original", "X-Original-Host")]
)
async def test_a_host_policy_holds_for_every_spelling_of_the_host(family: str, header: str, spelling: str) -> None:
    # (`Host` alone no longer tells the host when policies name hosts: refused, see
    # test_a_check_no_header_tells_the_host_of_is_refused_when_policies_name_hosts.)
    options = {"policies": HOST_ROUTES, "forward_auth": door_settings(forwarded_headers=family)}
    async with running_verifier(options) as (app, _):
        raw = f"GET /v1/forward-auth/ HTTP/1.1\r\nHost: verifier\r\n{header}: {spelling}\r\n\r\n".encode()
        answer = await http_exchange(app.ports.http, raw)
        assert _status(answer) == 401, "the admin host's policy, not the open one"
        open_host = await http_exchange(app.ports.http, raw.replace(spelling.encode(), b"www.example.test"))
        assert _status(open_host) == 200


async def test_an_allow_tells_envoy_to_remove_identity_headers_the_client_sent() -> None:
    smuggled = "X-Authenticated-Userid: admin\r\nX-Authenticated-Tenant: acme\r\nx-authenticated-roles: admin\r\n"
    async with running_verifier() as (app, idp):
        token = idp.mint(sub="erin")
        plain = await http_exchange(app.ports.http, _request(token))
        assert _header(plain, "x-envoy-auth-headers-to-remove") is None
        answer = await http_exchange(app.ports.http, _request(token, smuggled))
        assert _status(answer) == 200 and _header(answer, "x-authenticated-userid") == "erin"
        assert _header(answer, "x-envoy-auth-headers-to-remove") == "x-authenticated-roles, x-authenticated-tenant"
        closing = await http_exchange(
            app.ports.http, _request(token, smuggled + "Connection: close\r\n"), read_until_close=True
        )
        assert _header(closing, "x-envoy-auth-headers-to-remove") == "x-authenticated-roles, x-authenticated-tenant"
        assert _header(closing, "connection") == "close"
        # The per-request header never leaks into the memoized answer, and refusals carry none.
        assert await http_exchange(app.ports.http, _request(token)) == plain
        refused = await http_exchange(app.ports.http, _request(None, smuggled))
        assert _status(refused) == 401 and _header(refused, "x-envoy-auth-headers-to-remove") is None


async def test_a_head_request_to_health_or_a_side_door_is_answered_without_content() -> None:
    # RFC 9110 section 9.3.2: no content in an answer to HEAD. /healthz wrote "SERVING\n" and the small
    # endpoints their JSON (a 405 on a side door's route), which the client reads as the start of the next
    # answer on the connection: the GET pipelined behind got a garbled answer.
    webauthn = WebAuthnConfig(rp_id="localhost", origins=("http://localhost:9555",), secret=b"s" * 32, demo=True)
    async with running_verifier({"webauthn": webauthn}) as (app, _):
        for target in (b"/healthz", b"/livez", b"/v1/webauthn/credentials", b"/v1/webauthn/demo"):
            answers = await http_exchange(
                app.ports.http,
                b"HEAD " + target + b" HTTP/1.1\r\nHost: v\r\n\r\n"
                b"GET /livez HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\r\n",
                read_until_close=True,
            )
            head, _, rest = answers.partition(b"\r\n\r\n")
            assert int(_header(head + b"\r\n\r\n", "content-length") or 0) > 0, target  # the GET's length
            assert rest.startswith(b"HTTP/1.1 200 OK\r\n"), (target, answers)



async def test_a_check_asked_with_head_is_answered_without_content() -> None:
    # Envoy's HTTP ext_authz asks with the client's own method, so a client's HEAD is a HEAD check. An answer to
    # HEAD has no content (RFC 9110 section 9.3.2): the refusals' JSON was written all the same, and the gateway,
    # reading none, took it for the start of the next answer on its pooled connection.
    async with running_verifier() as (app, idp):
        good = idp.mint(sub="hd")
        checks = [None, good, good, "not-a-token"]  # refused, first-seen, cached, malformed
        raw = b"".join(_request(token, method="HEAD") for token in checks)
        raw += b"GET /livez HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\r\n"
        answers = await http_exchange(app.ports.http, raw, read_until_close=True)
        heads = []
        for _ in checks:
            head, _, answers = answers.partition(b"\r\n\r\n")
            heads.append(head + b"\r\n\r\n")
        assert [_status(head) for head in heads] == [401, 200, 200, 401], heads
        assert [_header(head, "x-authenticated-userid") for head in heads] == [None, "hd", "hd", None]
        assert [int(_header(head, "content-length") or 0) > 0 for head in heads] == [False, False, False, True]
        assert answers.startswith(b"HTTP/1.1 200 OK\r\n"), answers  # the GET's own answer, not a body left over
        assert answers.endswith(b"\r\n\r\nSERVING\n")


@pytest.mark.parametrize(
    "ask",
    [
        "GET {} HTTP/1.1\r\nHost: v\r\nConnection: upgrade\r\nUpgrade: websocket\r\n{}\r\n",
        "GET {} HTTP/1.1\r\nHost: v\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n{}\r\n",
        "CONNECT {} HTTP/1.1\r\nHost: v\r\n{}\r\n",
    ],
    ids=["websocket", "h2c", "connect"],
)
async def test_an_upgrade_request_gets_one_answer_that_closes_the_connection(ask: str) -> None:
    # llhttp ends the HTTP stream at an upgrade (Upgrade with Connection: upgrade, or CONNECT; a gateway such as
    # Caddy's forward_auth passes a WebSocket's on to the check): the check was answered as keep-alive and then a
    # 400 written after it, two answers to one request; the gateway's next request on the pooled connection read
    # that 400 as its own answer. One answer, with `connection: close`, and nothing after it.
    async with running_verifier() as (app, idp):
        good = idp.mint(sub="up")
        for token in (good, good, None):  # first-seen, cached, refused
            auth = f"Authorization: Bearer {token}\r\n" if token else ""
            raw = ask.format("/v1/forward-auth/", auth).encode() + b"GET /livez HTTP/1.1\r\nHost: v\r\n\r\n"
            answers = await http_exchange(app.ports.http, raw, read_until_close=True)
            head, _, rest = answers.partition(b"\r\n\r\n")
            assert _status(head) == (200 if token else 401), answers
            assert _header(head, "connection") == "close", answers
            assert len(rest) == int(_header(head, "content-length") or 0), answers  # no second answer


# -- listener timeouts (slowloris, idle keep-alives) ---------------------------------------------------

SHORT = door_settings(header_timeout_seconds=0.3, idle_timeout_seconds=0.6)


async def _seconds_until_closed(reader: asyncio.StreamReader, limit: float = 5.0, since: float | None = None) -> float:
    """Reads (and discards) until the server closes; returns how long that took (from `since`, loop time, if given)."""
    loop = asyncio.get_running_loop()
    started = loop.time() if since is None else since
    async with asyncio.timeout(limit):
        try:
            while await reader.read(4096):
                pass
        except ConnectionResetError:  # closed with request bytes unread: the kernel resets, a close all the same
            pass
    return loop.time() - started


async def _seconds_until_closed_while_trickling(
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    opened: list[float],
    slow: list[asyncio.StreamWriter],
    rounds: int,
) -> list[float]:
    """How long each connection took to be closed, from its opening, while `slow` ones sent a header line every
    50 ms for `rounds` rounds (slowloris: a line now and then never extends the deadline); then all are closed."""

    async def trickle() -> None:
        for _ in range(rounds):
            await asyncio.sleep(0.05)
            for writer in slow:
                if not writer.is_closing():
                    writer.write(b"X-a: b\r\n")

    trickling = asyncio.ensure_future(trickle())
    try:
        return await asyncio.gather(
            *(_seconds_until_closed(r, since=at) for (r, _), at in zip(connections, opened, strict=True))
        )
    finally:
        trickling.cancel()
        for _, writer in connections:
            writer.close()


async def test_half_sent_requests_are_closed_after_the_header_timeout() -> None:
    async with running_verifier({"forward_auth": SHORT}) as (app, _):
        loop = asyncio.get_running_loop()
        connections, opened = [], []
        for _ in range(40):  # each one's timeout runs from its own opening, however slow opening 40 is
            connections.append(await asyncio.open_connection("127.0.0.1", app.ports.http))
            opened.append(loop.time())
        slow = [writer for i, (_, writer) in enumerate(connections) if i % 4]  # a quarter send nothing at all
        for writer in slow:
            writer.write(b"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\n")

        waits = await _seconds_until_closed_while_trickling(connections, opened, slow, rounds=20)
        assert all(0.2 <= w <= 1.5 for w in waits), waits
        assert not app.forward_auth.connections
        # The listener still serves.
        assert _status(await http_exchange(app.ports.http, _request(None))) == 401


async def test_the_metrics_listener_closes_half_sent_requests_after_the_header_timeout() -> None:
    # The metrics listener (aiohttp: /metrics, /healthz) had no header timeout: aiohttp cancels its keep-alive
    # timer on the first byte, so a request never finished held its connection (and a descriptor of the
    # process the doors share) for good; 50 such connections were still open after 20 s.
    async with running_verifier({"forward_auth": SHORT}) as (app, _):
        assert app.ports.metrics is not None
        loop = asyncio.get_running_loop()
        connections, opened = [], []
        for i in range(20):
            connections.append(await asyncio.open_connection("127.0.0.1", app.ports.metrics))
            opened.append(loop.time())
            if i % 2:  # half send part of a request, the other half nothing
                connections[-1][1].write(b"GET /metrics HTTP/1.1\r\nHost: m\r\n")

        slow = [writer for _, writer in connections[1::2]]
        waits = await _seconds_until_closed_while_trickling(connections, opened, slow, rounds=40)
        assert all(w <= 1.5 for w in waits), waits
        # A whole request is answered, and its keep-alive is not cut by the header timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", app.ports.metrics)
        try:
            for _ in range(2):
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: m\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert _status(head) in (200, 503)
                await reader.readexactly(int(_header(head, "content-length") or 0))
                await asyncio.sleep(0.5)  # past the header timeout, idle between requests
        finally:
            writer.close()


async def test_the_metrics_listener_closes_an_idle_keep_alive_after_the_idle_timeout() -> None:
    """An idle keep-alive on the metrics listener is closed after `http.idle_timeout_seconds`, as on the doors.
    aiohttp's own default is 3,630 s: one `GET /healthz` (no token needed) then silence held a descriptor of the
    process the doors share for an hour, so 20,000 such connections (the descriptor limit) held for an hour left the
    forward-auth listener unable to accept a gateway's connection (`accept_paused`)."""
    async with running_verifier({"forward_auth": SHORT}) as (app, _):
        assert app.ports.metrics is not None
        connections = []
        for _ in range(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", app.ports.metrics)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: m\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert _status(head) in (200, 503)
            await reader.readexactly(int(_header(head, "content-length") or 0))
            connections.append((reader, writer))
        try:
            waits = [await _seconds_until_closed(reader) for reader, _ in connections]
        finally:
            for _, writer in connections:
                writer.close()
        assert all(w <= 1.5 for w in waits), waits  # idle_timeout_seconds=0.6


async def test_the_admin_listener_keeps_the_doors_timeouts_and_size_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """`admin.listen` is served by the forward-auth door's connections (`checks=False`): a half-sent request is
    closed after the header timeout, oversized headers get 431, an idle keep-alive is closed, and a check asked
    there is not answered (404)."""
    from verifier.config.revocation import RevocationConfig
    from verifier.settings import Listen

    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", "an-admin-token-of-32-characters-at-least")
    options = {"forward_auth": SHORT, "revocation": RevocationConfig(), "admin": Listen(host="127.0.0.1", port=0)}
    async with running_verifier(options) as (app, idp):
        assert app.ports.admin is not None and app.admin is not None
        loop = asyncio.get_running_loop()
        connections, opened = [], []
        for i in range(10):
            connections.append(await asyncio.open_connection("127.0.0.1", app.ports.admin))
            opened.append(loop.time())
            if i % 2:
                connections[-1][1].write(b"GET /v1/admin/revocations HTTP/1.1\r\nHost: a\r\n")
        slow = [writer for _, writer in connections[1::2]]
        waits = await _seconds_until_closed_while_trickling(connections, opened, slow, rounds=20)
        assert all(0.2 <= w <= 1.5 for w in waits), waits
        big = _request("a" * 40_000, target="/v1/admin/revocations")
        assert _status(await http_exchange(app.ports.admin, big, read_until_close=True)) == 431
        assert _status(await http_exchange(app.ports.admin, _request(idp.mint(sub="alice")))) == 404
        reader, writer = await asyncio.open_connection("127.0.0.1", app.ports.admin)
        try:
            writer.write(_request("x", target="/v1/admin/revocations"))
            assert _status(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)) == 401
            assert await _seconds_until_closed(reader) <= 1.5  # idle past idle_timeout_seconds
        finally:
            writer.close()
        assert not app.admin.connections


async def test_an_idle_keep_alive_is_closed_after_the_idle_timeout() -> None:
    async with running_verifier({"forward_auth": SHORT}) as (app, idp):
        reader, writer = await asyncio.open_connection("127.0.0.1", app.ports.http)
        try:
            writer.write(_request(idp.mint()))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert _status(head) == 200
            waited = await _seconds_until_closed(reader)
            assert 0.5 <= waited <= 2.0, waited
        finally:
            writer.close()


# Timeouts an active connection must outlive: still short, but a loaded machine's late timer (the 0.2 s and
# 0.15 s pauses below overshooting) never reaches them (with SHORT the pause had 0.15 s of room).
ACTIVE = door_settings(header_timeout_seconds=1.0, idle_timeout_seconds=2.0)


async def test_an_active_pipelined_connection_outlives_both_timeouts() -> None:
    async with running_verifier({"forward_auth": ACTIVE}) as (app, idp):
        token = idp.mint()
        reader, writer = await asyncio.open_connection("127.0.0.1", app.ports.http)
        loop = asyncio.get_running_loop()
        started = loop.time()
        answered = 0
        try:
            while loop.time() - started < 3 * ACTIVE.idle_timeout_seconds:  # several header and idle timeouts long
                writer.write(_request(token) + _request(None) + _request(token))  # pipelined
                for _ in range(3):
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                    length = int(_header(head, "content-length") or 0)
                    if length:
                        await reader.readexactly(length)
                    answered += 1
                await asyncio.sleep(0.2)  # below the idle timeout
            # A request sent slowly but completely within the header timeout is answered too.
            raw = _request(token)
            writer.write(raw[:20])
            await asyncio.sleep(0.15)
            writer.write(raw[20:])
            assert _status(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)) == 200
        finally:
            writer.close()
        assert answered >= 18


class _GatedAuthenticator:
    """Every token needs I/O (a slow check); each waits for the gate its token names, then refuses with its error."""

    sends_to = None

    def __init__(self, gates: dict[str, tuple[asyncio.Event, VerifierError]]) -> None:
        self.gates = gates

    def verify_now(self, token: str, seen: Seen) -> Principal | None:
        return None

    async def verify(self, token: str, token_hash: bytes, seen: Seen) -> Principal:
        gate, error = self.gates[token]
        await gate.wait()
        raise error


def _gated_pipeline(gates: dict[str, tuple[asyncio.Event, VerifierError]]) -> Pipeline:
    """A real pipeline (the compiled door takes no stand-in) whose one authenticator is gated."""
    clock = SystemClock()
    return Pipeline(
        authenticators=[_GatedAuthenticator(gates)],
        checks=[],
        positive=ExpiringCache(10, clock),
        negative=ExpiringCache(10, clock),
        clock=clock,
        metrics=Metrics(CollectorRegistry()),
        realm="verifier",
        negative_ttl=30,
        audit_enabled=False,
    )


class _Wire:
    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None

    def is_closing(self) -> bool:
        return False


async def test_a_first_seen_answer_goes_out_in_the_loop_turn_its_decision_completes_and_in_order() -> None:
    # A slow answer's task writes it itself when it is the next one owed (#24 goal 7: no done callback, no
    # extra event-loop turn); one behind an earlier answer still owed waits for that one, in request order.
    gates = {
        "a": (asyncio.Event(), ProviderUnavailable("provider down")),
        "b": (asyncio.Event(), MissingToken("no token")),
    }
    door = ForwardAuthDoor(_gated_pipeline(gates), Metrics(CollectorRegistry()), lambda: True)
    wire = _Wire()
    connection = _Connection(door)
    connection.connection_made(wire)  # type: ignore[arg-type]
    head = "GET /v1/forward-auth HTTP/1.1\r\nHost: verifier\r\nX-Forwarded-Uri: /\r\nAuthorization: Bearer {}\r\n\r\n"
    connection.data_received((head.format("a") + head.format("b")).encode())
    for _ in range(3):
        await asyncio.sleep(0)  # both checks running, waiting at their gates
    gates["b"][0].set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert wire.out == []  # /b is decided but owed after /a
    gates["a"][0].set()
    await asyncio.sleep(0)  # one loop turn: /a's check resumes, and both answers go out in it
    assert [_status(answer) for answer in wire.out] == [503, 401]
    assert connection.busy is False
