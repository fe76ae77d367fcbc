"""A revocation is acknowledged only once the Redis replicas hold it (`state.redis_revocation_replicas`).

Redis replicates asynchronously: the receiver wrote to the primary, answered 202 (RFC 8935) or 200/201, and
a primary dying before a replica had the write left the promoted replica without it, the revoked tokens
passing again on every replica, the transmitter never resending. With the setting above 0 the write is
followed by `WAIT`; fewer confirmations and the sender gets 503 (an SSF transmitter and a logout sender retry,
a polled SET is not acknowledged), while the entry refuses on this replica all the same and is counted.

A real redis-server primary and a second one started `--replicaof` it on 127.0.0.1. The replica "not
confirming" is SIGSTOP: still connected to the primary, acknowledging nothing, as a lagging or partitioned one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis_harness import RedisServer, start_redis
from ssf_transmitter import ACCOUNT_DISABLED, SsfTransmitter
from support import FrozenClock, free_port
from test_revocation_redis import (
    AUD,
    IDP,
    Replicas,
    admin_request,
    principal,
    push_request,
    router_of,
    within,
)
from tokenkit import ISSUER, NOW, FakeFetcher, Mint, issuer_settings

from verifier.app import App
from verifier.config.logout import BackchannelLogoutConfig
from verifier.config.state import StateConfig
from verifier.doors.logout_http import LOGOUT_PATH
from verifier.doors.routes import HttpRequest
from verifier.revocation import RevocationService, parse_revocation_config
from verifier.revocation.entry import Effect, Entry, KeyKind, Match, SubjectKey
from verifier.revocation.logout import BACKCHANNEL_LOGOUT_EVENT
from verifier.revocation.store import REPLICA_WAIT_SECONDS
from verifier.settings import Settings
from verifier.state.base import Purpose

pytestmark = pytest.mark.integration

SYNC_S = 30.0  # seconds for the replica's first full sync with the primary (a loaded machine)
RELOAD_S = 30.0  # seconds for the verifiers to reconnect to a promoted primary and reload (backoff, a loaded machine)
HASH = "verifier:revocations"
CLIENT = "gateway-client"


@pytest.fixture
def replica(tmp_path: Path, redis_server: RedisServer) -> Iterator[RedisServer]:
    """A redis-server replicating `redis_server`, in sync before the test starts."""
    primary = SyncRedis.from_url(redis_server.url)
    try:
        primary.config_set("repl-diskless-sync-delay", 0)  # the first sync at once, not 5 s later
    finally:
        primary.close()
    server = start_redis(tmp_path, "--replicaof", "127.0.0.1", str(redis_server.port), name="replica")
    try:
        confirming(redis_server)
        yield server
    finally:
        server.stop()


def confirming(primary: RedisServer) -> None:
    """Returns once a write to the primary is confirmed by its replica (`WAIT 1`): synced, and acknowledging (a
    replica that just synced, or was just resumed, may not have acknowledged anything yet)."""
    client = SyncRedis.from_url(primary.url, socket_timeout=5)
    try:
        deadline = time.monotonic() + SYNC_S
        while True:
            client.set("probe", "1")
            if client.execute_command("WAIT", 1, 500) >= 1:
                return
            assert time.monotonic() < deadline, "the replica never confirmed a write"
    finally:
        client.close()


@pytest.fixture
def transmitter() -> Iterator[SsfTransmitter]:
    with SsfTransmitter(audience=AUD) as tx:
        yield tx


@pytest.fixture
async def group(redis_server: RedisServer, transmitter: SsfTransmitter) -> AsyncIterator[Replicas]:
    """Verifier replicas on the primary, asking one Redis replica to confirm each revocation."""
    replicas = Replicas(redis_server.url, transmitter)
    replicas.revocation_replicas = 1
    yield replicas
    await replicas.stop()


async def waits(server: RedisServer) -> int:
    """How many WAIT commands the server has run."""
    client = Redis.from_url(server.url, decode_responses=True)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


def not_replicated(service: RevocationService) -> float:
    return float(service.metrics.not_replicated._value.get())


async def test_with_a_live_replica_a_pushed_set_is_202_and_the_replica_already_holds_the_entry(
    group: Replicas, transmitter: SsfTransmitter, redis_server: RedisServer, replica: RedisServer
) -> None:
    a = await group.start()
    token = transmitter.sign_set({ACCOUNT_DISABLED: {}}, {"format": "iss_sub", "iss": IDP, "sub": "user-1"})
    before = await waits(redis_server)  # the fixture's own
    answer = await router_of(a).dispatch(push_request(token))
    assert answer.status == 202, answer.body
    client = Redis.from_url(replica.url)
    try:  # no waiting: the 202 came after the replica confirmed
        held = [json.loads(v)["key"] for k, v in (await client.hgetall(HASH)).items() if not k.startswith(b"~")]
    finally:
        await client.aclose()
    assert len(held) == 1 and "user-1" in json.dumps(held)
    assert await waits(redis_server) == before + 1
    # the decision path and the one-time keys never wait
    assert a.revocations.check(principal("user-1")) is not None
    assert a.revocations.check(principal("user-2")) is None
    await group.started[0][1].first_use("dpop-proof-jti", 10.0, purpose=Purpose.DPOP)
    assert await waits(redis_server) == before + 1
    assert not_replicated(a) == 0


async def test_with_the_replica_not_confirming_a_pushed_set_is_503_refused_here_and_counted(
    group: Replicas, transmitter: SsfTransmitter, redis_server: RedisServer, replica: RedisServer
) -> None:
    a, b = await group.start(), await group.start()
    token = transmitter.sign_set({ACCOUNT_DISABLED: {}}, {"format": "iss_sub", "iss": IDP, "sub": "user-3"})
    replica.pause()
    try:
        started = time.monotonic()
        answer = await router_of(a).dispatch(push_request(token))
        waited = time.monotonic() - started
    finally:
        replica.resume()
    assert answer.status == 503, answer.body  # a 5xx: the transmitter retries (RFC 8935 section 2.4)
    assert waited >= REPLICA_WAIT_SECONDS * 0.9  # it gave the replica its time
    assert json.loads(answer.body) == {"err": "temporarily_unavailable"}
    assert any(name == "retry-after" for name, _ in answer.headers)
    assert not_replicated(a) == 1
    refused = a.revocations.check(principal("user-3"))  # fail closed: in effect here all the same
    assert refused is not None and refused.code == "account_disabled"
    # the transmitter's retry, once the replica confirms: accepted (the jti was not marked received)
    await asyncio.to_thread(confirming, redis_server)
    retried = await router_of(b).dispatch(push_request(token))
    assert retried.status == 202, retried.body
    assert not_replicated(b) == 0
    assert len(await stored(redis_server)) == 1  # the retry's entry has the same id: stored once


async def test_with_the_replica_not_confirming_the_kill_switch_answers_503_and_refuses_here(
    group: Replicas, replica: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    a = await group.start()
    caplog.set_level(logging.INFO, logger="verifier.audit")
    replica.pause()
    try:
        created = await router_of(a).dispatch(
            admin_request(
                "POST", document={"subject": {"format": "iss_sub", "iss": IDP, "sub": "user-4"}, "effect": "disable"}
            )
        )
    finally:
        replica.resume()
    assert created.status == 503, created.body
    assert ("x-verifier-reason", "state_unavailable") in created.headers
    assert any(name == "retry-after" for name, _ in created.headers)
    assert a.revocations.check(principal("user-4")) is not None
    assert not_replicated(a) == 1
    # in effect, so on the audit log like any entry made, though answered 503
    assert "revocation_created" in [r.getMessage() for r in caplog.records if r.name == "verifier.audit"]


async def stored(server: RedisServer) -> list[dict[str, object]]:
    """The entries in the server's hash."""
    client = Redis.from_url(server.url)
    try:
        return [json.loads(v) for k, v in (await client.hgetall(HASH)).items() if not k.startswith(b"~")]
    finally:
        await client.aclose()


