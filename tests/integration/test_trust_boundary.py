"""Issue #18: what a client sends must never choose what is judged. The attacks of the security review,
each through every shipped gateway configuration, against the REAL verifier.

Gateways: the rendered deploy/nginx/nginx.conf.template and nginx-lua.conf.template (real nginx; the Lua
variant reuses answers in deploy/nginx/verifier-reuse.lua), deploy/envoy/envoy-grpc.yaml.template,
envoy-http.yaml.template and envoy-reuse.yaml.template (real Envoy; the last reuses answers in its Lua
filter, deploy/envoy/verifier-reuse.lua). tests/kong/test_trust_boundary_lua.py runs these same tests
through the Kong Lua plugin in real nginx, and test_trust_boundary_python.py through the Kong Python plugin under its
real plugin server (each imports them and supplies its own `edge` fixture).

The verifier's policies: a public `/health`, the `admin.example.test` host and `/admin` needing the `admin`
role, GET (and so HEAD) under `/reports` the `auditor` role, writes needing the `write` scope, everything else any
valid token. Each test asserts on what the protected application (an echo upstream recording every request)
received, not only on the status.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.client
import ipaddress
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID

from verifier.binding.dpop import thumbprint
from verifier.binding.mtls import thumbprint_from_der

if __package__:
    from .gateways import (
        GATEWAY_KINDS,
        LOOPBACK,
        EchoUpstream,
        GatewayProcess,
        LocalIssuer,
        http_request,
        start_envoy,
        start_verifier,
    )
    from .replicas import dpop_proof, public_jwk
else:  # tests/ is not a package: pytest put this directory on sys.path
    from gateways import (
        GATEWAY_KINDS,
        LOOPBACK,
        EchoUpstream,
        GatewayProcess,
        LocalIssuer,
        http_request,
        start_envoy,
        start_verifier,
    )
    from replicas import dpop_proof, public_jwk

from rigs import fresh_upstream_log, gateway_fixture  # noqa: F401 - autouse: each test sees only its own requests

pytestmark = pytest.mark.integration

ADMIN_HOST = "admin.example.test"
IDN_HOST = "bücher.example.test"  # written in the policy as people write it: its A-label is xn--bcher-kva.example.test
API_HOST = "api.example.test"
POLICIES = [
    {"name": "health", "match": {"path": "/health"}, "require": {"authenticated": False}},
    {"name": "admin-host", "match": {"hosts": [ADMIN_HOST]}, "require": {"roles_any": ["admin"]}},
    {"name": "idn-host", "match": {"hosts": [IDN_HOST]}, "require": {"roles_any": ["admin"]}},
    {"name": "admin", "match": {"path_prefix": "/admin"}, "require": {"roles_any": ["admin"]}},
    {"name": "reports", "match": {"path_prefix": "/reports", "methods": ["GET"]},
     "require": {"roles_any": ["auditor"]}},
    {"name": "writes", "match": {"methods": ["POST", "PUT", "PATCH", "DELETE"]}, "require": {"scopes_all": ["write"]}},
    {"name": "rest", "match": {"path_prefix": "/"}, "require": {"authenticated": True}},
]
#: A certificate the client does NOT present; the token is bound to it (RFC 8705 cnf.x5t#S256).
BOUND_THUMBPRINT = base64.urlsafe_b64encode(hashlib.sha256(b"a DER certificate").digest()).rstrip(b"=").decode()

GATEWAYS = GATEWAY_KINDS


@dataclass(frozen=True, kw_only=True)
class Edge:
    """A gateway under test: where clients send requests."""

    name: str
    url: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    proc = start_verifier(
        tmp_path_factory.mktemp("verifier"), issuer=issuer.issuer, extra_config={"policies": POLICIES}
    )
    yield proc
    proc.stop()


edge = gateway_fixture("edge", GATEWAYS, lambda kind, url: Edge(name=kind, url=url))


@pytest.fixture(scope="module")
def tokens(issuer: LocalIssuer) -> Callable[..., str]:
    """Mints a token: `tokens("read")` read-only, `tokens("read write")`, `tokens(roles=["admin"])`..."""

    def mint(scope: str = "read", **claims: object) -> str:
        return issuer.mint(sub="alice", scope=scope, **claims)

    return mint


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def absolute_form(edge: Edge, target: str, headers: dict[str, str]) -> int:
    """Sends `GET <absolute URI> HTTP/1.1` (RFC 9112 section 3.2.2) and returns the status code."""
    return raw_get(edge, target, headers)


def raw_get(edge: Edge, target: str, headers: dict[str, str] | list[tuple[str, str]]) -> int:
    """Sends `GET <target> HTTP/1.1` with the target byte for byte (no client library's parsing: a `#` stays
    in it) and the header lines as given (a list may repeat a name), and returns the status code."""
    fields = headers.items() if isinstance(headers, dict) else headers
    lines = [f"GET {target} HTTP/1.1", *(f"{k}: {v}" for k, v in fields), "Connection: close", "", ""]
    with socket.create_connection((LOOPBACK, edge.port), timeout=10) as sock:
        sock.sendall("\r\n".join(lines).encode())
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    status_line = data.split(b"\r\n", 1)[0].split()
    assert len(status_line) >= 2, data
    return int(status_line[1])


# ------------------------------------------------------------------------------------------------ the path


@pytest.mark.parametrize("spoof", ["X-Forwarded-Uri", "X-Original-URI", "X-Envoy-Original-Path"])
def test_a_client_naming_a_public_path_does_not_open_a_protected_one(
    edge: Edge, upstream: EchoUpstream, spoof: str
) -> None:
    r = http_request(f"{edge.url}/admin/secret", headers={spoof: "/health"})

    assert r.status == 401, (edge.name, r.status, r.headers, r.body)
    assert r.headers["www-authenticate"].startswith("Bearer"), r.headers
    assert upstream.requests == []


@pytest.mark.parametrize("path", ["/health/../admin/secret", "/health/%2e%2e/admin/secret", "//admin/secret"])
def test_a_public_path_with_dot_segments_does_not_open_a_protected_one(
    edge: Edge, upstream: EchoUpstream, path: str
) -> None:
    r = http_request(f"{edge.url}{path}")

    assert r.status in (301, 307, 308, 400, 401, 404), (edge.name, path, r.status, r.body)
    assert upstream.requests == []


@pytest.mark.parametrize("target", ["/admin/secret\\..\\..\\health", "/admin/secret%5C..%5C..%5Chealth"])
def test_a_protected_path_with_backslashes_is_not_judged_as_the_public_one(
    edge: Edge, upstream: EchoUpstream, target: str
) -> None:
    """IIS reads `\\` as `/`, so the verifier resolves `/admin/secret\\..\\..\\health` to /health; every other
    server takes the backslash as a byte of the segment: Go's ServeMux (path.Clean) gives it to an `/admin/`
    pattern, Express to an `/admin` mount. Neither reading may be judged as the public /health alone (Envoy's
    path normalization makes it /health itself, which is what its upstream then gets, or redirects there)."""
    status = raw_get(edge, target, {"Host": API_HOST})

    assert status in (200, 307, 400, 401), (edge.name, target, status)
    seen = [r.path for r in upstream.requests]
    assert all(p == "/health" for p in seen), (edge.name, target, status, seen)


@pytest.mark.parametrize("target", ["/admin/secret/../../health", "/admin/secret/%2e%2e/%2E%2E/health"])
def test_a_protected_path_with_dot_segments_is_not_judged_as_the_public_one(
    edge: Edge, upstream: EchoUpstream, target: str
) -> None:
    """nginx (and Kong) pass the target on as the client sent it: `/admin/secret/../../health` reached the upstream
    with no token, judged as the public /health, while Express mounts and Flask routes match the target as it came
    (under /admin). Now refused as ambiguous (400). Envoy's path normalization makes it /health itself, which is
    what its upstream then gets."""
    status = raw_get(edge, target, {"Host": API_HOST})

    assert status in (200, 400), (edge.name, target, status)
    seen = [r.path for r in upstream.requests]
    assert all(p == "/health" for p in seen), (edge.name, target, status, seen)


@pytest.mark.parametrize("target", ["/health#/../admin/secret", "/health#/../orders"])
def test_a_public_path_with_a_fragment_does_not_open_a_protected_one(
    edge: Edge, upstream: EchoUpstream, target: str
) -> None:
    """A request-target never carries a fragment (RFC 9112 section 3.2): a gateway that passes the `#` on
    leaves it to the upstream, which may read `/health#/../admin/secret` as /admin/secret (Go's path.Clean
    on URL.Path, a file server) or as /health; neither reading may be judged as the public /health."""
    status = raw_get(edge, target, {"Host": API_HOST})

    assert status in (400, 401), (edge.name, target, status)
    assert upstream.requests == []


@pytest.mark.parametrize("path", ["/x/..;/admin/secret", "/.;/admin/secret", "/health;/..;/admin/secret"])
def test_path_parameters_do_not_sidestep_the_admin_policy(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str], path: str
) -> None:
    """Servlet containers (Tomcat, Jetty, Spring) drop `;parameters` from each segment before resolving dot
    segments: `/x/..;/admin/secret` is /admin/secret to them. A read-only token must not get there."""
    status = raw_get(edge, path, {"Host": API_HOST, **bearer(tokens("read"))})

    assert status in (400, 403), (edge.name, path, status)
    assert upstream.requests == []


@pytest.mark.parametrize("path", ["/ADMIN/secret", "/Admin/secret", "/%41dmin/secret", "/%2561dmin/secret"])
def test_another_case_of_the_admin_path_does_not_sidestep_its_policy(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str], path: str
) -> None:
    """Express, ASP.NET Core and IIS route paths case-blind: /ADMIN/secret is /admin/secret to them. An
    application that decodes a path its framework already decoded reads /%2561dmin/secret as /admin/secret."""
    r = http_request(f"{edge.url}{path}", headers=bearer(tokens("read")))

    assert r.status in (400, 403), (edge.name, path, r.status, r.body)
    assert upstream.requests == []


def test_the_public_path_itself_stays_public(edge: Edge, upstream: EchoUpstream) -> None:
    """The control for the test above: /health really is open, so a 401 there is the path being judged."""
    r = http_request(f"{edge.url}/health")

    assert r.status == 200, (edge.name, r.status, r.body)
    assert [s.path for s in upstream.requests] == ["/health"]


@pytest.mark.parametrize("credential", ["none", "garbage", "valid"])
def test_the_clients_identity_headers_never_reach_a_public_path(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str], credential: str
) -> None:
    """/health needs no token, so the verifier's answer there may carry no identity at all: the client's own
    X-Authenticated-* (a forged assertion among them, in any spelling) must still never reach the upstream."""
    forged = {
        "X-Authenticated-Identity": "eyJhbGciOiJub25lIn0.eyJzdWIiOiJyb290In0.",
        "X-Authenticated-Userid": "root",
        "X-Authenticated-Roles": "admin",
        "X_Authenticated_Scope": "all",
        "X-Authenticated-Plan": "enterprise",  # a name no gateway sets itself: only the prefix rule removes it
    }
    token = {"none": None, "garbage": "not.a.token", "valid": tokens("read")}[credential]

    r = http_request(f"{edge.url}/health", headers={**forged, **(bearer(token) if token else {})})

    assert r.status in (200, 401), (edge.name, r.status, r.body)
    for seen in upstream.requests:
        arrived = {n.replace("_", "-"): v for n, v in seen.headers.items()}
        assert not {n for n, v in arrived.items() if n.startswith("x-authenticated-") and v in forged.values()}, (
            edge.name,
            credential,
            seen.headers,
        )
    if credential != "garbage":
        assert r.status == 200 and len(upstream.requests) == 1, (edge.name, credential, r.status)


# ------------------------------------------------------------------------------------------------ the method


@pytest.mark.parametrize("spoof", ["X-Forwarded-Method", "X-Original-Method", "X-HTTP-Method-Override"])
def test_a_client_naming_a_safe_method_does_not_write_with_a_read_only_token(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str], spoof: str
) -> None:
    r = http_request(f"{edge.url}/orders", method="POST", headers={**bearer(tokens("read")), spoof: "GET"}, body=b"{}")

    assert r.status == 403, (edge.name, r.status, r.headers, r.body)
    assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
    assert upstream.requests == []


def test_a_head_request_gets_the_policy_of_the_get_route_it_runs(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str]
) -> None:
    """RFC 9110 section 9.3.2: HEAD is GET without the content, and Go's ServeMux, Express, Flask and Spring hand
    it to the GET handler. A policy written for GET that HEAD missed left the handler, its status and its headers
    (Content-Length, ETag, Location...) to the laxer catch-all: any valid token, here."""
    r = http_request(f"{edge.url}/reports/q3", method="HEAD", headers=bearer(tokens("read")))

    assert r.status == 403, (edge.name, r.status, r.headers)
    assert upstream.requests == []

    r = http_request(f"{edge.url}/reports/q3", method="HEAD", headers=bearer(tokens("read", roles=["auditor"])))
    assert r.status == 200, (edge.name, r.status, r.headers)
    assert [s.method for s in upstream.requests] == ["HEAD"]


def test_a_write_token_may_post(edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str]) -> None:
    r = http_request(f"{edge.url}/orders", method="POST", headers=bearer(tokens("read write")), body=b"{}")

    assert r.status == 200, (edge.name, r.status, r.body)
    (seen,) = upstream.requests
    assert seen.method == "POST"
    assert "x-http-method-override" not in seen.headers


# ------------------------------------------------------------------------------------------------ the certificate


def test_a_client_sent_thumbprint_does_not_stand_in_for_a_certificate(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str]
) -> None:
    token = tokens(cnf={"x5t#S256": BOUND_THUMBPRINT})

    r = http_request(f"{edge.url}/orders", headers={**bearer(token), "X-Client-Cert-Thumbprint": BOUND_THUMBPRINT})

    assert r.status == 401, (edge.name, r.status, r.headers, r.body)
    assert r.headers["x-verifier-reason"] == "sender_constraint_failed", r.headers
    assert upstream.requests == []


# ------------------------------------------------------------------------------------------------ the identity


def test_client_identity_headers_never_reach_the_upstream_and_the_verifiers_do(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str], issuer: LocalIssuer
) -> None:
    spoof = {
        "X-Authenticated-Roles": "admin",
        "X-Authenticated-Userid": "root",
        "X-Authenticated-Anything": "x",
        "x-authenticated-issuer": "https://evil.example.test",
    }

    r = http_request(f"{edge.url}/orders", headers={**spoof, **bearer(tokens("read"))})

    assert r.status == 200, (edge.name, r.status, r.body)
    (seen,) = upstream.requests
    assert seen.headers["x-authenticated-userid"] == "alice"
    assert seen.headers["x-authenticated-issuer"] == issuer.issuer
    assert seen.headers["x-authenticated-scope"] == "read"
    assert "x-authenticated-roles" not in seen.headers  # the token has no role: the verifier set none
    assert "x-authenticated-anything" not in seen.headers


def test_a_client_naming_a_kong_consumer_never_reaches_the_upstream(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str]
) -> None:
    """X-Kong-Consumer-* names a Kong consumer to the Kong plugin (issue #20), never identity for an upstream."""
    spoof = {
        "X-Kong-Consumer-Username": "admin",
        "X-Kong-Consumer-Custom-Id": "c-admin",
        "X-Kong-Consumer-Id": "00000000-0000-0000-0000-000000000000",
    }

    r = http_request(f"{edge.url}/orders", headers={**spoof, **bearer(tokens("read"))})

    assert r.status == 200, (edge.name, r.status, r.body)
    (seen,) = upstream.requests
    assert not [name for name in seen.headers if name.startswith("x-kong-consumer-")], seen.headers


def test_identity_headers_spelled_with_underscores_never_reach_the_upstream(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str]
) -> None:
    """CGI-style frameworks (WSGI, Rack, PHP) read `X_Authenticated_Roles` as `X-Authenticated-Roles`."""
    spoof = {"X_Authenticated_Roles": "admin", "X_Authenticated_Userid": "root", "x-authenticated_scope": "all"}

    r = http_request(f"{edge.url}/orders", headers={**spoof, **bearer(tokens("read"))})

    assert r.status == 200, (edge.name, r.status, r.body)
    (seen,) = upstream.requests
    as_cgi = {name.replace("_", "-"): value for name, value in seen.headers.items()}
    assert as_cgi.get("x-authenticated-userid") == "alice", seen.headers
    assert as_cgi.get("x-authenticated-scope") == "read", seen.headers
    assert "x-authenticated-roles" not in as_cgi, seen.headers


