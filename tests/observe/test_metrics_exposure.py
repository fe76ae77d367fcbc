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
import doorkit
import grpc
import pytest
from doorkit import http_exchange, running_verifier
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc
from support import free_port

from verifier.app import App
from verifier.config.logout import BackchannelLogoutConfig
from verifier.config.revocation import RevocationConfig, TransmitterConfig
from verifier.config.webauthn import WebAuthnConfig
from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider
from verifier.settings import Listen
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


# -- the other doors ------------------------------------------------------------------------------------------

ADMIN_TOKEN = "an-admin-token-of-32-characters-at-least"
TRANSMITTER = "https://transmitter.test/ssf"


async def _send_envoy(app: App, idp: DevIdentityProvider, marker: str) -> None:
    """The same tokens to Envoy's ext_authz (envoy.service.auth.v3.Authorization/Check), every field the client's."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
        stub = ea_grpc.AuthorizationStub(channel)
        for token in _hostile_tokens(marker, idp):
            http = ac.AttributeContext.HttpRequest(
                method=marker[:6].upper(), path=f"/{marker}?q={marker}", host=f"{marker}.example", scheme="https",
                headers={"authorization": f"Bearer {token}", "dpop": marker, "user-agent": marker, marker: marker},
            )  # fmt: skip
            peer = address_pb2.Address(socket_address=address_pb2.SocketAddress(address="10.0.0.1"))
            request = ea.CheckRequest(
                attributes=ac.AttributeContext(
                    source=ac.AttributeContext.Peer(address=peer, principal=marker),
                    request=ac.AttributeContext.Request(http=http),
                    context_extensions={marker: marker},
                )
            )
            await stub.Check(request, timeout=10)


def _request(method: str, target: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in {"Host": "v", **headers}.items())
    return f"{method} {target} HTTP/1.1\r\n{lines}Content-Length: {len(body)}\r\n\r\n".encode() + body


async def _send_side_doors(app: App, idp: DevIdentityProvider, marker: str) -> None:
    """SETs pushed (RFC 8935), logout tokens (OIDC back-channel), the WebAuthn endpoints, the admin kill switch and
    the resource metadata, each with the client's words in every field it reads."""
    assert app.ports.http is not None and app.ports.admin is not None
    set_header = {"alg": "ES256", "kid": marker, "typ": "secevent+jwt"}
    events = {f"https://schemas.openid.net/secevent/{marker}": {"subject": {"format": marker}}}
    sets = [
        f"{_b64(set_header)}.{_b64({'iss': iss, 'aud': marker, 'jti': marker, 'iat': 1, 'events': events})}.c2ln"
        for iss in (f"https://{marker}.example", TRANSMITTER)
    ]
    logout_claims = {"aud": DEV_AUDIENCE, "sub": marker, "sid": marker, "jti": marker, "events": {marker: {}}}
    logouts = [
        f"{_b64({'alg': 'ES256', 'kid': marker, 'typ': 'logout+jwt'})}.{_b64({**logout_claims, 'iss': iss})}.c2ln"
        for iss in (f"https://{marker}.example", idp.issuer)
    ]
    user = idp.mint(sub=f"sub-{marker}")
    requests = [
        *(_request("POST", "/v1/ssf/events", {"Content-Type": "application/secevent+jwt",
                                               "Authorization": f"Bearer {marker}"}, s.encode()) for s in sets),
        _request("POST", "/v1/ssf/events", {"Content-Type": marker}, marker.encode()),
        *(_request("POST", "/v1/backchannel-logout", {"Content-Type": "application/x-www-form-urlencoded"},
                   f"logout_token={t}".encode()) for t in [*logouts, marker]),
        _request("POST", "/v1/webauthn/register/begin", {"Authorization": f"Bearer {user}"}, b"{}"),
        _request("POST", "/v1/webauthn/register/complete", {"Authorization": f"Bearer {user}",
                 "Content-Type": "application/json"}, json.dumps({"id": marker, marker: marker}).encode()),
        _request("DELETE", f"/v1/webauthn/credentials/{marker}", {"Authorization": f"Bearer {user}"}),
        _request("POST", f"/v1/webauthn/demo/protected/{marker}", {"Authorization": f"Bearer {user}",
                 "X-WebAuthn-Assertion": marker}),
        _request("GET", f"/.well-known/oauth-protected-resource/{marker}", {}),
        _request("GET", f"/{marker}", {"Authorization": f"Bearer {marker}"}),
    ]  # fmt: skip
    for request in requests:
        answer = await http_exchange(app.ports.http, request)
        assert answer.startswith(b"HTTP/1.1 "), answer[:80]
    admin = f"Bearer {ADMIN_TOKEN}"
    subject = {"subject": {"format": "iss_sub", "iss": f"https://{marker}.example", "sub": marker}, "reason": marker}
    for request in (
        _request("GET", "/v1/admin/revocations", {"Authorization": f"Bearer {marker}"}),
        _request("DELETE", f"/v1/admin/revocations/{marker}", {"Authorization": admin}),
        _request("POST", "/v1/admin/revocations", {"Authorization": admin, "Content-Type": "application/json"},
                 json.dumps(subject).encode()),
        _request("POST", "/v1/admin/revocations", {"Authorization": admin, "Content-Type": "application/json"},
                 json.dumps({"subject": {"format": marker}}).encode()),
    ):  # fmt: skip
        answer = await http_exchange(app.ports.admin, request)
        assert answer.startswith(b"HTTP/1.1 "), answer[:80]


