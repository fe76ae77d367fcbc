"""Revocation through the running verifier: a pushed CAEP event refuses a session's tokens on every
door and on a second replica sharing Redis within a second; the operator kill switch does the same."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from doorkit import door_settings, free_port, http_exchange
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis_harness import start_redis
from ssf_transmitter import SESSION_REVOKED, SsfTransmitter
from support import timed

from verifier.app import App
from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider
from verifier.revocation import parse_revocation_config
from verifier.settings import IssuerSettings, Listen, Settings
from verifier.state import parse_state_config
from verifier.v1 import verifier_pb2, verifier_pb2_grpc

pytestmark = pytest.mark.integration
RECEIVER_AUD = "https://verifier.example.test"


@contextlib.asynccontextmanager
async def _replica(
    idp: DevIdentityProvider, tx: SsfTransmitter, redis_url: str | None, *, admin: bool = False
) -> AsyncIterator[App]:
    settings = Settings(
        grpc=Listen(host="127.0.0.1", port=0),
        http=Listen(host="127.0.0.1", port=0),
        forward_auth=door_settings(),  # shedding only past 5 s: a starved test process is not an overload
        metrics=None,
        admin=Listen(host="127.0.0.1", port=0) if admin else None,
        issuers=(IssuerSettings(issuer=idp.issuer, audiences=(DEV_AUDIENCE,), algorithms=("ES256",)),),
        state=parse_state_config({"redis_url": redis_url, "key_prefix": "e2e:"}) if redis_url else None,
        revocation=parse_revocation_config(
            {"transmitters": [
                {"issuer": tx.issuer, "audience": RECEIVER_AUD, "delivery": "push", "subjects_of": [idp.issuer],
                 "allow_insecure_http": True}
            ]}
        ),
    )
    app = App(settings)
    await app.start()
    try:
        for _ in range(200):
            if app.ready():
                break
            await asyncio.sleep(0.05)
        assert app.ready()
        yield app
    finally:
        await app.stop(grace=0.2)


@contextlib.asynccontextmanager
async def _lone_replica() -> AsyncIterator[tuple[DevIdentityProvider, SsfTransmitter, App]]:
    """A development provider, a push transmitter and one replica without Redis: the common case here."""
    idp = DevIdentityProvider(port=free_port())
    await idp.start()
    try:
        with SsfTransmitter(audience=RECEIVER_AUD) as tx:
            async with _replica(idp, tx, None) as app:
                yield idp, tx, app
    finally:
        await idp.stop()


async def _forward(app: App, token: str) -> tuple[int, str]:
    raw = f"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    answer = await http_exchange(app.ports.http, raw)
    head = answer.split(b"\r\n\r\n")[0].decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
    return int(head[0].split()[1]), headers.get("www-authenticate", "")


async def _grpc_both(app: App, token: str) -> tuple[bool, int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
        own = await verifier_pb2_grpc.VerifierStub(channel).Check(
            verifier_pb2.CheckRequest(method="GET", path="/", headers={"authorization": f"Bearer {token}"})
        )
        envoy = await ea_grpc.AuthorizationStub(channel).Check(
            ea.CheckRequest(
                attributes=ac.AttributeContext(
                    request=ac.AttributeContext.Request(
                        http=ac.AttributeContext.HttpRequest(
                            method="GET", path="/", headers={"authorization": f"Bearer {token}"}
                        )
                    )
                )
            )
        )
    return own.allowed, envoy.status.code


async def _push(app: App, tx: SsfTransmitter, sid: str) -> tuple[int, Any]:
    token = tx.sign_set(
        {SESSION_REVOKED: {"event_timestamp": int(time.time())}}, sub_id={"format": "opaque", "id": sid}
    )
    return await asyncio.to_thread(tx.push, f"http://127.0.0.1:{app.ports.http}/v1/ssf/events", token)


async def test_session_revoked_event_refuses_on_every_door_and_on_a_second_replica(tmp_path: Path) -> None:
    redis = start_redis(tmp_path)
    idp = DevIdentityProvider(port=free_port())
    await idp.start()
    try:
        with SsfTransmitter(audience=RECEIVER_AUD) as tx:
            async with _replica(idp, tx, redis.url) as one, _replica(idp, tx, redis.url) as two:
                token = idp.mint(sub="alice", claims={"sid": "session-1"})
                other = idp.mint(sub="alice", claims={"sid": "session-2"})
                assert (await _forward(one, token))[0] == 200  # cached as verified on one ...
                assert (await _forward(two, token))[0] == 200  # ... and on two
                status, _ = await _push(one, tx, "session-1")
                assert status == 202

                async def refused_on_two() -> None:
                    deadline = time.monotonic() + 30
                    while (await _forward(two, token))[0] != 401:
                        assert time.monotonic() < deadline, "replica two never refused"
                        await asyncio.sleep(0.02)

                # Within a second, less how long a loaded machine held this process (both replicas run in it).
                _, took, late = await timed(refused_on_two())
                assert took - late < 1.0, f"replica two did not refuse within 1 s ({took:.2f} s, {late:.2f} s late)"
                status, challenge = await _forward(one, token)
                assert status == 401 and 'error="invalid_token"' in challenge and "revoked" in challenge
                assert await _grpc_both(one, token) == (False, 16)
                assert await _grpc_both(two, token) == (False, 16)
                assert (await _forward(two, other))[0] == 200  # another session stays good
    finally:
        await idp.stop()
        redis.stop()


async def test_kill_switch_needs_the_admin_token_and_then_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", "s3cret-admin-token-for-tests-01234567")
    async with _lone_replica() as (idp, _, app):
        token = idp.mint(sub="mallory")
        assert (await _forward(app, token))[0] == 200
        body = json.dumps(
            {"subject": {"format": "iss_sub", "iss": idp.issuer, "sub": "mallory"}, "reason": "lost key"}
        ).encode()
        request = (
            b"POST /v1/admin/revocations HTTP/1.1\r\nHost: v\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n" % len(body)
        )
        denied = await http_exchange(app.ports.http, request + b"Authorization: Bearer wrong\r\n\r\n" + body)
        assert denied.startswith(b"HTTP/1.1 401")
        assert (await _forward(app, token))[0] == 200
        created = await http_exchange(
            app.ports.http,
            request + b"Authorization: Bearer s3cret-admin-token-for-tests-01234567\r\n\r\n" + body,
        )
        assert created.startswith(b"HTTP/1.1 201")
        assert (await _forward(app, token))[0] == 401


ADMIN_TOKEN = "s3cret-admin-token-for-tests-01234567"
COLLECTION = b"/v1/admin/revocations"
# The admin API's paths as a client could spell them: none may reach the kill switch on the forward-auth listener.
ADMIN_SPELLINGS = (
    COLLECTION,
    COLLECTION + b"/",
    COLLECTION + b"/op-x",
    COLLECTION.upper(),
    b"/V1/Admin/Revocations",
    b"//v1//admin//revocations",
    b"/v1/./admin/revocations",
    b"/v1/x/../admin/revocations",
    b"/v1/%2e%2e/v1/admin/revocations",
    b"/v1%2Fadmin%2Frevocations",
    b"/v1/admin%2frevocations",
    b"/v1/forward-auth/../admin/revocations",
    b"/v1/forward-auth/%2e%2e/admin/revocations",
    b"/.well-known/oauth-protected-resource/../..%s" % COLLECTION,
    COLLECTION + b"?x=1",
)


def _admin_request(method: bytes, target: bytes, token: str, body: bytes = b"") -> bytes:
    return (
        b"%s %s HTTP/1.1\r\nHost: v\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Authorization: Bearer %s\r\n\r\n%s" % (method, target, len(body), token.encode(), body)
    )


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def test_the_kill_switch_reaches_a_token_issued_before_it_on_a_provider_clock_running_ahead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A provider whose clock runs 20 s ahead of ours (within the issuer's 30 s leeway) issued the stolen token just
    before the operator's POST: its `iat` is in our future. The kill switch cut at our now, and the token kept
    passing after the 201. It now reaches the tokens issued up to the issuers' largest leeway past our now
    (tests/revocation/test_revocation.py: one issued beyond passes)."""
    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", ADMIN_TOKEN)
    async with _lone_replica() as (idp, _, app):
        now = int(time.time())
        stolen = idp.mint(sub="mallory", claims={"iat": now + 20, "nbf": now + 20, "exp": now + 600})
        assert (await _forward(app, stolen))[0] == 200
        body = json.dumps({"subject": {"format": "iss_sub", "iss": idp.issuer, "sub": "mallory"}}).encode()
        created = await http_exchange(app.ports.http, _admin_request(b"POST", COLLECTION, ADMIN_TOKEN, body))
        assert _status(created) == 201
        assert (await _forward(app, stolen))[0] == 401