def test_client_identity_headers_do_not_pass_a_role_check(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str]
) -> None:
    r = http_request(f"{edge.url}/admin/secret", headers={"X-Authenticated-Roles": "admin", **bearer(tokens("read"))})

    assert r.status == 403, (edge.name, r.status, r.body)
    assert upstream.requests == []


@pytest.mark.parametrize("sub", [" root", "root ", "root\u00a0", "\u3000root", "\ufeffroot", "root\u0000", '"root"'])
def test_a_subject_the_upstream_would_trim_or_unquote_never_reads_as_another_user(
    edge: Edge, upstream: EchoUpstream, issuer: LocalIssuer, sub: str
) -> None:
    """A provider whose `sub` a user can choose (a username): ` root` was sent bare, the gateway dropped the space
    (OWS) and the upstream got `X-Authenticated-Userid: root`; NBSP, U+3000 and a BOM went to the upstream's trim,
    and NUL was taken out. Now such a subject is a quoted-string (controls replaced by U+FFFD)."""
    r = http_request(f"{edge.url}/orders", headers=bearer(issuer.mint(sub=sub, scope="read")))

    assert r.status == 200, (edge.name, r.status, r.body)
    (seen,) = upstream.requests
    value = seen.headers["x-authenticated-userid"].encode("latin-1").decode("utf-8")  # http.server reads latin-1
    assert "root" not in {value.strip(), value.strip().strip('"'), value.strip("\ufeff").strip()}, (edge.name, value)


