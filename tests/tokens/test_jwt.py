"""verifier.tokens.jwt: the hostile-input list, through `JwtVerifier.parse/verify` and `check_claims`."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hostile_numbers import HOSTILE_IDS, HOSTILE_NUMBERS
from support import FrozenClock
from tokenkit import (
    AUDIENCE,
    ISSUER,
    JWKS_URL,
    KIDS,
    MAX_TOKEN_BYTES,
    NOW,
    FakeFetcher,
    Mint,
    SigningKeys,
    b64,
    claims,
    compact,
    issuer_settings,
    make_verifier,
    public_jwk,
    x5c_certificate,
)

from verifier.errors import (
    AlgorithmRefused,
    AudienceMismatch,
    BadSignature,
    ClaimInvalid,
    MalformedToken,
    Outcome,
    TokenExpired,
    TokenNotYetValid,
    UnknownIssuer,
    UnknownKey,
    VerifierError,
    WrongTokenType,
)
from verifier.principal import Principal
from verifier.settings import ConfigError, IssuerSettings, parse_settings
from verifier.tokens.jwt import JwtVerifier, check_claims

LEEWAY = 30  # the default leeway_seconds


async def _verify(verifier: JwtVerifier, token: str) -> Principal:
    return await verifier.verify(verifier.parse(token))


async def _refusal(verifier: JwtVerifier, token: str) -> VerifierError:
    with pytest.raises(VerifierError) as caught:
        await _verify(verifier, token)
    return caught.value


def _hs256(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    """An HS256 token made by hand (pyjwt rightly refuses to use a PEM as an HMAC secret)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def _flip_signature_byte(token: str) -> str:
    head, _, signature = token.rpartition(".")
    from verifier.tokens.jws import b64url_decode

    raw = bytearray(b64url_decode(signature.encode()))
    raw[0] ^= 0x01
    return f"{head}.{b64(bytes(raw))}"


@pytest.fixture
def verifier(settings: IssuerSettings, fetcher: FakeFetcher, clock: FrozenClock) -> JwtVerifier:
    return make_verifier(settings, fetcher, clock)[0]


# ---------------------------------------------------------------- acceptance


@pytest.mark.parametrize("alg", ["ES256", "ES384", "RS256", "EdDSA"])
async def test_accepts_a_valid_token_of_each_allowed_algorithm(verifier: JwtVerifier, mint: Mint, alg: str) -> None:
    principal = await _verify(verifier, mint(claims(roles=["admin", 7]), alg))
    assert principal.issuer == ISSUER
    assert principal.subject == "user-1"
    assert principal.client_id == "client-1"
    assert principal.scopes == ("read", "write")
    assert principal.roles == frozenset({"admin"})
    assert principal.expires_at == NOW + 300
    assert (principal.kid, principal.alg) == (KIDS[alg], alg)


async def test_accepts_a_token_without_kid_when_exactly_one_key_fits(verifier: JwtVerifier, mint: Mint) -> None:
    principal = await _verify(verifier, mint(claims(), "EdDSA", kid=None))
    assert principal.kid == KIDS["EdDSA"]  # the kid of the key that verified it: withdrawing that key forgets it


async def test_a_client_credentials_token_without_sub_is_a_client_not_a_user(verifier: JwtVerifier, mint: Mint) -> None:
    principal = await _verify(verifier, mint(claims(sub=None, client_id="svc-7")))
    assert (principal.subject, principal.client_id, principal.caller) == ("", "svc-7", "client:svc-7")


async def test_azp_stands_in_for_client_id_when_sub_is_missing(verifier: JwtVerifier, mint: Mint) -> None:
    principal = await _verify(verifier, mint(claims(sub=None, client_id=None, azp="svc-8")))
    assert (principal.subject, principal.client_id) == ("", "svc-8")


async def test_an_audience_list_needs_only_one_configured_audience(verifier: JwtVerifier, mint: Mint) -> None:
    principal = await _verify(verifier, mint(claims(aud=["https://other.test", AUDIENCE])))
    assert principal.subject == "user-1"


# ---------------------------------------------------------------- the hostile-input list

