"""The two Kong plugins make the same trust decisions: ONE corpus of hostile requests, sent through the Lua plugin
(kong/plugins/edge-verifier, the forward-auth door) and the Python plugin (kong/python/edge_verifier.py under its
REAL plugin server, the gRPC door), each in the Kong rig (real nginx with Kong's `underscores_in_headers on` and
`large_client_header_buffers`, the PDK shim: conftest.py, python_edge.py), against the same REAL verifier and its
policies (test_trust_boundary.py's: a public /health, the admin host and /admin needing the `admin` role, GET under
/reports the `auditor` role, writes the `write` scope).

For every request both plugins must give the client the same status (and, on a refusal, the same headers and body:
challenge, reason), hand the upstream the same request (method, target, headers) and Kong the same credential, and
the outcome must be the one the verifier's rules give (`expect`): neither lets through what the verifier refuses.
Whatever a client sends in the `X-Authenticated-*` family never reaches the upstream. A future divergence between
the plugins fails here.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from gateways import LOOPBACK, EchoUpstream, GatewayProcess, LocalIssuer, http_request, start_verifier
from python_edge import pluginserver, start_python_plugin  # noqa: F401 - fixtures, requested by name
from replicas import dpop_proof, public_jwk
from rigs import (  # noqa: F401 - fixtures, requested by name (fresh_upstream_log: autouse here too)
    fresh_upstream_log,
    issuer,
    upstream,
)
from test_python_plugin import PluginServer
from test_trust_boundary import (  # noqa: F401 - fixtures, requested by name
    ADMIN_HOST,
    API_HOST,
    BOUND_THUMBPRINT,
    POLICIES,
    tokens,
    verifier,
)

from verifier.binding.dpop import thumbprint

pytestmark = pytest.mark.integration

# What a client sends in the identity family: never what the upstream gets.
SPOOFED = "spoofed-by-client"
ALLOW = (200,)
REFUSED = (400, 401, 403)
# Upstream headers that describe the connection (nginx's to the upstream), not the request.
CONNECTION_HEADERS = frozenset({"connection", "content-length"})


@dataclass(frozen=True)
class Case:
    """One hostile request: `target` as sent on the request line, `headers` line by line (a name may repeat),
    "{token}" / "{admin}" / "{write}" / "{auditor}" / "{dpop}" / "{proof}" / "{mtls}" in a value replaced by a
    credential (`credentials`), "{port}" by the rig's port; `expect` the statuses the verifier's rules give."""

    id: str
    target: str
    headers: tuple[tuple[str, str], ...]
    expect: tuple[int, ...]
    method: str = "GET"
    host: str | None = API_HOST  # a Host line first (None: the case's headers say it)
    cleared: tuple[str, ...] = ()  # upstream header names (lower case) the plugins must clear
    # why the two may refuse with different statuses (both must refuse, and neither reach the upstream); "" = not
    differs: str = ""


def _h(*pairs: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return pairs


BEARER = ("Authorization", "Bearer {token}")
# The one difference left: the forward-auth door reads at most 32 KiB of a question's headers (docs/NGINX.md, "How
# large a request may be") and answers 431 past it, which the Lua plugin relays; the gRPC door has no such bound and
# judges the credential (401). Only credentials past the verifier's own bounds (`max_token_bytes`,
# `dpop.max_proof_bytes`: 8 KiB each) with a long target reach it: refused either way.
DOOR_BYTES = "the forward-auth door's 431 past 32 KiB of credentials and target; the gRPC door judges them (401)"
MANY = 1000  # both plugins read at most this many header lines (MAX_REQUEST_HEADERS): a request with more is refused

CORPUS: list[Case] = [
    # ---- Authorization: one credential per request; two are a request the verifier refuses, never one picked (two
    # Authorization lines are nginx's own 400, Kong's too: a unique header; a comma-joined one reaches the plugins)
    Case("authorization-twice-same", "/orders", _h(BEARER, BEARER), REFUSED),
    Case("authorization-twice-good-then-junk", "/orders", _h(BEARER, ("Authorization", "Bearer junk")), REFUSED),
    Case("authorization-twice-junk-then-good", "/orders", _h(("Authorization", "Bearer junk"), BEARER), REFUSED),
    Case("authorization-twice-read-then-admin", "/admin/secret", _h(BEARER, ("Authorization", "Bearer {admin}")),
         REFUSED),
    Case("authorization-comma-joined", "/orders", _h(("Authorization", "Bearer {token}, Bearer junk")), REFUSED),
    Case("authorization-comma-joined-twice-same", "/orders", _h(("Authorization", "Bearer {token}, Bearer {token}")),
         REFUSED),
    Case("authorization-bearer-lower-case", "/orders", _h(("authorization", "bearer {token}")), ALLOW),
    Case("authorization-name-odd-case", "/orders", _h(("AuThOrIzAtIoN", "Bearer {token}")), ALLOW),
    Case("authorization-underscore-name", "/orders", _h(("Authori_zation", "Bearer {token}")), (401,)),
    Case("authorization-empty-then-good", "/orders", _h(("Authorization", ""), BEARER), REFUSED),
    Case("authorization-long-junk", "/orders", _h(("Authorization", "Bearer " + "a" * 9000)), REFUSED),
    # ---- DPoP: one proof per request
    Case("dpop-proof", "/orders", _h(("Authorization", "DPoP {dpop}"), ("DPoP", "{proof}")), ALLOW),
    Case("dpop-proof-twice", "/orders", _h(("Authorization", "DPoP {dpop}"), ("DPoP", "{proof}"), ("DPoP", "{proof}")),
         REFUSED),
    Case("dpop-proof-then-junk", "/orders", _h(("Authorization", "DPoP {dpop}"), ("DPoP", "{proof}"), ("DPoP", "x")),
         REFUSED),
    Case("dpop-proof-comma-joined", "/orders", _h(("Authorization", "DPoP {dpop}"), ("DPoP", "{proof}, {proof}")),
         REFUSED),
    Case("dpop-name-odd-case", "/orders", _h(("Authorization", "DPoP {dpop}"), ("dPoP", "{proof}")), ALLOW),
    Case("dpop-bound-token-as-bearer", "/orders", _h(("Authorization", "Bearer {dpop}")), REFUSED),
    Case("bearer-with-stray-dpop", "/orders", _h(BEARER, ("DPoP", "junk")), ALLOW),  # an unbound token: no proof read
    # ---- the forwarding family the plugins tell the verifier: the client's is never what is judged nor passed on
    Case("forwarded-uri-twice-public", "/admin/secret",
         _h(BEARER, ("X-Forwarded-Uri", "/health"), ("X-Forwarded-Uri", "/health")), (403,),
         cleared=("x-forwarded-uri",)),
    Case("forwarded-uri-comma-public-no-token", "/admin/secret", _h(("X-Forwarded-Uri", "/health, /health")), (401,)),
    Case("forwarded-uri-public", "/orders", _h(BEARER, ("X-Forwarded-Uri", "/health")), ALLOW,
         cleared=("x-forwarded-uri",)),
    Case("forwarded-method-twice-safe", "/orders",
         _h(BEARER, ("X-Forwarded-Method", "GET"), ("X-Forwarded-Method", "GET")), (403,), method="POST"),
    Case("forwarded-method-comma", "/orders", _h(BEARER, ("X-Forwarded-Method", "GET, HEAD")), ALLOW,
         cleared=("x-forwarded-method",)),
    Case("forwarded-host-twice-admin", "/orders",
         _h(BEARER, ("X-Forwarded-Host", ADMIN_HOST), ("X-Forwarded-Host", ADMIN_HOST)), ALLOW),
    Case("forwarded-host-admin-no-admin-role", "/orders", _h(BEARER, ("X-Forwarded-Host", API_HOST)), (403,),
         host=ADMIN_HOST),
    Case("forwarded-proto-port-for", "/orders",
         _h(BEARER, ("X-Forwarded-Proto", "https"), ("X-Forwarded-Proto", "http"), ("X-Forwarded-Port", "443"),
            ("X-Forwarded-Port", "1"), ("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-For", "127.0.0.1")),
         ALLOW),
    Case("forwarded-prefix-path", "/orders",
         _h(BEARER, ("X-Forwarded-Prefix", "/admin"), ("X-Forwarded-Path", "/admin")), ALLOW),
    Case("x-original-family", "/admin/secret",
         _h(BEARER, ("X-Original-URI", "/health"), ("X-Original-URL", "/health"), ("X-Original-Method", "GET"),
            ("X-Original-Host", API_HOST)),
         (403,)),
    Case("x-original-family-passes-cleared", "/orders",
         _h(BEARER, ("X-Original-URI", "/admin"), ("X-Original-URL", "/admin"), ("X-Rewrite-URL", "/admin"),
            ("X-Original-Method", "DELETE"), ("X-Original-Host", ADMIN_HOST)),
         ALLOW, cleared=("x-original-uri", "x-original-url", "x-rewrite-url", "x-original-method", "x-original-host")),
    Case("rfc7239-forwarded", "/orders",
         _h(BEARER, ("Forwarded", f"for=10.0.0.1;host={ADMIN_HOST};proto=https"), ("Forwarded", "for=127.0.0.1")),
         ALLOW),
    Case("rfc7239-forwarded-on-admin", "/orders", _h(BEARER, ("Forwarded", f"host={API_HOST}")), (403,),
         host=ADMIN_HOST),
    # ---- names with underscores or odd case (Kong's nginx has underscores_in_headers on)
    Case("forwarded-uri-underscore", "/orders", _h(BEARER, ("X_Forwarded_Uri", "/admin")), ALLOW,
         cleared=("x_forwarded_uri",)),
    Case("forwarded-host-underscore", "/orders", _h(BEARER, ("x_forwarded_host", ADMIN_HOST)), ALLOW,
         cleared=("x_forwarded_host",)),
    Case("forwarded-method-odd-case", "/orders", _h(BEARER, ("x-FORWARDED-method", "GET")), (403,), method="DELETE"),
    Case("method-override-underscore", "/orders", _h(BEARER, ("X_HTTP_Method_Override", "DELETE")), ALLOW,
         cleared=("x_http_method_override",)),
    Case("original-url-underscore", "/orders", _h(BEARER, ("X_Original_URL", "/admin")), ALLOW,
         cleared=("x_original_url",)),
    Case("rewrite-url-odd-case", "/orders", _h(BEARER, ("x-REWRITE-url", "/admin")), ALLOW, cleared=("x-rewrite-url",)),
    # ---- very long and very many headers
    Case("long-header", "/orders", _h(BEARER, ("X-Filler", "f" * 12000)), ALLOW),
    # (the header lines a request has: Host, Authorization, the fillers and Connection; short ones, so that nginx's
    # buffers take them all)
    Case("many-headers-below-limit", "/orders", _h(BEARER, *[("X-F", "1")] * (MANY - 4)), ALLOW),
    Case("many-headers-at-limit", "/orders", _h(BEARER, *[("X-F", "1")] * (MANY - 3)), (400,)),
    Case("many-headers-past-limit", "/orders", _h(BEARER, *[("X-F", "1")] * (MANY - 2)), (400,)),
    Case("many-headers-spoof-last", "/orders", _h(BEARER, *[("X-F", "1")] * MANY, ("X-Authenticated-Userid", SPOOFED)),
         (400,)),
    Case("authorization-many", "/orders", _h(*[BEARER] * 130), REFUSED),
    Case("dpop-many", "/orders", _h(("Authorization", "DPoP {dpop}"), *[("DPoP", "x")] * 130), REFUSED),
    # (no step-up on this route: the verifier reads no assertion, however many)
    Case("webauthn-assertion-twice", "/orders",
         _h(BEARER, ("X-WebAuthn-Assertion", "e30"), ("X-WebAuthn-Assertion", "e30")), ALLOW),
    Case("identity-header-long-name", "/orders", _h(BEARER, ("X-Authenticated-" + "a" * 8000, SPOOFED)), ALLOW),
    Case("credentials-past-the-doors-bytes", "/orders/" + "p" * 12000,
         _h(("Authorization", "Bearer " + "a" * 12000), ("DPoP", "d" * 12000)), (*REFUSED, 431), differs=DOOR_BYTES),
    Case("credentials-within-the-doors-bytes", "/orders/" + "p" * 12000,
         _h(("Authorization", "Bearer " + "a" * 9000), ("DPoP", "d" * 9000)), REFUSED),
    Case("long-target", "/orders/" + "p" * 12000, _h(BEARER), ALLOW),
    Case("authorization-empty", "/orders", _h(("Authorization", "")), (401,)),
    # ---- bytes that are not UTF-8 (Latin-1)
    Case("authorization-latin1", "/orders", _h(("Authorization", "Bearer {token}\xe4")), (400,)),
    Case("dpop-latin1", "/orders", _h(("Authorization", "DPoP {dpop}"), ("DPoP", "{proof}\xe4")), (400,)),
    Case("webauthn-assertion-latin1", "/orders", _h(BEARER, ("X-WebAuthn-Assertion", "e30\xe4")), (400,)),
    Case("target-latin1", "/orders/\xe4", _h(BEARER), (400,)),
    Case("target-latin1-public", "/health?q=\xe4", _h(), (400,)),
    Case("target-utf8", "/orders/\xc3\xa4", _h(BEARER), ALLOW),
    Case("target-overlong-utf8", "/orders/\xc0\xaf", _h(BEARER), (400,)),
    Case("target-surrogate-utf8", "/orders/\xed\xa0\x80", _h(BEARER), (400,)),
    Case("host-latin1", "/orders", _h(BEARER, ("Host", "api.ex\xe4mple.test")), (400,), host=None),
    Case("identity-latin1", "/orders", _h(BEARER, ("X-Authenticated-Userid", SPOOFED + "\xe4")), ALLOW),
    Case("other-header-latin1", "/orders", _h(BEARER, ("User-Agent", "M\xfcller")), ALLOW),
    # ---- Host
    Case("host-with-port", "/orders", _h(BEARER, ("Host", f"{API_HOST}:8443")), ALLOW, host=None),
    Case("host-admin-with-port", "/orders", _h(BEARER, ("Host", f"{ADMIN_HOST}:{{port}}")), (403,), host=None),
    Case("host-admin-trailing-dot", "/orders", _h(BEARER, ("Host", f"{ADMIN_HOST}.")), (403,), host=None),
    Case("host-admin-trailing-dot-port", "/orders", _h(BEARER, ("Host", f"{ADMIN_HOST}.:80")), (403,), host=None),
    Case("host-admin-upper-case", "/orders", _h(BEARER, ("Host", ADMIN_HOST.upper())), (403,), host=None),
    Case("host-userinfo-admin", "/orders", _h(BEARER, ("Host", f"{API_HOST}@{ADMIN_HOST}")), REFUSED, host=None),
    Case("host-userinfo-api", "/orders", _h(BEARER, ("Host", f"{ADMIN_HOST}@{API_HOST}")), REFUSED, host=None),
    Case("host-ipv6-literal", "/orders", _h(BEARER, ("Host", "[::1]:80")), ALLOW, host=None),
    Case("host-empty-port", "/orders", _h(BEARER, ("Host", f"{ADMIN_HOST}:")), (403,), host=None),
    Case("host-absent", "/orders", _h(BEARER), (400,), host=None),  # nginx: HTTP/1.1 needs a Host
    Case("host-twice", "/orders", _h(BEARER, ("Host", API_HOST), ("Host", ADMIN_HOST)), (400,), host=None),
    Case("host-admin-admin-role", "/orders", _h(("Authorization", "Bearer {admin}")), ALLOW, host=ADMIN_HOST),
    # ---- request targets
    Case("target-encoded-slash", "/admin%2Fsecret", _h(BEARER), REFUSED),
    Case("target-encoded-dot-dot", "/health/%2e%2e/admin/secret", _h(), REFUSED),
    Case("target-encoded-dot-dot-upper", "/admin/secret/%2E%2E/%2E%2E/health", _h(), REFUSED),
    Case("target-dot-dot", "/admin/secret/../../health", _h(), REFUSED),
    Case("target-params", "/admin;x=1/secret", _h(BEARER), REFUSED),
    Case("target-params-dot-dot", "/health;/../admin/secret", _h(), REFUSED),
    Case("target-double-slash", "//admin/secret", _h(BEARER), REFUSED),
    Case("target-double-slash-public", "//health", _h(), (200, 400, 401)),
    Case("target-backslash", "/admin\\secret", _h(BEARER), REFUSED),
    Case("target-backslash-dot-dot", "/admin/secret\\..\\..\\health", _h(), REFUSED),
    Case("target-encoded-backslash", "/admin/secret%5C..%5C..%5Chealth", _h(), REFUSED),
    Case("target-absolute-form-admin", f"http://{ADMIN_HOST}/orders", _h(BEARER), REFUSED),
    Case("target-absolute-form-api-on-admin-host", f"http://{API_HOST}/orders", _h(BEARER), REFUSED, host=ADMIN_HOST),
    Case("target-absolute-form-api", f"http://{API_HOST}/orders", _h(BEARER), ALLOW),
    Case("target-absolute-form-public", f"http://{API_HOST}/health", _h(), ALLOW),
    Case("target-query-public", "/admin/secret?/health", _h(), (401,)),
    Case("target-public", "/health", _h(), ALLOW),
    # ---- methods
    Case("method-override-get-on-post", "/orders", _h(BEARER, ("X-HTTP-Method-Override", "GET")), (403,),
         method="POST"),
    Case("method-override-delete-on-get", "/orders",
         _h(BEARER, ("X-HTTP-Method-Override", "DELETE"), ("X-HTTP-Method", "DELETE"), ("X-Method-Override", "PUT")),
         ALLOW, cleared=("x-http-method-override", "x-http-method", "x-method-override")),
    Case("method-override-twice", "/orders",
         _h(BEARER, ("X-HTTP-Method-Override", "DELETE"), ("x-http-method-override", "PATCH")), ALLOW,
         cleared=("x-http-method-override",)),
    Case("head-reports", "/reports/q1", _h(BEARER), (403,), method="HEAD"),
    Case("get-reports", "/reports/q1", _h(BEARER), (403,)),
    Case("head-reports-auditor", "/reports/q1", _h(("Authorization", "Bearer {auditor}")), ALLOW, method="HEAD"),
    Case("head-orders", "/orders", _h(BEARER), ALLOW, method="HEAD"),
    Case("post-write", "/orders", _h(("Authorization", "Bearer {write}")), ALLOW, method="POST"),
    Case("post-read", "/orders", _h(BEARER), (403,), method="POST"),
    Case("lower-case-method", "/orders", _h(BEARER), (*REFUSED, 405), method="delete"),
    Case("method-options", "/orders", _h(BEARER), ALLOW, method="OPTIONS"),
    Case("method-patch-read", "/orders", _h(BEARER), (403,), method="PATCH"),
    Case("method-trace", "/orders", _h(BEARER), (*REFUSED, 405, 200), method="TRACE"),
    # ---- spacing and encoding inside values and targets
    Case("authorization-double-space", "/orders", _h(("Authorization", "Bearer  {token}")), (*REFUSED, *ALLOW)),
    Case("authorization-tab", "/orders", _h(("Authorization", "Bearer\t{token}")), (*REFUSED, *ALLOW)),
    Case("authorization-trailing-space", "/orders", _h(("Authorization", "Bearer {token}   ")), ALLOW),
    Case("target-encoded-nul", "/orders%00/admin", _h(BEARER), (*REFUSED, 200)),
    Case("target-admin-encoded-nul", "/admin%00/secret", _h(BEARER), REFUSED),
    Case("target-long-query", "/orders?" + "q=1&" * 2000, _h(BEARER), ALLOW),
    Case("target-query-repeated", "/admin/secret?x=1&x=/health", _h(BEARER), (403,)),
    Case("client-cert-thumbprint-spoof", "/orders", _h(("Authorization", "Bearer {mtls}"),
                                                       ("X-Client-Cert-Thumbprint", BOUND_THUMBPRINT)), (401,)),
    Case("forwarded-for-many", "/orders", _h(BEARER, ("X-Forwarded-For", ", ".join(["10.0.0.1"] * 500))), ALLOW),
    # ---- the identity family from the client
    Case("client-identity", "/orders",
         _h(BEARER, ("X-Authenticated-Userid", SPOOFED), ("X-Authenticated-Roles", SPOOFED),
            ("X-Authenticated-Scope", SPOOFED), ("X-Authenticated-Identity", SPOOFED),
            ("X-Authenticated-Foo", SPOOFED)),
         ALLOW),
    Case("client-identity-repeated", "/orders",
         _h(BEARER, ("X-Authenticated-Userid", SPOOFED), ("x-authenticated-userid", SPOOFED),
            ("X-AUTHENTICATED-USERID", SPOOFED)),
         ALLOW),
    Case("client-identity-underscore", "/orders",
         _h(BEARER, ("X_Authenticated_Userid", SPOOFED), ("x_authenticated_roles", SPOOFED),
            ("X-Authenticated_Scope", SPOOFED)),
         ALLOW),
    Case("client-identity-admin-role", "/admin/secret", _h(BEARER, ("X-Authenticated-Roles", "admin")), (403,)),
    Case("client-identity-no-token", "/health",
         _h(("X-Authenticated-Userid", SPOOFED), ("X_Authenticated_Roles", SPOOFED)), ALLOW),
    Case("client-identity-no-token-protected", "/orders", _h(("X-Authenticated-Userid", SPOOFED)), (401,)),
    Case("client-consumer-headers", "/orders",
         _h(BEARER, ("X-Consumer-Username", SPOOFED), ("X-Consumer-ID", SPOOFED), ("X-Consumer-Groups", SPOOFED),
            ("X-Kong-Consumer-Username", SPOOFED), ("X_Consumer_Username", SPOOFED),
            ("X-Credential-Identifier", SPOOFED), ("X-Anonymous-Consumer", SPOOFED)),
         ALLOW),
    Case("client-consumer-headers-public", "/health",
         _h(("X-Consumer-Username", SPOOFED), ("X-Consumer-Groups", SPOOFED), ("X_Consumer_ID", SPOOFED)), ALLOW),
]  # fmt: skip


# ------------------------------------------------------------------------------------------------ the two rigs


@dataclass
class Seen:
    """What one plugin's rig made of a request: the client's answer and the upstream's requests (none: not reached)."""

    status: int
    answer_headers: dict[str, str]
    body: bytes
    upstream: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    # what Kong's plugins after this one key on: the consumer and credential it authenticated (rate-limiting's
    # `limit_by: credential` / `consumer`, the log serializer's `authenticated_entity`)
    authenticated: list[tuple[Any, Any]] = field(default_factory=list)


