"""verifier.tokens.jwks: discovery, refresh, single flight, cooldown, TTL bounds, and hostile key sets.

Every provider interaction goes through `FakeFetcher`; time moves only through `FrozenClock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from support import FrozenClock
from tokenkit import (
    DISCOVERY_URL,
    ISSUER,
    JWKS_URL,
    KIDS,
    FakeFetcher,
    Mint,
    SigningKeys,
    claims,
    discovery_document,
    issuer_settings,
    make_issuer_keys,
    make_verifier,
    private_jwk,
    public_jwk,
)

from verifier.errors import ProviderUnavailable, UnknownKey
from verifier.settings import DEFAULT_MAX_JWKS_KEYS, IssuerSettings
from verifier.tokens.jwks import (
    DEFAULT_JWKS_TTL_SECONDS,
    MAX_RETRY_SECONDS,
    REFRESH_AHEAD_SECONDS,
    IssuerKeys,
    KeyStore,
)


@pytest.fixture
def issuer_keys(settings: IssuerSettings, fetcher: FakeFetcher, clock: FrozenClock) -> IssuerKeys:
    return make_issuer_keys(settings, fetcher, clock)


# ---------------------------------------------------------------- discovery and first load


async def test_first_refresh_discovers_then_loads_the_keys(issuer_keys: IssuerKeys, fetcher: FakeFetcher) -> None:
    await issuer_keys.refresh()
    assert issuer_keys.ready.is_set()
    assert set(issuer_keys.kids) == set(KIDS.values())
    assert fetcher.calls == {DISCOVERY_URL: 1, JWKS_URL: 1}
    assert issuer_keys.metadata["issuer"] == ISSUER


async def test_a_configured_jwks_uri_skips_discovery(fetcher: FakeFetcher, clock: FrozenClock) -> None:
    keys = make_issuer_keys(issuer_settings(jwks_uri=JWKS_URL), fetcher, clock)
    await keys.refresh()
    assert keys.ready.is_set()
    assert fetcher.calls == {JWKS_URL: 1}


async def test_a_custom_discovery_url_is_used(fetcher: FakeFetcher, clock: FrozenClock) -> None:
    custom = ISSUER + "/tenant/.well-known/openid-configuration"
    fetcher.serve(custom, discovery_document())
    keys = make_issuer_keys(issuer_settings(discovery_url=custom), fetcher, clock)
    await keys.refresh()
    assert fetcher.calls[custom] == 1
    assert DISCOVERY_URL not in fetcher.calls


async def test_the_fetch_deadline_comes_from_the_settings(fetcher: FakeFetcher, clock: FrozenClock) -> None:
    keys = make_issuer_keys(issuer_settings(fetch_timeout_seconds=0.75), fetcher, clock)
    await keys.refresh()
    assert fetcher.timeouts == [0.75, 0.75]


BAD_DISCOVERY: list[tuple[str, Any]] = [
    ("issuer mismatch", discovery_document(issuer="https://evil.test")),
    ("issuer with a trailing slash", discovery_document(issuer=ISSUER + "/")),
    ("no issuer", {"jwks_uri": JWKS_URL}),
    ("not an object", ["issuer", ISSUER]),
    ("no jwks_uri", {"issuer": ISSUER}),
    ("jwks_uri not a string", {"issuer": ISSUER, "jwks_uri": 5}),
    ("jwks_uri not http", discovery_document(jwks_uri="file:///etc/passwd")),
    ("jwks_uri downgrades to http", discovery_document(jwks_uri="http://issuer.example.test/jwks")),
]


@pytest.mark.parametrize("document", [c[1] for c in BAD_DISCOVERY], ids=[c[0] for c in BAD_DISCOVERY])
async def test_a_bad_discovery_document_leaves_the_issuer_not_ready(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher, document: Any
) -> None:
    fetcher.serve(DISCOVERY_URL, document)
    with pytest.raises(ProviderUnavailable):
        await issuer_keys.refresh()
    assert not issuer_keys.ready.is_set()
    assert issuer_keys.kids == ()
    assert KeyStore({ISSUER: issuer_keys}).ready is False
    assert fetcher.total == 1  # discovery only: no key set is fetched from an untrusted document


async def test_discovery_issuer_mismatch_never_fetches_the_advertised_jwks(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher
) -> None:
    evil_jwks = "https://evil.test/jwks"
    fetcher.serve(DISCOVERY_URL, discovery_document(issuer="https://evil.test", jwks_uri=evil_jwks))
    with pytest.raises(ProviderUnavailable, match="issuer"):
        await issuer_keys.refresh()
    assert evil_jwks not in fetcher.calls


async def test_an_http_loopback_issuer_may_use_an_http_jwks_uri(fetcher: FakeFetcher, clock: FrozenClock) -> None:
    issuer = "http://127.0.0.1:9400"
    fetcher.serve(issuer + "/.well-known/openid-configuration", discovery_document(issuer, issuer + "/jwks"))
    fetcher.serve(issuer + "/jwks", fetcher.documents[JWKS_URL][0])
    keys = make_issuer_keys(issuer_settings(issuer=issuer), fetcher, clock)
    await keys.refresh()
    assert keys.ready.is_set()


async def test_discovery_is_retried_while_no_keys_were_ever_loaded(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher
) -> None:
    fetcher.faults[JWKS_URL] = "unavailable"
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            await issuer_keys.refresh()
    assert fetcher.calls[DISCOVERY_URL] == 2
    del fetcher.faults[JWKS_URL]
    await issuer_keys.refresh()
    assert issuer_keys.ready.is_set()


async def test_discovery_is_not_repeated_once_keys_are_loaded(issuer_keys: IssuerKeys, fetcher: FakeFetcher) -> None:
    await issuer_keys.refresh()
    await issuer_keys.refresh()
    assert fetcher.calls == {DISCOVERY_URL: 1, JWKS_URL: 2}


# ---------------------------------------------------------------- failures keep the last good keys

FAULTS = ["timeout", "unavailable", "malformed", "malformed_json"]


@pytest.mark.parametrize("fault", FAULTS)
async def test_a_failed_refresh_keeps_the_last_good_keys(
    settings: IssuerSettings, fetcher: FakeFetcher, clock: FrozenClock, mint: Mint, fault: str
) -> None:
    verifier, issuer_keys = make_verifier(settings, fetcher, clock)
    await issuer_keys.refresh()
    kids = issuer_keys.kids
    fetcher.fault = fault
    with pytest.raises(ProviderUnavailable):
        await issuer_keys.refresh()
    assert issuer_keys.kids == kids
    assert issuer_keys.ready.is_set()
    principal = await verifier.verify(verifier.parse(mint(claims())))
    assert principal.subject == "user-1"


@pytest.mark.parametrize(
    "document",
    [{"keys": "nope"}, {"nokeys": []}, [], {"keys": [None, "a", {"kty": "oct", "k": "c2VjcmV0"}]}, "<html>"],
    ids=["keys-not-a-list", "no-keys-member", "array", "entries-not-jwks", "html-as-a-json-string"],
)
async def test_a_document_that_is_not_a_key_set_is_a_failure_that_keeps_the_old_keys(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher, document: Any
) -> None:
    await issuer_keys.refresh()
    kids = issuer_keys.kids
    fetcher.serve(JWKS_URL, document)
    with pytest.raises(ProviderUnavailable):
        await issuer_keys.refresh()
    assert issuer_keys.kids == kids


@pytest.mark.parametrize(
    "document",
    [{"keys": []}, {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, {"keys": [{"kty": "RSA", "n": 5}]}],
    ids=["empty", "only-an-oct-key", "only-a-broken-jwk"],
)
async def test_a_key_set_with_no_usable_key_withdraws_every_key(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher, document: Any
) -> None:
    """A JWK Set of keys none of which is usable is a good fetch: the provider's word that none vouches now."""
    withdrawn: list[frozenset[str | None]] = []
    issuer_keys.on_withdrawn = lambda issuer, kids: withdrawn.append(kids)
    await issuer_keys.refresh()
    kids = issuer_keys.kids
    fetcher.serve(JWKS_URL, document)
    await issuer_keys.refresh()
    assert issuer_keys.kids == ()
    assert withdrawn == [frozenset(kids)]
    assert issuer_keys.ready.is_set()
    assert await issuer_keys.key_for(KIDS["ES256"], "ES256") is None  # key_unknown (401), not 503