Builder = Callable[[Mint, SigningKeys], str]


def _rsa_pem(keys: SigningKeys) -> bytes:
    return keys.rs256.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
HS256_HEADER = {"alg": "HS256", "kid": KIDS["RS256"], "typ": "at+jwt"}
_STRANGER = ec.generate_private_key(ec.SECP256R1())  # an attacker's key, with a certificate of its own

# (case id, token builder, expected error class, expected code)
HOSTILE: list[tuple[str, Builder, type[VerifierError], str]] = [
    ("alg none", lambda m, k: compact({"alg": "none", "typ": "at+jwt"}, claims(), b""), AlgorithmRefused,
     "algorithm_refused"),
    ("alg None", lambda m, k: compact({"alg": "None"}, claims(), b"x"), AlgorithmRefused, "algorithm_refused"),
    ("alg NONE", lambda m, k: compact({"alg": "NONE"}, claims(), b"x"), AlgorithmRefused, "algorithm_refused"),
    ("HS256 keyed with the RSA public key PEM",
     lambda m, k: _hs256(HS256_HEADER, claims(), _rsa_pem(k)), AlgorithmRefused, "algorithm_refused"),
    ("HS256 keyed with the RSA public JWK JSON",
     lambda m, k: _hs256(HS256_HEADER, claims(), json.dumps(public_jwk(k.rs256, KIDS["RS256"])).encode()),
     AlgorithmRefused, "algorithm_refused"),
    ("unknown alg", lambda m, k: compact({"alg": "XS999", "kid": "es-1"}, claims()), AlgorithmRefused,
     "algorithm_refused"),
    ("alg allowed elsewhere but not for this issuer",
     lambda m, k: m(claims(), "PS256", kid=KIDS["RS256"]), AlgorithmRefused, "algorithm_refused"),
    ("jku header", lambda m, k: m(claims(), headers={"jku": "https://evil.test/jwks"}), AlgorithmRefused,
     "algorithm_refused"),
    ("x5u header", lambda m, k: m(claims(), headers={"x5u": "https://evil.test/c.pem"}), AlgorithmRefused,
     "algorithm_refused"),
    ("embedded jwk header",
     lambda m, k: m(claims(), headers={"jwk": public_jwk(k.es256)}), AlgorithmRefused, "algorithm_refused"),
    ("crit header", lambda m, k: m(claims(), headers={"crit": ["http://example.test/x"]}), MalformedToken,
     "token_malformed"),
    # x5c is never read: a token carrying a stranger's certificate, signed by the stranger, under the issuer's kid
    # or without a kid, is checked against the issuer's keys only.
    ("x5c header with the signer's own certificate",
     lambda m, k: m(claims(), key=_STRANGER, headers={"x5c": [x5c_certificate(_STRANGER)]}), BadSignature,
     "signature_invalid"),
    ("x5c header without a kid", lambda m, k: m(claims(), key=_STRANGER, kid=None,
                                                headers={"x5c": [x5c_certificate(_STRANGER)]}), BadSignature,
     "signature_invalid"),
    ("b64 false under crit", lambda m, k: compact({"alg": "ES256", "kid": "es-1", "b64": False, "crit": ["b64"]},
                                                  b"unencoded payload"), MalformedToken, "token_malformed"),
    ("alg with a trailing space", lambda m, k: compact({"alg": "ES256 ", "kid": "es-1"}, claims()),
     AlgorithmRefused, "algorithm_refused"),
    ("alg with a leading tab", lambda m, k: compact({"alg": "\tES256", "kid": "es-1"}, claims()),
     AlgorithmRefused, "algorithm_refused"),
    ("alg nOnE", lambda m, k: compact({"alg": "nOnE"}, claims(), b"x"), AlgorithmRefused, "algorithm_refused"),
    ("alg none with a trailing space", lambda m, k: compact({"alg": "none "}, claims(), b"x"), AlgorithmRefused,
     "algorithm_refused"),
    ("alg es256 in lower case", lambda m, k: compact({"alg": "es256", "kid": "es-1"}, claims()), AlgorithmRefused,
     "algorithm_refused"),
    ("kid with path characters", lambda m, k: m(claims(), kid="../../etc/passwd"), UnknownKey, "key_unknown"),
    ("kid with a NUL and a URL", lambda m, k: m(claims(), kid="\x00https://evil.test/k"), UnknownKey,
     "key_unknown"),
    ("huge token", lambda m, k: m(claims(pad="x" * MAX_TOKEN_BYTES)), MalformedToken, "token_malformed"),
    ("two segments", lambda m, k: m(claims()).rpartition(".")[0], MalformedToken, "token_malformed"),
    ("four segments", lambda m, k: m(claims()) + ".AAAA", MalformedToken, "token_malformed"),
    ("non-base64 characters", lambda m, k: m(claims()).replace(".", ".*", 1), MalformedToken, "token_malformed"),
    ("padded base64", lambda m, k: m(claims()) + "==", MalformedToken, "token_malformed"),
    ("empty signature", lambda m, k: m(claims()).rpartition(".")[0] + ".", MalformedToken, "token_malformed"),
    ("truncated signature", lambda m, k: m(claims())[:-4], BadSignature, "signature_invalid"),
    ("flipped signature byte", lambda m, k: _flip_signature_byte(m(claims())), BadSignature, "signature_invalid"),
    ("signed by a stranger's key under a known kid",
     lambda m, k: m(claims(), key=ec.generate_private_key(ec.SECP256R1())), BadSignature, "signature_invalid"),
    ("payload swapped after signing",
     lambda m, k: ".".join([m(claims()).split(".")[0], b64(json.dumps(claims(sub="admin")).encode()),
                            m(claims()).split(".")[2]]), BadSignature, "signature_invalid"),
    ("ES256 token naming the RSA key's kid", lambda m, k: m(claims(), "ES256", kid=KIDS["RS256"]),
     AlgorithmRefused, "algorithm_refused"),
    ("ES384 token naming a P-256 key", lambda m, k: m(claims(), "ES384", kid=KIDS["ES256"]), AlgorithmRefused,
     "algorithm_refused"),
    ("RS256 token naming the Ed25519 key", lambda m, k: m(claims(), "RS256", kid=KIDS["EdDSA"]),
     AlgorithmRefused, "algorithm_refused"),
    ("typ dpop+jwt", lambda m, k: m(claims(), headers={"typ": "dpop+jwt"}), WrongTokenType, "token_type_invalid"),
    ("typ id_token+jwt", lambda m, k: m(claims(), headers={"typ": "id_token+jwt"}), WrongTokenType,
     "token_type_invalid"),
    ("typ logout+jwt", lambda m, k: m(claims(), headers={"typ": "logout+jwt"}), WrongTokenType,
     "token_type_invalid"),
    ("ID token with nonce", lambda m, k: m(claims(nonce="n-0S6"), headers={"typ": "JWT"}), WrongTokenType,
     "token_type_invalid"),
    ("ID token with at_hash", lambda m, k: m(claims(at_hash="77QmUPtjPfzWtF2AnpK9RQ"), headers={"typ": "JWT"}),
     WrongTokenType, "token_type_invalid"),
    # RFC 8417 section 4.3, Back-Channel Logout 1.0 section 2.4: a SET or logout token signed with the same keys
    # (sent without its explicit `typ`, or with a legacy one) carries `events`, which no access token does.
    ("logout token without typ", lambda m, k: m(claims(sid="s-1", jti="j-1", events={LOGOUT_EVENT: {}}),
                                                headers={"typ": None}), WrongTokenType, "token_type_invalid"),
    ("SET with typ JWT", lambda m, k: m(claims(jti="j-2", events={"https://schemas.openid.net/secevent/caep/"
                                                                  "event-type/session-revoked": {}}),
                                        headers={"typ": "JWT"}), WrongTokenType, "token_type_invalid"),
    ("expired beyond leeway", lambda m, k: m(claims(exp=int(NOW) - LEEWAY - 1)), TokenExpired, "token_expired"),
    ("expired exactly at the leeway edge", lambda m, k: m(claims(exp=int(NOW) - LEEWAY)), TokenExpired,
     "token_expired"),
    ("nbf in the future", lambda m, k: m(claims(nbf=int(NOW) + LEEWAY + 5)), TokenNotYetValid,
     "token_not_yet_valid"),
    ("iat in the future", lambda m, k: m(claims(iat=int(NOW) + LEEWAY + 5)), TokenNotYetValid,
     "token_not_yet_valid"),
    # A login in the future never ages: it passed every `max_auth_age_seconds` and escaped revocations of the
    # logins before an event (`authenticated_before`) until then. Refused as a future `iat` is.
    ("auth_time in the future", lambda m, k: m(claims(auth_time=int(NOW) + LEEWAY + 5)), TokenNotYetValid,
     "token_not_yet_valid"),
    ("wrong issuer", lambda m, k: m(claims(iss="https://evil.test")), UnknownIssuer, "issuer_unknown"),
    ("issuer with a trailing slash", lambda m, k: m(claims(iss=ISSUER + "/")), UnknownIssuer, "issuer_unknown"),
    ("issuer in other case", lambda m, k: m(claims(iss=ISSUER.upper())), UnknownIssuer, "issuer_unknown"),
    ("no issuer", lambda m, k: m(claims(iss=None)), MalformedToken, "token_malformed"),
    ("issuer not a string", lambda m, k: compact({"alg": "ES256", "kid": "es-1"}, claims(iss=[ISSUER])),
     MalformedToken, "token_malformed"),
    ("wrong audience", lambda m, k: m(claims(aud="https://other.test")), AudienceMismatch, "audience_mismatch"),
    ("audience list without ours", lambda m, k: m(claims(aud=["a", "b"])), AudienceMismatch, "audience_mismatch"),
    ("no audience", lambda m, k: m(claims(aud=None)), ClaimInvalid, "claim_invalid"),
    ("empty audience list", lambda m, k: m(claims(aud=[])), ClaimInvalid, "claim_invalid"),
    ("missing exp", lambda m, k: m(claims(exp=None)), ClaimInvalid, "claim_invalid"),
    ("exp a string", lambda m, k: m(claims(exp=str(int(NOW) + 300))), ClaimInvalid, "claim_invalid"),
    ("exp a boolean", lambda m, k: m(claims(exp=True)), ClaimInvalid, "claim_invalid"),
    ("no sub and no client", lambda m, k: m(claims(sub=None, client_id=None)), ClaimInvalid, "claim_invalid"),
    ("sub not a string", lambda m, k: m(claims(sub=42)), ClaimInvalid, "claim_invalid"),
    # A session revocation names the session "123": a token whose `sid` is the number 123 escaped it.
    ("sid a number", lambda m, k: m(claims(sid=123)), ClaimInvalid, "claim_invalid"),
    ("sid a list", lambda m, k: m(claims(sid=["s-1"])), ClaimInvalid, "claim_invalid"),
]


