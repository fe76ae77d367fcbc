"""A real OTLP/HTTP receiver on loopback (otlp_receiver.py) gets the spans of a `verifier serve` configured
with `tracing.otlp_endpoint`, the decision span a child of the traceparent the gateway sent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from doorkit import free_port, http_exchange
from otlp_receiver import CLIENT, SERVER, OtlpReceiver

from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
SUBJECT = "otlp-subject-kept-private"


def _forward_auth(path: str, headers: dict[str, str]) -> bytes:
    lines = ["GET /v1/forward-auth HTTP/1.1", "Host: verifier", f"X-Forwarded-Uri: {path}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if (await http_exchange(port, b"GET /readyz HTTP/1.1\r\nHost: v\r\n\r\n")).startswith(b"HTTP/1.1 200"):
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    pytest.fail("verifier not ready: " + log.read_text())


async def test_a_running_verifier_exports_its_spans_to_an_otlp_receiver(tmp_path: Path) -> None:
    receiver = OtlpReceiver()
    http_port = free_port()
    idp = DevIdentityProvider(port=0)
    await idp.start()
    config = tmp_path / "verifier.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "http": {"listen": f"127.0.0.1:{http_port}"},
                "issuers": [
                    {
                        "issuer": idp.issuer,
                        "audiences": [DEV_AUDIENCE],
                        "algorithms": ["ES256"],
                        "allow_insecure_http": True,
                    }
                ],
                "tracing": {"otlp_endpoint": receiver.url, "service_name": "edge-verifier-test"},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # a standard variable the SDK reads: export every 0.1 s, not 5 s
    log = tmp_path / "verifier.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "verifier", "serve", "--config", str(config)], stdout=out, stderr=out, env=env
        )
    try:
        await _wait_ready(http_port, proc, log)
        token = idp.mint(sub=SUBJECT)
        headers = {"Authorization": f"Bearer {token}", "traceparent": f"00-{TRACE}-{PARENT}-01"}
        for _ in range(2):
            assert (await http_exchange(http_port, _forward_auth("/r", headers))).startswith(b"HTTP/1.1 200")
        refused = await http_exchange(http_port, _forward_auth("/r", {"traceparent": "00-bad"}))
        assert refused.startswith(b"HTTP/1.1 401")
        deadline = time.monotonic() + 30
        while len(receiver.named("verifier.decide")) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        await idp.stop()
        receiver.stop()
    output = log.read_text()
    decided = receiver.named("verifier.decide")
    assert len(decided) == 3, (receiver.spans, output)
    assert receiver.content_types == {"application/x-protobuf"}
    traced, fresh = decided[:2], decided[2]
    for span in traced:
        assert (span["trace_id"], span["parent_span_id"]) == (TRACE, PARENT)
        assert span["kind"] == SERVER
        assert span["resource"]["service.name"] == "edge-verifier-test"
        assert span["attributes"]["verifier.door"] == "forward_auth"
        assert span["attributes"]["verifier.issuer"] == idp.issuer
        assert span["attributes"]["verifier.outcome"] == "allow"
    assert [s["attributes"]["verifier.cache.hit"] for s in traced] == [False, True]
    assert fresh["parent_span_id"] == "" and fresh["trace_id"] != TRACE  # a malformed traceparent: a new trace
    assert fresh["attributes"]["verifier.reason"] == "token_missing"
    # The start-up key fetches, CLIENT spans of their own.
    assert {s["name"] for s in receiver.spans if s["kind"] == CLIENT} >= {"discovery", "jwks"}
    assert token.encode() not in receiver.raw and SUBJECT.encode() not in receiver.raw
    # The audit line names the trace the gateway sent.
    audit = [line for line in output.splitlines() if '"signature_check"' in line]
    assert len(audit) == 1 and f'"trace_id": "{TRACE}"' in audit[0], output