async def test_the_operators_retry_after_a_503_leaves_one_entry_everywhere_and_one_lift_lifts_it(
    group: Replicas, redis_server: RedisServer, replica: RedisServer
) -> None:
    a, b = await group.start(), await group.start()
    document = {"subject": {"format": "iss_sub", "iss": IDP, "sub": "user-10"}, "effect": "disable"}
    replica.pause()
    try:
        refused = await router_of(a).dispatch(admin_request("POST", document=document))
    finally:
        replica.resume()
    assert refused.status == 503, refused.body
    await asyncio.to_thread(confirming, redis_server)
    retried = await router_of(b).dispatch(admin_request("POST", document=document))  # the retry, on another replica
    assert retried.status == 201, retried.body
    entry_id = json.loads(retried.body)["id"]
    assert [e["id"] for e in await stored(redis_server)] == [entry_id]
    assert [e["id"] for e in await stored(replica)] == [entry_id]  # WAIT confirmed the retry: the replica has it
    for service in (a, b):
        listed = json.loads((await router_of(service).dispatch(admin_request("GET"))).body)["entries"]
        assert [e["id"] for e in listed] == [entry_id]
    lifted = await router_of(a).dispatch(admin_request("DELETE", f"/v1/admin/revocations/{entry_id}"))
    assert lifted.status == 204
    assert await stored(redis_server) == []
    await within(5.0, lambda: b.revocations.check(principal("user-10")) is None)
    assert a.revocations.check(principal("user-10")) is None


