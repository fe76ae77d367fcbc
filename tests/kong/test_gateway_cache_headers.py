"""The verifier's reuse directives are for the GATEWAY: never the client's, never the upstream's. Every shipped
configuration: nginx (auth_request, and its Lua variant), Envoy (ext_authz gRPC and HTTP, and its reusing Lua
filter) and Kong (the Lua plugin, the Python plugin), in front of the REAL verifier.

The verifier marks an answer a gateway may reuse with `Cache-Control: private, max-age=N` (and `X-Accel-Expires`
for nginx's auth cache), on an allow and on the refusal of a malformed or forged token
(`edge_cache.refusal_max_age_seconds`). Passed on to the client with a 401, a browser or HTTP client may keep that
401 for N seconds (a private cache may store a 401 with explicit freshness, keyed by the URL, not the Authorization
header) and refuse the user's next, good token from it. So every refusal reaches the client with
`Cache-Control: no-store` and no `X-Accel-Expires`, as nginx answers; an allow reaches the upstream without either
and the client with the upstream's own Cache-Control.

Here, not in tests/integration, because only this directory runs every rig: Envoy and nginx from
tests/integration/gateways.py, the Kong plugins under this directory's nginx + PDK shim.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from gateways import (
    GATEWAY_KINDS,
    EchoUpstream,
    GatewayProcess,
    HttpResult,
    LocalIssuer,
    _EchoHandler,
    http_request,
    start_gateway_for,
    start_verifier,
)
from python_edge import start_python_plugin
from rigs import fresh_upstream_log, issuer  # noqa: F401 - fixtures, requested by name
from test_python_plugin import PluginServer

pytestmark = pytest.mark.integration

#: Every shipped configuration: tests/integration's five, and the two Kong plugins.
CONFIGURATIONS = (*GATEWAY_KINDS, "kong-lua", "kong-python")
REUSE_SECONDS = 30  # edge_cache.max_age_seconds and refusal_max_age_seconds: long enough to be reused here
UPSTREAM_CACHE_CONTROL = "public, max-age=123"  # the application's own word on its answer
VERIFIER_REUSE_HEADERS = ("cache-control", "x-accel-expires")
POLICIES = [
    {"name": "admin", "match": {"path_prefix": "/admin"}, "require": {"roles_any": ["admin"]}},
    {"name": "rest", "match": {"path_prefix": "/"}, "require": {"authenticated": True}},
]


class _CachingEchoHandler(_EchoHandler):
    """The echo upstream, saying how its answers may be cached."""

    def _send(self, status: int, body: bytes, headers: Any = None) -> None:
        super()._send(status, body, {**(headers or {}), "Cache-Control": UPSTREAM_CACHE_CONTROL})


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoUpstream]:
    server = EchoUpstream(handler=_CachingEchoHandler)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:  # noqa: F811
    proc = start_verifier(
        tmp_path_factory.mktemp("verifier"),
        issuer=issuer.issuer,
        extra_config={
            "policies": POLICIES,
            "edge_cache": {"max_age_seconds": REUSE_SECONDS, "refusal_max_age_seconds": REUSE_SECONDS},
        },
    )
    yield proc
    proc.stop()


@pytest.fixture(params=CONFIGURATIONS)
def gateway(
    request: pytest.FixtureRequest,
    start_nginx: Any,
    verifier: GatewayProcess,
    upstream: EchoUpstream,
    tmp_path: Any,
) -> Iterator[str]:
    """The shipped configuration in front of `verifier`, passing to `upstream`; its base URL. The Kong Lua plugin
    with its answer reuse on (its default), the Python plugin (which reuses nothing) under its plugin server."""
    kind = request.param
    if kind == "kong-lua":
        yield str(start_nginx({"url": f"{verifier.url}/v1/forward-auth"}, upstream.port))
    elif kind == "kong-python":
        server = PluginServer("--no-lua-style")
        try:
            yield start_python_plugin(start_nginx, server, verifier, upstream.port)
        finally:
            server.stop()
    else:
        gw = start_gateway_for(kind, tmp_path, verifier, upstream.port)
        try:
            yield gw.url
        finally:
            gw.stop()


def _get(url: str, authorization: str) -> HttpResult:
    return http_request(url, headers={"Authorization": authorization})


def test_the_verifiers_reuse_directives_never_reach_the_client_or_the_upstream(
    gateway: str, verifier: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer  # noqa: F811
) -> None:
    forged = f"Bearer not-a-jwt-{uuid.uuid4().hex}"
    # the verifier's own answer to the forged token says a gateway may reuse it
    door = http_request(
        f"{verifier.url}/v1/forward-auth/orders",
        headers={"Authorization": forged, "X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/orders",
                 "X-Forwarded-Host": "127.0.0.1", "X-Forwarded-Proto": "http"},
    )
    assert door.status == 401 and door.headers.get("cache-control") == f"private, max-age={REUSE_SECONDS}", door
    reader = f"Bearer {issuer.mint(sub=f'user-{uuid.uuid4().hex[:8]}', jti=uuid.uuid4().hex)}"
    refusals = {
        # each twice: the second may be a gateway's reused answer
        "forged token": [(_get(f"{gateway}/orders", forged), 401) for _ in range(2)],
        "missing role": [(_get(f"{gateway}/admin/users", reader), 403) for _ in range(2)],
        "malformed header": [(_get(f"{gateway}/orders", "Bearer not one token"), 400)],
    }
    allows = [_get(f"{gateway}/orders", reader) for _ in range(2)]

    for what, answers in refusals.items():
        for answer, status in answers:
            assert answer.status == status, (what, answer.status, answer.headers, answer.body)
            assert answer.headers.get("cache-control") == "no-store", (what, answer.headers)
            assert "x-accel-expires" not in answer.headers, (what, answer.headers)
    for answer in allows:
        assert answer.status == 200, (answer.status, answer.headers, answer.body)
        assert answer.headers.get("cache-control") == UPSTREAM_CACHE_CONTROL, answer.headers
        assert "x-accel-expires" not in answer.headers, answer.headers
    seen = upstream.requests
    assert len(seen) == len(allows), [s.path for s in seen]  # no refusal reached it
    for request in seen:
        assert request.headers.get("x-authenticated-userid", "").startswith("user-"), request.headers
        for name in VERIFIER_REUSE_HEADERS:
            assert name not in request.headers, (name, request.headers)
