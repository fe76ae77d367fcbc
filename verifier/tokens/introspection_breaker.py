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
provider call, nothing for cached tokens, and no memory. A provider that fails every call still opens
the circuit: at the threshold once the window has passed since its last answer, so at most
`success_window_seconds` (default: one call's timeout) later than on the count alone; before any
call has ever succeeded the count alone decides, as before.

Which call is the half-open probe is the client's choice (`ProviderClient.introspect`): the last token the
provider answered active, re-asked, rather than whichever token comes first after the cool-down (an
attacker's, arriving first after every cool-down, would keep the circuit open).
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
        self._last_success = -math.inf  # monotonic time of the last call that succeeded
        self._clock = clock
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

    def _cooled_down(self) -> bool:
        return self._clock.monotonic() - self._opened_at >= self._cooldown

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            self._state = state
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
            self._open()
            return
        self._failures += 1
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
