"""Issuer templates (verifier/tokens/tenants.py): what a token's `iss` can make the verifier fetch.

The fake provider counts every call, so each test states exactly which requests a token caused.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from support import FrozenClock
from tokenkit import AUDIENCE, MAX_TOKEN_BYTES, FakeFetcher, Mint, claims, discovery_document

from verifier.config.base import ConfigError
from verifier.errors import ClaimInvalid, ProviderUnavailable, TenantNotAllowed, UnknownIssuer, UnknownKey
from verifier.observe.metrics import Metrics
from verifier.settings import IssuerSettings, parse_settings
from verifier.tokens.jwks import KeyStore
from verifier.tokens.jwt import JwtVerifier
from verifier.tokens.tenants import TenantKeys

TEMPLATE = "https://idp.example.test/{tenant}/v2.0"


def tenant_issuer(tenant: str) -> str:
    return TEMPLATE.replace("{tenant}", tenant)


def serve_tenant(fetcher: FakeFetcher, tenant: str, jwks: dict[str, Any], **overrides: Any) -> None:
    issuer = tenant_issuer(tenant)
    document = discovery_document(issuer, f"https://idp.example.test/{tenant}/discovery/v2.0/keys")
    document.update(overrides)
    fetcher.serve(issuer + "/.well-known/openid-configuration", document)
    fetcher.serve(document["jwks_uri"], jwks)


def template(**overrides: Any) -> IssuerSettings:
    values: dict[str, Any] = {
        "issuer": TEMPLATE,
        "audiences": (AUDIENCE,),
        "algorithms": ("ES256",),
        "tenants": ("a", "b", "c"),
    }
    values.update(overrides)
    return IssuerSettings(**values)


def build(settings: IssuerSettings, fetcher: FakeFetcher, clock: FrozenClock) -> tuple[JwtVerifier, TenantKeys]:
    tenants = TenantKeys(settings, fetcher, clock, Metrics())
    store = KeyStore({}, [tenants])
    return JwtVerifier({}, store, clock, max_token_bytes=MAX_TOKEN_BYTES), tenants


def token(mint: Mint, tenant: str, **extra: Any) -> str:
    return mint(claims(iss=tenant_issuer(tenant), **extra))


async def verify(verifier: JwtVerifier, raw: str) -> Any:
    return await verifier.verify(verifier.parse(raw))


@pytest.fixture
def provider(jwks_document: dict[str, Any]) -> FakeFetcher:
    fake = FakeFetcher()
    for tenant in ("a", "b", "c"):
        serve_tenant(fake, tenant, jwks_document)
    return fake


async def test_a_tenant_s_token_verifies_with_keys_discovered_under_its_own_path(
    provider: FakeFetcher, clock: FrozenClock, mint: Mint
) -> None:
    verifier, tenants = build(template(), provider, clock)
    principal = await verify(verifier, token(mint, "b"))
    assert principal.issuer == tenant_issuer("b")
    assert set(provider.calls) == {
        tenant_issuer("b") + "/.well-known/openid-configuration",
        "https://idp.example.test/b/discovery/v2.0/keys",
    }
    assert verifier.verify_now(verifier.parse(token(mint, "b"))) is not None  # held: answered inline
    assert verifier.verify_now(verifier.parse(token(mint, "a"))) is None  # not held: needs a fetch
    assert provider.total == 2 and tenants.tenants_held == 1


@pytest.mark.parametrize(
    "iss",
    [
        "https://idp.example.test/a/b/v2.0",  # two segments
        "https://idp.example.test/%61/v2.0",  # percent-encoding
        "https://idp.example.test/../v2.0",  # a dot segment
        "https://idp.example.test/a..b/v2.0",
        "https://idp.example.test//v2.0",  # empty
        "https://idp.example.test/" + "a" * 65 + "/v2.0",  # too long
        "https://idp.example.test/a/v2.0/",  # trailing slash
        "https://idp.example.test:8443/a/v2.0",  # another port
        "http://idp.example.test/a/v2.0",  # another scheme
        "https://IDP.example.test/a/v2.0",  # not the exact host string
        "https://evil.example/a/v2.0",
        "https://idp.example.test/a/v2.0?x",
        "https://idp.example.test/a\n/v2.0",
    ],
)
async def test_an_iss_that_does_not_fit_the_template_exactly_is_unknown_and_fetches_nothing(
    provider: FakeFetcher, clock: FrozenClock, mint: Mint, iss: str
) -> None:
    verifier, _ = build(template(any_tenant=True, tenants=()), provider, clock)
    with pytest.raises(UnknownIssuer):
        await verify(verifier, mint(claims(iss=iss)))
    assert provider.total == 0


async def test_a_tenant_off_the_allow_list_is_refused_before_any_fetch(
    provider: FakeFetcher, clock: FrozenClock, mint: Mint
) -> None:
    verifier, _ = build(template(tenants=("a",)), provider, clock)
    with pytest.raises(TenantNotAllowed) as refused:
        verifier.verify_now(verifier.parse(token(mint, "b")))  # refused inline: no await, no fetch
    assert refused.value.code == "tenant_not_allowed"
    with pytest.raises(TenantNotAllowed):
        await verify(verifier, token(mint, "b"))
    assert provider.total == 0


async def test_the_tenant_claim_must_name_the_tenant_of_iss_and_is_checked_before_any_fetch(
    provider: FakeFetcher, clock: FrozenClock, mint: Mint
) -> None:
    verifier, _ = build(template(tenant_claim="tid"), provider, clock)
    for tid in ("b", None, ["a"]):
        with pytest.raises(ClaimInvalid) as refused:
            await verify(verifier, token(mint, "a", tid=tid))
        assert refused.value.claim == "tid"
    assert provider.total == 0
    assert (await verify(verifier, token(mint, "a", tid="a"))).issuer == tenant_issuer("a")


async def test_a_tenant_claim_path_is_walked_like_every_claim_the_config_names(
    provider: FakeFetcher, clock: FrozenClock, mint: Mint
) -> None:
    """`tenant_claim: org.tid` read a flat claim of that name, which no token had: every tenant's tokens were refused
    `claim_invalid`. It is read like a role rule's claim now (`verifier.claimpath`): the exact name, else the path,
    every step an object."""
    verifier, _ = build(template(tenant_claim="org.tid"), provider, clock)
    for org in ({"tid": "b"}, [{"tid": "a"}], '{"tid": "a"}', {"other": "a"}):
        with pytest.raises(ClaimInvalid):
            await verify(verifier, token(mint, "a", org=org))
    assert (await verify(verifier, token(mint, "a", org={"tid": "a"}))).issuer == tenant_issuer("a")


async def test_discovery_naming_another_issuer_is_refused_and_remembered_for_the_cooldown(
    provider: FakeFetcher, clock: FrozenClock, mint: Mint, jwks_document: dict[str, Any]
) -> None:
    serve_tenant(provider, "b", jwks_document, issuer=tenant_issuer("a"))  # b's document claims to be a
    verifier, _ = build(template(jwks_cooldown_seconds=30.0), provider, clock)
    with pytest.raises(ProviderUnavailable):
        await verify(verifier, token(mint, "b"))
    assert provider.total == 1
    clock.advance(10)
    with pytest.raises(ProviderUnavailable):
        await verify(verifier, token(mint, "b"))
    assert provider.total == 1  # within the cooldown: not asked again
    serve_tenant(provider, "b", jwks_document)  # fixed
    clock.advance(25)
    await verify(verifier, token(mint, "b"))
    assert provider.total == 3


async def test_a_jwks_uri_off_the_template_s_host_is_refused(
    provider: FakeFetcher, clock: FrozenClock, mint: Mint, jwks_document: dict[str, Any]
) -> None:
    serve_tenant(provider, "c", jwks_document, jwks_uri="https://keys.evil.example/c/keys")
    provider.serve("https://keys.evil.example/c/keys", jwks_document)
    verifier, _ = build(template(), provider, clock)
    with pytest.raises(ProviderUnavailable):
        await verify(verifier, token(mint, "c"))
    assert provider.calls["https://keys.evil.example/c/keys"] == 0


async def test_new_tenants_come_from_a_token_bucket_and_failures_from_a_bounded_negative_cache(
    provider: FakeFetcher, clock: FrozenClock, mint: Mint
) -> None:
    verifier, tenants = build(
        template(tenants=(), any_tenant=True, new_tenants_per_minute=3, max_tenants=4), provider, clock
    )
    for i in range(50):
        with pytest.raises(ProviderUnavailable):
            await verify(verifier, token(mint, f"made-up-{i}"))
    assert provider.total == 3  # one discovery (404) each for the first three; the rest waited for the bucket
    assert len(tenants._failed) == 3 and not tenants._pending
    clock.advance(20)  # a third of a minute: one more token
    for i in range(50, 60):
        with pytest.raises(ProviderUnavailable):
            await verify(verifier, token(mint, f"made-up-{i}"))
    assert provider.total == 4
    clock.advance(600)
    for i in range(100, 110):
        with pytest.raises(ProviderUnavailable):
            await verify(verifier, token(mint, f"made-up-{i}"))
    assert len(tenants._failed) <= 4  # bounded by max_tenants


async def test_made_up_kids_across_held_tenants_cost_the_provider_no_more_than_the_new_tenant_bucket(
    jwks_document: dict[str, Any], clock: FrozenClock, mint: Mint
) -> None:
    # With `tenants: any` an attacker can have up to max_tenants real tenants held, then send each a token
    # with a made-up kid: every held tenant refetched its JWKS once per cooldown, max_tenants / 30 s fetches
    # (33/s at the defaults) per replica, where made-up tenant names cost new_tenants_per_minute a minute.
    rate, held = 10, 10
    provider = FakeFetcher()
    for i in range(held):
        serve_tenant(provider, f"t{i}", jwks_document)
    verifier, tenants = build(template(tenants=(), any_tenant=True, new_tenants_per_minute=rate), provider, clock)
    for i in range(held):
        await verify(verifier, token(mint, f"t{i}"))
    assert tenants.tenants_held == held
    clock.advance(60)  # the bucket is full again
    before, started = provider.total, clock.monotonic()
    for _ in range(4):
        clock.advance(31)  # past each tenant's cooldown
        for i in range(held):
            with pytest.raises((UnknownKey, ProviderUnavailable)):
                await verify(verifier, mint(claims(iss=tenant_issuer(f"t{i}")), kid=f"made-up-{i}"))
    elapsed = clock.monotonic() - started
    assert provider.total - before <= rate + math.ceil(elapsed * rate / 60)  # the bucket, not tenants x rounds
    assert verifier.verify_now(verifier.parse(token(mint, "t0"))) is not None  # known kids are not affected


async def test_concurrent_first_tokens_of_one_tenant_share_one_fetch(
    provider: FakeFetcher, clock: FrozenClock, mint: Mint
) -> None:
    import asyncio

    provider.delay = 0.05
    verifier, _ = build(template(), provider, clock)
    await asyncio.gather(*(verify(verifier, token(mint, "a")) for _ in range(20)))
    assert provider.total == 2


async def test_the_least_recently_used_tenant_is_evicted_past_max_tenants(
    provider: FakeFetcher, clock: FrozenClock, mint: Mint
) -> None:
    verifier, tenants = build(template(max_tenants=2), provider, clock)
    for tenant in ("a", "b", "a", "c"):  # a is used again before c: b is the least recently used
        await verify(verifier, token(mint, tenant))
    assert tenants.tenants_held == 2
    assert tenants.held("a") is not None and tenants.held("b") is None
    before = provider.total
    await verify(verifier, token(mint, "b"))
    assert provider.total == before + 2


async def test_an_evicted_tenant_s_verified_tokens_are_forgotten_with_its_keys(
    provider: FakeFetcher, clock: FrozenClock, mint: Mint
) -> None:
    """A held tenant's keys are refetched and a key its provider withdraws forgets the tokens it signed. An evicted
    tenant's are watched by nothing: its tokens stayed in the token cache until their `exp`, passing even after its
    provider withdrew the key that signed them (leaked). Evicting a tenant forgets its tokens (`on_withdrawn` with
    every kid it held, and None for tokens verified without a kid); other tenants' are kept."""
    told: list[tuple[str, frozenset[str | None]]] = []
    verifier, tenants = build(template(max_tenants=1), provider, clock)
    tenants.on_withdrawn = lambda issuer, kids: told.append((issuer, kids))
    await verify(verifier, token(mint, "a"))
    assert told == []
    await verify(verifier, token(mint, "b"))  # b is held; a is evicted
    assert [issuer for issuer, _ in told] == [tenant_issuer("a")]
    kids = told[0][1]
    assert None in kids and len(kids) >= 2  # every key a held, and tokens verified without a kid
    await verify(verifier, token(mint, "a"))  # a comes back, b goes
    assert [issuer for issuer, _ in told] == [tenant_issuer("a"), tenant_issuer("b")]


