"""DPoP proofs at a resource server (RFC 9449 section 4.3 and section 7), and JWK thumbprints (RFC 7638).

A DPoP proof is a JWS whose header carries the public key that signs it. That is exactly what
`verifier.tokens.jws.parse` refuses for access tokens (RFC 8725 section 3.10), so the proof is parsed
here, strictly and within a size bound: the key in the header is trusted only to show possession, and
is then pinned to the access token through `cnf.jkt` (RFC 9449 section 6.1).

Replay (section 11.1): each proof's `jti` is remembered in `SharedState` for as long as its `iat`
could still be accepted on any replica (`DpopConfig.jti_ttl`: until `iat + iat_past_seconds`, and
`iat_future_seconds` more for a replica whose clock lags), keyed by a hash of the key thumbprint and the
`jti`, so every replica refuses a second use. Server nonces (section 9) are stateless: an issue time and
an HMAC over it, so any replica holding the shared secret can check a nonce another replica issued.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
import struct
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import rsa

from verifier import strict_json
from verifier.clock import Clock
from verifier.config.dpop import DpopConfig
from verifier.errors import ClaimInvalid, InvalidDpopProof, MalformedToken, SenderConstraintFailed, UseDpopNonce
from verifier.numbers import json_number
from verifier.request import DEFAULT_PORTS
from verifier.state.base import Purpose, SharedState
from verifier.tokens.jws import b64url_decode, b64url_encode
from verifier.tokens.keys import KeyError_, VerificationKey, parse_jwk

MAX_JTI_LENGTH = 256  # characters; a jti is a random identifier, never a document

DPOP_TYP = "dpop+jwt"
# Read once: `Purpose.DPOP` is a class attribute lookup through EnumType, ~100 ns on every proof (timeit).
_PURPOSE = Purpose.DPOP
# JWK members that only a private or symmetric key has; a proof's key must be public.
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
# RFC 7638 section 3.2: the members that make up the thumbprint, per key type.
_THUMBPRINT_MEMBERS: dict[str, tuple[str, ...]] = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "oct": ("k", "kty"),
}
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_NONCE_VERSION = b"\x01"
_NONCE_MAC_BYTES = 16  # 128-bit tag: forging one is out of reach, and the nonce stays short
# A nonce older than this share of its lifetime is renewed on the allow (section 8.2): a client that keeps
# using the DPoP-Nonce it is given never meets the use_dpop_nonce 401, and a young nonce costs no header.
_RENEW_AFTER_LIFETIME_SHARE = 0.5
# A proof's key is the presenter's choice, and its signature is checked before anything ties the key to the token: an
# RSA check's cost grows with the modulus and the exponent (a 3072-bit exponent costs ~7 ms a proof, a 16384-bit
# modulus ~5 ms: 200 times an RSA-2048 proof, for anyone holding any DPoP-bound token). Past these, refused unverified.
MAX_PROOF_RSA_BITS = 4096  # bits of modulus: the largest RSA key clients make proofs with (~2.5 KiB a proof)
MAX_PROOF_RSA_EXPONENT_BITS = 33  # bits of public exponent: clients use 65537 (BoringSSL bounds e the same way)
# Proof keys parsed, by the JWK's whole content: a client signs every proof with the same key, and parsing it
# (the curve point checked) and its thumbprint cost ~23 us a proof. A flood of new keys only evicts entries.
PROOF_KEYS_HELD = 1024


def malformed_binding() -> ClaimInvalid:
    """The refusal of a token whose `cnf` has a `jkt` that is not a non-empty string (null, "", a number): it binds
    to no key, so it is a malformed binding (401 `claim_invalid`, RFC 6750 `invalid_token`), never an unbound token
    to be taken as a bearer one, nor a bound one whose proof is looked at. The one rule of the DPoP check
    (`verifier.checks.dpop`) and of `DpopVerifier.verify`."""
    return ClaimInvalid("token cnf.jkt is not a key thumbprint", claim="cnf")


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 JWK SHA-256 thumbprint, base64url: required members only, canonical JSON.

    Raises `ValueError` for an unknown key type or a missing or non-string required member.
    """
    kty = jwk.get("kty")
    members = _THUMBPRINT_MEMBERS.get(kty) if isinstance(kty, str) else None
    if members is None:
        raise ValueError(f"no thumbprint for kty {kty!r}")
    required: dict[str, str] = {}
    for name in members:  # already in lexicographic order (section 3.3)
        value = jwk.get(name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"JWK member {name} is missing")
        required[name] = value
    canonical = json.dumps(required, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    return b64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest())


