"""An issuer's TLS rules (`tls_ca_file`, `jwks_pin_sha256`) hold for its introspection calls too.

Real TLS on loopback: an RFC 7662 provider (aiohttp) whose certificate a private CA made here
(`cryptography`) signed, and the verifier's production introspection client, built by `App` from the
issuer's settings. Trusting the system's CAs, the private CA's provider is refused; trusting the CA
file, it answers; a provider whose certificate another CA signed is refused even with the file, and
with pins a certificate the trusted CA signed for the right name is not enough without a pinned key.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support import free_port, spki_pin

from verifier.app import App
from verifier.errors import ProviderUnavailable
from verifier.settings import parse_settings

AUDIENCE = "https://api.example.test"
CLIENT_ID, SECRET_ENV = "verifier", "TEST_INTROSPECTION_TLS_SECRET"
Key = ec.EllipticCurvePrivateKey


class Authority:
    """A CA: its certificate (written to a PEM file) and what it signs."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA {secrets.token_hex(4)}")])
        self.cert = self._sign(subject, self.key, ca=True, subject=subject)
        self.file = tmp / f"{name}-ca.pem"
        self.file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _sign(self, issuer: x509.Name, public: Key, *, ca: bool, subject: x509.Name) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def server_context(self, tmp: Path, key: Key) -> ssl.SSLContext:
        """A server context holding `key` and a certificate for 127.0.0.1 this CA signed."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "introspection.loopback.test")])
        leaf = self._sign(self.cert.subject, key, ca=False, subject=subject)
        pem = tmp / f"server-{secrets.token_hex(4)}.pem"
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + private)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pem)
        return context


Provider = Callable[[ssl.SSLContext], Awaitable[str]]


@pytest.fixture
async def provider(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Provider, list[str]]]:
    """Starts RFC 7662 providers on loopback over TLS; yields (start, the Authorization headers they saw)."""
    secret = secrets.token_urlsafe(24)
    monkeypatch.setenv(SECRET_ENV, secret)
    seen: list[str] = []
    runners: list[web.AppRunner] = []

    async def introspect(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        form = await request.post()
        answer: dict[str, Any] = {"active": False}
        if form.get("token") == "opaque-live-token":
            answer = {"active": True, "sub": "alice", "aud": AUDIENCE, "exp": int(time.time()) + 600}
        return web.json_response(answer)

    async def start(context: ssl.SSLContext) -> str:
        app = web.Application()
        app.router.add_post("/introspect", introspect)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
        runners.append(runner)
        return f"https://127.0.0.1:{port}"

    yield start, seen
    for runner in runners:
        await runner.cleanup()


async def introspect(issuer: str, **tls: Any) -> str:
    """Builds the verifier for one issuer (with `tls_ca_file` / `jwks_pin_sha256` as given) and
    introspects a live token at the issuer's endpoint: the subject, or the refusal's description."""
    settings = parse_settings(
        {
            "http": {"listen": "127.0.0.1:0"},
            "issuers": [
                {
                    "issuer": issuer,
                    "audiences": [AUDIENCE],
                    "algorithms": ["ES256"],
                    "jwks_uri": issuer + "/jwks",  # never fetched here
                    "introspection": {
                        "client_id": CLIENT_ID,
                        "client_secret_env": SECRET_ENV,
                        "endpoint": issuer + "/introspect",
                        "timeout_seconds": 5,
                    },
                    **tls,
                }
            ],
        }
    )
    app = App(settings)
    try:
        principal = await app.introspectors[issuer].introspect("opaque-live-token", secrets.token_bytes(32))
        return principal.subject
    except ProviderUnavailable as exc:
        return exc.description
    finally:
        await app.stop(grace=0)


async def test_the_issuer_ca_file_is_trusted_for_introspection_and_nothing_else(
    provider: tuple[Provider, list[str]], tmp_path: Path
) -> None:
    start, seen = provider
    private, other = Authority(tmp_path, "private"), Authority(tmp_path, "other")
    issuer = await start(private.server_context(tmp_path, ec.generate_private_key(ec.SECP256R1())))
    impostor = await start(other.server_context(tmp_path, ec.generate_private_key(ec.SECP256R1())))

    assert "unreachable" in await introspect(issuer)  # the system's CAs do not know the private CA
    assert await introspect(issuer, tls_ca_file=str(private.file)) == "alice"
    assert "unreachable" in await introspect(impostor, tls_ca_file=str(private.file))  # another CA's certificate
    assert len(seen) == 1 and seen[0].startswith("Basic ")  # the credentials went only to the trusted provider


async def test_the_issuer_pins_hold_for_introspection(provider: tuple[Provider, list[str]], tmp_path: Path) -> None:
    """Both providers have a certificate for 127.0.0.1 from the trusted CA: only the pinned key is taken."""
    start, seen = provider
    private = Authority(tmp_path, "private")
    pinned_key, impostor_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    issuer = await start(private.server_context(tmp_path, pinned_key))
    impostor = await start(private.server_context(tmp_path, impostor_key))
    rules = {"tls_ca_file": str(private.file), "jwks_pin_sha256": [spki_pin(pinned_key)]}

    assert await introspect(issuer, **rules) == "alice"
    assert "unreachable" in await introspect(impostor, **rules)
    assert len(seen) == 1


async def test_the_issuer_tls_rules_hold_under_uvloop_too(provider: tuple[Provider, list[str]], tmp_path: Path) -> None:
    """`verifier serve` runs on uvloop, whose TLS is its own."""
    import uvloop

    start, _ = provider
    private = Authority(tmp_path, "private")
    pinned_key = ec.generate_private_key(ec.SECP256R1())
    issuer = await start(private.server_context(tmp_path, pinned_key))
    impostor = await start(private.server_context(tmp_path, ec.generate_private_key(ec.SECP256R1())))
    rules = {"tls_ca_file": str(private.file), "jwks_pin_sha256": [spki_pin(pinned_key)]}

    def on_uvloop(url: str) -> str:
        return uvloop.run(introspect(url, **rules))

    assert await asyncio.to_thread(on_uvloop, issuer) == "alice"
    assert "unreachable" in await asyncio.to_thread(on_uvloop, impostor)