def test_the_verifiers_roles_reach_the_upstream(edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str]) -> None:
    r = http_request(
        f"{edge.url}/admin/secret", headers={"X-Authenticated-Roles": "nobody", **bearer(tokens(roles=["admin"]))}
    )

    assert r.status == 200, (edge.name, r.status, r.body)
    (seen,) = upstream.requests
    assert seen.headers["x-authenticated-roles"] == "admin"


@pytest.mark.parametrize(
    ("claims", "header"),
    [({"roles": ["viewer,admin"]}, "x-authenticated-roles"),
     ({"roles": ["ad\u0000min"]}, "x-authenticated-roles"),
     ({"roles": ["viewer", " admin"]}, "x-authenticated-roles"),
     ({"scope": "read ad\tmin"}, "x-authenticated-scope"),
     ({"scope": "read\u00a0admin"}, "x-authenticated-scope"),
     ({"scope": None, "scp": ["read admin"]}, "x-authenticated-scope")],
    ids=["comma-in-role", "nul-in-role", "space-before-role", "tab-in-scope", "nbsp-in-scope", "space-in-scp-item"],
)
def test_a_role_or_scope_the_upstream_reads_as_another_never_reaches_it(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str], claims: dict[str, object], header: str
) -> None:
    """The policy judged `viewer,admin` as one role the token has (not admin); the upstream split the comma-joined
    X-Authenticated-Roles and read admin. The same for a control character the header lost (`ad<NUL>min`), a space
    an upstream trims, and scopes an upstream splits on any white space (Python's str.split: tab, NBSP)."""
    r = http_request(f"{edge.url}/orders", headers=bearer(tokens(**claims)))

    assert r.status == 200, (edge.name, r.status, r.body)
    (seen,) = upstream.requests
    value = seen.headers.get(header, "")
    as_latin1 = value.encode("utf-8").decode("latin-1")  # as WSGI (PEP 3333) hands a header to the application
    items = {item.strip() for item in value.split(",")} | set(value.split()) | set(as_latin1.split())
    assert "admin" not in items, (edge.name, value)


