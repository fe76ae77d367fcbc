"""A WebAuthn step-up assertion's audit line names the request's trace (tracing off: its `traceparent`'s)."""

from __future__ import annotations

import logging

import pytest
from test_webauthn import Harness, SoftAuthenticator, assertion_for, attrs, enrolled, harness, principal  # noqa: F401

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


async def test_a_webauthn_assertion_names_the_requests_trace(
    enrolled: tuple[Harness, SoftAuthenticator],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    h, a = enrolled
    header = await assertion_for(h, a, attrs())
    request = attrs(assertion=header)
    with caplog.at_level(logging.INFO, logger="verifier.audit"):
        await h.service.check_step_up(
            principal(), request._replace(headers={**request.headers, "traceparent": TRACEPARENT})
        )
    (line,) = [r for r in caplog.records if getattr(r, "event", "") == "webauthn_assertion"]
    assert getattr(line, "trace_id", None) == TRACE
