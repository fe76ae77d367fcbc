"""`metrics.token_env` / `metrics.token_file`: the bearer token /metrics requires, named in the file, never in it;
and the start-up warning `metrics_unauthenticated` (verifier.config.metrics, verifier.settings)."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from verifier.settings import ConfigError, Listen, TlsSettings, config_warnings, parse_settings

ISSUER = {"issuer": "https://idp.example.test", "audiences": ["a"], "algorithms": ["ES256"]}
TOKEN = "m3tr1cs-t0ken-" + "x" * 30  # 44 characters, RFC 6750 b64token
SHORT = "s3cr3t-but-short"


def document(**metrics: object) -> dict[str, object]:
    return {"http": {"listen": "127.0.0.1:8080"}, "metrics": {"listen": "127.0.0.1:9464", **metrics},
            "issuers": [ISSUER]}


def test_the_token_is_read_from_the_named_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERIFIER_METRICS_TOKEN", TOKEN)
    settings = parse_settings(document(token_env="VERIFIER_METRICS_TOKEN"))
    assert settings.metrics_auth.token == TOKEN
    assert TOKEN not in repr(settings)  # held, never printed


def test_the_token_is_read_from_the_named_file_as_prometheus_reads_credentials_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")  # `echo "$TOKEN" > file`, kubectl --from-file: a trailing newline
    settings = parse_settings(document(token_file=str(path)))
    assert settings.metrics_auth.token == TOKEN
    assert TOKEN not in repr(settings)


def test_without_a_token_key_metrics_is_open() -> None:
    assert parse_settings(document()).metrics_auth.token is None


@pytest.mark.parametrize(
    ("keys", "environment", "file_text", "problem"),
    [
        ({"token_env": "VERIFIER_METRICS_TOKEN"}, {}, None, r"metrics\.token_env: environment variable .* is not set"),
        ({"token_env": "VERIFIER_METRICS_TOKEN"}, {"VERIFIER_METRICS_TOKEN": SHORT}, None,
         r"metrics\.token_env: at least 32 characters are required \(got 16\)"),
        ({"token_env": "VERIFIER_METRICS_TOKEN"}, {"VERIFIER_METRICS_TOKEN": "a" * 20 + " " + "b" * 20}, None,
         r"metrics\.token_env: the token must be one RFC 6750 b64token"),
        ({"token_file": "FILE"}, {}, SHORT, r"metrics\.token_file: at least 32 characters"),
        ({"token_file": "FILE"}, {}, "\n", r"metrics\.token_file: the token is empty"),
        ({"token_file": "FILE"}, {}, "é" * 40, r"metrics\.token_file: .* must be ASCII"),
        ({"token_file": "FILE"}, {}, "a" * 5000, r"metrics\.token_file: .* longer than 4096 bytes"),
        ({"token_file": "/nonexistent/metrics-token"}, {}, None, r"metrics\.token_file: cannot read"),
        ({"token_env": "VERIFIER_METRICS_TOKEN", "token_file": "FILE"}, {"VERIFIER_METRICS_TOKEN": TOKEN}, TOKEN,
         r"metrics\.token_file: set token_env or token_file, not both"),
        ({"token": TOKEN}, {}, None, r"metrics\.token: unknown key"),  # the secret itself is never a key
    ],
)
def test_a_token_that_cannot_be_used_is_refused_by_key_without_its_value(
    keys: dict[str, str],
    environment: dict[str, str],
    file_text: str | None,
    problem: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VERIFIER_METRICS_TOKEN", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "token"
    if file_text is not None:
        path.write_text(file_text)
    keys = {k: str(path) if v == "FILE" else v for k, v in keys.items()}
    with pytest.raises(ConfigError, match=problem) as caught:
        parse_settings(document(**keys))
    for secret in (SHORT, TOKEN, "a" * 20):
        assert secret not in str(caught.value)


def test_check_config_names_a_missing_token_variable(tmp_path: Path) -> None:
    result = _check_config(tmp_path, document(token_env="VERIFIER_METRICS_TOKEN"))
    assert result.returncode == 2
    assert "config error: metrics.token_env: environment variable VERIFIER_METRICS_TOKEN is not set" in result.stderr


# --------------------------------------------------------------------------- metrics_unauthenticated


@pytest.mark.parametrize(
    ("listen", "token", "tls", "warned"),
    [
        ("0.0.0.0:9464", False, None, True),
        ("10.0.0.5:9464", False, None, True),
        ("[::]:9464", False, None, True),
        ("0.0.0.0:9464", False, "server", True),  # TLS alone: encrypted, still anyone's
        ("0.0.0.0:9464", True, None, False),  # the fix
        ("0.0.0.0:9464", False, "mtls", False),  # client certificates: only their holders get through
        ("127.0.0.1:9464", False, None, False),  # loopback: only this host reaches it
        ("[::1]:9464", False, None, False),
        ("localhost:9464", False, None, False),
    ],
)
def test_a_metrics_listener_beyond_loopback_without_credentials_is_warned_about(
    listen: str, token: bool, tls: str | None, warned: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VERIFIER_METRICS_TOKEN", TOKEN)
    settings = parse_settings(document(**({"token_env": "VERIFIER_METRICS_TOKEN"} if token else {})))
    host, _, port = listen.rpartition(":")
    tls_settings = None
    if tls is not None:  # a Listen made here: parsing would load certificate files
        ca = "ca.pem" if tls == "mtls" else ""
        tls_settings = TlsSettings(cert_file="c.pem", key_file="k.pem", client_ca_file=ca)
    settings = dataclasses.replace(settings, metrics=Listen(host=host.strip("[]"), port=int(port), tls=tls_settings))
    found = [w for w in config_warnings(settings) if w.kind == "metrics_unauthenticated"]
    assert bool(found) is warned
    if warned:
        (warning,) = found
        assert "metrics.token_file" in warning.message and "credentials_file" in warning.message
        assert dict(warning.fields) == {"listen": settings.metrics.address if settings.metrics else ""}


def test_check_config_warns_about_an_open_metrics_listener_beyond_loopback(tmp_path: Path) -> None:
    result = _check_config(tmp_path, {**document(), "metrics": {"listen": "0.0.0.0:9464"}})
    assert result.returncode == 0, result.stderr
    assert "warning: metrics.listen (0.0.0.0:9464) is not loopback and /metrics needs no credentials" in result.stderr


async def test_a_verifier_starting_with_an_open_metrics_listener_logs_the_warning_with_its_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from verifier.app import App

    settings = parse_settings({"http": {"listen": "127.0.0.1:0"}, "metrics": {"listen": "0.0.0.0:0"},
                               "issuers": [ISSUER]})
    app = App(settings)
    with caplog.at_level(logging.WARNING, logger="verifier.app"):
        await app.start()
        await app.stop()
    (line,) = [r for r in caplog.records if getattr(r, "code", "") == "metrics_unauthenticated"]
    assert line.levelno == logging.WARNING and getattr(line, "event", "") == "config_warning"
    assert getattr(line, "listen", "") == "0.0.0.0:0"


def _check_config(tmp_path: Path, document: dict[str, object], **environment: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump(document))
    return subprocess.run(
        [sys.executable, "-m", "verifier", "check-config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**environment, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
