"""The verifier against a real, certified OpenID Provider (npm `oidc-provider`) on loopback.

Discovery, JWKS, ES256/RS256/EdDSA RFC 9068 access tokens, a key rotation mid-test, and the
provider stopped mid-test (cached keys keep working; new unknown kids fail closed).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from doorkit import http_exchange
from op_harness import OTHER_AUDIENCE, OpenIDProvider
from rigs import provider_fixture, verifier_trusting

from verifier.app import App

pytestmark = pytest.mark.integration


provider = provider_fixture("provider")


@pytest.fixture
async def verifier(provider: OpenIDProvider) -> AsyncIterator[App]:
    async with verifier_trusting(provider, jwks_cooldown_seconds=0.2, fetch_timeout_seconds=2.0) as app:
        yield app


async def _check(app: App, token: str) -> tuple[int, str]:
    raw = f"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\nX-Forwarded-Uri: /a\r\n\r\n"
    answer = await http_exchange(app.ports.http, raw.encode())
    status = int(answer.split(b" ", 2)[1])
    reason = next(
        (
            line.split(b":", 1)[1].strip().decode()
            for line in answer.split(b"\r\n")
            if line.lower().startswith(b"x-verifier-reason")
        ),
        "",
    )
    return status, reason


@pytest.mark.parametrize("alg", ["ES256", "RS256", "EdDSA"])
async def test_provider_issued_access_tokens_verify(provider: OpenIDProvider, verifier: App, alg: str) -> None:
    token = await asyncio.to_thread(provider.client_credentials_token, alg=alg)
    assert await _check(verifier, token) == (200, "ok")


async def test_token_for_another_resource_is_forbidden(provider: OpenIDProvider, verifier: App) -> None:
    token = await asyncio.to_thread(provider.client_credentials_token, resource=OTHER_AUDIENCE)
    assert await _check(verifier, token) == (403, "audience_mismatch")


async def test_rotation_mid_test_new_kid_is_fetched_once_and_old_tokens_fail_when_keys_are_gone(
    provider: OpenIDProvider, verifier: App
) -> None:
    old = await asyncio.to_thread(provider.client_credentials_token, alg="ES256")
    old_unseen = await asyncio.to_thread(provider.client_credentials_token, alg="ES256")
    assert await _check(verifier, old) == (200, "ok")
    await asyncio.to_thread(provider.rotate_keys)
    await asyncio.sleep(0.3)  # past the unknown-kid cooldown
    before = (await asyncio.to_thread(provider.stats))["jwks"]
    fresh = [await asyncio.to_thread(provider.client_credentials_token, alg="ES256") for _ in range(5)]
    results = await asyncio.gather(*(_check(verifier, t) for t in fresh))
    assert all(r == (200, "ok") for r in results)
    after = (await asyncio.to_thread(provider.stats))["jwks"]
    assert after - before == 1, "concurrent unknown-kid misses must share one JWKS fetch"
    # The old key left the JWKS: a first-seen token signed by it can no longer be verified ...
    assert await _check(verifier, old_unseen) == (401, "key_unknown")
    # ... and neither can one verified before the rotation: a withdrawn key (perhaps leaked) stops vouching for
    # the cached tokens it signed, as a replica that never saw the token would already refuse it.
    assert await _check(verifier, old) == (401, "key_unknown")


async def test_provider_stopped_cached_keys_keep_working_and_unknown_kids_fail_closed(
    provider: OpenIDProvider, verifier: App
) -> None:
    first = await asyncio.to_thread(provider.client_credentials_token, alg="RS256")
    second = await asyncio.to_thread(provider.client_credentials_token, alg="EdDSA")
    assert await _check(verifier, first) == (200, "ok")
    await asyncio.to_thread(provider.rotate_keys, retain_previous=True)
    rotated = await asyncio.to_thread(provider.client_credentials_token, alg="ES256")
    await asyncio.to_thread(provider.stop)
    # A token never seen before, signed by a key we already hold: verified from the cached keys.
    assert await _check(verifier, second) == (200, "ok")
    assert verifier.ready()
    # A token under a kid we never fetched: the provider is gone, so it fails closed with 503.
    await asyncio.sleep(0.3)
    status, reason = await _check(verifier, rotated)
    assert status == 503 and reason == "provider_unavailable"
