"""The first-seen path after its restructuring for speed (#24 goal 2): the same answers, the same audit trail.

- One SHA-256 per Bearer token: the caches' key for `Bearer <token>` is the token's own hash, which the audit
  fingerprint reuses. Every other spelling of the Authorization value still gets the token's fingerprint, and
  never another spelling's cache entry.
- The HTTP head is built from shared pieces: byte for byte what the line-by-line builder wrote.
- A first-seen token's answer is the answer the same request gets once the token is cached.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
from doorkit import http_exchange, running_verifier

from verifier.decision import REASON_HEADER, Decision, allow
from verifier.doors.refusals import refuse
from verifier.errors import Forbidden, InvalidToken, MissingToken, RateLimited
from verifier.observe import audit
from verifier.pipeline import cache_key
from verifier.principal import Principal
from verifier.settings import EdgeCacheSettings


def _request(authorization: str, path: str = "/orders") -> bytes:
    return (
        "GET /v1/forward-auth HTTP/1.1\r\nHost: verifier\r\nX-Forwarded-Method: GET\r\n"
        f"X-Forwarded-Proto: https\r\nX-Forwarded-Host: api.example.test\r\nX-Forwarded-Uri: {path}\r\n"
        f"Authorization: {authorization}\r\n\r\n"
    ).encode()


def _audited(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    lines = [r for r in caplog.records if r.name == "verifier.audit" and r.msg == "signature_check"]
    return [json.loads("{" + r.__dict__["_json_fields"] + "}") for r in lines]


async def test_every_spelling_of_the_authorization_value_is_fingerprinted_by_the_token_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`Bearer <token>` shares its hash with the fingerprint; `bearer`, extra spaces and another scheme hash the
    token apart, so the audit line names the token the same way whatever the spelling."""
    caplog.set_level(logging.INFO, logger="verifier.audit")
    async with running_verifier() as (app, idp):
        spellings = ["Bearer {}", "bearer {}", "Bearer  {}", "BEARER {}", "DPoP {}"]
        tokens = [idp.mint() for _ in spellings]
        answers = [
            await http_exchange(app.ports.http, _request(s.format(t))) for s, t in zip(spellings, tokens, strict=True)
        ]
    assert [a.split(b" ", 2)[1] for a in answers] == [b"200", b"200", b"200", b"200", b"401"]  # DPoP: no proof
    lines = _audited(caplog)
    assert [line["token"] for line in lines] == [audit.fingerprint(audit.token_hash(t)) for t in tokens]
    assert all(t not in json.dumps(lines) for t in tokens)


async def test_a_token_admitted_as_bearer_is_not_answered_from_that_entry_under_another_spelling() -> None:
    async with running_verifier() as (app, idp):
        token = idp.mint()
        first = await http_exchange(app.ports.http, _request(f"Bearer {token}"))
        assert first.startswith(b"HTTP/1.1 200")
        assert app.pipeline._positive.get(cache_key(f"Bearer {token}")) is not None
        assert cache_key(f"DPoP {token}") != cache_key(f"Bearer {token}") != cache_key(f"Bearer  {token}")
        # The same token under the DPoP scheme is a DPoP-bound presentation: refused for want of a proof,
        # never the Bearer allow.
        dpop = await http_exchange(app.ports.http, _request(f"DPoP {token}"))
        assert dpop.startswith(b"HTTP/1.1 401") and b"dpop" in dpop.lower()


async def test_a_first_seen_answer_is_byte_for_byte_the_cached_answer() -> None:
    async with running_verifier({"edge_cache": EdgeCacheSettings(max_age_seconds=30)}) as (app, idp):
        tokens = (idp.mint(), idp.mint(scope="read  write", claims={"roles": ["b", "a"]}), idp.mint(sub="é\u2028x"))
        for token in tokens:
            first = await http_exchange(app.ports.http, _request(f"Bearer {token}"))
            cached = await http_exchange(app.ports.http, _request(f"Bearer {token}"))
            assert first == cached and first.startswith(b"HTTP/1.1 200")


