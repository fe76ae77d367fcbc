"""The pipeline's decision deadline (`Pipeline.decide_after_miss`, `deadline_seconds`), on fakes: a first-seen token
whose check outlasts it is answered 503 retry-later when it falls due; a cancellation from outside stays a
cancellation; the task's cancellation count is left as it was found (`asyncio.timeout`'s rules, #24 goal 7).

The doors' own deadline tests (tests/doors/test_deadline.py) run it end to end, with a real provider's delay.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from support import FrozenClock

from verifier.authenticators import Seen
from verifier.decision import Decision
from verifier.observe.metrics import Metrics
from verifier.pipeline import Pipeline
from verifier.principal import Principal
from verifier.request import RequestAttributes
from verifier.tokens.cache import ExpiringCache

NOW = 1_700_000_000.0
DEADLINE = 0.05
TOKEN = "opaque-token"


class Held:
    """An authenticator whose `verify` waits on a future the test holds (a provider that has not answered);
    `on_wait` runs once the wait has begun, `swallow` catches the first cancellation and answers all the same."""

    sends_to = None

    def __init__(self, on_wait: Callable[[asyncio.Future[None]], None] | None = None, *, swallow: bool = False) -> None:
        self.on_wait = on_wait
        self.swallow = swallow
        self.cancelled = 0

    def verify_now(self, token: str, seen: Seen) -> Principal | None:
        return None

    async def verify(self, token: str, token_hash: bytes, seen: Seen) -> Principal:
        waited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.on_wait is not None:
            self.on_wait(waited)
        try:
            await waited
        except asyncio.CancelledError:
            self.cancelled += 1
            if not self.swallow:
                raise
        return Principal(
            issuer="https://idp.test",
            subject="user-1",
            client_id=None,
            scopes=(),
            roles=frozenset(),
            expires_at=NOW + 3600,
            claims={"sub": "user-1"},
        )


def _pipeline(authenticator: Held, deadline: float | None = DEADLINE) -> Pipeline:
    clock = FrozenClock(NOW)
    return Pipeline(
        authenticators=[authenticator],
        checks=[],
        positive=ExpiringCache(100, clock),
        negative=ExpiringCache(100, clock),
        clock=clock,
        metrics=Metrics(),
        realm="test",
        negative_ttl=30,
        audit_enabled=False,
        deadline=deadline,
    )


def _attrs(token: str = TOKEN) -> RequestAttributes:
    return RequestAttributes("GET", "https", "api.test", "/x", {"authorization": f"Bearer {token}"})


async def _decide(pipeline: Pipeline, *, pass_loop: bool, token: str = TOKEN) -> Decision:
    attrs = _attrs(token)
    assert pipeline.decide_cached(attrs, "test") is None
    loop = asyncio.get_running_loop() if pass_loop else None
    decision = await pipeline.decide_after_miss(attrs, "test", loop)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the deadline's own cancellation taken back
    return decision


@pytest.mark.parametrize("pass_loop", [True, False])
async def test_a_decision_past_its_deadline_is_answered_503_retry_later_when_it_falls_due(pass_loop: bool) -> None:
    held = Held()
    loop = asyncio.get_running_loop()
    started = loop.time()
    decision = await asyncio.wait_for(_decide(_pipeline(held), pass_loop=pass_loop), 5)
    took = loop.time() - started
    assert decision.status == 503 and decision.reason == "provider_unavailable", decision
    assert b"deadline" in decision.body, decision.body
    assert held.cancelled == 1
    assert DEADLINE <= took < DEADLINE + 1.0, took


async def test_a_decision_within_its_deadline_is_answered_and_leaves_no_timer_behind() -> None:
    def answer_soon(waited: asyncio.Future[None]) -> None:
        asyncio.get_running_loop().call_later(DEADLINE / 5, waited.set_result, None)

    held = Held(answer_soon)
    decision = await _decide(_pipeline(held), pass_loop=True)
    assert decision.allowed
    # Nothing fires later: the task goes on waiting past the deadline, uncancelled.
    await asyncio.sleep(DEADLINE * 2)
    assert held.cancelled == 0


async def test_a_finished_decisions_task_is_not_kept_alive_until_its_deadline_would_fall_due() -> None:
    """The sweep keeps a finished deadline queued until it reaches the front; that must not hold its task (and
    the answer in it) for the rest of the deadline: at a high first-seen rate that is deadline x rate tasks."""

    def answer_now(waited: asyncio.Future[None]) -> None:
        waited.set_result(None)

    pipeline = _pipeline(Held(answer_now), deadline=30.0)
    task = asyncio.get_running_loop().create_task(_decide(pipeline, pass_loop=True))
    assert (await task).allowed
    held = weakref.ref(task)
    del task
    await asyncio.sleep(0)  # the loop's own hold on the finished task (its done callbacks' handle) gone
    gc.collect()
    assert held() is None


async def test_a_cancellation_from_outside_before_the_deadline_stays_a_cancellation() -> None:
    held = Held(lambda waited: asyncio.get_running_loop().call_soon(task.cancel))
    task = asyncio.ensure_future(_pipeline(held).decide_after_miss(_attrs(), "test", asyncio.get_running_loop()))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert held.cancelled == 1


async def test_a_cancellation_from_outside_together_with_the_deadline_stays_a_cancellation() -> None:
    """The deadline fires; before the task runs again, someone else cancels it too: not the deadline's to answer."""

    def cancel_too(waited: asyncio.Future[None]) -> None:
        # Runs when the deadline cancels the wait, before the task's own wake-up (added first, called first).
        waited.add_done_callback(lambda _: task.cancel())

    held = Held(cancel_too)
    pipeline = _pipeline(held)
    task = asyncio.ensure_future(pipeline.decide_after_miss(_attrs(), "test", asyncio.get_running_loop()))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert held.cancelled == 1


