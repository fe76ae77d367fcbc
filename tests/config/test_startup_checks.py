"""Start-up refuses a weak admin token and listeners sharing a port (issue #26 G15)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from verifier.settings import ConfigError, parse_settings

ISSUER = {"issuer": "https://idp.example.test", "audiences": ["a"], "algorithms": ["ES256"]}


def document(**listeners: str) -> dict[str, object]:
    return {**{name: {"listen": address} for name, address in listeners.items()}, "issuers": [ISSUER]}


@pytest.mark.parametrize("token", ["x", "short-admin-token", "a" * 31])
def test_a_short_admin_token_is_refused(token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", token)
    with pytest.raises(ConfigError, match="VERIFIER_ADMIN_TOKEN"):
        parse_settings(document(http="127.0.0.1:8080"))


def test_a_long_admin_token_or_none_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", "k" * 32)
    parse_settings(document(http="127.0.0.1:8080"))
    monkeypatch.delenv("VERIFIER_ADMIN_TOKEN")
    parse_settings(document(http="127.0.0.1:8080"))


@pytest.mark.parametrize(
    ("listeners", "key"),
    [
        ({"http": "127.0.0.1:8080", "metrics": "127.0.0.1:8080"}, "metrics"),
        ({"grpc": "127.0.0.1:50051", "http": "127.0.0.1:50051"}, "http"),
        ({"grpc": "127.0.0.1:9464", "metrics": "0.0.0.0:9464"}, "metrics"),
    ],
)
def test_listeners_sharing_a_port_are_refused(listeners: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}\.listen: .*port"):
        parse_settings(document(**listeners))


def test_worker_metrics_ports_may_not_reach_another_listener() -> None:
    # worker i serves metrics on the configured port + i
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        parse_settings({**document(http="127.0.0.1:9466", metrics="127.0.0.1:9464"), "workers": 4})
    parse_settings({**document(http="127.0.0.1:9468", metrics="127.0.0.1:9464"), "workers": 4})


def test_ephemeral_ports_may_repeat() -> None:
    parse_settings(document(http="127.0.0.1:0", grpc="127.0.0.1:0", metrics="127.0.0.1:0"))


def test_check_config_refuses_a_short_admin_token(tmp_path: Path) -> None:
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump(document(http="127.0.0.1:8080")))
    result = subprocess.run(
        [sys.executable, "-m", "verifier", "check-config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
        env={"VERIFIER_ADMIN_TOKEN": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert result.returncode == 2 and "VERIFIER_ADMIN_TOKEN" in result.stderr
