"""Verifying a request-bound WebAuthn assertion (W3C WebAuthn Level 3 section 7.2).

The client sends `X-WebAuthn-Assertion: <base64url of PublicKeyCredential.toJSON() as JSON>`. Each
step of section 7.2 that applies at the edge is one check with a stable code, in this order:
parse (`webauthn_assertion_malformed`), `type` is webauthn.get (step 11), the challenge is ours,
unexpired and bound to this subject, method, scheme, host and path (step 12), the origin is allowed (step 13),
the credential belongs to the token's subject and is enabled (steps 5-6), rpIdHash (step 15), UP and UV
(steps 16-17), the signature (step 21), single use of the challenge, and the sign counter (step 22).

The challenge is consumed only after the signature verifies, so a stolen but unsigned challenge cannot
be burnt by someone else; `SharedState.first_use` is atomic across replicas, so two replicas racing
on the same assertion cannot both accept it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import struct
from collections.abc import Callable, Mapping

from cryptography.exceptions import InvalidSignature
from fido2 import cbor
from fido2.cose import CoseKey
from fido2.webauthn import AuthenticationResponse, CollectedClientData

from verifier import strict_json
from verifier.clock import Clock
from verifier.config.webauthn import CLOCK_SKEW_SECONDS, WebAuthnConfig
from verifier.principal import Principal
from verifier.request import RequestAttributes
from verifier.state.base import Purpose, SharedState
from verifier.webauthn.challenge import ChallengeSigner, b64url, b64url_decode, request_hash, subject_hash
from verifier.webauthn.errors import AssertionRefused
from verifier.webauthn.store import CredentialStore, StoredCredential

ASSERTION_HEADER = "x-webauthn-assertion"
# Characters; an assertion with an RSA-4096 signature and a long clientDataJSON stays below 4 KiB of
# JSON (about 5.5 KiB once base64url-encoded). Anything larger is refused before parsing.
MAX_ASSERTION_CHARS = 16384
_CAS_ATTEMPTS = 3  # compare-and-set retries on the counter when another replica moved it meanwhile


@dataclasses.dataclass(frozen=True, slots=True)
class VerifiedAssertion:
    """An accepted assertion: which credential signed, and its counter now."""

    credential: StoredCredential
    sign_count: int


class CounterRegression(AssertionRefused):
    """The signature counter did not increase: a cloned authenticator (section 6.1.1)."""

    code = "webauthn_counter_regression"

    def __init__(self, description: str, *, credential: StoredCredential, received: int) -> None:
        super().__init__(description)
        self.credential = credential
        self.received = received


def user_handle(issuer: str, subject: str) -> bytes:
    """The WebAuthn user handle (section 14.6.1): opaque, stable, no personal data in the clear."""
    return hashlib.sha256(b"user\x00" + issuer.encode() + b"\x00" + subject.encode()).digest()


def binding(attrs: RequestAttributes) -> bytes:
    """The request hash a challenge is bound to: method, scheme, host and the path with its query, as received."""
    return request_hash(attrs.method, attrs.scheme, attrs.host, attrs.path or "/")


def _malformed(reason: str) -> AssertionRefused:
    return AssertionRefused(f"the WebAuthn assertion is malformed: {reason}", code="webauthn_assertion_malformed")


def parse_assertion(header: str) -> AuthenticationResponse:
    """The header's `AuthenticationResponse`; raises `AssertionRefused` when it is not one."""
    if len(header) > MAX_ASSERTION_CHARS:
        raise _malformed("too large")
    try:
        document = strict_json.loads(b64url_decode(header.strip()))
    except (ValueError, RecursionError) as exc:
        raise _malformed("not base64url-encoded JSON read one way (RFC 8259)") from exc
    if not isinstance(document, dict) or not isinstance(document.get("response"), dict):
        raise _malformed("not a PublicKeyCredential")
    if document.get("type", "public-key") != "public-key":
        raise _malformed("type is not public-key")
    # Binary members are base64url strings (section 5.1.4.1 toJSON). fido2 hands anything else to bytes(),
    # which turns a number into that many zero bytes: 1e9 in a header would allocate a gigabyte.
    members = document["response"]
    for name, value in (("id", document.get("id")), ("rawId", document.get("rawId")), *_response_members(members)):
        if not isinstance(value, str):
            raise _malformed(f"{name} is not a base64url string")
    try:
        response = AuthenticationResponse.from_dict(document)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, struct.error, RecursionError) as exc:
        # fido2's CBOR reader raises IndexError or struct.error on data cut short, RecursionError on data
        # nested too deep (authenticatorData with the ED flag and such extensions)
        raise _malformed(type(exc).__name__) from exc
    check_client_data(bytes(response.response.client_data), _malformed)
    # fido2 keeps clientDataJSON's members as sent: an origin that is a list or an object is no origin
    # (and cannot be looked up in the allowed set).
    if not isinstance(response.response.client_data.origin, str):
        raise _malformed("clientDataJSON.origin is not a string")
    return response


def check_client_data(client_data: bytes, refusal: Callable[[str], Exception]) -> None:
    """clientDataJSON read one way only (`verifier.strict_json`), or `refusal(reason)` raised. fido2 parses it with
    `json.loads`, which keeps the last of two `challenge`s or `origin`s: the browser's JSON, signed by the
    authenticator, must not read as one challenge or origin here and as another to anyone else (section 5.8.1)."""
    try:
        strict_json.loads(client_data)
    except (ValueError, RecursionError) as exc:
        raise refusal("clientDataJSON is not JSON read one way (RFC 8259)") from exc


