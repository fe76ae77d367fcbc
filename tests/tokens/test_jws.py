"""verifier.tokens.jws: strict compact-serialization parsing, and the RFC 7515 / 7520 / 8037 vectors."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenkit import MAX_TOKEN_BYTES, Mint, b64, claims, compact

from verifier.errors import AlgorithmRefused, InvalidToken, MalformedToken
from verifier.tokens import jws
from verifier.tokens.keys import parse_jwk

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
VECTORS = sorted((FIXTURES / "rfc7515").glob("*.json")) + sorted((FIXTURES / "rfc7520").glob("*.json"))


def _vector(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_vector_fixtures_are_present() -> None:
    names = {p.name for p in VECTORS}
    assert {"a2_rs256.json", "a3_es256.json", "4_1_rs256.json", "4_3_es512.json",
            "rfc8037_a4_ed25519.json"} <= names


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_rfc_vector_verifies_with_our_key_parser(path: Path) -> None:
    vector = _vector(path)
    key = parse_jwk(vector["jwk"])
    header, payload, signature = vector["compact"].encode("ascii").split(b".")
    assert key.fits(vector["alg"])
    assert key.verify(vector["alg"], header + b"." + payload, jws.b64url_decode(signature))


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_rfc_vector_fails_after_one_flipped_signature_byte(path: Path) -> None:
    vector = _vector(path)
    key = parse_jwk(vector["jwk"])
    header, payload, signature = vector["compact"].encode("ascii").split(b".")
    raw = bytearray(jws.b64url_decode(signature))
    raw[len(raw) // 2] ^= 0x01
    assert not key.verify(vector["alg"], header + b"." + payload, bytes(raw))


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_rfc_vector_fails_with_a_changed_payload(path: Path) -> None:
    vector = _vector(path)
    key = parse_jwk(vector["jwk"])
    header, _payload, signature = vector["compact"].encode("ascii").split(b".")
    tampered = header + b"." + b64(b'{"iss":"mallory"}').encode()
    assert not key.verify(vector["alg"], tampered, jws.b64url_decode(signature))


@pytest.mark.parametrize(
    "path", [p for p in VECTORS if _vector(p)["payload_is_json"]], ids=lambda p: p.stem
)
def test_rfc_vector_with_a_json_payload_parses_strictly(path: Path) -> None:
    vector = _vector(path)
    parsed = jws.parse(vector["compact"], max_bytes=MAX_TOKEN_BYTES)
    assert parsed.alg == vector["alg"]
    assert parsed.payload["iss"] == "joe"
    assert parsed.signing_input == vector["compact"].rsplit(".", 1)[0].encode()


def test_parses_a_pyjwt_token_into_header_payload_and_signature(mint: Mint) -> None:
    token = mint(claims(), "ES256", kid="k1")
    parsed = jws.parse(token, max_bytes=MAX_TOKEN_BYTES)
    assert parsed.alg == "ES256"
    assert parsed.kid == "k1"
    assert parsed.header["typ"] == "at+jwt"
    assert parsed.payload == claims()
    assert parsed.signing_input == token.rsplit(".", 1)[0].encode()
    assert len(parsed.signature) == 64  # raw R || S for P-256


def test_a_kid_with_path_characters_is_kept_verbatim_for_lookup() -> None:
    token = compact({"alg": "ES256", "kid": "../../etc/passwd"}, claims())
    assert jws.parse(token, max_bytes=MAX_TOKEN_BYTES).kid == "../../etc/passwd"


def test_a_token_without_kid_has_kid_none() -> None:
    assert jws.parse(compact({"alg": "ES256"}, claims()), max_bytes=MAX_TOKEN_BYTES).kid is None


HEADER = b64(json.dumps({"alg": "ES256", "kid": "es-1"}).encode())
PAYLOAD = b64(json.dumps(claims()).encode())
SIG = b64(b"s" * 64)
NONE_HEADER = b64(b'{"alg":"none"}')
HEADER_NEEDING_PADDING = b64(b'{"alg":"ES256"}1')
STRING_PAYLOAD = b64(b'"hello"')
ES256_HEADER = json.dumps({"alg": "ES256"})
SURROGATE_KID = b'{"alg":"ES256","kid":"\xed\xa0\x80"}'  # U+D800 as CESU-8: not UTF-8
TWO_HEADERS = ES256_HEADER.encode() + b'{"alg":"none"}'
# U+D800 as a JSON escape: json.loads takes it, but no header, protobuf string or UTF-8 line can carry it.
SURROGATE_ESCAPED_SUB = json.dumps(claims(sub="a\ud800b")).encode()
SURROGATE_ESCAPED_KEY = json.dumps({**claims(), "x\udc00": 1}).encode()
CLAIMS_AND_MORE = json.dumps(claims()).encode() + b" x"
PADDED_HEADER = b' {"alg":"ES256","kid":"k1"} '

# (case id, token, expected error class, message fragment)
MALFORMED: list[tuple[str, str, type[InvalidToken], str]] = [
    ("alg none", compact({"alg": "none"}, claims(), b"x"), AlgorithmRefused, "none"),
    ("alg None", compact({"alg": "None"}, claims(), b"x"), AlgorithmRefused, "none"),
    ("alg NONE", compact({"alg": "NONE"}, claims(), b"x"), AlgorithmRefused, "none"),
    ("alg none with an empty signature", f"{NONE_HEADER}.{PAYLOAD}.", AlgorithmRefused, "none"),
    ("jku header", compact({"alg": "RS256", "jku": "https://evil.test/jwks"}, claims()), AlgorithmRefused, "jku"),
    ("x5u header", compact({"alg": "RS256", "x5u": "https://evil.test/cert"}, claims()), AlgorithmRefused, "x5u"),
    ("embedded jwk header", compact({"alg": "RS256", "jwk": {"kty": "RSA"}}, claims()), AlgorithmRefused, "jwk"),
    ("crit header", compact({"alg": "ES256", "crit": ["exp"], "exp": 1}, claims()), MalformedToken, "critical"),
    ("b64 header", compact({"alg": "ES256", "b64": False}, claims()), MalformedToken, "b64"),
    ("two segments", f"{HEADER}.{PAYLOAD}", MalformedToken, "compact"),
    ("four segments", f"{HEADER}.{PAYLOAD}.{SIG}.{SIG}", MalformedToken, "compact"),
    ("one segment", HEADER, MalformedToken, "compact"),
    ("empty token", "", MalformedToken, ""),
    ("only dots", "..", MalformedToken, ""),
    ("truncated after the header", f"{HEADER}.", MalformedToken, "compact"),
    ("truncated signature of impossible length", f"{HEADER}.{PAYLOAD}.{SIG[:5]}", MalformedToken, "base64"),
    ("empty signature", f"{HEADER}.{PAYLOAD}.", MalformedToken, "empty signature"),
    ("padded base64 signature", f"{HEADER}.{PAYLOAD}.{b64(b'ab')}==", MalformedToken, "base64"),
    ("padded base64 header", f"{HEADER_NEEDING_PADDING}=.{PAYLOAD}.{SIG}", MalformedToken, "base64"),
    ("standard-alphabet plus", f"{HEADER}.{PAYLOAD}.ab+c", MalformedToken, "base64"),
    ("standard-alphabet slash", f"{HEADER}.{PAYLOAD}.ab/c", MalformedToken, "base64"),
    ("space inside a segment", f"{HEADER}.{PAYLOAD[:8]} {PAYLOAD[8:]}.{SIG}", MalformedToken, "base64"),
    ("newline inside a segment", f"{HEADER}.{PAYLOAD}.{SIG[:8]}\n{SIG[8:]}", MalformedToken, "base64"),
    ("non-ASCII character", f"{HEADER}.{PAYLOAD}.{SIG}\u00e9", MalformedToken, "ASCII"),
    ("header not JSON", f"{b64(b'not json')}.{PAYLOAD}.{SIG}", MalformedToken, "header"),
    ("header not UTF-8", f"{b64(bytes([0xFF, 0xFE, 0x7B]))}.{PAYLOAD}.{SIG}", MalformedToken, "header"),
    ("header a JSON array", f"{b64(b'[1,2]')}.{PAYLOAD}.{SIG}", MalformedToken, "object"),
    ("payload a JSON string", f"{HEADER}.{STRING_PAYLOAD}.{SIG}", MalformedToken, "payload"),
    ("payload not JSON", f"{HEADER}.{b64(b'hello')}.{SIG}", MalformedToken, "payload"),
    ("no alg", compact({"kid": "es-1"}, claims()), MalformedToken, "alg"),
    ("alg not a string", compact({"alg": ["ES256"]}, claims()), MalformedToken, "alg"),
    ("alg empty", compact({"alg": ""}, claims()), MalformedToken, "alg"),
    ("kid not a string", compact({"alg": "ES256", "kid": 7}, claims()), MalformedToken, "kid"),
    ("kid empty", compact({"alg": "ES256", "kid": ""}, claims()), MalformedToken, "kid"),
    ("kid too long", compact({"alg": "ES256", "kid": "k" * 257}, claims()), MalformedToken, "kid"),
    ("typ not a string", compact({"alg": "ES256", "typ": 1}, claims()), MalformedToken, "typ"),
    # RFC 7515 section 4: UTF-8 JSON. json.loads would guess UTF-16/32 from the bytes, or pass a lone surrogate.
    ("header in UTF-16", f"{b64(ES256_HEADER.encode('utf-16-le'))}.{PAYLOAD}.{SIG}", MalformedToken, "header"),
    ("header in UTF-32", f"{b64(ES256_HEADER.encode('utf-32-be'))}.{PAYLOAD}.{SIG}", MalformedToken, "header"),
    ("header after a UTF-8 BOM", f"{b64(ES256_HEADER.encode('utf-8-sig'))}.{PAYLOAD}.{SIG}", MalformedToken, "header"),
    ("lone surrogate in the header", f"{b64(SURROGATE_KID)}.{PAYLOAD}.{SIG}", MalformedToken, "header"),
    ("escaped lone surrogate in a claim", f"{HEADER}.{b64(SURROGATE_ESCAPED_SUB)}.{SIG}", MalformedToken, "payload"),
    ("escaped lone surrogate in a name", f"{HEADER}.{b64(SURROGATE_ESCAPED_KEY)}.{SIG}", MalformedToken, "payload"),
    ("a second header after the first", f"{b64(TWO_HEADERS)}.{PAYLOAD}.{SIG}", MalformedToken, "header"),
    ("data after the claims", f"{HEADER}.{b64(CLAIMS_AND_MORE)}.{SIG}", MalformedToken, "payload"),
    ("header with a value cut short", f"{b64(ES256_HEADER[:12].encode())}.{PAYLOAD}.{SIG}", MalformedToken, "header"),
    ("padding inside a segment", f"{HEADER}.{PAYLOAD[:8]}={PAYLOAD[9:]}.{SIG}", MalformedToken, "base64"),
    ("tab inside a segment", f"{HEADER}.{PAYLOAD}.{SIG[:8]}\t{SIG[8:]}", MalformedToken, "base64"),
    ("NUL inside a segment", f"{HEADER}.{PAYLOAD}.{SIG[:8]}\x00{SIG[8:]}", MalformedToken, "base64"),
]


@pytest.mark.parametrize(("token", "error", "fragment"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_parse_refuses_hostile_input(token: str, error: type[InvalidToken], fragment: str) -> None:
    with pytest.raises(error) as caught:
        jws.parse(token, max_bytes=MAX_TOKEN_BYTES)
    assert type(caught.value) is error
    assert caught.value.code == error.code
    assert fragment in str(caught.value)


def test_an_escaped_surrogate_pair_is_one_character_and_parses() -> None:
    """Only a lone surrogate is refused: a pair (an emoji, as json.dumps escapes it) is valid Unicode."""
    payload = json.dumps(claims(name="smile \U0001f600", note="\\ud800 is text here")).encode()
    assert b"\\ud83d\\ude00" in payload
    parsed = jws.parse(f"{HEADER}.{b64(payload)}.{SIG}", max_bytes=MAX_TOKEN_BYTES)
    assert parsed.payload["name"] == "smile \U0001f600"
    assert parsed.payload["note"] == "\\ud800 is text here"


def test_white_space_around_the_json_is_still_json() -> None:
    """RFC 8259 allows white space around a value: such a header parses as json.loads would parse it."""
    payload = json.dumps(claims()).encode() + b"\n"
    token = f"{b64(PADDED_HEADER)}.{b64(payload)}.{SIG}"
    parsed = jws.parse(token, max_bytes=MAX_TOKEN_BYTES)
    assert (parsed.alg, parsed.kid, parsed.payload) == ("ES256", "k1", claims())


def test_alg_none_is_refused_with_the_stable_code() -> None:
    with pytest.raises(AlgorithmRefused) as caught:
        jws.parse(compact({"alg": "nOnE"}, claims()), max_bytes=MAX_TOKEN_BYTES)
    assert caught.value.code == "algorithm_refused"


def test_a_huge_token_is_refused_before_any_parsing() -> None:
    # Garbage that would fail every later check: only the size check can produce this message.
    with pytest.raises(MalformedToken, match="too large"):
        jws.parse("!" * (MAX_TOKEN_BYTES + 1), max_bytes=MAX_TOKEN_BYTES)


def test_a_valid_token_one_byte_over_the_bound_is_refused(mint: Mint) -> None:
    token = mint(claims())
    with pytest.raises(MalformedToken, match="too large"):
        jws.parse(token, max_bytes=len(token) - 1)
    assert jws.parse(token, max_bytes=len(token)).alg == "ES256"


def test_deeply_nested_json_header_is_malformed_not_a_crash() -> None:
    header = b64(b"[" * 50_000 + b"]" * 50_000)
    with pytest.raises(MalformedToken):
        jws.parse(f"{header}.{PAYLOAD}.{SIG}", max_bytes=1 << 20)


@pytest.mark.parametrize(
    ("segment", "decoded"),
    [(b"", b""), (b"YQ", b"a"), (b"YWI", b"ab"), (b"YWJj", b"abc"), (b"-_8", b"\xfb\xff")],
)
def test_b64url_decode_accepts_unpadded_base64url(segment: bytes, decoded: bytes) -> None:
    assert jws.b64url_decode(segment) == decoded


@pytest.mark.parametrize("segment", [b"YQ==", b"Y", b"YWJjZ", b"ab+/", b"a b", b"YQ=", b"\xc3\xa9"])
def test_b64url_decode_refuses_padding_bad_lengths_and_foreign_characters(segment: bytes) -> None:
    with pytest.raises(MalformedToken):
        jws.b64url_decode(segment)


@pytest.mark.parametrize("data", [b"", b"\x00", b"\xff\xfe", b"hello world", bytes(range(256))])
def test_b64url_encode_round_trips_without_padding(data: bytes) -> None:
    encoded = jws.b64url_encode(data)
    assert "=" not in encoded
    assert jws.b64url_decode(encoded.encode()) == data


@pytest.mark.parametrize(
    ("token", "expected"),
    [("eyJh.eyJ.sig", True), ("abc.def.ghi", False), ("eyJhbGc", False), ("eyJ.a.b.c", False), ("", False)],
)
def test_looks_like_jws_routes_on_shape(token: str, expected: bool) -> None:
    assert jws.looks_like_jws(token) is expected


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_parse_raises_only_our_errors_on_arbitrary_text(token: str) -> None:
    with contextlib.suppress(MalformedToken, AlgorithmRefused):
        jws.parse(token, max_bytes=MAX_TOKEN_BYTES)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["alg", "kid", "typ", "crit", "jku", "x5c", "cty", "b64"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20), st.lists(st.text(max_size=5))),
    ),
    st.binary(max_size=80),
)
def test_parse_raises_only_our_errors_on_arbitrary_headers(header: dict[str, Any], signature: bytes) -> None:
    try:
        parsed = jws.parse(compact(header, claims(), signature), max_bytes=MAX_TOKEN_BYTES)
    except (MalformedToken, AlgorithmRefused):
        return
    assert isinstance(parsed.alg, str) and parsed.alg.lower() != "none"
    assert parsed.signature == signature
