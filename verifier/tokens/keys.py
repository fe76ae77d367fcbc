"""JSON Web Keys (RFC 7517) parsed once into verification keys, with algorithm/key-type pinning.

A key is usable for an `alg` only when the key's type and curve fit it (RFC 8725 section 3.1):
an RSA key never verifies an ES256 token, an EC P-256 key never an ES384 token, and no symmetric
(`oct`) key is ever loaded from a JWKS, which closes the HS256-with-public-key confusion for good.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, RSAPSSAlgorithm
from jwt.exceptions import InvalidKeyError

# alg -> (kty, crv or None)
ALG_KEY_TYPES: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),  # Ed25519 or Ed448
}


def _der_integer(big_endian: bytes) -> bytes:
    """An unsigned big-endian number as a DER INTEGER (X.690 8.3): no leading zero bytes, but one when the
    first byte's high bit is set (it would read as negative); zero is one 0x00 byte. At most 67 bytes (P-521)."""
    value = big_endian.lstrip(b"\x00")
    if not value or value[0] & 0x80:
        value = b"\x00" + value
    return b"\x02" + bytes((len(value),)) + value


def der_signature(raw: bytes, size: int) -> bytes:
    """R || S (each `size` bytes) as the DER `Ecdsa-Sig-Value` SEQUENCE that OpenSSL verifies (RFC 3279
    section 2.2.3): cryptography's `encode_dss_signature` byte for byte, without two Python ints between."""
    body = _der_integer(raw[:size]) + _der_integer(raw[size:])
    length = len(body)  # at most 138 (P-521): the long form's one length byte when past 127
    return (b"\x30" + bytes((length,)) if length < 0x80 else b"\x30\x81" + bytes((length,))) + body


class _Ecdsa:
    """RFC 7518 section 3.4: ECDSA over a JWS's fixed-size R || S, checked by cryptography directly.

    What PyJWT's `ECAlgorithm.verify` does, without its per-call objects: the signature must be exactly
    twice the curve's size in bytes (a DER signature, or R || S with a byte dropped or added, is refused),
    and the hash object is built once.
    """

    def __init__(self, hash_algorithm: hashes.HashAlgorithm, size: int) -> None:
        self._ecdsa = ec.ECDSA(hash_algorithm)
        self._size = size  # bytes of R (and of S): P-256 32, P-384 48, P-521 66

    def verify(self, msg: bytes, key: ec.EllipticCurvePublicKey, sig: bytes) -> bool:
        size = self._size
        if len(sig) != 2 * size:
            return False
        try:
            key.verify(der_signature(sig, size), msg, self._ecdsa)
        except InvalidSignature:
            return False
        return True


_VERIFIERS: dict[str, Any] = {
    "RS256": RSAAlgorithm(RSAAlgorithm.SHA256),
    "RS384": RSAAlgorithm(RSAAlgorithm.SHA384),
    "RS512": RSAAlgorithm(RSAAlgorithm.SHA512),
    "PS256": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA256),
    "PS384": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA384),
    "PS512": RSAPSSAlgorithm(RSAPSSAlgorithm.SHA512),
    "ES256": _Ecdsa(hashes.SHA256(), 32),
    "ES384": _Ecdsa(hashes.SHA384(), 48),
    "ES512": _Ecdsa(hashes.SHA512(), 66),
    "EdDSA": OKPAlgorithm(),
}

MIN_RSA_BITS = 2048  # RFC 7518 section 3.3: smaller RSA keys are refused


class KeyError_(ValueError):
    """A JWK that cannot be used (wrong type, private material, weak)."""


