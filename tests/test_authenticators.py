"""verifier.authenticators: which token shapes no authenticator takes, and what the client is told."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from doorkit import door_settings
from tokenkit import DISCOVERY_URL, JWKS_URL, FakeFetcher, Mint, b64, claims, discovery_document, issuer_settings

from verifier.app import App
from verifier.authenticators import NO_AUTHENTICATOR, NO_AUTHENTICATOR_JWE
from verifier.clock import SystemClock
from verifier.request import RequestAttributes
from verifier.settings import Settings

JWE_HEADER = b64(json.dumps({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": "es-1"}).encode())


def _app(jwks_document: dict[str, Any]) -> App:
    fetcher = FakeFetcher()
    fetcher.serve(DISCOVERY_URL, discovery_document())
    fetcher.serve(JWKS_URL, jwks_document)
    settings = Settings(grpc=None, http=None, forward_auth=door_settings(), metrics=None, issuers=(issuer_settings(),))
    return App(settings, fetcher=fetcher, clock=SystemClock())


async def _answer(app: App, token: str) -> tuple[int, str, str]:
    attrs = RequestAttributes(
        method="GET",
        scheme="https",
        host="api.example.test",
        path="/orders",
        headers={"authorization": f"Bearer {token}"},
    )
    decision = await app.pipeline.decide(attrs, "test")
    challenge = dict(decision.response_headers).get("www-authenticate", "")
    return decision.status, decision.reason, challenge


def _signed(mint: Mint) -> tuple[str, str, str]:
    now = int(time.time())
    header, payload, signature = mint(claims(exp=now + 300, iat=now - 5)).split(".")
    return header, payload, signature


@pytest.mark.parametrize(
    "token",
    [
        lambda h, p, s: f"{JWE_HEADER}.AAAA.AAAA.AAAA.AAAA",
        lambda h, p, s: f"{JWE_HEADER}..AAAA.AAAA.AAAA",  # dir / ECDH-ES: an empty encrypted key
        lambda h, p, s: f"{h}.AAAA.{p}.AAAA.{s}",  # a JWS header dressed as a JWE
    ],
    ids=["rsa-oaep", "empty-encrypted-key", "jws-header-five-segments"],
)
async def test_a_jwe_is_refused_as_an_encrypted_token(jwks_document: dict[str, Any], mint: Mint, token: Any) -> None:
    status, reason, challenge = await _answer(_app(jwks_document), token(*_signed(mint)))
    assert (status, reason) == (401, "token_malformed")
    assert NO_AUTHENTICATOR_JWE in challenge


@pytest.mark.parametrize(
    ("token", "status", "reason"),
    [
        # RFC 7515 section 7.2: the JSON serializations are not what a bearer token is (RFC 6750 b64token).
        (lambda h, p, s: json.dumps({"protected": h, "payload": p, "signature": s}), 400, "invalid_request"),
        (
            lambda h, p, s: json.dumps({"payload": p, "signatures": [{"protected": h, "signature": s}]}),
            400,
            "invalid_request",
        ),
        # The same, base64url-encoded to pass as a b64token: not a JWS either.
        (
            lambda h, p, s: b64(json.dumps({"protected": h, "payload": p, "signature": s}).encode()),
            401,
            "token_malformed",
        ),
    ],
    ids=["flattened-json", "general-json", "flattened-json-in-base64url"],
)
async def test_a_jws_json_serialization_is_never_verified(
    jwks_document: dict[str, Any], mint: Mint, token: Any, status: int, reason: str
) -> None:
    got_status, got_reason, challenge = await _answer(_app(jwks_document), token(*_signed(mint)))
    assert (got_status, got_reason) == (status, reason)
    assert NO_AUTHENTICATOR_JWE not in challenge
    assert reason != "token_malformed" or NO_AUTHENTICATOR in challenge
