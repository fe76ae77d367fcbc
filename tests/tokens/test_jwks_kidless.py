"""Tokens without a `kid` (RFC 7515 section 4.1.4: optional) against a JWKS in a rotation overlap.

Such a token is tried against each held key that fits its `alg` (pinned as for a token with a kid), at most
`MAX_KIDLESS_KEYS` of them, the key that verified the last one first; more fitting keys than that: refused, with
a `config_warning`. A token with a kid is only ever checked against its kid's key.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from support import FrozenClock
from tokenkit import JWKS_URL, FakeFetcher, Mint, SigningKeys, claims, issuer_settings, make_verifier, public_jwk

from verifier.errors import AlgorithmRefused, BadSignature, UnknownKey, VerifierError
from verifier.tokens.jwks import MAX_KIDLESS_KEYS, IssuerKeys
from verifier.tokens.jwt import JwtVerifier
from verifier.tokens.keys import VerificationKey


@pytest.fixture(scope="module")
def ec_keys() -> list[ec.EllipticCurvePrivateKey]:
    """P-256 keys enough to pass the bound."""
    return [ec.generate_private_key(ec.SECP256R1()) for _ in range(MAX_KIDLESS_KEYS + 2)]


@pytest.fixture
def checked(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The kid of every key a signature is checked against, in order."""
    seen: list[str | None] = []
    original = VerificationKey.verify

    def spy(self: VerificationKey, alg: str, signing_input: bytes, signature: bytes) -> bool:
        seen.append(self.kid)
        return original(self, alg, signing_input, signature)

    monkeypatch.setattr(VerificationKey, "verify", spy)
    return seen


def _verifier(fetcher: FakeFetcher, clock: FrozenClock, jwks: list[dict[str, Any]]) -> tuple[JwtVerifier, IssuerKeys]:
    fetcher.serve(JWKS_URL, {"keys": jwks})
    return make_verifier(issuer_settings(), fetcher, clock)


async def _outcome(verifier: JwtVerifier, token: str) -> str | None:
    """The kid of the key that verified the token (its principal's), or the refusal's code."""
    try:
        return (await verifier.verify(verifier.parse(token))).kid
    except VerifierError as exc:
        return exc.code


async def test_a_token_without_kid_verifies_with_either_key_of_a_rotation_overlap(
    fetcher: FakeFetcher, clock: FrozenClock, ec_keys: list[Any], mint: Mint
) -> None:
    """The provider publishes its old key (tokens in flight) and its new one (signing): both verify."""
    old, new = ec_keys[:2]
    verifier, _ = _verifier(fetcher, clock, [public_jwk(old, "old"), public_jwk(new, "new")])
    assert await _outcome(verifier, mint(claims(), kid=None, key=old)) == "old"
    assert await _outcome(verifier, mint(claims(), kid=None, key=new)) == "new"


async def test_a_token_without_kid_no_fitting_key_verifies_is_refused_signature_invalid(
    fetcher: FakeFetcher, clock: FrozenClock, ec_keys: list[Any], mint: Mint, checked: list[str | None]
) -> None:
    verifier, _ = _verifier(fetcher, clock, [public_jwk(ec_keys[0], "old"), public_jwk(ec_keys[1], "new")])
    with pytest.raises(BadSignature):
        await verifier.verify(verifier.parse(mint(claims(), kid=None, key=ec_keys[2])))
    assert checked == ["old", "new"]  # each fitting key once, no more


async def test_a_token_without_kid_is_tried_only_against_keys_fitting_its_alg(
    fetcher: FakeFetcher, clock: FrozenClock, keys: SigningKeys, ec_keys: list[Any], mint: Mint, checked: list[Any]
) -> None:
    """The pinning of a token with a kid: key type, curve and the JWK's own `alg`."""
    jwks = [
        public_jwk(keys.rs256, "rsa"),
        public_jwk(keys.es384, "p384"),  # EC, another curve
        public_jwk(ec_keys[0], "es256-only-for-es384", alg="ES384"),  # its own alg names another (never fits)
        public_jwk(keys.eddsa, "ed"),
        public_jwk(ec_keys[1], "old"),
        public_jwk(ec_keys[2], "new"),
    ]
    verifier, _ = _verifier(fetcher, clock, jwks)
    assert await _outcome(verifier, mint(claims(), kid=None, key=ec_keys[2])) == "new"
    assert checked == ["old", "new"]
    checked.clear()
    # Signed by a P-256 key whose JWK names ES384: no key fits an ES256 token it signed but "old" and "new".
    assert await _outcome(verifier, mint(claims(), kid=None, key=ec_keys[0])) == "signature_invalid"
    assert checked == ["new", "old"]