async def test_a_request_waiting_on_a_tenant_s_refetch_gets_503_when_the_tenant_is_evicted(
    provider: FakeFetcher, clock: FrozenClock, mint: Mint
) -> None:
    import asyncio

    # A token for another tenant (unsigned will do: keys are fetched before the signature is checked) evicts
    # the tenant whose JWKS a request is waiting on. The eviction cancelled that fetch, and the waiting
    # request got the CancelledError: no decision at all for the gateway, not a 503.
    verifier, tenants = build(template(tenants=(), any_tenant=True, max_tenants=1), provider, clock)
    await verify(verifier, token(mint, "a"))
    clock.advance(31)  # past the cooldown: an unknown kid refetches
    provider.faults["https://idp.example.test/a/discovery/v2.0/keys"] = ("delay", 0.2)
    waiting = asyncio.ensure_future(verify(verifier, mint(claims(iss=tenant_issuer("a")), kid="rotated")))
    await asyncio.sleep(0.01)
    await verify(verifier, token(mint, "b"))  # b is held; a, the least recently used, is evicted
    assert tenants.held("a") is None
    with pytest.raises(ProviderUnavailable):
        await waiting


async def test_a_held_tenant_s_keys_are_refreshed_in_the_background_when_stale(
    provider: FakeFetcher, clock: FrozenClock, mint: Mint
) -> None:
    import asyncio

    verifier, _ = build(template(jwks_max_ttl_seconds=60), provider, clock)
    await verify(verifier, token(mint, "a"))
    assert provider.total == 2
    clock.advance(120)
    assert verifier.verify_now(verifier.parse(token(mint, "a"))) is not None  # served from the held keys
    await asyncio.sleep(0.01)
    assert provider.total == 3  # one JWKS refetch, in the background


