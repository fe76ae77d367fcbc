"""Replay bounds per purpose, through the composition root: a client's flood of DPoP proofs fills the DPoP part
of the replay store (memory, SQLite, and Redis shared by two replicas) and nothing else. SETs pushed to
`POST /v1/ssf/events`, logout tokens posted to `POST /v1/backchannel-logout` and kill-switch entries posted to
`POST /v1/admin/revocations` (the root's router, the real handlers) are still accepted, WebAuthn challenges still
taken, and the refused proofs' Retry-After says when the DPoP part has room again.

Before, one bound was shared: the flood made the SSF and logout endpoints answer 503 `replay_store_full`, so a
client delayed the revocations the product promises within a second. With Redis there was no bound at all but
Redis's `maxmemory`: the flood went on until Redis refused every write, revocations' included.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from redis_harness import start_redis
from ssf_transmitter import ACCOUNT_DISABLED, SsfTransmitter
from support import FrozenClock
from tokenkit import ISSUER, NOW, FakeFetcher, Mint, issuer_settings, public_jwk

from verifier.app import App
from verifier.binding.dpop import access_token_hash
from verifier.config.dpop import DpopConfig
from verifier.config.logout import BackchannelLogoutConfig
from verifier.config.state import StateConfig
from verifier.doors.logout_http import LOGOUT_PATH
from verifier.doors.refusals import refuse
from verifier.doors.routes import HttpRequest
from verifier.errors import ReplayStoreFull
from verifier.principal import Principal
from verifier.revocation import parse_revocation_config
from verifier.revocation.logout import BACKCHANNEL_LOGOUT_EVENT
from verifier.settings import Settings
from verifier.state.base import Purpose
from verifier.state.redis import RedisState

TX = "https://ssf.example.test"
RECEIVER = "https://verifier.example.test/ssf"
CLIENT = "gateway-client"
URL = "https://api.example.test/orders"
TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEifQ.c2ln"  # only its hash matters
USER = {"format": "iss_sub", "iss": ISSUER, "sub": "user-1"}
TOTAL = 1_000  # max_replay_entries: 960 for DPoP, 20 for WebAuthn, 20 for revocation events (the default shares)
ADMIN = "replay-isolation-admin-" + "a" * 32


def root(clock: FrozenClock, fetcher: FakeFetcher, state: StateConfig, transmitter: SsfTransmitter) -> App:
    """The root with DPoP, an SSF push transmitter, back-channel logout and the kill switch, on `state`."""
    revocation = parse_revocation_config(
        {
            "transmitters": [
                {"issuer": TX, "audience": RECEIVER, "delivery": "push", "algorithms": ["ES256"],
                 "max_age_seconds": 300, "subjects_of": [ISSUER]}
            ],
            "max_token_lifetime_seconds": 3600,
        }
    )
    issuer = issuer_settings(backchannel_logout=BackchannelLogoutConfig(audiences=(CLIENT,)))
    settings = Settings(
        grpc=None, http=None, metrics=None, issuers=(issuer,), revocation=revocation, dpop=DpopConfig(), state=state
    )
    app = App(settings, clock=clock, fetcher=fetcher)
    app.transmitter = transmitter  # type: ignore[attr-defined]
    return app


async def started(app: App) -> App:
    assert app.revocation is not None
    await app.revocation.start()
    return app


async def stopped(app: App) -> None:
    assert app.revocation is not None
    await app.revocation.stop()
    await app.state.close()


def transmitter_for(clock: FrozenClock, fetcher: FakeFetcher) -> SsfTransmitter:
    transmitter = SsfTransmitter(audience=RECEIVER, issuer=TX, now=clock.now)
    fetcher.serve(transmitter.configuration_url, transmitter.configuration())
    fetcher.serve(transmitter.jwks_url, transmitter.jwks())
    return transmitter


@pytest.fixture(params=["memory", "sqlite"])
async def app(request: pytest.FixtureRequest, clock: FrozenClock, fetcher: FakeFetcher, tmp_path: Path) -> Any:
    """The root on the local store of one kind."""
    state = StateConfig(max_replay_entries=TOTAL, path=str(tmp_path) if request.param == "sqlite" else None)
    app = await started(root(clock, fetcher, state, transmitter_for(clock, fetcher)))
    yield app
    await stopped(app)


@pytest.fixture
async def redis_replicas(
    clock: FrozenClock, fetcher: FakeFetcher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[App, App]]:
    """Two roots (two replicas of one deployment) on one real redis-server, with the kill switch's token set."""
    server = start_redis(tmp_path)
    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", ADMIN)
    state = StateConfig(redis_url=server.url, key_prefix="iso:", redis_max_replay_entries=TOTAL)
    transmitter = transmitter_for(clock, fetcher)
    apps = []
    try:
        for _ in range(2):
            apps.append(await started(root(clock, fetcher, state, transmitter)))
        yield apps[0], apps[1]
    finally:
        for app in apps:
            await stopped(app)
        server.stop()