async def test_a_failed_first_fetch_is_not_ready_and_key_for_is_unavailable(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher
) -> None:
    fetcher.fault = "timeout"
    with pytest.raises(ProviderUnavailable):  # 503 "retry later", never a verdict on the token
        await issuer_keys.key_for(KIDS["ES256"], "ES256")
    assert not issuer_keys.ready.is_set()
    assert issuer_keys.key_age() is None


async def test_retry_after_failures_backs_off_exponentially_to_the_cap(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher
) -> None:
    fetcher.fault = "unavailable"
    waits = []
    for _ in range(8):
        with pytest.raises(ProviderUnavailable):
            await issuer_keys.refresh()
        waits.append(issuer_keys.next_refresh_in())
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, MAX_RETRY_SECONDS, MAX_RETRY_SECONDS, MAX_RETRY_SECONDS]
    fetcher.fault = None
    await issuer_keys.refresh()
    assert issuer_keys.next_refresh_in() == DEFAULT_JWKS_TTL_SECONDS - REFRESH_AHEAD_SECONDS


# ---------------------------------------------------------------- single flight and cooldown


async def test_concurrent_unknown_kid_misses_share_one_fetch(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher, clock: FrozenClock
) -> None:
    await issuer_keys.refresh()
    clock.advance(issuer_keys.settings.jwks_cooldown_seconds + 1)
    before = fetcher.calls[JWKS_URL]
    fetcher.delay = 0.02  # keep the fetch in flight while every caller arrives
    results = await asyncio.gather(*(issuer_keys.key_for(f"made-up-{i}", "ES256") for i in range(20)))
    assert results == [None] * 20
    assert fetcher.calls[JWKS_URL] - before == 1


