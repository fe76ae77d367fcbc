"""The audit trail: one structured INFO line per signature check, never the token itself.

A token is identified by its fingerprint, a short prefix of its SHA-256, enough to correlate lines
and useless to an attacker who reads the log.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import time
from typing import Any

from verifier.observe.logsink import (
    CUT_CHARS,
    MAX_LINE_BYTES,
    BufferedStderrHandler,
    JsonFormatter,
    cut,
    cut_any,
)

audit_log = logging.getLogger("verifier.audit")

FINGERPRINT_HEX_CHARS = 16  # 64 bits of SHA-256: unique enough to correlate, not a credential
_FINGERPRINT_BYTES = FINGERPRINT_HEX_CHARS // 2


def fingerprint(token_hash: bytes) -> str:
    """The printable fingerprint of a token, from its SHA-256 digest."""
    return token_hash[:_FINGERPRINT_BYTES].hex()


def token_hash(token: str) -> bytes:
    """SHA-256 of the token: the key of every cache and the source of the fingerprint."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def trace_fields(trace_id: str) -> dict[str, str]:
    """The audit line's `trace_id` field when the decision has a trace (W3C trace id, hex), else nothing."""
    return {"trace_id": trace_id} if trace_id else {}


_literal = json.encoder.encode_basestring_ascii  # one str -> its JSON string literal, in C (as json.dumps writes it)


def _optional(value: str | None) -> str:
    return "null" if value is None else _literal(value)


# The line's fields that repeat from one line to the next, written once as JSON and kept: the opening ones
# for an admitted token's (issuer, kid, alg), which are its issuer's keys (a refused token's values are
# the sender's choice: written anew each time, never kept), and the decision, reason and door, which come
# from the catalogue and the code. Bounded all the same: past the bound they are written anew.
_OPENINGS: dict[tuple[str, str | None, str], str] = {}
_CATALOGUED: dict[str, str] = {}
MAX_KEPT_FIELDS = 1024  # per kind of field


def _opening(issuer: str, kid: str | None, alg: str, kept: bool) -> str:
    key = (issuer, kid, alg)
    opening = _OPENINGS.get(key)
    if opening is None:
        opening = (
            f'"event": "signature_check", "issuer": {_literal(issuer)}, "kid": {_optional(kid)}, '
            f'"alg": {_literal(alg)}, '
        )
        if kept and len(_OPENINGS) < MAX_KEPT_FIELDS:
            _OPENINGS[key] = opening
    return opening


def _catalogued(value: str) -> str:
    """The JSON literal of a decision, reason code or door name."""
    literal = _CATALOGUED.get(value)
    if literal is None:
        literal = _literal(value)
        if len(_CATALOGUED) < MAX_KEPT_FIELDS:
            _CATALOGUED[value] = literal
    return literal


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
    client_id: str | None = None,
    trace_id: str = "",
    azp: str | None = None,
    **extra: Any,
) -> None:
    """Writes the audit line for one signature check; `trace_id` (W3C, hex) when the decision has a trace; `azp`
    a token's second client (`verifier.principal.clients_of`), rare: such a line takes the general path."""
    if not audit_log.isEnabledFor(logging.INFO):
        return
    if azp is not None:
        extra = {"azp": azp, **extra}
    sink = _direct_sink
    direct = sink is not None and logging.root.handlers == [sink] and audit_log.propagate and not audit_log.handlers
    if direct and not extra:
        # Our own configuration (one buffered JSON handler on the root logger): the line's values go to its
        # list of pending lines, formatted in batches (`_format_pending`) before anything else is written. The
        # logging machinery (record, filters, handler lock) costs as much as the line itself, and formatting
        # one line between two signature checks pulls its code and fresh memory into the caches each time.
        sink.defer(  # type: ignore[union-attr]
            (time.time(), issuer, kid, alg, subject, route, decision, reason, latency_seconds, token_hash_, door,
             client_id, trace_id)
        )  # fmt: skip
        return
    fields = _fields(
        issuer, kid, alg, subject, route, decision, reason, latency_seconds, token_hash_, door, client_id, trace_id,
        extra,
    )  # fmt: skip
    if direct:
        sink.write_line(_line(time.time(), fields))  # type: ignore[union-attr]
        return
    # Serialized here, once: the formatter writes it as is (no per-record attribute walk).
    audit_log.info("signature_check", extra={"_json_fields": fields})


