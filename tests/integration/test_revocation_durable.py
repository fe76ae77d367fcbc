"""Revocations survive what the operator does to a running `verifier serve` (#18 F9).

Without Redis: the kill switch (admin API) and an SSF push each disable a user; then SIGHUP reloads
the workers, a worker is killed and replaced, and (with `state.path`) the whole verifier is
restarted: the users stay refused through all of it, because the transmitter already got its 202
and will not resend.

With Redis: a verifier that starts while Redis hangs has its keys but not its entries; it answers
503 (never a pass) until the entries are read, then refuses the disabled user.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from doorkit import http_exchange
from redis_harness import RedisServer
from served import START_S, served_verifier, state_section
from ssf_transmitter import ACCOUNT_DISABLED, SsfTransmitter

from verifier.devidp import DevIdentityProvider

pytestmark = pytest.mark.integration

RECEIVER_AUD = "https://verifier.example.test/ssf"


@pytest.fixture
def transmitter() -> Iterator[SsfTransmitter]:
    with SsfTransmitter(audience=RECEIVER_AUD) as tx:
        yield tx


@pytest.mark.parametrize("durable", [False, True], ids=["default", "state_path"])
async def test_revocations_survive_sighup_a_worker_restart_and_with_state_path_a_full_restart(
    tmp_path: Path, transmitter: SsfTransmitter, durable: bool
) -> None:
    state = state_section(tmp_path, durable)

    def config(idp: DevIdentityProvider) -> str:
        return f"""revocation:
  transmitters:
    - issuer: "{transmitter.issuer}"
      audience: "{RECEIVER_AUD}"
      delivery: push
      subjects_of: ["{idp.issuer}"]
      allow_insecure_http: true
{state}"""

    async with served_verifier(tmp_path, config) as (idp, served):
        alice, bob, carol = (idp.mint(sub=s, ttl=600) for s in ("alice", "bob", "carol"))

        async def still_refused(when: str) -> None:
            await served.serving(carol)
            assert await served.status(alice) == 401, f"the kill switch was forgotten after {when}"
            assert await served.status(bob) == 401, f"the SSF event was forgotten after {when}"

        await served.serving(carol)
        await served.disable(idp.issuer, "alice")
        pushed = transmitter.sign_set({ACCOUNT_DISABLED: {}}, {"format": "iss_sub", "iss": idp.issuer, "sub": "bob"})
        status, _ = await asyncio.to_thread(transmitter.push, f"http://127.0.0.1:{served.http}/v1/ssf/events", pushed)
        assert status == 202
        await still_refused("the events")

        await served.through_restarts(still_refused, full=durable)


async def test_a_verifier_that_cannot_read_its_revocation_entries_answers_503_never_a_pass(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    redis = (
        f'state: {{redis_url: "{redis_server.url}", key_prefix: "durable:", timeout_seconds: 0.2}}\n'
        "revocation: {}\n"
    )
    async with served_verifier(tmp_path, lambda _: redis) as (idp, served):
        alice, carol = idp.mint(sub="alice", ttl=600), idp.mint(sub="carol", ttl=600)
        try:
            await served.serving(carol)
            await served.disable(idp.issuer, "alice")
            assert await served.status(alice) == 401
            served.stop()

            redis_server.pause()  # a hung Redis: connections open, nothing answered
            served.start()
            # The keys come from the provider, which is up: the worker decides, but without its entries.
            async def reason(token: str) -> tuple[int, str]:
                raw = f"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
                answer = await http_exchange(served.http, raw)
                head = answer.split(b"\r\n\r\n", 1)[0].decode().lower().split("\r\n")
                found = [line.split(":", 1)[1].strip() for line in head if line.startswith("x-verifier-reason:")]
                return int(head[0].split(" ", 2)[1]), found[0] if found else ""

            deadline = time.monotonic() + START_S
            last: tuple[int, str] | None = None
            while True:  # until the keys are in (before that: no answer, or provider_unavailable)
                try:
                    last = await reason(carol)
                    if last == (503, "state_unavailable"):
                        break
                    assert last[0] != 200, "a pass without the revocation entries"
                except (OSError, asyncio.IncompleteReadError, IndexError):
                    pass
                assert time.monotonic() < deadline, f"never refused for the missing entries; last answer {last}"
                await asyncio.sleep(0.2)
            for _ in range(15):  # the load keeps failing: every answer is 503, the disabled user's included
                assert await reason(alice) == (503, "state_unavailable")
                assert await reason(carol) == (503, "state_unavailable")
                await asyncio.sleep(0.1)

            redis_server.resume()
            await served.serving(carol)  # the load is retried until it succeeds
            assert await served.status(alice) == 401
        finally:
            if redis_server.running:
                redis_server.resume()