async def test_concurrent_first_requests_share_one_discovery_and_one_fetch(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher
) -> None:
    fetcher.delay = 0.02
    results = await asyncio.gather(*(issuer_keys.key_for(KIDS["ES256"], "ES256") for _ in range(20)))
    assert all(r is not None and r.kid == KIDS["ES256"] for r in results)
    assert fetcher.calls == {DISCOVERY_URL: 1, JWKS_URL: 1}


async def test_concurrent_misses_during_a_failing_fetch_share_one_failure(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher
) -> None:
    fetcher.fault = "unavailable"
    fetcher.delay = 0.02
    results = await asyncio.gather(*(issuer_keys.key_for("x", "ES256") for _ in range(20)), return_exceptions=True)
    assert all(isinstance(r, ProviderUnavailable) for r in results)
    assert fetcher.total == 1  # discovery answered 503 once; nobody retried


async def test_cooldown_limits_refreshes_for_made_up_kids(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher, clock: FrozenClock
) -> None:
    await issuer_keys.refresh()
    cooldown = issuer_keys.settings.jwks_cooldown_seconds
    before = fetcher.calls[JWKS_URL]
    for i in range(50):
        assert await issuer_keys.key_for(f"flood-{i}", "ES256") is None
    assert fetcher.calls[JWKS_URL] == before  # still inside the cooldown of the first load
    clock.advance(cooldown)
    for i in range(50):
        assert await issuer_keys.key_for(f"flood-b-{i}", "ES256") is None
    assert fetcher.calls[JWKS_URL] == before + 1
    clock.advance(cooldown / 2)
    assert await issuer_keys.key_for("flood-c", "ES256") is None
    assert fetcher.calls[JWKS_URL] == before + 1
    clock.advance(cooldown / 2)
    assert await issuer_keys.key_for("flood-d", "ES256") is None
    assert fetcher.calls[JWKS_URL] == before + 2


