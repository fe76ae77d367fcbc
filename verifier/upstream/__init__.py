"""What the upstream receives on an allow: mapped claims, the Kong consumer, the identity assertion.

Built once per admitted token (and per route that changes it), kept in the cache record with the
answer, and rebuilt only when its assertion reaches half its life: the hot path serializes nothing.
"""

from __future__ import annotations

import dataclasses
import math

from verifier.config.upstream import HeaderMapping, RouteUpstream, UpstreamConfig
from verifier.decision import Decision, allow
from verifier.principal import Principal
from verifier.upstream.assertion import IdentityAssertions
from verifier.upstream.claims import UpstreamClaimTooLarge, claim_at, header_value

__all__ = ["UpstreamAnswers", "UpstreamClaimTooLarge", "Variant"]


@dataclasses.dataclass(frozen=True, slots=True)
class Variant:
    """What one route's upstream receives: its mapped headers and its assertion's audience."""

    headers: tuple[HeaderMapping, ...]
    audience: str


class UpstreamAnswers:
    """Builds the allow answer for a principal: the fixed identity headers plus what `upstream` configures."""

    def __init__(self, config: UpstreamConfig | None = None) -> None:
        config = config or UpstreamConfig()
        self._max = config.max_value_bytes
        self._consumer = config.consumer
        identity = config.identity_token
        self.assertions = IdentityAssertions(identity) if identity is not None else None
        self.default = Variant(config.headers, identity.audience if identity is not None else "")
        self.plain = not (config.headers or config.consumer or identity)  # the fixed four only

    def variant(self, route: RouteUpstream | None) -> Variant:
        """A route's variant: its headers added (a name mapped already takes the route's claim), its audience."""
        if route is None:
            return self.default
        names = {m.header for m in route.headers}
        headers = tuple(m for m in self.default.headers if m.header not in names) + route.headers
        return Variant(headers, route.audience or self.default.audience)

    def answer(self, principal: Principal, variant: Variant, ceiling: int, now: float) -> Decision:
        """The allow answer; raises `UpstreamClaimTooLarge` when a value does not fit in a header."""
        if self.plain:
            return allow(principal, cache_max_age=ceiling)
        headers: list[tuple[str, str]] = []
        for mapping in variant.headers:
            value = header_value(claim_at(principal.claims, mapping.claim), self._max, f"claim {mapping.claim!r}")
            if value is not None:
                headers.append((mapping.header, value))
        answer: tuple[tuple[str, str], ...] = ()
        consumer = self._consumer
        if consumer is not None:
            found = claim_at(principal.claims, consumer.claim)
            value = None if isinstance(found, list) else header_value(found, self._max, f"claim {consumer.claim!r}")
            if value is not None:
                answer = ((consumer.answer_header, value),)
        renew_at = math.inf
        if self.assertions is not None:
            token, expires = self.assertions.mint(principal, variant.audience, now)
            if len(token) > self._max:
                raise UpstreamClaimTooLarge(f"the identity assertion is longer than {self._max} bytes")
            headers.append((self.assertions.header, token))
            # Handed out in the first half of its life, then re-minted, and reusable for at most that half:
            # no answer is reused past the assertion's `exp`, none handed out with less than half its life.
            half = (expires - now) / 2
            renew_at = now + half
            ceiling = min(ceiling, int(half))
        return allow(
            principal,
            cache_max_age=max(ceiling, 0),
            headers=tuple(headers),
            answer_headers=answer,
            renew_at=renew_at,
        )