# ------------------------------------------------------------------------------------------------ the host


@pytest.mark.parametrize("host", [ADMIN_HOST, "ADMIN.example.test", "Admin.Example.Test", f"{ADMIN_HOST}."])
def test_every_spelling_of_the_admin_host_gets_the_admin_hosts_policy(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str], host: str
) -> None:
    r = http_request(f"{edge.url}/orders", headers={"Host": host, **bearer(tokens("read"))})

    assert r.status == 403, (edge.name, host, r.status, r.headers, r.body)
    assert upstream.requests == []


@pytest.mark.parametrize("host", ["xn--bcher-kva.example.test", "XN--BCHER-KVA.example.test"])
def test_an_internationalized_host_gets_its_policy_in_the_form_clients_send(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str], host: str
) -> None:
    """Browsers, curl and HTTP libraries send an internationalized name as its A-label (RFC 5890; WHATWG URL's
    domain to ASCII), and gateways route it so: a policy written `bücher.example.test` met no request at all, and
    every one fell to the laxer catch-all."""
    r = http_request(f"{edge.url}/orders", headers={"Host": host, **bearer(tokens("read"))})

    assert r.status == 403, (edge.name, host, r.status, r.headers, r.body)
    assert upstream.requests == []


def test_an_absolute_form_target_gets_the_policy_of_the_host_it_names(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str]
) -> None:
    """nginx and Envoy judge the request line's host (403); Kong's plugin, whose router routes by the Host
    header, tells the verifier both hosts, and two hosts under different policies are refused (400)."""
    headers = {"Host": API_HOST, **bearer(tokens("read"))}

    status = absolute_form(edge, f"http://{ADMIN_HOST}/orders", headers)

    assert status == (400 if edge.name.startswith("kong-") else 403), (edge.name, status)
    assert upstream.requests == []


