"""verifier.binding.dpop: RFC 9449 proofs checked at the resource server, and RFC 7638 thumbprints.

Proofs are signed with pyjwt and real `cryptography` keys, so the verifier is checked against an
independent implementation; the ones pyjwt refuses to make are built by hand with `compact`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hostile_numbers import HOSTILE_IDS, HOSTILE_NUMBERS
from jwt.algorithms import ECAlgorithm
from support import FrozenClock, SkewedClock, compare_digest_calls
from tokenkit import NOW, SigningKeys, b64, compact, private_jwk, public_jwk

from verifier.binding import dpop as dpop_module
from verifier.binding.dpop import AcceptedProof, DpopVerifier, access_token_hash, normalize_htu, thumbprint
from verifier.checks.base import NO_POLICY, Passed
from verifier.checks.dpop import DpopBinding
from verifier.config.dpop import DEFAULT_ALGORITHMS, JTI_TTL_MARGIN_SECONDS, DpopConfig, parse_dpop_config
from verifier.credentials import Credential, TokenScheme
from verifier.errors import ClaimInvalid, InvalidDpopProof, SenderConstraintFailed, StateUnavailable, UseDpopNonce
from verifier.principal import Principal
from verifier.request import RequestAttributes
from verifier.settings import ConfigError
from verifier.state.base import Purpose, TakeResult
from verifier.state.memory import MemoryState

URL = "https://api.example.test/orders"
TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEifQ.c2ln"  # only its hash matters
SECRET = b"n" * 32


def make_proof(
    key: Any,
    *,
    alg: str = "ES256",
    jwk: dict[str, Any] | None = None,
    headers: dict[str, Any] | None = None,
    **overrides: Any,
) -> str:
    """A proof for `URL`/GET/`TOKEN` at `NOW`; claim overrides of None remove the claim."""
    claims: dict[str, Any] = {
        "jti": str(uuid.uuid4()),
        "htm": "GET",
        "htu": URL,
        "iat": int(NOW),
        "ath": access_token_hash(TOKEN),
    }
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    header: dict[str, Any] = {"typ": "dpop+jwt", "jwk": jwk if jwk is not None else public_jwk(key)}
    header.update(headers or {})
    return jwt.encode(claims, key, algorithm=alg, headers=header)


def jkt_of(key: Any) -> str:
    return thumbprint(public_jwk(key))


@pytest.fixture
def state(clock: FrozenClock) -> MemoryState:
    return MemoryState(clock)


@pytest.fixture
def verifier(clock: FrozenClock, state: MemoryState) -> DpopVerifier:
    return DpopVerifier(DpopConfig(), state, clock)


async def accept(
    verifier: DpopVerifier,
    proof: str | None,
    *,
    method: str = "GET",
    url: str = URL,
    token: str = TOKEN,
    jkt: str | None = None,
) -> AcceptedProof:
    return await verifier.verify(proof, method=method, url=url, access_token=token, expected_jkt=jkt)


async def check(verifier: DpopVerifier, proof: str | None, **request: Any) -> str:
    """The accepted proof's key thumbprint."""
    return (await accept(verifier, proof, **request)).jkt


# --- RFC 7638 thumbprints -------------------------------------------------------------------------

RFC7638_3_1_JWK = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3"
    "oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu"
    "6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJ"
    "zKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}


def test_thumbprint_matches_the_rfc7638_section_3_1_example() -> None:
    assert thumbprint(RFC7638_3_1_JWK) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_thumbprint_ignores_optional_members_and_their_order(keys: SigningKeys) -> None:
    bare = public_jwk(keys.es256)
    decorated = {"use": "sig", "kid": "x", **dict(reversed(list(bare.items())))}
    assert thumbprint(decorated) == thumbprint(bare)


