"""Every outbound URL in the config goes through one check: http(s), https off loopback, parseable."""

from __future__ import annotations

import pytest

from verifier.revocation import parse_revocation_config
from verifier.settings import ConfigError, check_url
from verifier.tokens.introspection import parse_introspection_config

BAD = ["http://[::1", "http://[a]/", "ftp://idp.example.test", "http://idp.example.test", "not a url"]


@pytest.mark.parametrize("url", BAD)
def test_check_url_refuses_with_the_key_named(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^a\.b: "):
        check_url(url, "a.b")


@pytest.mark.parametrize(
    "url", ["https://idp.example.test", "http://127.0.0.1:9400", "http://[::1]:1", "http://localhost"]
)
def test_check_url_accepts_https_and_loopback_http(url: str) -> None:
    check_url(url, "a.b")


@pytest.mark.parametrize("url", BAD)
def test_transmitter_and_introspection_urls_use_the_same_check(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_FOR_TEST", "x" * 32)
    with pytest.raises(ConfigError, match=r"revocation\.transmitters\[0\]\.issuer"):
        parse_revocation_config({"transmitters": [{"issuer": url, "audience": "a", "delivery": "push"}]})
    with pytest.raises(ConfigError, match=r"x\.introspection\.endpoint"):
        parse_introspection_config(
            {"client_id": "v", "client_secret_env": "SECRET_FOR_TEST", "endpoint": url}, "x.introspection"
        )