_PHRASES = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 429: "Too Many Requests"}


def _reference_head(decision: Decision) -> bytes:
    """The HTTP head as the door wrote it before (one line at a time)."""
    lines = [f"HTTP/1.1 {decision.status} {_PHRASES.get(decision.status, 'Status')}"]
    if decision.allowed:
        headers = decision.upstream_headers + decision.answer_headers + decision.client_headers
    else:
        headers = decision.response_headers
    lines.extend(f"{name}: {value}" for name, value in headers)
    lines.append(f"{REASON_HEADER}: {decision.reason}")
    if decision.cache_max_age > 0:
        lines.append(f"x-accel-expires: {decision.cache_max_age - 1}")
        lines.append(f"cache-control: private, max-age={decision.cache_max_age}")
    else:
        lines.append("x-accel-expires: 0")
        lines.append("cache-control: no-store")
    if decision.body:
        lines.append("content-type: application/json")
    lines.append(f"content-length: {len(decision.body)}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


PRINCIPAL = Principal("https://issuer.test", "alice", "app", ("read", "write"), frozenset({"b", "a"}), 2e9, {})
DECISIONS = [
    allow(PRINCIPAL),
    allow(PRINCIPAL, cache_max_age=30),
    allow(PRINCIPAL._replace(subject="al\r\nice é", scopes=(), roles=frozenset()), cache_max_age=1),
    allow(PRINCIPAL, headers=(("x-tenant", "acme"),), answer_headers=(("x-kong-consumer-id", "c1"),), renew_at=9.0),
    refuse(MissingToken("no access token"), realm="api"),
    refuse(InvalidToken("bad"), realm="api", reusable_for=5),
    refuse(Forbidden("no", code="route_not_allowed"), realm="api"),
    refuse(RateLimited("slow down", retry_after=3), realm="api"),
    Decision(False, 599, "internal_error", body=b'{"x": 1}'),
    allow(PRINCIPAL)._replace(client_headers=(("ratelimit", "limit=10, remaining=9"),)),
]


@pytest.mark.parametrize("decision", DECISIONS, ids=lambda d: f"{d.status}-{d.reason}-{d.cache_max_age}")
def test_the_head_is_what_the_line_by_line_builder_wrote(decision: Decision) -> None:
    assert decision.http_head == _reference_head(decision)
    again = Decision(**{f: getattr(decision, f) for f in Decision._fields if f != "memo"})
    assert again == decision and again.http_head == decision.http_head and again.fresh_until == decision.fresh_until


def test_the_decision_constructor_takes_every_field_in_order() -> None:
    """`Decision.__new__` is written by hand (one tuple) and `allow` calls it positionally: a field added to the
    tuple's fields must be added there too, at its place."""
    names = [name for name in Decision._fields if name != "memo"]
    values: list[object] = ["ok" if name == "reason" else object() for name in names]  # reasons are catalogued
    for built in (Decision(*values), Decision(**dict(zip(names, values, strict=True)))):  # type: ignore[arg-type]
        assert [getattr(built, name) for name in names] == values and built.memo == {}


def test_allow_keeps_its_fields() -> None:
    """`allow` builds its Decision positionally now: every field where the keywords put it."""
    decision = allow(PRINCIPAL, cache_max_age=7, headers=(("x-t", "v"),), answer_headers=(("x-k", "c"),), renew_at=5.0)
    assert decision.allowed and decision.status == 200 and decision.reason == "ok"
    assert decision.upstream_headers[-1] == ("x-t", "v") and decision.answer_headers == (("x-k", "c"),)
    assert decision.response_headers == decision.client_headers == () and decision.body == b""
    assert decision.subject == "alice"
    assert decision.roles == ("a", "b") and decision.cache_max_age == 7
    assert decision.fresh_until == 12.0 and decision.renew_at == 5.0
    assert allow(PRINCIPAL).fresh_until == 2e9 and allow(PRINCIPAL).renew_at == math.inf
