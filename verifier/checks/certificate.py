"""RFC 8705 section 3: a certificate-bound token is accepted only with the certificate it names."""

from __future__ import annotations

from verifier.binding.mtls import check_certificate_binding
from verifier.checks.base import Check, Route
from verifier.credentials import Credential
from verifier.principal import Principal, confirmation
from verifier.request import RequestAttributes


class CertificateBinding(Check):
    """`cnf.x5t#S256` against the thumbprint of the certificate the door verified (or its trusted gateway named).

    Applies to every token with a confirmation claim: an answer for a sender-constrained token is
    never reused by a gateway, whichever confirmation method it names.
    """

    per_request = True

    def for_token(self, principal: Principal, credential: Credential) -> bool:
        """Any confirmation claim."""
        return bool(confirmation(principal))

    def check_now(self, principal: Principal, attrs: RequestAttributes, route: Route) -> Principal:
        """Raises SenderConstraintFailed when the certificate is not the one the token is bound to."""
        cnf = confirmation(principal)
        if "x5t#S256" in cnf:
            check_certificate_binding(cnf, attrs.client_cert_thumbprint)
        return principal
