"""The identity assertion: a short-lived JWT (RFC 7519) the verifier signs for the upstream.

The upstream verifies it against the verifier's JWKS (RFC 7517), served at `GET /.well-known/jwks.json`
on the HTTP listener: the current key and every configured previous public key, each with its RFC 7638
thumbprint as `kid`, so assertions signed before a rotation stay verifiable until they expire.

Header `{"alg": ES256|EdDSA, "typ": "JWT", "kid": ...}`; claims `iss` (ours), `idp` (the token's issuer: `sub`
is unique only within it), `aud`, `iat`, `exp`, `jti` and the configured ones copied from the judged principal
(`scope` and `roles` as the verifier judged them, `client_id` as revocation and the route's `clients_any` read it:
the token's `client_id`, else its `azp`, `verifier.principal.clients_of`).

A listed claim is read as `verifier.claimpath` reads any claim the config names: the token's claim of that exact
name, copied under it; else, for a dotted path, the member it names, copied at the same path (`realm_access.roles`
arrives as `{"realm_access": {"roles": [...]}}`, the object holding only the listed members): an upstream reads
the assertion as it would the token.

The assertion never outlives the token it speaks for: its `exp` is at most the token's. A token already past its
`exp` (accepted within its issuer's leeway) is refused as expired rather than given an assertion born expired
(`exp` <= `iat`), which an upstream checking `exp` would refuse after the verifier let the request through.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from verifier.binding.dpop import thumbprint
from verifier.claimpath import claim_steps, find_claim
from verifier.config.upstream import IdentityTokenConfig, PublicKey
from verifier.errors import TokenExpired
from verifier.principal import Principal
from verifier.upstream.claims import UpstreamClaimTooLarge


def public_jwk(key: PublicKey) -> dict[str, Any]:
    """The public key as a JWK with its RFC 7638 thumbprint as `kid` and `use: sig`."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(key, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(key, as_dict=True)
    jwk["kid"] = thumbprint(jwk)
    jwk["use"] = "sig"
    jwk["alg"] = "ES256" if jwk["kty"] == "EC" else "EdDSA"
    return jwk


class IdentityAssertions:
    """Mints assertions with the configured key; publishes the JWKS (built once)."""

    def __init__(self, config: IdentityTokenConfig) -> None:
        if config.private_key is None:
            raise ValueError("identity_token needs a private key")
        self.config = config
        self._key = config.private_key
        self.header = config.header
        current = public_jwk(config.private_key.public_key())
        self.kid: str = current["kid"]
        keys = [current]
        for public in config.previous_keys:
            jwk = public_jwk(public)
            if all(k["kid"] != jwk["kid"] for k in keys):
                keys.append(jwk)
        self.jwks: bytes = json.dumps({"keys": keys}).encode()
        self._headers = {"kid": self.kid, "typ": "JWT"}
        self._claims = tuple((name, claim_steps(name)) for name in config.claims)  # split once, at start-up

    def mint(self, principal: Principal, audience: str, now: float) -> tuple[str, int]:
        """A signed assertion for `principal` to `audience`, and its `exp` (never past the token's own)."""
        issued = int(now)
        expires = min(issued + self.config.lifetime_seconds, int(principal.expires_at))
        if expires <= issued:  # past the token's `exp`, accepted within its leeway: no assertion born expired
            raise TokenExpired("token expired: an identity assertion cannot outlive it")
        claims: dict[str, Any] = {}
        built: set[int] = set()  # the objects made here for dotted paths (never the token's own)
        for name, steps in self._claims:
            if steps and name not in principal.claims:
                _put(claims, steps, find_claim(principal.claims, name, steps), built)
                continue
            value = _claim(principal, name)
            if value is not None:
                claims[name] = value
        # `idp`: the issuer that vouched for `sub` (a subject is unique only within its issuer, and `iss` is ours):
        # with several issuers, or a tenant template, equal subjects of two issuers stay apart upstream.
        claims.update(
            iss=self.config.issuer,
            idp=principal.issuer,
            aud=audience,
            iat=issued,
            exp=expires,
            jti=secrets.token_urlsafe(16),
        )
        try:
            token = jwt.encode(claims, self._key, algorithm=self.config.algorithm, headers=self._headers)
        except (RecursionError, ValueError, TypeError) as exc:  # a listed claim nested past what JSON encodes
            raise UpstreamClaimTooLarge("a listed claim cannot be put in the identity assertion") from exc
        return token, expires


def _put(claims: dict[str, Any], steps: tuple[str, ...], value: Any, built: set[int]) -> None:
    """`value` at the path `steps` in `claims`, through objects made for it (none when absent: no member)."""
    if value is None:
        return
    node = claims
    for step in steps[:-1]:
        child = node.get(step)
        if child is None:
            child = {}
            built.add(id(child))
            node[step] = child
        elif id(child) not in built:  # the whole object was listed and copied: it holds this member already
            return
        node = child
    node[steps[-1]] = value


def _claim(principal: Principal, name: str) -> Any:
    """What the verifier judged for `sub`, `scope`, `roles` and `client_id`; any other claim as the token has it."""
    if name == "sub":
        return principal.subject or None
    if name == "client_id":
        return principal.client_id
    if name == "scope":
        return principal.scope or None
    if name == "roles":
        return sorted(principal.roles) or None
    return principal.claims.get(name)
