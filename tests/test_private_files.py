"""Private key files others can read: said at start-up and by `check-config`, refused with `readable_key_files: refuse`.

A Kubernetes Secret volume is 0644 unless its `defaultMode` says otherwise (OpenSSH refuses such a key, nginx
takes it), so the default is a warning. Group read is fine when root owns the file (PostgreSQL's rule: the
Secret's `defaultMode: 0440` with the pod's `fsGroup`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from verifier.private_files import exposed_mode, open_sqlite
from verifier.settings import ConfigError, config_warnings, parse_settings

REPO = Path(__file__).resolve().parents[1]
ISSUER = {"issuer": "https://idp.example.test", "audiences": ["api"], "algorithms": ["ES256"]}
OTHER_UID = 54321  # owns the files of the "not root's" cases (the tests chown as root, else skip)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8, plain = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, plain)


def _key_file(path: Path, mode: int) -> str:
    path.write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    path.chmod(mode)
    return str(path)


def _tls_files(tmp_path: Path, mode: int) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "server.crt", tmp_path / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(_pem(key))
    key_file.chmod(mode)
    return str(cert_file), str(key_file)


def _document(kind: str, tmp_path: Path, mode: int, **extra: Any) -> tuple[dict[str, Any], str, str]:
    """A settings document naming one private key file of `kind` with `mode`; its key and the file's path."""
    document: dict[str, Any] = {"http": {"listen": "127.0.0.1:0"}, "issuers": [dict(ISSUER)], **extra}
    if kind == "tls":
        cert_file, key_file = _tls_files(tmp_path, mode)
        document["http"]["tls"] = {"cert_file": cert_file, "key_file": key_file}
        return document, "http.tls.key_file", key_file
    if kind == "metrics_token":
        token_file = tmp_path / "metrics-token"
        token_file.write_text("t" * 40 + "\n")
        token_file.chmod(mode)
        document["metrics"] = {"listen": "127.0.0.1:0", "token_file": str(token_file)}
        return document, "metrics.token_file", str(token_file)
    key_file = _key_file(tmp_path / f"{kind}.pem", mode)
    if kind == "identity":
        document["upstream"] = {"identity_token": {
            "issuer": "https://verifier.internal", "private_key_file": key_file, "audience": "https://orders.internal"}}
        return document, "upstream.identity_token.private_key_file", key_file
    document["issuers"][0]["introspection"] = {
        "client_id": "verifier", "client_auth": "private_key_jwt", "private_key_file": key_file,
        "endpoint": "https://idp.example.test/introspect"}
    return document, "issuers[0].introspection.private_key_file", key_file


KINDS = ["identity", "introspection", "tls", "metrics_token"]


