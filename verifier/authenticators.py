"""Who vouches for a token: tried in order, each able to say "not responsible" (Ory Oathkeeper's chain).

A JWT is checked against its issuer's keys; an opaque token is sent to the one issuer the route trusts
among those configured to introspect opaque tokens (settings refuse two that a route could not tell
apart: an opaque token does not name its issuer, and a token is never disclosed to a provider that is
not responsible for it; `verifier.pipeline` picks the authenticators per route by `sends_to`). When
no authenticator takes a token, it is refused as malformed (401 invalid_token).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from verifier.errors import MalformedToken, VerifierError
from verifier.principal import Principal
from verifier.tokens import jws
from verifier.tokens.jwt import JwtVerifier


class NotResponsible(Exception):
    """This authenticator does not take this kind of token: the next one is asked."""


NO_AUTHENTICATOR = "no authenticator takes this token (not a JWS, and no issuer introspects opaque tokens)"
NO_AUTHENTICATOR_JWE = "an encrypted token (JWE) is not accepted, and no issuer introspects opaque tokens"
JWE_DOTS = 4  # JWE compact serialization: header.key.iv.ciphertext.tag


@dataclasses.dataclass(slots=True)
class Seen:
    """What an authenticator learned of a token before deciding, for the audit record of either outcome."""

    issuer: str = ""
    kid: str | None = None
    alg: str = ""


class Introspector(Protocol):
    """RFC 7662 introspection for one issuer (verifier.tokens.introspection.Introspector)."""

    async def introspect(self, token: str, token_hash: bytes) -> Principal:
        """The principal of an active token, or raises."""
        ...


class Authenticator(Protocol):
    """Turns a token into a principal, or raises `NotResponsible` before looking further.

    `sends_to` names the one issuer every token it takes is disclosed to (introspection of opaque
    tokens), or is None when the token itself names its issuer: on a route that does not trust that
    issuer (`issuers_any`) the pipeline never asks it, so the token never leaves for that provider.
    """

    sends_to: str | None

    def verify_now(self, token: str, seen: Seen) -> Principal | None:
        """The principal without I/O, or None when `verify` must be awaited; raises a refusal."""
        ...

    async def verify(self, token: str, token_hash: bytes, seen: Seen) -> Principal:
        """The principal, with I/O if need be (a key refresh, the provider); raises a refusal."""
        ...


class JwtAuthenticator:
    """RFC 7519 / RFC 9068: a JWS-looking token, verified against its issuer's keys."""

    sends_to: str | None = None  # the token names its issuer; checked locally against its keys

    def __init__(self, jwt: JwtVerifier) -> None:
        self._jwt = jwt

    @property
    def jwt(self) -> JwtVerifier:
        """The verifier it hands JWS-looking tokens to."""
        return self._jwt

    def _parse(self, token: str, seen: Seen) -> jws.CompactJWS:
        if not jws.looks_like_jws(token):
            raise NotResponsible
        parsed = self._jwt.parse(token)
        seen.kid, seen.alg = parsed.kid, parsed.alg
        iss = parsed.payload.get("iss")
        seen.issuer = iss if isinstance(iss, str) else ""
        return parsed

    def verify_now(self, token: str, seen: Seen) -> Principal | None:
        """Verified inline when the key is held; None when the kid is unknown (a refresh may find it)."""
        parsed = self._parse(token, seen)
        return self._jwt.verify_now(parsed)

    async def verify(self, token: str, token_hash: bytes, seen: Seen) -> Principal:
        """Verified, refreshing the issuer's keys if need be."""
        parsed = self._parse(token, seen)
        return await self._jwt.verify(parsed)


class OpaqueIntrospection:
    """RFC 7662: a token that is not a JWS, sent to an issuer that introspects opaque tokens."""

    def __init__(self, issuer: str, introspector: Introspector) -> None:
        self._issuer = issuer
        self.sends_to: str | None = issuer
        self._introspector = introspector

    def _take(self, token: str, seen: Seen) -> None:
        if jws.looks_like_jws(token):
            raise NotResponsible  # a JWT names its issuer; it is never sent to this one on a guess
        seen.issuer, seen.alg = self._issuer, "introspection"

    def verify_now(self, token: str, seen: Seen) -> Principal | None:
        """Always None for a token it takes: the provider must be asked."""
        self._take(token, seen)
        return None

    async def verify(self, token: str, token_hash: bytes, seen: Seen) -> Principal:
        """The provider's answer (cached by the introspector)."""
        self._take(token, seen)
        return await self._introspector.introspect(token, token_hash)


def issuer_not_trusted() -> VerifierError:
    """The refusal when the only authenticators that would take the token send it to an issuer the
    route does not trust: not the token's fault, so never remembered for it (another route may take it)."""
    return VerifierError("no issuer trusted on this route takes this token", code="issuer_not_trusted")


def none_responsible(token: str) -> MalformedToken:
    """The refusal when every authenticator said "not responsible"; it names an encrypted JWT (a JWE, RFC 7516
    section 7.1: five segments), whose `iss` no one can read here, so the client is told what it sent."""
    if token.count(".") == JWE_DOTS and token.startswith(jws.JWS_START):
        return MalformedToken(NO_AUTHENTICATOR_JWE)
    return MalformedToken(NO_AUTHENTICATOR)
