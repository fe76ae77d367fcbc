"""A provider that moves its JWKS: discovery is run again when the jwks_uri fails or a kid stays unknown.

Against the real `HttpFetcher` and a small aiohttp provider on a loopback port whose discovery document can name
another `jwks_uri` (and whose old one can start answering 404/410, or keep its old keys). Time moves only through
`FrozenClock`, so the rediscovery rate limit is exact.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from support import FrozenClock, serve_on_loopback
from tokenkit import MAX_TOKEN_BYTES, Mint, SigningKeys, claims, issuer_settings, public_jwk

from verifier.app import HttpSessions
from verifier.errors import ProviderUnavailable, UnknownKey
from verifier.observe.metrics import Metrics
from verifier.tokens.fetch import HttpFetcher
from verifier.tokens.jwks import IssuerKeys, KeyStore
from verifier.tokens.jwt import JwtVerifier

COOLDOWN = 30.0


class MovingProvider:
    """An OIDC provider on a loopback port: discovery names `jwks_path`; each path of `jwks` answers its key set,
    each of `status` that status; `discovery` overrides members of the discovery document. Requests are counted."""

    def __init__(self) -> None:
        self.jwks_path = "/jwks"
        self.jwks: dict[str, dict[str, Any]] = {}
        self.status: dict[str, int] = {}
        self.discovery: dict[str, Any] = {}
        self.hits: Counter[str] = Counter()
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _answer(self, request: web.Request) -> web.Response:
        path = request.path
        self.hits[path] += 1
        if path == "/.well-known/openid-configuration":
            return web.json_response(
                {"issuer": self.issuer, "jwks_uri": self.issuer + self.jwks_path, **self.discovery}
            )
        if path in self.status:
            return web.Response(status=self.status[path])
        if path in self.jwks:
            return web.json_response(self.jwks[path])
        return web.Response(status=404)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._answer)
        self._runner, self.port = await serve_on_loopback(app)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def provider() -> AsyncIterator[MovingProvider]:
    served = MovingProvider()
    await served.start()
    yield served
    await served.stop()


@pytest.fixture
async def http_fetcher() -> AsyncIterator[HttpFetcher]:
    sessions = HttpSessions()
    yield HttpFetcher(sessions.providers)
    await sessions.close()


def _verifier(provider: MovingProvider, fetcher: HttpFetcher, clock: FrozenClock) -> tuple[JwtVerifier, IssuerKeys]:
    settings = issuer_settings(issuer=provider.issuer, jwks_cooldown_seconds=COOLDOWN, fetch_timeout_seconds=5.0)
    keys = IssuerKeys(settings, fetcher, clock, Metrics())
    store = KeyStore({settings.issuer: keys})
    return JwtVerifier({settings.issuer: settings}, store, clock, max_token_bytes=MAX_TOKEN_BYTES), keys


@pytest.mark.parametrize("gone", [404, 410, 503])
async def test_a_jwks_uri_that_stops_answering_is_left_for_the_one_discovery_names_now(
    provider: MovingProvider, http_fetcher: HttpFetcher, keys: SigningKeys, mint: Mint, gone: int
) -> None:
    old, new = public_jwk(keys.es256, "old"), public_jwk(keys.rs256, "new")
    provider.jwks["/jwks"] = {"keys": [old]}
    clock = FrozenClock()
    verifier, issuer_keys = _verifier(provider, http_fetcher, clock)
    await issuer_keys.refresh()
    assert issuer_keys.kids == ("old",)
    # The provider moves its JWKS: the old URI fails, discovery names the new one.
    provider.jwks_path = "/v2/jwks"
    provider.jwks["/v2/jwks"] = {"keys": [old, new]}
    provider.status["/jwks"] = gone
    clock.advance(COOLDOWN)
    with pytest.raises(ProviderUnavailable):
        await issuer_keys.refresh()  # the held jwks_uri fails: the old keys stay (fail safe)
    assert issuer_keys.kids == ("old",)
    token = mint(claims(iss=provider.issuer), alg="ES256", kid="old")
    assert (await verifier.verify(verifier.parse(token))).subject == "user-1"
    await issuer_keys.refresh()  # the retry runs discovery again and fetches where it points
    assert issuer_keys.kids == ("old", "new")
    assert provider.hits["/.well-known/openid-configuration"] == 2 and provider.hits["/v2/jwks"] == 1
    token = mint(claims(iss=provider.issuer), alg="RS256", kid="new")
    assert (await verifier.verify(verifier.parse(token))).subject == "user-1"
    await issuer_keys.refresh()  # settled: the new jwks_uri is fetched, no discovery
    assert provider.hits["/.well-known/openid-configuration"] == 2 and provider.hits["/v2/jwks"] == 2


async def test_rediscovery_after_failures_is_rate_limited_and_keeps_the_old_keys(
    provider: MovingProvider, http_fetcher: HttpFetcher, keys: SigningKeys
) -> None:
    provider.jwks["/jwks"] = {"keys": [public_jwk(keys.es256, "old")]}
    clock = FrozenClock()
    _, issuer_keys = _verifier(provider, http_fetcher, clock)
    await issuer_keys.refresh()
    provider.status["/jwks"] = 503  # failing, and discovery still names it
    clock.advance(COOLDOWN)
    for _ in range(5):  # the background loop's retries, a second apart
        with pytest.raises(ProviderUnavailable):
            await issuer_keys.refresh()
        clock.advance(1)
    assert provider.hits["/.well-known/openid-configuration"] == 2  # the first, and one rediscovery
    assert issuer_keys.kids == ("old",)
    clock.advance(COOLDOWN)
    with pytest.raises(ProviderUnavailable):
        await issuer_keys.refresh()
    assert provider.hits["/.well-known/openid-configuration"] == 3  # once per cooldown
    del provider.status["/jwks"]
    await issuer_keys.refresh()
    assert issuer_keys.kids == ("old",)


@pytest.mark.parametrize(
    "moved",
    [
        {"jwks_uri": "http://attacker.example/jwks"},  # plain http off loopback
        {"issuer": "http://127.0.0.1:1/other"},  # another issuer's document
        {"jwks_uri": 42},
    ],
    ids=["http-off-loopback", "issuer-mismatch", "not-a-url"],
)
async def test_a_rediscovered_document_is_checked_as_the_first_one_and_the_old_uri_kept(
    provider: MovingProvider, http_fetcher: HttpFetcher, keys: SigningKeys, moved: dict[str, Any]
) -> None:
    provider.jwks["/jwks"] = {"keys": [public_jwk(keys.es256, "old")]}
    clock = FrozenClock()
    _, issuer_keys = _verifier(provider, http_fetcher, clock)
    await issuer_keys.refresh()
    provider.status["/jwks"] = 503
    clock.advance(COOLDOWN)
    with pytest.raises(ProviderUnavailable):
        await issuer_keys.refresh()
    provider.discovery = moved
    with pytest.raises(ProviderUnavailable, match=r"refused|does not match"):
        await issuer_keys.refresh()
    assert issuer_keys.kids == ("old",)
    del provider.status["/jwks"]
    await issuer_keys.refresh()  # the old jwks_uri, still held, answers again
    assert issuer_keys.kids == ("old",) and provider.hits["/jwks"] == 3


async def test_an_unknown_kid_the_old_jwks_uri_still_lacks_is_found_where_discovery_now_points(
    provider: MovingProvider, http_fetcher: HttpFetcher, keys: SigningKeys, mint: Mint
) -> None:
    """The old URI keeps answering its old keys (a stale copy left behind); the provider signs with a key
    published only at its new jwks_uri."""
    old = public_jwk(keys.es256, "old")
    provider.jwks["/jwks"] = {"keys": [old]}
    clock = FrozenClock()
    verifier, issuer_keys = _verifier(provider, http_fetcher, clock)
    await issuer_keys.refresh()
    provider.jwks_path = "/v2/jwks"
    provider.jwks["/v2/jwks"] = {"keys": [old, public_jwk(keys.rs256, "new")]}
    clock.advance(COOLDOWN)
    token = mint(claims(iss=provider.issuer), alg="RS256", kid="new")
    assert (await verifier.verify(verifier.parse(token))).subject == "user-1"
    assert provider.hits == Counter({"/.well-known/openid-configuration": 2, "/jwks": 2, "/v2/jwks": 1})
    # A made-up kid a cooldown later: refetched from the new URI and discovery asked once (it names the same
    # jwks_uri: nothing more is fetched); the next within the cooldown costs the provider nothing.
    clock.advance(COOLDOWN)
    made_up = mint(claims(iss=provider.issuer), alg="ES256", kid="made-up", key=ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(UnknownKey):
        await verifier.verify(verifier.parse(made_up))
    with pytest.raises(UnknownKey):
        await verifier.verify(verifier.parse(made_up))  # within the cooldown: no fetch at all
    assert provider.hits == Counter({"/.well-known/openid-configuration": 3, "/jwks": 2, "/v2/jwks": 2})


async def test_an_unknown_kid_asks_discovery_at_most_once_a_second_even_without_a_cooldown(
    provider: MovingProvider, http_fetcher: HttpFetcher, keys: SigningKeys, mint: Mint
) -> None:
    provider.jwks["/jwks"] = {"keys": [public_jwk(keys.es256, "old")]}
    clock = FrozenClock()
    settings = issuer_settings(issuer=provider.issuer, jwks_cooldown_seconds=0.0)
    issuer_keys = IssuerKeys(settings, http_fetcher, clock, Metrics())
    verifier = JwtVerifier(
        {settings.issuer: settings}, KeyStore({settings.issuer: issuer_keys}), clock, max_token_bytes=MAX_TOKEN_BYTES
    )
    await issuer_keys.refresh()
    clock.advance(1)
    for step in range(5):  # no cooldown: each made-up kid refetches; discovery is asked once
        token = mint(claims(iss=provider.issuer), alg="ES256", kid=f"made-up-{step}")
        with pytest.raises(UnknownKey):
            await verifier.verify(verifier.parse(token))
    assert provider.hits == Counter({"/.well-known/openid-configuration": 2, "/jwks": 6})
    assert issuer_keys.kids == ("old",)


async def test_a_configured_jwks_uri_is_never_rediscovered(
    provider: MovingProvider, http_fetcher: HttpFetcher, keys: SigningKeys
) -> None:
    provider.jwks["/jwks"] = {"keys": [public_jwk(keys.es256, "old")]}
    clock = FrozenClock()
    settings = issuer_settings(issuer=provider.issuer, jwks_uri=provider.issuer + "/jwks")
    issuer_keys = IssuerKeys(settings, http_fetcher, clock, Metrics())
    await issuer_keys.refresh()
    provider.status["/jwks"] = 410
    for _ in range(3):
        clock.advance(COOLDOWN)
        with pytest.raises(ProviderUnavailable):
            await issuer_keys.refresh()
    assert provider.hits["/.well-known/openid-configuration"] == 0
    assert issuer_keys.kids == ("old",)