async def test_a_known_kid_never_triggers_a_refresh(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher, clock: FrozenClock
) -> None:
    await issuer_keys.refresh()
    clock.advance(10_000)
    before = fetcher.total
    for _ in range(10):
        assert await issuer_keys.key_for(KIDS["RS256"], "RS256") is not None
        assert await issuer_keys.key_for(KIDS["RS256"], "ES256") is None  # wrong type: no refresh either
    assert fetcher.total == before


async def test_key_rotation_is_picked_up_on_an_unknown_kid_after_the_cooldown(
    settings: IssuerSettings, fetcher: FakeFetcher, clock: FrozenClock, keys: SigningKeys, mint: Mint
) -> None:
    fetcher.serve(JWKS_URL, {"keys": [public_jwk(keys.rs256, "old")]})
    verifier, issuer_keys = make_verifier(settings, fetcher, clock)
    await issuer_keys.refresh()
    fetcher.serve(JWKS_URL, {"keys": [public_jwk(keys.rs_other, "new")]})
    new_token = mint(claims(), "RS256", kid="new", key=keys.rs_other)

    with pytest.raises(UnknownKey):  # inside the cooldown: no refresh yet
        await verifier.verify(verifier.parse(new_token))
    clock.advance(settings.jwks_cooldown_seconds)
    principal = await verifier.verify(verifier.parse(new_token))
    assert principal.kid == "new"
    assert issuer_keys.kids == ("new",)
    with pytest.raises(UnknownKey):  # the retired key is gone
        await verifier.verify(verifier.parse(mint(claims(), "RS256", kid="old")))


async def test_a_refresh_after_a_cancelled_waiter_fetches_again(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher, clock: FrozenClock, keys: SigningKeys
) -> None:
    fetcher.delay = 0.02
    waiter = asyncio.create_task(issuer_keys.refresh())
    await asyncio.sleep(0.005)
    waiter.cancel()  # e.g. the request's deadline expired while it waited for keys
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    await asyncio.sleep(0.05)  # the shielded fetch completes on its own
    fetcher.delay = 0
    fetcher.serve(JWKS_URL, {"keys": [public_jwk(keys.rs_other, "rotated")]})
    clock.advance(issuer_keys.settings.jwks_cooldown_seconds + 1)
    assert await issuer_keys.key_for("rotated", "RS256") is not None


# ---------------------------------------------------------------- TTL from Cache-Control

MIN_TTL = 60.0
MAX_TTL = 3600.0


@pytest.mark.parametrize(
    ("max_age", "ttl"),
    [
        (None, DEFAULT_JWKS_TTL_SECONDS),
        (0.0, MIN_TTL),  # no-store / no-cache / max-age=0: floor, not a fetch per request
        (5.0, MIN_TTL),
        (MIN_TTL, MIN_TTL),
        (300.0, 300.0),
        (MAX_TTL, MAX_TTL),
        (86_400.0, MAX_TTL),
        (1e12, MAX_TTL),
    ],
)
async def test_cache_control_max_age_is_clamped_to_the_configured_bounds(
    fetcher: FakeFetcher, clock: FrozenClock, max_age: float | None, ttl: float
) -> None:
    fetcher.serve(JWKS_URL, fetcher.documents[JWKS_URL][0], max_age)
    keys = make_issuer_keys(
        issuer_settings(jwks_min_ttl_seconds=MIN_TTL, jwks_max_ttl_seconds=MAX_TTL), fetcher, clock
    )
    await keys.refresh()
    assert keys.next_refresh_in() == pytest.approx(ttl - REFRESH_AHEAD_SECONDS)


