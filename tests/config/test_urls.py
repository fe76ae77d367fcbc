"""Every outbound URL in the config goes through one check: http(s), https off loopback, parseable."""

from __future__ import annotations

import pytest

from verifier.revocation import parse_revocation_config
from verifier.settings import ConfigError, check_url, parse_settings
from verifier.tokens.introspection import parse_introspection_config

BAD = ["http://[::1", "http://[a]/", "ftp://idp.example.test", "http://idp.example.test", "not a url"]


@pytest.mark.parametrize("url", BAD)
def test_check_url_refuses_with_the_key_named(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^a\.b: "):
        check_url(url, "a.b")


@pytest.mark.parametrize(
    "url", ["https://idp.example.test", "http://127.0.0.1:9400", "http://[::1]:1", "http://localhost"]
)
def test_check_url_accepts_https_and_allowed_loopback_http(url: str) -> None:
    check_url(url, "a.b", allow_insecure_http=True)


@pytest.mark.parametrize("url", BAD)
def test_transmitter_and_introspection_urls_use_the_same_check(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_FOR_TEST", "x" * 32)
    with pytest.raises(ConfigError, match=r"revocation\.transmitters\[0\]\.issuer"):
        parse_revocation_config({"transmitters": [{"issuer": url, "audience": "a", "delivery": "push"}]})
    with pytest.raises(ConfigError, match=r"x\.introspection\.endpoint"):
        parse_introspection_config(
            {"client_id": "v", "client_secret_env": "SECRET_FOR_TEST", "endpoint": url}, "x.introspection"
        )


# -- issue #26 G10: plain http (even on loopback) only when the config says so ----------------------

LOOPBACK_ISSUER = {"issuer": "http://127.0.0.1:9400", "audiences": ["a"], "algorithms": ["ES256"]}


def _settings(issuer: dict[str, object], **extra: object) -> dict[str, object]:
    return {"http": {"listen": "127.0.0.1:0"}, "issuers": [issuer], **extra}


@pytest.mark.parametrize(
    "issuer",
    [
        LOOPBACK_ISSUER,
        {**LOOPBACK_ISSUER, "issuer": "http://localhost:9400"},
        {**LOOPBACK_ISSUER, "issuer": "https://idp.example.test", "jwks_uri": "http://127.0.0.1:1/jwks"},
        {**LOOPBACK_ISSUER, "issuer": "https://idp.example.test", "discovery_url": "http://[::1]:1/d"},
    ],
)
def test_a_plain_http_loopback_issuer_url_is_refused_unless_allowed(issuer: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=r"issuers\[0\]\.\w+: .*allow_insecure_http"):
        parse_settings(_settings(issuer))
    parse_settings(_settings({**issuer, "allow_insecure_http": True}))


def test_an_http_introspection_endpoint_needs_the_issuers_permission(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_FOR_TEST", "x" * 32)
    issuer = {
        **LOOPBACK_ISSUER,
        "issuer": "https://idp.example.test",
        "introspection": {"client_id": "v", "client_secret_env": "SECRET_FOR_TEST",
                          "endpoint": "http://127.0.0.1:1/introspect"},
    }
    with pytest.raises(ConfigError, match=r"issuers\[0\]\.introspection\.endpoint: .*allow_insecure_http"):
        parse_settings(_settings(issuer))
    assert parse_settings(_settings({**issuer, "allow_insecure_http": True})).issuers[0].introspection is not None


def test_a_plain_http_loopback_transmitter_is_refused_unless_allowed() -> None:
    transmitter = {"issuer": "http://127.0.0.1:9400", "audience": "a", "delivery": "push"}
    with pytest.raises(ConfigError, match=r"revocation\.transmitters\[0\]\.issuer: .*allow_insecure_http"):
        parse_revocation_config({"transmitters": [transmitter]})
    parse_revocation_config({"transmitters": [{**transmitter, "allow_insecure_http": True}]})


def test_allow_insecure_http_never_allows_plain_http_off_loopback() -> None:
    with pytest.raises(ConfigError, match="non-loopback"):
        parse_settings(_settings({**LOOPBACK_ISSUER, "issuer": "http://idp.example.test",
                                  "allow_insecure_http": True}))
