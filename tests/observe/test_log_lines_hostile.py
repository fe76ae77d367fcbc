"""Log lines against an attacker who chooses every value: property tests.

Invariants, for any input (a forged token's iss, kid, alg, typ and sub, the client's path and header values,
with quotes, newlines, controls, U+2028, lone surrogates, emoji, and values tens of KiB long):
- every line written (the audit line on its fast and fallback paths, any other record through `JsonFormatter`)
  is one JSON object on one line, strict JSON (no NaN/Infinity), ASCII, within `logsink.MAX_LINE_BYTES` with
  its newline, each value as given or cut and marked (`"truncated": true`);
- through the pipeline, no line carries a credential: a token's signature segment, the DPoP proof, a cookie.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import json
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import FrozenClock
from tokenkit import (
    AUDIENCE,
    DISCOVERY_URL,
    ISSUER,
    JWKS_URL,
    KIDS,
    NOW,
    FakeFetcher,
    SigningKeys,
    b64,
    claims,
    discovery_document,
    issuer_settings,
    public_jwk,
)

from verifier.app import App
from verifier.doors.forward_auth import attributes_from_http
from verifier.observe import audit, logsink
from verifier.reasons import CATALOGUE
from verifier.settings import Settings

FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
ELLIPSIS = "\u2026"


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


STRICT = json.JSONDecoder(parse_constant=_not_json)  # NaN, Infinity: Python's extension, not JSON

# Any code point, lone surrogates included; the characters whose escapes are longest; long runs of them.
any_char = st.characters(exclude_categories=())
nasty = ["\U0001f600", "\x00", "\n", "\r", '"', "\\", "\u2028", "\ud800", "\udcff", "\x1b[31m", "é", "\x7f", "}"]
hostile = (
    st.text(any_char, max_size=40)
    | st.sampled_from(nasty)
    | st.builds(lambda piece, n: piece * n, st.sampled_from([*nasty, "a"]), st.integers(0, 20_000))
)


def _line_ok(line: str) -> dict[str, Any]:
    """`line` is one strict JSON object within the bound (its newline included), in ASCII; returns it parsed."""
    assert len(line) + 1 <= logsink.MAX_LINE_BYTES, len(line)
    assert line.isascii() and "\n" not in line and "\r" not in line
    value = STRICT.decode(line)
    assert isinstance(value, dict)
    return value


def _same_or_cut(written: Any, given_: str, truncated: bool) -> None:
    """A value on the line is the one given, or (on a line marked truncated) its start, marked with "…"."""
    if written == given_:
        return
    assert truncated and isinstance(written, str) and written.endswith(ELLIPSIS), (written[:40], given_[:40])
    assert given_.startswith(written[:-1])


@contextlib.contextmanager
def served() -> Iterator[Callable[[], list[str]]]:
    """`configure_logging` as `verifier serve` calls it, its stream a buffer (inside the test's body: pytest's
    own handlers, added for the call, set aside); yields a function returning the lines written since its last
    call, the pending audit lines formatted first."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, audit._direct_sink
    audit.configure_logging("INFO")
    out = io.StringIO()
    assert audit._direct_sink is not None
    audit._direct_sink.setStream(out)

    def drain() -> list[str]:
        audit.flush_logs()
        text = out.getvalue()
        out.seek(0)
        out.truncate()
        assert text == "" or text.endswith("\n")
        return text.splitlines()

    try:
        yield drain
    finally:
        audit.flush_logs()
        root.handlers[:], audit._direct_sink = saved[0], saved[2]
        root.setLevel(saved[1])


# -- the audit line ------------------------------------------------------------------------------------------

REASONS = sorted(CATALOGUE)