def _start_rigs(
    start_nginx: Any, server: PluginServer, v: GatewayProcess, upstream_port: int, consumers: tuple[dict[str, Any], ...]
) -> dict[str, int]:
    """Both plugins' rigs in front of verifier `v` and the upstream, as Kong runs them (`underscores_in_headers on`,
    Kong's nginx template; `consumers` Kong's datastore), the Lua plugin with answer reuse off: every request reaches
    the verifier. Name -> port."""
    lua = start_nginx({"url": f"{v.url}/v1/forward-auth", "cache_entries": 0}, upstream_port,
                      underscores_in_headers=True, consumers=consumers)  # fmt: skip
    python = start_python_plugin(start_nginx, server, v, upstream_port, consumers=consumers)  # (underscores: on)
    return {"lua": int(lua.rsplit(":", 1)[1]), "python": int(python.rsplit(":", 1)[1])}


@pytest.fixture
def rigs(
    start_nginx: Any,
    pluginserver: PluginServer,  # noqa: F811 - the imported fixture, requested by name
    verifier: GatewayProcess,  # noqa: F811
    upstream: EchoUpstream,  # noqa: F811
) -> dict[str, int]:
    """Both plugins' rigs in front of test_trust_boundary.py's verifier (no consumers named)."""
    return _start_rigs(start_nginx, pluginserver, verifier, upstream.port, ())


