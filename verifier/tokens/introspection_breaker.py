"""A circuit breaker for one provider: closed -> open -> half-open -> closed.

Closed lets every call through and counts consecutive failures; it opens at the threshold, but only
when no call has succeeded for `success_window_seconds` either. Open refuses at once (no socket, no
timeout to wait out) until the cool-down has passed on the injected monotonic clock; then half-open
lets exactly one probe through. The probe's success closes the circuit, its failure opens it for
another cool-down.

The breaker judges the provider, not a token. A failure is one call's fault (a timeout, a transport
error, a 5xx, a malformed answer), and a provider (or a WAF in front of it) may fail only for certain
tokens: an attacker who sends a stream of such distinct tokens, faster than legitimate traffic, used to
get `failure_threshold` failures in a row and open the circuit for every user's first-seen opaque token.
A provider that answered any call within the window is up, so failures alone no longer open the circuit
while answers still come: the attacker must also starve every legitimate call for the whole window.
Designs weighed: a window of failures across distinct tokens (an attacker has as many tokens as he
likes, so distinctness proves nothing); remembering failed tokens so each counts once (the same, and
memory to bound); a sliding count of failures in a time window (more state, and the success test is
what actually tells a healthy provider from a sick one). The one timestamp costs a clock read per
provider call, nothing for cached tokens, and no memory.

A fresh breaker (a worker's start, a restart, a reload's successor, a crashed worker's replacement: each
builds its own) has seen no answer yet, and on the count alone an attacker who was first after every start
opened its circuit with `failure_threshold` tokens. So the window starts with the first call, as if the
provider had answered just before it: not with the breaker's creation, since a worker's start-up (its key
fetches) or a quiet spell before its first request may outlast the window, and the attacker may well be that
first request. A provider that fails every call still opens the circuit: at the threshold once the window has
passed since its last answer or, if it never answered, since the first call; so at most
`success_window_seconds` (default: one call's timeout) later than on the count alone, and a provider down from
the start gives fast 503s from then on, as before. The first failure costs one more clock read, once per
breaker. Evidence from elsewhere was weighed and left out: the key store's discovery and JWKS answers come from
the same origin but often not from the same service (a CDN, a static file), so they would say the origin is up
while introspection is down; the client's own discovery of the introspection endpoint does go through the
breaker and counts as an answer like any other call.

With a batch endpoint, one such token in a batch fails the whole call, and every batch when the attacker puts one in
each window: no call would succeed, and the window would no longer protect anyone. A failed batch that one of its
tokens may have caused is asked again (`introspection_client.BatchDispatcher`): first our own token alone, whose answer
counts as a success (the provider is up), then in halves, whose answers count too; only the calls holding the
attacker's token fail. A provider that is down fails our token as well: one failure more per batch, so the circuit
opens as before, and the batch is not split.

Which call is the half-open probe is the client's choice (`ProviderClient.introspect`), from
`failed_probes` (the probes that failed since the circuit last closed):

- none, or an even number: a token of our own choosing, never the caller's: the last token the provider
  answered active, re-asked, or before any was (a fresh worker), a random token the client made up at
  start, which RFC 7662 section 2.2 obliges the provider to answer `{"active": false}`. The first token
  after the cool-down may be an attacker's the provider fails for; arriving first after every cool-down it
  would keep the circuit open, for good on a fresh worker, which has no token answered active to ask instead.
  Any answer (a 4xx refusal too: the provider is judged on whether it answers) closes the circuit.
- odd: the caller's token, whoever comes first. A provider that answers real tokens but fails for ours (one
  that breaks the RFC and fails for tokens it does not know; a user's token once answered active and now slow)
  would otherwise be held open for good, with no call let through to find a better token.

The trade-off: an attacker gets every other probe, and only after one of ours has failed, which it does only
while the provider is down (or fails for our token): after an outage the circuit closes at most one cool-down
later than on our probe alone. A probe of ours is one more provider call per half-open (the caller's token is
asked after it), nothing while closed; while the circuit is open the provider sees, once per cool-down, a token
nobody issued. Probe designs weighed: the discovery document or the JWKS as the probe (they show the origin
serves files, not that introspection answers: a down introspection service would be let through after every
cool-down, each caller waiting out its timeout); a token drawn at random among those arriving (in a flood nearly
all are the attacker's). Under a sustained attack on a quiet worker (no real token for a window at a time), his
failures can still reopen the circuit one window after each probe closes it; real users' answers within the
window prevent that.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Protocol

from verifier.clock import Clock


class BreakerState(enum.IntEnum):
    """The breaker's state; the value is what the state gauge reports."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class Breaker(Protocol):
    """What the introspection client asks of a breaker (`CircuitBreaker`; a test may hand in its own)."""

    @property
    def state(self) -> BreakerState:
        """The current state."""
        ...

    @property
    def failed_probes(self) -> int:
        """How many half-open probes have failed since the circuit last closed (the client picks the next)."""
        ...

    def allow(self) -> bool:
        """Whether a call may go out now."""
        ...

    def success(self) -> None:
        """A call succeeded."""
        ...

    def failure(self) -> None:
        """A call failed."""
        ...

    def release(self) -> None:
        """A permitted call ended without a verdict on the provider."""
        ...


class CircuitBreaker:
    """Stops calls to a provider that keeps failing, and probes it back."""

    def __init__(
        self,
        *,
        failure_threshold: int,
        cooldown_seconds: float,
        clock: Clock,
        success_window_seconds: float = 0.0,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self._threshold = failure_threshold
        self._cooldown = cooldown_seconds
        self._window = success_window_seconds
        self._clock = clock
        # The monotonic time of the last call that succeeded; until one has, of the first call (it failed): a fresh
        # worker is given one window from its first call, as if answered just before it (the module docstring).
        self._last_success = -math.inf
        self._failed_probes = 0
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker whose cool-down has passed reports half-open)."""
        if self._state is BreakerState.OPEN and self._cooled_down():
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def failed_probes(self) -> int:
        """How many half-open probes have failed since the circuit last closed."""
        return self._failed_probes

    def _cooled_down(self) -> bool:
        return self._clock.monotonic() - self._opened_at >= self._cooldown

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            self._state = state
            if state is BreakerState.CLOSED:
                self._failed_probes = 0
            if self._on_change is not None:
                self._on_change(state)

    def allow(self) -> bool:
        """Whether a call may go out now. In half-open only one probe is allowed at a time."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            if not self._cooled_down():
                return False
            self._set(BreakerState.HALF_OPEN)
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        """A call succeeded: the provider is healthy."""
        self._failures = 0
        self._last_success = self._clock.monotonic()
        self._probing = False
        self._set(BreakerState.CLOSED)

    def failure(self) -> None:
        """A call failed (timeout, transport error, 5xx, malformed answer)."""
        self._probing = False
        if self._state is BreakerState.HALF_OPEN:
            self._failed_probes += 1
            self._open()
            return
        self._failures += 1
        if self._last_success == -math.inf:  # the first call, and it failed: the window starts now
            self._last_success = self._clock.monotonic()
        if (
            self._state is BreakerState.CLOSED
            and self._failures >= self._threshold
            and self._clock.monotonic() - self._last_success >= self._window  # no answer lately: the provider
        ):
            self._open()

    def release(self) -> None:
        """A permitted call ended without a verdict on the provider (cancelled): free the probe slot."""
        self._probing = False

    def _open(self) -> None:
        self._opened_at = self._clock.monotonic()
        self._failures = 0
        self._set(BreakerState.OPEN)
