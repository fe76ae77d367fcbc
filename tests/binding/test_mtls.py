"""verifier.binding.mtls: RFC 8705 certificate-bound tokens (`cnf["x5t#S256"]`)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from support import make_certificate
from tokenkit import b64

from verifier.binding.mtls import (
    check_certificate_binding,
    thumbprint_from_der,
    thumbprint_from_pem,
)
from verifier.errors import MalformedRequest, SenderConstraintFailed


@pytest.fixture(scope="module")
def cert() -> x509.Certificate:
    return make_certificate("client-1")


def test_thumbprints_from_der_and_pem_agree(cert: x509.Certificate) -> None:
    der = cert.public_bytes(Encoding.DER)
    expected = b64(hashlib.sha256(der).digest())
    assert thumbprint_from_der(der) == expected
    assert thumbprint_from_pem(cert.public_bytes(Encoding.PEM).decode()) == expected
    assert len(expected) == 43 and "=" not in expected


BAD_PEM_BODY = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize("pem", ["", "not a certificate", BAD_PEM_BODY])
def test_refuses_a_malformed_pem(pem: str) -> None:
    with pytest.raises(MalformedRequest):
        thumbprint_from_pem(pem)


def test_accepts_the_certificate_the_token_is_bound_to(cert: x509.Certificate) -> None:
    presented = thumbprint_from_der(cert.public_bytes(Encoding.DER))
    check_certificate_binding({"x5t#S256": presented}, presented)


@pytest.mark.parametrize("cnf", [None, {}, {"jkt": "abc"}])
def test_a_token_that_is_not_certificate_bound_passes_with_or_without_a_certificate(cnf: Any) -> None:
    check_certificate_binding(cnf, "")
    check_certificate_binding(cnf, "some-thumbprint")


def test_refuses_another_certificate(cert: x509.Certificate) -> None:
    bound = thumbprint_from_der(cert.public_bytes(Encoding.DER))
    other = thumbprint_from_der(make_certificate("client-2").public_bytes(Encoding.DER))
    with pytest.raises(SenderConstraintFailed, match="not the one"):
        check_certificate_binding({"x5t#S256": bound}, other)


def test_refuses_a_bound_token_without_a_certificate(cert: x509.Certificate) -> None:
    bound = thumbprint_from_der(cert.public_bytes(Encoding.DER))
    with pytest.raises(SenderConstraintFailed, match="without a client certificate"):
        check_certificate_binding({"x5t#S256": bound}, "")


@pytest.mark.parametrize("value", ["", None, 42, ["x"]])
def test_refuses_a_malformed_confirmation(value: Any) -> None:
    with pytest.raises(SenderConstraintFailed, match="malformed"):
        check_certificate_binding({"x5t#S256": value}, "presented")


def test_refusal_is_not_reusable_and_answers_invalid_token() -> None:
    assert SenderConstraintFailed.reusable is False
    assert SenderConstraintFailed.oauth_error == "invalid_token"