def _key_warnings(settings: Any) -> list[Any]:
    return [w for w in config_warnings(settings) if w.kind == "private_key_readable"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_private_key_others_can_read_is_warned_about_by_key_path_and_mode(kind: str, tmp_path: Path) -> None:
    document, key, path = _document(kind, tmp_path, 0o644)
    (warning,) = _key_warnings(parse_settings(document))
    assert dict(warning.fields) == {"key": key, "path": path, "mode": "0644"}
    assert warning.message.startswith(f"{key}: {path} is mode 0644: ") and "defaultMode: 0440" in warning.message


@pytest.mark.parametrize("kind", KINDS)
def test_a_private_key_only_its_owner_can_read_is_not(kind: str, tmp_path: Path) -> None:
    document, _, _ = _document(kind, tmp_path, 0o600)
    assert _key_warnings(parse_settings(document)) == []


@pytest.mark.parametrize(
    ("mode", "root_owned", "exposed"),
    [
        (0o600, True, False),
        (0o400, True, False),
        (0o440, True, False),  # root:fsGroup 0440, a Kubernetes Secret with defaultMode 0440 and fsGroup
        (0o640, True, False),  # root:ssl-cert 0640 (Debian), PostgreSQL's rule
        (0o644, True, True),  # a Secret's default: every user of the container
        (0o604, True, True),
        (0o660, True, True),  # the group may change it
        (0o600, False, False),
        (0o640, False, True),  # group read of a file the verifier's user owns: no administrator granted it
        (0o644, False, True),
        (0o602, False, True),
    ],
)
def test_which_modes_expose_a_key(mode: int, root_owned: bool, exposed: bool, tmp_path: Path) -> None:
    path = _key_file(tmp_path / "k.pem", mode)
    if os.geteuid() != 0:
        pytest.skip("needs root to choose the file's owner")
    os.chown(path, 0 if root_owned else OTHER_UID, -1)
    assert exposed_mode(path) == (mode if exposed else None)


def test_a_missing_file_is_left_to_its_reader(tmp_path: Path) -> None:
    assert exposed_mode(str(tmp_path / "absent.pem")) is None


def test_the_mode_behind_a_symbolic_link_counts(tmp_path: Path) -> None:
    """A Kubernetes Secret's file is a link into the volume's `..data`: the target's mode is the key's."""
    target = _key_file(tmp_path / "data.pem", 0o644)
    link = tmp_path / "identity.pem"
    link.symlink_to(target)
    assert exposed_mode(str(link)) == 0o644


@pytest.mark.parametrize("kind", KINDS)
def test_readable_key_files_refuse_refuses_it_by_key(kind: str, tmp_path: Path) -> None:
    document, key, path = _document(kind, tmp_path, 0o644, readable_key_files="refuse")
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: {re.escape(path)} is mode 0644"):
        parse_settings(document)


def test_readable_key_files_refuse_takes_a_private_key(tmp_path: Path) -> None:
    document, _, _ = _document("identity", tmp_path, 0o600, readable_key_files="refuse")
    assert _key_warnings(parse_settings(document)) == []


def _check_config(document: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "verifier.yaml"
    path.write_text(yaml.safe_dump(document))
    return subprocess.run(
        [sys.executable, "-m", "verifier", "check-config", str(path)],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "")},
    )


def test_check_config_notes_a_readable_key_and_passes(tmp_path: Path) -> None:
    document, key, path = _document("identity", tmp_path, 0o644)
    result = _check_config(document, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"warning: {key}: {path} is mode 0644: " in result.stderr
    assert "BEGIN" not in result.stderr + result.stdout


def test_check_config_is_quiet_about_a_private_key(tmp_path: Path) -> None:
    document, _, _ = _document("identity", tmp_path, 0o600)
    result = _check_config(document, tmp_path)
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr


def test_check_config_fails_with_readable_key_files_refuse(tmp_path: Path) -> None:
    document, key, _ = _document("identity", tmp_path, 0o644, readable_key_files="refuse")
    result = _check_config(document, tmp_path)
    assert result.returncode == 2 and f"config error: {key}: " in result.stderr, result.stderr


async def test_start_up_logs_one_structured_line_with_the_code_path_and_mode_never_the_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from verifier.app import App
    from verifier.observe.logsink import JsonFormatter

    document, key, path = _document("identity", tmp_path, 0o644)
    app = App(parse_settings(document))
    with caplog.at_level(logging.WARNING, logger="verifier.app"):
        await app.start()
        await app.stop()
    (record,) = [r for r in caplog.records if getattr(r, "code", "") == "private_key_readable"]
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "WARNING" and line["event"] == "config_warning"
    assert (line["key"], line["path"], line["mode"]) == (key, path, "0644")
    assert "PRIVATE KEY" not in json.dumps(line) and Path(path).read_text() not in json.dumps(line)


async def test_start_up_says_nothing_of_a_private_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from verifier.app import App

    document, _, _ = _document("identity", tmp_path, 0o600)
    app = App(parse_settings(document))
    with caplog.at_level(logging.WARNING, logger="verifier.app"):
        await app.start()
        await app.stop()
    assert [r for r in caplog.records if getattr(r, "event", "") == "config_warning"] == []


def test_opening_a_sqlite_file_tries_again_only_while_it_is_locked(tmp_path: Path) -> None:
    """Another worker's lock is waited out (the stores' tests); any other error fails the opening at once, and the
    connection it was met on is closed."""
    met: list[sqlite3.Connection] = []

    def prepare(db: sqlite3.Connection) -> None:
        met.append(db)
        db.execute("SELECT * FROM nowhere")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        open_sqlite(str(tmp_path / "x.sqlite3"), prepare, busy_seconds=0.1)
    assert len(met) == 1
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        met[0].execute("SELECT 1")