@pytest.mark.parametrize(
    ("build", "error", "code"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE]
)
async def test_refuses_hostile_tokens_with_the_specific_error(
    verifier: JwtVerifier, mint: Mint, keys: SigningKeys, build: Builder, error: type[VerifierError], code: str
) -> None:
    err = await _refusal(verifier, build(mint, keys))
    assert type(err) is error, f"{type(err).__name__}: {err}"
    assert err.code == code


async def test_a_wrong_audience_is_a_403_not_a_401(verifier: JwtVerifier, mint: Mint) -> None:
    err = await _refusal(verifier, mint(claims(aud="https://other.test")))
    assert err.outcome is Outcome.FORBIDDEN
    assert err.oauth_error == "insufficient_scope"


@pytest.mark.parametrize("aud", ["", [""], ["", ""], [7]], ids=["empty", "list-of-empty", "list-of-empties", "no-str"])
async def test_an_aud_naming_no_audience_is_malformed_not_a_mismatch(
    verifier: JwtVerifier, mint: Mint, aud: Any
) -> None:
    """`aud: ""` names no audience: refused as a malformed claim (401 claim_invalid, as `[]` is), not as a token for
    another API (403), the same as an introspection answer's."""
    err = await _refusal(verifier, mint(claims(aud=aud)))
    assert isinstance(err, ClaimInvalid) and err.claim == "aud", f"{type(err).__name__}: {err}"
    assert err.code == "claim_invalid" and err.outcome is not Outcome.FORBIDDEN


