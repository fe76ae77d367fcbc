"""RFC 8705 section 3: a certificate-bound token is accepted only with the certificate it names.

And a token bound in a way this verifier cannot check is not accepted at all: RFC 7800 `cnf` names how the
presenter proves possession, and only RFC 9449 `jkt` (the DPoP check) and RFC 8705 `x5t#S256` (here) are
checked. A `cnf` naming neither (an RFC 7800 `jwk`, `kid` or `jku`, a SHA-1 `x5t`), or one that is not a JSON
object, would otherwise leave the token a plain bearer token, which its binding was there to prevent.
"""

from __future__ import annotations

from verifier.binding.mtls import X5T_S256, check_certificate_binding
from verifier.checks.base import Check, Route
from verifier.credentials import Credential
from verifier.errors import SenderConstraintFailed
from verifier.principal import Principal
from verifier.request import RequestAttributes

DPOP_JKT = "jkt"  # RFC 9449 section 6.1: checked by `verifier.checks.dpop.DpopBinding`


class CertificateBinding(Check):
    """`cnf.x5t#S256` against the thumbprint of the certificate the door verified (or its trusted gateway named).

    Applies to every token with a confirmation claim: an answer for a sender-constrained token is
    never reused by a gateway, whichever confirmation method it names; one naming no method this
    verifier checks is refused.
    """

    per_request = True

    def for_token(self, principal: Principal, credential: Credential) -> bool:
        """Any confirmation claim but an empty object (one that names no key binds nothing); a malformed one too."""
        cnf = principal.claims.get("cnf")
        return cnf is not None and cnf != {}

    def check_now(self, principal: Principal, attrs: RequestAttributes, route: Route) -> Principal:
        """Raises SenderConstraintFailed when the certificate is not the one the token is bound to, or the token
        is bound by a confirmation method that is not checked here (neither `x5t#S256` nor DPoP's `jkt`)."""
        cnf = principal.claims.get("cnf")
        if not isinstance(cnf, dict):
            raise SenderConstraintFailed("token cnf is not a JSON object")
        if X5T_S256 in cnf:
            check_certificate_binding(cnf, attrs.client_cert_thumbprint)
        elif cnf.get(DPOP_JKT) is None:  # a `jkt` of null binds to no key (the DPoP check, run first, refuses any
            # `jkt` that is not a non-empty string as a malformed binding: `verifier.binding.dpop.malformed_binding`)
            raise SenderConstraintFailed("token is bound by a confirmation method this verifier does not check")
        return principal
