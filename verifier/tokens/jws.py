"""JWS Compact Serialization (RFC 7515 section 7.1), parsed strictly and without verifying anything.

Strict means: exactly three base64url segments with no padding and no stray characters, a JSON object
header and payload, a bounded size, and refusal of header parameters that would make us fetch or trust
a key named by the token itself (`jku`, `x5u`, `jwk`; RFC 8725 section 3.10) or that we do not
understand (`crit`, RFC 7515 section 4.1.11).

Repeated member names are read as the last one, deliberately. RFC 7515 section 4 (and RFC 7519 section 4 for a
JWT's claims) lets a JWS reader "either reject JWSs with duplicate Header Parameter names or use a JSON parser that
returns only the lexically last duplicate member name"; `json.loads` is such a parser. Everything parsed here is
the provider's: access tokens, logout tokens and SETs are signed by the issuer with a key from its JWKS, so the
issuer, not the client holding the token, chose every byte, and a reader elsewhere that takes the first member
would have to be fooled by the issuer itself. The access-token parse is the hot path (`_scan` is the C scanner;
an `object_pairs_hook` would cost a Python call per object on every first-seen token). What section 5.2 step 3
asks ("a UTF-8-encoded representation of a completely valid JSON object") holds all the same: UTF-16/32 fail
the UTF-8 decode, a BOM fails the scan (`json.loads` refuses one in text), and NaN/Infinity, which Python reads
though RFC 8259 section 6 has no such number, reach no decision: every claim read as a number goes through
`verifier.numbers.json_number`, which refuses them. Introspection answers (`introspection_client`) are the
provider's too, read alike. Client-made JSON (DPoP proofs, WebAuthn assertions and clientDataJSON, request bodies)
is read one way only: `verifier.strict_json`.
"""

from __future__ import annotations

import base64
import binascii
import json
import json.scanner
import re
import types
from collections.abc import Mapping
from typing import Any, NamedTuple

from verifier.errors import AlgorithmRefused, MalformedToken

_TO_BASE64 = bytes.maketrans(b"-_", b"+/")  # base64url's two characters back to base64's
_PADDING = (b"", b"=", b"==", b"=")  # by length mod 4 (a length of 4n+1 is refused by the decoder)
_scan = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]  # json.loads's C scanner
# Header parameters that point at a key chosen by the sender: never followed, so never accepted.
_KEY_BY_REFERENCE = ("jku", "x5u", "jwk")  # x5c is ignored: we never read keys from tokens
# A \uD800-\uDFFF escape: half of a surrogate pair, or a lone surrogate (json.loads takes one; I-JSON, RFC 7493
# section 2.1, forbids it). A lone one cannot be written as UTF-8: not in a header, a protobuf string, a bucket key.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
MAX_KID_LENGTH = 256  # characters; kids are short identifiers, never documents
MAX_KEPT_HEADERS = 256  # distinct header segments remembered (an issuer signs with a few keys and algs)


class CompactJWS(NamedTuple):
    """A parsed but unverified JWS.

    A NamedTuple rather than a frozen dataclass (like `RequestAttributes`): one is built for every first-seen
    token, and a frozen dataclass's `__init__` (one `object.__setattr__` per field) costs ~4x a tuple's.
    """

    header: Mapping[str, Any]  # read-only: a remembered header is shared by every token that carries it
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes
    alg: str  # the `alg` header (a non-empty string, never `none`)
    kid: str | None  # the `kid` header, if any (a non-empty string of at most MAX_KID_LENGTH)
    header_segment: bytes  # the header as sent (base64url): the key of the header memo (`remember`)


_Header = tuple[Mapping[str, Any], str, str | None]  # the parsed header, its alg and its kid
# Header segments -> what `_header` made of them. The parse of a segment is a function of its bytes alone,
# so a token whose header segment is byte for byte one seen before gets the same header, alg and kid without
# decoding, parsing and checking it again: a different alg, kid or parameter (`crit`, `jku`, ...) is a
# different segment, parsed and checked on its own. Only segments of tokens whose signature verified are
# kept (`remember`), so a sender cannot fill the memo with headers of their own; bounded all the same.
_HEADERS: dict[bytes, _Header] = {}