def test_an_absolute_form_target_naming_a_laxer_host_does_not_open_the_host_headers_one(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str]
) -> None:
    """The other way round: the request line names the API host, the Host header the admin one. nginx's
    $host is the request line's; Kong routes by the Host header and, with preserve_host, passes it upstream.
    Either the request is refused, or the host judged (the API one) is the host the upstream gets."""
    headers = {"Host": ADMIN_HOST, **bearer(tokens("read"))}

    status = absolute_form(edge, f"http://{API_HOST}/orders", headers)

    assert status in (200, 400, 403), (edge.name, status)
    seen = [r.headers.get("host", "") for r in upstream.requests]
    assert not [h for h in seen if ADMIN_HOST in h.lower()], (edge.name, status, seen)


def test_another_host_is_served_with_the_same_token(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str]
) -> None:
    """The control for the host tests: the same token and path on another host are allowed."""
    r = http_request(f"{edge.url}/orders", headers={"Host": API_HOST, **bearer(tokens("read"))})

    assert r.status == 200, (edge.name, r.status, r.body)
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("hosts", [(API_HOST, ADMIN_HOST), (ADMIN_HOST, API_HOST)])
def test_two_host_lines_do_not_sidestep_the_admin_hosts_policy(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str], hosts: tuple[str, str]
) -> None:
    """RFC 9112 section 3.2: a request with two Host lines is a 400 (nginx's answer). Envoy joins them into
    one `Host: api.example.test,admin.example.test`, which an upstream may read as either host: a host no virtual
    host serves, refused 421 (the verifier, asked, refused it 403 when the API's was a catch-all)."""
    status = raw_get(edge, "/orders", [("Host", hosts[0]), ("Host", hosts[1]), *bearer(tokens("read")).items()])

    assert status in (400, 403, 421), (edge.name, hosts, status)
    assert upstream.requests == []