@dataclasses.dataclass(frozen=True, slots=True)
class VerificationKey:
    """A parsed public key with what it may verify."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None  # the JWK's own `alg`, if it names one: then only that alg may use it
    key: Any  # a cryptography public key object

    def fits(self, alg: str) -> bool:
        """Whether this key may verify a signature made with `alg`."""
        if self.alg is not None and self.alg != alg:
            return False
        want = ALG_KEY_TYPES.get(alg)
        if want is None or want[0] != self.kty:
            return False
        return want[1] is None or want[1] == self.crv

    def verify(self, alg: str, signing_input: bytes, signature: bytes) -> bool:
        """Checks a signature; callers have already checked `fits(alg)`."""
        verifier = _VERIFIERS.get(alg)
        if verifier is None:  # an alg no key verifies (HS256, none, ...): never a pass, never a crash
            return False
        try:
            return bool(verifier.verify(signing_input, self.key, signature))
        except (ValueError, TypeError, InvalidKeyError):  # malformed signature bytes: just a bad signature
            return False


def parse_jwk(jwk: Mapping[str, Any]) -> VerificationKey:
    """Parses one public JWK for signature verification, or raises `KeyError_`."""
    kty = jwk.get("kty")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise KeyError_("not a signing key")
    ops = jwk.get("key_ops")
    # Some providers publish the signing key's own ops ("sign") on its public half; either names
    # a signature key. Anything else (encrypt, wrapKey, ...) is not one.
    if ops is not None and (not isinstance(ops, list) or not {"verify", "sign"} & set(map(str, ops))):
        raise KeyError_("key_ops names no signature operation")
    if any(name in jwk for name in ("d", "p", "q", "dp", "dq", "qi", "k")):
        raise KeyError_("private or symmetric key material in a public key set")
    alg = jwk.get("alg")
    if alg is not None and (not isinstance(alg, str) or alg not in ALG_KEY_TYPES):
        raise KeyError_(f"unsupported alg {alg!r}")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise KeyError_("kid is not a string")
    crv = jwk.get("crv") if isinstance(jwk.get("crv"), str) else None
    key: Any
    try:
        text = json.dumps(dict(jwk))
        if kty == "RSA":
            key = RSAAlgorithm.from_jwk(text)
            if key.key_size < MIN_RSA_BITS:
                raise KeyError_("RSA key shorter than 2048 bits")
        elif kty == "EC":
            key = ECAlgorithm.from_jwk(text)
        elif kty == "OKP":
            if crv not in ("Ed25519", "Ed448"):
                raise KeyError_("OKP key is not an EdDSA key")
            key = OKPAlgorithm.from_jwk(text)
        else:
            raise KeyError_(f"unsupported kty {kty!r}")
    except (InvalidKeyError, ValueError, TypeError, RecursionError) as exc:
        if isinstance(exc, KeyError_):
            raise
        raise KeyError_(f"invalid {kty} key") from exc
    if hasattr(key, "public_key") and not hasattr(key, "verify"):
        raise KeyError_("private key")  # pragma: no cover - private members are refused above
    if "x5c" in jwk:
        _check_x5c(jwk["x5c"], key)
    return VerificationKey(kid=kid, kty=str(kty), crv=crv, alg=alg, key=key)


def _check_x5c(x5c: Any, key: Any) -> None:
    """RFC 7517 section 4.7: the first certificate of `x5c` (standard base64 DER) must hold the JWK's own key.

    We verify with the key the JWK's members give and never with a certificate, but a JWK whose certificate
    names another key contradicts itself: a verifier trusting the certificate would check other signatures
    than ours. So such a key is no key (fail closed); the chain itself is not validated.
    """
    if not isinstance(x5c, list) or not x5c or not isinstance(x5c[0], str):
        raise KeyError_("x5c is not a non-empty array of certificates")
    try:
        der = base64.b64decode(x5c[0], validate=True)
        certified = x509.load_der_x509_certificate(der).public_key()
        same = certified.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) == key.public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo
        )
    except (binascii.Error, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyError_("x5c does not hold a certificate") from exc
    if not same:
        raise KeyError_("x5c certifies another key than the JWK's")


def parse_key_set(
    document: Any, *, max_keys: int, require_one: bool = True
) -> tuple[tuple[VerificationKey, ...], list[str]]:
    """RFC 7517 section 5: a JWK Set's usable signing keys, and why each other key was skipped.

    Raises `KeyError_` when the document is not a key set, holds more than `max_keys` keys, or none of them
    can verify a signature and either `require_one` (a key set configured on disk or in the YAML) or one of
    its entries is not a JSON object (not a JWK at all: a broken document, not a key set). A fetched set of
    JWKs none of which is usable is the provider's word that no key vouches any more: `require_one=False`.
    """
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise KeyError_("JWKS is not a key set")
    raw_keys = document["keys"]
    if len(raw_keys) > max_keys:
        raise KeyError_(f"JWKS has {len(raw_keys)} keys (limit {max_keys})")
    keys: list[VerificationKey] = []
    skipped: list[str] = []
    not_jwks = 0
    for raw in raw_keys:
        if not isinstance(raw, Mapping):
            not_jwks += 1
            continue
        try:
            keys.append(parse_jwk(raw))
        except (KeyError_, TypeError, ValueError) as exc:
            skipped.append(str(exc))
    if not keys and (require_one or not_jwks):
        raise KeyError_("JWKS has no usable signing keys")
    return tuple(keys), skipped