def proof(key: ec.EllipticCurvePrivateKey, clock: FrozenClock) -> str:
    """A fresh DPoP proof (a new jti) for `URL`, as any authenticated client can mint them."""
    claims = {"jti": str(uuid.uuid4()), "htm": "GET", "htu": URL, "iat": int(clock.now())}
    claims["ath"] = access_token_hash(TOKEN)
    return jwt.encode(claims, key, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": public_jwk(key)})


async def flood(app: App, key: ec.EllipticCurvePrivateKey, clock: FrozenClock) -> tuple[int, ReplayStoreFull]:
    """Sends fresh proofs until the DPoP part is full: (proofs accepted, the first refusal)."""
    accepted = 0
    while True:
        try:
            await app.dpop.verify(proof(key, clock), method="GET", url=URL, access_token=TOKEN, expected_jkt=None)
        except ReplayStoreFull as refused:
            return accepted, refused
        accepted += 1
        assert accepted <= TOTAL


def logout(mint: Mint, jti: str) -> HttpRequest:
    claims = {"iss": ISSUER, "aud": CLIENT, "iat": int(NOW), "exp": int(NOW) + 120, "jti": jti, "sid": jti,
              "sub": "user-1", "events": {BACKCHANNEL_LOGOUT_EVENT: {}}}
    token = mint(claims, alg="ES256", headers={"typ": "logout+jwt"})
    form = ("logout_token=" + token).encode()
    return HttpRequest("POST", LOGOUT_PATH, "", {"content-type": "application/x-www-form-urlencoded"}, form)


def pushed(app: App, user: str) -> HttpRequest:
    token = app.transmitter.sign_set({ACCOUNT_DISABLED: {}}, {**USER, "sub": user})  # type: ignore[attr-defined]
    return HttpRequest("POST", "/v1/ssf/events", "", {"content-type": "application/secevent+jwt"}, token.encode())


async def test_a_dpop_flood_that_fills_its_part_never_refuses_a_revocation_or_a_webauthn_challenge(
    app: App, clock: FrozenClock, mint: Mint
) -> None:
    bounds = StateConfig(max_replay_entries=TOTAL).replay_bounds
    key = ec.generate_private_key(ec.SECP256R1())
    accepted, refused = await flood(app, key, clock)
    assert accepted == bounds.dpop == 960  # its own part, exactly: the other 40 places stay free
    window = math.ceil(DpopConfig().jti_ttl_seconds)
    assert (refused.purpose, refused.retry_after) == ("dpop", window)  # the oldest proof's whole window
    answer = refuse(refused, realm="verifier")
    assert (answer.status, dict(answer.response_headers)["retry-after"]) == (503, str(window))

    # The flood goes on; revocations arrive through their real endpoints and are accepted, every one.
    for i in range(bounds.revocation // 2):
        assert (await app.router.dispatch(pushed(app, f"user-{i}"))).status == 202
        assert (await app.router.dispatch(logout(mint, f"logout-{i}"))).status == 200
        with pytest.raises(ReplayStoreFull):
            await app.dpop.verify(proof(key, clock), method="GET", url=URL, access_token=TOKEN, expected_jkt=None)
    assert app.revocation is not None
    for subject, sid in (("user-0", None), ("user-1", "logout-0")):  # the effects are in: an SET's, a logout's
        claims = {"iss": ISSUER, "sub": subject, "iat": NOW - 10, "exp": NOW + 300, **({"sid": sid} if sid else {})}
        caller = Principal(issuer=ISSUER, subject=subject, client_id=None, scopes=(), roles=frozenset(),
                           expires_at=NOW + 300, claims=claims)
        assert app.revocation.revocations.check(caller) is not None
    for i in range(bounds.webauthn):  # WebAuthn's part is its own too (the services use `Purpose.WEBAUTHN`)
        assert await app.state.first_use(f"webauthn:{i:032x}", 300, purpose=Purpose.WEBAUTHN) is True

    clock.advance(10)  # Retry-After tells the truth as time passes: 10 s less to wait
    with pytest.raises(ReplayStoreFull) as later:
        await app.dpop.verify(proof(key, clock), method="GET", url=URL, access_token=TOKEN, expected_jkt=None)
    assert later.value.retry_after == window - 10
    clock.advance(window - 10)  # the flood's first proofs expired: DPoP has room again
    await app.dpop.verify(proof(key, clock), method="GET", url=URL, access_token=TOKEN, expected_jkt=None)


async def until(condition: Any, seconds: float = 5.0) -> None:
    """Waits for `condition()` (another replica hearing of an entry over pub/sub)."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"not within {seconds} s")


@pytest.mark.integration
async def test_with_redis_a_dpop_flood_on_two_replicas_stops_at_its_part_and_every_revocation_lands(
    redis_replicas: tuple[App, App], clock: FrozenClock, mint: Mint
) -> None:
    """Redis: one bound per purpose that every replica shares (`state.redis_max_replay_entries` split by the
    shares). A flood spread over two replicas is refused at the DPoP part, 503 with Retry-After on both, while
    SSF pushes, logout tokens and kill-switch entries land on either replica and take effect on both. Before,
    Redis held no bound: the flood was never refused (it would have gone on until Redis was full)."""
    a, b = redis_replicas
    bounds = StateConfig(redis_max_replay_entries=TOTAL).redis_replay_bounds
    key = ec.generate_private_key(ec.SECP256R1())
    accepted, refused = 0, None
    while refused is None:
        try:
            replica = a if accepted % 2 else b
            await replica.dpop.verify(proof(key, clock), method="GET", url=URL, access_token=TOKEN, expected_jkt=None)
        except ReplayStoreFull as full:
            refused = full
        else:
            accepted += 1
            assert accepted <= TOTAL, "the flood was never refused"
    assert accepted == bounds.dpop == 960  # both replicas' proofs counted against one part
    window = math.ceil(DpopConfig().jti_ttl_seconds)
    assert refused.purpose == "dpop" and window / 2 <= refused.retry_after <= window  # the oldest proof's window
    answer = refuse(refused, realm="verifier")
    assert (answer.status, dict(answer.response_headers)["retry-after"]) == (503, str(refused.retry_after))
    for replica in (a, b):
        with pytest.raises(ReplayStoreFull):
            await replica.dpop.verify(proof(key, clock), method="GET", url=URL, access_token=TOKEN, expected_jkt=None)

    for i in range(bounds.revocation // 2):  # the flood goes on; revocations arrive on either replica
        replica = a if i % 2 else b
        assert (await replica.router.dispatch(pushed(a, f"user-{i}"))).status == 202
        assert (await replica.router.dispatch(logout(mint, f"logout-{i}"))).status == 200
    kill = {"subject": {"format": "iss_sub", "iss": ISSUER, "sub": "user-99"}}
    admin = HttpRequest("POST", "/v1/admin/revocations", "",
                        {"authorization": f"Bearer {ADMIN}", "content-type": "application/json"},
                        json.dumps(kill).encode())
    assert (await a.router.dispatch(admin)).status == 201
    for subject, sid in (("user-0", None), ("user-1", "logout-0"), ("user-99", None)):
        claims = {"iss": ISSUER, "sub": subject, "iat": NOW - 10, "exp": NOW + 300, **({"sid": sid} if sid else {})}
        caller = Principal(issuer=ISSUER, subject=subject, client_id=None, scopes=(), roles=frozenset(),
                           expires_at=NOW + 300, claims=claims)
        for replica in (a, b):  # in force on both replicas
            service = replica.revocation
            assert service is not None
            await until(lambda service=service, caller=caller: service.revocations.check(caller) is not None)
    for i in range(bounds.webauthn):
        assert await b.state.first_use(f"webauthn:{i:032x}", 300, purpose=Purpose.WEBAUTHN) is True
    assert isinstance(a.state, RedisState)
    assert b'verifier_replay_store_full_total{purpose="dpop"} 1.0' in a.metrics.render()