@pytest.mark.parametrize(
    "host",
    [
        f"{API_HOST}:1@{ADMIN_HOST}",
        f"{API_HOST}:@{ADMIN_HOST}",
        f"{API_HOST}:80@{ADMIN_HOST}:80",
        f"{API_HOST}:x@{ADMIN_HOST}",
    ],
)
def test_a_host_with_userinfo_naming_the_admin_host_is_not_judged_as_the_api_host(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str], host: str
) -> None:
    """RFC 9110 section 4.2.4: an http(s) authority has no userinfo. `Host: api.example.test:1@admin.example.test`
    names the admin host to an upstream reading it as a URL's authority (Python's urlsplit, WHATWG URL), while a
    gateway that routes `api.example.test:*` (Envoy's port wildcard, a prefix) and the verifier (the name before the
    first `:`) took it for the API host. Refused, or the upstream gets a Host without the admin name."""
    status = raw_get(edge, "/orders", [("Host", host), *bearer(tokens("read")).items()])

    seen = [r.headers.get("host", "") for r in upstream.requests]
    assert not [h for h in seen if ADMIN_HOST in h.lower()], (edge.name, host, status, seen)
    assert status in (200, 400, 403, 421), (edge.name, host, status)


@pytest.mark.parametrize(
    "host", ["admin\u3002example\u3002test", "admin\uff0eexample\uff0etest", "\uff41dmin.example.test"]
)
def test_a_unicode_spelling_of_the_admin_host_does_not_pass_as_another_host(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str], host: str
) -> None:
    """`Host: admin\u3002example\u3002test` (ideographic full stops, UTF-8 on the wire) is admin.example.test to a URL
    parser applying IDNA (WHATWG URL, Python's idna codec); judged as the raw string it met no host policy and fell
    to the laxer catch-all. Refused (nginx and Envoy serve no such host; the verifier reads its A-label, or none), or
    judged under the admin host's policy: never served to a read token."""
    status = raw_get(edge, "/orders", [("Host", host), *bearer(tokens("read")).items()])

    assert status in (400, 403, 421), (edge.name, host, status)
    assert upstream.requests == []


@pytest.mark.parametrize("spoof", ["X-Forwarded-Host", "X-Original-Host"])
def test_a_client_naming_another_host_still_gets_the_admin_hosts_policy(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str], spoof: str
) -> None:
    r = http_request(f"{edge.url}/orders", headers={"Host": ADMIN_HOST, spoof: API_HOST, **bearer(tokens("read"))})

    assert r.status == 403, (edge.name, r.status, r.headers, r.body)
    assert upstream.requests == []


EVIL_HOST = "evil.example"  # a host this gateway does not serve


def test_a_dpop_proof_made_for_another_host_is_refused_whatever_host_the_client_names(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str]
) -> None:
    """RFC 9449: a proof is good for the URL in its `htu` only, and the verifier compares it with the URL the
    gateway reports: scheme://host/path, the host being the one the gateway routed by. A proof made for
    evil.example (on this rig's scheme and port; https://evil.example/orders in production) must be refused
    here: replayed to our host (the verifier sees the htu mismatch), and replayed naming evil.example as the Host,
    which a catch-all server block / "*" virtual host passed to the API: the verifier was told evil.example, the
    htu matched, and the upstream served it (200). Now the gateway refuses a host it does not serve (421)."""
    key = ec.generate_private_key(ec.SECP256R1())
    tok = tokens("read", cnf={"jkt": thumbprint(public_jwk(key))})
    scheme = edge.url.split("://", 1)[0]

    def replayed(host: str) -> int:
        proof = dpop_proof(key, "GET", f"{scheme}://{EVIL_HOST}:{edge.port}/orders", tok)
        return http_request(f"{edge.url}/orders", headers={"Host": host, "Authorization": f"DPoP {tok}",
                                                             "DPoP": proof}).status

    assert replayed(f"{API_HOST}:{edge.port}") == 401, edge.name
    assert replayed(f"{EVIL_HOST}:{edge.port}") == 421, edge.name
    assert replayed(EVIL_HOST) == 421, edge.name
    assert upstream.requests == []
    # the control: a proof for our host passes
    ours = dpop_proof(key, "GET", f"{scheme}://{API_HOST}:{edge.port}/orders", tok)
    r = http_request(f"{edge.url}/orders", headers={"Host": f"{API_HOST}:{edge.port}", "Authorization": f"DPoP {tok}",
                                                     "DPoP": ours})
    assert r.status == 200, (edge.name, r.status, r.body)


