"""Both gRPC Check services and health, over a real grpc.aio channel."""

from __future__ import annotations

import json
import urllib.parse

import grpc
import pytest
from doorkit import http_exchange, running_verifier
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from verifier.doors.grpc import cert_thumbprint
from verifier.settings import PolicySettings, RateLimit, RateLimitSettings, Requirements, RouteMatch
from verifier.v1 import verifier_pb2, verifier_pb2_grpc


def _envoy_request(
    token: str | None,
    path: str = "/orders",
    *,
    extra: dict[str, str] | None = None,
    certificate: str = "",
    host: str = "shop",
) -> ea.CheckRequest:
    headers = {":path": path, "host": host, **(extra or {})}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return ea.CheckRequest(
        attributes=ac.AttributeContext(
            source=ac.AttributeContext.Peer(certificate=certificate),
            request=ac.AttributeContext.Request(
                http=ac.AttributeContext.HttpRequest(
                    method="GET", path=path, host=host, scheme="https", headers=headers
                )
            ),
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


def _pem(common_name: str) -> tuple[str, str]:
    """A self-signed certificate as Envoy sends it (URL-encoded PEM) and its RFC 8705 x5t#S256."""
    from cryptography.hazmat.primitives.serialization import Encoding
    from support import make_certificate

    from verifier.binding.mtls import thumbprint_from_der

    cert = make_certificate(common_name)
    return urllib.parse.quote(cert.public_bytes(Encoding.PEM).decode()), thumbprint_from_der(
        cert.public_bytes(Encoding.DER)
    )


async def test_envoy_takes_the_certificate_from_source_certificate_never_from_a_header() -> None:
    bound_pem, bound = _pem("bound-client")
    other_pem, _ = _pem("attacker")
    async with running_verifier() as (app, idp):
        token = idp.mint(claims={"cnf": {"x5t#S256": bound}})
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            stub = ea_grpc.AuthorizationStub(channel)
            claimed = {"x-client-cert-thumbprint": bound}
            # The attacker's own certificate, or none, plus a header naming the bound one.
            for certificate in (other_pem, ""):
                answer = await stub.Check(_envoy_request(token, extra=claimed, certificate=certificate))
                assert answer.status.code == 16 and answer.denied_response.status.code == 401
                reasons = {
                    h.header.value for h in answer.denied_response.headers if h.header.key == "x-verifier-reason"
                }
                assert reasons == {"sender_constraint_failed"}
            ok = await stub.Check(_envoy_request(token, certificate=bound_pem))
            assert ok.status.code == 0


async def test_own_check_takes_the_certificate_from_its_field_never_from_a_header() -> None:
    async with running_verifier() as (app, idp):
        token = idp.mint(claims={"cnf": {"x5t#S256": "abc123"}})
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            stub = verifier_pb2_grpc.VerifierStub(channel)
            headers = {"authorization": f"Bearer {token}", "x-client-cert-thumbprint": "abc123"}
            spoofed = await stub.Check(verifier_pb2.CheckRequest(method="GET", host="api", path="/x", headers=headers))
            assert not spoofed.allowed and spoofed.reason == "sender_constraint_failed"
            ok = await stub.Check(
                verifier_pb2.CheckRequest(
                    method="GET", host="api", path="/x", headers=headers, client_cert_thumbprint="abc123"
                )
            )
            assert ok.allowed


HOST_ROUTES = (
    PolicySettings(
        name="admin", match=RouteMatch(hosts=("admin.example.test",)), require=Requirements(roles_any=("admin",))
    ),
    PolicySettings(name="open", match=RouteMatch(path_prefix="/"), require=Requirements(authenticated=False)),
)


@pytest.mark.parametrize("spelling", ["ADMIN.example.test.", "admin.example.test:443", "Admin.Example.Test.:8443"])
async def test_a_host_policy_holds_for_every_spelling_of_the_host_on_both_grpc_doors(spelling: str) -> None:
    async with running_verifier({"policies": HOST_ROUTES}) as (app, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            own = verifier_pb2_grpc.VerifierStub(channel)
            envoy = ea_grpc.AuthorizationStub(channel)
            for host, allowed in ((spelling, False), ("www.example.test", True)):
                answer = await own.Check(verifier_pb2.CheckRequest(method="GET", host=host, path="/"))
                assert answer.allowed is allowed, host
                reply = await envoy.Check(_envoy_request(None, "/", host=host))
                assert (reply.status.code == 0) is allowed, host


async def test_an_envoy_check_describing_no_http_request_is_invalid_argument_never_an_allow() -> None:
    """A CheckRequest without `attributes.request.http` (Envoy's network ext_authz filter sends one per TCP
    connection: source and destination only) describes no request to judge. Translated as it was, it became
    `GET /` on host "" with no headers, and a public catch-all route let the connection through."""
    network = ea.CheckRequest()
    network.attributes.source.address.socket_address.address = "192.0.2.7"
    network.attributes.source.address.socket_address.port_value = 5555
    network.attributes.destination.address.socket_address.address = "10.0.0.1"
    network.attributes.destination.address.socket_address.port_value = 5432
    async with running_verifier({"policies": HOST_ROUTES}) as (app, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            envoy = ea_grpc.AuthorizationStub(channel)
            for request in (network, ea.CheckRequest()):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await envoy.Check(request)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # An HTTP request to the public route is still judged (and allowed) as before.
            assert (await envoy.Check(_envoy_request(None, "/", host="www.example.test"))).status.code == 0


PUBLIC_ROOT = (
    PolicySettings(name="admin", match=RouteMatch(path_prefix="/admin"), require=Requirements(roles_any=("admin",))),
    PolicySettings(name="open", match=RouteMatch(path_prefix="/"), require=Requirements(authenticated=False)),
)


async def test_a_check_with_no_path_is_refused_400_on_both_grpc_doors_never_judged_as_the_public_root() -> None:
    """A Check whose path is empty was judged as `/`: with a public `/`, a caller that left the path out had every
    protected route let through with no token. Both gRPC doors now refuse it as forward-auth refuses a check whose
    path nothing tells: 400 `invalid_request` naming the missing field, counted under the same labels."""
    async with running_verifier({"policies": PUBLIC_ROOT}) as (app, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            own = verifier_pb2_grpc.VerifierStub(channel)
            envoy = ea_grpc.AuthorizationStub(channel)
            # The routes as configured: `/` public, /admin protected.
            assert (await own.Check(verifier_pb2.CheckRequest(method="GET", host="api", path="/"))).allowed
            assert (await envoy.Check(_envoy_request(None, "/"))).status.code == 0
            assert not (await own.Check(verifier_pb2.CheckRequest(method="DELETE", host="api", path="/admin"))).allowed
            assert (await envoy.Check(_envoy_request(None, "/admin"))).status.code == 16
            for _ in range(2):  # the repeat too: nothing remembered lets it through
                answer = await own.Check(verifier_pb2.CheckRequest(method="DELETE", host="api"))
                assert (answer.allowed, answer.http_status, answer.reason) == (False, 400, "invalid_request")
                described = json.loads(answer.body)["error_description"]
                assert described == "the gateway sent no path (verifier.v1.CheckRequest.path)"
                for spelled in (_envoy_request(None, ""), _envoy_request(None, "", extra={":path": "/admin"})):
                    reply = await envoy.Check(spelled)
                    assert reply.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                    denied = reply.denied_response
                    assert denied.status.code == 400
                    named = {h.header.key: h.header.value for h in denied.headers}
                    assert named["x-verifier-reason"] == "invalid_request"
                    assert json.loads(denied.body)["error_description"] == (
                        "the gateway sent no path (attributes.request.http.path)"
                    )
        untold = await http_exchange(app.ports.http, b"GET /v1/forward-auth HTTP/1.1\r\nHost: verifier\r\n\r\n")
        assert untold.startswith(b"HTTP/1.1 400")
        counted = app.metrics.render().decode()
        for door, refused in (("forward_auth", 1), ("grpc", 2), ("ext_authz", 4)):
            line = f'verifier_decisions_total{{door="{door}",outcome="deny",reason="invalid_request"}} {refused}.0'
            assert line in counted, door


# The admin host needs the admin role; every other host any signed-in user.
ADMIN_HOST = (
    PolicySettings(
        name="admin-host", match=RouteMatch(hosts=("admin.example.test",)), require=Requirements(roles_any=("admin",))
    ),
    PolicySettings(name="signed-in", match=RouteMatch(path_prefix="/"), require=Requirements(authenticated=True)),
)


async def test_a_check_with_no_host_is_refused_400_on_both_grpc_doors_when_policies_name_hosts() -> None:
    """A Check whose host is empty was judged on no host: it met none of the admin host's policies and fell to the
    signed-in one, so any user's token passed whatever host the request was for. With policies naming hosts both
    gRPC doors refuse it, 400 `invalid_request`, as forward-auth refuses a check without its host header."""
    async with running_verifier({"policies": ADMIN_HOST}) as (app, idp):
        mallory = {"authorization": f"Bearer {idp.mint(sub='mallory')}"}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            own = verifier_pb2_grpc.VerifierStub(channel)
            envoy = ea_grpc.AuthorizationStub(channel)
            for _ in range(2):  # the repeat too: nothing remembered lets it through
                answer = await own.Check(verifier_pb2.CheckRequest(method="GET", path="/users/7", headers=mallory))
                assert (answer.allowed, answer.http_status, answer.reason) == (False, 400, "invalid_request")
                assert json.loads(answer.body)["error_description"] == (
                    "the gateway sent no host (verifier.v1.CheckRequest.host), and the policies name hosts"
                )
                reply = await envoy.Check(_envoy_request(mallory["authorization"][7:], "/users/7", host=""))
                denied = reply.denied_response
                assert (reply.status.code, denied.status.code) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], 400)
                assert json.loads(denied.body)["error_description"] == (
                    "the gateway sent no host (attributes.request.http.host), and the policies name hosts"
                )
            # The host told: the admin host's policy judges it; another host the signed-in one.
            for host, allowed in (("admin.example.test", False), ("shop.example.test", True)):
                told = verifier_pb2.CheckRequest(method="GET", host=host, path="/users/7", headers=mallory)
                assert (await own.Check(told)).allowed is allowed, host
                assert ((await envoy.Check(_envoy_request(mallory["authorization"][7:], host=host))).status.code == 0
                        ) is allowed, host  # fmt: skip
    async with running_verifier({"policies": PUBLIC_ROOT}) as (app, _):  # no policy names a host: judged as before
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            own = verifier_pb2_grpc.VerifierStub(channel)
            assert (await own.Check(verifier_pb2.CheckRequest(method="GET", path="/"))).allowed


async def test_envoy_removes_every_identity_header_a_client_sent_that_the_answer_does_not_set() -> None:
    smuggled = {"x-authenticated-userid": "admin", "x-authenticated-tenant": "acme", "x-authenticated-roles": "admin"}
    async with running_verifier() as (app, idp):
        token = idp.mint(sub="erin")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            stub = ea_grpc.AuthorizationStub(channel)
            plain = await stub.Check(_envoy_request(token))  # memoizes the common answer first
            answer = await stub.Check(_envoy_request(token, extra=smuggled))
            assert answer.status.code == 0
            ours = {h.header.key: (h.header.value, h.append_action) for h in answer.ok_response.headers}
            assert ours["x-authenticated-userid"] == ("erin", base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
            removed = set(answer.ok_response.headers_to_remove)
            assert {"x-authenticated-tenant", "x-authenticated-roles"} <= removed
            assert not removed & set(ours), "a header we set must not also be removed"
            # The per-request list never leaks into the memoized answer other requests get.
            again = await stub.Check(_envoy_request(token))
            assert again.SerializeToString() == plain.SerializeToString()
            assert "x-authenticated-tenant" not in again.ok_response.headers_to_remove


@pytest.mark.parametrize(
    ("header", "status", "code"),
    [
        ("Bearer a b", 400, grpc.StatusCode.INVALID_ARGUMENT.value[0]),  # was UNAVAILABLE: not our outage
        (None, 401, grpc.StatusCode.UNAUTHENTICATED.value[0]),
    ],
)
async def test_envoy_denials_carry_the_standard_grpc_code_for_their_http_status(
    header: str | None, status: int, code: int
) -> None:
    async with running_verifier() as (app, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            extra = {"authorization": header} if header else None
            answer = await ea_grpc.AuthorizationStub(channel).Check(_envoy_request(None, extra=extra))
            assert (answer.status.code, answer.denied_response.status.code) == (code, status)


async def test_an_envoy_rate_limit_denial_is_resource_exhausted_with_429_and_retry_after() -> None:
    limits = RateLimitSettings(default=RateLimit(per_second=0.001, burst=1))
    async with running_verifier({"rate_limits": limits}) as (app, idp):
        token = idp.mint(sub="erin")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            stub = ea_grpc.AuthorizationStub(channel)
            assert (await stub.Check(_envoy_request(token))).status.code == 0
            answer = await stub.Check(_envoy_request(token))
            # Envoy denies on any non-OK status and answers the client with denied_response (429 here).
            assert answer.status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert answer.denied_response.status.code == 429
            headers = {h.header.key: h.header.value for h in answer.denied_response.headers}
            assert headers["x-verifier-reason"] == "rate_limited" and headers["retry-after"]


async def test_an_allow_under_a_rate_limit_tells_the_client_what_is_left_through_both_grpc_doors() -> None:
    """draft-ietf-httpapi-ratelimit-headers on the allow: Envoy's `response_headers_to_add` (to the client,
    never the upstream) and our proto's `response_headers` (the Kong Python plugin sets them on the answer)."""
    limits = RateLimitSettings(default=RateLimit(per_second=0.001, burst=3))
    async with running_verifier({"rate_limits": limits}) as (app, idp):
        token = idp.mint(sub="frank")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            envoy = await ea_grpc.AuthorizationStub(channel).Check(_envoy_request(token))
            own = await verifier_pb2_grpc.VerifierStub(channel).Check(
                verifier_pb2.CheckRequest(
                    method="GET", host="api", path="/x", headers={"authorization": f"Bearer {token}"}
                )
            )
    assert envoy.status.code == 0 and own.allowed
    to_client = {h.header.key: h.header.value for h in envoy.ok_response.response_headers_to_add}
    assert to_client["ratelimit-policy"] == '"default";q=3;w=3000'
    assert to_client["ratelimit"].startswith('"default";r=2;')
    assert not {h.header.key for h in envoy.ok_response.headers} & {"ratelimit", "ratelimit-policy"}
    own_client = {h.name: h.value for h in own.response_headers}
    assert own_client["ratelimit"].startswith('"default";r=1;')  # the same identity's bucket, one more taken
    assert not {h.name for h in own.upstream_headers} & {"ratelimit", "ratelimit-policy"}