async def test_with_admin_listen_the_kill_switch_is_served_there_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`admin.listen` set: the kill switch answers on its own listener, with the same token and audit, and the entry
    it makes is enforced by forward-auth; the forward-auth listener answers every spelling of the admin paths 404,
    with the real token as with a guess, auditing nothing (the token is never tried there); the admin listener
    makes no forward-auth check."""
    import logging

    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", ADMIN_TOKEN)
    idp = DevIdentityProvider(port=free_port())
    await idp.start()
    try:
        with SsfTransmitter(audience=RECEIVER_AUD) as tx:
            async with _replica(idp, tx, None, admin=True) as app:
                assert app.ports.admin is not None and app.ports.admin != app.ports.http
                token = idp.mint(sub="mallory")
                assert (await _forward(app, token))[0] == 200
                body = json.dumps(
                    {"subject": {"format": "iss_sub", "iss": idp.issuer, "sub": "mallory"}, "reason": "lost key"}
                ).encode()
                with caplog.at_level(logging.INFO, logger="verifier.audit"):
                    for target in ADMIN_SPELLINGS:
                        for method in (b"POST", b"GET", b"DELETE"):
                            for secret in (ADMIN_TOKEN, "a-guess-that-is-long-enough-0123456789"):
                                answer = await http_exchange(
                                    app.ports.http, _admin_request(method, target, secret, body)
                                )
                                assert _status(answer) == 404, (method, target, answer)
                    admin_events = [getattr(r, "event", "") for r in caplog.records if r.name == "verifier.audit"]
                    assert not {"admin_refused", "revocation_created"} & set(admin_events)
                    assert app.revocation is not None and app.revocation.admin.entries() == []
                    assert (await _forward(app, token))[0] == 200

                    # The admin listener is no forward-auth door: a check asked there is not answered.
                    check = f"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n"
                    assert _status(await http_exchange(app.ports.admin, check.encode())) == 404

                    denied = await http_exchange(app.ports.admin, _admin_request(b"POST", COLLECTION, "wrong", body))
                    assert _status(denied) == 401
                    assert any(getattr(r, "event", "") == "admin_refused" for r in caplog.records)
                    created = await http_exchange(
                        app.ports.admin, _admin_request(b"POST", COLLECTION, ADMIN_TOKEN, body)
                    )
                    assert _status(created) == 201, created
                    entry = json.loads(created.split(b"\r\n\r\n", 1)[1])["id"]
                    created_lines = [r for r in caplog.records if getattr(r, "event", "") == "revocation_created"]
                    assert len(created_lines) == 1 and getattr(created_lines[0], "peer", "") == "127.0.0.1"
                assert (await _forward(app, token))[0] == 401  # enforced by the forward-auth door
                listed = await http_exchange(app.ports.admin, _admin_request(b"GET", COLLECTION + b"/", ADMIN_TOKEN))
                assert _status(listed) == 200 and entry.encode() in listed
                lifted = await http_exchange(
                    app.ports.admin, _admin_request(b"DELETE", COLLECTION + b"/" + entry.encode(), ADMIN_TOKEN)
                )
                assert _status(lifted) == 204
                assert (await _forward(app, idp.mint(sub="mallory")))[0] == 200
    finally:
        await idp.stop()


async def test_without_admin_listen_the_kill_switch_stays_on_the_forward_auth_listener(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unchanged when `admin.listen` is unset: no admin listener, the API beside forward-auth (trailing slash too)."""
    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", ADMIN_TOKEN)
    async with _lone_replica() as (_, _, app):
        assert app.ports.admin is None and app.admin is None
        listed = await http_exchange(app.ports.http, _admin_request(b"GET", COLLECTION + b"/", ADMIN_TOKEN))
        assert _status(listed) == 200
        assert _status(await http_exchange(app.ports.http, _admin_request(b"GET", COLLECTION, "x"))) == 401


