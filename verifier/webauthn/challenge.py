"""Stateless, request-bound WebAuthn challenges and signed ceremony states.

WebAuthn Level 3 section 13.4.3 asks for challenges the relying party generated, random, and used
once. We keep no per-challenge server state: a challenge is its own record, HMAC-SHA256-signed with
the key every replica shares, and names what it was issued for:

    version (1) | expiry, epoch seconds (8) | nonce (16) | subject hash (16) | request hash (16) | tag (32)

The subject hash is SHA-256 over issuer and subject; the request hash is SHA-256 over method, scheme, host
and path, so an assertion made for one virtual host is refused on another with the same path, and one made for an
https request is refused for the same request over plain http (where it could have been read on the way).
Any replica can check a challenge another replica issued; `SharedState.first_use` keyed by the nonce
makes each one single-use across replicas. A registration's state (section 7.1) round-trips through
the client the same way: a signed JSON document bound to the subject, with an expiry.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
import struct
from typing import Any

from verifier.errors import MalformedToken
from verifier.tokens import jws
from verifier.webauthn.errors import AssertionRefused, RegistrationRefused

_VERSION = 1
_NONCE_BYTES = 16  # 128 bits of randomness: WebAuthn Level 3 section 13.4.3 asks for at least 16 bytes
_HASH_BYTES = 16  # truncated SHA-256: binding, not secrecy; 128 bits rules out a second preimage
_TAG_BYTES = 32  # full HMAC-SHA256 tag
_HEAD = struct.Struct(">BQ")
CHALLENGE_BYTES = _HEAD.size + _NONCE_BYTES + 2 * _HASH_BYTES + _TAG_BYTES
# v2: the request hash covers the host; v3: and the scheme (a v2 challenge in flight at an upgrade is refused as
# invalid: the client asks again and gets a v3 one)
_CHALLENGE_CONTEXT = b"verifier/webauthn/step-up/v3\x00"
_STATE_CONTEXT = b"verifier/webauthn/register/v1\x00"
MAX_STATE_CHARS = 4096  # a state is a few hundred characters; anything longer is not ours


def b64url(data: bytes) -> str:
    """Base64url without padding: the encoding of every binary WebAuthn value we hand out."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decodes base64url with or without padding; raises `ValueError` on anything else: a character outside the
    alphabet too (`jws.b64url_decode`, strict; `urlsafe_b64decode` drops those, so `%%%` read as no bytes)."""
    if not isinstance(text, str) or not text.isascii():
        raise ValueError("not base64url")
    try:
        return jws.b64url_decode(text.rstrip("=").encode("ascii"))
    except MalformedToken as exc:
        raise ValueError("not base64url") from exc


def subject_hash(issuer: str, subject: str) -> bytes:
    """The 16-byte digest that names a user (issuer and `sub`) inside challenges and states."""
    return hashlib.sha256(b"subject\x00" + issuer.encode() + b"\x00" + subject.encode()).digest()[:_HASH_BYTES]


def request_hash(method: str, scheme: str, host: str, path: str) -> bytes:
    """The 16-byte digest of what a step-up challenge is bound to: method, scheme and host (case-insensitive) and
    path."""
    text = "\x00".join((method.upper(), scheme.lower(), host.lower(), path))
    return hashlib.sha256(b"request\x00" + text.encode()).digest()[:_HASH_BYTES]


@dataclasses.dataclass(frozen=True, slots=True)
class Challenge:
    """A parsed, authentic challenge: what it was issued for and until when."""

    raw: bytes
    expires_at: int
    nonce: bytes
    subject: bytes
    request: bytes

    @property
    def nonce_key(self) -> str:
        """The replay-cache key of this challenge."""
        return "webauthn:" + self.nonce.hex()


class ChallengeSigner:
    """Issues and checks challenges and states with one HMAC key (shared by every replica)."""

    def __init__(self, secret: bytes) -> None:
        self._key = hashlib.sha256(b"verifier/webauthn/key\x00" + secret).digest()

    def _tag(self, context: bytes, body: bytes) -> bytes:
        return hmac.new(self._key, context + body, hashlib.sha256).digest()

    def issue(self, *, subject: bytes, request: bytes, expires_at: int) -> bytes:
        """A fresh challenge bound to `subject` and `request`, valid until `expires_at` (epoch seconds)."""
        body = _HEAD.pack(_VERSION, expires_at) + os.urandom(_NONCE_BYTES) + subject + request
        return body + self._tag(_CHALLENGE_CONTEXT, body)

    def check(self, raw: bytes, *, subject: bytes, request: bytes, now: float) -> Challenge:
        """The challenge if authentic, unexpired and bound to `subject` and `request`.

        Raises `AssertionRefused` with a stable code naming the first failed check.
        """
        if len(raw) != CHALLENGE_BYTES or raw[0] != _VERSION:
            raise AssertionRefused("the challenge was not issued by this verifier", code="webauthn_challenge_invalid")
        body, tag = raw[:-_TAG_BYTES], raw[-_TAG_BYTES:]
        if not hmac.compare_digest(tag, self._tag(_CHALLENGE_CONTEXT, body)):
            raise AssertionRefused("the challenge was not issued by this verifier", code="webauthn_challenge_invalid")
        _, expires_at = _HEAD.unpack_from(body)
        offset = _HEAD.size
        nonce = body[offset : offset + _NONCE_BYTES]
        offset += _NONCE_BYTES
        bound_subject = body[offset : offset + _HASH_BYTES]
        bound_request = body[offset + _HASH_BYTES : offset + 2 * _HASH_BYTES]
        if expires_at <= now:
            raise AssertionRefused("the challenge has expired", code="webauthn_challenge_expired")
        if not hmac.compare_digest(bound_subject, subject):
            raise AssertionRefused("the challenge was issued to another user", code="webauthn_challenge_mismatch")
        if not hmac.compare_digest(bound_request, request):
            raise AssertionRefused(
                "the challenge was issued for another method, scheme, host or path", code="webauthn_challenge_mismatch"
            )
        return Challenge(raw=raw, expires_at=expires_at, nonce=nonce, subject=bound_subject, request=bound_request)

    def seal(self, document: dict[str, Any]) -> str:
        """A registration state: the JSON document and its tag, base64url, for the client to return."""
        body = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
        return b64url(body) + "." + b64url(self._tag(_STATE_CONTEXT, body))

    def unseal(self, state: object, *, subject: bytes, now: float) -> dict[str, Any]:
        """The document inside a state we sealed for `subject`, unexpired; else `RegistrationRefused`."""
        if not isinstance(state, str) or len(state) > MAX_STATE_CHARS or state.count(".") != 1:
            raise RegistrationRefused("the registration state is malformed", code="webauthn_state_invalid")
        encoded, encoded_tag = state.split(".")
        try:
            body, tag = b64url_decode(encoded), b64url_decode(encoded_tag)
        except ValueError as exc:
            raise RegistrationRefused("the registration state is malformed", code="webauthn_state_invalid") from exc
        if not hmac.compare_digest(tag, self._tag(_STATE_CONTEXT, body)):
            raise RegistrationRefused("the registration state was altered", code="webauthn_state_invalid")
        document = json.loads(body)  # ours (the tag proves it), so it is well-formed JSON
        if not isinstance(document, dict):
            raise RegistrationRefused("the registration state is malformed", code="webauthn_state_invalid")
        expires_at = document.get("exp")
        if not isinstance(expires_at, int) or expires_at <= now:
            raise RegistrationRefused("the registration state has expired", code="webauthn_state_expired")
        bound = document.get("sub")
        if not isinstance(bound, str) or not hmac.compare_digest(bound.encode(), b64url(subject).encode()):
            raise RegistrationRefused("the registration state belongs to another user", code="webauthn_state_invalid")
        return document
