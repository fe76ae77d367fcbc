"""A software FIDO2 authenticator for the WebAuthn tests (unit and through the running service).

`SoftAuthenticator` builds real authenticatorData (rpIdHash, flags, counter, attested credential data
with a COSE key from `fido2.cose`), clientDataJSON and signatures with a `cryptography` EC key, so the
verifier is checked against structures it did not make itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fido2.cose import ES256
from fido2.webauthn import AttestationObject, AttestedCredentialData, AuthenticatorData, CollectedClientData
from support import b64url as b64u

RP_ID = "localhost"
ORIGIN = "http://localhost:9555"
FLAGS = AuthenticatorData.FLAG


def unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_header(credential: Mapping[str, Any]) -> str:
    return b64u(json.dumps(credential).encode())


class SoftAuthenticator:
    """A software FIDO2 authenticator: one ES256 credential, a counter, configurable misbehaviour."""

    def __init__(self, *, counter: int = 0, step: int = 1) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cose = ES256.from_cryptography_key(self.key.public_key())
        self.credential_id = os.urandom(16)
        self.aaguid = os.urandom(16)
        self.counter = counter
        self.step = step
        self.user_handle: bytes | None = None

    @property
    def id(self) -> str:
        return b64u(self.credential_id)

    def create(
        self,
        public_key: Mapping[str, Any],
        *,
        origin: str = ORIGIN,
        rp_id: str = RP_ID,
        flags: int = FLAGS.UP | FLAGS.UV,
        fmt: str = "none",
        att_stmt: Mapping[str, Any] | None = None,
        signer: Any = None,
        cross_origin: bool = False,
    ) -> dict[str, Any]:
        """navigator.credentials.create(): a RegistrationResponseJSON."""
        self.user_handle = unb64u(public_key["user"]["id"])
        client_data = CollectedClientData.create(
            type="webauthn.create", challenge=public_key["challenge"], origin=origin, cross_origin=cross_origin
        )
        auth_data = AuthenticatorData.create(
            hashlib.sha256(rp_id.encode()).digest(),
            FLAGS(flags | FLAGS.AT),
            self.counter,
            AttestedCredentialData.create(self.aaguid, self.credential_id, self.cose),
        )
        statement: Mapping[str, Any] = att_stmt if att_stmt is not None else {}
        if signer is not None:
            statement = signer(auth_data, client_data)
        attestation = AttestationObject.create(fmt, auth_data, statement)
        return {
            "id": self.id,
            "rawId": self.id,
            "type": "public-key",
            "response": {
                "clientDataJSON": b64u(client_data),
                "attestationObject": b64u(attestation),
                "transports": ["usb"],
            },
            "clientExtensionResults": {},
        }

    def get(
        self,
        challenge: str,
        *,
        origin: str = ORIGIN,
        rp_id: str = RP_ID,
        flags: int = FLAGS.UP | FLAGS.UV,
        counter: int | None = None,
        cross_origin: bool = False,
    ) -> dict[str, Any]:
        """navigator.credentials.get(): an AuthenticationResponseJSON signed over authData || hash(clientData)."""
        if counter is None:
            self.counter += self.step
            counter = self.counter
        client_data = CollectedClientData.create(
            type="webauthn.get", challenge=challenge, origin=origin, cross_origin=cross_origin
        )
        auth_data = AuthenticatorData.create(hashlib.sha256(rp_id.encode()).digest(), FLAGS(flags), counter)
        signature = self.key.sign(auth_data + client_data.hash, ec.ECDSA(hashes.SHA256()))
        response: dict[str, Any] = {
            "clientDataJSON": b64u(client_data),
            "authenticatorData": b64u(auth_data),
            "signature": b64u(signature),
        }
        if self.user_handle is not None:
            response["userHandle"] = b64u(self.user_handle)
        return {"id": self.id, "rawId": self.id, "type": "public-key", "response": response,
                "clientExtensionResults": {}}