@pytest.mark.parametrize(
    ("claim", "overrides"),
    [("exp", {"exp": None}), ("aud", {"aud": None}), ("sub", {"sub": None, "client_id": None}),
     ("exp", {"exp": "soon"}), ("nbf", {"nbf": "now"}), ("iat", {"iat": [1]}), ("sid", {"sid": 123})],
)
async def test_claim_errors_name_the_claim(verifier: JwtVerifier, mint: Mint, claim: str, overrides: dict) -> None:
    err = await _refusal(verifier, mint(claims(**overrides)))
    assert isinstance(err, ClaimInvalid)
    assert err.claim == claim


async def test_a_huge_token_is_refused_by_size_alone(verifier: JwtVerifier) -> None:
    with pytest.raises(MalformedToken, match="too large"):
        verifier.parse("." * (MAX_TOKEN_BYTES + 1))


async def test_a_path_kid_costs_at_most_one_jwks_fetch_and_no_file_access(
    settings: IssuerSettings, fetcher: FakeFetcher, clock: FrozenClock, mint: Mint
) -> None:
    verifier, issuer_keys = make_verifier(settings, fetcher, clock)
    await issuer_keys.refresh()
    before = fetcher.calls[JWKS_URL]
    for kid in ("../../etc/passwd", "/etc/passwd", "..\\..\\boot.ini", "file:///etc/passwd"):
        err = await _refusal(verifier, mint(claims(), kid=kid))
        assert type(err) is UnknownKey
    assert fetcher.calls[JWKS_URL] - before <= 1
    assert set(fetcher.calls) <= {JWKS_URL, fetcher_discovery(fetcher)}


