"""Baseline (b): the design a user would write first, on the same stack as the no-op.

A fresh ``PyJWKClient`` per request: every check fetches discovery-free JWKS over HTTP, parses the keys
and verifies the signature; nothing is cached and the fetch blocks the event loop. This is what the
verifier's key store and verified-token cache are measured against.
"""

from __future__ import annotations

import jwt

from bench import wire
from bench.noop import Decide

ALGORITHMS = ["ES256", "RS256", "EdDSA"]


def naive_decider(issuer: str) -> Decide:
    """A decision function that verifies the bearer token the naive way, against ``issuer``."""
    jwks_uri = issuer.rstrip("/") + "/jwks"  # verifier.devidp's

    def decide(authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        try:
            client = jwt.PyJWKClient(jwks_uri, cache_keys=False, cache_jwk_set=False)
            key = client.get_signing_key_from_jwt(token)
            jwt.decode(token, key.key, algorithms=ALGORITHMS, audience=wire.AUDIENCE, issuer=issuer)
        except (jwt.PyJWTError, ValueError):
            return False
        return True

    return decide
