"""`jwks_pin_sha256` and `tls_ca_file`: discovery and JWKS only from a server holding a pinned key (introspection:
tests/tokens/test_introspection_tls.py).

Real TLS servers on loopback with self-signed certificates made here (`cryptography`); the verifier
fetches through its production `HttpFetcher`. Both servers are trusted (`tls_ca_file` holds both
certificates), so only the pin tells them apart: trust in a certificate for the name is not enough.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import re
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support import free_port, spki_pin
from tokenkit import AUDIENCE, Mint, claims

from verifier.app import App
from verifier.config.base import ConfigError
from verifier.errors import ProviderUnavailable
from verifier.settings import IssuerSettings, Listen, Settings, parse_settings


def self_signed(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"idp-{secrets.token_hex(4)}.loopback.test")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )


Server = Callable[[ec.EllipticCurvePrivateKey], Awaitable[str]]


@pytest.fixture
async def tls_provider(tmp_path: Path, jwks_document: dict[str, Any]) -> AsyncIterator[tuple[Server, Path, list[str]]]:
    """Starts providers on loopback, each with its own key; yields (start, the trusted bundle, the paths asked)."""
    bundle = tmp_path / "trusted.pem"
    bundle.write_bytes(b"")
    asked: list[str] = []
    runners: list[web.AppRunner] = []

    async def start(key: ec.EllipticCurvePrivateKey) -> str:
        cert = self_signed(key)
        pem = tmp_path / f"server-{len(runners)}.pem"
        pem.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        with bundle.open("ab") as fh:
            fh.write(cert.public_bytes(serialization.Encoding.PEM))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pem)
        port = free_port()
        issuer = f"https://127.0.0.1:{port}"

        async def discovery(request: web.Request) -> web.Response:
            asked.append(request.path)
            return web.json_response({"issuer": issuer, "jwks_uri": issuer + "/jwks"})

        async def jwks(request: web.Request) -> web.Response:
            asked.append(request.path)
            return web.json_response(jwks_document)

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks", jwks)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
        runners.append(runner)
        return issuer

    yield start, bundle, asked
    for runner in runners:
        await runner.cleanup()


async def first_fetch(issuer: IssuerSettings) -> App:
    app = App(Settings(grpc=None, http=Listen(host="127.0.0.1", port=0), metrics=None, issuers=(issuer,)))
    keys = app.keys.get(issuer.issuer)
    assert keys is not None
    try:
        await keys.refresh()
    finally:
        await app.stop(grace=0)
    return app


def pinned(issuer: str, bundle: Path, *pins: str) -> IssuerSettings:
    return IssuerSettings(
        issuer=issuer,
        audiences=(AUDIENCE,),
        algorithms=("ES256",),
        tls_ca_file=str(bundle),
        jwks_pin_sha256=pins,
        fetch_timeout_seconds=5.0,
    )


async def test_keys_load_from_the_server_holding_the_pinned_key(
    tls_provider: tuple[Server, Path, list[str]], mint: Mint
) -> None:
    start, bundle, asked = tls_provider
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = await start(key)
    other_pin = spki_pin(ec.generate_private_key(ec.SECP256R1()))
    app = await first_fetch(pinned(issuer, bundle, other_pin, spki_pin(key)))  # any one pin may match
    keys = app.keys.get(issuer)
    assert keys is not None and keys.ready.is_set() and asked == ["/.well-known/openid-configuration", "/jwks"]
    now = int(time.time())
    parsed = app.jwt.parse(mint(claims(iss=issuer, iat=now, nbf=now, exp=now + 300)))
    assert app.jwt.verify_now(parsed) is not None


async def test_a_trusted_certificate_with_another_key_is_refused_before_its_answer_is_read(
    tls_provider: tuple[Server, Path, list[str]],
) -> None:
    start, bundle, _ = tls_provider
    pinned_key, impostor_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    await start(pinned_key)
    impostor = await start(impostor_key)  # trusted by the bundle too, and valid for 127.0.0.1
    with pytest.raises(ProviderUnavailable, match="matches no jwks_pin_sha256"):
        await first_fetch(pinned(impostor, bundle, spki_pin(pinned_key)))


async def test_a_pin_does_not_replace_certificate_validation(
    tls_provider: tuple[Server, Path, list[str]], tmp_path: Path
) -> None:
    start, _, _ = tls_provider
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = await start(key)
    empty_trust = tmp_path / "unrelated.pem"
    empty_trust.write_bytes(
        self_signed(ec.generate_private_key(ec.SECP256R1())).public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(ProviderUnavailable, match="unreachable"):  # the right key, an untrusted certificate
        await first_fetch(pinned(issuer, empty_trust, spki_pin(key)))


async def test_a_pinned_issuer_over_plain_http_is_refused() -> None:
    issuer = IssuerSettings(
        issuer=f"http://127.0.0.1:{free_port()}",
        audiences=(AUDIENCE,),
        algorithms=("ES256",),
        allow_insecure_http=True,
        jwks_pin_sha256=(spki_pin(ec.generate_private_key(ec.SECP256R1())),),
        fetch_timeout_seconds=2.0,
    )
    with pytest.raises(ProviderUnavailable):
        await first_fetch(issuer)


def test_a_tls_ca_file_that_cannot_be_loaded_is_refused_at_start_up(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"issuers\[0\]\.tls_ca_file: cannot load"):
        parse_settings(
            {
                "http": {"listen": "127.0.0.1:0"},
                "issuers": [
                    {"issuer": "https://idp.test", "audiences": ["a"], "algorithms": ["ES256"], "tls_ca_file": str(bad)}
                ],
            }
        )


async def test_the_pin_is_checked_under_uvloop_too(tls_provider: tuple[Server, Path, list[str]]) -> None:
    """`verifier serve` runs on uvloop, whose TLS is its own: the pin must hold there as well."""
    import uvloop

    start, bundle, _ = tls_provider
    pinned_key, impostor_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    good, impostor = await start(pinned_key), await start(impostor_key)

    async def fetch(issuer: str) -> str:
        try:
            await first_fetch(pinned(issuer, bundle, spki_pin(pinned_key)))
        except ProviderUnavailable as exc:
            return exc.description
        return "ok"

    def on_uvloop(issuer: str) -> str:
        return uvloop.run(fetch(issuer))

    assert await asyncio.to_thread(on_uvloop, good) == "ok"
    assert "matches no jwks_pin_sha256" in await asyncio.to_thread(on_uvloop, impostor)


def test_pins_on_a_plain_http_issuer_are_refused_at_start_up() -> None:
    pin = spki_pin(ec.generate_private_key(ec.SECP256R1()))
    issuer = {"issuer": "http://127.0.0.1:9", "audiences": ["a"], "algorithms": ["ES256"], "allow_insecure_http": True}
    with pytest.raises(ConfigError, match=r"issuers\[0\]\.jwks_pin_sha256: needs an https issuer"):
        parse_settings({"http": {"listen": "127.0.0.1:0"}, "issuers": [{**issuer, "jwks_pin_sha256": [pin]}]})


def test_the_readme_multi_tenant_example_is_a_valid_configuration(
    tmp_path: Path, jwks_document: dict[str, Any]
) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL) if "{tenant}" in b)
    keys, ca = tmp_path / "batch-jwks.json", tmp_path / "internal-ca.pem"
    keys.write_text(json.dumps(jwks_document))
    ca.write_bytes(self_signed(ec.generate_private_key(ec.SECP256R1())).public_bytes(serialization.Encoding.PEM))
    text = block.replace("/etc/verifier/batch-jwks.json", str(keys)).replace("/etc/verifier/internal-ca.pem", str(ca))
    entra, offline, pinned_issuer = parse_settings(yaml.safe_load(text)).issuers
    assert entra.is_template and entra.tenant_claim == "tid" and len(entra.tenants) == 2
    assert offline.static_jwks and pinned_issuer.jwks_pin_sha256 and pinned_issuer.tls_ca_file == str(ca)
