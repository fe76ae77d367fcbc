"""No token, proof or secret reaches a log line, an error body or a metric label."""

from __future__ import annotations

import logging

import pytest
from doorkit import http_exchange, running_verifier

from verifier.observe.audit import JsonFormatter


async def test_tokens_never_appear_in_logs_bodies_or_metrics(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_verifier() as (app, idp):
        good = idp.mint(sub="subject-that-must-not-be-a-label")
        forged = good[:-8] + "AAAAAAAA"
        expired = idp.mint(claims={"exp": 1})
        secrets = [good, forged, expired, good.split(".")[2], "DPoPproofvalue.abc.def"]
        bodies = b""
        for token in (good, forged, expired, "garbage-token-value-xyz"):
            raw = (
                f"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n"
                f"DPoP: DPoPproofvalue.abc.def\r\nX-Forwarded-Uri: /a?access_token={token}\r\n\r\n"
            ).encode()
            bodies += await http_exchange(app.ports.http, raw)
        metrics = app.metrics.render().decode()
    lines = [JsonFormatter().format(record) for record in caplog.records]
    assert any('"event": "signature_check"' in line for line in lines), "the audit trail must exist"
    text = "\n".join(lines)
    for secret in [*secrets, "garbage-token-value-xyz"]:
        assert secret not in text
        assert secret.encode() not in bodies
        assert secret not in metrics
    assert "access_token=" not in text  # the route in audit lines drops the query
    assert "subject-that-must-not-be-a-label" not in metrics