async def test_a_deadline_cancellation_caught_on_the_way_is_taken_back_all_the_same() -> None:
    """An authenticator that catches the cancellation and answers: the answer stands, and the task's count of
    cancellations asked is back where it was (`_decide` checks it), as `asyncio.timeout` leaves it."""
    held = Held(swallow=True)
    decision = await _decide(_pipeline(held), pass_loop=True)
    assert decision.allowed
    assert held.cancelled == 1


async def test_without_a_deadline_a_decision_waits_as_long_as_it_takes() -> None:
    def answer_late(waited: asyncio.Future[None]) -> None:
        asyncio.get_running_loop().call_later(DEADLINE * 2, waited.set_result, None)

    decision = await _decide(_pipeline(Held(answer_late), deadline=None), pass_loop=True)
    assert decision.allowed


async def test_many_pending_decisions_share_one_timer_and_each_falls_due_on_its_own_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Decisions armed one after another, each held past the deadline: one timer armed for all of them at a time
    (not one per decision), and each still answered 503 within the deadline of its own start (the sweep re-arms
    for the next pending one), in the order they started; the ones answered in time are never cancelled."""
    loop = asyncio.get_running_loop()
    timers: list[float] = []
    call_at = loop.call_at

    def counted(when: float, callback: Callable[..., object], *args: object, **kw: Any) -> asyncio.TimerHandle:
        if getattr(callback, "__self__", None).__class__.__module__ == "verifier.pipeline":  # a deadline's timer
            timers.append(when)
        return call_at(when, callback, *args, **kw)

    monkeypatch.setattr(loop, "call_at", counted)

    def answer_soon(waited: asyncio.Future[None]) -> None:
        loop.call_later(DEADLINE / 10, waited.set_result, None)

    held, answered = Held(), Held(answer_soon)
    pipeline = _pipeline(held)
    on_time = _pipeline(answered)
    on_time._deadlines = pipeline._deadlines  # the same pipeline's deadlines, with an authenticator that answers
    ended: list[tuple[int, float, float]] = []

    async def one(n: int, which: Pipeline) -> Decision:
        started = loop.time()
        decision = await _decide(which, pass_loop=True, token=f"{TOKEN}-{n}")
        ended.append((n, started, loop.time()))
        return decision

    tasks = []
    for n in range(6):
        tasks.append(asyncio.ensure_future(one(n, pipeline if n % 2 == 0 else on_time)))
        await asyncio.sleep(DEADLINE / 10)  # all armed before the first falls due: no later arm re-arms the timer
    decisions = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert [d.status for d in decisions] == [503, 200, 503, 200, 503, 200], decisions
    assert held.cancelled == 3 and answered.cancelled == 0
    for n, started, stopped in ended:
        if n % 2 == 0:
            assert DEADLINE - 0.002 <= stopped - started < DEADLINE + 0.5, (n, stopped - started)
    assert [n for n, _, _ in ended if n % 2 == 0] == [0, 2, 4]
    assert len(timers) <= 4, timers  # 6 decisions: the first's timer, then one re-arm per held one (at most)


def test_a_pipeline_used_from_one_loop_then_another_times_its_decisions_on_each() -> None:
    """The first loop's timer, armed for a decision already answered, is gone with that loop: the next loop's
    decisions get a timer of their own loop (not one thought armed), and fall due."""

    def answer_soon(waited: asyncio.Future[None]) -> None:
        asyncio.get_running_loop().call_later(DEADLINE / 10, waited.set_result, None)

    first = _pipeline(Held(answer_soon))
    assert asyncio.run(_decide(first, pass_loop=True)).allowed  # leaves its timer armed on that loop, then it closes
    second = _pipeline(Held())
    second._deadlines = first._deadlines

    async def late() -> Decision:
        return await asyncio.wait_for(_decide(second, pass_loop=True), 5)

    decision = asyncio.run(late())
    assert decision.status == 503 and b"deadline" in decision.body, decision