@pytest.mark.parametrize(
    "jwk", [{"kty": "RSA", "e": "AQAB"}, {"kty": "XYZ"}, {}, {"kty": "EC", "crv": "P-256", "x": 1, "y": "a"}]
)
def test_thumbprint_refuses_incomplete_or_unknown_keys(jwk: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        thumbprint(jwk)


def test_access_token_hash_is_base64url_sha256() -> None:
    assert access_token_hash("abc") == b64(hashlib.sha256(b"abc").digest())


# --- a good proof ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "ES384", "RS256", "PS256", "EdDSA"])
async def test_accepts_a_valid_proof_and_returns_its_thumbprint(
    verifier: DpopVerifier, keys: SigningKeys, alg: str
) -> None:
    key = keys.for_alg(alg)
    assert await check(verifier, make_proof(key, alg=alg), jkt=jkt_of(key)) == jkt_of(key)


async def test_accepts_a_proof_for_an_unbound_token_and_leaves_the_verdict_to_the_caller(
    verifier: DpopVerifier, keys: SigningKeys
) -> None:
    assert await check(verifier, make_proof(keys.es256)) == jkt_of(keys.es256)


def test_the_verifier_names_its_algorithms_for_the_challenge(verifier: DpopVerifier) -> None:
    assert verifier.algorithms == DEFAULT_ALGORITHMS


async def test_accepts_iat_at_the_edges_of_the_window(verifier: DpopVerifier, keys: SigningKeys) -> None:
    await check(verifier, make_proof(keys.es256, iat=NOW - 60))
    await check(verifier, make_proof(keys.es256, iat=NOW + 5))


# --- refusals -------------------------------------------------------------------------------------


async def test_refuses_a_missing_proof(verifier: DpopVerifier) -> None:
    for proof in (None, "", "   "):
        with pytest.raises(InvalidDpopProof, match="missing"):
            await check(verifier, proof)


async def test_refuses_two_proofs(verifier: DpopVerifier, keys: SigningKeys) -> None:
    joined = make_proof(keys.es256) + ", " + make_proof(keys.es256)
    with pytest.raises(InvalidDpopProof, match="more than one"):
        await check(verifier, joined)


async def test_refuses_a_replayed_jti(verifier: DpopVerifier, keys: SigningKeys, clock: FrozenClock) -> None:
    proof = make_proof(keys.es256)
    await check(verifier, proof)
    clock.advance(30)
    with pytest.raises(InvalidDpopProof, match="replayed"):
        await check(verifier, proof)


async def test_a_jti_is_remembered_through_the_last_instant_its_proof_is_accepted(
    verifier: DpopVerifier, keys: SigningKeys, clock: FrozenClock
) -> None:
    """A proof dated `iat_future_seconds` ahead is accepted until `iat + iat_past_seconds` included; its jti was
    remembered for exactly past + future seconds from its first use, so at that last instant it was forgotten
    while the proof still passed: a replay (and by up to a replica's clock lag more, with shared state)."""
    proof = make_proof(keys.es256, iat=int(NOW) + 5)
    await check(verifier, proof)
    clock.advance(65)  # iat + iat_past_seconds: still inside the proof's window
    with pytest.raises(InvalidDpopProof, match="replayed"):
        await check(verifier, proof)
    clock.advance(0.5)
    with pytest.raises(InvalidDpopProof, match="too old"):
        await check(verifier, proof)


async def test_the_same_jti_under_another_key_is_not_a_replay(verifier: DpopVerifier, keys: SigningKeys) -> None:
    await check(verifier, make_proof(keys.es256, jti="same"))
    await check(verifier, make_proof(keys.eddsa, alg="EdDSA", jti="same"))


async def test_a_refused_proof_does_not_use_up_its_jti(verifier: DpopVerifier, keys: SigningKeys) -> None:
    proof = make_proof(keys.es256)
    with pytest.raises(InvalidDpopProof):
        await check(verifier, proof, method="POST")
    await check(verifier, proof)


async def test_refuses_wrong_htm(verifier: DpopVerifier, keys: SigningKeys) -> None:
    with pytest.raises(InvalidDpopProof, match="htm"):
        await check(verifier, make_proof(keys.es256, htm="POST"))
    with pytest.raises(InvalidDpopProof, match="htm"):
        await check(verifier, make_proof(keys.es256, htm="get"))  # methods are case-sensitive


@pytest.mark.parametrize(
    "htu",
    [
        "https://api.example.test/other",
        "http://api.example.test/orders",
        "https://evil.example.test/orders",
        "https://api.example.test:8443/orders",
        "https://api.example.test/orders/",
        "https://api.example.test",
        "/orders",
        "not a url",
    ],
)
async def test_refuses_wrong_htu(verifier: DpopVerifier, keys: SigningKeys, htu: str) -> None:
    with pytest.raises(InvalidDpopProof, match="htu"):
        await check(verifier, make_proof(keys.es256, htu=htu))


@pytest.mark.parametrize(
    ("htu", "request_url"),
    [
        (URL, URL + "?page=2#top"),  # query and fragment of the request are ignored
        (URL + "?page=1", URL + "?page=2"),  # and of htu
        ("HTTPS://API.Example.TEST/orders", URL),  # scheme and host are case-insensitive
        ("https://api.example.test:443/orders", URL),  # default port
        (URL, "https://api.example.test:443/orders"),
        ("http://api.example.test:80/orders", "http://api.example.test/orders"),
        ("https://api.example.test/%6Frders", URL),  # percent-encoded unreserved character
        ("https://api.example.test/a/../orders", URL),  # dot segments
        ("https://api.example.test", "https://api.example.test/"),  # empty path is "/"
    ],
)
async def test_matches_htu_after_normalization(
    verifier: DpopVerifier, keys: SigningKeys, htu: str, request_url: str
) -> None:
    await check(verifier, make_proof(keys.es256, htu=htu), url=request_url)


def test_normalize_htu_keeps_what_is_significant() -> None:
    assert normalize_htu("https://h.test/a%2fb") == "https://h.test/a%2Fb"  # reserved stays encoded
    assert normalize_htu("https://h.test/Path") == "https://h.test/Path"  # paths keep their case
    assert normalize_htu("https://h.test//a/./b/..") == "https://h.test//a/"
    assert normalize_htu("https://[::1]:8443/x") == "https://[::1]:8443/x"
    assert normalize_htu("https://API.h.test.:443/x") == "https://api.h.test/x"  # as the doors spell the host
    with pytest.raises(ValueError):
        normalize_htu("ftp://h.test/x")


@pytest.mark.parametrize(("offset", "message"), [(-61, "too old"), (-3600, "too old"), (6, "future")])
async def test_refuses_stale_or_future_iat(
    verifier: DpopVerifier, keys: SigningKeys, offset: float, message: str
) -> None:
    with pytest.raises(InvalidDpopProof, match=message):
        await check(verifier, make_proof(keys.es256, iat=NOW + offset))


@pytest.mark.parametrize("iat", [None, "1700000000", True])  # NaN: test_refuses_a_proof_that_reads_two_ways
async def test_refuses_missing_or_malformed_iat(verifier: DpopVerifier, keys: SigningKeys, iat: Any) -> None:
    proof = make_proof(keys.es256, iat=iat) if iat is not None else make_proof(keys.es256, iat=None)
    with pytest.raises(InvalidDpopProof, match="iat"):
        await check(verifier, proof)


async def test_refuses_wrong_or_missing_ath(verifier: DpopVerifier, keys: SigningKeys) -> None:
    with pytest.raises(InvalidDpopProof, match="ath"):
        await check(verifier, make_proof(keys.es256, ath=access_token_hash("another token")))
    with pytest.raises(InvalidDpopProof, match="ath"):
        await check(verifier, make_proof(keys.es256, ath=None))
    with pytest.raises(InvalidDpopProof, match="ath"):
        await check(verifier, make_proof(keys.es256), token="another token")


# where a proof holds an escaped lone surrogate -> that member as written (None: a `kid` in the protected header)
LONE_SURROGATE_PLACES: dict[str, str | None] = {
    "jti": '"jti": "j-\\ud800"',
    "jti-low": '"jti": "\\udfff-j"',
    "jti-reversed-pair": '"jti": "\\ude00\\ud83d"',
    "member-name": '"x\\udc00": 1',
    "array": '"x": ["ok", "\\ud800"]',
    "header": None,
}


@pytest.mark.parametrize("escaped", LONE_SURROGATE_PLACES.values(), ids=LONE_SURROGATE_PLACES.keys())
async def test_refuses_a_proof_holding_a_lone_surrogate(
    verifier: DpopVerifier, keys: SigningKeys, escaped: str | None
) -> None:
    """A lone surrogate (`"\\ud800"`, valid JSON syntax) is no Unicode text (RFC 8259 section 8.2, I-JSON RFC 7493
    section 2.1): a jti made of one was accepted and remembered by its surrogatepass bytes, which another reader
    (a log pipeline, a replica in another language) replaces, refuses or reads otherwise. Refused as not JSON read
    one way, however it is placed: a jti, a member name, an array element, the header."""
    header = json.dumps({"typ": "dpop+jwt", "alg": "ES256", "jwk": public_jwk(keys.es256)})[1:-1]
    claims = {"htm": "GET", "htu": URL, "iat": int(NOW), "ath": access_token_hash(TOKEN)}
    members = json.dumps(claims)[1:-1]
    if escaped is None:  # in the protected header
        header += ', "kid": "k\\ud800"'
        members = f'"jti": "{uuid.uuid4()}", {members}'
    elif escaped.startswith('"jti"'):
        members = f"{escaped}, {members}"
    else:
        members = f'"jti": "{uuid.uuid4()}", {members}, {escaped}'
    proof = signed_as_written(keys.es256, f"{{{header}}}".encode(), f"{{{members}}}".encode())
    with pytest.raises(InvalidDpopProof, match="not JSON read one way"):
        await check(verifier, proof)


async def test_accepts_a_proof_with_an_escaped_surrogate_pair(verifier: DpopVerifier, keys: SigningKeys) -> None:
    """A pair escaped (`"\\ud83d\\ude00"`) is one character: taken, as a jti written by hand would be."""
    header = json.dumps({"typ": "dpop+jwt", "alg": "ES256", "jwk": public_jwk(keys.es256)}).encode()
    claims = {"htm": "GET", "htu": URL, "iat": int(NOW), "ath": access_token_hash(TOKEN)}
    members = '"jti": "j-\\ud83d\\ude00-' + str(uuid.uuid4()) + '", ' + json.dumps(claims)[1:-1]
    assert await check(verifier, signed_as_written(keys.es256, header, f"{{{members}}}".encode())) == jkt_of(
        keys.es256
    )


async def test_refuses_lone_surrogates_without_crashing(verifier: DpopVerifier, keys: SigningKeys) -> None:
    with pytest.raises(InvalidDpopProof, match="not JSON read one way"):
        await check(verifier, make_proof(keys.es256, ath="\ud800"))
    with pytest.raises(InvalidDpopProof, match="not JSON read one way"):
        await check(verifier, make_proof(keys.es256, jti="\ud800"))  # an identifier no UTF-8 reader can read


@pytest.mark.parametrize("jti", [None, "", 7, "x" * 257])
async def test_refuses_missing_or_malformed_jti(verifier: DpopVerifier, keys: SigningKeys, jti: Any) -> None:
    proof = make_proof(keys.es256, jti=jti) if jti is not None else make_proof(keys.es256, jti=None)
    with pytest.raises(InvalidDpopProof, match="jti"):
        await check(verifier, proof)


async def test_refuses_a_proof_signed_by_another_key_than_its_jwk(verifier: DpopVerifier, keys: SigningKeys) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InvalidDpopProof, match="signature"):
        await check(verifier, make_proof(other, jwk=public_jwk(keys.es256)))


