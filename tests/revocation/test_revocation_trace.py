"""A revoked token's audit line names the request's trace (tracing off: the one its `traceparent` names)."""

from __future__ import annotations

import logging

import pytest
from support import FrozenClock

from verifier.checks.base import NO_POLICY
from verifier.checks.revocation import Revocation
from verifier.errors import VerifierError
from verifier.principal import Principal
from verifier.request import RequestAttributes
from verifier.revocation.entry import Effect, Entry, KeyKind, Match, SubjectKey
from verifier.revocation.index import Revocations

ISSUER = "https://idp.example.test"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


def test_a_revocation_refusal_names_the_requests_trace(caplog: pytest.LogCaptureFixture) -> None:
    clock = FrozenClock()
    index = Revocations(clock)
    key = SubjectKey(KeyKind.ISS_SUB, "alice", ISSUER)
    entry = Entry(id="op-1", key=key, effect=Effect.TOKEN_REVOKED, match=Match.ALL, event_time=clock.now(),
                  expires_at=None, source="operator", event="operator")
    index.replace([entry])
    check = Revocation(index, with_roles=lambda p: p)
    alice = Principal(issuer=ISSUER, subject="alice", client_id=None, scopes=(), roles=frozenset(),
                      expires_at=clock.now() + 60, claims={"iss": ISSUER, "sub": "alice"})
    for headers, expected in (({"traceparent": TRACEPARENT}, TRACE), ({"traceparent": "00-junk"}, None)):
        request = RequestAttributes(method="GET", scheme="https", host="api", path="/", headers=headers)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="verifier.audit"), pytest.raises(VerifierError):
            check.check_now(alice, request, NO_POLICY)
        (line,) = [r for r in caplog.records if getattr(r, "event", "") == "token_revoked"]
        assert getattr(line, "trace_id", None) == expected
