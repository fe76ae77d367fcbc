"""The audit line (verifier/observe/audit.py): one JSON object per signature check, never the token."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import subprocess
import sys
import time
import types
from collections.abc import Iterator

import pytest
from doorkit import http_exchange, running_verifier

from verifier.observe import audit, logsink

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
    handler's stream swapped for a buffer the test reads (flushed on the way out, as at exit: the audit lines
    wait unformatted until then); pytest's own handlers set aside meanwhile."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, audit._direct_sink
    audit.configure_logging("INFO")
    out = io.StringIO()
    assert audit._direct_sink is not None
    audit._direct_sink.setStream(out)
    try:
        yield out
    finally:
        audit.flush_logs()
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


# The audit line's values wait in the handler and are formatted in batches (`BufferedStderrHandler.defer`):
# the lines must come out byte for byte as when each was formatted in its check, in the order of the checks.


def _formatted_in_the_check(now: float, **kw: object) -> str:
    """The line as `signature_check` formatted it in the check before the batches (kept here verbatim)."""
    literal, h = json.encoder.encode_basestring_ascii, kw["token_hash_"]
    kid, client_id = kw.get("kid"), kw.get("client_id")
    fields = (
        f'"event": "signature_check", "issuer": {literal(kw["issuer"])}, '
        f'"kid": {"null" if kid is None else literal(kid)}, "alg": {literal(kw["alg"])}, '
        f'"subject": {literal(kw["subject"])}, "route": {literal(kw["route"])}, "decision": {literal(kw["decision"])}, '
        f'"reason": {literal(kw["reason"])}, "latency_ms": {kw["latency_seconds"] * 1000:.3f}, '  # type: ignore[operator]
        f'"token": "{h[:8].hex()}", "door": {literal(kw["door"])}, '  # type: ignore[index]
        f'"client_id": {"null" if client_id is None else literal(client_id)}'
    )
    if kw.get("trace_id"):
        fields += f', "trace_id": {literal(kw["trace_id"])}'
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(now)))
    return (
        f'{{"time": "{stamp}.{int(now * 1000) % 1000:03d}Z", "level": "INFO", '
        f'"logger": "verifier.audit", "msg": "signature_check", {fields}}}\n'
    )


VARIANTS: list[dict[str, object]] = [
    {},
    {"kid": None, "client_id": None},
    {"trace_id": "0af7651916cd43dd8448eb211c80319c"},
    {"decision": "deny", "reason": "signature_invalid", "issuer": HOSTILE, "kid": HOSTILE, "alg": "none"},
    {"subject": HOSTILE, "route": HOSTILE, "client_id": HOSTILE, "door": "grpc"},
    {"latency_seconds": 0.0, "token_hash_": audit.token_hash("another")},
    {"latency_seconds": 1.0, "subject": ""},
    {"latency_seconds": 0.0004996},
]
CLOCK = [1764842400.0, 1764842400.0009, 1764842400.9995, 1764842400.9999, 1764842401.5, 1764842461.25, 1.0, 1e9 + 0.001]


@contextlib.contextmanager
def frozen(monkeypatch: pytest.MonkeyPatch, wall: list[float], mono: list[float]) -> Iterator[None]:
    """The wall clock the checks read (next value each call) and a monotonic clock held at `mono[0]`."""
    walls = iter(wall)
    monkeypatch.setattr(audit, "time", types.SimpleNamespace(time=lambda: next(walls), strftime=time.strftime,
                                                             gmtime=time.gmtime))  # fmt: skip
    monkeypatch.setattr(logsink, "time", types.SimpleNamespace(monotonic=lambda: mono[0], strftime=time.strftime,
                                                               gmtime=time.gmtime))  # fmt: skip
    yield


def _checks(variants: list[dict[str, object]]) -> list[dict[str, object]]:
    calls = [{**FIELDS, "latency_seconds": 0.0123456, "token_hash_": HASH, **v} for v in variants]
    for kw in calls:
        audit.signature_check(**kw)  # type: ignore[arg-type]
    return calls


def test_lines_formatted_in_a_batch_are_the_lines_formatted_in_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    wall = [CLOCK[i % len(CLOCK)] for i in range(3 * len(VARIANTS))]
    with served() as out, frozen(monkeypatch, wall, [0.0]):
        calls = _checks(VARIANTS * 3)
        assert out.getvalue() == ""  # all waiting unformatted
    expected = "".join(_formatted_in_the_check(now, **kw) for now, kw in zip(wall, calls, strict=True))
    assert out.getvalue() == expected
    for line, kw in zip(out.getvalue().splitlines(), calls, strict=True):  # and what json.dumps of the dict says
        fields = json.loads(line)
        del fields["time"], fields["level"], fields["logger"], fields["msg"]
        expected_fields = dict(_reference(**{k: kw[k] for k in FIELDS}))
        expected_fields |= {"latency_ms": round(kw["latency_seconds"] * 1000, 3), "token": audit.fingerprint(kw["token_hash_"])}  # type: ignore[operator,arg-type]  # noqa: E501
        if kw.get("trace_id"):
            expected_fields["trace_id"] = kw["trace_id"]
        assert list(fields.items()) == list(expected_fields.items())


def test_a_record_logged_between_audit_lines_comes_out_between_them(monkeypatch: pytest.MonkeyPatch) -> None:
    with served() as out, frozen(monkeypatch, [CLOCK[0]] * 6, [0.0]):
        _checks([{"subject": "one"}, {"subject": "two"}])
        logging.getLogger("verifier.keys").warning("keys refreshed", extra={"event": "refresh"})
        after_warning = out.getvalue()
        _checks([{"subject": "three"}])
        logging.getLogger("verifier.app").info("an info line")  # not urgent: buffered, but after the audit line
        _checks([{"subject": "four"}])
        audit.signature_check(**{**FIELDS, "latency_seconds": 0.001, "token_hash_": HASH, "subject": "five"}, x=1)  # type: ignore[arg-type]
        _checks([{"subject": "six"}])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line.get("subject", line["msg"]) for line in lines] == [
        "one", "two", "keys refreshed", "three", "an info line", "four", "five", "six"
    ]  # fmt: skip
    assert after_warning.count("\n") == 3  # the warning is flushed at once, the audit lines before it with it
    assert lines[6]["x"] == 1


def test_no_more_than_the_bound_waits_unformatted(monkeypatch: pytest.MonkeyPatch) -> None:
    bound = logsink.MAX_PENDING_LINES
    with served() as out, frozen(monkeypatch, [CLOCK[0]] * (2 * bound + 7), [0.0]):
        sink = audit._direct_sink
        assert sink is not None
        for n in range(1, 2 * bound + 8):
            _checks([{"subject": f"s{n}"}])
            assert len(sink._pending) == n % bound  # formatted into the buffer each time the bound is reached
            assert sink.stream.getvalue().count("\n") == n - n % bound  # type: ignore[attr-defined]
    subjects = [json.loads(line)["subject"] for line in out.getvalue().splitlines()]
    assert subjects == [f"s{n}" for n in range(1, 2 * bound + 8)]


def test_lines_are_written_once_the_flush_interval_has_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    mono = [0.0]
    with served() as out, frozen(monkeypatch, [CLOCK[0]] * 3, mono):
        assert audit._direct_sink is not None
        audit._direct_sink.flush_now()  # its clock is now the frozen one
        _checks([{"subject": "a"}, {"subject": "b"}])
        assert out.getvalue() == ""
        mono[0] = logsink.FLUSH_INTERVAL_SECONDS
        _checks([{"subject": "c"}])
        assert [json.loads(line)["subject"] for line in out.getvalue().splitlines()] == ["a", "b", "c"]


def test_a_line_that_cannot_be_formatted_neither_fails_the_check_nor_loses_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with served() as out, frozen(monkeypatch, [CLOCK[0]] * 3, [0.0]):
        _checks([{"subject": "before"}, {"subject": 42, "kid": b"k"}, {"subject": "after"}])  # not str: no literal
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["subject"] for line in lines] == ["before", 42, "after"]
    assert lines[1]["kid"] == "b'k'" and lines[1]["token"] == audit.fingerprint(HASH)


def test_lines_still_waiting_at_exit_are_written() -> None:
    """A process that logs audit lines and exits without flushing: the exit hook formats and writes them."""
    code = (
        "from verifier.observe import audit\n"
        "audit.configure_logging('INFO')\n"
        "for n in range(3):\n"
        "    audit.signature_check(issuer='i', kid=None, alg='ES256', subject=f's{n}', route='r', decision='allow',\n"
        "                          reason='ok', latency_seconds=0.001, token_hash_=bytes(32), door='http')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert [json.loads(line)["subject"] for line in done.stderr.splitlines()] == ["s0", "s1", "s2"]


def test_configuring_logging_again_writes_the_lines_still_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    with served() as out, frozen(monkeypatch, [CLOCK[0]] * 2, [0.0]):
        _checks([{"subject": "x"}, {"subject": "y"}])
        audit.configure_logging("INFO")  # a new handler: the old one's lines come out first
        assert [json.loads(line)["subject"] for line in out.getvalue().splitlines()] == ["x", "y"]


def _unsigned(header: dict[str, object], payload: dict[str, object]) -> str:
    def b64(document: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(document, ensure_ascii=False).encode()).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(payload)}.AAAA"


async def test_a_hostile_request_cannot_make_an_audit_line_longer_than_a_log_record() -> None:
    """The attacker's view: a forged token's iss and kid are the sender's words, the route the client's path;
    each written as `\\uXXXX` escapes (twelve bytes for one emoji), they made an audit line of hundreds of KiB.
    Container runtimes split a line past 16 KiB (Docker, containerd's max_container_log_line_size) into
    records that are not JSON: every audit line stays within one, its long values cut and marked."""
    emoji = "\U0001f600"
    token = _unsigned({"alg": "ES256", "kid": emoji * 200, "typ": "JWT"}, {"iss": emoji * 1000, "sub": emoji * 50})
    path = b"/" + b"\xe9" * 24_000
    request = (
        b"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer " + token.encode()
        + b"\r\nX-Forwarded-Uri: " + path + b"\r\n\r\n"
    )  # fmt: skip
    with served() as out:
        async with running_verifier() as (app, _):
            answer = await http_exchange(app.ports.http, request)
            assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        audit.flush_logs()
    lines = [line for line in out.getvalue().splitlines() if '"signature_check"' in line]
    assert len(lines) == 1
    (line,) = lines
    assert len(line) + 1 <= logsink.MAX_LINE_BYTES and line.isascii(), len(line)
    fields = json.loads(line)
    assert fields["truncated"] is True and fields["decision"] == "deny" and fields["kid"].startswith(emoji * 100)
    assert fields["issuer"].startswith(emoji * 100) and fields["route"].startswith("GET /" + "\xe9" * 100)


def test_any_record_past_the_bound_is_one_line_within_it() -> None:
    """The other audit lines (a revoked token's, the admin API's, WebAuthn's) carry the request's route and the
    caller's words as well: a record past the bound has its long values cut, a traceback its end kept."""
    hostile = "\U0001f600" * 30_000
    record = logging.makeLogRecord(
        {"name": "verifier.audit", "levelno": logging.WARNING, "levelname": "WARNING", "msg": "token_revoked",
         "event": "token_revoked", "route": "GET /" + hostile, "subject": hostile, "kids": [hostile] * 50}
    )  # fmt: skip
    try:
        raise ValueError("innermost " + hostile)
    except ValueError:
        record.exc_info = sys.exc_info()
    line = audit.JsonFormatter().format(record)
    assert len(line) + 1 <= logsink.MAX_LINE_BYTES and line.isascii() and "\n" not in line
    fields = json.loads(line)
    assert fields["truncated"] is True and fields["event"] == "token_revoked" and fields["level"] == "WARNING"
    assert fields["route"].startswith("GET /\U0001f600") and fields["exc"].endswith("\U0001f600")
    short = logging.makeLogRecord({"name": "verifier.audit", "msg": "admin_refused", "peer": "127.0.0.1"})
    assert "truncated" not in json.loads(audit.JsonFormatter().format(short))


@pytest.mark.timeout(20)
def test_a_traceback_whose_last_character_does_not_fit_the_room_left_ends_the_line() -> None:
    """A record past the bound whose cut line leaves a few characters of room for its traceback, the traceback
    ending in a character whose escape is longer than that room (an emoji from the request in the exception's
    message: twelve characters): halving a one-character tail kept it whole, and the formatter looped for ever
    (the event loop with it). With no room left at all, the traceback's "…" mark alone took the line past the
    bound. Every room from 0 to 200 characters is tried."""
    many = {f"f{n:03d}": "a" * 300 for n in range(74)}  # cut to 200 each: a cut line of about 16.2 KiB
    try:
        raise ValueError("innermost \U0001f600")
    except ValueError:
        exc_info = sys.exc_info()
    for pad in range(201):
        record = logging.makeLogRecord(
            {"name": "verifier", "levelno": logging.ERROR, "levelname": "ERROR", "msg": "endpoint failed", **many,
             "path": "/" + "p" * pad}
        )  # fmt: skip
        record.exc_info = exc_info
        line = audit.JsonFormatter().format(record)
        assert len(line) + 1 <= logsink.MAX_LINE_BYTES and line.isascii() and "\n" not in line, pad
        fields = json.loads(line)
        assert fields["truncated"] is True and fields["exc"].startswith("\u2026"), pad


def test_a_line_formatted_by_the_fallback_stays_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback for values that are not what the pipeline passes (`_pending_line_or_fallback`) writes them
    with json.dumps: a long issuer beside such a value made a line of 240 KB, past what a container runtime keeps
    as one record. Its long values are cut and the line says `truncated`, as the direct path's do."""
    emoji = "\U0001f600"
    with served() as out, frozen(monkeypatch, [CLOCK[0]] * 3, [0.0]):
        _checks([{"subject": "before"}, {"subject": 42, "issuer": emoji * 20_000, "kid": b"k" * 30_000},
                 {"subject": "after", "issuer": emoji * 20_000}])  # fmt: skip
    text = out.getvalue()
    assert text.isascii()
    lines = text.splitlines()
    assert all(len(line) + 1 <= logsink.MAX_LINE_BYTES for line in lines), [len(line) for line in lines]
    fields = [json.loads(line) for line in lines]
    assert [f["subject"] for f in fields] == ["before", 42, "after"]
    assert fields[1]["truncated"] is True and fields[1]["issuer"].startswith(emoji * 200)
    assert fields[1]["kid"].startswith("b'kkk") and fields[1]["token"] == audit.fingerprint(HASH)
    assert "truncated" not in fields[0] and fields[2]["truncated"] is True


def test_a_line_with_a_second_client_stays_within_the_bound() -> None:
    """A token naming two clients has its `azp` on the line, after the fields the bound was checked on: the
    client's long path (an admitted token's route, not cut while the fields alone fit) and a 200-character `azp`
    made a line past the bound. The bound counts the extra fields too."""
    emoji = "\U0001f600"
    for path_chars in (1_000, 1_300, 1_340, 1_400):
        with served() as out:
            _line(route="GET /" + emoji * path_chars, azp=emoji * 200 + "\u2026")
        (line,) = out.getvalue().splitlines()
        assert len(line) + 1 <= logsink.MAX_LINE_BYTES, (path_chars, len(line))
        fields = json.loads(line)
        assert fields["azp"].startswith(emoji * 200) and fields["route"].startswith("GET /" + emoji * 195)
        assert fields.get("truncated", False) is (len(json.dumps(fields["route"])) < path_chars * 12)
