"""`verifier explain`: the decision the running service would make for one token and request, and why.

Each case runs the real CLI (`python -m verifier explain`) against the embedded development provider
and compares its answer with what a running verifier (same config, forward-auth door) answers for the
same request. The token itself must never appear in what explain prints.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from doorkit import http_exchange
from replicas import dpop_proof, public_jwk

from verifier.app import App
from verifier.binding.dpop import DpopVerifier, thumbprint
from verifier.cli import main
from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider
from verifier.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[tuple[DevIdentityProvider, Path]]:
    idp = DevIdentityProvider(port=0)
    await idp.start()
    config = {
        "http": {"listen": "127.0.0.1:0"},
        "issuers": [
            {
                "issuer": idp.issuer,
                "audiences": [DEV_AUDIENCE],
                "algorithms": ["ES256", "RS256"],
                "allow_insecure_http": True,  # the dev provider is plain http on loopback
                "roles": [{"role": "admin", "claim": "groups", "values": ["platform-admins"]}],
            }
        ],
        "policies": [
            {"name": "admin-api", "match": {"path_prefix": "/admin"}, "require": {"roles_any": ["admin"]}},
            {"name": "mcp", "match": {"path_prefix": "/mcp"}, "require": {"clients_any": ["mcp-client"]}},
            {"name": "everything-else", "match": {"path_prefix": "/"}, "require": {"scopes_any": ["read"]}},
        ],
    }
    path = tmp_path / "verifier.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        yield idp, path
    finally:
        await idp.stop()


async def _explain(config: Path, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "verifier",
        "explain",
        "--config",
        str(config),
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _service_answer(config: Path, token: str, path: str) -> dict[str, str]:
    """What a running verifier with the same config answers on its forward-auth door."""
    status, fields = await _service_head(config, token, path)
    answer = {"status": status}
    answer.update(dict(fields))
    return answer


async def _service_head(
    config: Path, token: str, path: str, authorization: str = "", extra: str = ""
) -> tuple[str, list[tuple[str, str]]]:
    """The status and header fields (names lower-cased, in order) a running verifier with the same config
    answers on its forward-auth door; `extra`: more request header lines."""
    app = App(load_settings(config))
    await app.start()
    try:
        await asyncio.wait_for(app.keys.wait_ready(), 10)
        raw = await http_exchange(
            app.ports.http or 0,
            f"GET /v1/forward-auth HTTP/1.1\r\nhost: api\r\nauthorization: {authorization or 'Bearer ' + token}\r\n"
            f"x-forwarded-uri: {path}\r\n{extra}\r\n".encode(),
        )
    finally:
        await app.stop(grace=0)
    head = raw.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    return head[0].split(" ")[1], [(k.lower(), v.strip()) for k, v in (line.split(":", 1) for line in head[1:])]


def _token(idp: DevIdentityProvider, case: str) -> tuple[str, str]:
    if case == "allowed":
        return idp.mint(sub="alice", claims={"groups": ["platform-admins"]}), "/admin/users"
    if case == "expired":
        return idp.mint(sub="alice", claims={"exp": int(time.time()) - 600, "iat": int(time.time()) - 900}), "/hello"
    if case == "wrong-audience":
        return idp.mint(sub="alice", aud="https://other.example.test"), "/hello"
    if case == "role-missing":
        return idp.mint(sub="bob"), "/admin/users"
    if case == "client-not-allowed":
        return idp.mint(sub="bob"), "/mcp"  # client_id dev-client
    if case == "sid-not-a-string":  # a session no revocation could name: refused beside `sub`, not as syntax
        return idp.mint(sub="alice", scope="read", claims={"sid": 123}), "/hello"
    if case == "azp-not-a-string":
        return idp.mint(sub="alice", scope="read", claims={"azp": 7}), "/hello"
    if case == "auth-time-not-a-number":
        return idp.mint(sub="alice", scope="read", claims={"auth_time": "yesterday"}), "/hello"
    return "eyJhbGciOiJFUzI1NiJ9.not-json.c2ln", "/hello"  # malformed


CASES: dict[str, dict[str, Any]] = {
    "allowed": {"status": 200, "reason": "ok", "failed": None},
    "expired": {"status": 401, "reason": "token_expired", "failed": "exp"},
    "wrong-audience": {"status": 403, "reason": "audience_mismatch", "failed": "aud"},
    "role-missing": {"status": 403, "reason": "role_missing", "failed": "policy"},
    "client-not-allowed": {"status": 403, "reason": "client_not_allowed", "failed": "route trust"},
    "malformed": {"status": 401, "reason": "token_malformed", "failed": "syntax"},
    "sid-not-a-string": {"status": 401, "reason": "claim_invalid", "failed": "sub"},
    "azp-not-a-string": {"status": 401, "reason": "claim_invalid", "failed": "sub"},
    "auth-time-not-a-number": {"status": 401, "reason": "claim_invalid", "failed": "nbf/iat"},
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_explain_reports_the_services_decision_and_why(
    case: str, provider: tuple[DevIdentityProvider, Path]
) -> None:
    idp, config = provider
    token, path = _token(idp, case)
    expected = CASES[case]
    code, out, err = await _explain(config, "--json", "--path", path, token)
    assert token not in out and token not in err
    report = json.loads(out)
    answer = report["answer"]
    assert (answer["status"], answer["reason"]) == (expected["status"], expected["reason"])
    assert code == (0 if expected["status"] == 200 else 1)
    results = {c["step"]: c["result"] for c in report["checks"]}
    if expected["failed"] is None:
        assert set(results.values()) == {"passed"}
        assert report["principal"]["roles"] == ["admin"] and report["route"]["policy"] == "admin-api"
    else:
        assert results[expected["failed"]] == "failed", report["checks"]
        failed_at = [c["step"] for c in report["checks"]].index(expected["failed"])
        assert all(c["result"] == "passed" for c in report["checks"][:failed_at])
        assert all(c["result"] == "not run" for c in report["checks"][failed_at + 1 :])
    if case != "malformed":
        assert report["token"]["kid"] and report["token"]["alg"] == "ES256"
        assert report["token"]["jwks_uri"] == f"{idp.issuer}/jwks"  # found by discovery, as the service does
    # The same answer as a running verifier with the same config gives the gateway.
    service = await _service_answer(config, token, path)
    assert int(service["status"]) == answer["status"]
    assert service["x-verifier-reason"] == answer["reason"]
    assert service.get("www-authenticate", "") == answer["www_authenticate"]
    max_age = f"private, max-age={answer['max_age']}" if answer["max_age"] > 0 else "no-store"
    assert service["cache-control"] == max_age


async def test_explain_says_why_a_path_read_as_two_routes_is_refused(
    provider: tuple[DevIdentityProvider, Path],
) -> None:
    idp, config = provider
    code, out, _err = await _explain(config, "--json", "--path", "/ADMIN/users", idp.mint(sub="bob"))
    report = json.loads(out)
    assert code == 1
    assert (report["answer"]["status"], report["answer"]["reason"]) == (400, "invalid_request")
    assert report["route"]["policy"] is None and "different policies" in report["route"]["summary"]


async def test_explain_without_a_host_says_what_the_doors_say_when_policies_name_hosts(
    provider: tuple[DevIdentityProvider, Path],
) -> None:
    idp, config = provider
    settings = yaml.safe_load(config.read_text())
    settings["policies"].insert(
        0, {"name": "admin-host", "match": {"hosts": ["admin.example.test"]}, "require": {"roles_any": ["admin"]}}
    )
    config.write_text(yaml.safe_dump(settings))
    token = idp.mint(sub="bob", claims={"scope": "read"})
    code, out, err = await _explain(config, "--json", "--path", "/hello", token)
    assert token not in out and token not in err
    report = json.loads(out)
    assert code == 1
    # Not judged as a request to no host (it met none of the host's policies and fell to everything-else):
    # refused before any check, as the forward-auth door refuses a check without X-Forwarded-Host.
    assert (report["answer"]["status"], report["answer"]["reason"]) == (400, "invalid_request")
    assert report["principal"] is None and report["route"]["policy"] is None
    assert report["checks"][0]["step"] == "request" and report["checks"][0]["result"] == "failed"
    assert "--host" in report["checks"][0]["detail"] and "policies name hosts" in report["checks"][0]["detail"]
    assert {c["result"] for c in report["checks"][1:]} == {"not run"}
    service = await _service_answer(config, token, "/hello")
    assert (int(service["status"]), service["x-verifier-reason"]) == (400, "invalid_request")
    assert service.get("www-authenticate", "") == report["answer"]["www_authenticate"]
    code, out, _err = await _explain(config, "--path", "/hello", token)
    assert code == 1 and "answer    400 invalid_request (refused)" in out and "pass --host" in out
    # With the host told, the host's policy judges it.
    code, out, _err = await _explain(config, "--json", "--host", "admin.example.test", "--path", "/hello", token)
    report = json.loads(out)
    assert code == 1 and report["route"]["policy"] == "admin-host"
    assert (report["answer"]["status"], report["answer"]["reason"]) == (403, "role_missing")


async def test_explain_text_names_issuer_key_checks_route_and_answer(
    provider: tuple[DevIdentityProvider, Path],
) -> None:
    idp, config = provider
    token = idp.mint(sub="bob")
    code, out, err = await _explain(config, "--path", "/admin/x", "--method", "post", token)
    assert code == 1
    assert token not in out and token not in err
    assert "Traceback" not in err
    for text in (
        "request   POST /admin/x",
        f"issuer    {idp.issuer}",
        "alg ES256",
        "route     policy 'admin-api' (path_prefix /admin) requires roles_any [admin]",
        "failed    policy",
        "answer    403 role_missing (refused)",
        'WWW-Authenticate: Bearer realm="verifier", error="insufficient_scope"',
        "reuse     no-store",
    ):
        assert text in out, (text, out)


async def test_explain_reads_the_token_from_stdin(provider: tuple[DevIdentityProvider, Path]) -> None:
    idp, config = provider
    token = idp.mint(sub="carol")
    code, out, err = await _explain(config, "--json", "--path", "/hello", "-", stdin=token.encode() + b"\n")
    assert code == 0, err
    assert token not in out and token not in err
    report = json.loads(out)
    assert report["principal"]["subject"] == "carol"
    assert report["answer"]["max_age"] == 10 and report["route"]["policy"] == "everything-else"
    assert report["token"]["fingerprint"] and len(report["token"]["fingerprint"]) == 16


async def test_explain_with_no_token_on_stdin_is_a_clear_error(provider: tuple[DevIdentityProvider, Path]) -> None:
    _, config = provider
    code, _out, err = await _explain(config, "-", stdin=b"")
    assert code == 2 and "no token given" in err and "Traceback" not in err


def _with_introspection(idp: DevIdentityProvider, config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The config's issuer answers opaque tokens by introspection at the dev provider."""
    settings = yaml.safe_load(config.read_text())
    settings["issuers"][0]["introspection"] = {
        "client_id": "verifier",
        "client_secret_env": "EXPLAIN_IDP_SECRET",
        "timeout_seconds": 10,  # a loaded test machine must not turn an answer into 503 provider_unavailable
    }
    config.write_text(yaml.safe_dump(settings))
    monkeypatch.setenv("EXPLAIN_IDP_SECRET", idp.introspection_client_secret)


