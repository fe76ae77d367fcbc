"""RFC 9449: a DPoP-bound token needs its proof on every request; no downgrade to Bearer."""

from __future__ import annotations

import re
from typing import Protocol

from verifier.binding.dpop import AcceptedProof, malformed_binding
from verifier.checks.base import Check, Passed, Route
from verifier.credentials import Credential, TokenScheme
from verifier.errors import InvalidDpopProof, InvalidToken, Scheme, SenderConstraintFailed
from verifier.principal import Principal, confirmation
from verifier.request import DEFAULT_PORTS, RequestAttributes

# What may not appear in a request's authority for it to be read as one (RFC 3986 section 3.2: `/`, `?` and `#` end it,
# `@` ends a userinfo; a backslash is `/` to WHATWG URL parsers); control characters and spaces neither.
_NOT_IN_AUTHORITY = re.compile(r"[/?#@\\\x00-\x20\x7f]")
# The schemes a request's URL may have (the doors report them lower-cased); anything else is text that ends the URL.
_SCHEMES = frozenset(DEFAULT_PORTS)


class ProofVerifier(Protocol):
    """RFC 9449 DPoP proof verification (verifier.binding.dpop.DpopVerifier)."""

    async def verify(
        self, proof: str | None, *, method: str, url: str, access_token: str, expected_jkt: str | None
    ) -> AcceptedProof:
        """Returns the proof key's thumbprint (and its nonce's issue time) or raises InvalidDpopProof / UseDpopNonce."""
        ...

    def renewed_nonce(self, accepted: AcceptedProof) -> str | None:
        """The next server nonce for the allow, when the accepted proof's nonce is getting old."""
        ...


class DpopBinding(Check):
    """The DPoP proof of a DPoP-bound token (section 7.1), or the refusal of a downgrade (section 7.2)."""

    per_request = True
    from_memory = False  # a proof's jti is remembered in the shared state

    def __init__(self, verifier: ProofVerifier | None) -> None:
        self._verifier = verifier  # None: DPoP is refused (several workers without shared state)

    def for_token(self, principal: Principal, credential: Credential) -> bool:
        """Presented with the DPoP scheme, or bound to a DPoP key."""
        return credential.scheme is TokenScheme.DPOP or "jkt" in confirmation(principal)

    async def check(
        self, principal: Principal, credential: Credential, attrs: RequestAttributes, route: Route
    ) -> Principal | Passed:
        """Raises unless the request carries a valid proof by the key the token is bound to; an allow whose
        proof's server nonce is getting old hands the client the next one (`DPoP-Nonce`, RFC 9449 section 8.2)."""
        cnf = confirmation(principal)
        jkt = cnf.get("jkt")
        if not isinstance(jkt, str) or not jkt:
            if "jkt" in cnf:  # null, "", a number: binds to no key, under either scheme (`malformed_binding`)
                raise malformed_binding()
            if credential.scheme is TokenScheme.DPOP:
                raise InvalidToken("token is not DPoP-bound", code="token_not_dpop_bound")  # a DPoP challenge
            return principal
        if credential.scheme is not TokenScheme.DPOP:
            raise SenderConstraintFailed(
                "a DPoP-bound token must be presented with the DPoP scheme", scheme=Scheme.DPOP
            )
        if self._verifier is None:
            raise InvalidDpopProof("DPoP is not enabled on this verifier")
        path = attrs.path.split("?", 1)[0]
        if "#" in path or not attrs.host or _NOT_IN_AUTHORITY.search(attrs.host) or attrs.scheme not in _SCHEMES:
            # Joined, the scheme, host and path would not be read as this one URL: a `#` or `?` ends its path early, a
            # `/` or `@` moves where the host ends. A proof for what the URL is read as (`/orders` for the target
            # `/orders#/../../admin`; `https://api/` for `Host: api#`; `https://api/orders` for the scheme
            # `https://api/orders#` a gateway passed on from the client's X-Forwarded-Proto) would pass for a request
            # an upstream serves as another. No request-target has a `#` (RFC 9112 section 3.2), no authority those
            # characters, and a scheme is `http` or `https`.
            raise InvalidDpopProof("the request is not one URL a proof's htu can name")
        url = f"{attrs.scheme}://{attrs.host}{path}"
        proof = attrs.headers.get("dpop")
        token = credential.token
        accepted = await self._verifier.verify(
            proof, method=attrs.method, url=url, access_token=token, expected_jkt=jkt
        )
        renewed = self._verifier.renewed_nonce(accepted)
        return principal if renewed is None else Passed(principal, (("dpop-nonce", renewed),))
