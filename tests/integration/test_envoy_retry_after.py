"""A 503 reaches the client with Retry-After through both shipped ext_authz templates (real Envoy).

The attacker's part: overload (shedding, a provider or the state store unavailable) is answered 503 with
Retry-After so that clients back off; a bare 503 lets every client retry at once and keeps the overload going.
ext_authz over HTTP takes any 5xx answer of the verifier's for an error: it sends its own `status_on_error` 503 and
drops the answer, headers and all, whatever `allowed_client_headers` names; over gRPC the same 503 is sent when the
verifier does not answer (unreachable, too slow, its door refusing the call). Before, those 503s were bare; now the
templates' `local_reply_config` adds `Retry-After: 1` to ext_authz's own 503 (response flag UAEX), and leaves a
verifier's own Retry-After (gRPC mode: a denial carries its headers) and every other answer as they were.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest

if __package__:
    from ._standin import Decision, Standin, StandinPolicy
    from .gateways import (
        DEFAULT_AUDIENCE,
        EchoUpstream,
        GatewayProcess,
        HttpResult,
        LocalIssuer,
        free_port,
        http_request,
        start_envoy,
        start_verifier,
    )
else:  # tests/ is not a package: pytest put this directory on sys.path
    from _standin import Decision, Standin, StandinPolicy
    from gateways import (
        DEFAULT_AUDIENCE,
        EchoUpstream,
        GatewayProcess,
        HttpResult,
        LocalIssuer,
        free_port,
        http_request,
        start_envoy,
        start_verifier,
    )

from rigs import fresh_upstream_log  # noqa: F401 - autouse: each test sees only its own requests

pytestmark = pytest.mark.integration

MODES = ("grpc", "http")
OPAQUE = "opaque-token-that-needs-introspection"  # not a JWT: the verifier introspects it
#: The client's own copies: none may come back, none may reach the upstream.
CLIENT_COPIES = {"X-Authenticated-Userid": "mallory", "Retry-After": "0", "X-Verifier-Reason": "ok"}


def _envoy(
    mode: str, tmp_path: pytest.TempPathFactory, grpc_port: int, http_port: int, upstream: int
) -> GatewayProcess:
    return start_envoy(
        tmp_path.mktemp(f"envoy-{mode}"),
        mode,  # type: ignore[arg-type]
        verifier_grpc_port=grpc_port,
        verifier_http_port=http_port,
        upstream_port=upstream,
    )


def _get(gw: GatewayProcess, authorization: str | None = None) -> HttpResult:
    headers = dict(CLIENT_COPIES)
    if authorization is not None:
        headers["Authorization"] = authorization
    return http_request(f"{gw.url}/orders", headers=headers)


def _no_identity(answer: HttpResult) -> None:
    leaked = {k: v for k, v in answer.headers.items() if k.lower().startswith("x-authenticated-")}
    assert leaked == {}, answer.headers


@pytest.fixture(scope="module")
def unavailable_verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The real verifier taking opaque tokens to an introspection endpoint nobody listens on: each one is answered
    503 `provider_unavailable` with Retry-After (fail closed)."""
    nobody = free_port()
    proc = start_verifier(
        tmp_path_factory.mktemp("unavailable"),
        issuer=issuer.issuer,
        extra_config={
            "issuers": [
                {
                    "issuer": issuer.issuer,
                    "audiences": [DEFAULT_AUDIENCE],
                    "algorithms": ["ES256"],
                    "allow_insecure_http": True,
                    "introspection": {
                        "client_id": "verifier",
                        "client_secret_env": "RETRY_AFTER_SECRET",
                        "endpoint": f"http://127.0.0.1:{nobody}/introspect",
                        "timeout_seconds": 0.5,
                        "opaque_tokens": True,
                    },
                }
            ]
        },
        environment={"RETRY_AFTER_SECRET": "s" * 32},
    )
    yield proc
    proc.stop()


