"""RFC 8936 poll delivery against the test transmitter over real loopback HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry
from ssf_transmitter import ACCOUNT_DISABLED, SESSION_REVOKED, SsfTransmitter

from verifier.app import HttpSessions
from verifier.clock import SystemClock
from verifier.errors import StateUnavailable
from verifier.observe.metrics import RevocationMetrics
from verifier.principal import Principal
from verifier.revocation import RevocationService, parse_revocation_config
from verifier.revocation.poll import poll_endpoint
from verifier.state.base import Purpose
from verifier.state.memory import MemoryState
from verifier.tokens.fetch import HttpFetcher

AUD = "https://verifier.example.test/ssf"
IDP = "https://idp.example.test"


def principal(sub: str = "user-1", **claims: Any) -> Principal:
    now = time.time()
    values = {"iss": IDP, "sub": sub, "iat": now - 10, "exp": now + 300, **claims}
    return Principal(issuer=IDP, subject=sub, client_id=None, scopes=(), roles=frozenset(),
                     expires_at=values["exp"], claims=values)


@pytest.fixture
def transmitter() -> Iterator[SsfTransmitter]:
    with SsfTransmitter(audience=AUD) as tx:
        yield tx


@contextlib.asynccontextmanager
async def polling(
    transmitter: SsfTransmitter, state: Callable[[SystemClock], MemoryState] = MemoryState, **extra: Any
) -> AsyncIterator[RevocationService]:
    """A started revocation service polling `transmitter` (every 0.1 s), its state made by `state`; `extra` are
    more transmitter settings."""
    config = parse_revocation_config({"transmitters": [{
        "issuer": transmitter.issuer, "audience": AUD, "delivery": "poll", "algorithms": ["ES256"],
        "allow_insecure_http": True, "poll_interval_seconds": 0.1, "subjects_of": [IDP], **extra,
    }]})
    sessions, clock = HttpSessions(), SystemClock()
    svc = RevocationService(config, state=state(clock), fetcher=HttpFetcher(sessions.providers), clock=clock,
                            metrics=RevocationMetrics(CollectorRegistry()), session=sessions.ssf)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()
        await sessions.close()


@pytest.fixture
async def service(transmitter: SsfTransmitter) -> AsyncIterator[RevocationService]:
    async with polling(transmitter) as svc:
        yield svc


async def eventually(condition: Callable[[], bool], seconds: float = 3.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_poll_endpoint_from_metadata_never_downgrades() -> None:
    config = parse_revocation_config({"transmitters": [{"issuer": "https://a.test", "audience": "x",
                                                         "delivery": "poll"}]})
    (tx,) = config.transmitters
    good = {"delivery": {"method": "urn:ietf:rfc:8936", "endpoint_url": "https://a.test/poll"}}
    assert poll_endpoint(tx, good) == "https://a.test/poll"
    assert poll_endpoint(tx, {"delivery": {"method": "urn:ietf:rfc:8936", "endpoint_url": "http://a.test/p"}}) == ""
    assert poll_endpoint(tx, {"delivery": {"method": "urn:ietf:rfc:8935", "endpoint_url": "https://a.test/p"}}) == ""


async def test_polled_event_takes_effect_and_is_acknowledged(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    sub = {"format": "iss_sub", "iss": IDP, "sub": "user-1"}
    jti = transmitter.enqueue(transmitter.sign_set({SESSION_REVOKED: {}}, sub))
    await eventually(lambda: service.revocations.check(principal()) is not None)
    await eventually(lambda: jti in transmitter.acked)
    assert transmitter.pending == {}
    assert all(r.get("returnImmediately") is True for r in transmitter.poll_requests)


async def test_a_bad_polled_set_is_reported_in_set_errs(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    sub = {"format": "iss_sub", "iss": IDP, "sub": "user-2"}
    forged = transmitter.sign_set({ACCOUNT_DISABLED: {}}, sub, key=ec.generate_private_key(ec.SECP256R1()))
    jti = transmitter.enqueue(forged)
    await eventually(lambda: jti in transmitter.set_errs)
    assert transmitter.set_errs[jti]["err"] == "authentication_failed"
    assert service.revocations.check(principal("user-2")) is None


async def test_a_replayed_polled_set_is_acknowledged_again(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    token = transmitter.sign_set({ACCOUNT_DISABLED: {}}, {"format": "iss_sub", "iss": IDP, "sub": "user-3"})
    jti = transmitter.enqueue(token)
    await eventually(lambda: jti in transmitter.acked)
    transmitter.enqueue(token)  # our acknowledgement was "lost": the transmitter sends it again
    await eventually(lambda: transmitter.acked.count(jti) == 2)
    assert jti not in transmitter.set_errs


class LateMark(MemoryState):
    """The first jti mark runs on the server but its answer is lost (a Redis stall past the timeout)."""

    def __init__(self, clock: SystemClock) -> None:
        super().__init__(clock)
        self.lost = 0

    async def first_use(self, key: str, ttl_seconds: float, *, purpose: Purpose) -> bool:
        created = await super().first_use(key, ttl_seconds, purpose=purpose)
        if key.startswith("ssf:") and not self.lost:
            self.lost += 1
            raise StateUnavailable("timed out after the server ran the command")
        return created


async def test_a_polled_set_whose_mark_was_lost_still_takes_effect(transmitter: SsfTransmitter) -> None:
    """#26 G2: the SET is redelivered and acknowledged as a replay, so its effect must already be stored."""
    made: list[LateMark] = []

    def late_mark(clock: SystemClock) -> LateMark:
        made.append(LateMark(clock))
        return made[0]

    async with polling(transmitter, late_mark) as svc:
        token = transmitter.sign_set({ACCOUNT_DISABLED: {}}, {"format": "iss_sub", "iss": IDP, "sub": "user-4"})
        jti = transmitter.enqueue(token)
        await eventually(lambda: jti in transmitter.acked)
        assert made[0].lost == 1
        assert svc.revocations.check(principal("user-4")) is not None


