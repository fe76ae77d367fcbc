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


@pytest.mark.parametrize(
    "token",
    ["k" * 40 + "\n", "k" * 40 + " ", "\tk" + "k" * 40, " " * 40, "\n" * 40],
    ids=["trailing-newline", "trailing-space", "leading-tab", "blank", "newlines"],
)
def test_an_admin_token_no_request_can_present_is_refused_at_start(token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A presented token is read without its surrounding white space (RFC 9110 section 5.5), so a configured one
    with some (a Secret's file ending in a newline, put in the environment) matched no request: the kill switch
    started, and in the incident it was there for the operator's `Authorization: Bearer <token>` got 401. One made of
    white space only opened to nobody either. Both are refused at start, naming the variable, never its value."""
    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", token)
    with pytest.raises(ConfigError, match="VERIFIER_ADMIN_TOKEN: surrounding white space") as refused:
        parse_settings(document(http="127.0.0.1:8080"))
    assert "k" * 40 not in str(refused.value)


@pytest.mark.parametrize(
    "token",
    ["é" * 40, "k" * 39 + "ключ", "k" * 20 + "\x1b" + "k" * 20, "k" * 20 + "\x7f" + "k" * 20],
    ids=["latin", "cyrillic", "esc", "del"],
)
def test_an_admin_token_that_is_not_printable_ascii_is_refused_at_start(
    token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token arrives in an HTTP header, whose bytes the doors read as Latin-1 (RFC 9110 section 5.5: field values
    are ASCII in practice): a UTF-8 `é` configured was the bytes C3 A9, presented it read as `Ã©`, so the kill switch
    started and no request could ever open it. Refused at start, naming the variable, never its value."""
    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", token)
    with pytest.raises(ConfigError, match=r"VERIFIER_ADMIN_TOKEN: .*printable ASCII") as refused:
        parse_settings(document(http="127.0.0.1:8080"))
    assert token not in str(refused.value)


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


TEMPLATE = {
    "issuer": "https://login.example.test/{tenant}/v2.0", "audiences": ["api://orders"], "algorithms": ["RS256"],
    "tenants": "any", "tenant_claim": "tid",
}
ADMIN_POLICY = {"name": "admin", "match": {"path_prefix": "/admin/"}, "require": {"roles_any": ["admin"]}}


def test_a_role_any_tenant_can_grant_itself_is_said_at_start_up(tmp_path: Path) -> None:
    """With `tenants: any`, anyone who makes a tenant at the provider assigns its own users any role name (Entra
    app roles, a tenant's groups): a policy requiring a role and trusting the whole template is met by them. Not
    refused (per-tenant roles are a multi-tenant SaaS's model), but `check-config` and the start-up log say it."""
    from verifier.settings import config_warnings

    open_policy = parse_settings({"http": {"listen": "127.0.0.1:0"}, "issuers": [TEMPLATE], "policies": [ADMIN_POLICY]})
    (found,) = config_warnings(open_policy)
    warning = found.message
    assert found.kind == "tenant_granted_roles"
    assert "policies[0] (admin)" in warning and TEMPLATE["issuer"] in warning and "issuers_any" in warning
    narrowed = {**ADMIN_POLICY, "require": {"roles_any": ["admin"], "issuers_any": [
        "https://login.example.test/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0"]}}
    listed = {**TEMPLATE, "tenants": ["72f988bf-86f1-41af-91ab-2d7cd011db47"]}
    scopes_only = {**ADMIN_POLICY, "require": {"scopes_any": ["orders:admin"]}}
    for issuer, policy in ((TEMPLATE, narrowed), (listed, ADMIN_POLICY), (TEMPLATE, scopes_only)):
        quiet = parse_settings({"http": {"listen": "127.0.0.1:0"}, "issuers": [issuer], "policies": [policy]})
        assert config_warnings(quiet) == []
    result = _check_config(tmp_path, {"http": {"listen": "127.0.0.1:8080"}, "issuers": [TEMPLATE],
                                      "policies": [ADMIN_POLICY]})
    assert result.returncode == 0, result.stderr
    assert "warning: policies[0] (admin): requires roles, and any tenant of" in result.stderr


async def test_a_verifier_starting_with_such_a_policy_logs_the_warning(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from verifier.app import App

    settings = parse_settings({"http": {"listen": "127.0.0.1:0"}, "issuers": [TEMPLATE], "policies": [ADMIN_POLICY]})
    app = App(settings)
    with caplog.at_level(logging.WARNING, logger="verifier.app"):
        await app.start()
        await app.stop()
    (line,) = [r for r in caplog.records if getattr(r, "event", "") == "config_warning"]
    assert line.levelno == logging.WARNING and "any tenant of" in line.getMessage()


def test_a_kong_consumer_one_identity_could_take_from_another_is_warned_about() -> None:
    """`upstream.consumer` names the Kong consumer by a claim's value alone: with two issuers (or a tenant template)
    equal values are one consumer, and a claim users can edit (a username) lets a user name another's consumer."""
    from verifier.settings import config_warnings

    other = {**ISSUER, "issuer": "https://idp2.example.test"}

    def warnings(issuers: list[dict[str, object]], claim: str) -> list[str]:
        upstream = {"consumer": {"claim": claim, "by": "username"}}
        return [w.message for w in config_warnings(parse_settings({"http": {"listen": "127.0.0.1:0"},
                                                                   "issuers": issuers, "upstream": upstream}))]

    assert warnings([ISSUER], "sub") == []
    (two,) = warnings([ISSUER, other], "sub")
    assert two.startswith("upstream.consumer: ") and "several issuers" in two
    (template,) = warnings([TEMPLATE], "oid")
    assert TEMPLATE["issuer"] in template
    (editable,) = warnings([ISSUER], "preferred_username")
    assert editable.startswith("upstream.consumer.claim: 'preferred_username'")


def test_the_webauthn_registry_with_dpop_and_no_declared_origins_is_warned_about(tmp_path: Path) -> None:
    """The registry's endpoints judge a DPoP proof on the URL its request names: without `dpop.origins`, that is
    the caller's scheme and host (behind a TLS gateway, http://<Host>: a proof for https://<public host> fails).
    `check-config` and start-up say so, naming the fix; declared origins, or no registry, are quiet."""
    from verifier.settings import config_warnings

    webauthn = {"rp_id": "example.test", "origins": ["https://app.example.test"],
                "storage": {"sqlite_path": str(tmp_path / "w.sqlite3")}}

    def warnings(**sections: object) -> list[str]:
        settings = parse_settings({"http": {"listen": "127.0.0.1:0"}, "issuers": [ISSUER], **sections})
        return [w.message for w in config_warnings(settings)]

    (warning,) = warnings(webauthn=webauthn, dpop={})
    assert warning.startswith("webauthn with dpop: ") and "dpop.origins" in warning
    assert warnings(webauthn=webauthn, dpop={"origins": ["https://api.example.test"]}) == []
    assert warnings(dpop={}) == []
    result = _check_config(tmp_path, {"http": {"listen": "127.0.0.1:8080"}, "issuers": [ISSUER],
                                      "webauthn": webauthn, "dpop": {}})
    assert result.returncode == 0, result.stderr
    assert "warning: webauthn with dpop: the registry endpoints" in result.stderr


def _check_config(
    tmp_path: Path, document: dict[str, object], **environment: str
) -> subprocess.CompletedProcess[str]:
    """`verifier check-config` run on `document`, written to a file in `tmp_path`, with `environment` set."""
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump(document))
    return subprocess.run(
        [sys.executable, "-m", "verifier", "check-config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**environment, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


ADMIN_TOKEN = "k" * 32


def admin_document(**listeners: str) -> dict[str, object]:
    """`document` with a revocation section: the kill switch exists, so `admin` may be configured."""
    return {**document(**listeners), "revocation": {}}


@pytest.mark.parametrize(
    ("listeners", "key"),
    [
        ({"http": "127.0.0.1:8080", "admin": "127.0.0.1:8080"}, "admin"),
        ({"grpc": "127.0.0.1:50051", "admin": "127.0.0.1:50051"}, "admin"),
        ({"http": "127.0.0.1:8080", "metrics": "127.0.0.1:9002", "admin": "0.0.0.0:9002"}, "admin"),
    ],
)
def test_the_admin_listener_sharing_a_port_is_refused(listeners: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}\.listen: port \d+ is also the \w+ listener's"):
        parse_settings(admin_document(**listeners))


def test_worker_metrics_ports_may_not_reach_the_admin_listener() -> None:
    # worker i serves metrics on the configured port + i; every worker shares the one admin port (SO_REUSEPORT)
    with pytest.raises(ConfigError, match=r"admin\.listen: port 9466 is also the metrics listener's"):
        parse_settings({**admin_document(http="127.0.0.1:8080", metrics="127.0.0.1:9464", admin="127.0.0.1:9466"),
                        "workers": 4, "state": {"redis_url": "redis://127.0.0.1:6379/0", "key_prefix": "t:"}})
    settings = parse_settings({**admin_document(http="127.0.0.1:8080", metrics="127.0.0.1:9464",
                                                admin="127.0.0.1:9468"),
                               "workers": 4, "state": {"redis_url": "redis://127.0.0.1:6379/0", "key_prefix": "t:"}})
    assert settings.admin is not None and settings.admin.address == "127.0.0.1:9468"


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:70000", "127.0.0.1:admin", ":9002"])
def test_a_bad_admin_address_is_refused_by_name(address: str) -> None:
    with pytest.raises(ConfigError, match=r"admin\.listen: expected host:port"):
        parse_settings(admin_document(http="127.0.0.1:8080", admin=address))


def test_an_unknown_admin_key_is_refused() -> None:
    document_ = admin_document(http="127.0.0.1:8080")
    document_["admin"] = {"listen": "127.0.0.1:9002", "port": 9002}
    with pytest.raises(ConfigError, match=r"admin\.port: unknown key"):
        parse_settings(document_)


def test_the_admin_listener_without_a_kill_switch_is_refused() -> None:
    """No revocation service: the admin listener would answer 404 to everything; the refusal names the fix."""
    with pytest.raises(ConfigError, match=r"^admin\.listen: the admin API .* needs a revocation section"):
        parse_settings(document(http="127.0.0.1:8080", admin="127.0.0.1:9002"))
    assert parse_settings(admin_document(http="127.0.0.1:8080", admin="[::1]:9002")).admin is not None


@pytest.mark.parametrize(
    ("listeners", "token", "revocation", "warned"),
    [
        ({"http": "0.0.0.0:8080"}, ADMIN_TOKEN, True, True),
        ({"http": "10.0.0.5:8080"}, ADMIN_TOKEN, True, True),
        ({"http": "[::]:8080"}, ADMIN_TOKEN, True, True),
        ({"http": "127.0.0.1:8080"}, ADMIN_TOKEN, True, False),  # loopback: only this host reaches it
        ({"http": "[::1]:8080"}, ADMIN_TOKEN, True, False),
        ({"http": "localhost:8080"}, ADMIN_TOKEN, True, False),
        ({"http": "0.0.0.0:8080", "admin": "127.0.0.1:9002"}, ADMIN_TOKEN, True, False),  # the fix
        ({"http": "0.0.0.0:8080"}, "", True, False),  # no token: no admin API
        ({"http": "0.0.0.0:8080"}, ADMIN_TOKEN, False, False),  # no revocation: no admin API
        ({"grpc": "0.0.0.0:50051"}, ADMIN_TOKEN, True, False),  # no HTTP listener: no admin API
    ],
)
def test_the_admin_api_on_a_non_loopback_forward_auth_listener_is_warned_about(
    listeners: dict[str, str], token: str, revocation: bool, warned: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from verifier.settings import config_warnings

    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", token)
    settings = parse_settings(admin_document(**listeners) if revocation else document(**listeners))
    found = [w for w in config_warnings(settings) if w.kind == "admin_on_shared_listener"]
    assert bool(found) is warned
    if warned:
        assert "admin.listen" in found[0].message and "http.listen" in found[0].message
        assert ADMIN_TOKEN not in found[0].message and ADMIN_TOKEN not in str(found[0].fields)


def test_check_config_warns_about_the_admin_api_on_a_non_loopback_forward_auth_listener(tmp_path: Path) -> None:
    result = _check_config(tmp_path, admin_document(http="0.0.0.0:8080"), VERIFIER_ADMIN_TOKEN=ADMIN_TOKEN)
    assert result.returncode == 0, result.stderr
    assert "warning: VERIFIER_ADMIN_TOKEN is set and the admin API shares http.listen (0.0.0.0:8080)" in result.stderr
    assert "set admin.listen" in result.stderr


def test_a_role_rule_on_a_claim_users_set_themselves_is_said_at_start_up() -> None:
    """A role rule on `preferred_username` (or `name`, `nickname`, ...): at a provider whose users edit their own
    profile, a user who renames themselves to the mapped value gets the role. Not refused (some providers pin
    usernames), but said, with the fix; `groups` and `email` (granted only when verified) are not."""
    from verifier.settings import config_warnings

    issuer = {"issuer": "https://idp.example.test", "audiences": ["api"], "algorithms": ["ES256"], "roles": [
        {"role": "admin", "claim": "groups", "values": ["platform-admins"]},
        {"role": "admin", "claim": "preferred_username", "values": ["root"]},
        {"role": "ops", "claim": "email", "values": ["ops@corp.example"]},
    ]}
    settings = parse_settings({"http": {"listen": "127.0.0.1:0"}, "issuers": [issuer]})
    (found,) = [w for w in config_warnings(settings) if w.kind == "role_claim_editable"]
    assert "issuers[0].roles[1]" in found.message and "'preferred_username'" in found.message


def _with_role_claim(claim: str) -> dict[str, object]:
    issuer = {
        "issuer": "https://idp.example.test",
        "audiences": ["api"],
        "algorithms": ["ES256"],
        "roles": [
            {"role": "admin", "claim": "groups", "values": ["platform-admins"]},
            {"role": "admin", "claim": claim, "values": ["admin"]},
        ],
    }
    return {"http": {"listen": "127.0.0.1:0"}, "issuers": [issuer]}


@pytest.mark.parametrize(
    ("claim", "said"),
    [
        ("realm_access..roles", "a segment is empty"),
        (".realm_access.roles", "a segment is empty"),
        ("realm_access.roles.", "a segment is empty"),
        ("a.b.c.d.e.f.g.h.i", "9 segments; at most 8"),
    ],
)
def test_a_role_claim_path_that_could_never_match_is_refused_by_key(claim: str, said: str) -> None:
    """A rule whose path has an empty segment or is deeper than any provider nests roles matched no token: every
    request to a route requiring its role got 403, with nothing saying why. Now the key is named at start-up."""
    with pytest.raises(ConfigError, match=rf"issuers\[0\]\.roles\[1\]\.claim: '{claim}' .*{said}"):
        parse_settings(_with_role_claim(claim))


@pytest.mark.parametrize("claim", ["realm_access.roles", "resource_access.my-api.roles", "https://example.com/roles"])
def test_a_role_claim_path_or_a_name_with_dots_of_its_own_is_accepted(claim: str) -> None:
    (rule,) = [r for r in parse_settings(_with_role_claim(claim)).issuers[0].roles if r.claim == claim]
    assert rule.claim == claim


def test_check_config_names_a_role_claim_path_that_could_never_match(tmp_path: Path) -> None:
    result = _check_config(tmp_path, _with_role_claim("realm_access..roles"))
    assert result.returncode == 2
    assert "issuers[0].roles[1].claim: 'realm_access..roles' is not a claim name or dotted path" in result.stderr


@pytest.mark.parametrize(
    ("section", "key"),
    [
        (
            {"upstream": {"headers": [{"header": "X-Authenticated-Tenant", "claim": "org..tenant"}]}},
            r"upstream\.headers\[0\]\.claim",
        ),
        ({"upstream": {"consumer": {"claim": "org..sub"}}}, r"upstream\.consumer\.claim"),
    ],
    ids=["upstream-header", "kong-consumer"],
)
def test_every_claim_the_config_names_is_checked_the_same_way(section: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key}: 'org\.\.\w+' is not a claim name or dotted path"):
        parse_settings({**_with_role_claim("groups"), **section})


def test_a_tenant_claim_path_that_could_never_match_is_refused_by_key() -> None:
    template = {**TEMPLATE, "tenant_claim": "org..tid"}
    with pytest.raises(ConfigError, match=r"issuers\[0\]\.tenant_claim: 'org\.\.tid' is not a claim name"):
        parse_settings({"http": {"listen": "127.0.0.1:0"}, "issuers": [template]})


def test_a_role_rule_on_a_member_of_a_claim_users_set_is_said_at_start_up() -> None:
    """OIDC's `address` is the user's to type: a rule on `address.country` (or any member) is as editable as one on
    `preferred_username`; a path into a claim the provider assigns (`realm_access.roles`) is not warned about."""
    from verifier.settings import config_warnings

    warned = config_warnings(parse_settings(_with_role_claim("address.country")))
    (found,) = [w for w in warned if w.kind == "role_claim_editable"]
    assert "issuers[0].roles[1]" in found.message and "'address.country'" in found.message
    quiet = config_warnings(parse_settings(_with_role_claim("realm_access.roles")))
    assert not [w for w in quiet if w.kind == "role_claim_editable"]


def _with_transmitter(**transmitter: object) -> dict[str, object]:
    issuer = {"issuer": "https://idp.example.test", "audiences": ["api"], "algorithms": ["ES256"]}
    sender = {"issuer": "https://idp.example.test", "audience": "https://verifier.example.test", **transmitter}
    return {"http": {"listen": "127.0.0.1:0"}, "issuers": [issuer], "revocation": {"transmitters": [sender]}}


def test_a_push_transmitter_without_push_authorization_is_said_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push transmitter with no `push_authorization_env`: `POST /v1/ssf/events` takes a well-signed SET from
    whoever reaches it, so one captured on its way is delivered again by anyone. Not refused (a receiver reached only
    by its transmitter has no need), but start-up and `check-config` say so, naming the key; a push transmitter with
    it, and a poll one, are not warned about."""
    from verifier.settings import config_warnings

    (found,) = [w for w in config_warnings(parse_settings(_with_transmitter())) if w.kind == "push_unauthenticated"]
    assert "revocation.transmitters[0] (https://idp.example.test)" in found.message
    assert "set push_authorization_env" in found.message
    assert dict(found.fields) == {"key": "revocation.transmitters[0].push_authorization_env"}
    result = _check_config(tmp_path, _with_transmitter())
    assert result.returncode == 0, result.stderr
    assert "warning: revocation.transmitters[0] (https://idp.example.test): delivery push" in result.stderr
    monkeypatch.setenv("VERIFIER_TEST_PUSH_AUTHORIZATION", "Bearer " + "p" * 32)
    quiet = [
        *config_warnings(parse_settings(_with_transmitter(push_authorization_env="VERIFIER_TEST_PUSH_AUTHORIZATION"))),
        *config_warnings(parse_settings(_with_transmitter(delivery="poll"))),
    ]
    assert not [w for w in quiet if w.kind == "push_unauthenticated"]


def test_a_thumbprint_header_the_gateways_do_not_clear_is_said_at_start_up(tmp_path: Path) -> None:
    """`mtls_thumbprint_header` naming another header than X-Client-Cert-Thumbprint: the nginx templates pass a
    client's headers to the auth request and clear only that one, so a client could name the certificate a stolen
    bound token is checked against. Start-up and `check-config` say so, naming the key; the guarded name (any case),
    or none, is quiet."""
    from verifier.settings import config_warnings

    def found(header: str) -> list[object]:
        settings = parse_settings({**document(http="127.0.0.1:0"), "mtls_thumbprint_header": header})
        return [w for w in config_warnings(settings) if w.kind == "thumbprint_header_unguarded"]

    (warning,) = found("X-SSL-Client-SHA256")
    assert str(warning).startswith("mtls_thumbprint_header: 'x-ssl-client-sha256' is not cleared by the shipped")
    assert found("X-Client-Cert-Thumbprint") == found("") == []
    result = _check_config(tmp_path, {**document(http="127.0.0.1:8080"), "mtls_thumbprint_header": "x-cert-hash"})
    assert result.returncode == 0, result.stderr
    assert "warning: mtls_thumbprint_header: 'x-cert-hash' is not cleared" in result.stderr


def test_a_policy_method_no_client_sends_is_said_at_start_up(tmp_path: Path) -> None:
    """A typo in `match.methods` (`DELET`) leaves the policy covering none of the requests it was written for: they
    fall to the next policy (a laxer catch-all). An extension method is a legal token, so not refused, but start-up and
    `check-config` say so, naming the key; registered methods, in any case, are quiet."""
    from verifier.settings import config_warnings

    def found(*methods: str) -> list[object]:
        admin = {"name": "admin", "match": {"path_prefix": "/admin", "methods": list(methods)},
                 "require": {"roles_any": ["admin"]}}
        rest = {"name": "rest", "match": {"path_prefix": "/"}}
        settings = parse_settings({**document(http="127.0.0.1:0"), "policies": [admin, rest]})
        return [w for w in config_warnings(settings) if w.kind == "method_unregistered"]

    (warning,) = found("GET", "DELET")
    assert str(warning).startswith("policies[0].match.methods[1]: 'DELET' is no registered HTTP method")
    assert "(admin)" in str(warning)
    assert found("get", "Delete", "PATCH", "PROPFIND", "QUERY") == []
    broken = {"name": "admin", "match": {"path_prefix": "/admin", "methods": ["PSOT"]}}
    result = _check_config(tmp_path, {**document(http="127.0.0.1:8080"), "policies": [broken]})
    assert result.returncode == 0, result.stderr
    assert "warning: policies[0].match.methods[0]: 'PSOT' is no registered HTTP method" in result.stderr


def test_a_public_catch_all_policy_is_said_at_start_up(tmp_path: Path) -> None:
    """`authenticated: false` on every path: a request the protected policies above it miss (a typo in their path)
    passes without a token, where it would otherwise be refused as unmatched. Start-up and `check-config` say so,
    naming the key; a public path of its own, a catch-all requiring a token, and a CORS preflight policy are quiet."""
    from verifier.settings import ConfigWarning, config_warnings

    admin = {"name": "admin", "match": {"path_prefix": "/amdin"}, "require": {"roles_any": ["admin"]}}

    def found(*policies: dict[str, object]) -> list[ConfigWarning]:
        settings = parse_settings({**document(http="127.0.0.1:0"), "policies": [admin, *policies]})
        return [w for w in config_warnings(settings) if w.kind == "public_catch_all"]

    public = {"name": "rest", "require": {"authenticated": False}}
    (warning,) = found({**public, "match": {"path_prefix": "/"}})
    assert str(warning).startswith("policies[1] (rest): authenticated: false on every path")
    assert dict(warning.fields) == {"key": "policies[1].require.authenticated"}
    assert len(found({**public, "match": {"methods": ["GET"]}})) == 1
    assert found({**public, "match": {"path": "/health"}}) == []
    assert found({**public, "match": {"methods": ["OPTIONS"]}}) == []
    assert found({"match": {"path_prefix": "/"}}) == []
    result = _check_config(tmp_path, {**document(http="127.0.0.1:8080"),
                                      "policies": [admin, {**public, "match": {"path_prefix": "/"}}]})
    assert result.returncode == 0, result.stderr
    assert "warning: policies[1] (rest): authenticated: false on every path" in result.stderr


def test_rate_limits_by_role_without_a_default_are_said_at_start_up(tmp_path: Path) -> None:
    """`rate_limits.roles` without `default`: an identity whose token carries none of the roles is not limited at
    all, so a caller whose limited role is missing from a token (one of another client: Keycloak's client roles,
    fewer scopes where roles follow scopes) escapes the limit. Start-up and `check-config` say so; a default is
    quiet."""
    from verifier.settings import ConfigWarning, config_warnings

    def found(limits: dict[str, object]) -> list[ConfigWarning]:
        settings = parse_settings({**document(http="127.0.0.1:0"), "rate_limits": limits})
        return [w for w in config_warnings(settings) if w.kind == "rate_limit_without_default"]

    by_role = {"roles": {"trial": {"per_second": 1, "burst": 5}}}
    (warning,) = found(by_role)
    assert str(warning).startswith("rate_limits.default is not set: an identity holding none of the roles (trial)")
    assert dict(warning.fields) == {"key": "rate_limits.default"}
    assert found({**by_role, "default": {"per_second": 1, "burst": 5}}) == []
    result = _check_config(tmp_path, {**document(http="127.0.0.1:8080"), "rate_limits": by_role})
    assert result.returncode == 0, result.stderr
    assert "warning: rate_limits.default is not set" in result.stderr