async def test_lifting_a_claims_override_waits_for_the_replica_and_lifting_a_refusal_does_not(
    group: Replicas, redis_server: RedisServer, replica: RedisServer
) -> None:
    """A lost lift of a refusal re-revokes (fail closed): not waited for. A claims override from a `replace`
    transmitter may have raised a token's claims, and its lift, lost in a failover, would hand them back: the
    operator is not told 204 before the replica has it."""
    a = await group.start()
    now = time.time()
    override = Entry(
        id="ev-raised-scope",
        key=SubjectKey(KeyKind.ISS_SUB, "user-11", IDP),
        effect=Effect.CLAIMS_OVERRIDE,
        match=Match.ISSUED_BEFORE,
        event_time=now,
        expires_at=now + 600,
        source="https://tx.example.test",
        event="https://schemas.openid.net/secevent/caep/event-type/token-claims-change",
        overrides={"scope": "read admin"},
    )
    await a.add([override])
    created = await router_of(a).dispatch(
        admin_request("POST", document={"subject": {"format": "iss_sub", "iss": IDP, "sub": "user-12"}})
    )
    assert created.status == 201, created.body
    refusal = json.loads(created.body)["id"]
    before = await waits(redis_server)
    replica.pause()
    try:
        lifted_refusal = await router_of(a).dispatch(admin_request("DELETE", f"/v1/admin/revocations/{refusal}"))
        assert await waits(redis_server) == before
        lifted_override = await router_of(a).dispatch(admin_request("DELETE", f"/v1/admin/revocations/{override.id}"))
    finally:
        replica.resume()
    assert lifted_refusal.status == 204, lifted_refusal.body
    assert lifted_override.status == 503, lifted_override.body
    assert ("x-verifier-reason", "state_unavailable") in lifted_override.headers
    assert await waits(redis_server) == before + 1
    assert not_replicated(a) == 1
    # lifted all the same, on the primary and here: the override no longer applies
    assert a.revocations.overrides(principal("user-11")) is None
    assert await stored(redis_server) == []


def cut_off(replica: RedisServer) -> None:
    """The replica loses its primary (a partition): it keeps its data set and receives nothing more. (SIGSTOP would
    not do here: what the primary sent waits in the paused replica's socket and is applied once it runs again.)"""
    client = SyncRedis.from_url(replica.url, socket_timeout=5)
    try:
        client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # nobody there
    finally:
        client.close()


