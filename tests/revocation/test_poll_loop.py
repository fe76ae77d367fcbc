"""The RFC 8936 poll loop paces itself and survives any answer (issue #26 G11, G12).

A real loopback transmitter (`rawprovider.RawProvider`) answers the poll endpoint; the loop runs as
the service runs it, as a task, for a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from rawprovider import RawProvider, Route, json_route

from verifier.clock import SystemClock
from verifier.config.revocation import parse_revocation_config
from verifier.observe.metrics import Metrics
from verifier.revocation.poll import Outcome, Poller
from verifier.tokens.fetch import HttpFetcher
from verifier.tokens.jwks import IssuerKeys

INTERVAL = 0.2  # seconds: poll_interval_seconds in these tests
RUN_FOR = 1.0  # seconds each loop runs


async def run_poller(
    raw_provider: RawProvider,
    http_fetcher: HttpFetcher,
    receive: Callable[[str], Outcome | None],
    run_for: float = RUN_FOR,
    at_least: int = 0,
    **extra: object,
) -> list[dict[str, Any]]:
    """Runs the loop for `run_for` seconds, and on until the transmitter saw `at_least` polls (30 s at most: a
    loaded machine may poll less often than its interval); returns the poll requests the transmitter saw."""
    config = parse_revocation_config({"transmitters": [{
        "issuer": raw_provider.url, "audience": "aud", "delivery": "poll", "algorithms": ["ES256"],
        "poll_endpoint_url": raw_provider.url + "/poll", "jwks_uri": raw_provider.url + "/jwks",
        "allow_insecure_http": True, "poll_interval_seconds": INTERVAL, **extra,
    }]})
    (transmitter,) = config.transmitters
    keys = IssuerKeys(transmitter.key_settings(), http_fetcher, SystemClock(), Metrics(CollectorRegistry()))

    async def receive_async(token: str) -> Outcome | None:
        return receive(token)

    task = asyncio.get_running_loop().create_task(Poller(transmitter, keys, lambda: http_fetcher.session,
                                                         receive_async).run())

    def polls() -> list[dict[str, Any]]:
        return [json.loads(body) for method, path, _, body in raw_provider.requests if path == "/poll"]

    await asyncio.sleep(run_for)
    deadline = time.monotonic() + 30
    while len(polls()) < at_least and not task.done():
        assert time.monotonic() < deadline, f"{len(polls())} polls, not {at_least}"
        await asyncio.sleep(0.02)
    assert not task.done(), f"the poll task ended: {task.exception() if task.done() else ''}"
    task.cancel()
    return polls()


async def test_an_empty_answer_claiming_more_does_not_make_the_loop_spin(
    raw_provider: RawProvider, http_fetcher: HttpFetcher
) -> None:
    raw_provider.routes["/poll"] = json_route({"sets": {}, "moreAvailable": True}, pause=0)
    polls = await run_poller(raw_provider, http_fetcher, lambda token: Outcome(True))
    assert 1 <= len(polls) <= RUN_FOR / INTERVAL + 2, len(polls)


async def test_sets_that_cannot_be_judged_now_do_not_make_the_loop_hurry(
    raw_provider: RawProvider, http_fetcher: HttpFetcher
) -> None:
    """The store or the transmitter's keys are out of reach: every SET is left for later (None). A transmitter with
    more queued says so on every answer, and the loop polled 20 times a second, verifying the same SETs again each
    time, for as long as the outage lasted; nothing was taken, so there is no reason to hurry."""
    raw_provider.routes["/poll"] = json_route(
        {"sets": {f"jti-{i}": "x.y.z" for i in range(5)}, "moreAvailable": True}, pause=0
    )
    received: list[str] = []

    def receive(token: str) -> None:
        received.append(token)

    polls = await run_poller(raw_provider, http_fetcher, receive)
    assert 1 <= len(polls) <= RUN_FOR / INTERVAL + 2, len(polls)
    assert all(not p["ack"] and "setErrs" not in p for p in polls)


async def test_no_more_sets_than_max_events_are_taken_from_one_answer(
    raw_provider: RawProvider, http_fetcher: HttpFetcher
) -> None:
    counter = iter(range(1_000_000))
    raw_provider.routes["/poll"] = lambda body: json_route(
        {"sets": {f"jti-{next(counter)}": "x.y.z" for _ in range(5)}, "moreAvailable": True}, pause=0
    )
    received: list[str] = []

    def receive(token: str) -> Outcome:
        received.append(token)
        return Outcome(True)

    polls = await run_poller(raw_provider, http_fetcher, receive, max_events=2)
    assert all(p["maxEvents"] == 2 for p in polls)
    assert all(len(p["ack"]) <= 2 for p in polls)
    assert len(received) <= 2 * len(polls)
    assert len(polls) <= 40, "even a transmitter that always has more is polled at a bounded rate"


async def test_a_set_that_breaks_the_receiver_is_refused_and_polling_goes_on(
    raw_provider: RawProvider, http_fetcher: HttpFetcher
) -> None:
    raw_provider.routes["/poll"] = json_route({"sets": {"bad": "boom", "good": "fine"}, "moreAvailable": False})

    def receive(token: str) -> Outcome:
        if token == "boom":
            raise OverflowError("int too large to convert to float")  # e.g. iat: 10**400
        return Outcome(True)

    polls = await run_poller(raw_provider, http_fetcher, receive, at_least=2)
    assert polls[1]["ack"] == ["good"]
    assert polls[1]["setErrs"]["bad"]["err"] == "invalid_request"


async def test_transport_failures_and_hostile_answers_back_off_and_never_end_the_task(
    raw_provider: RawProvider, http_fetcher: HttpFetcher
) -> None:
    answers = iter([Route(b"not json"), Route(b"[]"), Route(b'{"sets": 5}'), Route(b"x", status=500)] * 100)
    raw_provider.routes["/poll"] = lambda body: next(answers)
    polls = await run_poller(raw_provider, http_fetcher, lambda token: Outcome(True), run_for=3.6)
    assert 2 <= len(polls) <= 4, len(polls)  # at 0 s, 1 s, 3 s: backing off, not every 0.2 s