def fetcher_discovery(fetcher: FakeFetcher) -> str:
    return next(url for url in fetcher.documents if url.endswith("openid-configuration"))


async def test_key_type_confusion_does_not_trigger_a_refresh(
    settings: IssuerSettings, fetcher: FakeFetcher, clock: FrozenClock, mint: Mint
) -> None:
    verifier, issuer_keys = make_verifier(settings, fetcher, clock)
    await issuer_keys.refresh()
    clock.advance(settings.jwks_cooldown_seconds + 1)
    before = fetcher.total
    err = await _refusal(verifier, mint(claims(), "ES256", kid=KIDS["RS256"]))
    assert type(err) is AlgorithmRefused
    assert fetcher.total == before


async def test_an_es256_token_is_refused_when_its_kid_names_an_rsa_key_only(
    settings: IssuerSettings, fetcher: FakeFetcher, clock: FrozenClock, keys: SigningKeys, mint: Mint
) -> None:
    fetcher.serve(JWKS_URL, {"keys": [public_jwk(keys.rs256, "shared")]})
    verifier, _ = make_verifier(settings, fetcher, clock)
    err = await _refusal(verifier, mint(claims(), "ES256", kid="shared"))
    assert type(err) is AlgorithmRefused


async def test_keys_of_other_types_sharing_a_kid_each_verify_their_own_alg(
    settings: IssuerSettings, fetcher: FakeFetcher, clock: FrozenClock, keys: SigningKeys, mint: Mint
) -> None:
    # RFC 7517 section 4.5 names this case: keys of different kty under one kid, as equivalent alternatives.
    # Only the last key under a kid was kept, so the other family's valid tokens got 401 algorithm_refused.
    fetcher.serve(JWKS_URL, {"keys": [public_jwk(keys.es256, "shared"), public_jwk(keys.rs256, "shared")]})
    verifier, _ = make_verifier(settings, fetcher, clock)
    for alg in ("ES256", "RS256"):
        assert (await _verify(verifier, mint(claims(), alg, kid="shared"))).kid == "shared"
        assert verifier.verify_now(verifier.parse(mint(claims(), alg, kid="shared"))) is not None
    assert type(await _refusal(verifier, mint(claims(), "EdDSA", kid="shared"))) is AlgorithmRefused
    forged = mint(claims(), "ES256", kid="shared", key=ec.generate_private_key(ec.SECP256R1()))
    assert type(await _refusal(verifier, forged)) is BadSignature


