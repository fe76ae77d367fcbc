"""`GET /.well-known/jwks.json`: the public keys of the identity assertions the verifier signs (RFC 7517).

Served on the HTTP listener when `upstream.identity_token` is configured: the current key and every
configured previous public key, so an upstream verifies assertions signed before a rotation until they
expire. The document is built once at start-up.
"""

from __future__ import annotations

from collections.abc import Mapping

from verifier.doors.routes import HttpAnswer, HttpRequest, Router

JWKS_PATH = "/.well-known/jwks.json"
# Seconds an upstream may cache the key set. Short: a rotation's new key is picked up this fast even
# by a client that does not refetch on an unknown `kid` (PyJWT's PyJWKClient does).
JWKS_MAX_AGE_SECONDS = 300


def add_jwks_route(router: Router, jwks: bytes) -> None:
    """Registers the JWKS endpoint, answering `jwks` (a serialized JWK Set)."""
    answer = HttpAnswer(
        200,
        (("content-type", "application/jwk-set+json"), ("cache-control", f"public, max-age={JWKS_MAX_AGE_SECONDS}")),
        jwks,
    )

    async def keys(_: HttpRequest, __: Mapping[str, str]) -> HttpAnswer:
        return answer

    router.add("GET", JWKS_PATH, keys)
