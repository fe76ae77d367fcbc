"""The audit line (verifier/observe/audit.py): one JSON object per signature check, never the token."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator

import pytest

from verifier.observe import audit

HOSTILE = 'kid "quoted"\n\x00\x1b[31m é \u2028 \ud800'  # a header value is the sender's choice: every escape


FIELDS = {  # as the pipeline passes them, in the line's order
    "issuer": "https://issuer.test",
    "kid": "k1",
    "alg": "ES256",
    "subject": "alice",
    "route": "GET /orders",
    "decision": "allow",
    "reason": "ok",
    "door": "http",
    "client_id": "app",
}
HASH = audit.token_hash("header.payload.signature")


def _line(**overrides: object) -> None:
    fields = {**FIELDS, "latency_seconds": 0.0123456, "token_hash_": HASH, **overrides}
    audit.signature_check(**fields)  # type: ignore[arg-type]


def _reference(**overrides: object) -> dict[str, object]:
    """What json.dumps of the fields as a dict says, key for key (the line's format before it was hand-built)."""
    names = list(FIELDS)
    line: dict[str, object] = {"event": "signature_check", **{k: FIELDS[k] for k in names[:7]}}
    line |= {"latency_ms": 12.346, "token": audit.fingerprint(HASH), **{k: FIELDS[k] for k in names[7:]}}
    return line | overrides


@contextlib.contextmanager
def served() -> Iterator[io.StringIO]:
    """`configure_logging` as `verifier serve` calls it (the direct write into its buffered handler), the
    handler's stream swapped for a buffer the test reads; pytest's own handlers set aside meanwhile."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, audit._direct_sink
    audit.configure_logging("INFO")
    out = io.StringIO()
    assert audit._direct_sink is not None
    audit._direct_sink.setStream(out)
    try:
        yield out
    finally:
        root.handlers[:], audit._direct_sink = saved[0], saved[2]
        root.setLevel(saved[1])


def test_the_served_line_is_one_json_object_with_every_field_in_order() -> None:
    with served() as out:
        _line()
        _line(kid=None, client_id=None, trace_id="0af7651916cd43dd8448eb211c80319c")
    lines = [json.loads(text) for text in out.getvalue().splitlines()]
    assert len(lines) == 2
    first, second = lines
    head = [first.pop(k) for k in ("time", "level", "logger", "msg")]
    assert head[1:] == ["INFO", "verifier.audit", "signature_check"]
    assert list(first.items()) == list(_reference().items())
    second = {k: v for k, v in second.items() if k not in ("time", "level", "logger", "msg")}
    assert second == _reference(kid=None, client_id=None, trace_id="0af7651916cd43dd8448eb211c80319c")


def test_hostile_header_values_stay_inside_their_field() -> None:
    """A kid, issuer or subject with quotes, newlines, controls or non-ASCII is escaped: one line, same value."""
    with served() as out:
        _line(kid=HOSTILE, issuer=HOSTILE, subject=HOSTILE, route=HOSTILE, client_id=HOSTILE)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.isascii()
    line = json.loads(text)
    assert line["kid"] == line["issuer"] == line["subject"] == line["route"] == line["client_id"] == HOSTILE
    assert json.dumps(HOSTILE) in text  # escaped exactly as json.dumps escapes it


def test_the_logging_path_carries_the_same_fields(caplog: pytest.LogCaptureFixture) -> None:
    """Under another logging setup (tests, an embedding app), the fields go on the record, pre-serialized."""
    caplog.set_level(logging.INFO, logger="verifier.audit")
    _line(extra_field=["a", 1])
    (record,) = [r for r in caplog.records if r.msg == "signature_check"]
    assert json.loads("{" + record.__dict__["_json_fields"] + "}") == _reference(extra_field=["a", 1])
    formatted = json.loads(audit.JsonFormatter().format(record))
    assert formatted["kid"] == "k1" and formatted["level"] == "INFO"


def test_the_token_is_never_written() -> None:
    with served() as out:
        _line(token_hash_=audit.token_hash("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"))
    text = out.getvalue()
    assert "eyJ" not in text and "c2ln" not in text
    assert json.loads(text)["token"] == audit.fingerprint(audit.token_hash("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"))
