"""verifier.settings: the issue's example parses; every error names the bad key; check-config exits right."""

from __future__ import annotations

import copy
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from verifier.settings import (
    DEFAULT_LEEWAY_SECONDS,
    DEFAULT_MAX_TOKEN_BYTES,
    SUPPORTED_ALGORITHMS,
    ConfigError,
    ForwardAuthSettings,
    Listen,
    load_settings,
    parse_settings,
)

# The configuration the issue says must work as written.
ISSUE_EXAMPLE = """\
grpc: {listen: "127.0.0.1:50051"}
http: {listen: "127.0.0.1:8080"}          # forward-auth (and later WebAuthn) endpoints
metrics: {listen: "127.0.0.1:9464"}       # Prometheus text format at /metrics
issuers:
  - issuer: "http://127.0.0.1:9400"       # keys found by OIDC discovery under this URL
    audiences: ["https://api.example.test"]
    algorithms: [ES256, RS256, EdDSA]     # allow-list; anything else is refused
    leeway_seconds: 30
    allow_insecure_http: true             # plain http on loopback (issue #26 G10: never by address alone)
"""


def _example() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(ISSUE_EXAMPLE))


def test_the_issue_example_parses_as_written() -> None:
    settings = parse_settings(yaml.safe_load(ISSUE_EXAMPLE))
    assert settings.grpc == Listen(host="127.0.0.1", port=50051)
    assert settings.http == Listen(host="127.0.0.1", port=8080)
    assert settings.metrics == Listen(host="127.0.0.1", port=9464)
    (issuer,) = settings.issuers
    assert issuer.issuer == "http://127.0.0.1:9400"
    assert issuer.audiences == ("https://api.example.test",)
    assert issuer.algorithms == ("ES256", "RS256", "EdDSA")
    assert issuer.leeway_seconds == 30
    assert issuer.discovery == "http://127.0.0.1:9400/.well-known/openid-configuration"
    assert issuer.require_typ_at_jwt is False
    assert settings.max_token_bytes == DEFAULT_MAX_TOKEN_BYTES == 8192


def test_load_settings_reads_the_issue_example_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "verifier.yaml"
    path.write_text(ISSUE_EXAMPLE, encoding="utf-8")
    assert load_settings(path).issuers[0].issuer == "http://127.0.0.1:9400"


def test_defaults_apply_when_optional_keys_are_absent() -> None:
    document = _example()
    del document["issuers"][0]["leeway_seconds"]
    settings = parse_settings(document)
    assert settings.issuers[0].leeway_seconds == DEFAULT_LEEWAY_SECONDS
    assert settings.realm == "verifier" and settings.audit is True


def test_the_forward_auth_trust_defaults_read_no_client_certificate_header() -> None:
    settings = parse_settings(_example())
    assert settings.mtls_thumbprint_header == ""
    assert settings.forward_auth == ForwardAuthSettings(
        forwarded_headers="x-forwarded", header_timeout_seconds=10, idle_timeout_seconds=75
    )


def test_the_forward_auth_keys_are_read_from_the_http_section() -> None:
    document = _example()
    document["http"].update(
        {"forwarded_headers": "x-original", "header_timeout_seconds": 2.5, "idle_timeout_seconds": 90}
    )
    document["mtls_thumbprint_header"] = "X-SSL-Client-Thumbprint"
    settings = parse_settings(document)
    assert settings.forward_auth == ForwardAuthSettings(
        forwarded_headers="x-original", header_timeout_seconds=2.5, idle_timeout_seconds=90
    )
    assert settings.mtls_thumbprint_header == "x-ssl-client-thumbprint"
    assert settings.http == Listen(host="127.0.0.1", port=8080)


def test_every_optional_key_is_read() -> None:
    document = _example()
    document["issuers"][0].update({
        "discovery_url": "http://127.0.0.1:9400/custom",
        "jwks_uri": "http://localhost:9400/jwks",
        "require_typ_at_jwt": True,
        "jwks_min_ttl_seconds": 10,
        "jwks_max_ttl_seconds": 20,
        "jwks_cooldown_seconds": 5,
        "fetch_timeout_seconds": 2.5,
    })
    document.update({"max_token_bytes": 4096, "realm": "edge", "audit": False,
                     "cache": {"token_entries": 10, "negative_entries": 20, "negative_ttl_seconds": 5}})
    settings = parse_settings(document)
    issuer = settings.issuers[0]
    assert (issuer.discovery, issuer.jwks_uri, issuer.require_typ_at_jwt) == (
        "http://127.0.0.1:9400/custom", "http://localhost:9400/jwks", True)
    assert (issuer.jwks_min_ttl_seconds, issuer.jwks_max_ttl_seconds, issuer.jwks_cooldown_seconds,
            issuer.fetch_timeout_seconds) == (10, 20, 5, 2.5)
    assert (settings.max_token_bytes, settings.realm, settings.audit) == (4096, "edge", False)
    assert (settings.cache.token_entries, settings.cache.negative_entries, settings.cache.negative_ttl_seconds) == (
        10, 20, 5)