def _response_members(response: Mapping[str, object]) -> list[tuple[str, object]]:
    """The assertion response's binary members that must be strings (`userHandle` only when present)."""
    members = [(name, response.get(name)) for name in ("clientDataJSON", "authenticatorData", "signature")]
    if response.get("userHandle") is not None:
        members.append(("userHandle", response["userHandle"]))
    return members


class AssertionVerifier:
    """Checks one assertion against the request and the subject's credentials."""

    def __init__(
        self,
        config: WebAuthnConfig,
        store: CredentialStore,
        state: SharedState,
        clock: Clock,
        signer: ChallengeSigner,
    ) -> None:
        self._config = config
        self._store = store
        self._state = state
        self._clock = clock
        self._signer = signer
        self._origins = frozenset(config.origins)
        self._rp_id_hash = hashlib.sha256(config.rp_id.encode()).digest()

    async def verify(self, header: str, principal: Principal, attrs: RequestAttributes) -> VerifiedAssertion:
        """The accepted assertion, or `AssertionRefused` naming the first failed check."""
        response = parse_assertion(header)
        client_data: CollectedClientData = response.response.client_data
        auth_data = response.response.authenticator_data
        if client_data.type != CollectedClientData.TYPE.GET:
            raise AssertionRefused("clientDataJSON.type is not webauthn.get", code="webauthn_client_data_invalid")
        now = self._clock.now()
        challenge = self._signer.check(
            client_data.challenge,
            subject=subject_hash(principal.issuer, principal.subject),
            request=binding(attrs),
            now=now,
        )
        if client_data.origin not in self._origins:
            raise AssertionRefused("the assertion was made for another origin", code="webauthn_origin_mismatch")
        if client_data.cross_origin is not False:
            raise AssertionRefused("cross-origin assertions are not accepted", code="webauthn_origin_mismatch")
        credential = await self._store.get(bytes(response.raw_id))
        if credential is None or credential.issuer != principal.issuer or credential.subject != principal.subject:
            raise AssertionRefused("the credential is not registered to this user", code="webauthn_credential_unknown")
        if credential.disabled:
            raise AssertionRefused("the credential is disabled", code="webauthn_credential_disabled")
        handle = response.response.user_handle
        expected_handle = user_handle(principal.issuer, principal.subject)
        if handle is not None and not hmac.compare_digest(bytes(handle), expected_handle):
            raise AssertionRefused("the user handle does not match this user", code="webauthn_credential_unknown")
        if not hmac.compare_digest(auth_data.rp_id_hash, self._rp_id_hash):
            raise AssertionRefused("the assertion was made for another relying party", code="webauthn_rp_id_mismatch")
        if not auth_data.is_user_present():
            raise AssertionRefused("the user was not present", code="webauthn_user_presence_missing")
        if self._config.user_verification_required and not auth_data.is_user_verified():
            raise AssertionRefused("the user was not verified", code="webauthn_user_verification_missing")
        try:
            decoded = cbor.decode(credential.public_key)
            if not isinstance(decoded, Mapping):
                raise TypeError("stored public key is not a COSE_Key")
            key = CoseKey.parse(decoded)
            key.verify(bytes(auth_data) + client_data.hash, bytes(response.response.signature))
        # KeyError, IndexError, OverflowError: a stored key that does not load (registered before registration
        # loaded keys): no signature can verify against it
        except (InvalidSignature, ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
            raise AssertionRefused(
                "the assertion signature does not verify", code="webauthn_signature_invalid"
            ) from exc
        # accepted until `expires_at` (`ChallengeSigner.check`): on a lagging replica, up to CLOCK_SKEW_SECONDS later
        ttl = math.ceil(challenge.expires_at - now) + 1.0 + CLOCK_SKEW_SECONDS
        if not await self._state.first_use(challenge.nonce_key, ttl, purpose=Purpose.WEBAUTHN):
            raise AssertionRefused("the challenge was already used", code="webauthn_challenge_replayed")
        return await self._count(credential, auth_data.counter, now)

    async def _count(self, credential: StoredCredential, received: int, now: float) -> VerifiedAssertion:
        """Section 6.1.1: a counter that does not grow, where the authenticator keeps one, means a clone."""
        current = credential
        for _ in range(_CAS_ATTEMPTS):
            stored = current.sign_count
            if (received != 0 or stored != 0) and received <= stored:
                raise CounterRegression(
                    "the authenticator's signature counter went back: possibly a cloned key",
                    credential=current,
                    received=received,
                )
            if await self._store.use(current.credential_id, old_count=stored, new_count=received, used_at=now):
                return VerifiedAssertion(credential=current, sign_count=received)
            reread = await self._store.get(current.credential_id)
            if reread is None or reread.disabled:
                raise AssertionRefused("the credential was removed meanwhile", code="webauthn_credential_unknown")
            current = reread
        raise AssertionRefused("the credential is in use concurrently", code="webauthn_counter_regression")


def credential_id_text(credential: StoredCredential) -> str:
    """The credential id as it appears everywhere outside the store: base64url."""
    return b64url(credential.credential_id)