@pytest.mark.parametrize("mode", MODES)
def test_the_verifiers_503_reaches_the_client_with_retry_after(
    mode: str,
    unavailable_verifier: GatewayProcess,
    issuer: LocalIssuer,
    upstream: EchoUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    direct = http_request(
        f"{unavailable_verifier.url}/v1/forward-auth/orders", headers={"Authorization": f"Bearer {OPAQUE}"}
    )
    assert (direct.status, direct.headers.get("x-verifier-reason")) == (503, "provider_unavailable"), direct.headers
    assert direct.headers.get("retry-after") == "1", direct.headers
    extra = unavailable_verifier.extra
    gw = _envoy(mode, tmp_path_factory, extra["grpc_port"], extra["http_port"], upstream.port)
    try:
        refused = _get(gw, f"Bearer {OPAQUE}")
        allowed = _get(gw, f"Bearer {issuer.mint()}")
        unauthenticated = _get(gw)
    finally:
        gw.stop()
    assert refused.status == 503, (refused.status, refused.headers, refused.body)
    assert refused.headers.get("retry-after") == "1", refused.headers
    _no_identity(refused)
    # the other answers are untouched: an allow reaches the upstream (with the verifier's identity, not the
    # client's copy), a 401 carries its challenge and no Retry-After
    assert allowed.status == 200, (allowed.status, allowed.body)
    assert "retry-after" not in allowed.headers, allowed.headers
    assert unauthenticated.status == 401 and "retry-after" not in unauthenticated.headers, unauthenticated.headers
    (seen,) = upstream.requests
    assert seen.headers["x-authenticated-userid"] == "alice", seen.headers  # the verifier's, not the copy


@pytest.mark.parametrize("mode", MODES)
def test_when_the_verifier_does_not_answer_the_client_gets_503_with_retry_after(
    mode: str, upstream: EchoUpstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Nothing listens on the verifier's ports: ext_authz's status_on_error 503, now with Retry-After."""
    gw = _envoy(mode, tmp_path_factory, free_port(), free_port(), upstream.port)
    try:
        answer = _get(gw, "Bearer x")
    finally:
        gw.stop()
    assert (answer.status, answer.headers.get("retry-after")) == (503, "1"), answer.headers
    _no_identity(answer)
    assert upstream.requests == []


class _Overloaded(StandinPolicy):
    """Every request answered 503 with a Retry-After of 42 (not a gateway's fixed 1) and, to be dropped, an
    identity header and a header the templates do not name for the client."""

    def decide(self, headers: Mapping[str, str]) -> Decision:
        return Decision(
            status=503,
            reason="overloaded",
            upstream_headers={"X-Authenticated-Userid": "someone"},
            client_headers={"Retry-After": "42", "X-Verifier-Reason": "overloaded", "X-Internal": "secret"},
            body='{"error":"temporarily_unavailable"}',
        )


@pytest.mark.parametrize(("mode", "retry_after"), [("grpc", "42"), ("http", "1")])
def test_a_503_with_its_own_retry_after_keeps_it_where_envoy_relays_it(
    mode: str, retry_after: str, issuer: LocalIssuer, upstream: EchoUpstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """gRPC mode relays a denial's headers: the verifier's own Retry-After stays (the template adds one only when
    absent). HTTP mode drops a 5xx answer whole (Envoy's ext_authz HTTP client): its Retry-After cannot come
    through, the template's 1 does. Neither lets the answer's identity or unnamed headers through."""
    standin = Standin(_Overloaded(issuer=issuer.issuer, audience=DEFAULT_AUDIENCE, public_key=issuer.key.public_key()))
    try:
        gw = _envoy(mode, tmp_path_factory, standin.grpc_port, standin.http_port, upstream.port)
        try:
            answer = _get(gw, f"Bearer {issuer.mint()}")
        finally:
            gw.stop()
    finally:
        standin.stop()
    assert (answer.status, answer.headers.get("retry-after")) == (503, retry_after), answer.headers
    assert mode == "grpc" or "x-internal" not in answer.headers, answer.headers  # gRPC: the verifier's choice
    _no_identity(answer)
    assert upstream.requests == []