def test_a_dpop_proof_for_a_path_does_not_pass_for_that_path_with_a_fragment_naming_another(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str]
) -> None:
    """A stolen proof for GET /orders (RFC 9449: good for its htm and htu alone) was taken for `GET
    /orders#/../profile`: the verifier read the URL it compares with htu from host and target joined, so all after
    the `#` was a fragment, ignored (section 4.3). nginx and Kong pass the `#` on to the upstream, which may read the
    target as /profile (Go's path.Clean on URL.Path): 200, another resource than the proof names (both readings fall
    under one policy, so the route check had nothing to refuse). Now the verifier refuses a target with a `#`
    (invalid_dpop_proof) before looking at the proof, whose jti stays unused: the same proof then passes for its own
    /orders. Envoy refuses such a target itself (400)."""
    key = ec.generate_private_key(ec.SECP256R1())
    tok = tokens("read", cnf={"jkt": thumbprint(public_jwk(key))})
    scheme = edge.url.split("://", 1)[0]
    proof = dpop_proof(key, "GET", f"{scheme}://{API_HOST}:{edge.port}/orders", tok)
    headers = {"Host": f"{API_HOST}:{edge.port}", "Authorization": f"DPoP {tok}", "DPoP": proof}

    status = raw_get(edge, "/orders#/../profile", headers)

    assert status in (400, 401), (edge.name, status, [r.path for r in upstream.requests])
    assert upstream.requests == []
    assert raw_get(edge, "/orders", headers) == 200, edge.name  # the proof was not used up: its own URL passes


@pytest.mark.parametrize("target", ["/orders", f"http://{EVIL_HOST}/orders"])
def test_a_request_for_a_host_the_gateway_does_not_serve_is_refused_unjudged(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str], target: str
) -> None:
    """A Host (or absolute-form target) the shipped configuration does not serve is answered 421 Misdirected
    Request (RFC 9110 section 15.5.20), never judged as if for the API host nor passed to the upstream; before,
    the catch-all API block served it with the verifier judging the client's host name."""
    status = raw_get(edge, target, {"Host": EVIL_HOST, **bearer(tokens("read"))})

    assert status == 421, (edge.name, target, status)
    assert upstream.requests == []


# ------------------------------------------------------------------------------------------------ after the verifier


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Forwarded", f"for=203.0.113.9;host={ADMIN_HOST};proto=https"),
        ("X-Forwarded-Host", ADMIN_HOST),
        ("X-Forwarded-Uri", "/health"),
        ("X-Forwarded-Method", "GET"),
        ("X-Original-URI", "/health"),
    ],
)
def test_a_client_description_of_the_request_never_reaches_the_upstream(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str], name: str, value: str
) -> None:
    """The verifier judged the api host's GET /orders: an application that reads the host, path or scheme from
    RFC 7239 `Forwarded` or X-Forwarded-* (Spring's ForwardedHeaderFilter, Rails, Django's USE_X_FORWARDED_HOST)
    must not be told the client's version of them (nginx clears them all; the gateway sets its own)."""
    r = http_request(f"{edge.url}/orders", headers={"Host": API_HOST, name: value, **bearer(tokens("read"))})

    assert r.status == 200, (edge.name, r.status, r.body)
    (seen,) = upstream.requests
    assert seen.headers.get(name.lower()) != value, (edge.name, seen.headers)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Forwarded-Method", "DELETE"),
        ("X_Forwarded_Method", "DELETE"),
        ("X_Forwarded_Uri", "/health"),
        ("X_Forwarded_Host", ADMIN_HOST),
        ("X_Forwarded_Proto", "https"),
        ("X_Forwarded_Port", "8443"),
    ],
)
def test_the_clients_words_for_what_the_verifier_is_told_never_reach_the_upstream(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str], name: str, value: str
) -> None:
    """X-Forwarded-Method/-Uri/-Host/-Proto/-Port are how a forward-auth gateway tells the verifier the request. The
    upstream (or a second verifier hop behind it) that reads them must get the gateway's, or none: never the
    client's, in any spelling (CGI-style frameworks read X_Forwarded_Host as X-Forwarded-Host). Kong sets the
    dashed -Host/-Proto/-Port itself (test_a_client_description_of_the_request_never_reaches_the_upstream covers
    them for nginx and Envoy); it never sets X-Forwarded-Method, which the Kong plugins passed on as the client
    wrote it, with every underscore spelling."""
    r = http_request(f"{edge.url}/orders", headers={"Host": API_HOST, name: value, **bearer(tokens("read"))})

    assert r.status == 200, (edge.name, r.status, r.body)
    (seen,) = upstream.requests
    as_cgi = name.lower().replace("_", "-")
    told = [(n, v) for n, v in seen.headers.items() if n.lower().replace("_", "-") == as_cgi and value in v]
    assert not told, (edge.name, seen.headers)


