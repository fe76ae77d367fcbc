"""What every signed revocation message shares: SSF SETs (RFC 8417, `verifier.revocation.ssf`) and
OpenID Connect back-channel logout tokens (`verifier.revocation.logout`).

The sender's signature (its `alg` on the allow-list, pinned to the key type, a key from its JWKS), a
fresh `iat` (RFC 8417 section 2.2; Back-Channel Logout 1.0 section 2.6 step 4), an `exp` not passed when
present, and a `jti` to remember, under a key shared by every replica. Each receiver maps a
`MessageRefused` to its own error vocabulary (RFC 8935 `err` codes; section 2.8's `invalid_request`).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Collection, Mapping
from typing import Any

from verifier.numbers import json_number
from verifier.tokens import jws
from verifier.tokens.jwks import IssuerKeys

MAX_JTI_CHARS = 256  # characters; a jti is an identifier, never a document


class Failed(enum.Enum):
    """Which shared check refused the message; the values are stable codes."""

    ALGORITHM = "algorithm"
    KEY = "key"
    SIGNATURE = "signature"
    IAT = "iat"
    EXP = "exp"
    JTI = "jti"


class MessageRefused(Exception):
    """A signed message that failed one of the shared checks."""

    def __init__(self, failed: Failed, description: str) -> None:
        super().__init__(description)
        self.failed = failed
        self.description = description


async def check_signature(parsed: jws.CompactJWS, algorithms: Collection[str], keys: IssuerKeys) -> None:
    """The sender signed it: `alg` allowed, a key of the sender's that fits, a signature that verifies.

    Raises `MessageRefused`, or `ProviderUnavailable` when the sender's keys cannot be fetched, or when its kid
    is unknown and the refetch cooldown holds back the lookup: the sender retries a 503, and may have just
    rotated its key, whereas a refusal (RFC 8935 section 2.3, Back-Channel Logout 1.0 section 2.8) is final.
    """
    if parsed.alg not in algorithms:
        raise MessageRefused(Failed.ALGORITHM, f"alg {parsed.alg} is not allowed for this sender")
    key = await keys.key_for(parsed.kid, parsed.alg, retry_while_cooling=True)
    if key is None:
        raise MessageRefused(Failed.KEY, "no key of the sender fits the kid and alg")
    if parsed.kid is None:  # each of the sender's keys that fits, as for an access token without a kid
        verified = keys.verify(parsed.alg, parsed.signing_input, parsed.signature) is not None
    else:
        verified = key.verify(parsed.alg, parsed.signing_input, parsed.signature)
    if not verified:
        raise MessageRefused(Failed.SIGNATURE, "signature does not verify")


def check_times(payload: Mapping[str, Any], *, now: float, leeway: float, max_age: float) -> float:
    """The message's `iat`: present, at most `leeway` ahead of `now`, at most `max_age` old; and its
    `exp`, when present, a number not passed. Raises `MessageRefused`."""
    iat = json_number(payload.get("iat"))
    if iat is None:
        raise MessageRefused(Failed.IAT, "iat missing")
    if iat > now + leeway:
        raise MessageRefused(Failed.IAT, "iat is in the future")
    if now - iat > max_age:
        raise MessageRefused(Failed.IAT, "iat is too old")
    exp = payload.get("exp")
    exp_time = json_number(exp)
    if exp is not None and (exp_time is None or exp_time <= now - leeway):
        raise MessageRefused(Failed.EXP, "the message has expired")
    return iat


def jti_ttl(iat: float, *, now: float, leeway: float, max_age: float) -> float:
    """Seconds to remember, from `now`, the jti of a message `check_times` accepted with this `iat`.

    It is accepted until `iat + max_age` on a replica's clock (an `exp` only ends that sooner; a message
    without one is bounded by its `iat` alone), however early it first arrived (`iat` up to `leeway` ahead);
    a replica whose clock lags this one's by up to `leeway` (the replicas' clocks must agree within it)
    accepts it until that much later; and one second for the stores' rounding. At most `max_age` + twice
    `leeway` + 1; at least one second (a claim made after the last instant, its effects slow to store).
    """
    return max(1.0, iat + max_age + leeway + 1.0 - now)


def jti_of(payload: Mapping[str, Any]) -> str:
    """The message's `jti`; raises `MessageRefused` when it is missing, empty or too long."""
    jti = payload.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
        raise MessageRefused(Failed.JTI, "jti missing")
    return jti


def jti_key(kind: str, sender: str, jti: str) -> str:
    """The shared-state key remembering one sender's jti (`kind` keeps SETs and logout tokens apart)."""
    return f"{kind}:" + hashlib.sha256(f"{sender}\x00{jti}".encode()).hexdigest()