async def test_refuses_a_jwk_with_private_key_material(verifier: DpopVerifier, keys: SigningKeys) -> None:
    for key, alg in ((keys.es256, "ES256"), (keys.rs256, "RS256"), (keys.eddsa, "EdDSA")):
        with pytest.raises(InvalidDpopProof, match="private"):
            await check(verifier, make_proof(key, alg=alg, jwk=private_jwk(key, "k")))


async def test_refuses_a_symmetric_jwk(verifier: DpopVerifier) -> None:
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": {"kty": "oct", "k": b64(b"secret")}}
    with pytest.raises(InvalidDpopProof, match="private"):
        await check(verifier, compact(header, {"jti": "j"}))


async def test_refuses_a_missing_jwk(verifier: DpopVerifier, keys: SigningKeys) -> None:
    proof = jwt.encode({"jti": "j"}, keys.es256, algorithm="ES256", headers={"typ": "dpop+jwt"})
    with pytest.raises(InvalidDpopProof, match="no jwk"):
        await check(verifier, proof)


async def test_refuses_an_alg_that_does_not_fit_the_jwk(verifier: DpopVerifier, keys: SigningKeys) -> None:
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": public_jwk(keys.es256)}
    with pytest.raises(InvalidDpopProof, match="does not fit"):
        await check(verifier, compact(header, {"jti": "j"}))


def _rsa_jwk(n: int, e: int) -> dict[str, Any]:
    def octets(value: int) -> str:
        return b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))

    return {"kty": "RSA", "n": octets(n), "e": octets(e)}