async def _health(app: App) -> tuple[int, int, int, int, int]:
    """`/readyz`, `/healthz` and `/livez`'s statuses, then gRPC health's for the whole server and for Envoy's
    ext_authz service (1 SERVING, 2 NOT_SERVING)."""
    statuses = []
    for path in (b"/readyz", b"/healthz", b"/livez"):
        answer = await http_exchange(app.ports.http, b"GET %s HTTP/1.1\r\nHost: v\r\n\r\n" % path)
        statuses.append(int(answer.split(b" ", 2)[1]))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.auth.v3.Authorization"):
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            statuses.append(answer.status)
    return statuses[0], statuses[1], statuses[2], statuses[3], statuses[4]


async def _until(what: str, seconds: float, done: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + seconds
    while not await done():
        assert time.monotonic() < deadline, f"not {what} within {seconds} s"
        await asyncio.sleep(0.05)


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def test_a_replica_that_cannot_read_its_revocation_entries_is_not_ready_but_stays_live(tmp_path: Path) -> None:
    """Redis gone: the replica cannot know "no entry", so every check answers 503. Readiness (`/readyz`, gRPC
    health) says so, and the load balancer routes to replicas that can decide; liveness (`/livez`) stays OK, since
    a restart cannot bring Redis back, and so does `/healthz` (started), which the shipped Kubernetes sidecar makes
    the Kong pod's readiness: a Redis outage must not take the routes the verifier does not guard out with it.
    Once the entries are reloaded, it is ready."""
    redis = start_redis(tmp_path)
    idp = DevIdentityProvider(port=free_port())
    await idp.start()
    try:
        with SsfTransmitter(audience=RECEIVER_AUD) as tx:
            async with _replica(idp, tx, redis.url) as app:
                token = idp.mint(sub="alice")
                assert (await _forward(app, token))[0] == 200
                assert await _health(app) == (200, 200, 200, SERVING, SERVING)

                redis.stop()

                async def undecided() -> bool:
                    return (await _forward(app, token))[0] == 503

                await _until("answering 503", 10, undecided)
                await _until("reported", 2, lambda: _reports(app, NOT_SERVING))
                assert await _health(app) == (503, 200, 200, NOT_SERVING, NOT_SERVING)
                assert (await _forward(app, token))[0] == 503

                redis.start()  # same port, empty: the replica reconnects and reloads

                async def decides() -> bool:
                    return (await _forward(app, token))[0] == 200

                await _until("deciding again", 30, decides)
                await _until("reported", 2, lambda: _reports(app, SERVING))
                assert await _health(app) == (200, 200, 200, SERVING, SERVING)
    finally:
        await idp.stop()
        redis.stop()


async def _reports(app: App, status: int) -> bool:
    return (await _health(app))[3:] == (status, status)


def _jti(token: str) -> str:
    part = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))["jti"])