async def test_two_keys_of_one_type_under_one_kid_refuse_that_kid_and_leave_the_others_usable(
    settings: IssuerSettings,
    fetcher: FakeFetcher,
    clock: FrozenClock,
    keys: SigningKeys,
    mint: Mint,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The last key listed under the kid won, silently: a token signed by the other was refused (or, listed the other
    # way round, accepted) by the order of the set. Neither is guessed now: the kid is refused, and said once a fetch.
    other = ec.generate_private_key(ec.SECP256R1())
    published = [public_jwk(keys.es256, "dup"), public_jwk(other, "dup"), public_jwk(keys.rs256, "rsa")]
    fetcher.serve(JWKS_URL, {"keys": published})
    verifier, issuer_keys = make_verifier(settings, fetcher, clock)
    with caplog.at_level(logging.WARNING, logger="verifier.jwks"):
        await issuer_keys.refresh()
        clock.advance(settings.jwks_cooldown_seconds)
        for key in (keys.es256, other):
            token = mint(claims(), "ES256", kid="dup", key=key)
            err = await _refusal(verifier, token)
            assert type(err) is UnknownKey and err.code == "key_unknown", err
            with pytest.raises(UnknownKey):  # told at once, on the path that never awaits
                verifier.verify_now(verifier.parse(token))
        assert fetcher.calls[JWKS_URL] == 1  # refetching would not help: no refetch for the kid
        assert (await _verify(verifier, mint(claims(), "RS256", kid="rsa"))).kid == "rsa"
        # Nor is either tried for a token without a kid (unknown: it refetches, once per cooldown).
        assert type(await _refusal(verifier, mint(claims(), "ES256", kid=None))) is UnknownKey
        assert issuer_keys.kids == ("rsa",)
        await issuer_keys.refresh()
    logged = [r for r in caplog.records if getattr(r, "event", "") == "jwks_kid_ambiguous"]
    assert len(logged) == fetcher.calls[JWKS_URL] == 3  # once per fetch, not per token
    assert all(getattr(r, "kids", None) == ["dup"] for r in logged)
    fetcher.serve(JWKS_URL, {"keys": [public_jwk(keys.es256, "dup"), public_jwk(keys.rs256, "rsa")]})
    await issuer_keys.refresh()  # the provider mends its set: the kid is usable again
    assert (await _verify(verifier, mint(claims(), "ES256", kid="dup"))).kid == "dup"


async def test_one_key_listed_twice_under_its_kid_is_no_ambiguity(
    fetcher: FakeFetcher, clock: FrozenClock, keys: SigningKeys, mint: Mint
) -> None:
    published = [public_jwk(keys.rs256, "rsa", alg="RS256"), public_jwk(keys.rs256, "rsa", alg="PS256")]
    fetcher.serve(JWKS_URL, {"keys": published})
    verifier, _ = make_verifier(issuer_settings(algorithms=("RS256", "PS256")), fetcher, clock)
    for alg in ("RS256", "PS256"):
        assert (await _verify(verifier, mint(claims(), alg, kid="rsa"))).kid == "rsa"


async def test_hs256_is_refused_even_when_an_issuer_lists_it(
    fetcher: FakeFetcher, clock: FrozenClock, keys: SigningKeys
) -> None:
    # Settings validation never allows this (see below); a hand-built IssuerSettings still cannot be
    # talked into treating the RSA public key as an HMAC secret, because no JWK ever fits HS256.
    settings = issuer_settings(algorithms=("HS256", "RS256"))
    verifier, _ = make_verifier(settings, fetcher, clock)
    err = await _refusal(verifier, _hs256(HS256_HEADER, claims(), _rsa_pem(keys)))
    assert type(err) is AlgorithmRefused


async def test_an_oct_key_published_under_the_rsa_key_s_kid_never_becomes_an_hmac_secret(
    fetcher: FakeFetcher, clock: FrozenClock, keys: SigningKeys, mint: Mint
) -> None:
    # The secret is in the JWKS for anyone to read: an HS256 token MACed with it under the shared kid (even with
    # HS256 forced into the allow-list) is refused, and the RSA key under that kid still verifies its own tokens.
    secret = b"0123456789abcdef0123456789abcdef"
    oct_key = {"kty": "oct", "kid": KIDS["RS256"], "alg": "HS256", "use": "sig", "k": b64(secret)}
    fetcher.serve(JWKS_URL, {"keys": [oct_key, public_jwk(keys.rs256, KIDS["RS256"])]})
    verifier, _ = make_verifier(issuer_settings(algorithms=("HS256", "RS256")), fetcher, clock)
    assert type(await _refusal(verifier, _hs256(HS256_HEADER, claims(), secret))) is AlgorithmRefused
    kidless = {"alg": "HS256", "typ": "at+jwt"}  # no key fits HS256, so none is tried
    assert type(await _refusal(verifier, _hs256(kidless, claims(), secret))) is UnknownKey
    assert (await _verify(verifier, mint(claims(), "RS256"))).kid == KIDS["RS256"]


def test_settings_validation_refuses_hs256_in_an_allow_list() -> None:
    document = {
        "http": {"listen": "127.0.0.1:8080"},
        "issuers": [{"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["RS256", "HS256"]}],
    }
    with pytest.raises(ConfigError, match=r"issuers\[0\]\.algorithms\[1\]"):
        parse_settings(document)


async def test_the_signature_is_checked_before_the_claims(verifier: JwtVerifier, mint: Mint) -> None:
    expired_and_forged = _flip_signature_byte(mint(claims(exp=int(NOW) - 3600, aud="https://other.test")))
    assert type(await _refusal(verifier, expired_and_forged)) is BadSignature


async def test_an_unknown_issuer_is_refused_without_any_fetch(
    settings: IssuerSettings, fetcher: FakeFetcher, clock: FrozenClock, mint: Mint
) -> None:
    verifier, _ = make_verifier(settings, fetcher, clock)
    assert type(await _refusal(verifier, mint(claims(iss="https://evil.test")))) is UnknownIssuer
    assert fetcher.total == 0


# ---------------------------------------------------------------- typ and RFC 9068 strict mode

TYP_CASES = [
    # (typ header or None for absent, accepted in lenient mode, accepted in strict mode)
    ("at+jwt", True, True),
    ("AT+JWT", True, True),
    ("application/at+jwt", True, True),
    ("JWT", True, False),
    ("jwt", True, False),
    ("application/jwt", True, False),
    (None, True, False),
    ("dpop+jwt", False, False),
    ("id_token+jwt", False, False),
    ("secevent+jwt", False, False),
    ("at+jwt; x=1", False, False),
]


@pytest.mark.parametrize(("typ", "lenient", "strict"), TYP_CASES, ids=[str(c[0]) for c in TYP_CASES])
@pytest.mark.parametrize("strict_mode", [False, True], ids=["lenient", "rfc9068-strict"])
async def test_typ_is_checked_per_rfc9068(
    fetcher: FakeFetcher, clock: FrozenClock, mint: Mint, typ: str | None, lenient: bool, strict: bool,
    strict_mode: bool,
) -> None:
    verifier, _ = make_verifier(issuer_settings(require_typ_at_jwt=strict_mode), fetcher, clock)
    token = mint(claims(), headers={"typ": typ})
    if strict if strict_mode else lenient:
        assert (await _verify(verifier, token)).subject == "user-1"
    else:
        assert type(await _refusal(verifier, token)) is WrongTokenType


# ---------------------------------------------------------------- check_claims directly

HEADER_AT = {"alg": "ES256", "typ": "at+jwt"}

# (case id, claim overrides, seconds added to now, expected error class or None)
CLAIM_CASES: list[tuple[str, dict[str, Any], float, type[VerifierError] | None]] = [
    ("valid", {}, 0, None),
    ("expired 1 s ago, inside leeway", {"exp": NOW - 1}, 0, None),
    ("expired leeway-1 s ago", {"exp": NOW - LEEWAY + 1}, 0, None),
    ("expired leeway s ago", {"exp": NOW - LEEWAY}, 0, TokenExpired),
    ("expired long ago", {"exp": NOW - 86_400}, 0, TokenExpired),
    ("float exp inside leeway", {"exp": NOW - 29.5}, 0, None),
    ("nbf inside leeway", {"nbf": NOW + LEEWAY}, 0, None),
    ("nbf beyond leeway", {"nbf": NOW + LEEWAY + 1}, 0, TokenNotYetValid),
    ("iat inside leeway", {"iat": NOW + LEEWAY}, 0, None),
    ("iat beyond leeway", {"iat": NOW + LEEWAY + 1}, 0, TokenNotYetValid),
    ("iat a string", {"iat": "yesterday"}, 0, ClaimInvalid),
    ("nbf a boolean", {"nbf": False}, 0, ClaimInvalid),
    ("clock moved past exp", {}, 300 + LEEWAY, TokenExpired),
    ("c_hash means ID token", {"c_hash": "x"}, 0, WrongTokenType),
    ("s_hash means ID token", {"s_hash": "x"}, 0, WrongTokenType),
    ("aud a number", {"aud": 5}, 0, ClaimInvalid),
    ("aud list of non-strings", {"aud": [5, None]}, 0, ClaimInvalid),  # names no audience, as `[]`
    ("client_id not a string and no sub", {"sub": None, "client_id": 5}, 0, ClaimInvalid),
    # An empty `sub` or client names nobody (as an introspection answer's do): no caller to key revocation,
    # rate limits or the upstream's user on.
    ("sub empty and no client", {"sub": "", "client_id": None}, 0, ClaimInvalid),
    ("client_id empty and no sub", {"sub": None, "client_id": ""}, 0, ClaimInvalid),
    ("azp empty and no sub", {"sub": None, "client_id": None, "azp": ""}, 0, ClaimInvalid),
    ("sub empty beside a client", {"sub": "", "client_id": "svc-7"}, 0, None),
]


@pytest.mark.parametrize(
    ("overrides", "later", "error"), [c[1:] for c in CLAIM_CASES], ids=[c[0] for c in CLAIM_CASES]
)
def test_check_claims(settings: IssuerSettings, overrides: dict[str, Any], later: float,
                      error: type[VerifierError] | None) -> None:
    token_claims = claims(**overrides)
    if error is None:
        check_claims(token_claims, HEADER_AT, settings, NOW + later)
    else:
        with pytest.raises(error) as caught:
            check_claims(token_claims, HEADER_AT, settings, NOW + later)
        assert type(caught.value) is error


def test_leeway_comes_from_the_issuer_settings() -> None:
    tight = issuer_settings(leeway_seconds=0)
    with pytest.raises(TokenExpired):
        check_claims(claims(exp=NOW), HEADER_AT, tight, NOW)
    check_claims(claims(exp=NOW + 1), HEADER_AT, tight, NOW)


@pytest.mark.parametrize("exp", [float("nan"), float("inf")], ids=["NaN", "Infinity"])
def test_a_non_finite_exp_is_refused(settings: IssuerSettings, exp: float) -> None:
    with pytest.raises(ClaimInvalid):
        check_claims(claims(exp=exp), HEADER_AT, settings, NOW)


def test_a_nan_nbf_is_refused(settings: IssuerSettings) -> None:
    with pytest.raises(ClaimInvalid):
        check_claims(claims(nbf=float("nan")), HEADER_AT, settings, NOW)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat", "auth_time"])
@pytest.mark.parametrize("value", HOSTILE_NUMBERS, ids=HOSTILE_IDS)
async def test_a_hostile_number_in_a_time_claim_is_a_clean_401(
    verifier: JwtVerifier, mint: Mint, claim: str, value: Any
) -> None:
    """#18 F11: through the real parser (pyjwt writes NaN/Infinity/huge ints literally)."""
    err = await _refusal(verifier, mint(claims(**{claim: value})))
    assert err.outcome is Outcome.UNAUTHENTICATED and err.code == "claim_invalid"