def _fill(value: str, creds: dict[str, str], port: int) -> str:
    for name, cred in creds.items():
        value = value.replace("{" + name + "}", cred)
    return value.replace("{port}", str(port))


def _send(port: int, method: str, target: str, headers: list[tuple[str, str]]) -> tuple[int, dict[str, str], bytes]:
    """One request, its request line and header lines byte for byte (a name may repeat); status, headers (names
    lower-cased, repeated ones comma-joined), body."""
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers), "Connection: close", "", ""]
    with socket.create_connection((LOOPBACK, port), timeout=15) as sock:
        sock.sendall("\r\n".join(lines).encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    answer: dict[str, str] = {}
    for f in fields:
        name, _, value = f.partition(":")
        key = name.strip().lower()
        answer[key] = f"{answer[key]}, {value.strip()}" if key in answer else value.strip()
    return int(status_line.split()[1]), answer, body


def _through(port: int, case: Case, creds: dict[str, str], echo: EchoUpstream) -> Seen:
    echo.clear()
    headers = [("Host", case.host)] if case.host else []
    headers += [(k, _fill(v, creds, port)) for k, v in case.headers]
    status, answer, body = _send(port, case.method, _fill(case.target, creds, port), headers)
    seen = [
        (r.method, r.path, {k: v for k, v in r.headers.items() if k not in CONNECTION_HEADERS}) for r in echo.requests
    ]
    report = json.loads(http_request(f"http://{LOOPBACK}:{port}/__shim/authenticated").body)
    authenticated = [(c["consumer"], c["credential"]) for c in report["calls"]]
    return Seen(status=status, answer_headers=answer, body=body, upstream=seen, authenticated=authenticated)


@pytest.fixture
def credentials(tokens: Callable[..., str]) -> Callable[..., dict[str, str]]:  # noqa: F811
    """Credentials for one request through the rig on `port`: a fresh DPoP proof for `method` `path` (single-use, and
    naming the rig's host and port) beside the tokens."""
    key = ec.generate_private_key(ec.SECP256R1())
    dpop = tokens("read", cnf={"jkt": thumbprint(public_jwk(key))})
    fixed = {
        "token": tokens("read"),
        "admin": tokens("read", roles=["admin"]),
        "write": tokens("read write"),
        "auditor": tokens("read", roles=["auditor"]),
        "dpop": dpop,
        "mtls": tokens("read", cnf={"x5t#S256": BOUND_THUMBPRINT}),
    }

    def make(port: int, method: str = "GET", path: str = "/orders") -> dict[str, str]:
        return {**fixed, "proof": dpop_proof(key, method, f"http://{API_HOST}:{port}{path}", dpop)}

    return make


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_both_plugins_decide_the_same(
    case: Case,
    rigs: dict[str, int],
    credentials: Callable[..., dict[str, str]],
    upstream: EchoUpstream,  # noqa: F811
) -> None:
    seen: dict[str, Seen] = {}
    for name, port in rigs.items():
        creds = credentials(port, case.method.upper(), case.target.split("?")[0])
        # a DPoP proof names the host the rig is reached on: the same request, for either rig
        seen[name] = _through(port, case, creds, upstream)
    lua, python = seen["lua"], seen["python"]

    # the verifier's rule, through either plugin
    for name, s in seen.items():
        assert s.status in case.expect, (name, s.status, s.answer_headers, s.body[:300])
        assert bool(s.upstream) == (s.status in ALLOW), (name, s.status, s.upstream)
        for _method, _path, headers in s.upstream:
            leaked = {k: v for k, v in headers.items() if SPOOFED in v}
            assert not leaked, (name, leaked)
            assert not [k for k in case.cleared if k in headers], (name, headers)

    # the same outcome through both
    assert _comparable(lua.upstream, rigs["lua"]) == _comparable(python.upstream, rigs["python"])
    assert lua.authenticated == python.authenticated
    if case.differs:
        assert lua.status not in ALLOW and python.status not in ALLOW, case.differs
        return
    assert lua.status == python.status, (lua.status, lua.body[:300], python.status, python.body[:300])
    if lua.status not in ALLOW:  # a refusal: the same answer, headers and body
        assert _answer(lua) == _answer(python)


def _comparable(requests: list[tuple[str, str, dict[str, str]]], port: int) -> list[tuple[str, str, dict[str, str]]]:
    """The upstream's requests with the rig's own port (in Host, and in a DPoP proof's htu) out of the way."""
    out = []
    for method, path, headers in requests:
        h = {k: v.replace(f":{port}", ":PORT") for k, v in headers.items() if k != "dpop"}
        out.append((method, path, h))
    return out


def _answer(seen: Seen) -> tuple[dict[str, str], Any]:
    """A refusal as the client reads it: its headers (but what nginx writes itself) and its body (JSON parsed)."""
    headers = {
        k: v for k, v in seen.answer_headers.items() if k not in ("date", "server", "connection", "content-length")
    }
    try:
        body: Any = json.loads(seen.body) if seen.body else None
    except ValueError:
        body = seen.body
    return headers, body


# ------------------------------------------------------------------------------------------------ Kong consumers

ALICE = {"id": "0b7f2b4e-3c1e-4a57-9d0e-5a1f6f0a0001", "username": "alice", "custom_id": "cust-1"}
MALLORY = {"id": "0b7f2b4e-3c1e-4a57-9d0e-5a1f6f0a0002", "username": "mallory", "custom_id": "cust-2"}


@pytest.fixture(scope="module")
def naming_verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:  # noqa: F811
    """The verifier naming the Kong consumer by the token's `sub` (`upstream.consumer`, by username)."""
    proc = start_verifier(tmp_path_factory.mktemp("naming"), issuer=issuer.issuer, extra_config={
        "policies": POLICIES, "upstream": {"consumer": {"claim": "sub", "by": "username"}}})  # fmt: skip
    yield proc
    proc.stop()


@pytest.mark.parametrize(
    "sub",
    [
        "alice",  # a consumer Kong knows: authenticated, with Kong's X-Consumer-* headers
        "bob",  # one it does not: refused (consumer_not_found: refuse)
        ALICE["id"],  # another consumer's id: not that consumer
        "Alice",  # another case of a username
        # names that reached the gateway as another's: `alice` (the forward-auth door's header lost the space, so the
        # Lua plugin authenticated alice, the Python plugin refused) and `mallory` (the verifier stripped the NUL:
        # both authenticated mallory); the verifier now refuses them (upstream_consumer_unnamable)
        "alice ",
        "mallory\u0000",
    ],
)
def test_both_plugins_name_the_same_consumer(
    sub: str,
    start_nginx: Any,
    pluginserver: PluginServer,  # noqa: F811
    naming_verifier: GatewayProcess,
    upstream: EchoUpstream,  # noqa: F811
    issuer: LocalIssuer,  # noqa: F811
) -> None:
    """The verifier names a consumer (`X-Kong-Consumer-Username`); both plugins find the same one, or refuse alike,
    and a client's X-Consumer-* never stands in for it."""
    rigs = _start_rigs(start_nginx, pluginserver, naming_verifier, upstream.port, (ALICE, MALLORY))
    token = issuer.mint(sub=sub, scope="read")
    spoof = (("X-Consumer-Username", "mallory"), ("X-Consumer-ID", MALLORY["id"]), ("X-Kong-Consumer-Username", "x"))
    case = Case(f"consumer-{sub}", "/orders", _h(("Authorization", f"Bearer {token}"), *spoof), (200, 403))
    seen = {name: _through(port, case, {}, upstream) for name, port in rigs.items()}

    assert seen["lua"].status == seen["python"].status, (seen["lua"].body[:300], seen["python"].body[:300])
    assert seen["lua"].status == (200 if sub == "alice" else 403), seen["lua"].body[:300]
    if sub.strip() != sub or not sub.isprintable():
        assert seen["lua"].answer_headers["x-verifier-reason"] == "upstream_consumer_unnamable"
    assert _comparable(seen["lua"].upstream, rigs["lua"]) == _comparable(seen["python"].upstream, rigs["python"])
    assert seen["lua"].authenticated == seen["python"].authenticated
    if sub == "alice":
        (consumer, _), *_ = seen["lua"].authenticated
        assert consumer["id"] == ALICE["id"]
        (_, _, headers), *_ = seen["lua"].upstream
        assert headers["x-consumer-username"] == "alice" and headers["x-consumer-id"] == ALICE["id"]