def _fields(
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
    client_id: str | None,
    trace_id: str,
    extra: dict[str, Any] | None = None,
    cut_: bool = False,
) -> str:
    # Its fields are written as JSON literals one by one (what json.dumps of the same dict writes, key for
    # key; the latency with its three decimals always written), without building the dict and an encoder.
    # `extra`: fields after them (a token's `azp`), counted in the bound too; `cut_`: the values are cut already.
    fields = (
        f"{_opening(issuer, kid, alg, decision == 'allow')}"
        f'"subject": {_literal(subject)}, "route": {_literal(route)}, "decision": {_catalogued(decision)}, '
        f'"reason": {_catalogued(reason)}, "latency_ms": {latency_seconds * 1000:.3f}, '
        f'"token": "{token_hash_[:_FINGERPRINT_BYTES].hex()}", "door": {_catalogued(door)}, '
        f'"client_id": {_optional(client_id)}'
    )
    if trace_id:  # the gateway's trace (its traceparent), or the span's when tracing is on
        fields += f', "trace_id": {_literal(trace_id)}'
    if extra:
        fields += ", " + json.dumps(extra, default=str)[1:-1]
    if cut_:
        return fields + ', "truncated": true'
    if len(fields) > _MAX_FIELDS_CHARS:  # a forged token's iss and kid, the client's path: see logsink.MAX_LINE_BYTES
        values = (
            cut(issuer), None if kid is None else cut(kid), cut(alg), cut(subject), cut(route), decision, reason,
            latency_seconds, token_hash_, door, None if client_id is None else cut(client_id), trace_id,
        )  # fmt: skip
        fields = _fields(*values, None if extra is None else cut_any(extra), True)
        if extra and len(fields) > _MAX_FIELDS_CHARS:  # extra fields that do not fit even cut: left out
            fields = _fields(*values, None, True)
    return fields


# What `_line` puts around the fields (time, level, logger, msg: 108 characters) and the newline, with room to spare.
_MAX_FIELDS_CHARS = MAX_LINE_BYTES - 160


def _line(now: float, fields: str) -> str:
    """The whole line as the JSON formatter writes a record created at `now` (epoch seconds)."""
    second = int(now)
    if second != _stamp[0]:  # strftime once per second, not once per line
        _stamp[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return (
        f'{{"time": "{_stamp[1]}.{int(now * 1000) % 1000:03d}Z", "level": "INFO", '
        f'"logger": "verifier.audit", "msg": "signature_check", {fields}}}'
    )


def _pending_line(values: tuple[Any, ...]) -> str:
    return _line(values[0], _fields(*values[1:]))


def _format_pending(pending: list[tuple[Any, ...]]) -> str:
    """The pending audit lines (their values as `signature_check` kept them), formatted in one go, in order.

    A line whose values cannot be formatted (not what the pipeline passes) is written by json.dumps with
    every value as text; one that cannot be written at all is left out: the others are still written."""
    try:
        return "\n".join(map(_pending_line, pending)) + "\n"
    except Exception:
        return "".join(line + "\n" for line in map(_pending_line_or_fallback, pending) if line is not None)


def _pending_line_or_fallback(values: tuple[Any, ...]) -> str | None:
    with contextlib.suppress(Exception):
        return _pending_line(values)
    try:
        issuer, kid, alg, subject, route, decision, reason, latency, digest, door, client_id, trace_id = values[1:]
        fields = {
            "event": "signature_check", "issuer": issuer, "kid": kid, "alg": alg, "subject": subject,
            "route": route, "decision": decision, "reason": reason,
            "latency_ms": round(latency * 1000, 3) if isinstance(latency, float) else latency,
            "token": fingerprint(digest) if isinstance(digest, bytes) else None, "door": door, "client_id": client_id,
        }  # fmt: skip
        if trace_id:
            fields["trace_id"] = trace_id
        body = json.dumps(fields, default=str)[1:-1]
        for limit in (CUT_CHARS, _LAST_CUT_CHARS):  # past the bound: cut as `_fields` cuts, then shorter still
            if len(body) <= _MAX_FIELDS_CHARS:
                break
            body = json.dumps({k: _short(v, limit) for k, v in fields.items()})[1:-1] + ', "truncated": true'
        return _line(values[0], body)
    except Exception:
        return None


_LAST_CUT_CHARS = 16  # every value of a fallback line this short fits the bound, whatever its escapes


def _short(value: Any, limit: int) -> Any:
    """A fallback line's value within `limit` characters: null, a boolean or a number as it is, unless written
    longer; anything else as text, cut and marked."""
    if value is None or isinstance(value, bool | float):
        return value
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return value if isinstance(value, int) else text
    return text[:limit] + "\u2026"


_direct_sink: BufferedStderrHandler | None = None  # set by configure_logging: our own handler
_stamp: list[Any] = [-1, ""]  # [epoch second, its ISO form]


def flush_logs() -> None:
    """Flushes buffered log lines (periodically and on shutdown)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, BufferedStderrHandler):
            handler.flush_now()


def configure_logging(level: str = "INFO") -> None:
    """Sends JSON lines to stderr (buffered, see BufferedStderrHandler)."""
    global _direct_sink
    if _direct_sink is not None:  # its pending lines are written before another handler takes over
        _direct_sink.flush_now()
    handler = BufferedStderrHandler(_format_pending)
    atexit.register(flush_logs)
    handler.setFormatter(JsonFormatter())
    _direct_sink = handler
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