@pytest.mark.parametrize("active", [True, False])
async def test_explain_an_opaque_token_reports_introspection(
    active: bool, provider: tuple[DevIdentityProvider, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    idp, config = provider
    _with_introspection(idp, config, monkeypatch)
    token = idp.mint_opaque(sub="dora")
    if not active:
        idp.revoke(token)
    # "--": an opaque token is base64url and starts with "-" one time in 64 (the README says so too)
    code, out, err = await _explain(config, "--json", "--path", "/hello", "--", token)
    assert token not in out and token not in err
    assert out, err  # nothing printed: what went wrong is on stderr
    report = json.loads(out)
    assert report["token"]["kind"] == "opaque"
    (check,) = report["checks"][:1]
    assert check["step"] == "introspection" and check["result"] == ("passed" if active else "failed")
    assert report["answer"]["status"] == (200 if active else 401) and code == (0 if active else 1)
    service = await _service_answer(config, token, "/hello")
    assert int(service["status"]) == report["answer"]["status"]


async def test_explain_takes_a_token_that_starts_with_a_dash_after_double_dash(
    provider: tuple[DevIdentityProvider, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    idp, config = provider
    _with_introspection(idp, config, monkeypatch)
    token = next(t for t in (idp.mint_opaque(sub="dora") for _ in range(10_000)) if t.startswith("-"))
    code, out, err = await _explain(config, "--json", "--path", "/hello", token)
    assert code == 2 and not out, err  # argparse read it as options ("-h...": help with an argument, ...)
    assert not any(token[i : i + 24] in err for i in range(len(token) - 23))  # the usage error never echoes it
    code, out, err = await _explain(config, "--json", "--path", "/hello", "--", token)
    assert code == 0, err
    assert token not in out and token not in err
    assert json.loads(out)["principal"]["subject"] == "dora"


async def test_explain_with_the_provider_down_says_so(provider: tuple[DevIdentityProvider, Path]) -> None:
    idp, config = provider
    settings = yaml.safe_load(config.read_text())
    settings["issuers"][0]["fetch_timeout_seconds"] = 0.5
    config.write_text(yaml.safe_dump(settings))
    token = idp.mint(sub="erin")
    await idp.stop()  # the keys cannot be fetched: the service would not be SERVING
    code, out, err = await _explain(config, "--json", "--path", "/hello", token)
    assert code == 1 and token not in out + err and "Traceback" not in err
    report = json.loads(out)
    assert report["answer"]["status"] == 503 and report["answer"]["reason"] == "provider_unavailable"
    assert {c["step"]: c["result"] for c in report["checks"]}["key"] == "failed"
    assert any("NOT_SERVING" in note for note in report["notes"])


def _with_upstream(path: Path, tmp_path: Path, **extra: Any) -> None:
    """The config at `path` plus a mapped header, a Kong consumer and a signed identity assertion."""
    key = tmp_path / "identity.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    config = yaml.safe_load(path.read_text())
    config["upstream"] = {
        "headers": [{"header": "X-Authenticated-Email", "claim": "email"}],
        "consumer": {"claim": "sub"},
        "identity_token": {
            "issuer": "https://verifier.internal",
            "private_key_file": str(key),
            "audience": "https://o",
        },
    }
    config.update(extra)
    path.write_text(yaml.safe_dump(config))


async def test_explain_shows_what_the_upstream_receives_but_never_the_assertion(
    provider: tuple[DevIdentityProvider, Path], tmp_path: Path
) -> None:
    """Mapped headers and the Kong consumer are shown; the identity assertion (a bearer credential for the
    upstream, like the token) only as its fingerprint."""
    idp, path = provider
    _with_upstream(path, tmp_path)
    code, out, err = await _explain(
        path, "--path", "/x", idp.mint(scope="read", claims={"email": "alice@example.test"})
    )
    assert code == 0, (out, err)
    assert "x-authenticated-email: alice@example.test" in out
    assert "x-kong-consumer-username:" in out and "(for the Kong plugin, not the upstream)" in out
    assert "x-authenticated-identity: <identity assertion," in out and "eyJ" not in out


ASSERTION_HEADER = "x-authenticated-identity"


@pytest.mark.parametrize("limited", [False, True], ids=["reusable", "rate-limited"])
async def test_explain_shows_the_allow_headers_the_door_sends_for_the_same_request(
    limited: bool, provider: tuple[DevIdentityProvider, Path], tmp_path: Path
) -> None:
    idp, path = provider
    _with_upstream(path, tmp_path, **({"rate_limits": {"default": {"per_second": 1, "burst": 5}}} if limited else {}))
    token = idp.mint(sub="alice", scope="read", claims={"email": "alice@example.test"})

    code, out, err = await _explain(path, "--json", "--path", "/x", token)
    status, sent = await _service_head(path, token, "/x")

    assert code == 0 and status == "200", (out, err)
    assert token not in out + err
    shown = json.loads(out)["answer"]["headers"]
    assert [h["name"] for h in shown] == [name for name, _ in sent]
    for h, (name, value) in zip(shown, sent, strict=True):
        if name == ASSERTION_HEADER:  # minted anew by each: shown only as a fingerprint, never itself
            assert h["value"].startswith("<identity assertion, ") and value.count(".") == 2 and value not in out
        else:
            assert h["value"] == value, name
    whose = {h["name"]: h["for"] for h in shown}
    assert {whose[n] for n in ("x-authenticated-userid", "x-authenticated-email", ASSERTION_HEADER)} == {"upstream"}
    assert whose["x-kong-consumer-username"] == "kong"
    assert whose["cache-control"] == whose["x-verifier-reason"] == "gateway"
    headers = dict(sent)
    if limited:  # a per-request check: this answer alone (no-store), the budget for the client
        assert whose["ratelimit"] == whose["ratelimit-policy"] == "client"
        assert headers["ratelimit"].startswith('"default";r=4;') and headers["cache-control"] == "no-store"
    else:
        assert "ratelimit" not in whose and headers["cache-control"].startswith("private, max-age=")


async def test_explain_text_lists_the_allow_headers_and_whom_they_are_for(
    provider: tuple[DevIdentityProvider, Path], tmp_path: Path
) -> None:
    idp, path = provider
    _with_upstream(path, tmp_path, rate_limits={"default": {"per_second": 1, "burst": 5}})
    token = idp.mint(sub="alice", scope="read", claims={"email": "alice@example.test"})

    code, out, err = await _explain(path, "--path", "/x", token)

    assert code == 0, (out, err)
    assert token not in out + err and "eyJ" not in out
    for text in (
        "headers   of the answer, to the upstream unless said",
        "          x-authenticated-userid: alice\n",
        "          x-authenticated-identity: <identity assertion, ",
        "          x-kong-consumer-username: alice (for the Kong plugin, not the upstream)",
        '          ratelimit-policy: "default";q=5;w=5 (for the client\'s answer)',
        "          x-verifier-reason: ok (for the gateway)",
        "          cache-control: no-store (for the gateway)",
    ):
        assert text in out, (text, out)


NONCE_LIFETIME_S = 300.0


class _Past:
    """A clock `ago` seconds behind this one: a nonce issued on it is that old."""

    def __init__(self, ago: float) -> None:
        self.ago = ago

    def now(self) -> float:
        return time.time() - self.ago


async def test_explain_shows_the_next_dpop_nonce_an_allow_hands_the_client(
    provider: tuple[DevIdentityProvider, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    idp, path = provider
    config = yaml.safe_load(path.read_text())
    config["dpop"] = {
        "require_nonce": True,
        "nonce_secret_env": "EXPLAIN_NONCE_KEY",
        "nonce_lifetime_seconds": NONCE_LIFETIME_S,
    }
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("EXPLAIN_NONCE_KEY", "k" * 32)  # the same key on every replica (and for explain)
    key = ec.generate_private_key(ec.SECP256R1())
    token = idp.mint(sub="alice", scope="read", claims={"cnf": {"jkt": thumbprint(public_jwk(key))}})
    url = "http://api/x"
    dpop = load_settings(path).dpop
    assert dpop is not None
    # a nonce the service issued three quarters of its lifetime ago: still good, and an allow renews it
    nonce = DpopVerifier(dpop, None, _Past(0.75 * NONCE_LIFETIME_S)).issue_nonce()  # type: ignore[arg-type]

    def proof(nonce: str = "") -> str:
        return dpop_proof(key, "GET", url, token, nonce=nonce)

    sent_proof = proof(nonce)
    code, out, err = await _explain(
        path, "--json", "--host", "api", "--path", "/x", "--dpop", sent_proof, f"DPoP {token}"
    )
    status, sent = await _service_head(path, token, "/x", f"DPoP {token}", f"dpop: {proof(nonce)}\r\n")

    assert code == 0 and status == "200", (out, err, sent)
    assert token not in out + err and sent_proof not in out + err
    shown = json.loads(out)["answer"]["headers"]
    assert [h["name"] for h in shown] == [name for name, _ in sent]
    whose = {h["name"]: h["for"] for h in shown}
    assert whose["dpop-nonce"] == "client" and whose["x-authenticated-userid"] == "upstream"
    renewed = {h["name"]: h["value"] for h in shown}["dpop-nonce"]
    assert renewed not in ("", nonce) and dict(sent)["dpop-nonce"] not in ("", nonce)
    for h, (name, value) in zip(shown, sent, strict=True):
        if name != "dpop-nonce":  # minted when each answered
            assert h["value"] == value, name


TOKEN_LIKE = "ZdJyocS1UZG2q_FIXCOX9aTtFjLPz7GXBdIecKPY"


@pytest.mark.parametrize(
    "tail",
    [
        ["-h" + TOKEN_LIKE],  # "-h" with an argument: "ignored explicit argument '...'"
        ["-", "-x" + TOKEN_LIKE],  # "unrecognized arguments: ..."
        ["-", "--json=" + TOKEN_LIKE],  # "ignored explicit argument '...'"
    ],
)
def test_a_usage_error_never_echoes_a_token_read_as_options(
    tail: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse quotes what it could not use; a token given without `--` is never printed back."""
    with pytest.raises(SystemExit) as exited:
        main(["explain", "--config", "verifier.yaml", *tail])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert "error:" in err and "[redacted]" in err and not out, err
    assert TOKEN_LIKE not in err and TOKEN_LIKE[:24] not in err


def _volatile(text: str) -> str:
    """The parts of explain's text that differ from run to run: the provider's URL, key ids, fingerprint, size."""
    text = re.sub(r"http://127\.0\.0\.1:\d+", "<issuer>", text)
    text = re.sub(r"dev-(es256|rs256|eddsa)-[0-9a-f]+", r"dev-\1-<id>", text)
    return re.sub(r"fingerprint [0-9a-f]{16}, \d+ bytes", "fingerprint <fp>, <n> bytes", text)


async def test_the_readmes_explain_sample_is_what_explain_prints(provider: tuple[DevIdentityProvider, Path]) -> None:
    """README's `verifier explain` sample (bob, a read/write token, on the admin route): each line it shows, in its
    order, is a line explain prints for that request (`...` stands for lines left out)."""
    found = re.search(r"```text\n\$ verifier explain [^\n]*--path (\S+) [^\n]*\n(.*?)```", README.read_text(), re.S)
    assert found is not None, "README.md lost its `verifier explain` sample"
    idp, config = provider
    code, out, _ = await _explain(config, "--path", found.group(1), "--", idp.mint(sub="bob", scope="read write"))
    assert code == 1
    printed = [line.rstrip() for line in _volatile(out).splitlines()]
    at = 0
    for line in _volatile(found.group(2)).splitlines():
        if line.strip() == "...":
            continue
        assert line.rstrip() in printed[at:], (line, printed)
        at = printed.index(line.rstrip(), at) + 1


def test_a_tenant_claim_that_names_another_tenant_fails_the_issuer_step() -> None:
    """An issuer's `tenant_claim` (Entra's `tid`) vouches for the tenant `iss` names: jwt.py checks it with the
    issuer, so explain files its refusal there, not under syntax; another claim of that name elsewhere does not."""
    from verifier.errors import ClaimInvalid
    from verifier.explain import _token_checks

    error = ClaimInvalid("tid does not name the tenant of iss", claim="tid")
    checks = {c.step: c.result for c in _token_checks(error, {}, tenant_claim="tid")}
    assert checks["issuer"] == "failed" and checks["syntax"] == "passed" and checks["aud"] == "not run"
    assert {c.step: c.result for c in _token_checks(error, {})}["syntax"] == "failed"  # no tenant claim configured
