"""verifier.tokens.jws's header memo, and keys.der_signature: what a first-seen token no longer pays for.

The memo maps a JOSE header segment, byte for byte, to what parsing and checking it gave; only headers of
tokens whose signature verified are kept. Each attack below sends a header that shares a long prefix with a
remembered one and differs in the one field that matters (alg, kid, crit): it must be parsed and checked on
its own, never answered from the remembered entry.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from support import FrozenClock
from tokenkit import JWKS_URL, KIDS, FakeFetcher, SigningKeys, b64, claims, make_verifier, public_jwk

from verifier.errors import AlgorithmRefused, BadSignature, MalformedToken, UnknownKey
from verifier.settings import IssuerSettings
from verifier.tokens import jws
from verifier.tokens.keys import der_signature

ES256_KID = KIDS["ES256"]
# One order of fields for every header below: the field an attack changes comes last, after a shared prefix
# of more than 42 bytes (the first 56 base64url characters of the segments are the same).
BASE = {"typ": "at+jwt", "kid": ES256_KID, "alg": "ES256"}
KID_LAST = {"typ": "at+jwt", "alg": "ES256", "kid": ES256_KID}


@pytest.fixture(autouse=True)
def empty_memo() -> Iterator[None]:
    """Each test starts with no header remembered, and leaves none."""
    jws._HEADERS.clear()
    yield
    jws._HEADERS.clear()


def _signed(header: dict[str, Any], key: ec.EllipticCurvePrivateKey, **overrides: Any) -> str:
    """A compact JWS with exactly this header (field order kept), signed ES256-style (R || S) by `key`."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims(**overrides)).encode())}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _segment(token: str) -> bytes:
    return token.split(".", 1)[0].encode()


async def test_a_verified_tokens_header_is_remembered_and_shared_read_only(
    settings: IssuerSettings, fetcher: FakeFetcher, clock: FrozenClock, keys: SigningKeys
) -> None:
    verifier, _ = make_verifier(settings, fetcher, clock)
    first, second = _signed(BASE, keys.es256, sub="a"), _signed(BASE, keys.es256, sub="b")
    assert (await verifier.verify(verifier.parse(first))).subject == "a"
    assert _segment(first) in jws._HEADERS
    parsed = verifier.parse(second)
    assert parsed.header is jws._HEADERS[_segment(second)][0]  # not decoded again
    assert (parsed.alg, parsed.kid) == ("ES256", ES256_KID)
    assert (await verifier.verify(parsed)).subject == "b"
    with pytest.raises(TypeError):
        parsed.header["alg"] = "none"  # type: ignore[index]  # shared by every token with this header


async def test_a_header_is_not_remembered_before_its_signature_verified(
    settings: IssuerSettings, fetcher: FakeFetcher, clock: FrozenClock, keys: SigningKeys
) -> None:
    verifier, _ = make_verifier(settings, fetcher, clock)
    forged = _signed({**BASE, "x": "mine"}, ec.generate_private_key(ec.SECP256R1()))  # not the issuer's key
    with pytest.raises(BadSignature):
        await verifier.verify(verifier.parse(forged))
    verifier.parse(_signed({**BASE, "y": "parsed only"}, keys.es256))
    assert not jws._HEADERS  # a sender cannot fill the memo with headers of their own


@pytest.mark.parametrize(
    ("remembered", "attack", "refusal"),
    [
        # ES384 named on the P-256 key, signed as ES256: must not borrow the remembered ES256 header.
        (BASE, {**BASE, "alg": "ES384"}, AlgorithmRefused),
        # A kid the JWKS does not hold: must not borrow the remembered header's kid.
        (KID_LAST, {**KID_LAST, "kid": "es-9"}, UnknownKey),
    ],
    ids=["alg", "kid"],
)
async def test_another_alg_or_kid_after_a_remembered_header_is_checked_on_its_own(
    settings: IssuerSettings,
    fetcher: FakeFetcher,
    clock: FrozenClock,
    keys: SigningKeys,
    remembered: dict[str, Any],
    attack: dict[str, Any],
    refusal: type[Exception],
) -> None:
    verifier, _ = make_verifier(settings, fetcher, clock)
    await verifier.verify(verifier.parse(_signed(remembered, keys.es256)))
    with pytest.raises(refusal):
        await verifier.verify(verifier.parse(_signed(attack, keys.es256)))


async def test_a_header_with_crit_after_a_remembered_one_is_refused(
    settings: IssuerSettings, fetcher: FakeFetcher, clock: FrozenClock, keys: SigningKeys
) -> None:
    verifier, _ = make_verifier(settings, fetcher, clock)
    await verifier.verify(verifier.parse(_signed({**BASE, "x": 1}, keys.es256)))
    for extra, refusal in (
        ({"crit": ["exp"]}, MalformedToken),
        ({"jku": "https://evil.example/jwks"}, AlgorithmRefused),
        ({"b64": False}, MalformedToken),
    ):
        with pytest.raises(refusal):
            verifier.parse(_signed({**BASE, **extra}, keys.es256))


async def test_a_key_removed_from_the_jwks_stops_verifying_a_remembered_header(
    settings: IssuerSettings, fetcher: FakeFetcher, clock: FrozenClock, keys: SigningKeys
) -> None:
    verifier, issuer_keys = make_verifier(settings, fetcher, clock)
    await verifier.verify(verifier.parse(_signed(BASE, keys.es256, sub="before")))
    assert _segment(_signed(BASE, keys.es256)) in jws._HEADERS
    fetcher.serve(JWKS_URL, {"keys": [public_jwk(keys.es384, "es384-new")]})  # es-1 rotated out
    clock.advance(settings.jwks_cooldown_seconds + 1)
    await issuer_keys.refresh()
    assert ES256_KID not in issuer_keys.kids
    with pytest.raises(UnknownKey):
        await verifier.verify(verifier.parse(_signed(BASE, keys.es256, sub="after")))
    assert verifier.verify_now(verifier.parse(_signed(BASE, keys.es256, sub="inline"))) is None  # no key held


async def test_the_memo_is_bounded(
    settings: IssuerSettings, fetcher: FakeFetcher, clock: FrozenClock, keys: SigningKeys, monkeypatch: Any
) -> None:
    monkeypatch.setattr(jws, "MAX_KEPT_HEADERS", 3)
    verifier, _ = make_verifier(settings, fetcher, clock)
    for n in range(6):
        await verifier.verify(verifier.parse(_signed({**BASE, "n": n}, keys.es256)))
    assert len(jws._HEADERS) == 3
    # Past the bound a header is parsed each time, and still verifies.
    assert (await verifier.verify(verifier.parse(_signed({**BASE, "n": 5}, keys.es256, sub="z")))).subject == "z"


@pytest.mark.parametrize("size", [32, 48, 66])
def test_der_signature_is_encode_dss_signature_byte_for_byte(size: int) -> None:
    edges = [
        bytes(2 * size),  # r = s = 0
        b"\x80" * 2 * size,  # high bit set: a leading 0x00
        b"\x00" * (size - 1) + b"\x01" + b"\xff" * size,  # r = 1
        b"\x00\x7f" + os.urandom(size - 2) + b"\x00\x80" + os.urandom(size - 2),  # one leading zero stripped
        b"\xff" * 2 * size,  # the longest (P-521: a two-byte SEQUENCE length)
    ]
    for raw in edges + [os.urandom(2 * size) for _ in range(300)]:
        r, s = int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big")
        assert der_signature(raw, size) == encode_dss_signature(r, s), raw.hex()
