"""A counter of changes to the state that a cached answer was computed from.

Everything a from-memory decision reads besides the request and the clock (the revocation index,
the verified-token cache, WebAuthn credentials) bumps one shared `Generation` when it changes, so an answer
remembered under an older value is known stale at once, without knowing which change made it so
(the forward-auth door's answer memo: `verifier.doors.answer_memo`). The composition root builds it.
"""

from __future__ import annotations


class Generation:
    """A number that only grows; `bump()` on every change to the state it stands for."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def bump(self) -> None:
        """Marks every answer computed before now as computed from older state."""
        self.value += 1