def b64url_decode(segment: bytes) -> bytes:
    """Decodes unpadded base64url strictly (RFC 7515 section 2), raising `MalformedToken`."""
    # The three characters of base64 that base64url does not have (padding included) are refused here;
    # the strict decoder refuses every other character outside the alphabet, and a 4n+1 length.
    if b"=" in segment or b"+" in segment or b"/" in segment:
        raise MalformedToken("invalid base64url")
    try:
        return binascii.a2b_base64(segment.translate(_TO_BASE64) + _PADDING[len(segment) % 4], strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedToken("invalid base64url") from exc


def b64url_encode(data: bytes) -> str:
    """Encodes base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")  # RFC 7515 section 4: the header (and a JWT's claims) are UTF-8 JSON
        try:
            value, end = _scan(text, 0)
        except StopIteration:  # not a JSON value at offset 0 (leading white space, garbage): json.loads says
            end = -1
        if end != len(text):  # anything after the value: json.loads allows white space, refuses the rest
            value = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedToken(f"{what} is not JSON") from exc
    if not isinstance(value, dict):
        raise MalformedToken(f"{what} is not a JSON object")
    if "\\u" in text and lone_surrogate(text, value):
        raise MalformedToken(f"{what} holds a lone surrogate (not Unicode text)")
    return value


def lone_surrogate(text: str, value: Any) -> bool:
    """Whether `value`, decoded from the JSON `text`, holds a lone surrogate (an escaped `\\ud800` unpaired)."""
    if _SURROGATE_ESCAPE.search(text) is None:  # the common case: no surrogate escape at all
        return False
    return holds_lone_surrogate(value)


def holds_lone_surrogate(value: Any) -> bool:
    """Whether decoded JSON `value` holds a lone surrogate anywhere (a name or a string): not Unicode text."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # a pair decodes to one character: encodes
    except (UnicodeEncodeError, ValueError, RecursionError):  # nested too deep to tell: refused all the same
        return True
    return False


def parse(token: str, *, max_bytes: int) -> CompactJWS:
    """Parses a compact JWS; raises `MalformedToken` or `AlgorithmRefused`."""
    if len(token) > max_bytes:
        raise MalformedToken("token too large")
    try:
        raw = token.encode("ascii")
    except UnicodeEncodeError as exc:
        raise MalformedToken("token is not ASCII") from exc
    parts = raw.split(b".")
    if len(parts) != 3:
        raise MalformedToken("not a JWS compact serialization")
    header, alg, kid = _HEADERS.get(parts[0]) or _header(parts[0])
    payload = _json_object(b64url_decode(parts[1]), "payload")
    signature = b64url_decode(parts[2])
    if not signature:
        raise MalformedToken("empty signature")
    return CompactJWS(header, payload, parts[0] + b"." + parts[1], signature, alg, kid, parts[0])


def _header(segment: bytes) -> _Header:
    """A JOSE header segment decoded, parsed and checked; raises `MalformedToken` or `AlgorithmRefused`."""
    header = _json_object(b64url_decode(segment), "header")
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise MalformedToken("header has no alg")
    if alg.lower() == "none":
        raise AlgorithmRefused("alg none is never accepted")
    for name in _KEY_BY_REFERENCE:
        if name in header:
            raise AlgorithmRefused(f"header parameter {name} is not accepted")
    if "crit" in header:
        raise MalformedToken("unsupported critical header")
    if "b64" in header:  # RFC 7797 unencoded payloads are only valid with crit, refused above
        raise MalformedToken("unsupported header b64")
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or not kid or len(kid) > MAX_KID_LENGTH):
        raise MalformedToken("invalid kid")
    typ = header.get("typ")
    if typ is not None and not isinstance(typ, str):
        raise MalformedToken("invalid typ")
    return header, alg, kid


def remember(parsed: CompactJWS) -> None:
    """Keeps the header of a token whose signature verified, for the next token with the same header segment
    (see `_HEADERS`); its header is from then on shared, and read-only."""
    segment = parsed.header_segment
    if segment not in _HEADERS and len(_HEADERS) < MAX_KEPT_HEADERS:
        _HEADERS[segment] = (types.MappingProxyType(dict(parsed.header)), parsed.alg, parsed.kid)


JWS_START = "eyJ"  # base64url of `{"`: how every JOSE header segment starts


def looks_like_jws(token: str) -> bool:
    """Cheap routing test: two dots and a JSON-object header (`eyJ` is base64url of `{"`)."""
    return token.count(".") == 2 and token.startswith(JWS_START)
