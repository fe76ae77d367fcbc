"""What the unauthenticated metrics listener tells whoever reaches it: never a value a client chose.

`/metrics` has no authentication (Prometheus scrapes it; deploy/k8s listens on 0.0.0.0:9464). Every label value
must come from the code, the catalogue or the settings: a token's `alg`, `kid`, `iss`, `sub`, `typ`, a request's
host, path or method, are the sender's choice. As label values they would show token contents to anyone who
can scrape, and grow the page (and Prometheus' series) by one per distinct value: a label-cardinality attack.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import uuid

import aiohttp
import grpc
from doorkit import http_exchange, running_verifier

from verifier.app import App
from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider
from verifier.v1 import verifier_pb2, verifier_pb2_grpc


def _b64(document: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()


def _hostile_tokens(marker: str, idp: DevIdentityProvider) -> list[str]:
    """Tokens whose every readable field carries `marker`: refused ones (forged, unknown issuer, odd alg) and an
    admitted one (its subject the sender's words too)."""
    forged = [
        f"{_b64(header)}.{_b64(payload)}.c2ln"
        for header in (
            {"alg": f"X{marker}", "kid": marker, "typ": marker},
            {"alg": "ES256", "kid": f"kid-{marker}", "typ": "at+jwt"},
            {"alg": "none", "kid": marker},
            {"alg": "HS256", "kid": marker},
        )
        for payload in (
            {"iss": idp.issuer, "sub": marker, "aud": DEV_AUDIENCE, "scope": marker, "client_id": marker},
            {"iss": f"https://{marker}.example", "sub": marker, "aud": marker},
        )
    ]
    return [*forged, f"{marker}.{marker}", marker, idp.mint(sub=f"sub-{marker}", scope=f"read {marker}")]


async def _send(app: App, idp: DevIdentityProvider, marker: str) -> None:
    assert app.ports.http is not None
    for token in _hostile_tokens(marker, idp):
        request = (
            f"GET /v1/forward-auth/{marker}?q={marker} HTTP/1.1\r\nHost: {marker}.example\r\n"
            f"X-Forwarded-Method: {marker[:6].upper()}\r\nX-Forwarded-Proto: https\r\n"
            f"X-Forwarded-Host: {marker}.example\r\nX-Forwarded-Uri: /{marker}\r\n"
            f"Authorization: Bearer {token}\r\nDPoP: {marker}\r\nUser-Agent: {marker}\r\n\r\n"
        ).encode()
        answer = await http_exchange(app.ports.http, request)
        assert answer.startswith(b"HTTP/1.1 "), answer[:80]


async def _send_grpc(app: App, idp: DevIdentityProvider, marker: str) -> None:
    """The same tokens to the gRPC door (verifier.v1.Verifier/Check), the request described in the message."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
        stub = verifier_pb2_grpc.VerifierStub(channel)
        for token in _hostile_tokens(marker, idp):
            await stub.Check(
                verifier_pb2.CheckRequest(
                    method=marker, path=f"/{marker}", host=f"{marker}.example",
                    headers={"authorization": f"Bearer {token}", "dpop": marker, "user-agent": marker},
                ),
                timeout=10,
            )


async def _page(app: App) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{app.ports.metrics}/metrics") as r:
        assert r.status == 200
        return await r.text()


def _series(page: str) -> set[str]:
    """Each series' name and labels (its value and the comments left out)."""
    return {re.sub(r" [^ ]+$", "", line) for line in page.splitlines() if line and not line.startswith("#")}


async def test_no_label_value_on_the_metrics_page_is_one_a_client_chose() -> None:
    async with running_verifier() as (app, idp):
        first, second = f"zq{uuid.uuid4().hex[:10]}", f"zq{uuid.uuid4().hex[:10]}"  # "zq": in no number or name
        await _send(app, idp, first)
        await _send_grpc(app, idp, first)
        after_first = await _page(app)
        await _send(app, idp, second)
        await _send_grpc(app, idp, second)
        await asyncio.sleep(0)  # nothing pending: the hot path counts as it answers
        after_second = await _page(app)
    for marker, page in ((first, after_first), (second, after_second)):
        assert marker not in page and marker.upper()[:6] not in page
    # The same series after a second round of different values: the page does not grow with what clients send.
    assert _series(after_second) == _series(after_first)
