"""What the upstream receives on an allow: mapped claims, the Kong consumer, the identity assertion.

Built once per admitted token (and per route that changes it), kept in the cache record with the
answer, and rebuilt only when its assertion reaches half its life: the hot path serializes nothing.

Each value is bounded (`upstream.max_value_bytes`), and so is their sum (`upstream.max_total_bytes`), checked
here, where the answer's identity is assembled: a gateway reads the answer head into a buffer of its own
(nginx: 16 KiB), and past it answers a valid token with its own 5xx instead of our decision.
"""

from __future__ import annotations

import dataclasses
import math

from verifier.claimpath import find_claim
from verifier.config.upstream import HeaderMapping, RouteUpstream, UpstreamConfig
from verifier.decision import Decision, Headers, allow
from verifier.principal import Principal
from verifier.upstream.assertion import IdentityAssertions
from verifier.upstream.claims import (
    UpstreamClaimTooLarge,
    UpstreamIdentityTooLarge,
    consumer_name,
    header_value,
)

__all__ = [
    "UpstreamAnswers",
    "UpstreamClaimTooLarge",
    "UpstreamIdentityTooLarge",
    "Variant",
    "wire_bytes",
    "wire_chars",
]


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
        self._max_total = config.max_total_bytes
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
        """The allow answer; raises `UpstreamClaimTooLarge` when a value does not fit in a header, and
        `UpstreamIdentityTooLarge` when all of them do not fit in `max_total_bytes`."""
        if self.plain and not variant.headers:  # a route may map headers of its own
            return self._bounded(allow(principal, cache_max_age=ceiling))
        headers: list[tuple[str, str]] = []
        for mapping in variant.headers:
            value = header_value(find_claim(principal.claims, mapping.claim), self._max, f"claim {mapping.claim!r}")
            if value is not None:
                headers.append((mapping.header, value))
        answer: tuple[tuple[str, str], ...] = ()
        consumer = self._consumer
        if consumer is not None:
            found = find_claim(principal.claims, consumer.claim)
            value = None if isinstance(found, list) else consumer_name(found, self._max, f"claim {consumer.claim!r}")
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
        return self._bounded(
            allow(
                principal,
                cache_max_age=max(ceiling, 0),
                headers=tuple(headers),
                answer_headers=answer,
                renew_at=renew_at,
            )
        )

    def _bounded(self, decision: Decision) -> Decision:
        """`decision`, unless its identity headers (and the Kong consumer) are more than `max_total_bytes`."""
        size = wire_chars(decision.upstream_headers)
        if decision.answer_headers:
            size += wire_chars(decision.answer_headers)
        # Characters first: a UTF-8 character is 1 to 4 bytes, so only an identity within 4x of the bound
        # is counted in bytes (a typical one, a few hundred characters, never is).
        if size * 4 > self._max_total and size <= self._max_total:
            size = wire_bytes(decision.upstream_headers) + wire_bytes(decision.answer_headers)
        if size > self._max_total:
            raise UpstreamIdentityTooLarge(f"the identity headers take {size} bytes or more, over {self._max_total}")
        return decision


def wire_chars(headers: Headers) -> int:
    """The characters `headers` take in an HTTP/1.1 head ("name: value\\r\\n"): its bytes when all are ASCII."""
    size = 4 * len(headers)
    for name, value in headers:
        size += len(name) + len(value)
    return size


def wire_bytes(headers: Headers) -> int:
    """The bytes `headers` take in an HTTP/1.1 head ("name: value\\r\\n", UTF-8), from the strings built: only a
    value that is not ASCII is encoded (`str.isascii` reads a flag). Names are ASCII (RFC 9110 tokens)."""
    size = wire_chars(headers)
    for _, value in headers:
        if not value.isascii():
            size += len(value.encode("utf-8")) - len(value)
    return size
