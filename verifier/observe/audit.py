"""The audit trail: one structured INFO line per signature check, never the token itself.

A token is identified by its fingerprint, a short prefix of its SHA-256, enough to correlate lines
and useless to an attacker who reads the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from typing import Any

audit_log = logging.getLogger("verifier.audit")

FINGERPRINT_HEX_CHARS = 16  # 64 bits of SHA-256: unique enough to correlate, not a credential


def fingerprint(token_hash: bytes) -> str:
    """The printable fingerprint of a token, from its SHA-256 digest."""
    return token_hash.hex()[:FINGERPRINT_HEX_CHARS]


def token_hash(token: str) -> bytes:
    """SHA-256 of the token: the key of every cache and the source of the fingerprint."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def signature_check(
    *,
    issuer: str,
    kid: str | None,
    alg: str,
    subject: str,
    route: str,
    decision: str,
    reason: str,
    latency_seconds: float,
    token_hash_: bytes,
    door: str,
    level: int = logging.INFO,
    **extra: Any,
) -> None:
    """Writes the audit line for one signature check."""
    if not audit_log.isEnabledFor(level):
        return
    audit_log.log(
        level,
        "signature_check",
        extra={
            "event": "signature_check",
            "issuer": issuer,
            "kid": kid,
            "alg": alg,
            "subject": subject,
            "route": route,
            "decision": decision,
            "reason": reason,
            "latency_ms": round(latency_seconds * 1000, 3),
            "token": fingerprint(token_hash_),
            "door": door,
            **extra,
        },
    )


_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Formats a record as JSON."""
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Sends JSON lines to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
