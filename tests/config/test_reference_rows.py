"""The configuration reference's rows for the doors, caches and rate limits come from the schema (#19).

A row written by hand next to the schema drifts from what the reader enforces; these keys are read
through `setting` fields, so their rows (default, bounds, doc) are generated like every other.
"""

from __future__ import annotations

import pytest
import yaml

from verifier.config.reference import _OWN_READERS, rows
from verifier.settings import ConfigError, Settings, parse_settings

SCHEMA_SECTIONS = ("grpc.", "http.", "metrics.", "cache.", "edge_cache.", "rate_limits")


def _generated() -> dict[str, tuple[str, str, str]]:
    return {key: (default, bounds, doc) for key, default, bounds, doc in rows(Settings)}


def test_no_hand_written_row_for_these_sections() -> None:
    hand = [key for key, *_ in _OWN_READERS if any(part in key for part in SCHEMA_SECTIONS)]
    assert hand == []


@pytest.mark.parametrize("door", ["grpc", "http", "metrics"])
def test_each_doors_listen_and_tls_rows_are_generated(door: str) -> None:
    generated = _generated()
    assert generated[f"{door}.listen"][1] == "host:port"
    assert {f"{door}.tls.cert_file", f"{door}.tls.key_file", f"{door}.tls.client_ca_file"} <= generated.keys()


def test_rate_limit_rows_carry_the_bounds_the_reader_enforces() -> None:
    generated = _generated()
    for prefix in ("rate_limits.default.", "rate_limits.roles.<name>."):
        assert generated[prefix + "per_second"][1] == "0.001 .. 1000000, per second"
        assert generated[prefix + "burst"][1] == "1 .. 10000000"


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        ("{per_second: 0, burst: 1}", "rate_limits.default.per_second: 0 is outside [0.001, 1000000]"),
        ("{per_second: 1, burst: 0}", "rate_limits.default.burst: 0 is outside [1, 10000000]"),
        ("{per_second: 1}", "rate_limits.default: per_second and burst are required"),
        ("{per_second: 1, burst: 2, brust: 3}", "rate_limits.default.brust"),
    ],
)
def test_the_reader_enforces_those_bounds(limit: str, message: str) -> None:
    text = "http: {listen: '127.0.0.1:0'}\nissuers: [{issuer: 'https://idp.example', audiences: [api]}]\n"
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        parse_settings(yaml.safe_load(text + f"rate_limits: {{default: {limit}}}\n"))