def access_token_hash(access_token: str) -> str:
    """`ath` (RFC 9449 section 4.2): base64url of the SHA-256 of the token (ASCII, by RFC 6750 syntax)."""
    return b64url_encode(hashlib.sha256(access_token.encode("utf-8", "surrogatepass")).digest())


def normalize_htu(url: str) -> str:
    """The URL as `htu` compares it (RFC 9449 section 4.3 step 9, RFC 3986 sections 6.2.2 and 6.2.3).

    Scheme and host lower-cased (one trailing dot dropped), the default port dropped, an empty path
    made `/`, percent-encodings upper-cased and unreserved characters decoded, dot segments removed;
    query and fragment dropped.
    Raises `ValueError` for anything but an absolute http(s) URL.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError("not a URL") from exc
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if host.endswith("."):
        host = host[:-1]  # the same absolute name, as the doors spell the request's host (normalize_host)
    if scheme not in DEFAULT_PORTS or not host:
        raise ValueError("not an absolute http(s) URL")
    if ":" in host:
        host = f"[{host}]"
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + host
    if port is not None and port != DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    path = _remove_dot_segments(_PERCENT.sub(_normalize_escape, parts.path) or "/")
    return f"{scheme}://{netloc}{path}"


def _origin(normalized: str) -> str:
    """`scheme://host[:port]` of a `normalize_htu` result (userinfo kept: no configured origin has one)."""
    return normalized[: normalized.index("/", normalized.index("://") + 3)]


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 for an absolute path; unlike `posixpath.normpath`, keeps `//`."""
    segments = path.split("/")[1:]
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")  # "/a/b/.." names the directory "/a/"
    return "/" + "/".join(out)