async def test_no_label_value_from_the_other_doors_is_one_a_client_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    """Envoy's ext_authz, SSF push, back-channel logout, the WebAuthn endpoints, the admin API (wrong token and
    right one) and the resource metadata: the sender's words (a SET's or logout token's iss, kid, jti and event
    types, a credential id, a route name, a content type) are never a label value, and a second round of other
    words adds no series."""
    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", ADMIN_TOKEN)
    port = free_port()  # the development provider's, known before it starts: its users are the transmitter's
    monkeypatch.setattr(doorkit, "free_port", lambda: port)
    idp_issuer = f"http://127.0.0.1:{port}"
    transmitter = TransmitterConfig(  # pushes, its keys the provider's (no SET here is signed with them)
        issuer=TRANSMITTER, audience="https://verifier.test", jwks_uri=f"{idp_issuer}/jwks",
        allow_insecure_http=True, subjects_of=(idp_issuer,),
    )  # fmt: skip
    options: dict[str, object] = {
        "revocation": RevocationConfig(transmitters=(transmitter,)),
        "admin": Listen(host="127.0.0.1", port=0),
        "webauthn": WebAuthnConfig(
            rp_id="localhost", origins=("http://localhost:9555",), secret=b"s" * 32, demo=True  # its step-up echo
        ),
    }
    logout = BackchannelLogoutConfig(audiences=(DEV_AUDIENCE,))
    async with running_verifier(options, backchannel_logout=logout) as (app, idp):
        first, second = f"zq{uuid.uuid4().hex[:10]}", f"zq{uuid.uuid4().hex[:10]}"
        await _send_envoy(app, idp, first)
        await _send_side_doors(app, idp, first)
        after_first = await _page(app)
        await _send_envoy(app, idp, second)
        await _send_side_doors(app, idp, second)
        await asyncio.sleep(0)
        after_second = await _page(app)
    for marker, page in ((first, after_first), (second, after_second)):
        assert marker not in page and marker.upper()[:6] not in page
    assert _series(after_second) == _series(after_first)
    series = "\n".join(sorted(_series(after_first)))
    for family in (
        "verifier_ssf_sets_refused_total{",
        "verifier_backchannel_logouts_total{",
        "verifier_webauthn_registrations_total{",
        "verifier_webauthn_assertions_total{",
        'verifier_decisions_total{door="ext_authz"',
    ):
        assert family in series, family  # the doors were reached and counted
