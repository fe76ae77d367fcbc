"""Our gRPC door takes its request as bytes and remembers their translation (`RequestMemo`): the answers
must be byte for byte those of the parsed path, and a remembered request must still be decided each call."""

from __future__ import annotations

import grpc
import pytest
from doorkit import running_verifier
from envoy.service.auth.v3 import external_auth_pb2 as ea

from verifier.doors.grpc import ENVOY_SERVICE, OWN_SERVICE, RequestMemo, attributes_from_own, own_response
from verifier.settings import RateLimit, RateLimitSettings
from verifier.v1 import verifier_pb2

CHECK = f"/{OWN_SERVICE}/Check"
SMUGGLED = {"X-Authenticated-Userid": "admin", "x-authenticated-tenant": "acme"}


def _request(authorization: str | None, **headers: str) -> bytes:
    if authorization is not None:
        headers["Authorization"] = authorization
    message = verifier_pb2.CheckRequest(method="get", scheme="HTTPS", host="API.example.", path="/x", headers=headers)
    return message.SerializeToString()  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("case", "allowed", "status"),
    [
        ("allow", True, 200),
        ("allow, smuggled identity headers", True, 200),
        ("deny: no token (challenge)", False, 401),
        ("deny: malformed token", False, 401),
        ("deny: two tokens", False, 400),
    ],
)
async def test_the_bytes_door_answers_byte_for_byte_as_the_parsed_path(case: str, allowed: bool, status: int) -> None:
    async with running_verifier() as (app, idp):
        token = idp.mint(sub="carol")
        authorization, extra = {
            "allow": (f"Bearer {token}", {}),
            "allow, smuggled identity headers": (f"Bearer {token}", SMUGGLED),
            "deny: no token (challenge)": (None, {}),
            "deny: malformed token": ("Bearer a.b.c", {}),
            "deny: two tokens": (f"Bearer {token} {token}", {}),
        }[case]
        raw = _request(authorization, **extra)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            check = channel.unary_unary(CHECK)  # no serializers: the bytes on the wire
            first, again = await check(raw), await check(raw)  # parsed, then remembered
        # The old path: grpc parsed the request, the door translated the message.
        parsed = attributes_from_own(verifier_pb2.CheckRequest.FromString(raw))
        expected = own_response(await app.pipeline.decide(parsed, "grpc"))
        assert first == again == expected
        answer = verifier_pb2.CheckResponse.FromString(first)
        assert (answer.allowed, answer.http_status) == (allowed, status)
        if not allowed:
            assert any(h.name == "www-authenticate" for h in answer.response_headers)


async def test_a_remembered_request_is_still_decided_on_every_call() -> None:
    limits = RateLimitSettings(default=RateLimit(per_second=0.001, burst=1))
    async with running_verifier({"rate_limits": limits}) as (app, idp):
        raw = _request(f"Bearer {idp.mint(sub='erin')}")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            check = channel.unary_unary(CHECK)
            first = verifier_pb2.CheckResponse.FromString(await check(raw))
            second = verifier_pb2.CheckResponse.FromString(await check(raw))  # the same bytes: a memo hit
    assert first.allowed and not second.allowed
    assert (second.http_status, second.reason) == (429, "rate_limited")


@pytest.mark.parametrize("door", ["grpc", "ext_authz"])
@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x12"])
async def test_bytes_that_are_not_a_check_request_are_invalid_argument(data: bytes, door: str) -> None:
    async with running_verifier() as (app, idp):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            check = channel.unary_unary(CHECK if door == "grpc" else f"/{ENVOY_SERVICE}/Check")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await check(data)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # The door keeps serving.
            token = idp.mint()
            if door == "grpc":
                assert verifier_pb2.CheckResponse.FromString(await check(_request(f"Bearer {token}"))).allowed
            else:
                request = ea.CheckRequest()
                request.attributes.request.http.path = "/"
                request.attributes.request.http.headers["authorization"] = f"Bearer {token}"
                answer = ea.CheckResponse.FromString(await check(request.SerializeToString()))
                assert answer.status.code == 0


def test_the_memo_is_bounded_in_entries_and_request_size() -> None:
    memo = RequestMemo(max_entries=2, max_bytes=200)
    small = [_request(f"Bearer t{i}") for i in range(3)]
    large = _request("Bearer " + "x" * 300)
    assert memo.attributes(large).headers["authorization"] == "Bearer " + "x" * 300
    assert len(memo) == 0  # too large to keep: parsed on every call
    memo.attributes(small[0])
    memo.attributes(small[1])
    assert len(memo) == 2
    memo.attributes(small[2])  # full: cleared, then this one kept
    assert len(memo) == 1
    attrs = memo.attributes(small[2])
    assert (attrs.method, attrs.scheme, attrs.host, attrs.headers["authorization"]) == (
        "GET",
        "https",
        "api.example",
        "Bearer t2",
    )


async def test_health_and_reflection_still_answer_as_generic_handlers() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with running_verifier() as (app, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=OWN_SERVICE))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            names = {s.name async for answer in stream for s in answer.list_services_response.service}
    assert {OWN_SERVICE, "envoy.service.auth.v3.Authorization", "grpc.health.v1.Health"} <= names