async def test_a_set_with_an_absurd_iat_is_refused_and_polling_goes_on(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    # issue #26 G11: such a SET used to end the poll task silently
    huge = transmitter.sign_set({ACCOUNT_DISABLED: {}}, {"format": "iss_sub", "iss": IDP, "sub": "user-4"},
                                extra={"iat": 10**400})
    bad = transmitter.enqueue(huge)
    await eventually(lambda: bad in transmitter.set_errs or bad in transmitter.acked)
    good = transmitter.enqueue(transmitter.sign_set({SESSION_REVOKED: {}}, {"format": "iss_sub", "iss": IDP,
                                                                             "sub": "user-5"}))
    await eventually(lambda: service.revocations.check(principal("user-5")) is not None)
    await eventually(lambda: good in transmitter.acked)
    assert transmitter.set_errs[bad]["err"] == "invalid_request"
    assert service.revocations.check(principal("user-4")) is None


async def test_a_polled_set_is_neither_acknowledged_nor_refused_while_the_transmitter_keys_are_out_of_reach(
    transmitter: SsfTransmitter,
) -> None:
    """The SET can be judged neither way: reporting it in `setErrs` would make the transmitter drop it for good
    (a lost revocation), as a 400 would for push. It is left unacknowledged, and taken once the keys are back."""
    transmitter.jwks_status = 503  # the transmitter's JWKS fails from the start (rotation, outage, a cut)
    async with polling(transmitter, poll_endpoint_url=transmitter.poll_url) as svc:
        token = transmitter.sign_set({ACCOUNT_DISABLED: {}}, {"format": "iss_sub", "iss": IDP, "sub": "user-6"})
        jti = transmitter.enqueue(token)
        await eventually(lambda: len(transmitter.poll_requests) >= 4)
        assert jti not in transmitter.set_errs and jti not in transmitter.acked
        assert svc.revocations.check(principal("user-6")) is None  # not applied yet, and not lost either
        transmitter.jwks_status = 200
        await eventually(lambda: jti in transmitter.acked, seconds=15)
        assert jti not in transmitter.set_errs
        assert svc.revocations.check(principal("user-6")) is not None


async def test_a_set_queued_through_a_ten_minute_receiver_outage_still_takes_effect(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    """A poll queue holds what was signed while we were away: after a ten-minute outage the oldest SET is ten
    minutes old. Refused as too old it was reported in `setErrs`, which the transmitter takes as final, and the
    account stayed enabled here. The default `max_age_seconds` is a day."""
    sub = {"format": "iss_sub", "iss": IDP, "sub": "user-9"}
    jti = transmitter.enqueue(transmitter.sign_set({ACCOUNT_DISABLED: {}}, sub, iat=time.time() - 600))
    await eventually(lambda: jti in transmitter.acked or jti in transmitter.set_errs)
    assert jti not in transmitter.set_errs
    assert service.revocations.check(principal("user-9")) is not None
