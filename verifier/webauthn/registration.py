"""The registration ceremony (W3C WebAuthn Level 3 section 7.1), with python-fido2 as the relying party.

`Fido2Server` builds the creation options and verifies the response (type, challenge, origin, rpIdHash,
UP, UV, attestation when asked for); we add what it leaves to its caller: a state that round-trips
through the client signed, expiring, bound to the subject and single-use; the algorithm allow-list; and
the attestation policy (`none` accepts any authenticator, `trusted_roots` requires an attestation
chain ending at a configured root, section 7.1 steps 21-24).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from fido2 import cbor
from fido2.attestation.base import AttestationResult, AttestationVerifier, InvalidAttestation
from fido2.cose import CoseKey
from fido2.server import Fido2Server
from fido2.webauthn import (
    AttestationConveyancePreference,
    AttestationObject,
    AuthenticatorAttachment,
    AuthenticatorData,
    PublicKeyCredentialDescriptor,
    PublicKeyCredentialParameters,
    PublicKeyCredentialRpEntity,
    PublicKeyCredentialType,
    PublicKeyCredentialUserEntity,
    RegistrationResponse,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from verifier.config.webauthn import WebAuthnConfig
from verifier.webauthn.assertion import check_client_data
from verifier.webauthn.challenge import ChallengeSigner, b64url
from verifier.webauthn.errors import RegistrationRefused

# COSE algorithms we offer and accept (IANA COSE registry): ES256 first (every authenticator has it),
# EdDSA, ES384, then RSA for Windows Hello. No ES256K, no post-quantum drafts yet.
ALLOWED_COSE_ALGORITHMS = (-7, -8, -35, -257, -37)
_CHALLENGE_BYTES = 32
_TRANSPORTS = frozenset({"usb", "nfc", "ble", "smart-card", "hybrid", "internal"})
MAX_NAME_CHARS = 64  # a label the user gives a credential ("office key")
MAX_FORMAT_CHARS = 32  # an attestation statement format identifier (RFC 8809 section 2.1)
# RFC 8809 section 2.1: VCHAR (RFC 5234) without %x22 (") and %x5C (\)
_FORMAT_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\')


@dataclasses.dataclass(frozen=True, slots=True)
class Preferences:
    """What the client may ask for when registering (the body of register/begin)."""

    attachment: AuthenticatorAttachment | None = None
    resident_key: ResidentKeyRequirement | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Registered:
    """A verified registration, ready to store."""

    credential_id: bytes
    public_key: bytes  # CBOR COSE_Key
    sign_count: int
    aaguid: bytes
    attestation_format: str
    user_verified: bool
    backup_eligible: bool
    transports: tuple[str, ...]


class TrustedRoots(AttestationVerifier):
    """Accepts an attestation whose certificate chain ends at one of the configured roots."""

    def __init__(self, roots_pem: tuple[str, ...]) -> None:
        super().__init__()
        self._roots = [x509.load_pem_x509_certificate(pem.encode()) for pem in roots_pem]

    def ca_lookup(self, attestation_result: AttestationResult, auth_data: AuthenticatorData) -> bytes | None:
        """The configured root that issued the last certificate of the trust path, as DER."""
        if not attestation_result.trust_path:
            return None  # self or none attestation: nothing to chain to a root
        last = x509.load_der_x509_certificate(attestation_result.trust_path[-1])
        for root in self._roots:
            if root.subject == last.issuer:
                return root.public_bytes(Encoding.DER)
        return None


def parse_preferences(body: object) -> tuple[Preferences, str]:
    """The optional authenticator preferences and credential name of register/begin and /complete."""
    if body is None:
        return Preferences(), ""
    if not isinstance(body, Mapping):
        raise RegistrationRefused("expected a JSON object", code="invalid_request")
    attachment: AuthenticatorAttachment | None = None
    resident: ResidentKeyRequirement | None = None
    raw = body.get("authenticatorAttachment")
    if raw is not None:
        if raw not in ("platform", "cross-platform"):
            raise RegistrationRefused(
                "authenticatorAttachment: expected platform or cross-platform", code="invalid_request"
            )
        attachment = AuthenticatorAttachment(raw)
    raw = body.get("residentKey")
    if raw is not None:
        if raw not in ("discouraged", "preferred", "required"):
            raise RegistrationRefused(
                "residentKey: expected discouraged, preferred or required", code="invalid_request"
            )
        resident = ResidentKeyRequirement(raw)
    name = body.get("name", "")
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise RegistrationRefused(
            f"name: expected printable text of at most {MAX_NAME_CHARS} characters", code="invalid_request"
        )
    return Preferences(attachment, resident), name


class Registrar:
    """Begins and completes registrations; stateless between the two (the state travels signed)."""

    def __init__(self, config: WebAuthnConfig, signer: ChallengeSigner) -> None:
        self._config = config
        self._signer = signer
        trusted = config.attestation == "trusted_roots"
        origins = frozenset(config.origins)
        self._server = Fido2Server(
            PublicKeyCredentialRpEntity(id=config.rp_id, name=config.rp_name),
            attestation=AttestationConveyancePreference.DIRECT if trusted else AttestationConveyancePreference.NONE,
            verify_origin=lambda origin: origin in origins,
            verify_attestation=TrustedRoots(config.trusted_roots_pem) if trusted else None,
        )
        self._server.timeout = config.timeout_ms  # type: ignore[assignment]  # fido2 types it as None
        self._server.allowed_algorithms = [
            PublicKeyCredentialParameters(type=PublicKeyCredentialType.PUBLIC_KEY, alg=alg)
            for alg in ALLOWED_COSE_ALGORITHMS
        ]
        self._uv = UserVerificationRequirement(config.user_verification)

    def begin(
        self,
        *,
        user_id: bytes,
        user_name: str,
        display_name: str,
        subject: bytes,
        exclude: list[bytes],
        preferences: Preferences,
        now: float,
    ) -> tuple[dict[str, Any], str]:
        """The creation options (JSON) and the signed state the client must send back."""
        challenge = os.urandom(_CHALLENGE_BYTES)
        options, _ = self._server.register_begin(
            PublicKeyCredentialUserEntity(id=user_id, name=user_name, display_name=display_name),
            [PublicKeyCredentialDescriptor(type=PublicKeyCredentialType.PUBLIC_KEY, id=cid) for cid in exclude],
            resident_key_requirement=preferences.resident_key,
            user_verification=self._uv,
            authenticator_attachment=preferences.attachment,
            challenge=challenge,
        )
        state = self._signer.seal(
            {
                "v": 1,
                "c": b64url(challenge),
                "uv": self._uv.value,
                "sub": b64url(subject),
                "exp": int(now) + self._config.challenge_timeout_seconds,
            }
        )
        return _plain(options.public_key), state

    def complete(self, state: object, credential: object, *, subject: bytes, now: float) -> tuple[Registered, str]:
        """The verified credential and the state's challenge (for the replay check), or `RegistrationRefused`."""
        document = self._signer.unseal(state, subject=subject, now=now)
        challenge = document.get("c")
        uv = document.get("uv")
        if not isinstance(challenge, str) or uv not in ("required", "preferred", "discouraged"):
            raise RegistrationRefused("the registration state is malformed", code="webauthn_state_invalid")
        if not isinstance(credential, Mapping):
            raise RegistrationRefused("credential: expected PublicKeyCredential.toJSON()", code="invalid_request")
        # Binary members are base64url strings (section 5.1.4.1 toJSON). fido2 hands anything else to
        # bytes(), which turns a number into that many zero bytes: a gigabyte for 1e9.
        members = credential.get("response")
        binary = [credential.get("id"), credential.get("rawId")]
        if isinstance(members, Mapping):
            binary += [members.get("clientDataJSON"), members.get("attestationObject")]
        if not isinstance(members, Mapping) or not all(isinstance(value, str) for value in binary):
            raise RegistrationRefused("the registration does not verify: a binary member is not a base64url string")
        try:
            response = RegistrationResponse.from_dict(credential)
            check_client_data(bytes(response.response.client_data), _does_not_verify)
            # section 7.1 step 10: crossOrigin per the RP's policy; this RP takes no ceremony run in a cross-origin
            # iframe (the assertion is refused alike, `verifier.webauthn.assertion`); fido2 does not look at it
            if response.response.client_data.cross_origin is not False:
                raise _does_not_verify("a cross-origin registration is not accepted")
            _check_attestation_object(response.response.attestation_object)
            auth_data = self._server.register_complete(
                {"challenge": challenge, "user_verification": UserVerificationRequirement(uv)}, response
            )
        except (
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            IndexError,
            struct.error,
            RecursionError,
            NotImplementedError,
            InvalidAttestation,
        ) as exc:
            # IndexError, struct.error, RecursionError: fido2's CBOR reader on an attestationObject cut short
            # or nested too deep; NotImplementedError: a statement fido2 cannot check (packed with ECDAA)
            raise RegistrationRefused(f"the registration does not verify: {_reason(exc)}") from exc
        data = auth_data.credential_data
        if data is None:  # pragma: no cover - `_check_attestation_object` refused it
            raise RegistrationRefused("no attested credential data")
        key: CoseKey = data.public_key
        if key.ALGORITHM not in ALLOWED_COSE_ALGORITHMS:
            raise RegistrationRefused("the credential's algorithm is not accepted", code="webauthn_algorithm_refused")
        if not _loads(key):  # with attestation `none` nothing else reads the key before its first assertion
            raise RegistrationRefused("the registration does not verify: the credential public key cannot be loaded")
        raw_transports = credential.get("response", {})
        transports = raw_transports.get("transports", []) if isinstance(raw_transports, Mapping) else []
        registered = Registered(
            credential_id=bytes(data.credential_id),
            public_key=_cbor(key),
            sign_count=auth_data.counter,
            aaguid=bytes(data.aaguid),
            attestation_format=response.response.attestation_object.fmt,
            user_verified=auth_data.is_user_verified(),
            backup_eligible=auth_data.is_backup_eligible(),
            transports=tuple(t for t in transports if isinstance(t, str) and t in _TRANSPORTS)
            if isinstance(transports, list)
            else (),
        )
        return registered, challenge