@FAST
@given(
    issuer=hostile,
    kid=st.none() | hostile,
    alg=hostile,
    subject=hostile,
    route=hostile,
    client_id=st.none() | hostile,
    azp=st.none() | hostile,
    allowed=st.booleans(),
    reason=st.sampled_from(REASONS),
    door=st.sampled_from(["http", "grpc", "ext_authz"]),
    odd=st.sampled_from([None, "subject", "kid"]),
)
def test_every_audit_line_is_one_bounded_json_object_whatever_its_values(
    issuer: str,
    kid: str | None,
    alg: str,
    subject: str,
    route: str,
    client_id: str | None,
    azp: str | None,
    allowed: bool,
    reason: str,
    door: str,
    odd: str | None,
) -> None:
    """The fast path (values deferred, formatted in a batch), the general one (`azp`) and the deferred line's
    fallback (a value that is not text, `odd`: not what the pipeline passes) all write one line per check, each
    within bound."""
    values: dict[str, Any] = {
        "issuer": issuer, "kid": kid, "alg": alg, "subject": subject, "route": route, "client_id": client_id,
        "decision": "allow" if allowed else "deny", "reason": "ok" if allowed else reason, "door": door,
    }  # fmt: skip
    if odd is not None and azp is None:  # only the deferred line has a fallback: the pipeline passes text
        values[odd] = 42
    token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.c2VjcmV0LXNpZ25hdHVyZQ"
    with served() as drain:
        audit.signature_check(**values, latency_seconds=0.001, token_hash_=audit.token_hash(token), azp=azp)
        (line,) = drain()
    fields = _line_ok(line)
    truncated = fields.get("truncated") is True
    assert fields["event"] == "signature_check" and fields["token"] == audit.fingerprint(audit.token_hash(token))
    for name, value in values.items():
        if isinstance(value, str):
            _same_or_cut(fields[name], value, truncated)
        else:
            assert fields[name] == value
    if azp is not None:
        _same_or_cut(fields["azp"], azp, truncated)
    assert "c2VjcmV0" not in line and "eyJ" not in line


# -- every other record --------------------------------------------------------------------------------------

nested = st.recursive(
    hostile | st.integers() | st.booleans() | st.none(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(any_char, max_size=8), inner, max_size=5),
    max_leaves=8,
)


@FAST
@given(
    message=hostile,
    fields=st.dictionaries(
        st.sampled_from(["path", "route", "peer", "description", "error", "issuer", "kids", "credentials"]),
        nested,
        max_size=8,
    ),
    level=st.sampled_from([logging.INFO, logging.WARNING, logging.ERROR]),
    failure=st.none() | hostile,
)
def test_every_record_is_one_bounded_json_object_whatever_its_fields(
    message: str, fields: dict[str, Any], level: int, failure: str | None
) -> None:
    """`log.<level>("...: %s", value, extra={...})` with the request's words anywhere (the message's argument,
    the fields, nested lists and mappings, an exception's message in the traceback): one line within bound."""
    log = logging.getLogger("verifier.doors.forward_auth")
    with served() as drain:
        if failure is None:
            log.log(level, "refused: %s", message, extra={"event": "hostile", **fields})
        else:
            try:
                raise ValueError(failure)
            except ValueError:
                log.log(level, "endpoint failed: %s", message, extra={"event": "hostile", **fields}, exc_info=True)
        (line,) = drain()
    written = _line_ok(line)
    truncated = written.get("truncated") is True
    assert written["event"] == "hostile" and written["logger"] == "verifier.doors.forward_auth"
    _same_or_cut(written["msg"], f"refused: {message}" if failure is None else f"endpoint failed: {message}", truncated)
    if failure is not None:
        assert written["exc"].startswith("Traceback") or (truncated and written["exc"].startswith(ELLIPSIS))


# -- through the pipeline: no credential on any line -----------------------------------------------------------


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


@pytest.fixture(scope="module")
def app(loop: asyncio.AbstractEventLoop, keys: SigningKeys) -> App:
    fetcher = FakeFetcher()
    fetcher.serve(DISCOVERY_URL, discovery_document())
    fetcher.serve(JWKS_URL, {"keys": [public_jwk(keys.es256, KIDS["ES256"])]})
    application = App(
        Settings(grpc=None, http=None, metrics=None, issuers=(issuer_settings(),)),
        fetcher=fetcher,
        clock=FrozenClock(NOW),
    )
    issuer_keys = application.keys.get(ISSUER)
    assert issuer_keys is not None
    loop.run_until_complete(issuer_keys.refresh())
    return application