def promoted(old_primary: RedisServer, replica: RedisServer) -> None:
    """A failover: the primary dies with what only it had, its replica is promoted, and the verifiers' address
    (the old primary's port, as a Sentinel-managed or managed Redis's endpoint) leads to the promoted data set."""
    old_primary.stop()
    client = SyncRedis.from_url(replica.url, socket_timeout=5)
    try:
        client.execute_command("REPLICAOF", "NO", "ONE")
        client.config_set("repl-diskless-sync-delay", 0)
    finally:
        client.close()
    old_primary.args = ("--replicaof", "127.0.0.1", str(replica.port))
    old_primary.start()  # the same port, a copy of the promoted replica's data set
    client = SyncRedis.from_url(old_primary.url, socket_timeout=5)
    try:
        deadline = time.monotonic() + SYNC_S
        while client.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "never synced with the promoted replica"
            time.sleep(0.05)
        client.execute_command("REPLICAOF", "NO", "ONE")
    finally:
        client.close()


async def test_a_revocation_answered_503_survives_a_failover_to_a_replica_that_never_had_it(
    redis_server: RedisServer, transmitter: SsfTransmitter, replica: RedisServer
) -> None:
    """The operator was told 503 and may never retry: the replica that applied the entry keeps it through the reload
    from the promoted primary that lacks it, and writes it there again, so every replica refuses again."""
    fast = Replicas(redis_server.url, transmitter)
    fast.revocation_replicas = 1
    fast.config = dataclasses.replace(fast.config, resync_interval_seconds=1)
    try:
        a, b = await fast.start(), await fast.start()
        user = principal("user-13")
        await asyncio.to_thread(cut_off, replica)
        created = await router_of(a).dispatch(
            admin_request(
                "POST", document={"subject": {"format": "iss_sub", "iss": IDP, "sub": "user-13"}, "effect": "disable"}
            )
        )
        assert created.status == 503, created.body
        await within(5.0, lambda: b.revocations.check(user) is not None)  # heard of it from the primary
        await asyncio.to_thread(promoted, redis_server, replica)
        reloads = a.metrics.syncs.labels("ok")._value.get()
        await within(RELOAD_S, lambda: a.metrics.syncs.labels("ok")._value.get() >= reloads + 2)
        assert a.revocations.loaded
        assert a.revocations.check(user) is not None, "the reload from the new primary dropped it"
        assert ["user-13" in json.dumps(e["key"]) for e in await stored(redis_server)] == [True]  # written again
        await within(RELOAD_S, lambda: b.revocations.loaded and b.revocations.check(user) is not None)
    finally:
        await fast.stop()


async def test_default_zero_asks_no_replica_and_acknowledges_as_before(
    redis_server: RedisServer, transmitter: SsfTransmitter, replica: RedisServer
) -> None:
    """`state.redis_revocation_replicas: 0`: no WAIT, a replica that confirms nothing changes nothing."""
    zero = Replicas(redis_server.url, transmitter)
    zero.revocation_replicas = 0
    try:
        a = await zero.start()
        token = transmitter.sign_set({ACCOUNT_DISABLED: {}}, {"format": "iss_sub", "iss": IDP, "sub": "user-5"})
        before = await waits(redis_server)  # the fixture's own
        replica.pause()
        try:
            answer = await router_of(a).dispatch(push_request(token))
            created = await router_of(a).dispatch(
                admin_request(
                    "POST",
                    document={"subject": {"format": "iss_sub", "iss": IDP, "sub": "user-6"}, "effect": "disable"},
                )
            )
        finally:
            replica.resume()
        assert answer.status == 202 and created.status == 201
        assert await waits(redis_server) == before
        assert not_replicated(a) == 0
    finally:
        await zero.stop()