def _does_not_verify(reason: str) -> RegistrationRefused:
    return RegistrationRefused(f"the registration does not verify: {reason}")


def _check_attestation_object(attestation: AttestationObject) -> None:
    """What python-fido2 leaves unchecked when no attestation is asked for, refused before it runs: `fmt` is an
    attestation statement format identifier (RFC 8809 section 2.1: a text string of 1 to 32 printable US-ASCII
    characters, no `"` or `\\`; the stored credential and its JSON carry it), and a registration's authenticator
    data holds the attested credential data (WebAuthn section 6.1, flag AT; fido2 only `assert`s it)."""
    fmt = attestation.fmt
    if not isinstance(fmt, str) or not 0 < len(fmt) <= MAX_FORMAT_CHARS or fmt.strip(_FORMAT_CHARS):
        raise RegistrationRefused("the registration does not verify: fmt is not an attestation format identifier")
    if attestation.auth_data.credential_data is None:
        raise RegistrationRefused("the registration does not verify: no attested credential data (flag AT)")


def _loads(key: CoseKey) -> bool:
    """Whether `key` is a public key of its type that signatures can be checked against: checking an empty signature
    with it says so (`InvalidSignature`: the key loaded; anything else: members missing, of the wrong type or size,
    a point off its curve)."""
    try:
        key.verify(b"", b"")
    except InvalidSignature:
        return True
    except Exception:  # whatever the key's type raises while loading it: no usable key
        return False
    return False  # an empty signature verified: no sound key


def _cbor(key: CoseKey) -> bytes:
    return bytes(cbor.encode(dict(key)))


def _plain(options: Any) -> dict[str, Any]:
    """fido2's options as plain JSON types (bytes already base64url by its Mapping view)."""

    def convert(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): convert(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [convert(v) for v in value]
        if isinstance(value, bytes):
            return b64url(value)
        if isinstance(value, str):
            return str(value)
        return value

    result = convert(options)
    assert isinstance(result, dict)
    return result


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:120]