async def test_the_next_refresh_is_never_sooner_than_half_a_second(
    fetcher: FakeFetcher, clock: FrozenClock
) -> None:
    keys = make_issuer_keys(issuer_settings(jwks_min_ttl_seconds=1, jwks_max_ttl_seconds=1), fetcher, clock)
    await keys.refresh()
    assert keys.next_refresh_in() == 0.5
    clock.advance(100)
    assert keys.next_refresh_in() == 0.5


async def test_key_age_counts_from_the_last_good_fetch(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher, clock: FrozenClock
) -> None:
    await issuer_keys.refresh()
    clock.advance(42)
    fetcher.fault = "unavailable"
    with pytest.raises(ProviderUnavailable):
        await issuer_keys.refresh()
    assert issuer_keys.key_age() == 42


# ---------------------------------------------------------------- hostile key sets


async def test_private_and_symmetric_keys_in_a_jwks_are_skipped(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher, keys: SigningKeys
) -> None:
    fetcher.serve(JWKS_URL, {"keys": [
        public_jwk(keys.es256, "good-ec"),
        private_jwk(keys.rs256, "leaked-rsa"),
        {**public_jwk(keys.eddsa), "kid": "leaked-ed", "d": "AAAA"},
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "alg": "HS256"},
        public_jwk(keys.rs256, "good-rsa"),
    ]})
    await issuer_keys.refresh()
    assert set(issuer_keys.kids) == {"good-ec", "good-rsa"}
    assert await issuer_keys.key_for("hmac", "HS256") is None


async def test_a_private_key_in_a_jwks_is_never_echoed_in_the_log(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher, keys: SigningKeys, caplog: pytest.LogCaptureFixture
) -> None:
    leaked = [private_jwk(keys.rs256, "leaked-rsa"), private_jwk(keys.es256, "leaked-ec")]
    fetcher.serve(JWKS_URL, {"keys": [*leaked, public_jwk(keys.eddsa, "good")]})
    with caplog.at_level(logging.DEBUG):
        await issuer_keys.refresh()
    assert issuer_keys.kids == ("good",)
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "jwks_key_skipped" in logged
    for jwk in leaked:
        for member in ("d", "p", "q", "dp", "dq", "qi"):
            if member in jwk:
                assert jwk[member] not in logged, member


async def test_unusable_entries_are_skipped_and_the_rest_kept(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher, keys: SigningKeys
) -> None:
    fetcher.serve(JWKS_URL, {"keys": [
        "not-an-object",
        None,
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        public_jwk(keys.rs256, "enc", use="enc"),
        public_jwk(rsa.generate_private_key(public_exponent=65537, key_size=1024), "weak-rsa"),
        public_jwk(keys.es256, "good"),
    ]})
    await issuer_keys.refresh()
    assert issuer_keys.kids == ("good",)


async def test_an_rsa_key_under_2048_bits_is_skipped(
    settings: IssuerSettings, fetcher: FakeFetcher, clock: FrozenClock, mint: Mint
) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    fetcher.serve(JWKS_URL, {"keys": [public_jwk(weak, "weak"), public_jwk(ec.generate_private_key(ec.SECP256R1()))]})
    verifier, issuer_keys = make_verifier(settings, fetcher, clock)
    await issuer_keys.refresh()
    assert "weak" not in issuer_keys.kids
    with pytest.raises(UnknownKey):
        await verifier.verify(verifier.parse(mint(claims(), "RS256", kid="weak", key=weak)))


