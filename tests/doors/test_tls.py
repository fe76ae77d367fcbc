"""TLS and mTLS on the verifier's own listeners (Kong -> verifier), with certificates made here."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from doorkit import door_settings, held_open, running_verifier
from rawh2 import PREFACE, SETTINGS, frame

from verifier.settings import ConfigError, Listen, TlsSettings, parse_settings
from verifier.v1 import verifier_pb2, verifier_pb2_grpc


def _cert(subject: str, issuer_key, issuer_name, key, *, ca: bool, usage) -> x509.Certificate:  # type: ignore[no-untyped-def]
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    cert_file, key_file = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_file), str(key_file)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", ca_key, None, ca_key, ca=True, usage=None)
    server_key, client_key, rogue_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    server = _cert("localhost", ca_key, ca.subject, server_key, ca=False, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client = _cert("kong", ca_key, ca.subject, client_key, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = _cert("rogue", rogue_key, None, rogue_key, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    files: dict[str, str] = {}
    files["ca"], _ = _write(tmp_path / "ca", ca, ca_key)
    files["server_cert"], files["server_key"] = _write(tmp_path / "server", server, server_key)
    files["client_cert"], files["client_key"] = _write(tmp_path / "client", client, client_key)
    files["rogue_cert"], files["rogue_key"] = _write(tmp_path / "rogue", rogue, rogue_key)
    return files


def _client_context(pki: dict[str, str], cert: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki["ca"])
    if cert:
        context.load_cert_chain(pki[f"{cert}_cert"], pki[f"{cert}_key"])
    return context


async def _forward_auth(port: int, context: ssl.SSLContext, token: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    try:
        writer.write(f"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()


async def test_mtls_on_both_listeners_admits_only_clients_with_a_certificate_from_the_ca(pki: dict[str, str]) -> None:
    tls = TlsSettings(cert_file=pki["server_cert"], key_file=pki["server_key"], client_ca_file=pki["ca"])
    listeners = {
        "http": Listen(host="127.0.0.1", port=0, tls=tls),
        "grpc": Listen(host="127.0.0.1", port=0, tls=tls),
    }
    async with running_verifier(listeners) as (app, idp):
        token = idp.mint()
        answer = await _forward_auth(app.ports.http, _client_context(pki, "client"), token)
        assert answer.startswith(b"HTTP/1.1 200")
        for bad in (None, "rogue"):
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await _forward_auth(app.ports.http, _client_context(pki, bad), token)
        root = open(pki["ca"], "rb").read()  # noqa: SIM115

        def creds(who: str) -> grpc.ChannelCredentials:
            return grpc.ssl_channel_credentials(
                root_certificates=root,
                private_key=open(pki[f"{who}_key"], "rb").read(),
                certificate_chain=open(pki[f"{who}_cert"], "rb").read(),
            )

        options = (("grpc.ssl_target_name_override", "localhost"),)
        async with grpc.aio.secure_channel(f"127.0.0.1:{app.ports.grpc}", creds("client"), options=options) as ch:
            reply = await verifier_pb2_grpc.VerifierStub(ch).Check(
                verifier_pb2.CheckRequest(path="/", headers={"authorization": f"Bearer {token}"}), timeout=5
            )
            assert reply.allowed
        async with grpc.aio.secure_channel(f"127.0.0.1:{app.ports.grpc}", creds("rogue"), options=options) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await verifier_pb2_grpc.VerifierStub(ch).Check(verifier_pb2.CheckRequest(path="/"), timeout=5)


def test_tls_files_are_checked_at_start_up(pki: dict[str, str], tmp_path: Path) -> None:
    base = {"issuers": [{"issuer": "https://idp.example.test", "audiences": ["a"], "algorithms": ["ES256"]}]}
    ok = {
        **base,
        "http": {"listen": "127.0.0.1:0", "tls": {"cert_file": pki["server_cert"], "key_file": pki["server_key"]}},
    }
    assert parse_settings(ok).http.tls is not None  # type: ignore[union-attr]
    missing = {**base, "http": {"listen": "127.0.0.1:0", "tls": {"cert_file": str(tmp_path / "nope"), "key_file": "x"}}}
    with pytest.raises(ConfigError, match=r"http\.tls"):
        parse_settings(missing)
    mismatched = {
        **base,
        "http": {"listen": "127.0.0.1:0", "tls": {"cert_file": pki["server_cert"], "key_file": pki["client_key"]}},
    }
    with pytest.raises(ConfigError, match=r"http\.tls"):
        parse_settings(mismatched)


async def test_a_stalled_tls_handshake_is_closed_after_the_header_timeout(pki: dict[str, str]) -> None:
    tls = TlsSettings(cert_file=pki["server_cert"], key_file=pki["server_key"])
    options = {
        "http": Listen(host="127.0.0.1", port=0, tls=tls),
        "forward_auth": door_settings(header_timeout_seconds=0.3),
    }
    async with running_verifier(options) as (app, _):
        # Plain TCP that never sends a ClientHello (or sends half of one).
        reader, writer = await asyncio.open_connection("127.0.0.1", app.ports.http)
        writer.write(b"\x16\x03\x01\x00")
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        except ConnectionResetError:
            pass
        finally:
            writer.close()
        assert loop.time() - started < 2.0


HANDSHAKE = 1.0  # grpc_handshake_timeout_seconds in the tests below
SLACK = 2.0  # a loaded machine's lateness on top of it


@pytest.mark.parametrize(
    "stall",
    [
        pytest.param(b"", id="no-client-hello"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", id="half-a-client-hello"),
        pytest.param(None, id="handshake-done-then-no-preface"),
    ],
)
async def test_a_stalled_grpc_tls_connection_is_closed_after_the_handshake_timeout(
    pki: dict[str, str], stall: bytes | None
) -> None:
    """A caller opening TLS connections to the gRPC port (mTLS here) that never sends its ClientHello, sends half of
    it, or finishes the handshake and never sends the HTTP/2 preface: each held a place of `grpc_max_connections`
    for gRPC's default handshake timeout (120 s; the connection's age starts only after the TLS handshake). Now
    closed at `grpc_handshake_timeout_seconds`, counted from the accept."""
    tls = TlsSettings(cert_file=pki["server_cert"], key_file=pki["server_key"], client_ca_file=pki["ca"])
    options = {"grpc": Listen(host="127.0.0.1", port=0, tls=tls), "grpc_handshake_timeout_seconds": HANDSHAKE}
    async with running_verifier(options) as (app, _):
        assert app.ports.grpc is not None
        client = _client_context(pki, "client") if stall is None else None
        if client is not None:
            client.set_alpn_protocols(["h2"])  # gRPC refuses a TLS connection without it
        took = await held_open(app.ports.grpc, stall or b"", tls=client, within=HANDSHAKE + SLACK)
        assert took is not None, "held past the handshake timeout"
        assert took >= HANDSHAKE * 0.8, took  # the timeout closed it, not a refusal of the bytes
        if stall is None:  # one that sends its preface and SETTINGS in time stays open past the timeout
            greeting = PREFACE + frame(SETTINGS, 0, 0)
            assert await held_open(app.ports.grpc, greeting, tls=client, within=HANDSHAKE + SLACK) is None


async def test_a_stalled_grpc_tls_connection_is_held_for_a_long_handshake_timeout(pki: dict[str, str]) -> None:
    """The contrast: with a handshake timeout of 60 s the same stalled connection is still open after the bound
    above (what every stalled connection got before, for 120 s)."""
    tls = TlsSettings(cert_file=pki["server_cert"], key_file=pki["server_key"], client_ca_file=pki["ca"])
    options = {"grpc": Listen(host="127.0.0.1", port=0, tls=tls), "grpc_handshake_timeout_seconds": 60.0}
    async with running_verifier(options) as (app, _):
        assert app.ports.grpc is not None
        assert await held_open(app.ports.grpc, b"\x16\x03\x01", within=HANDSHAKE + SLACK) is None


async def _metrics(port: int, context: ssl.SSLContext | None) -> bytes:
    if context is None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_metrics_tls_is_applied_with_mtls(pki: dict[str, str]) -> None:
    # issue #26 G8: metrics.tls was accepted and ignored (plain HTTP, no client certificate)
    tls = TlsSettings(cert_file=pki["server_cert"], key_file=pki["server_key"], client_ca_file=pki["ca"])
    async with running_verifier({"metrics": Listen(host="127.0.0.1", port=0, tls=tls)}) as (app, _):
        assert app.ports.metrics is not None
        answer = await _metrics(app.ports.metrics, _client_context(pki, "client"))
        assert answer.startswith(b"HTTP/1.1 200") and b"verifier_" in answer
        for bad in (None, "rogue"):
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                answer = await _metrics(app.ports.metrics, _client_context(pki, bad))
                assert not answer.startswith(b"HTTP/1.1 200")  # a closed TLS stream may read as b""
                raise ConnectionError("refused")
        plain = await _metrics(app.ports.metrics, None)
        assert not plain.startswith(b"HTTP/1.1 200")


async def test_verifier_serve_keeps_metrics_tls_on_every_workers_metrics_port(
    pki: dict[str, str], tmp_path: Path
) -> None:
    """`verifier serve` gives worker i the metrics port + i; that copy of the listener dropped `metrics.tls`, so
    a configured port (not 0) served /metrics in plain HTTP to anyone, client certificate or not."""
    import os
    import subprocess
    import sys
    import time

    from doorkit import free_port

    from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider

    idp = DevIdentityProvider(port=free_port())
    await idp.start()
    metrics = _adjacent_free_ports()
    config = tmp_path / "verifier.yaml"
    config.write_text(
        f"""