def _normalize_escape(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


@dataclasses.dataclass(frozen=True, slots=True)
class _Proof:
    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    """A proof's header or claims: client-made and client-signed, so read one way only (`verifier.strict_json`):
    a proof naming `htu` (or `jwk`, `jti`) twice, in UTF-16 or with a BOM, or holding NaN is refused, not read
    as its last member says while a WAF or an upstream checking the same proof reads the first; one holding a
    lone surrogate (a `jti` of `"\\ud800"`, no Unicode text) is refused too."""
    try:
        value = strict_json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidDpopProof(f"DPoP proof {what} is not JSON read one way (RFC 8259)") from exc
    if not isinstance(value, dict):
        raise InvalidDpopProof(f"DPoP proof {what} is not a JSON object")
    return value


def _parse_proof(proof: str, max_bytes: int) -> _Proof:
    """Strict compact JWS parsing that, unlike `jws.parse`, expects a `jwk` header."""
    if len(proof) > max_bytes:
        raise InvalidDpopProof("DPoP proof too large")
    try:
        raw = proof.encode("ascii")
        segments = raw.split(b".")
        if len(segments) != 3:
            raise InvalidDpopProof("DPoP proof is not a JWS compact serialization")
        header_raw, claims_raw, signature = (b64url_decode(s) for s in segments)
    except (UnicodeEncodeError, MalformedToken) as exc:
        raise InvalidDpopProof("DPoP proof is not a JWS compact serialization") from exc
    if not signature:
        raise InvalidDpopProof("DPoP proof has an empty signature")
    header = _json_object(header_raw, "header")
    claims = _json_object(claims_raw, "claims")
    return _Proof(header, claims, segments[0] + b"." + segments[1], signature)


class AcceptedProof(NamedTuple):
    """What `DpopVerifier.verify` learned from a proof it accepted: its key's RFC 7638 thumbprint, and when
    the server nonce it carries was issued (seconds since the epoch; None unless nonces are required), which
    is all `DpopVerifier.renewed_nonce` needs (the proof is parsed once)."""

    jkt: str
    nonce_issued_at: float | None = None


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def _held_as(jwk: dict[str, Any]) -> tuple[tuple[str, str], ...] | None:
    """The key a parsed proof key is held under: every member, sorted; None when a member is not a string
    (`key_ops` is a list: such a key is parsed every time)."""
    items = tuple(sorted(jwk.items()))
    return items if all(type(value) is str for _, value in items) else None


def _parse_proof_key(jwk: dict[str, Any]) -> tuple[VerificationKey, str]:
    """A proof's public key and its RFC 7638 thumbprint; raises `InvalidDpopProof` (step 7)."""
    if any(name in jwk for name in _PRIVATE_MEMBERS):
        raise InvalidDpopProof("DPoP proof jwk holds private key material")
    try:
        key = parse_jwk(jwk)
        jkt = thumbprint(jwk)
    except (KeyError_, ValueError) as exc:
        raise InvalidDpopProof("DPoP proof jwk is not a usable public key") from exc
    if isinstance(key.key, rsa.RSAPublicKey) and (
        key.key.key_size > MAX_PROOF_RSA_BITS or key.key.public_numbers().e.bit_length() > MAX_PROOF_RSA_EXPONENT_BITS
    ):
        raise InvalidDpopProof("DPoP proof jwk is an RSA key too large to verify")
    return key, jkt


class DpopVerifier:
    """Checks DPoP proofs for requests that carry a DPoP-bound access token."""

    def __init__(self, config: DpopConfig, state: SharedState, clock: Clock) -> None:
        self._config = config
        self._state = state
        self._clock = clock
        self._algorithms = frozenset(config.algorithms)
        self._origins = frozenset(config.origins)  # empty: any origin the gateway reports
        self._keys: dict[tuple[tuple[str, str], ...], tuple[VerificationKey, str]] = {}  # oldest first

    @property
    def config(self) -> DpopConfig:
        """The settings this verifier was built with."""
        return self._config

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The proof algorithms accepted, in configured order (the challenge's `algs`, section 7.1)."""
        return self._config.algorithms

    def issue_nonce(self) -> str:
        """A fresh server nonce (RFC 9449 section 9) for a `DPoP-Nonce` response header."""
        if not self._config.nonce_secret:
            raise RuntimeError("no nonce secret configured")
        issued_ms = struct.pack(">Q", int(self._clock.now() * 1000))
        body = _NONCE_VERSION + issued_ms
        return b64url_encode(body + self._nonce_mac(body))

    def _nonce_mac(self, body: bytes) -> bytes:
        return hmac.new(self._config.nonce_secret, b"dpop-nonce:" + body, hashlib.sha256).digest()[:_NONCE_MAC_BYTES]

    def _nonce_issued_at(self, nonce: Any) -> float | None:
        """When one of our nonces was issued (seconds since the epoch); None for anything that is not ours."""
        if not isinstance(nonce, str) or len(nonce) > 64:
            return None
        try:
            raw = b64url_decode(nonce.encode("ascii"))
        except (UnicodeEncodeError, MalformedToken):
            return None
        if len(raw) != 1 + 8 + _NONCE_MAC_BYTES or raw[:1] != _NONCE_VERSION:
            return None
        body, mac = raw[:9], raw[9:]
        if not hmac.compare_digest(mac, self._nonce_mac(body)):
            return None
        issued_ms: int = struct.unpack(">Q", body[1:])[0]
        return issued_ms / 1000

    def _fresh_nonce_issued_at(self, nonce: Any) -> float | None:
        """When a fresh nonce of ours was issued; None for a stale one or one that is not ours."""
        issued_at = self._nonce_issued_at(nonce)
        if issued_at is None:
            return None
        age = self._clock.now() - issued_at
        # a nonce from a replica whose clock runs a little ahead is still ours
        fresh = -self._config.iat_future_seconds <= age <= self._config.nonce_lifetime_seconds
        return issued_at if fresh else None

    def renewed_nonce(self, accepted: AcceptedProof) -> str | None:
        """The next nonce for the allow's `DPoP-Nonce` (section 8.2), when the proof `verify` accepted carries
        one past half its lifetime; None otherwise (nonces not required, a young nonce)."""
        if accepted.nonce_issued_at is None:  # nonces not required
            return None
        age = self._clock.now() - accepted.nonce_issued_at
        if age <= self._config.nonce_lifetime_seconds * _RENEW_AFTER_LIFETIME_SHARE:
            return None
        return self.issue_nonce()

    async def verify(
        self,
        proof: str | None,
        *,
        method: str,
        url: str,
        access_token: str,
        expected_jkt: str | None,
    ) -> AcceptedProof:
        """Checks one proof (RFC 9449 section 4.3) and returns its key's RFC 7638 thumbprint (with when its
        server nonce was issued, for `renewed_nonce`).

        `proof` is the raw `DPoP` header value (None when absent; several headers joined with commas
        count as several proofs); `url` is the request's absolute URL (query and fragment ignored);
        `expected_jkt` is the token's `cnf.jkt`, or None when the token is not DPoP-bound (then the
        caller decides what an unbound token presented with a proof means; RFC 9449 section 7.2); an empty
        one is a malformed binding (`malformed_binding`: `ClaimInvalid`).

        Raises `InvalidDpopProof` for a missing, malformed, mis-signed, stale, mismatched or replayed
        proof; `UseDpopNonce` (carrying a fresh nonce) when a server nonce is required and missing or
        stale; `SenderConstraintFailed` when a good proof's key is not the one the token is bound to;
        `StateUnavailable` when replay cannot be checked (fail closed), its `ReplayStoreFull` when the local
        replay store's DPoP part is full of live jtis (503 "try again" with the seconds until it has room:
        the proof is not called a replay).
        """
        config = self._config
        if expected_jkt is not None and (not isinstance(expected_jkt, str) or not expected_jkt):
            raise malformed_binding()  # "" binds to no key: refused before the proof is looked at
        if proof is None or not proof.strip():
            raise InvalidDpopProof("DPoP proof missing")
        proof = proof.strip()
        if "," in proof:
            raise InvalidDpopProof("more than one DPoP proof")  # section 4.3 step 1
        parsed = _parse_proof(proof, config.max_proof_bytes)
        header, claims = parsed.header, parsed.claims

        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() != DPOP_TYP:  # step 4; media types ignore case
            raise InvalidDpopProof("DPoP proof typ is not dpop+jwt")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:  # step 5: never none, never a MAC
            raise InvalidDpopProof("DPoP proof alg is not allowed")
        if "crit" in header:
            raise InvalidDpopProof("DPoP proof has an unsupported critical header")
        key, jkt = self._proof_key(header.get("jwk"), alg)  # step 7
        if not key.verify(alg, parsed.signing_input, parsed.signature):  # step 6
            raise InvalidDpopProof("DPoP proof signature does not verify")

        jti = claims.get("jti")  # step 3: required claims
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_LENGTH:
            raise InvalidDpopProof("DPoP proof jti missing or invalid")
        htm = claims.get("htm")
        if not isinstance(htm, str) or htm != method:  # step 8: methods are case-sensitive
            raise InvalidDpopProof("DPoP proof htm does not match the request method")
        htu = claims.get("htu")
        matched = self._matched_htu(htu, url) if isinstance(htu, str) else None
        if matched is None:  # step 9
            raise InvalidDpopProof("DPoP proof htu does not match the request URL")
        if self._origins and _origin(matched) not in self._origins:  # step 9: the URI of *this* server
            raise InvalidDpopProof("DPoP proof htu is not on an origin of this resource server")
        ath = claims.get("ath")
        if not isinstance(ath, str) or not _equal(ath, access_token_hash(access_token)):  # step 11
            raise InvalidDpopProof("DPoP proof ath does not match the access token")

        nonce_issued_at = None
        if config.require_nonce:  # step 10
            nonce_issued_at = self._fresh_nonce_issued_at(claims.get("nonce"))
            if nonce_issued_at is None:
                raise UseDpopNonce("DPoP proof needs a fresh server nonce", nonce=self.issue_nonce())
        iat = json_number(claims.get("iat"))
        if iat is None:  # 10**400 overflowed math.isfinite (503 and a traceback)
            raise InvalidDpopProof("DPoP proof iat missing or invalid")
        now = self._clock.now()
        if iat < now - config.iat_past_seconds:  # step 11 (time window)
            raise InvalidDpopProof("DPoP proof is too old")
        if iat > now + config.iat_future_seconds:
            raise InvalidDpopProof("DPoP proof iat is in the future")

        if expected_jkt is not None and not _equal(expected_jkt, jkt):  # step 12, section 6.1
            raise SenderConstraintFailed("DPoP proof key is not the key the token is bound to")

        # Last, so a proof that fails any other check does not use up its jti. The key is a hash:
        # bounded length, and no client-chosen text in shared state.
        digest = hashlib.sha256(f"{jkt}\x00{jti}".encode("utf-8", "surrogatepass")).digest()
        once = "dpop:jti:" + b64url_encode(digest)
        if not await self._state.first_use(once, config.jti_ttl(iat, now), purpose=_PURPOSE):
            raise InvalidDpopProof("DPoP proof replayed")
        return AcceptedProof(jkt, nonce_issued_at)

    def _proof_key(self, jwk: Any, alg: str) -> tuple[VerificationKey, str]:
        if not isinstance(jwk, dict):
            raise InvalidDpopProof("DPoP proof has no jwk header")
        held = _held_as(jwk)
        parsed = self._keys.get(held) if held is not None else None
        if parsed is None:
            parsed = _parse_proof_key(jwk)
            if held is not None:
                if len(self._keys) >= PROOF_KEYS_HELD:
                    del self._keys[next(iter(self._keys))]
                self._keys[held] = parsed
        if not parsed[0].fits(alg):
            raise InvalidDpopProof("DPoP proof alg does not fit its jwk")
        return parsed

    @staticmethod
    def _matched_htu(htu: str, url: str) -> str | None:
        """The normalized `htu` when it matches the request's URL; None otherwise."""
        try:
            normalized = normalize_htu(htu)
            return normalized if normalized == normalize_htu(url) else None
        except ValueError:
            return None