def _segment(value: Any) -> str:
    return b64(json.dumps(value).encode())


_FRESH = itertools.count()  # a jti of its own: no token is a cache's answer (which writes no line)


def _signed(keys: SigningKeys, sub: str, client_id: str) -> str:
    return jwt.encode(
        claims(sub=sub, client_id=client_id, jti=f"j{next(_FRESH)}"), keys.es256, algorithm="ES256",
        headers={"kid": KIDS["ES256"], "typ": "at+jwt"},
    )  # fmt: skip


@FAST
@given(
    iss=st.sampled_from([ISSUER]) | hostile,
    kid=st.sampled_from([KIDS["ES256"]]) | hostile,
    alg=st.sampled_from(["ES256", "RS256", "none", "HS256"]) | hostile,
    typ=hostile,
    sub=hostile,
    signed=st.booleans(),
    path=hostile,
    header_values=st.dictionaries(
        st.sampled_from(["x-forwarded-uri", "x-forwarded-host", "x-forwarded-method", "user-agent", "traceparent"]),
        hostile,
        max_size=5,
    ),
    secret=st.binary(min_size=24, max_size=48),
)
def test_no_line_the_pipeline_writes_carries_a_credential(
    app: App,
    loop: asyncio.AbstractEventLoop,
    keys: SigningKeys,
    iss: str,
    kid: str,
    alg: str,
    typ: str,
    sub: str,
    signed: bool,
    path: str,
    header_values: dict[str, str],
    secret: bytes,
) -> None:
    """A forged token (any iss, kid, alg, typ, sub; its signature a secret) or a genuine one (any sub, any
    client_id), beside a DPoP proof and a cookie holding secrets, and any path and forwarded headers: every line
    the decision writes is one bounded JSON object, and no secret is on it."""
    signature = base64.urlsafe_b64encode(secret).rstrip(b"=").decode()
    if signed:
        token = _signed(keys, sub, sub[:64])
        signature = token.rsplit(".", 1)[1]
    else:
        header = {"alg": alg, "kid": kid, "typ": typ}
        payload = {
            "iss": iss,
            "sub": sub,
            "aud": AUDIENCE,
            "exp": int(NOW) + 300,
            "client_id": sub,
            "jti": f"j{next(_FRESH)}",
        }
        token = f"{_segment(header)}.{_segment(payload)}.{signature}"
    dpop = f"{_segment({'typ': 'dpop+jwt', 'alg': 'ES256'})}.{_segment({'htm': 'GET'})}.{signature[::-1]}"
    cookie = f"session={signature[1:]}x"
    headers = {**header_values, "authorization": f"Bearer {token}", "dpop": dpop, "cookie": cookie}
    target = b"/v1/forward-auth" + (path.encode("utf-8", "surrogatepass")[:2000] or b"/")  # a path told
    attrs = attributes_from_http("GET", target, headers, "127.0.0.1")
    with served() as drain:
        loop.run_until_complete(asyncio.wait_for(app.pipeline.decide(attrs, "http"), 5))
        lines = drain()
    assert any('"signature_check"' in line for line in lines)  # the audit line, at least
    for line in lines:
        _line_ok(line)
        for credential in (token, signature, signature[::-1], signature[1:], dpop):
            assert credential not in line


@pytest.mark.timeout(60)
def test_a_hostile_traceback_never_hangs_the_formatter() -> None:
    """The exception's message the request's words, every room the cut line leaves: see test_audit.py; here
    with any character at the traceback's end (controls: six characters; emoji: twelve)."""
    many = {f"f{n:03d}": "a" * 300 for n in range(74)}
    for last in ("\x00", "\U0001f600", "\ud800", "\u2028", '"'):
        try:
            raise ValueError("innermost " + last * 3)
        except ValueError:
            exc_info = sys.exc_info()
        for pad in range(0, 201, 3):
            record = logging.makeLogRecord(
                {"name": "verifier", "levelno": logging.ERROR, "levelname": "ERROR", "msg": "m", **many,
                 "path": "/" + "p" * pad}
            )  # fmt: skip
            record.exc_info = exc_info
            _line_ok(logsink.JsonFormatter().format(record))
