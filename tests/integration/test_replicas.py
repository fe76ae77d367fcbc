"""Two verifier replicas sharing a real redis-server: behind nginx round-robin, a replica killed under load
costs only the requests in flight and never allows a bad token; DPoP proofs and WebAuthn challenges
accepted by one replica are replays at the other; with Redis down, replay-checked requests fail closed
(503 state_unavailable) while plain bearer tokens keep working."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from gateways import GatewayProcess, LocalIssuer, http_request, verifier_unusable_reason
from redis_harness import RedisServer
from replicas import (
    API_HOST,
    Planned,
    dpop_call,
    dpop_proof,
    forward_auth,
    forward_auth_decisions,
    kill_replica,
    public_jwk,
    run_load,
    start_nginx_pool,
    start_replicas,
    worker_pids,
)
from support import StallMeter
from webauthnkit import SoftAuthenticator, encode_header

from verifier.binding.dpop import thumbprint
from verifier.config.state import MAX_TIMEOUT_SECONDS

pytestmark = pytest.mark.integration

CONCURRENCY = 8  # client threads, each with one keep-alive connection to nginx
REQUESTS_PER_CLIENT = 400  # 3200 requests in all
KILL_AFTER = CONCURRENCY * REQUESTS_PER_CLIENT // 3  # answered requests before replica A is SIGKILLed
MAX_DISRUPTED = CONCURRENCY * 2  # requests allowed to go wrong around the kill (none may be allowed wrongly)
SURVIVOR_CHECKS = 200
WEBAUTHN_ORIGIN = "http://localhost:9555"
ORPHAN_GRACE_SECONDS = 3.0  # a worker whose supervisor died must stop serving within this long
WEBAUTHN_SECRET = "replicas-share-this-webauthn-secret-0123456789"


@pytest.fixture(scope="module", autouse=True)
def _verifier_runs() -> None:
    reason = verifier_unusable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def issuer() -> Iterator[LocalIssuer]:
    idp = LocalIssuer()
    yield idp
    idp.stop()


# Seconds per Redis operation where Redis is down on purpose: its failure must show soon (the product's default
# is 0.25 s; a loaded CI runner needs a little more).
OUTAGE_TIMEOUT = 0.5
OUTAGE_DEADLINE = 2.0  # seconds: the decision deadline of the replicas whose Redis goes down


def _state(redis_server: RedisServer, timeout: float = MAX_TIMEOUT_SECONDS) -> dict[str, Any]:
    # Where Redis stays up, the most the product accepts per operation: these tests are about state shared across
    # replicas, and a runner stalled past a short timeout turns a replay check into 503 state_unavailable.
    return {"state": {"redis_url": redis_server.url, "key_prefix": "replicas:", "timeout_seconds": timeout}}


def _pair(tmp_path: Path, issuer: LocalIssuer, state: dict[str, Any]) -> Iterator[list[GatewayProcess]]:
    replicas = start_replicas(tmp_path, issuer=issuer.issuer, extra_config=state)
    yield replicas
    for replica in replicas:
        replica.stop()


@pytest.fixture
def pair(tmp_path: Path, issuer: LocalIssuer, redis_server: RedisServer) -> Iterator[list[GatewayProcess]]:
    yield from _pair(tmp_path, issuer, _state(redis_server))


@pytest.fixture
def outage_pair(tmp_path: Path, issuer: LocalIssuer, redis_server: RedisServer) -> Iterator[list[GatewayProcess]]:
    # The decision deadline well above OUTAGE_TIMEOUT: these tests ask for Redis's own failure (503
    # state_unavailable); with the default 0.8 s, a runner stalled 0.3 s during a hung Redis's 0.5 s answered the
    # deadline's 503 provider_unavailable first (a CI run).
    yield from _pair(tmp_path, issuer, {**_state(redis_server, OUTAGE_TIMEOUT), "deadline_seconds": OUTAGE_DEADLINE})


def _expired(issuer: LocalIssuer) -> str:
    now = int(time.time())
    return issuer.mint(iat=now - 7200, nbf=now - 7200, exp=now - 3600)


def _garbage(rng: random.Random, issuer: LocalIssuer) -> list[str]:
    """Tokens no replica may ever accept: noise, a foreign signature, alg none, a wrong audience."""
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"at+jwt"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(json.dumps({"iss": issuer.issuer, "sub": "mallory"}).encode()).rstrip(b"=")
    return [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-_") for _ in range(40)),
        "a.b.c",
        f"{header}.{body.decode()}.",
        issuer.mint(signing_key=ec.generate_private_key(ec.SECP256R1())),
        issuer.mint(aud="https://elsewhere.example.test"),
        jwt.encode(
            {"iss": issuer.issuer, "sub": "mallory", "aud": issuer.audience},
            "k" * 32,
            algorithm="HS256",
            headers={"kid": issuer.kid},
        ),
    ]


# --- one replica killed under load --------------------------------------------------------------------


def test_a_replica_killed_under_load_costs_only_in_flight_requests_and_never_allows_a_bad_token(
    tmp_path: Path, issuer: LocalIssuer, pair: list[GatewayProcess]
) -> None:
    a, b = pair
    nginx = start_nginx_pool(tmp_path, [r.extra["http_port"] for r in pair])
    try:
        rng = random.Random(9449)
        valid = [issuer.mint(sub=f"user-{i}") for i in range(16)]
        expired = [_expired(issuer) for _ in range(8)]
        garbage = _garbage(rng, issuer)
        key = ec.generate_private_key(ec.SECP256R1())
        bound = issuer.mint(sub="dpop-user", cnf={"jkt": thumbprint(public_jwk(key))})
        url = f"http://{API_HOST}/api/resource"
        # A proof one replica has accepted: from now on it must be refused wherever round-robin sends it.
        used = dpop_proof(key, "GET", url, bound)
        first = http_request(
            f"{nginx.url}/api/resource", headers={"Host": API_HOST, "Authorization": f"DPoP {bound}", "DPoP": used}
        )
        assert first.status == 200, first

        # Warm-up: both replicas fetch the keys and take traffic before the load starts.
        for i in range(20):
            r = http_request(
                f"{nginx.url}/api/resource",
                headers={"Host": API_HOST, "Authorization": f"Bearer {valid[i % len(valid)]}"},
            )
            assert r.status == 200, r
        assert forward_auth_decisions(a) > 0 and forward_auth_decisions(b) > 0, "round-robin reached one replica"

        def bearer(token: str) -> Any:
            return lambda: {"Authorization": f"Bearer {token}"}

        def fresh_dpop() -> dict[str, str]:
            return {"Authorization": f"DPoP {bound}", "DPoP": dpop_proof(key, "GET", url, bound)}

        def plan_item() -> Planned:
            roll = rng.random()
            if roll < 0.40:
                return Planned(category="valid", allow=True, headers=bearer(rng.choice(valid)))
            if roll < 0.55:
                return Planned(category="expired", allow=False, headers=bearer(rng.choice(expired)))
            if roll < 0.75:
                return Planned(category="garbage", allow=False, headers=bearer(rng.choice(garbage)))
            if roll < 0.80:
                return Planned(category="no_token", allow=False, headers=dict)
            if roll < 0.90:
                return Planned(category="dpop", allow=True, headers=fresh_dpop)
            return Planned(
                category="dpop_replay", allow=False, headers=lambda: {"Authorization": f"DPoP {bound}", "DPoP": used}
            )

        plans = [[plan_item() for _ in range(REQUESTS_PER_CLIENT)] for _ in range(CONCURRENCY)]
        a_workers = worker_pids(a)
        assert a_workers, "the supervisor forked no worker"
        report = run_load(nginx.url, plans, kill=lambda: kill_replica(a), kill_after=KILL_AFTER)

        assert a.proc.wait(timeout=5) == -9, "replica A was not SIGKILLed"
        for pid in a_workers:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        assert report.killed_at is not None
        total = len(report.outcomes)
        assert total == CONCURRENCY * REQUESTS_PER_CLIENT
        after_kill = [o for o in report.outcomes if o.finished > report.killed_at]
        assert len(after_kill) >= total // 3, "the kill did not happen mid-load"

        # Never: a bad token reaching the application, whichever replica answered or died.
        assert report.wrongly_allowed == [], report.wrongly_allowed[:5]
        # Bounded: wrong answers (5xx, connection errors, a proof the dying replica had burnt) are few and
        # come at or after the kill.
        incorrect = report.incorrect
        assert len(incorrect) <= MAX_DISRUPTED, [(o.category, o.status, o.reason) for o in incorrect[:20]]
        assert all(o.finished >= report.killed_at - 0.5 for o in incorrect), incorrect[:5]
        for category in ("valid", "dpop"):
            assert any(o.category == category and o.status == 200 for o in after_kill), category

        # Then the survivor alone serves everything correctly.
        served_before = forward_auth_decisions(b)
        for i in range(SURVIVOR_CHECKS):
            item = plan_item()
            r = http_request(f"{nginx.url}{item.path}", headers={"Host": API_HOST, **item.headers()})
            assert (r.status == 200) if item.allow else (r.status in (401, 403)), (
                i,
                item.category,
                r.status,
                r.headers,
            )
        assert forward_auth_decisions(b) - served_before >= SURVIVOR_CHECKS
        assert report.ended - report.started < 30, "the load took far too long"
    finally:
        nginx.stop()


# --- DPoP replay across replicas ----------------------------------------------------------------------


def test_a_dpop_proof_accepted_by_one_replica_is_a_replay_at_the_other(
    issuer: LocalIssuer, pair: list[GatewayProcess]
) -> None:
    a, b = pair
    key = ec.generate_private_key(ec.SECP256R1())
    token = issuer.mint(cnf={"jkt": thumbprint(public_jwk(key))})
    url = f"https://{API_HOST}/orders/7"
    for first, second in ((a, b), (b, a)):
        call = dpop_call(token, dpop_proof(key, "POST", url, token))
        accepted = call(first)
        assert accepted.status == 200, accepted
        replayed = call(second)
        assert replayed.status == 401, replayed
        assert replayed.headers["www-authenticate"].startswith('DPoP realm="verifier", error="invalid_dpop_proof"')
        assert call(first).status == 401  # and on the replica that accepted it
    # Many replays raced at both replicas: exactly one wins.
    call = dpop_call(token, dpop_proof(key, "POST", url, token))
    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(lambda i: call(pair[i % 2]).status, range(32)))
    assert sorted(statuses) == [200] + [401] * 31, statuses


# --- WebAuthn replay across replicas ------------------------------------------------------------------


@pytest.fixture
def webauthn_pair(
    tmp_path: Path, issuer: LocalIssuer, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[GatewayProcess]]:
    monkeypatch.setenv("VERIFIER_WEBAUTHN_SECRET", WEBAUTHN_SECRET)  # start_verifier passes os.environ on
    config = {
        **_state(redis_server),
        "policies": [
            {"name": "pay", "match": {"path_prefix": "/pay"}, "require": {"step_up": "webauthn"}},
            {"name": "rest", "match": {"path_prefix": "/"}},
        ],
        "webauthn": {
            "rp_id": "localhost",
            "origins": [WEBAUTHN_ORIGIN],
            "secret_env": "VERIFIER_WEBAUTHN_SECRET",
            "storage": {"sqlite_path": str(tmp_path / "webauthn.sqlite3")},
            "demo": False,
        },
    }
    replicas = start_replicas(tmp_path, issuer=issuer.issuer, extra_config=config)
    yield replicas
    for replica in replicas:
        replica.stop()


def _register(
    begin_at: GatewayProcess, complete_at: GatewayProcess, token: str, authenticator: SoftAuthenticator
) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    begun = http_request(f"{begin_at.url}/v1/webauthn/register/begin", method="POST", headers=auth, body=b"{}")
    assert begun.status == 200, begun
    document = begun.json()
    credential = authenticator.create(document["publicKey"], origin=WEBAUTHN_ORIGIN)
    body = json.dumps({"state": document["state"], "credential": credential, "name": "key"}).encode()
    done = http_request(f"{complete_at.url}/v1/webauthn/register/complete", method="POST", headers=auth, body=body)
    assert done.status == 201, done
    # The registration state is single-use across replicas too.
    again = http_request(f"{begin_at.url}/v1/webauthn/register/complete", method="POST", headers=auth, body=body)
    assert again.status == 400 and again.json()["error"] == "webauthn_state_replayed", again
    return {"state": document["state"], "credential": credential}


def _challenge(replica: GatewayProcess, token: str, uri: str) -> str:
    refused = forward_auth(replica, authorization=f"Bearer {token}", method="POST", uri=uri)
    assert refused.status == 401, refused
    header = refused.headers["www-authenticate"]
    assert header.startswith("WebAuthn "), header
    return header.split('challenge="', 1)[1].split('"', 1)[0]


def test_a_webauthn_assertion_accepted_by_one_replica_is_a_replay_at_the_other(
    issuer: LocalIssuer, webauthn_pair: list[GatewayProcess]
) -> None:
    a, b = webauthn_pair
    token = issuer.mint(sub="payer")
    authenticator = SoftAuthenticator()
    _register(a, b, token, authenticator)  # begun at A, completed at B: the state's HMAC key is shared
    uri = "/pay/transfer"
    for issuer_replica, first, second in ((b, a, b), (a, b, a)):
        # A challenge issued by one replica, answered at another, replayed at either.
        challenge = _challenge(issuer_replica, token, uri)
        header = encode_header(authenticator.get(challenge, origin=WEBAUTHN_ORIGIN))
        call = functools.partial(
            forward_auth,
            authorization=f"Bearer {token}",
            method="POST",
            uri=uri,
            headers={"X-WebAuthn-Assertion": header},
        )
        accepted = call(first)
        assert accepted.status == 200, accepted
        replayed = call(second)
        assert replayed.status == 401, replayed
        assert replayed.headers["x-verifier-reason"] == "webauthn_challenge_replayed", replayed.headers
        assert replayed.headers["www-authenticate"].startswith("WebAuthn ")  # with a fresh challenge
        assert call(first).headers["x-verifier-reason"] == "webauthn_challenge_replayed"


# --- Redis down -------------------------------------------------------------------------------------


def test_with_redis_down_dpop_fails_closed_and_bearer_tokens_keep_working(
    issuer: LocalIssuer, outage_pair: list[GatewayProcess], redis_server: RedisServer
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    bound = issuer.mint(cnf={"jkt": thumbprint(public_jwk(key))})
    url = f"https://{API_HOST}/api/x"

    def dpop_call(replica: GatewayProcess) -> Any:
        proof = dpop_proof(key, "GET", url, bound)
        return forward_auth(replica, authorization=f"DPoP {bound}", uri="/api/x", headers={"DPoP": proof})

    pair = outage_pair

    def until_replay_checks_work() -> None:
        # a replica stalled past OUTAGE_TIMEOUT on a loaded runner answers 503 state_unavailable: asked again
        deadline = time.monotonic() + 10
        for replica in pair:
            while (status := dpop_call(replica).status) != 200:
                assert status == 503 and time.monotonic() < deadline, status
                time.sleep(0.1)

    until_replay_checks_work()
    for replica in pair:
        assert forward_auth(replica, authorization=f"Bearer {issuer.mint()}", uri="/api/x").status == 200

    for outage in ("stopped", "hung"):
        if outage == "stopped":
            redis_server.stop()
        else:
            redis_server.pause()
        try:
            for replica in pair:
                for _ in range(3):
                    with StallMeter() as machine:
                        started = time.monotonic()
                        r = dpop_call(replica)
                        took = time.monotonic() - started
                    assert r.status == 503, (outage, r)
                    assert r.headers["x-verifier-reason"] == "state_unavailable", (outage, r.headers)
                    assert "retry-after" in r.headers
                    # less how long a loaded machine held this process
                    assert took - machine.late < 3.0, f"a dead Redis held the gateway {took:.2f} s"
                # A token never seen before, so the answer comes from a full check, not a cache.
                fresh = forward_auth(replica, authorization=f"Bearer {issuer.mint()}", uri="/api/x")
                assert fresh.status == 200, (outage, fresh)
                assert forward_auth(replica, authorization=f"Bearer {_expired(issuer)}", uri="/api/x").status == 401
                assert forward_auth(replica, authorization=f"DPoP {bound}", uri="/api/x").status != 200  # no proof
        finally:
            if outage == "stopped":
                redis_server.start()  # same port, empty
            else:
                redis_server.resume()
        until_replay_checks_work()  # back: on both replicas (after the client reconnects)


# --- a SIGKILLed supervisor must not leave a worker serving -------------------------------------------


def test_a_worker_stops_serving_when_its_supervisor_is_sigkilled(tmp_path: Path, issuer: LocalIssuer) -> None:
    # `verifier serve` always forks its workers (even `workers: 1`); an orphaned worker would keep serving the
    # replica's ports with a stale config that no SIGHUP or restart reaches.
    (replica,) = start_replicas(tmp_path, issuer=issuer.issuer, count=1)
    workers = worker_pids(replica)
    try:
        assert workers, "the supervisor forked no worker"
        os.kill(replica.proc.pid, signal.SIGKILL)
        assert replica.proc.wait(timeout=5) == -signal.SIGKILL
        deadline = time.monotonic() + ORPHAN_GRACE_SECONDS
        while time.monotonic() < deadline:
            try:
                http_request(f"{replica.url}/healthz", timeout=5)
            except (ConnectionRefusedError, ConnectionResetError):
                break  # nobody listens any more: the worker went down with its supervisor
            except TimeoutError:
                pass  # a loaded machine's slow answer is not "nobody listens"
            time.sleep(0.1)
        else:
            pytest.fail(
                f"worker(s) {workers} still serve {replica.url} {ORPHAN_GRACE_SECONDS}s after the supervisor died"
            )
    finally:
        for pid in workers:  # only the workers this test started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