async def _until_refused(app: App, token: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while (await _forward(app, token))[0] != 401:
        assert time.monotonic() < deadline, "never refused"
        await asyncio.sleep(0.02)


async def test_the_kill_switch_refuses_one_leaked_token_and_a_compromised_client_on_every_replica(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real HTTP door: a `jwt_id` refuses that token (its user's others pass), a `complex` `application`
    refuses the client's tokens (another client's pass), on the replica asked and, through Redis, on the other, every
    door, though both answered them (remembered) before; lifting lets them through again."""
    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", ADMIN_TOKEN)
    redis = start_redis(tmp_path)
    idp = DevIdentityProvider(port=free_port())
    await idp.start()
    try:
        with SsfTransmitter(audience=RECEIVER_AUD) as tx:
            async with _replica(idp, tx, redis.url) as one, _replica(idp, tx, redis.url) as two:
                leaked, kept = idp.mint(sub="alice"), idp.mint(sub="alice")
                client_a = idp.mint(sub=None, claims={"client_id": "svc-a"})
                client_b = idp.mint(sub=None, claims={"client_id": "svc-b"})
                for app in (one, two):
                    for token in (leaked, kept, client_a, client_b):
                        assert (await _forward(app, token))[0] == 200

                ids = []
                for subject in (
                    {"format": "jwt_id", "iss": idp.issuer, "jti": _jti(leaked)},
                    {"format": "complex", "application": {"format": "opaque", "id": "svc-a"}},
                ):
                    body = json.dumps({"subject": subject, "reason": "incident 7"}).encode()
                    request = _admin_request(b"POST", COLLECTION, ADMIN_TOKEN, body)
                    created = await http_exchange(one.ports.http, request)
                    assert _status(created) == 201, created
                    ids.append(json.loads(created.split(b"\r\n\r\n", 1)[1])["id"])

                for app in (one, two):
                    for token in (leaked, client_a):
                        await _until_refused(app, token)
                        status, challenge = await _forward(app, token)
                        assert status == 401 and 'error="invalid_token"' in challenge and "revoked" in challenge
                        assert await _grpc_both(app, token) == (False, 16)
                    for token in (kept, client_b):
                        assert (await _forward(app, token))[0] == 200
                        assert (await _grpc_both(app, token))[0] is True

                for entry_id in ids:
                    target = COLLECTION + b"/" + entry_id.encode()
                    lifted = await http_exchange(two.ports.http, _admin_request(b"DELETE", target, ADMIN_TOKEN))
                    assert _status(lifted) == 204
                deadline = time.monotonic() + 30
                while (await _forward(one, leaked))[0] != 200 or (await _forward(one, client_a))[0] != 200:
                    assert time.monotonic() < deadline, "never lifted on replica one"
                    await asyncio.sleep(0.02)
    finally:
        await idp.stop()
        redis.stop()


async def test_an_ssf_event_naming_a_jwt_id_refuses_that_token_through_the_running_verifier() -> None:
    async with _lone_replica() as (idp, tx, app):
        leaked, kept = idp.mint(sub="bob"), idp.mint(sub="bob")
        assert (await _forward(app, leaked))[0] == 200
        event = tx.sign_set(
            {SESSION_REVOKED: {"event_timestamp": int(time.time())}},
            sub_id={"format": "jwt_id", "iss": idp.issuer, "jti": _jti(leaked)},
        )
        url = f"http://127.0.0.1:{app.ports.http}/v1/ssf/events"
        assert (await asyncio.to_thread(tx.push, url, event))[0] == 202
        status, challenge = await _forward(app, leaked)
        assert status == 401 and "session revoked" in challenge
        assert (await _forward(app, kept))[0] == 200
