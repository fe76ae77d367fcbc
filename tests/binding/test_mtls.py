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
from verifier.checks.base import NO_POLICY
from verifier.checks.certificate import CertificateBinding
from verifier.credentials import Credential, TokenScheme
from verifier.errors import MalformedRequest, SenderConstraintFailed
from verifier.principal import Principal
from verifier.request import RequestAttributes


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


def _principal(**claims: Any) -> Principal:
    return Principal("https://idp", "alice", None, (), frozenset(), 2e9, claims)


def _attrs(thumbprint: str = "") -> RequestAttributes:
    return RequestAttributes("GET", "https", "api.example.test", "/", {}, "", thumbprint)


BEARER = Credential(TokenScheme.BEARER, "t")


@pytest.mark.parametrize(
    "cnf",
    [
        {"jwk": {"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}},  # RFC 7800 section 3.2
        {"kid": "pop-key-1"},  # RFC 7800 section 3.4
        {"jku": "https://client.example/jwks"},  # RFC 7800 section 3.5
        {"x5t": "sha1-thumbprint"},  # not RFC 8705's x5t#S256
        {"jkt": None},  # names DPoP, binds to no key (the DPoP check, run first, refuses it as malformed)
        "abc",
        ["jkt"],
        42,
    ],
    ids=["jwk", "kid", "jku", "x5t-sha1", "jkt-null", "string", "list", "number"],
)
def test_a_confirmation_the_verifier_cannot_check_is_refused_not_taken_as_bearer(cnf: Any) -> None:
    principal = _principal(cnf=cnf)
    check = CertificateBinding()
    assert check.for_token(principal, BEARER)
    with pytest.raises(SenderConstraintFailed):
        check.check_now(principal, _attrs("some-thumbprint"), NO_POLICY)


def test_the_binding_check_leaves_unbound_and_checkable_tokens_to_their_own_rules(cert: x509.Certificate) -> None:
    check = CertificateBinding()
    for unbound in (_principal(), _principal(cnf={}), _principal(cnf=None)):
        assert not check.for_token(unbound, BEARER)
    dpop_bound = _principal(cnf={"jkt": "abc"})  # the DPoP check's business
    assert check.check_now(dpop_bound, _attrs(), NO_POLICY) is dpop_bound
    presented = thumbprint_from_der(cert.public_bytes(Encoding.DER))
    bound = _principal(cnf={"x5t#S256": presented, "x5t": "sha1-thumbprint"})
    assert check.check_now(bound, _attrs(presented), NO_POLICY) is bound
    with pytest.raises(SenderConstraintFailed):
        check.check_now(bound, _attrs(), NO_POLICY)
