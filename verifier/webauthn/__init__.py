"""FIDO2 at the edge (W3C Web Authentication Level 3): a credential registry and request-bound step-up.

`WebAuthnService` is the one entry point the composition root builds; `parse_webauthn_config` reads the
`webauthn` settings section; `SqliteCredentialStore` is the default `CredentialStore`.
"""

from __future__ import annotations

from verifier.config.webauthn import WebAuthnConfig, parse_webauthn_config
from verifier.webauthn.assertion import ASSERTION_HEADER
from verifier.webauthn.errors import AssertionRefused, Offer, RegistrationRefused
from verifier.webauthn.service import WebAuthnService
from verifier.webauthn.store import CredentialStore, DuplicateCredential, SqliteCredentialStore, StoredCredential

__all__ = [
    "ASSERTION_HEADER",
    "AssertionRefused",
    "CredentialStore",
    "DuplicateCredential",
    "Offer",
    "RegistrationRefused",
    "SqliteCredentialStore",
    "StoredCredential",
    "WebAuthnConfig",
    "WebAuthnService",
    "parse_webauthn_config",
]