workers: 2
http: {{listen: "127.0.0.1:{free_port()}"}}
metrics:
  listen: "127.0.0.1:{metrics}"
  tls: {{cert_file: "{pki["server_cert"]}", key_file: "{pki["server_key"]}", client_ca_file: "{pki["ca"]}"}}
issuers: [{{issuer: "{idp.issuer}", audiences: ["{DEV_AUDIENCE}"], algorithms: [ES256], allow_insecure_http: true}}]
"""
    )
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "verifier", "serve", "--config", str(config)],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 45
        for port in (metrics, metrics + 1):
            while True:
                try:
                    answer = await _metrics(port, _client_context(pki, "client"))
                    if answer.startswith(b"HTTP/1.1 200"):
                        break
                except (TimeoutError, OSError, ssl.SSLError, asyncio.IncompleteReadError):
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
                await asyncio.sleep(0.3)
            assert b"verifier_" in answer
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await _metrics(port, _client_context(pki, None))  # no client certificate
                raise ConnectionError("refused")
            plain = b""
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                plain = await _metrics(port, None)
            assert not plain.startswith(b"HTTP/1.1 200"), port
    finally:
        proc.send_signal(15)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        await idp.stop()


def _adjacent_free_ports() -> int:
    """A port p with p + 1 free too (worker 1's metrics port)."""
    import socket

    from doorkit import free_port

    for _ in range(50):
        port = free_port()
        with contextlib.suppress(OSError), socket.socket() as sock:
            sock.bind(("127.0.0.1", port + 1))
            return port
    raise AssertionError("no two adjacent free ports")


async def test_with_mtls_and_a_token_a_scrape_needs_both(pki: dict[str, str]) -> None:
    """metrics.tls with client_ca_file and metrics.token_env: the certificate opens the connection, the token the
    page; one without the other is refused."""
    from verifier.config.metrics import MetricsAuthSettings

    token = "t" * 40
    tls = TlsSettings(cert_file=pki["server_cert"], key_file=pki["server_key"], client_ca_file=pki["ca"])
    options = {
        "metrics": Listen(host="127.0.0.1", port=0, tls=tls),
        "metrics_auth": MetricsAuthSettings(token_env="VERIFIER_METRICS_TOKEN", token=token),
    }
    async with running_verifier(options) as (app, _):
        assert app.ports.metrics is not None
        port = app.ports.metrics

        async def scrape(cert: str | None, *headers: str) -> bytes:
            context = _client_context(pki, cert)
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
            try:
                extra = "".join(f"{h}\r\n" for h in headers)
                writer.write(f"GET /metrics HTTP/1.1\r\nHost: m\r\n{extra}Connection: close\r\n\r\n".encode())
                await writer.drain()
                return await asyncio.wait_for(reader.read(), 5)
            finally:
                writer.close()

        both = await scrape("client", f"Authorization: Bearer {token}")
        assert both.startswith(b"HTTP/1.1 200") and b"verifier_" in both
        certificate_only = await scrape("client")
        assert certificate_only.startswith(b"HTTP/1.1 401") and b"WWW-Authenticate: Bearer" in certificate_only
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            answer = await scrape(None, f"Authorization: Bearer {token}")  # the token without a certificate
            assert not answer.startswith(b"HTTP/1.1 200")  # a closed TLS stream may read as b""
            raise ConnectionError("refused")