@pytest.mark.parametrize(("count", "accepted"), [(DEFAULT_MAX_JWKS_KEYS, True), (DEFAULT_MAX_JWKS_KEYS + 1, False)])
async def test_a_jwks_with_more_than_100_keys_is_refused(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher, keys: SigningKeys, count: int, accepted: bool
) -> None:
    template = public_jwk(keys.es256)
    fetcher.serve(JWKS_URL, {"keys": [{**template, "kid": f"k{i}"} for i in range(count)]})
    if accepted:
        await issuer_keys.refresh()
        assert len(issuer_keys.kids) == count
    else:
        with pytest.raises(ProviderUnavailable, match="limit"):
            await issuer_keys.refresh()
        assert not issuer_keys.ready.is_set()
        assert issuer_keys.kids == ()


async def test_a_jwk_with_a_non_string_alg_is_skipped_not_fatal(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher, keys: SigningKeys
) -> None:
    fetcher.serve(JWKS_URL, {"keys": [{**public_jwk(keys.rs256, "odd"), "alg": ["RS256"]},
                                      public_jwk(keys.es256, "good")]})
    await issuer_keys.refresh()
    assert issuer_keys.kids == ("good",)


async def test_the_background_refresh_loop_survives_a_hostile_jwks(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher, keys: SigningKeys
) -> None:
    fetcher.serve(JWKS_URL, {"keys": [{**public_jwk(keys.rs256, "odd"), "alg": {}}]})
    task = asyncio.get_running_loop().create_task(issuer_keys.run())
    await asyncio.sleep(0.05)
    alive = not task.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, TypeError):
        await task
    assert alive


# ---------------------------------------------------------------- lookup rules


async def test_find_without_kid_offers_the_keys_fitting_the_alg(
    issuer_keys: IssuerKeys, fetcher: FakeFetcher, keys: SigningKeys
) -> None:
    fetcher.serve(JWKS_URL, {"keys": [public_jwk(keys.rs256, "a"), public_jwk(keys.rs_other, "b"),
                                      public_jwk(keys.es256, "c")]})
    await issuer_keys.refresh()
    assert [k.kid for k in issuer_keys.kidless("RS256")] == ["a", "b"]  # a rotation overlap: both are tried
    assert [k.kid for k in issuer_keys.kidless("ES256")] == ["c"]
    found = issuer_keys.find(None, "ES256")
    assert found is not None and found.kid == "c"
    assert issuer_keys.find(None, "EdDSA") is None
    assert issuer_keys.has_kid("a") and not issuer_keys.has_kid("zzz") and not issuer_keys.has_kid(None)


# ---------------------------------------------------------------- KeyStore


async def test_key_store_start_loads_every_issuer_and_stop_cancels(
    fetcher: FakeFetcher, clock: FrozenClock
) -> None:
    other = "https://other.example.test"
    fetcher.serve(other + "/.well-known/openid-configuration", discovery_document(other, other + "/jwks"))
    fetcher.serve(other + "/jwks", fetcher.documents[JWKS_URL][0])
    store = KeyStore({
        ISSUER: make_issuer_keys(issuer_settings(), fetcher, clock),
        other: make_issuer_keys(issuer_settings(issuer=other), fetcher, clock),
    })
    assert store.ready is False
    store.start()
    try:
        await asyncio.wait_for(store.wait_ready(), timeout=30)  # a loaded machine; ready at once on a quiet one
        assert store.ready is True
        assert store.get(other) is not None and store.get("https://nope.test") is None
    finally:
        await store.stop()
    assert fetcher.calls[JWKS_URL] == 1 and fetcher.calls[other + "/jwks"] == 1


async def test_key_store_is_not_ready_while_one_issuer_has_no_keys(fetcher: FakeFetcher, clock: FrozenClock) -> None:
    broken = "https://broken.example.test"
    fetcher.serve(broken + "/.well-known/openid-configuration", discovery_document(issuer="https://evil.test"))
    good = make_issuer_keys(issuer_settings(), fetcher, clock)
    bad = make_issuer_keys(issuer_settings(issuer=broken), fetcher, clock)
    await good.refresh()
    with pytest.raises(ProviderUnavailable):
        await bad.refresh()
    assert KeyStore({ISSUER: good, broken: bad}).ready is False