async def test_with_the_replica_not_confirming_a_polled_set_is_not_acknowledged_until_it_does(
    redis_server: RedisServer, transmitter: SsfTransmitter, replica: RedisServer
) -> None:
    """RFC 8936: a SET whose jti is not in `ack` (nor in `setErrs`, which is final) is delivered again."""
    polling = Replicas(redis_server.url, transmitter)
    polling.revocation_replicas = 1
    polling.config = parse_revocation_config(
        {
            "transmitters": [
                {
                    "issuer": transmitter.issuer,
                    "audience": AUD,
                    "delivery": "poll",
                    "algorithms": ["ES256"],
                    "subjects_of": [IDP],
                    "poll_interval_seconds": 0.1,
                    "allow_insecure_http": True,
                }
            ],
            "resync_interval_seconds": 30,
        }
    )
    try:
        replica.pause()
        try:
            a = await polling.start()
            jti = transmitter.enqueue(
                transmitter.sign_set({ACCOUNT_DISABLED: {}}, {"format": "iss_sub", "iss": IDP, "sub": "user-7"})
            )
            deadline = time.monotonic() + 10
            while not_replicated(a) < 2:  # delivered, not confirmed, delivered again
                assert jti not in transmitter.acked, "acknowledged though no replica confirmed it"
                assert time.monotonic() < deadline, "the SET was not delivered twice"
                await asyncio.sleep(0.05)
            assert jti not in transmitter.acked and jti not in transmitter.set_errs
            assert a.revocations.check(principal("user-7")) is not None
        finally:
            replica.resume()
        deadline = time.monotonic() + 10
        while jti not in transmitter.acked:
            assert time.monotonic() < deadline, "the SET was never acknowledged once the replica confirmed"
            await asyncio.sleep(0.05)
        assert jti not in transmitter.set_errs
    finally:
        await polling.stop()


# -- back-channel logout (OpenID Connect Back-Channel Logout 1.0) -----------------------------------------------


@pytest.fixture
async def logout_app(redis_server: RedisServer, clock: FrozenClock, fetcher: FakeFetcher) -> AsyncIterator[App]:
    """The root with one issuer accepting logout tokens, its state in the primary, one replica to confirm."""
    issuer = issuer_settings(algorithms=("ES256",), backchannel_logout=BackchannelLogoutConfig(audiences=(CLIENT,)))
    state = StateConfig(redis_url=redis_server.url, key_prefix="verifier:", redis_revocation_replicas=1)
    app = App(
        Settings(grpc=None, http=None, metrics=None, issuers=(issuer,), state=state), clock=clock, fetcher=fetcher
    )
    assert app.revocation is not None
    await app.revocation.resync()
    yield app
    await app.revocation.stop()
    await app.state.close()


def logout_request(mint: Mint, jti: str) -> HttpRequest:
    claims = {
        "iss": ISSUER,
        "aud": CLIENT,
        "iat": int(NOW),
        "exp": int(NOW) + 120,
        "jti": jti,
        "sub": "user-8",
        "events": {BACKCHANNEL_LOGOUT_EVENT: {}},
    }
    token = mint(claims, alg="ES256", headers={"typ": "logout+jwt"})
    return HttpRequest(
        "POST",
        LOGOUT_PATH,
        "",
        {"content-type": "application/x-www-form-urlencoded"},
        ("logout_token=" + token).encode(),
    )


async def test_with_the_replica_not_confirming_a_backchannel_logout_is_not_200_and_refuses_here(
    logout_app: App, mint: Mint, redis_server: RedisServer, replica: RedisServer
) -> None:
    service = logout_app.revocation
    assert service is not None
    who = principal("user-8")._replace(
        issuer=ISSUER, claims={"iss": ISSUER, "sub": "user-8", "iat": NOW - 10, "exp": NOW + 300}
    )
    replica.pause()
    try:
        answer = await logout_app.router.dispatch(logout_request(mint, "logout-1"))
    finally:
        replica.resume()
    assert answer.status == 503, answer.body  # the logout is not confirmed: not 200, the provider may retry
    assert json.loads(answer.body)["error"] == "temporarily_unavailable"
    assert ("cache-control", "no-store") in answer.headers
    assert service.revocations.check(who) is not None
    assert not_replicated(service) == 1
    await asyncio.to_thread(confirming, redis_server)
    retried = await logout_app.router.dispatch(logout_request(mint, "logout-1"))  # the same token, again
    assert retried.status == 200, retried.body
