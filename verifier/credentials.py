"""Finds the access token in a request (RFC 6750 section 2.1 Bearer, RFC 9449 section 7.1 DPoP).

Only the Authorization header is read: tokens in query strings or bodies leak into logs and caches.
"""

from __future__ import annotations

import enum
import string
from typing import NamedTuple

from verifier.errors import MalformedRequest, MissingToken
from verifier.request import RequestAttributes

# RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN_CHARS = string.ascii_letters.encode() + string.digits.encode() + b"-._~+/"


def is_b64token(token: str) -> bool:
    """The b64token syntax, checked in C: the characters before any trailing "=" all belong to it.

    (A regular expression walks a 1 KiB token character by character in Python's regex engine: about as
    much work as the rest of the credential's handling.)
    """
    body = token.rstrip("=")
    return bool(body) and body.isascii() and not body.encode("ascii").translate(None, _B64TOKEN_CHARS)


class TokenScheme(enum.Enum):
    """How the token was presented."""

    BEARER = "bearer"
    DPOP = "dpop"


class Credential(NamedTuple):
    """An access token and the scheme it came under (immutable: a tuple, cheap to build for every first-seen token)."""

    scheme: TokenScheme
    token: str


def extract(attrs: RequestAttributes) -> Credential:
    """Returns the request's access token, or raises `MissingToken` / `MalformedRequest`."""
    value = attrs.headers.get("authorization")
    if not value:
        raise MissingToken("no access token")
    scheme, _, token = value.strip().partition(" ")
    lowered = scheme.lower()
    if lowered == "bearer":
        kind = TokenScheme.BEARER
    elif lowered == "dpop":
        kind = TokenScheme.DPOP
    else:
        # Basic, Negotiate, ...: not ours. Answer with a bare challenge, as if no token were sent.
        raise MissingToken("no access token")
    token = token.strip()
    if not token:
        raise MissingToken("no access token")
    if not is_b64token(token):
        raise MalformedRequest("malformed Authorization header")
    return Credential(kind, token)
