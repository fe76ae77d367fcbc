"""Both gRPC Check services and health, over a real grpc.aio channel."""

from __future__ import annotations

import grpc
import pytest
from doorkit import running_verifier
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from verifier.doors.grpc import cert_thumbprint
from verifier.v1 import verifier_pb2, verifier_pb2_grpc


def _envoy_request(token: str | None, path: str = "/orders") -> ea.CheckRequest:
    headers = {":path": path, "host": "shop"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return ea.CheckRequest(
        attributes=ac.AttributeContext(
            request=ac.AttributeContext.Request(
                http=ac.AttributeContext.HttpRequest(
                    method="GET", path=path, host="shop", scheme="https", headers=headers
                )
            )
        )
    )


async def test_own_check_allows_and_refuses() -> None:
    async with running_verifier() as (app, idp):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            stub = verifier_pb2_grpc.VerifierStub(channel)
            ok = await stub.Check(
                verifier_pb2.CheckRequest(
                    method="GET", host="api", path="/x", headers={"Authorization": f"Bearer {idp.mint(sub='carol')}"}
                )
            )
            assert ok.allowed and ok.http_status == 200 and ok.subject == "carol" and ok.reason == "ok"
            assert ("x-authenticated-userid", "carol") in [(h.name, h.value) for h in ok.upstream_headers]
            no = await stub.Check(verifier_pb2.CheckRequest(method="GET", host="api", path="/x"))
            assert not no.allowed and no.http_status == 401 and no.reason == "token_missing"
            assert [h.value for h in no.response_headers if h.name == "www-authenticate"] == ['Bearer realm="verifier"']


async def test_envoy_check_allows_with_upstream_headers_and_strips_unset_identity_headers() -> None:
    async with running_verifier() as (app, idp):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            stub = ea_grpc.AuthorizationStub(channel)
            answer = await stub.Check(_envoy_request(idp.mint(sub="dave")))
            assert answer.status.code == 0
            headers = {h.header.key: h.header.value for h in answer.ok_response.headers}
            assert headers["x-authenticated-userid"] == "dave"
            assert "x-authenticated-roles" in answer.ok_response.headers_to_remove


@pytest.mark.parametrize(("token", "status", "code"), [(None, 401, 16), ("a.b.c", 401, 16)])
async def test_envoy_check_denies_with_status_and_challenge(token: str | None, status: int, code: int) -> None:
    async with running_verifier() as (app, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            answer = await ea_grpc.AuthorizationStub(channel).Check(_envoy_request(token))
            assert answer.status.code == code
            assert answer.denied_response.status.code == status
            names = [h.header.key for h in answer.denied_response.headers]
            assert "www-authenticate" in names


async def test_envoy_wrong_audience_is_permission_denied_403() -> None:
    async with running_verifier() as (app, idp):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            answer = await ea_grpc.AuthorizationStub(channel).Check(_envoy_request(idp.mint(aud="https://elsewhere")))
            assert answer.status.code == 7
            assert answer.denied_response.status.code == 403


async def test_health_is_serving_once_keys_are_loaded() -> None:
    async with running_verifier() as (app, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "verifier.v1.Verifier", "envoy.service.auth.v3.Authorization"):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_client_certificate_thumbprint_is_rfc8705_x5t_s256() -> None:
    import base64
    import hashlib
    import urllib.parse

    der = b"\x30\x03\x02\x01\x01"
    pem = "-----BEGIN CERTIFICATE-----\n" + base64.b64encode(der).decode() + "\n-----END CERTIFICATE-----\n"
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert cert_thumbprint(urllib.parse.quote(pem)) == expected
    assert cert_thumbprint("not a pem") == ""