@pytest.mark.parametrize("override", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"])
def test_a_method_override_never_reaches_the_upstream(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str], override: str
) -> None:
    """The verifier judged a GET with a read-only token; the application must not be told to DELETE."""
    r = http_request(f"{edge.url}/orders", headers={override: "DELETE", **bearer(tokens("read"))})

    assert r.status == 200, (edge.name, r.status, r.body)
    (seen,) = upstream.requests
    assert seen.method == "GET"
    assert override.lower() not in seen.headers, seen.headers


@pytest.mark.parametrize("spoof", ["X-Original-URL", "X-Original-URI", "X-Rewrite-URL", "X-Forwarded-Uri"])
def test_a_client_named_request_target_never_reaches_the_upstream(
    edge: Edge, upstream: EchoUpstream, spoof: str
) -> None:
    """The verifier judged the public /health; an application that takes its path from one of these headers
    instead of the request line (IIS behind ARR, Symfony and Zend Framework before CVE-2018-14773's fixes read
    X-Original-URL and X-Rewrite-URL) must not be told /admin/secret by the client."""
    r = http_request(f"{edge.url}/health", headers={spoof: "/admin/secret"})

    assert r.status == 200, (edge.name, r.status, r.body)
    (seen,) = upstream.requests
    assert seen.headers.get(spoof.lower()) != "/admin/secret", (edge.name, seen.headers)


# ------------------------------------------------------------------------------------------------ a real certificate


@dataclass(frozen=True, kw_only=True)
class Pki:
    """PEM files: a CA, Envoy's server certificate for 127.0.0.1, two client certificates of that CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    clients: tuple[tuple[Path, Path, str], ...]  # (cert, key, x5t#S256)


def _issue(
    subject: str, issuer_key: ec.EllipticCurvePrivateKey | None, issuer_name: x509.Name | None, *, ca: bool = False
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256()), key


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(Encoding.PEM))
    key_path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key = _issue("test CA", None, None, ca=True)
    ca_path, _ = _write(directory, "ca", ca_cert, ca_key)
    server_cert, server_key = _write(directory, "server", *_issue(LOOPBACK, ca_key, ca_cert.subject))
    clients = []
    for name in ("client-a", "client-b"):
        cert, key = _issue(name, ca_key, ca_cert.subject)
        clients.append((*_write(directory, name, cert, key), thumbprint_from_der(cert.public_bytes(Encoding.DER))))
    return Pki(ca=ca_path, server_cert=server_cert, server_key=server_key, clients=tuple(clients))


@pytest.fixture(scope="module")
def envoy_mtls(
    pki: Pki, verifier: GatewayProcess, upstream: EchoUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """The gRPC template with the mutual-TLS listener its header comment describes."""
    gw = start_envoy(
        tmp_path_factory.mktemp("envoy-mtls"),
        "grpc",
        verifier_grpc_port=verifier.extra["grpc_port"],
        upstream_port=upstream.port,
        downstream_tls={"cert_file": str(pki.server_cert), "key_file": str(pki.server_key), "ca_file": str(pki.ca)},
    )
    yield gw
    gw.stop()


def https_get(gw: GatewayProcess, pki: Pki, headers: dict[str, str], client: int | None) -> int:
    """GET /orders over TLS, presenting client certificate number `client` (or none); the status."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client is not None:
        cert, key, _ = pki.clients[client]
        context.load_cert_chain(str(cert), str(key))
    conn = http.client.HTTPSConnection(LOOPBACK, int(gw.url.rsplit(":", 1)[1]), context=context, timeout=10)
    try:
        conn.request("GET", "/orders", headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_a_certificate_bound_token_passes_with_its_certificate_through_envoy_grpc(
    envoy_mtls: GatewayProcess, pki: Pki, upstream: EchoUpstream, tokens: Callable[..., str]
) -> None:
    """The control for the thumbprint tests: the declared source (`source.certificate`) does work."""
    token = tokens(cnf={"x5t#S256": pki.clients[0][2]})

    status = https_get(envoy_mtls, pki, bearer(token), client=0)

    assert status == 200
    (seen,) = upstream.requests
    assert seen.headers["x-authenticated-userid"] == "alice"


def test_a_certificate_bound_token_with_another_certificate_is_refused(
    envoy_mtls: GatewayProcess, pki: Pki, upstream: EchoUpstream, tokens: Callable[..., str]
) -> None:
    token = tokens(cnf={"x5t#S256": pki.clients[0][2]})
    spoof = {**bearer(token), "X-Client-Cert-Thumbprint": pki.clients[0][2]}

    other = https_get(envoy_mtls, pki, spoof, client=1)
    none = https_get(envoy_mtls, pki, spoof, client=None)

    assert (other, none) == (401, 401)
    assert upstream.requests == []