async def test_the_key_that_verified_a_token_without_kid_is_tried_first_for_the_next(
    fetcher: FakeFetcher, clock: FrozenClock, ec_keys: list[Any], mint: Mint, checked: list[str | None]
) -> None:
    old, new = ec_keys[:2]
    verifier, _ = _verifier(fetcher, clock, [public_jwk(old, "old"), public_jwk(new, "new")])
    assert await _outcome(verifier, mint(claims(), kid=None, key=new)) == "new"
    assert checked == ["old", "new"]
    checked.clear()
    assert await _outcome(verifier, mint(claims(sub="user-2"), kid=None, key=new)) == "new"
    assert checked == ["new"]  # one signature check per token again, once the new key has signed one


@pytest.mark.parametrize("count", [MAX_KIDLESS_KEYS, MAX_KIDLESS_KEYS + 1])
async def test_a_token_without_kid_is_refused_when_more_keys_fit_than_the_bound(
    count: int,
    fetcher: FakeFetcher,
    clock: FrozenClock,
    ec_keys: list[Any],
    mint: Mint,
    checked: list[str | None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Never only some of the keys tried: up to the bound, all (the last one signed it); past it, none, and a
    warning names the issuer and the alg."""
    caplog.set_level(logging.WARNING, logger="verifier.jwks")
    verifier, issuer_keys = _verifier(fetcher, clock, [public_jwk(k, f"k{i}") for i, k in enumerate(ec_keys[:count])])
    token = mint(claims(), kid=None, key=ec_keys[count - 1])
    outcome = await _outcome(verifier, token)  # the first fetch, then the verdict
    warnings = [r for r in caplog.records if getattr(r, "code", None) == "jwks_kidless_ambiguous"]
    if count <= MAX_KIDLESS_KEYS:
        assert outcome == f"k{count - 1}"
        assert len(checked) == count and not warnings
        return
    assert outcome == "key_unknown"
    with pytest.raises(UnknownKey) as refused:
        await verifier.verify(verifier.parse(token))
    assert "no kid" in refused.value.description and str(MAX_KIDLESS_KEYS) in refused.value.description
    assert checked == []  # not one signature check
    assert [(r.__dict__["issuer"], r.__dict__["alg"], r.__dict__["keys"]) for r in warnings] == [
        (issuer_keys.settings.issuer, "ES256", count)
    ]
    caplog.clear()
    await issuer_keys.refresh()  # the same keys again: warned when it began, not at every refresh
    assert not [r for r in caplog.records if getattr(r, "code", None) == "jwks_kidless_ambiguous"]


async def test_a_token_with_a_kid_is_never_tried_against_another_key(
    fetcher: FakeFetcher, clock: FrozenClock, ec_keys: list[Any], mint: Mint, checked: list[str | None]
) -> None:
    """No kid confusion: a kid names one key, and a token signed by another is refused, whatever else fits."""
    old, new = ec_keys[:2]
    verifier, _ = _verifier(fetcher, clock, [public_jwk(old, "old"), public_jwk(new, "new")])
    with pytest.raises(BadSignature):
        await verifier.verify(verifier.parse(mint(claims(), kid="old", key=new)))
    assert checked == ["old"]


async def test_a_token_without_kid_and_no_key_of_its_type_is_key_unknown(
    fetcher: FakeFetcher, clock: FrozenClock, keys: SigningKeys, ec_keys: list[Any], mint: Mint
) -> None:
    verifier, _ = _verifier(fetcher, clock, [public_jwk(ec_keys[0], "old"), public_jwk(ec_keys[1], "new")])
    assert await _outcome(verifier, mint(claims(), "EdDSA", kid=None)) == "key_unknown"
    with pytest.raises(AlgorithmRefused):  # HS256 never reaches the keys (not on the allow-list)
        await verifier.verify(verifier.parse(mint(claims(), "HS256", kid=None, key="k" * 32)))