@pytest.mark.parametrize(
    ("bits", "exponent_bits"),
    [(3072, 3071), (2048, 65), (8192, 17), (16384, 17)],
    ids=["huge-exponent", "65-bit-exponent", "rsa-8192", "rsa-16384"],
)
async def test_refuses_an_rsa_proof_key_too_costly_to_verify_before_checking_its_signature(
    verifier: DpopVerifier, bits: int, exponent_bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proof's key is the presenter's choice, verified before anything ties it to the token: a 3072-bit modulus
    with an exponent as long (~7 ms a check) or a 16384-bit modulus (~5 ms) made every request with any DPoP-bound
    token, a stolen one included, cost the verifier 200 times an RSA-2048 proof. Refused unverified."""
    n = (1 << (bits - 1)) | 1  # odd and of that length: all the parser asks of a public modulus
    e = (1 << (exponent_bits - 1)) | 1
    verified: list[str] = []
    monkeypatch.setattr(dpop_module.VerificationKey, "verify", lambda *a: verified.append("x") or False)
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": _rsa_jwk(n, e)}
    with pytest.raises(InvalidDpopProof, match="jwk"):
        await check(verifier, compact(header, {"jti": "j"}, b"\x01" * (bits // 8)))
    assert verified == []


async def test_accepts_an_rsa_4096_proof_key_with_the_usual_exponent(verifier: DpopVerifier) -> None:
    key = rsa.generate_private_key(65537, 4096)
    await check(verifier, make_proof(key, alg="RS256"))


async def test_a_clients_proof_key_is_parsed_once_and_another_key_on_its_own(
    verifier: DpopVerifier, keys: SigningKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client signs every proof with one key: parsing it (~23 us with its thumbprint) happens once. The key
    is held under the JWK's whole content, so a JWK differing in any member is parsed and judged on its own."""
    parsed: list[dict[str, Any]] = []
    real = dpop_module.parse_jwk
    monkeypatch.setattr(dpop_module, "parse_jwk", lambda jwk: parsed.append(dict(jwk)) or real(jwk))
    for _ in range(3):
        assert await check(verifier, make_proof(keys.es256)) == jkt_of(keys.es256)
    assert len(parsed) == 1
    other = ec.generate_private_key(ec.SECP256R1())
    assert await check(verifier, make_proof(other)) == jkt_of(other)  # its own thumbprint, not the held one's
    mixed = {**public_jwk(keys.es256), "y": public_jwk(other)["y"]}  # another point: not on the curve
    with pytest.raises(InvalidDpopProof, match="usable"):
        await check(verifier, make_proof(keys.es256, jwk=mixed))
    with pytest.raises(InvalidDpopProof, match="private"):  # the same key with private material: not held
        await check(verifier, make_proof(keys.es256, jwk=private_jwk(keys.es256, "d")))
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": public_jwk(keys.es256)}
    with pytest.raises(InvalidDpopProof, match="does not fit"):  # a held key still has to fit the alg
        await check(verifier, compact(header, {"jti": "j"}))
    assert len(parsed) == 3


async def test_the_proof_keys_held_are_bounded(verifier: DpopVerifier, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dpop_module, "PROOF_KEYS_HELD", 4)
    signers = [ec.generate_private_key(ec.SECP256R1()) for _ in range(6)]
    for key in signers:
        assert await check(verifier, make_proof(key)) == jkt_of(key)
    assert len(verifier._keys) == 4
    assert await check(verifier, make_proof(signers[0])) == jkt_of(signers[0])  # evicted, parsed again


@pytest.mark.parametrize("alg", ["none", "None", "HS256", "HS512", "ES512", "RS512"])
async def test_refuses_an_alg_outside_the_allow_list(verifier: DpopVerifier, keys: SigningKeys, alg: str) -> None:
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": public_jwk(keys.es256)}
    with pytest.raises(InvalidDpopProof, match="alg"):
        await check(verifier, compact(header, {"jti": "j", "htm": "GET", "htu": URL, "iat": NOW}))


@pytest.mark.parametrize(
    ("allowed", "alg"), [((), "RS512"), ((), "PS384"), (("ES256",), "RS256"), (("ES256",), "EdDSA")]
)
async def test_refuses_a_good_proof_whose_alg_is_off_the_configured_list(
    state: MemoryState, clock: FrozenClock, keys: SigningKeys, allowed: tuple[str, ...], alg: str
) -> None:
    """Step 5: the allow-list decides, not what the key could verify: a proof well signed by its own key with an
    algorithm we do not list (the defaults, or `algorithms: [ES256]`) is refused."""
    config = DpopConfig(algorithms=allowed) if allowed else DpopConfig()
    key = keys.for_alg(alg)
    with pytest.raises(InvalidDpopProof, match="alg is not allowed"):
        await check(DpopVerifier(config, state, clock), make_proof(key, alg=alg))


async def test_the_cnf_jkt_and_ath_are_compared_in_constant_time(
    verifier: DpopVerifier, keys: SigningKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps 11 and 12: `ath` and the token's `cnf.jkt` are compared with `hmac.compare_digest`."""
    calls = compare_digest_calls(monkeypatch)
    jkt = jkt_of(keys.es256)
    await check(verifier, make_proof(keys.es256), jkt=jkt)
    ath = access_token_hash(TOKEN).encode()
    assert set(calls) >= {(jkt.encode(), jkt.encode()), (ath, ath)}


async def test_refuses_an_hs256_proof_made_with_pyjwt(verifier: DpopVerifier, keys: SigningKeys) -> None:
    proof = jwt.encode(
        {"jti": "j"}, "k" * 32, algorithm="HS256", headers={"typ": "dpop+jwt", "jwk": public_jwk(keys.es256)}
    )
    with pytest.raises(InvalidDpopProof, match="alg"):
        await check(verifier, proof)


@pytest.mark.parametrize("typ", [None, "JWT", "at+jwt", "application/jwt", 1])
async def test_refuses_a_wrong_typ(verifier: DpopVerifier, keys: SigningKeys, typ: Any) -> None:
    header: dict[str, Any] = {"jwk": public_jwk(keys.es256)}
    if typ is not None:
        header["typ"] = typ
    claims = {"jti": "j", "htm": "GET", "htu": URL, "iat": NOW, "ath": access_token_hash(TOKEN)}
    with pytest.raises(InvalidDpopProof, match="typ"):
        await check(verifier, jwt.encode(claims, keys.es256, algorithm="ES256", headers=header))


async def test_accepts_typ_in_any_case(verifier: DpopVerifier, keys: SigningKeys) -> None:
    await check(verifier, make_proof(keys.es256, headers={"typ": "DPoP+JWT"}))


@pytest.mark.parametrize(
    "proof",
    [
        "a.b",
        "a.b.c.d",
        "!!!.b.c",
        "é.b.c",
        compact({"typ": "dpop+jwt"}, b"not json"),
        compact({"typ": "dpop+jwt"}, b"[1]"),
        compact({"typ": "dpop+jwt"}, {"jti": "j"}, signature=b""),
        "x" * 9000,
    ],
)
async def test_refuses_malformed_proofs(verifier: DpopVerifier, proof: str) -> None:
    with pytest.raises(InvalidDpopProof):
        await check(verifier, proof)


def signed_as_written(key: Any, header: bytes, claims: bytes) -> str:
    """An ES256 proof over header and claims byte for byte as written (pyjwt would rewrite them), signed by `key`."""
    signing_input = f"{b64(header)}.{b64(claims)}"
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode(), key)
    return f"{signing_input}.{b64(signature)}"


ELSEWHERE = '"htu": "https://api.example.test/elsewhere"'
# (header members, claims members) -> (header, claims) as sent; the members are a valid proof's, without braces
READ_TWO_WAYS: dict[str, Callable[[str, str], tuple[bytes, bytes]]] = {
    # two htu: a WAF or an upstream that reads the first sees a request to elsewhere; json.loads reads the last
    "htu-last-real": lambda h, c: (f"{{{h}}}".encode(), f"{{{ELSEWHERE}, {c}}}".encode()),
    "htu-first-real": lambda h, c: (f"{{{h}}}".encode(), f"{{{c}, {ELSEWHERE}}}".encode()),
    "jti": lambda h, c: (f"{{{h}}}".encode(), f'{{"jti": "another-jti", {c}}}'.encode()),  # replay keyed on one
    "jwk": lambda h, c: (f'{{"jwk": {{"kty": "EC"}}, {h}}}'.encode(), f"{{{c}}}".encode()),  # the signing key last
    # a member twice inside the jwk: thumbprint and key read from the last x, another reader's from the first
    "jwk-x": lambda h, c: (("{" + h.replace('"jwk": {', '"jwk": {"x": "AAAA", ') + "}").encode(), f"{{{c}}}".encode()),
    "bom": lambda h, c: (f"{{{h}}}".encode(), f"\ufeff{{{c}}}".encode()),
    "bom-header": lambda h, c: (f"\ufeff{{{h}}}".encode(), f"{{{c}}}".encode()),
    "utf-16": lambda h, c: (f"{{{h}}}".encode(), f"{{{c}}}".encode("utf-16")),  # json.loads on bytes takes it
    "utf-32-header": lambda h, c: (f"{{{h}}}".encode("utf-32"), f"{{{c}}}".encode()),
    "nan": lambda h, c: (f"{{{h}}}".encode(), f'{{{c}, "exp": NaN}}'.encode()),  # in a claim nothing here reads
    "nan-iat": lambda h, c: (f"{{{h}}}".encode(), f'{{{c}, "iat": NaN}}'.encode()),  # json_number refused it too
    "infinity-header": lambda h, c: (f'{{{h}, "x": Infinity}}'.encode(), f"{{{c}}}".encode()),
}


@pytest.mark.parametrize("written", READ_TWO_WAYS.values(), ids=READ_TWO_WAYS.keys())
async def test_refuses_a_proof_that_reads_two_ways(
    verifier: DpopVerifier, keys: SigningKeys, written: Callable[[str, str], tuple[bytes, bytes]]
) -> None:
    """RFC 8259: a client-signed proof is refused unless every reader reads it alike (UTF-8, no BOM, unique member
    names, no NaN), and refused as such: each proof is signed by the client's own key and otherwise valid."""
    header = json.dumps({"typ": "dpop+jwt", "alg": "ES256", "jwk": public_jwk(keys.es256)})[1:-1]
    claims = {"jti": str(uuid.uuid4()), "htm": "GET", "htu": URL, "iat": int(NOW), "ath": access_token_hash(TOKEN)}
    proof = signed_as_written(keys.es256, *written(header, json.dumps(claims)[1:-1]))
    with pytest.raises(InvalidDpopProof, match="not JSON read one way"):
        await check(verifier, proof)


async def test_accepts_a_proof_written_by_hand(verifier: DpopVerifier, keys: SigningKeys) -> None:
    """The hand-written proofs above are valid but for what each test adds (so each is refused for that)."""
    header = json.dumps({"typ": "dpop+jwt", "alg": "ES256", "jwk": public_jwk(keys.es256)}).encode()
    claims = {"jti": str(uuid.uuid4()), "htm": "GET", "htu": URL, "iat": int(NOW), "ath": access_token_hash(TOKEN)}
    assert await check(verifier, signed_as_written(keys.es256, header, json.dumps(claims).encode())) == jkt_of(
        keys.es256
    )


async def test_refuses_an_unknown_critical_header(verifier: DpopVerifier, keys: SigningKeys) -> None:
    with pytest.raises(InvalidDpopProof, match="critical"):
        await check(verifier, make_proof(keys.es256, headers={"crit": ["exp"], "exp": 1}))


async def test_refuses_a_proof_by_another_key_than_the_tokens_cnf_jkt(
    verifier: DpopVerifier, keys: SigningKeys
) -> None:
    with pytest.raises(SenderConstraintFailed):
        await check(verifier, make_proof(keys.es256), jkt=jkt_of(keys.eddsa))


async def test_fails_closed_when_replay_state_is_unavailable(keys: SigningKeys, clock: FrozenClock) -> None:
    class DownState:
        async def first_use(self, key: str, ttl_seconds: float, *, purpose: Purpose) -> bool:
            raise StateUnavailable("down")

        async def seen(self, key: str, *, purpose: Purpose) -> bool:
            raise StateUnavailable("down")

        async def take(self, key: str, *, rate_per_second: float, burst: int, now: float) -> TakeResult:
            raise StateUnavailable("down")

        async def close(self) -> None:
            return None

    with pytest.raises(StateUnavailable):
        await check(DpopVerifier(DpopConfig(), DownState(), clock), make_proof(keys.es256))


async def test_remembers_each_jti_for_the_whole_iat_window(keys: SigningKeys, clock: FrozenClock) -> None:
    seen: list[float] = []

    class Recording(MemoryState):
        async def first_use(self, key: str, ttl_seconds: float, *, purpose: Purpose) -> bool:
            seen.append(ttl_seconds)
            return await super().first_use(key, ttl_seconds, purpose=purpose)

    config = DpopConfig(iat_past_seconds=30, iat_future_seconds=10)
    await check(DpopVerifier(config, Recording(clock), clock), make_proof(keys.es256))
    assert seen == [40 + JTI_TTL_MARGIN_SECONDS]  # the whole window, and its last instant


async def test_a_proof_ahead_of_our_clock_is_remembered_until_its_last_acceptable_instant(
    keys: SigningKeys, clock: FrozenClock
) -> None:
    """A proof is accepted until `iat + iat_past_seconds`, whenever it first arrived: its jti lives from its use
    until then, `iat_future_seconds` more (a replica whose clock lags), and the margin."""
    seen: list[float] = []

    class Recording(MemoryState):
        async def first_use(self, key: str, ttl_seconds: float, *, purpose: Purpose) -> bool:
            seen.append(ttl_seconds)
            return await super().first_use(key, ttl_seconds, purpose=purpose)

    config = DpopConfig(iat_past_seconds=30, iat_future_seconds=10)
    await check(DpopVerifier(config, Recording(clock), clock), make_proof(keys.es256, iat=NOW + 10))
    await check(DpopVerifier(config, Recording(clock), clock), make_proof(keys.es256, iat=NOW - 30))
    assert seen == [30 + 10 + 10 + JTI_TTL_MARGIN_SECONDS, 10 + JTI_TTL_MARGIN_SECONDS]


async def test_a_replica_whose_clock_lags_refuses_a_replay_after_the_first_replicas_ttl_would_have_ended(
    keys: SigningKeys, clock: FrozenClock
) -> None:
    """Two replicas share one replay store (on its own clock, as Redis counts a TTL); their clocks are just under
    `iat_future_seconds` apart, the agreement the replicas' clocks must keep. The replica ahead accepts a proof
    whose `iat` is as far ahead of it as allowed; the one behind accepts the same proof until its own clock reaches
    `iat + iat_past_seconds`. Before, the jti lived `jti_ttl_seconds` (66 s) from its use on the replica ahead and
    was gone ~4 s before the replica behind stopped accepting it: the replay, in that gap, was accepted."""
    config = DpopConfig()
    skew = config.iat_future_seconds - 0.1
    shared = MemoryState(clock)
    ahead = DpopVerifier(config, shared, SkewedClock(clock, skew))
    behind = DpopVerifier(config, shared, clock)
    proof = make_proof(keys.es256, iat=(NOW + skew) + config.iat_future_seconds)
    await check(ahead, proof)
    clock.advance(config.jti_ttl_seconds + 1)  # past the jti's old lifetime, inside `behind`'s window
    with pytest.raises(InvalidDpopProof, match="replayed"):
        await check(behind, proof)
    clock.advance(config.iat_future_seconds)  # past every replica's window
    with pytest.raises(InvalidDpopProof, match="too old"):
        await check(behind, proof)


# --- server nonces (RFC 9449 section 9) ----------------------------------------------------------


@pytest.fixture
def nonce_verifier(clock: FrozenClock, state: MemoryState) -> DpopVerifier:
    return DpopVerifier(DpopConfig(require_nonce=True, nonce_secret=SECRET), state, clock)


async def test_requires_a_nonce_and_hands_out_a_fresh_one(nonce_verifier: DpopVerifier, keys: SigningKeys) -> None:
    with pytest.raises(UseDpopNonce) as refused:
        await check(nonce_verifier, make_proof(keys.es256))
    nonce = refused.value.nonce
    assert nonce and refused.value.oauth_error == "use_dpop_nonce"
    assert await check(nonce_verifier, make_proof(keys.es256, nonce=nonce)) == jkt_of(keys.es256)


async def test_accepts_an_issued_nonce_until_it_expires(
    nonce_verifier: DpopVerifier, keys: SigningKeys, clock: FrozenClock
) -> None:
    nonce = nonce_verifier.issue_nonce()
    clock.advance(300)
    await check(nonce_verifier, make_proof(keys.es256, nonce=nonce, iat=clock.now()), url=URL)
    clock.advance(1)
    with pytest.raises(UseDpopNonce) as refused:
        await check(nonce_verifier, make_proof(keys.es256, nonce=nonce, iat=clock.now()))
    assert refused.value.nonce != nonce


async def test_a_nonce_past_half_its_lifetime_is_renewed_on_the_allow(
    nonce_verifier: DpopVerifier, keys: SigningKeys, clock: FrozenClock
) -> None:
    """RFC 9449 section 8.2/9: the server may hand out the next nonce with a 200, so a busy client never meets
    the use_dpop_nonce 401 once its nonce is old; a young nonce is kept (no new header on every answer)."""
    nonce = nonce_verifier.issue_nonce()
    young = await accept(nonce_verifier, make_proof(keys.es256, nonce=nonce, iat=clock.now()))
    assert young.nonce_issued_at == clock.now()
    assert nonce_verifier.renewed_nonce(young) is None
    clock.advance(150)  # half of the 300 s lifetime: still young
    assert nonce_verifier.renewed_nonce(young) is None
    clock.advance(1)  # past half of it
    old = await accept(nonce_verifier, make_proof(keys.es256, nonce=nonce, iat=clock.now()))  # still good
    renewed = nonce_verifier.renewed_nonce(old)
    assert renewed and renewed != nonce
    clock.advance(200)  # the first nonce has expired; the renewed one has not
    await check(nonce_verifier, make_proof(keys.es256, nonce=renewed, iat=clock.now()))


async def test_an_allow_renewing_the_nonce_parses_the_proof_once(
    nonce_verifier: DpopVerifier, keys: SigningKeys, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DPoP check (verify, then renewal on the allow) reads the proof once: `verify` hands back when the
    nonce was issued, and renewal needs nothing else."""
    parsed: list[str] = []
    parse = dpop_module._parse_proof
    monkeypatch.setattr(dpop_module, "_parse_proof", lambda proof, limit: parsed.append(proof) or parse(proof, limit))
    nonce = nonce_verifier.issue_nonce()
    clock.advance(151)  # past half of the nonce's lifetime: the allow hands out the next one
    jkt = jkt_of(keys.es256)
    principal = Principal("https://issuer.test", "user-1", None, (), frozenset(), NOW + 600, {"cnf": {"jkt": jkt}})
    proof = make_proof(keys.es256, nonce=nonce, iat=clock.now())
    attrs = RequestAttributes("GET", "https", "api.example.test", "/orders?page=2", {"dpop": proof})

    passed = await DpopBinding(nonce_verifier).check(principal, Credential(TokenScheme.DPOP, TOKEN), attrs, NO_POLICY)

    assert isinstance(passed, Passed) and passed.principal == principal
    ((name, renewed),) = passed.client_headers
    assert name == "dpop-nonce" and renewed != nonce
    assert parsed == [proof]


async def test_no_nonce_is_renewed_when_none_is_required_or_the_proof_is_not_ours(
    verifier: DpopVerifier, nonce_verifier: DpopVerifier, keys: SigningKeys, clock: FrozenClock
) -> None:
    clock.advance(1000)
    accepted = await accept(verifier, make_proof(keys.es256, nonce="anything", iat=clock.now()))
    assert accepted.nonce_issued_at is None  # nonces are not required: nothing to renew
    assert verifier.renewed_nonce(accepted) is None
    # a proof without a fresh nonce of ours is never accepted, so never renewed: the refusal carries one
    for proof in ("garbage", "a.b.c", make_proof(keys.es256), make_proof(keys.es256, nonce="forged")):
        with pytest.raises((InvalidDpopProof, UseDpopNonce)):
            await accept(nonce_verifier, proof)


async def test_refuses_a_forged_or_foreign_nonce(
    nonce_verifier: DpopVerifier, keys: SigningKeys, clock: FrozenClock, state: MemoryState
) -> None:
    foreign = DpopVerifier(DpopConfig(require_nonce=True, nonce_secret=b"o" * 32), state, clock).issue_nonce()
    good = nonce_verifier.issue_nonce()
    tampered = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    for nonce in (foreign, tampered, "", "garbage", 42, "é"):
        with pytest.raises(UseDpopNonce):
            await check(nonce_verifier, make_proof(keys.es256, nonce=nonce))


async def test_a_nonce_from_another_replica_with_the_same_secret_is_accepted(
    nonce_verifier: DpopVerifier, keys: SigningKeys, clock: FrozenClock
) -> None:
    other = DpopVerifier(DpopConfig(require_nonce=True, nonce_secret=SECRET), MemoryState(clock), clock)
    await check(nonce_verifier, make_proof(keys.es256, nonce=other.issue_nonce()))


async def test_nonces_are_ignored_when_not_required(verifier: DpopVerifier, keys: SigningKeys) -> None:
    await check(verifier, make_proof(keys.es256, nonce="anything"))


# --- configuration --------------------------------------------------------------------------------


def test_config_defaults() -> None:
    config = parse_dpop_config(None)
    assert config.algorithms == DEFAULT_ALGORITHMS == ("ES256", "ES384", "EdDSA", "RS256", "PS256")
    assert (config.iat_past_seconds, config.iat_future_seconds, config.require_nonce) == (60, 5, False)
    assert config.jti_ttl_seconds == 65 + JTI_TTL_MARGIN_SECONDS


def test_config_reads_the_nonce_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPOP_SECRET", "s" * 40)
    config = parse_dpop_config({"require_nonce": True, "nonce_secret_env": "DPOP_SECRET", "algorithms": ["ES256"]})
    assert config.nonce_secret == b"s" * 40 and config.algorithms == ("ES256",)
    assert "sss" not in repr(config)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"algorithms": ["ES256", "HS256"]}, "dpop.algorithms[1]"),
        ({"algorithms": ["none"]}, "dpop.algorithms[0]"),
        ({"algorithms": []}, "dpop.algorithms"),
        ({"iat_past_seconds": -1}, "dpop.iat_past_seconds"),
        ({"iat_future_seconds": "5"}, "dpop.iat_future_seconds"),
        ({"require_nonce": "yes"}, "dpop.require_nonce"),
        ({"require_nonce": True}, "dpop.nonce_secret_env"),
        ({"nonce_secret_env": "DPOP_UNSET_VARIABLE"}, "dpop.nonce_secret_env"),
        ({"max_proof_bytes": 10}, "dpop.max_proof_bytes"),
        ({"nonce_lifetime": 5}, "dpop.nonce_lifetime"),
        ([], "dpop"),
    ],
)
def test_config_errors_name_the_key(data: Any, key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_dpop_config(data)
    assert str(refused.value).startswith(key + ": ")


def test_config_refuses_require_nonce_without_a_secret_in_code() -> None:
    with pytest.raises(ValueError):
        DpopConfig(require_nonce=True)
    with pytest.raises(ValueError):
        DpopConfig(algorithms=("HS256",))


@pytest.mark.parametrize("value", HOSTILE_NUMBERS, ids=HOSTILE_IDS)
async def test_a_hostile_number_as_iat_is_an_invalid_proof(
    verifier: DpopVerifier, keys: SigningKeys, value: Any
) -> None:
    """#18 F11: `iat` of 10**400 answered 503 with a traceback (math.isfinite overflowed)."""
    with pytest.raises(InvalidDpopProof):
        await check(verifier, make_proof(keys.es256, iat=value))


# --- a malformed binding (cnf.jkt not a non-empty string) ------------------------------------------

MALFORMED_JKTS = [None, "", 42, ["jkt"], {}]
MALFORMED_JKT_IDS = ["null", "empty", "number", "list", "object"]


@pytest.mark.parametrize("scheme", [TokenScheme.BEARER, TokenScheme.DPOP], ids=["bearer", "dpop"])
@pytest.mark.parametrize("jkt", MALFORMED_JKTS, ids=MALFORMED_JKT_IDS)
async def test_a_cnf_jkt_that_is_not_a_non_empty_string_is_a_malformed_binding_under_either_scheme(
    verifier: DpopVerifier, keys: SigningKeys, jkt: Any, scheme: TokenScheme
) -> None:
    """`cnf: {"jkt": null}` was let by as a bearer token under the Bearer scheme (only the certificate check, later
    in the chain, refused it: `sender_constraint_failed`) and refused as unbound under DPoP (`token_not_dpop_bound`);
    `""` was taken as bound, its proof checked in full. One rule now: a malformed binding, `claim_invalid`."""
    principal = Principal("https://issuer.test", "user-1", None, (), frozenset(), NOW + 600, {"cnf": {"jkt": jkt}})
    attrs = RequestAttributes("GET", "https", "api.example.test", "/orders", {"dpop": make_proof(keys.es256)})
    credential = Credential(scheme, TOKEN)
    check = DpopBinding(verifier)
    assert check.for_token(principal, credential)
    with pytest.raises(ClaimInvalid) as caught:
        await check.check(principal, credential, attrs, NO_POLICY)
    err = caught.value
    assert (err.code, err.oauth_error, err.claim) == ("claim_invalid", "invalid_token", "cnf")


async def test_an_empty_expected_jkt_is_a_malformed_binding_refused_before_the_proof(
    verifier: DpopVerifier, keys: SigningKeys
) -> None:
    proof = make_proof(keys.es256)
    with pytest.raises(ClaimInvalid):
        await accept(verifier, proof, jkt="")
    assert await check(verifier, proof, jkt=jkt_of(keys.es256)) == jkt_of(keys.es256)  # its jti not used up


# --- our own origins (dpop.origins) ---------------------------------------------------------------

EVIL_URL = "https://evil.example/orders"  # another server the victim's client also sends proofs to


def _bound(keys: SigningKeys) -> Principal:
    return Principal(
        "https://issuer.test", "user-1", None, (), frozenset(), NOW + 600, {"cnf": {"jkt": jkt_of(keys.es256)}}
    )


async def _check_at(verifier: DpopVerifier, keys: SigningKeys, host: str, htu: str) -> Principal | Passed:
    """The DPoP check of a GET /orders the gateway reports on `host` (a host the client chose)."""
    attrs = RequestAttributes("GET", "https", host, "/orders", {"dpop": make_proof(keys.es256, htu=htu)})
    return await DpopBinding(verifier).check(_bound(keys), Credential(TokenScheme.DPOP, TOKEN), attrs, NO_POLICY)


async def test_without_origins_a_proof_for_another_server_passes_on_the_host_the_client_chose(
    verifier: DpopVerifier, keys: SigningKeys
) -> None:
    """Pins the default: `htu` is judged against the URL the gateway reports, whatever host that names."""
    assert await _check_at(verifier, keys, "evil.example", EVIL_URL) == _bound(keys)


async def test_with_origins_a_proof_for_another_server_is_refused_whatever_host_the_gateway_reports(
    clock: FrozenClock, state: MemoryState, keys: SigningKeys
) -> None:
    """A gateway that lets the client choose the host (no `hosts` on a Kong route, nginx `default_server`,
    Envoy `domains: ["*"]`): a proof the victim made for https://evil.example/orders, replayed here with
    `Host: evil.example`, matched its htu and passed (RFC 9449 section 4.3: the URI of *this* server)."""
    verifier = DpopVerifier(DpopConfig(origins=("https://api.example.test",)), state, clock)
    with pytest.raises(InvalidDpopProof, match="origin"):
        await _check_at(verifier, keys, "evil.example", EVIL_URL)
    with pytest.raises(InvalidDpopProof, match="origin"):
        await accept(
            verifier,
            make_proof(keys.es256, htu="https://api.example.test:8443/orders"),
            url="https://api.example.test:8443/orders",
        )
    assert await _check_at(verifier, keys, "api.example.test", URL) == _bound(keys)
    await check(verifier, make_proof(keys.es256, htu="HTTPS://API.example.test.:443/orders"))  # normalized


@pytest.mark.parametrize(
    ("origin", "allow_http", "normalized"),
    [
        ("https://API.Example.TEST:443/", False, "https://api.example.test"),
        ("https://api.example.test.:8443", False, "https://api.example.test:8443"),
        ("http://127.0.0.1:8080", False, "http://127.0.0.1:8080"),
        ("http://verifier.internal:80", True, "http://verifier.internal"),
        ("https://[::1]:8443", False, "https://[::1]:8443"),
    ],
)
def test_config_normalizes_origins_at_start_up(origin: str, allow_http: bool, normalized: str) -> None:
    config = parse_dpop_config({"origins": [origin, normalized], "allow_http_origins": allow_http})
    assert config.origins == (normalized,)
    assert normalize_htu(origin.rstrip("/") + "/orders").removesuffix("/orders") == normalized  # spelled as htu is


async def test_an_internationalized_origin_is_listed_as_clients_send_it(
    clock: FrozenClock, state: MemoryState, keys: SigningKeys
) -> None:
    """`https://bücher.example.test` as an operator writes it: a proof's htu and the gateway's host carry the
    A-label (`xn--bcher-kva`), so the origin kept as written matched no proof and refused every one."""
    config = parse_dpop_config({"origins": ["https://Bücher.example.test"]})
    assert config.origins == ("https://xn--bcher-kva.example.test",)
    verifier = DpopVerifier(config, state, clock)
    url = "https://xn--bcher-kva.example.test/orders"
    assert await _check_at(verifier, keys, "xn--bcher-kva.example.test", url) == _bound(keys)
    with pytest.raises(ConfigError, match="internationalized"):
        parse_dpop_config({"origins": ["https://" + "ü" * 70 + ".example.test"]})  # a label past 63 octets


@pytest.mark.parametrize(
    ("origin", "message"),
    [
        ("https://api.example.test/orders", "without user, path"),
        ("https://api.example.test?x=1", "without user, path"),
        ("https://api.example.test#top", "without user, path"),
        ("https://user@api.example.test", "without user, path"),
        ("api.example.test", "expected an origin"),
        ("ftp://api.example.test", "expected an origin"),
        ("http://api.example.test", "plain http"),
        ("https://api.example.test:99999", "not a valid URL"),
    ],
)
def test_config_refuses_what_is_not_an_origin(origin: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        parse_dpop_config({"origins": ["https://ok.example.test", origin]})
    assert str(refused.value).startswith("dpop.origins[1]: ")
    with pytest.raises(ValueError):
        DpopConfig(origins=("https://API.example.test",))  # in code: normalized, or refused


# --- what a proof's htu is compared with: the URL the gateway reports, read as one URL --------------------------


@pytest.mark.parametrize(
    ("host", "path"),
    [
        # `#` never belongs in a request-target (RFC 9112 section 3.2), yet nginx and Kong pass it on: the URL built
        # from it took all that follows for a fragment, so the proof for /orders passed for the whole target, which
        # an upstream that resolves the dot segments after the `#` (Go's path.Clean) serves as /admin/users.
        ("api.example.test", "/orders#/../../admin/users"),
        ("api.example.test", "/orders#"),
        # A Host the client chose (a route without hosts) ending in `#` or `?`: all that followed was a fragment or
        # a query, so a proof for the origin's root passed for any path, `dpop.origins` or not.
        ("api.example.test#", "/admin/users"),
        ("api.example.test?", "/admin/users"),
        ("api.example.test/", "/admin/users"),
        ("user@api.example.test", "/orders"),
        ("api.example.test\\", "/orders"),
    ],
)
async def test_a_proof_never_passes_for_a_target_that_is_not_one_url(
    clock: FrozenClock, state: MemoryState, keys: SigningKeys, host: str, path: str
) -> None:
    """A stolen proof made for one URL passed for another request: the request's URL was the reported host and path
    joined, and a `#`, `?`, `/` or `@` in them moved where its path begins or ends. Such a request is refused
    (`invalid_dpop_proof`) before its proof is looked at, so the proof's jti is not used up."""
    for origins in ((), ("https://api.example.test",)):
        verifier = DpopVerifier(DpopConfig(origins=origins), state, clock)
        for htu in (URL, "https://api.example.test/"):  # a proof for what the joined URL was read as
            proof = make_proof(keys.es256, htu=htu)
            attrs = RequestAttributes("GET", "https", host, path, {"dpop": proof})
            with pytest.raises(InvalidDpopProof, match="not one URL"):
                await DpopBinding(verifier).check(_bound(keys), Credential(TokenScheme.DPOP, TOKEN), attrs, NO_POLICY)
            await check(verifier, proof, jkt=jkt_of(keys.es256), url=htu)  # unused: still good for its own URL


@pytest.mark.parametrize(
    "scheme",
    [
        # The scheme a gateway reports (X-Forwarded-Proto, Envoy's) is joined as text too: one that passes the client's
        # own header on (Traefik's `forwardedHeaders.insecure`, a Kong `trusted_ips` of everyone) let it name a whole
        # URL, whose `#` or `?` made the real host and path a fragment or a query.
        "https://api.example.test/orders#",
        "https://api.example.test/orders?",
        "https://api.example.test/orders#x",
        "HTTPS://api.example.test/orders?",
        "https:",
        "ftp",
        "",
    ],
)
async def test_a_proof_never_passes_for_a_scheme_that_is_not_http_or_https(
    clock: FrozenClock, state: MemoryState, keys: SigningKeys, scheme: str
) -> None:
    """A stolen, unused proof for `GET https://api.example.test/orders` passed for `GET /admin/users` on any host once
    the reported scheme was `https://api.example.test/orders#`: the joined URL read as the proof's, `dpop.origins`
    or not. A scheme that is not `http` or `https` is refused before the proof is read (its jti stays unused)."""
    for origins in ((), ("https://api.example.test",)):
        verifier = DpopVerifier(DpopConfig(origins=origins), state, clock)
        proof = make_proof(keys.es256)
        attrs = RequestAttributes("GET", scheme, "admin.example.test", "/admin/users", {"dpop": proof})
        with pytest.raises(InvalidDpopProof, match="not one URL"):
            await DpopBinding(verifier).check(_bound(keys), Credential(TokenScheme.DPOP, TOKEN), attrs, NO_POLICY)
        await check(verifier, proof, jkt=jkt_of(keys.es256))  # unused: still good for its own URL


async def test_a_proof_passes_for_its_own_target_with_a_query_and_the_host_spellings_the_doors_send(
    verifier: DpopVerifier, keys: SigningKeys
) -> None:
    """What the guard above lets through: a query (never part of htu, RFC 9449 section 4.3) even with a `#` in it,
    a port, an IPv6 literal."""
    for host, path, htu in (
        ("api.example.test", "/orders?page=2#top", URL),
        ("api.example.test:8443", "/orders", "https://api.example.test:8443/orders"),
        ("[::1]:8443", "/orders", "https://[::1]:8443/orders"),
    ):
        attrs = RequestAttributes("GET", "https", host, path, {"dpop": make_proof(keys.es256, htu=htu)})
        credential = Credential(TokenScheme.DPOP, TOKEN)
        assert await DpopBinding(verifier).check(_bound(keys), credential, attrs, NO_POLICY) == _bound(keys)
