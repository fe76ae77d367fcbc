"""The forward-auth door's answer memo: the same raw request, answered from memory before, gets the
same answer bytes again without being parsed.

The key is the raw bytes of one whole keep-alive request: one `data_received` chunk, arriving at a
message boundary with nothing owed on its connection, that held exactly one complete request which
the pipeline answered without I/O from its token cache (`Pipeline.decide_cached_stable`; a first-seen
token's answer is not offered, its next one is). The same bytes parse to the same
method, target and headers, so the pipeline would judge the same request; what else it reads is
guarded by the entry:

- the peer address the answer was computed for (the client address may be the peer's);
- `valid_until` (wall clock): when the pipeline would stop returning these bytes (the max-age
  shrinking in the token's last reuse window, an identity assertion renewed, a route's authentication
  age running out, the token's `exp`). The pipeline says when; per-request answers (DPoP, mTLS,
  step-up, rate limits) and shrunk max-ages are never offered;
- the state generation (`verifier.generation`) at store time: any change to revocation entries, the
  verified-token cache or WebAuthn credentials makes every entry stale at once (revocation in a second).

Only allows are stored. Bounded: at most `MAX_ENTRIES` entries (cleared when full, as the route
memo is) whose keys are at most `MAX_KEY_BYTES` long; a new worker (SIGHUP) starts empty.
"""

from __future__ import annotations

from typing import NamedTuple

from verifier.clock import Clock
from verifier.generation import Generation

MAX_ENTRIES = 1024  # per worker; a flood of distinct requests costs one clear per this many stores
MAX_KEY_BYTES = 8 * 1024  # larger requests (big cookies) are answered as usual: bounds the memo at ~8 MiB


class Remembered(NamedTuple):
    """One remembered answer and what it holds for."""

    answer: bytes
    peer: str
    valid_until: float  # epoch seconds: a hit needs `now` before this
    generation: int
    outcome: str  # the decision metric's labels, counted on every hit as on a normal answer
    reason: str


class AnswerMemo:
    """Raw request bytes -> the answer bytes they got, while the pipeline would give the same."""

    __slots__ = ("_clock", "_entries", "_generation", "_max")

    def __init__(self, clock: Clock, generation: Generation, max_entries: int = MAX_ENTRIES) -> None:
        self._clock = clock
        self._generation = generation
        self._max = max_entries
        self._entries: dict[bytes, Remembered] = {}

    def get(self, data: bytes, peer: str) -> Remembered | None:
        """The remembered answer for these bytes from this peer, if it still holds."""
        entry = self._entries.get(data) if len(data) <= MAX_KEY_BYTES else None  # a big chunk is not hashed
        if (
            entry is None
            or entry.generation != self._generation.value
            or entry.peer != peer
            or self._clock.now() >= entry.valid_until
        ):
            return None
        return entry

    def store(self, data: bytes, peer: str, answer: bytes, valid_until: float, outcome: str, reason: str) -> None:
        """Remembers an answer until `valid_until` or the next state change, whichever comes first."""
        if len(data) > MAX_KEY_BYTES or self._max <= 0 or valid_until <= self._clock.now():
            return
        entries = self._entries
        if len(entries) >= self._max and data not in entries:
            entries.clear()  # attacker-chosen keys: bounded, and a clear is cheaper than an LRU on every hit
        entries[data] = Remembered(answer, peer, valid_until, self._generation.value, outcome, reason)

    def __len__(self) -> int:
        return len(self._entries)