def config(issuer: dict[str, Any]) -> dict[str, Any]:
    base = {"issuer": TEMPLATE, "audiences": [AUDIENCE], "algorithms": ["ES256"]}
    return {"http": {"listen": "127.0.0.1:0"}, "issuers": [{**base, **issuer}]}


@pytest.mark.parametrize(
    ("issuer", "message"),
    [
        ({"issuer": "https://{tenant}.idp.example.test/v2.0", "tenants": ["a"]}, "must be in the path"),
        ({"issuer": "https://idp.example.test:{tenant}/", "tenants": ["a"]}, "must be in the path"),
        ({"issuer": "https://idp.example.test/x{tenant}/", "tenants": ["a"]}, "whole path segment"),
        ({"issuer": "https://idp.example.test/{tenant}/{tenant}", "tenants": ["a"]}, "exactly one"),
        ({"issuer": "https://idp.example.test/{tid}/v2.0", "tenants": ["a"]}, "exactly one {tenant}"),
        ({}, "tenants: required"),
        ({"tenants": "all"}, 'or "any"'),
        ({"tenants": ["a/b"]}, "is not a tenant name"),
        ({"tenants": [".."]}, "is not a tenant name"),
        ({"issuer": "https://idp.example.test", "tenants": ["a"]}, "only with a {tenant} issuer"),
        ({"issuer": "https://idp.example.test", "tenant_claim": "tid"}, "only with a {tenant} issuer"),
        ({"tenants": "any", "introspect_jwts": True}, "not supported"),
        # It passed `check-config`, then `serve` crashed with a KeyError building the logout receiver.
        ({"tenants": ["a"], "backchannel_logout": {"audiences": ["gw"]}}, "backchannel_logout: not supported"),
        ({"tenants": "any", "jwks_inline": {"keys": []}}, "jwks_inline"),
        ({"tenants": "any", "max_tenants": 0}, "max_tenants"),
        # Listed tenants past max_tenants evict each other: unsigned tokens naming them in turn cost the provider
        # a discovery and a JWKS fetch each, with no bucket (that is for `tenants: any`) and no cooldown.
        ({"tenants": ["a", "b", "c"], "max_tenants": 2}, "max_tenants: 2 is fewer than the 3 tenants"),
        ({"tenants": "any", "discovery_url": "https://idp.example.test/common/v2.0"}, "needs {tenant}"),
        ({"tenants": "any", "discovery_url": "https://idp.example.test/x{tenant}"}, "whole path segment"),
        ({"tenants": "any", "jwks_pin_sha256": ["not base64!"]}, "is not base64"),
        ({"tenants": "any", "jwks_pin_sha256": ["AAAA"]}, "a SHA-256 digest is 32"),
    ],
)
def test_templates_are_checked_at_start_up(issuer: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_settings(config(issuer))
    assert message in str(refused.value)


def test_a_template_with_any_tenant_loads() -> None:
    settings = parse_settings(config({"tenants": "any", "tenant_claim": "tid"})).issuers[0]
    assert settings.is_template and settings.any_tenant and settings.tenant_claim == "tid"
    assert settings.for_tenant("x").discovery == "https://idp.example.test/x/v2.0/.well-known/openid-configuration"


async def test_an_iss_refused_by_one_template_may_still_be_a_tenant_of_another(
    clock: FrozenClock, mint: Mint, jwks_document: dict[str, Any]
) -> None:
    fake = FakeFetcher()
    fake.serve(
        "https://idp.example.test/a/x/.well-known/openid-configuration",
        discovery_document("https://idp.example.test/a/x", "https://idp.example.test/a/x/keys"),
    )
    fake.serve("https://idp.example.test/a/x/keys", jwks_document)
    first = TenantKeys(template(issuer="https://idp.example.test/{tenant}/x", tenants=("b",)), fake, clock, Metrics())
    second = TenantKeys(template(issuer="https://idp.example.test/a/{tenant}", tenants=("x",)), fake, clock, Metrics())
    verifier = JwtVerifier({}, KeyStore({}, [first, second]), clock, max_token_bytes=MAX_TOKEN_BYTES)
    principal = await verify(verifier, mint(claims(iss="https://idp.example.test/a/x")))
    assert principal.issuer == "https://idp.example.test/a/x" and second.tenants_held == 1
    with pytest.raises(TenantNotAllowed):  # fits both, allowed by neither
        await verify(verifier, mint(claims(iss="https://idp.example.test/a/y")))


async def test_a_template_s_discovery_url_and_jwks_uri_take_the_tenant_too(
    clock: FrozenClock, mint: Mint, jwks_document: dict[str, Any]
) -> None:
    fake = FakeFetcher()
    fake.serve("https://idp.example.test/keys/b", jwks_document)
    settings = parse_settings(config({"tenants": ["b"], "jwks_uri": "https://idp.example.test/keys/{tenant}"}))
    verifier, _ = build(settings.issuers[0], fake, clock)
    await verify(verifier, token(mint, "b"))
    assert list(fake.calls) == ["https://idp.example.test/keys/b"]  # no discovery: the keys' URL is configured


async def test_a_document_that_breaks_the_parser_is_not_fetched_again_per_token(
    provider: FakeFetcher, clock: FrozenClock, mint: Mint, monkeypatch: pytest.MonkeyPatch
) -> None:
    from verifier.tokens import jwks

    def crash(*_: Any, **__: Any) -> Any:
        raise RecursionError("a hostile document")

    monkeypatch.setattr(jwks, "parse_key_set", crash)
    verifier, _ = build(template(), provider, clock)
    for _ in range(5):
        with pytest.raises((RecursionError, ProviderUnavailable)):
            await verify(verifier, token(mint, "a"))
    assert provider.total == 2  # discovery and JWKS once; then remembered as failed for the cooldown


def test_looking_up_keys_never_refuses(provider: FakeFetcher, clock: FrozenClock) -> None:
    """`KeyStore.get` serves lookups (discovered endpoints, explain): a tenant off the list simply has no keys."""
    _, tenants = build(template(tenants=("a",)), provider, clock)
    store = KeyStore({}, [tenants])
    assert store.get(tenant_issuer("b")) is None and store.get(tenant_issuer("a")) is None
    assert store.configured(tenant_issuer("b")) == "" and store.configured(tenant_issuer("a")) == TEMPLATE
    assert provider.total == 0


async def test_a_held_tenant_s_keys_are_refreshed_when_stale_though_no_token_asks_for_them(
    provider: FakeFetcher, clock: FrozenClock, mint: Mint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configured issuer's keys are refetched by its refresh loop, so a key its provider withdraws forgets the
    tokens it signed within `jwks_max_ttl_seconds`. A tenant's were refetched only when a token of the tenant was
    verified: the pipeline answers a token it has admitted from its token cache, never asking for the keys, so a
    tenant whose callers all held cached tokens kept a withdrawn (leaked) key's tokens admitted until their `exp`.
    The key store's refresh loop sweeps the held tenants too."""
    import asyncio

    from verifier.tokens import tenants as tenants_module

    monkeypatch.setattr(tenants_module, "TENANT_SWEEP_SECONDS", 0.01)
    tenants = TenantKeys(template(jwks_max_ttl_seconds=60), provider, clock, Metrics())
    store = KeyStore({}, [tenants])
    verifier = JwtVerifier({}, store, clock, max_token_bytes=MAX_TOKEN_BYTES)
    await verify(verifier, token(mint, "a"))
    assert provider.total == 2  # discovery and JWKS
    store.start()
    try:
        await asyncio.sleep(0.05)
        assert provider.total == 2  # fresh: nothing refetched
        clock.advance(120)  # past the tenant keys' lifetime; no token of the tenant comes
        for _ in range(100):
            await asyncio.sleep(0.01)
            if provider.total == 3:
                break
        assert provider.total == 3  # its JWKS refetched
    finally:
        await store.stop()
