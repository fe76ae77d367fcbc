"""Per-identity rate limits (token buckets in the shared state), with RateLimit headers.

The bucket key is a hash of issuer and caller (a user's `sub` or, for a client-credentials token, its
`client_id`, in separate namespaces), one bucket per identity whatever its roles, so Redis never holds
raw identities as keys; a caller gets the most generous of its roles' limits, else the default. A new
bucket takes a place in its `issuers[]` entry's share of Redis's bound (`Settings.redis_bucket_bounds`; a
template's tenants share their entry's): identities minted at one issuer never take another's places.
The headers name the policy by its role as an RFC 8941 sf-string (`policy_label`), worked out at start-up.
A bucket refills on the state's clock: this limiter's (injected) in memory, Redis's own when shared, so a replica
whose clock is off neither gets extra tokens nor stalls the refill on the others (`verifier.state.redis`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from typing import Any

from verifier.clock import Clock
from verifier.decision import quoted_string
from verifier.errors import RateLimited
from verifier.principal import Principal
from verifier.settings import RateLimit, RateLimitSettings
from verifier.state.base import Limits

_NOT_SF_TEXT = re.compile(r"[^\x20-\x7e]|%")  # what an sf-string cannot hold, and `%` (the escape below)


def policy_label(name: str) -> str:
    """A role's name as the RateLimit headers' policy name: an RFC 8941 sf-string (section 3.3.3), which holds
    printable ASCII only, `"` and `\\` escaped. Any other character (and `%`) is percent-encoded as UTF-8, so
    `Prüfer` reads `"Pr%C3%BCfer"` and no two roles read as one."""
    encoded = _NOT_SF_TEXT.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), name)
    return quoted_string(encoded)


Chosen = tuple[str, RateLimit, Limits]  # a policy's label, its limit, the larger-burst limits a take holds for


class RateLimiter:
    """Counts every request of an identity against its bucket."""

    def __init__(
        self, settings: RateLimitSettings, state: Any, clock: Clock, *, configured: Callable[[str], str]
    ) -> None:
        """`configured` names the `issuers[]` entry covering a principal's issuer (`KeyStore.configured`: itself,
        or its template), the share of the bound of buckets its new bucket is counted in."""
        # The limits one identity's bucket may be taken under (its tokens' roles differ, or change). A take keeps the
        # bucket until it would be full under each limit of a larger burst than its own (`verifier.state.base.full_in`):
        # forgotten sooner, the next take under that limit would find a whole new, larger burst. A smaller one gives
        # nothing the caller could not have by presenting this token. Worked out once per limit: empty for the largest.
        every = [limit for _, limit in settings.roles] + ([settings.default] if settings.default else [])
        limits = {(limit.per_second, limit.burst) for limit in every}

        def labelled(name: str, limit: RateLimit) -> Chosen:
            return policy_label(name), limit, tuple(sorted(held for held in limits if held[1] > limit.burst))

        self._default = None if settings.default is None else labelled("default", settings.default)
        # Each role's rank among the roles, most generous last: the rate, then the burst, then the name (two roles
        # alike pick one, the same in every process), so `limit_for` compares one int, and never leaves the pick to
        # the order of a principal's frozenset (its strings' hashes, another order in each process).
        ordered = sorted(settings.roles, key=lambda item: (item[1].per_second, item[1].burst, item[0]))
        self._roles = {role: (rank, labelled(role, limit)) for rank, (role, limit) in enumerate(ordered)}
        self._state = state
        self._clock = clock
        self._configured = configured

    def limit_for(self, principal: Principal) -> Chosen | None:
        """The policy's name in the headers (`policy_label`), the limit that applies (the most generous role's: the
        higher rate, then the larger burst; else the default) and the limits its take keeps the bucket for."""
        best: tuple[int, Chosen] | None = None
        for role in principal.roles:
            ranked = self._roles.get(role)
            if ranked is not None and (best is None or ranked[0] > best[0]):
                best = ranked
        return self._default if best is None else best[1]

    async def check(self, principal: Principal) -> tuple[tuple[str, str], ...]:
        """Takes one token; returns the RateLimit headers, or raises `RateLimited` with them."""
        chosen = self.limit_for(principal)
        if chosen is None:
            return ()
        name, limit, hold = chosen
        # One bucket per identity: keyed by the limit class too, a user whose tokens carry different roles
        # (or whose roles change) would get a fresh bucket per class (issue #26 G14).
        digest = hashlib.sha256(f"{principal.issuer}\x00{principal.caller}".encode()).hexdigest()[:32]
        result = await self._state.take(
            f"rl:{digest}",
            rate_per_second=limit.per_second,
            burst=limit.burst,
            now=self._clock.now(),
            share=self._configured(principal.issuer),
            hold=hold,
        )
        window = max(1, math.ceil(limit.burst / limit.per_second))
        reset = max(0, math.ceil(result.reset_seconds))
        # draft-ietf-httpapi-ratelimit-headers: RateLimit-Policy names the quota, RateLimit what is left.
        headers = (
            ("ratelimit-policy", f"{name};q={limit.burst};w={window}"),
            ("ratelimit", f"{name};r={max(0, result.remaining)};t={reset}"),
        )
        if not result.allowed:
            retry = max(1, math.ceil(result.retry_after_seconds))
            raise RateLimited("rate limit exceeded", retry_after=retry, headers=headers)
        return headers
