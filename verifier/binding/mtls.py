"""Certificate-bound access tokens (RFC 8705 section 3): `cnf["x5t#S256"]` against the client certificate.

The gateway terminates TLS and hands us the client certificate (or its thumbprint); how it is carried is
the front door's business. Here: the certificate's thumbprint (base64url SHA-256 of its DER bytes,
RFC 8705 section 3.1) and the constant-time comparison with the token's confirmation claim.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from verifier.errors import MalformedRequest, SenderConstraintFailed
from verifier.tokens.jws import b64url_encode

X5T_S256 = "x5t#S256"


def check_certificate_binding(cnf: Mapping[str, Any] | None, presented_thumbprint: str) -> None:
    """Refuses a certificate-bound token unless the presented certificate is the one it is bound to.

    A token without `cnf["x5t#S256"]` is not certificate-bound and passes. A bound token with no
    certificate presented (`presented_thumbprint == ""`) or another one raises `SenderConstraintFailed`.
    """
    if cnf is None or X5T_S256 not in cnf:
        return
    bound = cnf[X5T_S256]
    if not isinstance(bound, str) or not bound:
        raise SenderConstraintFailed("token cnf x5t#S256 is malformed")
    if not presented_thumbprint:
        raise SenderConstraintFailed("certificate-bound token presented without a client certificate")
    # surrogatepass: a lone surrogate (valid JSON) must refuse, not crash
    if not hmac.compare_digest(
        bound.encode("utf-8", "surrogatepass"), presented_thumbprint.encode("utf-8", "surrogatepass")
    ):
        raise SenderConstraintFailed("client certificate is not the one the token is bound to")


def thumbprint_from_der(der: bytes) -> str:
    """`x5t#S256` of a DER certificate: base64url (no padding) of its SHA-256."""
    return b64url_encode(hashlib.sha256(der).digest())


def thumbprint_from_pem(pem: str) -> str:
    """`x5t#S256` of the first certificate in a PEM text; raises `MalformedRequest` if there is none."""
    try:
        certificate = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise MalformedRequest("client certificate is not a PEM certificate") from exc
    return thumbprint_from_der(certificate.public_bytes(Encoding.DER))
