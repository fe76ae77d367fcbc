"""`jwks_file` through `verifier serve`: a key rotation on disk takes effect on SIGHUP, and a bad file
on SIGHUP keeps the old keys (the reload is refused and logged)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from doorkit import free_port, http_exchange
from jwt.algorithms import ECAlgorithm

pytestmark = pytest.mark.integration

ISSUER = "https://offline-issuer.example.test"  # never fetched: the keys are on disk
AUDIENCE = "https://api.example.test"


def public_jwks(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {"keys": [{**jwk, "kid": kid, "alg": "ES256", "use": "sig"}]}


def mint(key: ec.EllipticCurvePrivateKey, kid: str) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc", "iat": now, "exp": now + 300}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid, "typ": "at+jwt"})


async def test_sighup_rereads_the_jwks_file_and_a_bad_file_keeps_the_old_keys(tmp_path: Path) -> None:
    http = free_port()
    keys_path = tmp_path / "jwks.json"
    old_key, new_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    keys_path.write_text(json.dumps(public_jwks(old_key, "old")))
    config = tmp_path / "verifier.yaml"
    config.write_text(
        f"""
http: {{listen: "127.0.0.1:{http}"}}
issuers:
  - issuer: "{ISSUER}"
    audiences: ["{AUDIENCE}"]
    algorithms: [ES256]
    jwks_file: "{keys_path}"
"""
    )
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "verifier", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )

    async def answer(token: str) -> tuple[int, str]:
        raw = f"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        reply = await http_exchange(http, raw)
        reason = next(
            (
                line.split(b":", 1)[1].strip().decode()
                for line in reply.split(b"\r\n")
                if line.lower().startswith(b"x-verifier-reason")
            ),
            "",
        )
        return int(reply.split(b" ", 2)[1]), reason

    async def until(token: str, expected: tuple[int, str], what: str) -> None:
        deadline = time.monotonic() + 45
        while True:
            try:
                if await answer(token) == expected:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{what}: " + log.read_text()[-3000:]
            await asyncio.sleep(0.1)

    old_token, new_token = mint(old_key, "old"), mint(new_key, "new")
    try:
        await until(old_token, (200, "ok"), "verifier did not come up")
        assert await answer(new_token) == (401, "key_unknown")
        # Rotation on disk: the running worker keeps its keys until SIGHUP.
        keys_path.write_text(json.dumps(public_jwks(new_key, "new")))
        await asyncio.sleep(0.5)
        assert await answer(new_token) == (401, "key_unknown")
        proc.send_signal(signal.SIGHUP)
        await until(new_token, (200, "ok"), "the rotated file did not take effect on SIGHUP")
        assert await answer(old_token) == (401, "key_unknown")
        # A broken file on SIGHUP: refused and logged; the keys in service stay.
        keys_path.write_text('{"keys": [')
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "reload_refused" not in log.read_text():
            assert time.monotonic() < deadline, "the bad file was not reported: " + log.read_text()[-3000:]
            await asyncio.sleep(0.1)
        assert "jwks_file" in log.read_text()
        assert await answer(new_token) == (200, "ok")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