@pytest.mark.parametrize(
    ("listen", "host", "port", "address"),
    [("[::1]:8080", "::1", 8080, "[::1]:8080"), ("0.0.0.0:0", "0.0.0.0", 0, "0.0.0.0:0"),
     ("localhost:65535", "localhost", 65535, "localhost:65535")],
)
def test_listen_addresses(listen: str, host: str, port: int, address: str) -> None:
    document = _example()
    document["http"] = {"listen": listen}
    parsed = parse_settings(document).http
    assert parsed is not None
    assert (parsed.host, parsed.port, parsed.address) == (host, port, address)


def _set(document: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    target: Any = document
    for part in path[:-1]:
        target = target[part]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value


_DELETE = object()

# (case id, path in the document, new value, text the error must contain)
BAD: list[tuple[str, tuple[Any, ...], Any, str]] = [
    ("unknown root key", ("listen_port",), 1, "listen_port: unknown key"),
    ("unknown issuer key", ("issuers", 0, "audience"), ["x"], "issuers[0].audience: unknown key"),
    ("unknown listen key", ("grpc", "port"), 1, "grpc.port: unknown key"),
    ("unknown cache key", ("cache",), {"entries": 1}, "cache.entries: unknown key"),
    ("HS256 in the allow-list", ("issuers", 0, "algorithms", 1), "HS256", "issuers[0].algorithms[1]"),
    ("none in the allow-list", ("issuers", 0, "algorithms", 0), "none", "issuers[0].algorithms[0]"),
    ("unknown algorithm", ("issuers", 0, "algorithms", 2), "ES999", "issuers[0].algorithms[2]"),
    ("lower-case algorithm", ("issuers", 0, "algorithms", 0), "es256", "issuers[0].algorithms[0]"),
    ("empty allow-list", ("issuers", 0, "algorithms"), [], "issuers[0].algorithms"),
    ("allow-list a string", ("issuers", 0, "algorithms"), "ES256", "issuers[0].algorithms"),
    ("http issuer off loopback", ("issuers", 0, "issuer"), "http://idp.example.test", "issuers[0].issuer: https"),
    ("http issuer on a look-alike host", ("issuers", 0, "issuer"), "http://127.0.0.1.evil.test",
     "issuers[0].issuer: https"),
    ("http issuer on localhost.evil", ("issuers", 0, "issuer"), "http://localhost.evil.test",
     "issuers[0].issuer: https"),
    ("issuer not a URL", ("issuers", 0, "issuer"), "idp.example.test", "issuers[0].issuer"),
    ("issuer ftp", ("issuers", 0, "issuer"), "ftp://idp.example.test", "issuers[0].issuer"),
    ("issuer missing", ("issuers", 0, "issuer"), _DELETE, "issuers[0].issuer: required"),
    ("http jwks_uri off loopback", ("issuers", 0, "jwks_uri"), "http://keys.example.test/jwks",
     "issuers[0].jwks_uri"),
    ("http discovery_url off loopback", ("issuers", 0, "discovery_url"), "http://idp.example.test/d",
     "issuers[0].discovery_url"),
    ("audiences missing", ("issuers", 0, "audiences"), _DELETE, "issuers[0].audiences"),
    ("audience not a string", ("issuers", 0, "audiences"), [5], "issuers[0].audiences[0]"),
    ("leeway too large", ("issuers", 0, "leeway_seconds"), 601, "issuers[0].leeway_seconds"),
    ("leeway negative", ("issuers", 0, "leeway_seconds"), -1, "issuers[0].leeway_seconds"),
    ("leeway a string", ("issuers", 0, "leeway_seconds"), "30", "issuers[0].leeway_seconds"),
    ("leeway a boolean", ("issuers", 0, "leeway_seconds"), True, "issuers[0].leeway_seconds"),
    ("strict typ not a boolean", ("issuers", 0, "require_typ_at_jwt"), "yes", "issuers[0].require_typ_at_jwt"),
    ("fetch timeout too small", ("issuers", 0, "fetch_timeout_seconds"), 0, "issuers[0].fetch_timeout_seconds"),
    ("min ttl above max ttl", ("issuers", 0, "jwks_min_ttl_seconds"), 7200, "issuers[0].jwks_min_ttl_seconds"),
    ("listen without port", ("grpc", "listen"), "127.0.0.1", "grpc.listen"),
    ("listen port out of range", ("http", "listen"), "127.0.0.1:70000", "http.listen"),
    ("listen port not a number", ("http", "listen"), "127.0.0.1:http", "http.listen"),
    ("listen without host", ("metrics", "listen"), ":9464", "metrics.listen"),
    ("listen not a string", ("grpc", "listen"), 50051, "grpc.listen"),
    ("listen section not a mapping", ("grpc",), "127.0.0.1:50051", "grpc: expected a mapping"),
    ("max_token_bytes too small", ("max_token_bytes",), 10, "max_token_bytes"),
    ("issuers empty", ("issuers",), [], "issuers"),
    ("issuer entry not a mapping", ("issuers", 0), "http://127.0.0.1:9400", "issuers[0]"),
    ("unknown forwarded header family", ("http", "forwarded_headers"), "both", "http.forwarded_headers"),
    ("forwarded header family not a string", ("http", "forwarded_headers"), ["x-original"], "http.forwarded_headers"),
    ("forwarded headers on the gRPC listener", ("grpc", "forwarded_headers"), "x-original",
     "grpc.forwarded_headers: unknown key"),
    ("header timeout zero", ("http", "header_timeout_seconds"), 0, "http.header_timeout_seconds"),
    ("idle timeout a string", ("http", "idle_timeout_seconds"), "75", "http.idle_timeout_seconds"),
    ("shed after zero", ("http", "shed_after_seconds"), 0, "http.shed_after_seconds"),
    ("shed after past the longest deadline", ("http", "shed_after_seconds"), 31, "http.shed_after_seconds"),
    ("thumbprint header not a header name", ("mtls_thumbprint_header",), "x cert", "mtls_thumbprint_header"),
    ("thumbprint header not a string", ("mtls_thumbprint_header",), 5, "mtls_thumbprint_header"),
]


@pytest.mark.parametrize(("path", "value", "fragment"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_errors_name_the_bad_key(path: tuple[Any, ...], value: Any, fragment: str) -> None:
    document = _example()
    _set(document, path, value)
    with pytest.raises(ConfigError) as caught:
        parse_settings(document)
    assert fragment in str(caught.value)


def test_a_duplicate_issuer_is_refused_and_named() -> None:
    document = _example()
    document["issuers"].append(copy.deepcopy(document["issuers"][0]))
    with pytest.raises(ConfigError, match=r"issuers\[1\]\.issuer: .* configured twice"):
        parse_settings(document)


@pytest.mark.parametrize(
    ("transmitter", "fragment"),
    [
        ({}, "revocation.transmitters[0].subjects_of: defaults to"),
        ({"subjects_of": ["https://other.example.test"]}, "revocation.transmitters[0].subjects_of[0]: "),
    ],
)
def test_a_transmitter_speaks_for_configured_issuers_only(transmitter: dict[str, Any], fragment: str) -> None:
    data = _example()
    tx = {"issuer": "https://ssf.example.test", "audience": "https://verifier.example.test", **transmitter}
    data["revocation"] = {"transmitters": [tx]}
    with pytest.raises(ConfigError) as caught:
        parse_settings(data)
    assert str(caught.value).startswith(fragment)
    tx["subjects_of"] = ["http://127.0.0.1:9400"]
    assert parse_settings(data).revocation.transmitters[0].scope == ("http://127.0.0.1:9400",)


def test_at_least_one_of_grpc_or_http_is_required() -> None:
    document = _example()
    del document["grpc"], document["http"]
    with pytest.raises(ConfigError, match="grpc"):
        parse_settings(document)


@pytest.mark.parametrize("document", [None, [], "issuers", 5])
def test_a_document_that_is_not_a_mapping_is_refused(document: Any) -> None:
    with pytest.raises(ConfigError, match="config: expected a mapping"):
        parse_settings(document)


def test_the_supported_algorithms_are_asymmetric_only() -> None:
    assert not {alg for alg in SUPPORTED_ALGORITHMS if alg.startswith("HS") or alg.lower() == "none"}


@pytest.mark.parametrize(
    "issuer", ["http://localhost:9400", "http://127.0.0.1:9400", "http://[::1]:9400", "http://127.8.9.10"]
)
def test_plain_http_is_allowed_on_loopback_only(issuer: str) -> None:
    document = _example()
    document["issuers"][0]["issuer"] = issuer
    assert parse_settings(document).issuers[0].issuer == issuer


def test_load_settings_names_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")


def test_load_settings_names_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("issuers: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(path)


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "verifier", "check-config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_check_config_exits_zero_on_the_issue_example(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(ISSUE_EXAMPLE, encoding="utf-8")
    result = _check_config(path)
    assert result.returncode == 0, result.stderr
    assert "1 issuer" in result.stdout


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (ISSUE_EXAMPLE.replace("ES256, RS256", "ES256, HS256"), "issuers[0].algorithms[1]"),
        (ISSUE_EXAMPLE.replace("http://127.0.0.1:9400", "http://idp.example.test"), "issuers[0].issuer"),
        (ISSUE_EXAMPLE + "bogus: 1\n", "bogus: unknown key"),
        ("issuers: [\n", "not valid YAML"),
        (ISSUE_EXAMPLE + 'state: {redis_url: "redis://127.0.0.1:6379/0"}\n', "state.key_prefix: required"),
        (
            ISSUE_EXAMPLE + "policies: [{match: {path: /a}, require: {authenticated: false, roles_any: [a]}}]\n",
            "policies[0].require.roles_any: never met with authenticated: false",
        ),
    ],
    ids=["hs256", "http-issuer", "unknown-key", "broken-yaml", "redis-without-key-prefix", "roles-without-a-token"],
)
def test_check_config_exits_non_zero_on_a_bad_file_and_names_the_key(
    tmp_path: Path, text: str, fragment: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    result = _check_config(path)
    assert result.returncode != 0
    assert fragment in result.stderr


def test_check_config_exits_non_zero_on_a_missing_file(tmp_path: Path) -> None:
    assert _check_config(tmp_path / "nope.yaml").returncode != 0


def test_policy_hosts_are_normalized_and_a_port_is_refused() -> None:
    document = _example()
    document["policies"] = [{"match": {"hosts": ["API.Example.Test."]}}]
    assert parse_settings(document).policies[0].match.hosts == ("api.example.test",)  # type: ignore[index]
    document["policies"] = [{"match": {"hosts": ["api.example.test", "api.example.test:8443"]}}]
    with pytest.raises(ConfigError, match=r"policies\[0\]\.match\.hosts\[1\]: expected a host name without a port"):
        parse_settings(document)


@pytest.mark.parametrize(
    ("key", "value"),
    [("roles_any", ["admin"]), ("roles_all", ["admin"]), ("scopes_all", ["write"]), ("scopes_any", ["write"]),
     ("amr_any", ["hwk"]), ("acr_any", ["phr"]), ("max_auth_age_seconds", 900), ("sender_constraint", "dpop"),
     ("step_up", "webauthn")],
)
def test_a_requirement_that_a_request_without_a_token_skips_is_refused(key: str, value: object) -> None:
    """`authenticated: false` lets a request without a token through before any requirement is looked at: a route
    written `{authenticated: false, roles_any: [admin]}` refused a token without the role and let anyone in without
    one. Per-route trust (issuers_any, audiences_any, clients_any) may narrow whose optional tokens are taken."""
    document = _example()
    document["policies"] = [{"match": {"path_prefix": "/"}, "require": {"authenticated": False, key: value}}]
    with pytest.raises(ConfigError, match=rf"policies\[0\]\.require\.{key}: .*authenticated: false"):
        parse_settings(document)
    document["policies"] = [
        {"match": {"path_prefix": "/"}, "require": {"authenticated": False, "issuers_any": ["http://127.0.0.1:9400"]}}
    ]
    parse_settings(document)


@pytest.mark.parametrize(
    ("match", "fragment"),
    [({"methods": ["GET "]}, "methods[0]"), ({"methods": ["GET", "PO ST"]}, "methods[1]"),
     ({"methods": [""]}, "methods[0]"), ({"hosts": ["admin.example.test "]}, "hosts[0]"),
     ({"hosts": ["ok.test", "admin example.test"]}, "hosts[1]"), ({"hosts": ["admin.example.test/x"]}, "hosts[0]"),
     ({"hosts": ["*.admin.example.test"]}, "hosts[0]")],  # hosts are exact: a wildcard matched no request
)
def test_a_policy_naming_a_method_or_host_no_request_carries_is_refused(
    match: dict[str, object], fragment: str
) -> None:
    """A method or host no request can carry (a space in it: YAML keeps `"GET "` as written) made the policy cover no
    request, silently: every request it was written for fell to the next, laxer policy."""
    document = _example()
    document["policies"] = [{"match": {"path_prefix": "/", **match}, "require": {"roles_any": ["admin"]}}]
    with pytest.raises(ConfigError, match=rf"policies\[0\]\.match\.{re.escape(fragment)}: "):
        parse_settings(document)


_ADMIN = {"match": {"path_prefix": "/admin"}, "require": {"roles_any": ["admin"]}}


@pytest.mark.parametrize(
    "first",
    [{"path_prefix": "/"}, {}, {"path_prefix": "/adm"}, {"path_prefix": "/./adm"}, {"path_prefix": "/%61dmin"}],
)
def test_a_policy_an_earlier_one_covers_entirely_is_refused(first: dict[str, object]) -> None:
    """First match wins: an `/admin` policy below a catch-all never applied, and its requests got the catch-all's
    requirements (any valid token) while the file read as if they needed the admin role."""
    document = _example()
    document["policies"] = [{"name": "rest", "match": first}, _ADMIN]
    with pytest.raises(ConfigError, match=r"policies\[1\] \(policy-1\): never applies, policies\[0\] \(rest\)"):
        parse_settings(document)


@pytest.mark.parametrize(
    ("first", "later"),
    [({"path_prefix": "/admin"}, {"path_prefix": "/"}),
     ({"path_prefix": "/", "methods": ["POST"]}, {"path_prefix": "/admin"}),
     ({"path_prefix": "/", "hosts": ["a.test"]}, {"path_prefix": "/admin"}),
     ({"path_prefix": "/admin/"}, {"path": "/admin"}),  # /admin itself is not under /admin/
     ({"path": "/admin"}, {"path_prefix": "/admin"}),
     ({"path_prefix": "/admin", "methods": ["GET"]}, {"path_prefix": "/admin/x", "methods": ["GET", "POST"]})],
)
def test_policies_in_the_right_order_or_overlapping_in_part_are_taken(
    first: dict[str, object], later: dict[str, object]
) -> None:
    document = _example()
    document["policies"] = [{"match": first}, {"match": later}]
    parse_settings(document)


def test_a_policy_host_without_an_ascii_form_is_refused() -> None:
    """An internationalized name is matched as clients send it (its A-label): without one it meets no request."""
    document = _example()
    document["policies"] = [{"match": {"hosts": ["Bücher.example.test"]}}]
    assert parse_settings(document).policies[0].match.hosts == ("bücher.example.test",)  # type: ignore[index]
    document["policies"] = [{"match": {"hosts": ["bücher." + "ü" * 70 + ".test"]}}]  # a label past 63 octets
    with pytest.raises(ConfigError, match=r"policies\[0\]\.match\.hosts\[0\]: .* no ASCII \(IDNA A-label\) form"):
        parse_settings(document)


# --- workers: N > 1 share nothing without Redis (#18 F8) ------------------------------------------

SHARED_STATE_FEATURES = {
    "revocation": "revocation: {}\n",
    "dpop": "dpop: {iat_past_seconds: 30}\n",
    "rate_limits": "rate_limits: {default: {per_second: 5, burst: 10}}\n",
    "sender_constraint": "policies:\n  - match: {path_prefix: /}\n    require: {sender_constraint: dpop}\n",
}


@pytest.mark.parametrize("feature", list(SHARED_STATE_FEATURES))
def test_refuses_several_workers_without_redis_when_a_feature_needs_shared_state(feature: str) -> None:
    data = yaml.safe_load(ISSUE_EXAMPLE + "workers: 2\n" + SHARED_STATE_FEATURES[feature])
    with pytest.raises(ConfigError, match=r"state\.redis_url") as info:
        parse_settings(data)
    assert feature in str(info.value) or "policies[0]" in str(info.value)
    parse_settings(yaml.safe_load(ISSUE_EXAMPLE + "workers: 1\n" + SHARED_STATE_FEATURES[feature]))


def test_several_workers_without_redis_and_without_shared_features_are_fine() -> None:
    assert parse_settings(yaml.safe_load(ISSUE_EXAMPLE + "workers: 2\n")).workers == 2


def test_check_config_refuses_several_workers_sharing_a_kill_switch_without_redis(tmp_path: Path) -> None:
    path = tmp_path / "workers.yaml"
    path.write_text(ISSUE_EXAMPLE + "workers: 4\nrevocation: {}\n", encoding="utf-8")
    result = _check_config(path)
    assert result.returncode == 2
    assert "state.redis_url" in result.stderr and "workers" in result.stderr


def test_the_dpop_and_state_sections_report_every_problem_with_suggestions(tmp_path: Path) -> None:
    """Sections read by the schema's one reader: a typo names the nearest key, and one run names them all."""
    document = _example()
    document["dpop"] = {"iat_past_secs": 60, "max_proof_bytes": 10}
    document["state"] = {"max_entrys": 5, "timeout_seconds": 9}
    with pytest.raises(ConfigError) as caught:
        parse_settings(document)
    lines = str(caught.value).splitlines()
    assert "dpop.iat_past_secs: unknown key (did you mean iat_past_seconds?)" in lines
    assert any(line.startswith("dpop.max_proof_bytes: 10 is outside [512, 65536]") for line in lines)
    assert "state.max_entrys: unknown key (did you mean max_entries?)" in lines
    assert any(line.startswith("state.timeout_seconds: 9 is outside") for line in lines)


def test_the_webauthn_and_revocation_sections_report_every_problem_with_suggestions() -> None:
    document = _example()
    document["webauthn"] = {"rp_id": "localhost", "origin": ["http://localhost:9555"], "demo": "yes"}
    document["revocation"] = {
        "transmitters": [{"issuer": "https://idp.example.test", "audiance": "x", "max_age_seconds": 0}],
        "resync_interval": 5,
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings(document)
    lines = str(caught.value).splitlines()
    assert "webauthn.origin: unknown key (did you mean origins?)" in lines
    assert "webauthn.demo: expected true or false" in lines
    assert "revocation.transmitters[0].audiance: unknown key (did you mean audience?)" in lines
    assert any(line.startswith("revocation.transmitters[0].max_age_seconds: 0 is outside") for line in lines)
    assert "revocation.resync_interval: unknown key (did you mean resync_interval_seconds?)" in lines


def test_the_introspection_section_reports_every_problem_with_suggestions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Introspection keys go through the schema's one reader too (issue #19): all problems, nearest-key hints."""
    monkeypatch.setenv("VERIFIER_IDP_SECRET", "s3cret")
    document = _example()
    document["issuers"][0]["introspection"] = {
        "client_id": "verifier",
        "client_secret_env": "VERIFIER_IDP_SECRET",
        "timout_seconds": 1,
        "max_in_flight": 0,
        "serve_stale_on_error": "yes",
    }
    with pytest.raises(ConfigError) as caught:
        parse_settings(document)
    lines = str(caught.value).splitlines()
    assert "issuers[0].introspection.timout_seconds: unknown key (did you mean timeout_seconds?)" in lines
    assert any(line.startswith("issuers[0].introspection.max_in_flight: 0 is outside [1, 10000]") for line in lines)
    assert "issuers[0].introspection.serve_stale_on_error: expected true or false" in lines


def test_introspect_jwts_without_an_introspection_section_is_refused_by_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """`introspect_jwts: true` on an issuer with no `introspection` section passed start-up, then every JWT of that
    issuer met no introspector and was answered 500, from the first request on: refused at start-up instead."""
    document = _example()
    document["issuers"][0]["introspect_jwts"] = True
    with pytest.raises(ConfigError, match=r"^issuers\[0\]\.introspect_jwts: needs an introspection section"):
        parse_settings(document)
    monkeypatch.setenv("VERIFIER_IDP_SECRET", "s3cret")
    document["issuers"][0]["introspection"] = {"client_id": "verifier", "client_secret_env": "VERIFIER_IDP_SECRET"}
    assert parse_settings(document).issuers[0].introspect_jwts is True


def test_a_jwks_held_longer_than_a_day_is_refused_by_key() -> None:
    """A key the provider withdraws (leaked) stays trusted until the JWKS is fetched again: `jwks_min_ttl_seconds`
    (a floor over the provider's own short max-age) of a week let the key's holder mint accepted tokens for a week.
    Both bounds stop at a day; a day is accepted."""
    document = _example()
    document["issuers"][0].update(jwks_min_ttl_seconds=604_800, jwks_max_ttl_seconds=604_800)
    with pytest.raises(ConfigError) as caught:
        parse_settings(document)
    lines = str(caught.value).splitlines()
    assert "issuers[0].jwks_min_ttl_seconds: 604800 is outside [1, 86400]" in lines
    assert "issuers[0].jwks_max_ttl_seconds: 604800 is outside [1, 86400]" in lines
    document["issuers"][0].update(jwks_min_ttl_seconds=86_400, jwks_max_ttl_seconds=86_400)
    assert parse_settings(document).issuers[0].jwks_min_ttl_seconds == 86_400


def test_a_jwks_cooldown_longer_than_ten_minutes_or_the_max_ttl_is_refused_by_key() -> None:
    """After a fetch, a token signed with a key the provider has just added (a rotation) is refused until the
    unknown-kid cooldown is over: `jwks_cooldown_seconds` had no upper bound, so a day's cooldown refused a rotated
    key for a day. Ten minutes at most, and no longer than `jwks_max_ttl_seconds` (a template's tenant refreshes
    its stale keys only once the cooldown is over: a withdrawn key was trusted past the max TTL). Negative, NaN and
    infinite values are refused as before; 0 (every unknown kid refetches) stays allowed."""
    document = _example()
    document["issuers"][0]["jwks_cooldown_seconds"] = 86_400
    with pytest.raises(ConfigError, match=r"^issuers\[0\]\.jwks_cooldown_seconds: 86400 is outside \[0, 600\]$"):
        parse_settings(document)
    document["issuers"][0].update(jwks_cooldown_seconds=600, jwks_max_ttl_seconds=300)
    with pytest.raises(ConfigError, match=r"^issuers\[0\]\.jwks_cooldown_seconds: larger than jwks_max_ttl_seconds"):
        parse_settings(document)
    for bad in (-1, math.nan, math.inf):
        document["issuers"][0].update(jwks_cooldown_seconds=bad, jwks_max_ttl_seconds=3600)
        with pytest.raises(ConfigError, match=r"^issuers\[0\]\.jwks_cooldown_seconds: "):
            parse_settings(document)
    document["issuers"][0]["jwks_cooldown_seconds"] = 600
    assert parse_settings(document).issuers[0].jwks_cooldown_seconds == 600
    document["issuers"][0]["jwks_cooldown_seconds"] = 0
    assert parse_settings(document).issuers[0].jwks_cooldown_seconds == 0


def test_a_wildcard_audience_is_refused_by_key() -> None:
    """`audiences: ["*"]` reads as "any audience" but audiences are compared exactly: it took only tokens whose `aud`
    is the string "*", which a provider letting clients name their audience issues to whoever asks. Refused, on an
    issuer and in a policy's `audiences_any`; an audience merely containing `*` is a name like any other."""
    document = _example()
    document["issuers"][0]["audiences"] = ["https://api.example.test", "*"]
    with pytest.raises(ConfigError, match=r"^issuers\[0\]\.audiences\[1\]: '\*' is no wildcard"):
        parse_settings(document)
    document = _example()
    document["policies"] = [{"match": {"path_prefix": "/"}, "require": {"audiences_any": ["*"]}}]
    with pytest.raises(ConfigError, match=r"^policies\[0\]\.require\.audiences_any\[0\]: '\*' is no wildcard"):
        parse_settings(document)
    document["policies"][0]["require"]["audiences_any"] = ["urn:api:*"]
    document["issuers"][0]["audiences"] = ["urn:api:*"]
    assert parse_settings(document).issuers[0].audiences == ("urn:api:*",)


def test_dpop_origins_from_resources_takes_the_origins_of_the_configured_resource_identifiers() -> None:
    """Opt-in: `dpop.origins` from `protected_resource.resource` and `policies[].resource` (RFC 9728 identifiers,
    our public URLs), each origin once, default resource first. Off, or with no resource named, nothing is taken
    (the latter is a problem, as is setting both keys)."""
    document = _example()
    document["protected_resource"] = {"resource": "https://API.example.test/"}
    document["policies"] = [
        {"name": "orders", "match": {"path_prefix": "/orders"}, "resource": "https://orders.example.test:8443/orders"},
        {"name": "more", "match": {"path_prefix": "/more"}, "resource": "https://api.example.test/more"},
        {"name": "rest", "match": {"path_prefix": "/"}},
    ]
    document["dpop"] = {"origins_from_resources": True}
    settings = parse_settings(document)
    assert settings.dpop is not None
    assert settings.dpop.origins == ("https://api.example.test", "https://orders.example.test:8443")
    document["dpop"] = {}
    assert parse_settings(document).dpop.origins == ()  # type: ignore[union-attr]
    document["dpop"] = {"origins_from_resources": True, "origins": ["https://api.example.test"]}
    with pytest.raises(ConfigError, match=r"dpop.origins_from_resources: set origins or origins_from_resources"):
        parse_settings(document)
    bare = _example()
    bare["dpop"] = {"origins_from_resources": True}
    with pytest.raises(ConfigError, match=r"dpop.origins_from_resources: no protected_resource.resource"):
        parse_settings(bare)


# --- Redis's bound of rate-limit buckets, split per issuers[] entry -----------------------------------------


def _two_issuers(state: dict[str, Any] | None, main: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """The example's issuer (the operator's own) and an open multi-tenant template, with `state` if given."""
    document = _example()
    own = document["issuers"][0]
    document["issuers"] = [{**own, **main}, {**own, "issuer": "http://127.0.0.1:9401/{tenant}", "tenants": "any",
                                             **template}]  # fmt: skip
    if state is not None:
        document["state"] = state
    return document


REDIS = {"redis_url": "redis://127.0.0.1:6379/0", "key_prefix": "v:"}


def test_redis_s_bound_of_buckets_is_split_per_issuer_entry_equally_unless_a_share_is_set() -> None:
    """Each `issuers[]` entry gets its own part of `state.redis_max_buckets` (a template's tenants share their
    entry's): equal parts by default, `max_buckets_share` a fraction of it, the entries without one the rest."""
    settings = parse_settings(_two_issuers({**REDIS, "redis_max_buckets": 1_000}, {}, {}))
    assert settings.redis_bucket_bounds == {"http://127.0.0.1:9400": 500, "http://127.0.0.1:9401/{tenant}": 500}
    settings = parse_settings(_two_issuers({**REDIS, "redis_max_buckets": 1_000}, {"max_buckets_share": 0.9}, {}))
    assert settings.redis_bucket_bounds == {"http://127.0.0.1:9400": 900, "http://127.0.0.1:9401/{tenant}": 100}
    settings = parse_settings(_two_issuers(None, {}, {"max_buckets_share": 0}))  # the default bound, halved
    assert settings.redis_bucket_bounds == {"http://127.0.0.1:9400": 500_000, "http://127.0.0.1:9401/{tenant}": 500_000}
    assert parse_settings(_example()).redis_bucket_bounds == {"http://127.0.0.1:9400": 1_000_000}  # one: all of it


@pytest.mark.parametrize(
    ("state", "main", "template", "problem"),
    [
        (REDIS, {"max_buckets_share": 1.5}, {}, "issuers[0].max_buckets_share: 1.5 is outside [0, 1]"),
        (REDIS, {"max_buckets_share": -0.1}, {}, "issuers[0].max_buckets_share: -0.1 is outside [0, 1]"),
        (
            {**REDIS, "redis_max_buckets": 10},
            {"max_buckets_share": 0.6},
            {"max_buckets_share": 0.6},
            "issuers[0].max_buckets_share: state.redis_max_buckets split by issuer entry: the shares come to more",
        ),
        (
            {**REDIS, "redis_max_buckets": 10},
            {"max_buckets_share": 1},
            {},
            "issuers[0].max_buckets_share: state.redis_max_buckets split by issuer entry: 0 of 10 left for 1 part",
        ),
        (
            {**REDIS, "redis_max_buckets": 10},
            {},
            {"max_buckets_share": 0.05},
            "issuers[1].max_buckets_share: state.redis_max_buckets split by issuer entry: 0.05 of 10 is not one entry",
        ),
        (
            {**REDIS, "redis_max_buckets": 1},
            {},
            {},
            "state.redis_max_buckets: state.redis_max_buckets split by issuer entry: 1 of 1 left for 2 part(s)",
        ),
        (None, {"max_buckets_share": 0.5}, {}, "issuers[0].max_buckets_share: only meaningful with state.redis_url"),
    ],
)
def test_bucket_shares_that_cannot_give_each_issuer_entry_a_bucket_are_refused_at_start_up(
    state: dict[str, Any] | None, main: dict[str, Any], template: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_settings(_two_issuers(state, main, template))
    assert problem in str(refused.value)


@pytest.mark.parametrize(("value", "accepted"), [(0, False), (0.05, False), (-1, False), (0.1, True), (10, True)])
def test_the_grpc_handshake_timeout_is_checked_at_start_up(value: float, accepted: bool) -> None:
    """`grpc_handshake_timeout_seconds` must be positive (0 would close every connection at once) and is read as
    given; its default (10 s) replaces gRPC's 120 s."""
    document = _example()
    document["grpc_handshake_timeout_seconds"] = value
    if accepted:
        assert parse_settings(document).grpc_handshake_timeout_seconds == value
    else:
        with pytest.raises(ConfigError, match=r"grpc_handshake_timeout_seconds: .* is outside \[0\.1, 600\]"):
            parse_settings(document)
    del document["grpc_handshake_timeout_seconds"]
    assert parse_settings(document).grpc_handshake_timeout_seconds == 10.0
