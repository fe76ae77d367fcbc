"""Keys without discovery: `jwks_file` (read at load, and again on SIGHUP) and `jwks_inline`."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from support import FrozenClock
from tokenkit import AUDIENCE, ISSUER, KIDS, FakeFetcher, Mint, SigningKeys, claims, make_verifier, private_jwk

from verifier.config.base import ConfigError
from verifier.errors import UnknownKey
from verifier.settings import IssuerSettings, parse_settings


def config(**issuer: Any) -> dict[str, Any]:
    base = {"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["ES256", "RS256"]}
    return {"http": {"listen": "127.0.0.1:0"}, "issuers": [{**base, **issuer}]}


def load(**issuer: Any) -> IssuerSettings:
    return parse_settings(config(**issuer)).issuers[0]


@pytest.fixture
def jwks_file(tmp_path: Path, jwks_document: dict[str, Any]) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks_document))
    return path


@pytest.mark.parametrize("source", ["file", "inline"])
async def test_tokens_verify_against_local_keys_with_nothing_fetched(
    source: str, jwks_file: Path, jwks_document: dict[str, Any], clock: FrozenClock, mint: Mint
) -> None:
    settings = load(jwks_file=str(jwks_file)) if source == "file" else load(jwks_inline=jwks_document)
    offline = FakeFetcher()  # serves nothing: any call would be a 404
    verifier, keys = make_verifier(settings, offline, clock)
    assert keys.ready.is_set()  # SERVING at once: nothing to wait for
    assert verifier.verify_now(verifier.parse(mint(claims()))) is not None
    assert (await verifier.verify(verifier.parse(mint(claims(), alg="RS256")))).issuer == ISSUER
    with pytest.raises(UnknownKey):  # an unknown kid is unknown: a file is not refetched per token
        await verifier.verify(verifier.parse(mint(claims(), kid="not-in-the-file")))
    assert offline.total == 0


def test_the_file_is_read_when_the_settings_are_loaded(jwks_file: Path, jwks_document: dict[str, Any]) -> None:
    settings = load(jwks_file=str(jwks_file))
    assert json.loads(settings.static_jwks) == jwks_document
    jwks_file.write_text("{}")  # a later change is seen by the next load (SIGHUP), not by this one
    assert json.loads(settings.static_jwks) == jwks_document


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("not json", "is not JSON"),
        ('{"keys": "x"}', "not a key set"),
        ('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}', "no usable signing keys"),
        ("[" * 100_000, "is not JSON"),
        (" " * (1 << 20) + "{}", "larger than"),
    ],
    ids=["missing", "not-json", "keys-not-a-list", "only-a-secret-key", "nested-deeply", "too-large"],
)
def test_a_bad_jwks_file_is_refused_naming_the_key(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "jwks.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as refused:
        load(jwks_file=str(path))
    assert "issuers[0].jwks_file" in str(refused.value) and message in str(refused.value)


def test_a_private_key_in_the_file_is_not_a_verification_key(tmp_path: Path, keys: SigningKeys) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [private_jwk(keys.es256, KIDS["ES256"])]}))
    with pytest.raises(ConfigError, match="no usable signing keys"):
        load(jwks_file=str(path))


@pytest.mark.parametrize(
    ("issuer", "message"),
    [
        ({"jwks_inline": "keys"}, "expected a JWKS object"),
        ({"jwks_inline": {"keys": []}}, "no usable signing keys"),
        ({"jwks_inline": {"keys": [{}]}, "jwks_uri": ISSUER + "/jwks"}, "jwks_inline"),
        ({"jwks_file": "/nonexistent", "jwks_inline": {"keys": []}}, "exclude each other"),
    ],
)
def test_inline_keys_are_checked_at_start_up(issuer: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load(**issuer)
    assert message in str(refused.value)


@pytest.mark.parametrize(
    "odd", [datetime.date(2024, 1, 1), {1: "a", "b": 2}], ids=["an unquoted date-like kid", "a number as a member name"]
)
def test_inline_keys_that_yaml_made_into_no_json_are_a_named_config_error(
    jwks_document: dict[str, Any], odd: Any
) -> None:
    # YAML reads `kid: 2024-01-01` as a date: with another usable key beside it, the start-up (or the SIGHUP
    # reload) died on a TypeError out of json.dumps instead of naming the key.
    with pytest.raises(ConfigError) as refused:
        load(jwks_inline={"keys": [*jwks_document["keys"], {"kty": "EC", "kid": odd}]})
    assert "jwks_inline" in str(refused.value)


@pytest.mark.parametrize("key", ["jwks_uri", "discovery_url", "tls_ca_file"])
def test_nothing_is_fetched_with_a_jwks_file_so_fetch_settings_are_refused(jwks_file: Path, key: str) -> None:
    with pytest.raises(ConfigError, match=f"issuers\\[0\\].{key}: nothing is fetched with jwks_file"):
        load(jwks_file=str(jwks_file), **{key: ISSUER + "/x" if key != "tls_ca_file" else str(jwks_file)})
