"""The WebAuthn refusals: a step-up 401 that always carries a fresh challenge, and registration errors.

`AssertionRefused` is raised by each check with a stable code (`webauthn_origin_mismatch`, ...);
`WebAuthnService.check_step_up` attaches a fresh `Offer` before the error leaves the service, so every
missing or failed assertion is answered by `verifier.doors.refusals.refuse` with a new challenge in
`WWW-Authenticate: WebAuthn challenge="...", rp_id="...", timeout=...` and in the JSON body.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from verifier.errors import VerifierError
from verifier.policy.rules import WebAuthnStepUpRequired


@dataclasses.dataclass(frozen=True, slots=True)
class Offer:
    """A fresh challenge and the request options a browser passes to `navigator.credentials.get`."""

    challenge: str  # base64url
    rp_id: str
    timeout_ms: int
    public_key: dict[str, Any]  # PublicKeyCredentialRequestOptionsJSON (WebAuthn Level 3 section 5.5)


class AssertionRefused(WebAuthnStepUpRequired):
    """No assertion, or one that failed a check; the 401 carries a fresh challenge (`offer`)."""

    code = "webauthn_assertion_required"

    def __init__(self, description: str = "", *, code: str | None = None, offer: Offer | None = None) -> None:
        super().__init__(description or "a WebAuthn assertion bound to this request is required", code=code)
        self.offer = offer

    def challenge_params(self) -> dict[str, str | int]:
        """`challenge`, `rp_id` and `timeout` (milliseconds, unquoted) for `WWW-Authenticate`."""
        if self.offer is None:
            return {}
        return {"challenge": self.offer.challenge, "rp_id": self.offer.rp_id, "timeout": self.offer.timeout_ms}

    def extra_body(self) -> dict[str, object]:
        """The request options (with the subject's allowCredentials) for browsers reading the body."""
        if self.offer is None:
            return {}
        return {"publicKey": self.offer.public_key}


class RegistrationRefused(VerifierError):
    """A registration ceremony that does not verify: answered 400 by the registration endpoints."""

    code = "webauthn_registration_invalid"


class CredentialExists(VerifierError):
    """The credential is already registered (to this user or another): 409."""

    code = "webauthn_credential_exists"


class RevokedCredentialKept(VerifierError):
    """The user's last credential, disabled by a revocation, is its record (see `verifier.webauthn.service`): 409."""

    code = "webauthn_revoked_credential_kept"
