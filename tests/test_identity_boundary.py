"""Identity boundaries through the running verifier (issue #18, findings 5-7 and the design risks).

Each test starts the real `App` with its HTTP door, a development issuer and (where events matter) a
real SSF transmitter pushing signed SETs to `/v1/ssf/events`, and then acts as the attacker would:

- a CAEP token-claims-change that takes away a scope or an admin group takes effect on the next
  request, cached or not (finding 5);
- a transmitter cannot grant with a claims announcement: a scope, a group or a `roles` claim it adds, an
  `acr` it raises, neither passes a route nor reaches the upstream, unless it is configured as the
  provider itself (`claims_change: replace`);
- a CAEP credential-change for a FIDO2 credential disables the user's WebAuthn keys (finding 6);
- the WebAuthn endpoints apply the forward-auth checks: certificate binding, the provider's word on
  a JWT (`introspect_jwts`), revocation, DPoP (finding 7);
- a client-credentials token named like a user is not that user; a transmitter speaks only for the
  issuers it is scoped to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from doorkit import door_settings, free_port, http_exchange
from ssf_transmitter import (
    ACCOUNT_DISABLED,
    ASSURANCE_LEVEL_CHANGE,
    CREDENTIAL_CHANGE,
    SESSION_REVOKED,
    TOKEN_CLAIMS_CHANGE,
    SsfTransmitter,
)
from webauthnkit import ORIGIN, RP_ID, SoftAuthenticator, encode_header

from verifier.app import App
from verifier.config.introspection import IntrospectionConfig
from verifier.config.upstream import parse_upstream_config
from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider
from verifier.revocation import parse_revocation_config
from verifier.settings import (
    ConfigError,
    IssuerSettings,
    Listen,
    PolicySettings,
    RateLimit,
    RateLimitSettings,
    Requirements,
    RoleRule,
    RouteMatch,
    Settings,
)
from verifier.webauthn import WebAuthnConfig

RECEIVER = "https://verifier.example.test"
INTROSPECTION_SECRET = "introspection-secret-for-tests"
ROLES = (
    RoleRule(role="admin", claim="groups", values=("platform-admins",)),
    RoleRule(role="ops", subjects=("alice",)),
)
POLICIES = (
    PolicySettings(name="write", match=RouteMatch(path_prefix="/write"), require=Requirements(scopes_all=("write",))),
    PolicySettings(name="admin", match=RouteMatch(path_prefix="/admin"), require=Requirements(roles_any=("admin",))),
    PolicySettings(name="ops", match=RouteMatch(path_prefix="/ops"), require=Requirements(roles_any=("ops",))),
    PolicySettings(name="rest", match=RouteMatch(path_prefix="/"), require=Requirements()),
)
PROTECTED = "/v1/webauthn/demo/protected/transfer"


def _issuer(idp: DevIdentityProvider, **options: Any) -> IssuerSettings:
    return IssuerSettings(issuer=idp.issuer, audiences=(DEV_AUDIENCE,), algorithms=("ES256",), roles=ROLES, **options)


def _transmitter(tx: SsfTransmitter, subjects_of: Sequence[str], **options: Any) -> dict[str, Any]:
    return {"issuer": tx.issuer, "audience": RECEIVER, "delivery": "push", "subjects_of": list(subjects_of),
            "allow_insecure_http": True, **options}


@contextlib.asynccontextmanager
async def _providers(count: int = 1) -> AsyncIterator[list[DevIdentityProvider]]:
    idps = [
        DevIdentityProvider(port=free_port(), introspection_client_secret=INTROSPECTION_SECRET)
        for _ in range(count)
    ]
    for idp in idps:
        await idp.start()
    try:
        yield idps
    finally:
        for idp in idps:
            await idp.stop()


@contextlib.asynccontextmanager
async def _verifier(
    issuers: Sequence[IssuerSettings],
    transmitters: Sequence[dict[str, Any]] = (),
    **options: Any,
) -> AsyncIterator[App]:
    settings = Settings(
        grpc=None,
        http=Listen(host="127.0.0.1", port=0),
        metrics=None,
        issuers=tuple(issuers),
        revocation=parse_revocation_config({"transmitters": list(transmitters)}) if transmitters else None,
        **{"forward_auth": door_settings(), **options},  # shedding only past 5 s: a starved process is no overload
    )
    app = App(settings)
    await app.start()
    try:
        await asyncio.wait_for(app.wait_serving(), 10)
        yield app
    finally:
        await app.stop(grace=0.2)


@contextlib.asynccontextmanager
async def _ssf() -> AsyncIterator[SsfTransmitter]:
    """A transmitter serving its metadata and keys on a loopback port."""
    with SsfTransmitter(audience=RECEIVER) as tx:
        yield tx


def _webauthn(tmp_path: Path) -> WebAuthnConfig:
    return WebAuthnConfig(
        rp_id=RP_ID, origins=(ORIGIN,), secret=os.urandom(32), sqlite_path=str(tmp_path / "w.sqlite3"), demo=True
    )


async def _call(
    app: App,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    scheme: str = "Bearer",
) -> tuple[int, dict[str, str], Any]:
    """One request to the HTTP door: (status, headers, JSON body or raw bytes)."""
    raw = json.dumps(body).encode() if body is not None else b""
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost:9555", f"Content-Length: {len(raw)}"]
    if body is not None:
        lines.append("Content-Type: application/json")
    if token is not None:
        lines.append(f"Authorization: {scheme} {token}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    assert app.ports.http is not None
    answer = await http_exchange(app.ports.http, ("\r\n".join(lines) + "\r\n\r\n").encode() + raw)
    head, _, payload = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    parsed = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    document = json.loads(payload) if payload[:1] in (b"{", b"[") else payload
    return int(status_line.split()[1]), parsed, document


async def _forward(app: App, token: str, path: str = "/", **headers: str) -> tuple[int, dict[str, str]]:
    """A forward-auth check of `GET path` on the upstream."""
    status, answer, _ = await _call(
        app, "GET", "/v1/forward-auth", token=token, headers={"X-Forwarded-Uri": path, **headers}
    )
    return status, answer


async def _push(app: App, tx: SsfTransmitter, events: Mapping[str, Any], sub_id: Mapping[str, Any]) -> int:
    token = tx.sign_set({k: dict(v) for k, v in events.items()}, sub_id=sub_id)
    status, _ = await asyncio.to_thread(tx.push, f"http://127.0.0.1:{app.ports.http}/v1/ssf/events", token)
    return status


def _user(idp: DevIdentityProvider, sub: str) -> dict[str, str]:
    return {"format": "iss_sub", "iss": idp.issuer, "sub": sub}


async def _register(app: App, token: str, authenticator: SoftAuthenticator) -> int:
    status, _, begun = await _call(app, "POST", "/v1/webauthn/register/begin", token=token, body={})
    if status != 200:
        return status
    credential = authenticator.create(begun["publicKey"])
    status, _, _ = await _call(
        app, "POST", "/v1/webauthn/register/complete", token=token,
        body={"state": begun["state"], "credential": credential},
    )
    return status


async def _step_up(app: App, token: str, authenticator: SoftAuthenticator, path: str = PROTECTED) -> tuple[int, str]:
    """The step-up dance on a protected path: (final status, its reason)."""
    status, headers, first = await _call(app, "POST", path, token=token)
    if status != 401 or "publicKey" not in first:
        return status, headers.get("x-verifier-reason", "")
    proof = encode_header(authenticator.get(first["publicKey"]["challenge"]))
    status, headers, _ = await _call(app, "POST", path, token=token, headers={"X-WebAuthn-Assertion": proof})
    return status, headers.get("x-verifier-reason", "")


# -- finding 5: token-claims-change recomputes scopes and roles ------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"rate_limits": RateLimitSettings(default=RateLimit(per_second=1000, burst=1000))}],
    ids=["cached-path", "asynchronous-path"],  # a rate limit sends every request down `decide_after_miss`
)
async def test_token_claims_change_taking_a_scope_or_group_away_refuses_the_next_request(
    options: dict[str, Any],
) -> None:
    async with _providers() as (idp,), _ssf() as tx:
        async with _verifier([_issuer(idp)], [_transmitter(tx, [idp.issuer])], policies=POLICIES, **options) as app:
            alice = idp.mint(sub="alice", scope="read write", claims={"groups": ["platform-admins"]})
            bob = idp.mint(sub="bob", scope="read write", claims={"groups": ["platform-admins"]})
            for token in (alice, bob):
                for path in ("/write/x", "/admin/x", "/write/x"):  # the second /write is a cache hit
                    assert (await _forward(app, token, path))[0] == 200
            changed = {"claims": {"scope": "read"}, "event_timestamp": int(time.time())}
            assert await _push(app, tx, {TOKEN_CLAIMS_CHANGE: changed}, _user(idp, "alice")) == 202
            status, headers = await _forward(app, alice, "/write/x")
            assert (status, headers["x-verifier-reason"]) == (403, "scope_missing")
            status, headers = await _forward(app, alice, "/read")
            assert status == 200 and headers["x-authenticated-scope"] == "read"  # the upstream sees it too
            assert (await _forward(app, alice, "/admin/x"))[0] == 200  # the group still stands

            demoted = {"claims": {"groups": ["staff"]}, "event_timestamp": int(time.time())}
            assert await _push(app, tx, {TOKEN_CLAIMS_CHANGE: demoted}, _user(idp, "alice")) == 202
            status, headers = await _forward(app, alice, "/admin/x")
            assert (status, headers["x-verifier-reason"]) == (403, "role_missing")
            assert (await _forward(app, alice, "/read"))[1]["x-authenticated-roles"] == "ops"  # admin is gone

            unrelated = {"claims": {"department": "finance"}, "event_timestamp": int(time.time())}
            assert await _push(app, tx, {TOKEN_CLAIMS_CHANGE: unrelated}, _user(idp, "bob")) == 202
            for path in ("/write/x", "/admin/x"):
                assert (await _forward(app, bob, path))[0] == 200


async def test_an_announced_scope_replaces_the_token_s_whichever_claim_either_uses() -> None:
    async with _providers() as (idp,), _ssf() as tx:
        async with _verifier([_issuer(idp)], [_transmitter(tx, [idp.issuer])], policies=POLICIES) as app:
            scp_token = idp.mint(sub="carol", claims={"scope": None, "scp": ["read", "write"]})
            scope_token = idp.mint(sub="dave", scope="read write")
            for token in (scp_token, scope_token):
                assert (await _forward(app, token, "/write/x"))[0] == 200
            now = int(time.time())
            as_scope = {"claims": {"scope": "read"}, "event_timestamp": now}
            as_scp = {"claims": {"scp": ["read"]}, "event_timestamp": now}
            assert await _push(app, tx, {TOKEN_CLAIMS_CHANGE: as_scope}, _user(idp, "carol")) == 202
            assert await _push(app, tx, {TOKEN_CLAIMS_CHANGE: as_scp}, _user(idp, "dave")) == 202
            for token in (scp_token, scope_token):
                status, headers = await _forward(app, token, "/write/x")
                assert (status, headers["x-verifier-reason"]) == (403, "scope_missing")
                assert (await _forward(app, token, "/read"))[1]["x-authenticated-scope"] == "read"


# -- a claims announcement takes away, never grants (unless the transmitter is the provider) ----------------

HIGH, LOW = "urn:acr:high", "urn:acr:low"
GRANTS = (
    PolicySettings(name="strong", match=RouteMatch(path_prefix="/strong"), require=Requirements(acr_any=(HIGH,))),
    *POLICIES,
)
ASSERTION_ISSUER = "https://verifier.internal"


def _upstream(tmp_path: Path) -> Any:
    """Mapped claim headers and a signed identity assertion (its key in `tmp_path`)."""
    key = tmp_path / "identity.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return parse_upstream_config(
        {
            "headers": [
                {"header": "X-Authenticated-Groups", "claim": "groups"},
                {"header": "X-Authenticated-Acr", "claim": "acr"},
                {"header": "X-Authenticated-Scope-Claim", "claim": "scope"},
            ],
            "identity_token": {
                "issuer": ASSERTION_ISSUER, "algorithm": "ES256", "private_key_file": str(key),
                "audience": "https://orders.internal", "lifetime_seconds": 60,
                "claims": ["sub", "scope", "roles", "groups", "acr"],
            },
        }
    )


def _asserted(headers: Mapping[str, str]) -> dict[str, Any]:
    """The identity assertion the upstream received (its signature is the upstream tests' business)."""
    claims: dict[str, Any] = jwt.decode(headers["x-authenticated-identity"], options={"verify_signature": False})
    return claims


def _claims_change(claims: Mapping[str, Any], ago: int = 0) -> dict[str, Any]:
    """A token-claims-change `ago` seconds back (events of one second are ordered by id: tests space them)."""
    return {TOKEN_CLAIMS_CHANGE: {"claims": dict(claims), "event_timestamp": int(time.time()) - ago}}


def _assurance(level: str, ago: int = 0) -> dict[str, Any]:
    event = {"namespace": "RFC8176", "current_level": level, "event_timestamp": int(time.time()) - ago}
    return {ASSURANCE_LEVEL_CHANGE: event}


@pytest.mark.parametrize(
    "options",
    [{}, {"rate_limits": RateLimitSettings(default=RateLimit(per_second=1000, burst=1000))}],
    ids=["cached-path", "asynchronous-path"],
)
async def test_a_transmitter_cannot_add_the_scope_group_or_role_a_route_requires(options: dict[str, Any]) -> None:
    """A compromised (or merely misconfigured) risk engine announces `write`, the admin group and an `admin` role
    for a user whose token has none of them: the routes that require them still refuse her."""
    async with _providers() as (idp,), _ssf() as tx:
        async with _verifier([_issuer(idp)], [_transmitter(tx, [idp.issuer])], policies=POLICIES, **options) as app:
            mallory = idp.mint(sub="mallory", scope="read", claims={"groups": ["staff"]})
            for path, reason in (("/write/x", "scope_missing"), ("/admin/x", "role_missing")):
                status, headers = await _forward(app, mallory, path)
                assert (status, headers["x-verifier-reason"]) == (403, reason)
            raised = {"scope": "read write", "groups": ["staff", "platform-admins"], "roles": ["admin"]}
            assert await _push(app, tx, _claims_change(raised), _user(idp, "mallory")) == 202
            for path, reason in (("/write/x", "scope_missing"), ("/admin/x", "role_missing")):
                status, headers = await _forward(app, mallory, path)
                assert (status, headers["x-verifier-reason"]) == (403, reason), path
            status, headers = await _forward(app, mallory, "/read")
            assert status == 200
            assert headers["x-authenticated-scope"] == "read"
            assert headers.get("x-authenticated-roles", "") == ""  # neither `admin` nor the group's role

            as_scp = {"scp": ["read", "write"]}  # the other spelling of the scope claim grants nothing either
            assert await _push(app, tx, _claims_change(as_scp), _user(idp, "mallory")) == 202
            status, headers = await _forward(app, mallory, "/write/x")
            assert (status, headers["x-verifier-reason"]) == (403, "scope_missing")


async def test_a_transmitter_cannot_add_a_realm_role_inside_a_nested_claim() -> None:
    """With rules on nested paths, a token-claims-change that rewrites an object claim could raise a role hidden
    inside it: `realm_access: {roles: [user, admin]}` announced for a token holding `{roles: [user]}` must not
    grant admin; one taking admin away from a token that has it does take it away."""
    rules = (RoleRule(role="admin", claim="realm_access.roles", values=("admin",)),)
    async with _providers() as (idp,), _ssf() as tx:
        issuer = IssuerSettings(issuer=idp.issuer, audiences=(DEV_AUDIENCE,), algorithms=("ES256",), roles=rules)
        async with _verifier([issuer], [_transmitter(tx, [idp.issuer])], policies=POLICIES) as app:
            mallory = idp.mint(sub="mallory", claims={"realm_access": {"roles": ["user"]}})
            raised = {"realm_access": {"roles": ["user", "admin"]}}
            assert await _push(app, tx, _claims_change(raised), _user(idp, "mallory")) == 202
            status, headers = await _forward(app, mallory, "/admin/x")
            assert (status, headers["x-verifier-reason"]) == (403, "role_missing")
            alice = idp.mint(sub="alice", claims={"realm_access": {"roles": ["user", "admin"]}})
            assert (await _forward(app, alice, "/admin/x"))[0] == 200
            lowered = {"realm_access": {"roles": ["user"]}}
            assert await _push(app, tx, _claims_change(lowered), _user(idp, "alice")) == 202
            status, headers = await _forward(app, alice, "/admin/x")
            assert (status, headers["x-verifier-reason"]) == (403, "role_missing")


async def test_an_assurance_level_change_cannot_raise_acr_to_what_a_step_up_route_requires() -> None:
    async with _providers() as (idp,), _ssf() as tx:
        async with _verifier([_issuer(idp)], [_transmitter(tx, [idp.issuer])], policies=GRANTS) as app:
            weak = idp.mint(sub="mallory", claims={"acr": LOW})
            status, headers = await _forward(app, weak, "/strong/x")
            assert (status, headers["x-verifier-reason"]) == (401, "insufficient_user_authentication")
            assert await _push(app, tx, _assurance(HIGH), _user(idp, "mallory")) == 202
            status, headers = await _forward(app, weak, "/strong/x")
            assert (status, headers["x-verifier-reason"]) == (401, "insufficient_user_authentication")
            assert "acr_values" in headers["www-authenticate"]  # challenged to step up at the provider

            without = idp.mint(sub="eve")  # no `acr` at all: an announced one is not taken either
            assert await _push(app, tx, _claims_change({"acr": HIGH}), _user(idp, "eve")) == 202
            status, headers = await _forward(app, without, "/strong/x")
            assert (status, headers["x-verifier-reason"]) == (401, "insufficient_user_authentication")


async def test_the_upstream_never_receives_what_an_announcement_added(tmp_path: Path) -> None:
    """The route lets the request through (it requires nothing), but the headers and the signed identity
    assertion carry only what the token itself holds: the intersection of lists and scopes, no raised `acr`."""
    async with _providers() as (idp,), _ssf() as tx:
        async with _verifier(
            [_issuer(idp)], [_transmitter(tx, [idp.issuer])], policies=GRANTS, upstream=_upstream(tmp_path)
        ) as app:
            token = idp.mint(sub="mallory", scope="read write", claims={"groups": ["staff", "eng"], "acr": LOW})
            raised = {"scope": "read admin", "groups": ["eng", "platform-admins"], "acr": HIGH, "roles": ["admin"]}
            assert await _push(app, tx, _claims_change(raised), _user(idp, "mallory")) == 202
            status, headers = await _forward(app, token, "/read")
            assert status == 200
            assert headers["x-authenticated-scope"] == "read"  # `admin` added, `write` taken away
            assert headers["x-authenticated-scope-claim"] == "read"
            assert headers["x-authenticated-groups"] == "eng"
            assert "x-authenticated-acr" not in headers  # moved by the announcement: neither value is vouched for
            assert headers.get("x-authenticated-roles", "") == ""
            asserted = _asserted(headers)
            assert asserted["scope"] == "read" and asserted["groups"] == ["eng"]
            assert "acr" not in asserted and "roles" not in asserted


async def test_an_announcement_still_takes_access_away_scope_and_assurance() -> None:
    async with _providers() as (idp,), _ssf() as tx:
        async with _verifier([_issuer(idp)], [_transmitter(tx, [idp.issuer])], policies=GRANTS) as app:
            strong = idp.mint(sub="alice", scope="read write", claims={"acr": HIGH, "iat": int(time.time()) - 30})
            for path in ("/write/x", "/strong/x"):
                assert (await _forward(app, strong, path))[0] == 200
            assert await _push(app, tx, _claims_change({"scope": "read"}, ago=20), _user(idp, "alice")) == 202
            status, headers = await _forward(app, strong, "/write/x")
            assert (status, headers["x-verifier-reason"]) == (403, "scope_missing")
            assert await _push(app, tx, _assurance(LOW, ago=20), _user(idp, "alice")) == 202
            status, headers = await _forward(app, strong, "/strong/x")
            assert (status, headers["x-verifier-reason"]) == (401, "insufficient_user_authentication")
            # The transmitter gives back what it took: the token's own scope stands again (never more).
            restored = {"scope": "read write admin"}
            assert await _push(app, tx, _claims_change(restored, ago=10), _user(idp, "alice")) == 202
            status, headers = await _forward(app, strong, "/write/x")
            assert status == 200 and headers["x-authenticated-scope"] == "read write"


async def test_a_transmitter_configured_as_the_provider_may_raise(tmp_path: Path) -> None:
    """`claims_change: replace`: the spec's semantics, for a transmitter that is the tokens' own provider."""
    async with _providers() as (idp,), _ssf() as tx:
        transmitter = _transmitter(tx, [idp.issuer], claims_change="replace")
        async with _verifier([_issuer(idp)], [transmitter], policies=GRANTS, upstream=_upstream(tmp_path)) as app:
            token = idp.mint(sub="bob", scope="read", claims={"groups": ["staff"], "acr": LOW})
            for path in ("/write/x", "/admin/x", "/strong/x"):
                assert (await _forward(app, token, path))[0] in (401, 403)
            raised = {"scope": "read write", "groups": ["staff", "platform-admins"]}
            assert await _push(app, tx, _claims_change(raised), _user(idp, "bob")) == 202
            assert await _push(app, tx, _assurance(HIGH), _user(idp, "bob")) == 202
            for path in ("/write/x", "/admin/x", "/strong/x"):
                assert (await _forward(app, token, path))[0] == 200, path
            status, headers = await _forward(app, token, "/read")
            assert status == 200 and headers["x-authenticated-scope"] == "read write"
            assert headers["x-authenticated-acr"] == HIGH
            assert _asserted(headers)["groups"] == ["staff", "platform-admins"]


# -- finding 6: credential-change disables WebAuthn keys --------------------------------------------------


async def test_credential_change_for_a_fido2_key_disables_it_in_the_running_service(tmp_path: Path) -> None:
    async with _providers() as (idp,), _ssf() as tx:
        webauthn = _webauthn(tmp_path)
        async with _verifier([_issuer(idp)], [_transmitter(tx, [idp.issuer])], webauthn=webauthn) as app:
            now = int(time.time())
            key, bobs_key = SoftAuthenticator(), SoftAuthenticator()
            alice = idp.mint(sub="alice", claims={"auth_time": now - 60})
            bob = idp.mint(sub="bob", claims={"auth_time": now - 60})
            assert await _register(app, alice, key) == 201
            assert await _register(app, bob, bobs_key) == 201
            assert await _step_up(app, alice, key) == (200, "")

            password = {"change_type": "revoke", "credential_type": "password", "event_timestamp": now - 30}
            assert await _push(app, tx, {CREDENTIAL_CHANGE: password}, _user(idp, "alice")) == 202
            fresh = idp.mint(sub="alice", claims={"auth_time": now})  # signed in again after the event
            assert await _step_up(app, fresh, key) == (200, "")  # a password change leaves keys alone

            revoked = {"change_type": "revoke", "credential_type": "fido2-roaming", "event_timestamp": now - 30}
            assert await _push(app, tx, {CREDENTIAL_CHANGE: revoked}, _user(idp, "alice")) == 202
            assert (await _call(app, "POST", PROTECTED, token=alice))[1]["x-verifier-reason"] == "credential_revoked"
            assert await _step_up(app, fresh, key) == (401, "webauthn_credential_disabled")
            status, _, listed = await _call(app, "GET", "/v1/webauthn/credentials", token=fresh)
            assert status == 200 and [c["disabled"] for c in listed["credentials"]] == [True]
            assert await _step_up(app, bob, bobs_key) == (200, "")  # someone else's keys stay


async def test_credential_change_delete_naming_an_aaguid_disables_only_that_authenticator(tmp_path: Path) -> None:
    async with _providers() as (idp,), _ssf() as tx:
        async with _verifier([_issuer(idp)], [_transmitter(tx, [idp.issuer])], webauthn=_webauthn(tmp_path)) as app:
            now = int(time.time())
            token = idp.mint(sub="alice", claims={"auth_time": now})
            lost, kept = SoftAuthenticator(), SoftAuthenticator()
            assert await _register(app, token, lost) == 201
            status, _, challenged = await _call(app, "POST", "/v1/webauthn/register/begin", token=token, body={})
            assert status == 401  # the second key needs a step-up with the first
            proof = encode_header(lost.get(challenged["publicKey"]["challenge"]))
            _, _, begun = await _call(
                app, "POST", "/v1/webauthn/register/begin", token=token, body={},
                headers={"X-WebAuthn-Assertion": proof},
            )
            credential = kept.create(begun["publicKey"])
            status, _, _ = await _call(
                app, "POST", "/v1/webauthn/register/complete", token=token,
                body={"state": begun["state"], "credential": credential},
            )
            assert status == 201
            aaguid = lost.aaguid.hex()
            guid = f"{aaguid[:8]}-{aaguid[8:12]}-{aaguid[12:16]}-{aaguid[16:20]}-{aaguid[20:]}"
            event = {"change_type": "delete", "credential_type": "fido2-platform", "fido2_aaguid": guid,
                     "event_timestamp": now - 30}
            assert await _push(app, tx, {CREDENTIAL_CHANGE: event}, _user(idp, "alice")) == 202
            assert await _step_up(app, token, lost) == (401, "webauthn_credential_disabled")
            assert await _step_up(app, token, kept) == (200, "")


async def _begin(app: App, token: str) -> tuple[int, dict[str, str], Any]:
    return await _call(app, "POST", "/v1/webauthn/register/begin", token=token, body={})


def _rfc9470(headers: Mapping[str, str], body: Any) -> None:
    """The step-up challenge of RFC 9470 section 3: log in again (max_age=0) before enrolling."""
    challenge = headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and 'error="insufficient_user_authentication"' in challenge, challenge
    assert "max_age=0" in challenge and body["max_age"] == 0, (challenge, body)
    assert headers["x-verifier-reason"] == "insufficient_user_authentication"


async def test_a_token_authenticated_before_the_disable_cannot_enroll_the_thiefs_key(tmp_path: Path) -> None:
    """The provider reports alice's key compromised as of `event_timestamp`; the thief, who used it to log in after
    that (before the event reached us), holds a token the event's revocation entry does not reach. Once the key is
    disabled that token enrolled the thief's own key with no assertion; it is now told to log in again."""
    async with _providers() as (idp,), _ssf() as tx:
        async with _verifier([_issuer(idp, leeway_seconds=0)], [_transmitter(tx, [idp.issuer])],
                             webauthn=_webauthn(tmp_path)) as app:
            now = int(time.time())
            key = SoftAuthenticator()
            assert await _register(app, idp.mint(sub="alice", claims={"auth_time": now - 200}), key) == 201
            thiefs = idp.mint(sub="alice", claims={"auth_time": now - 60})
            revoked = {"change_type": "revoke", "credential_type": "fido2-roaming", "event_timestamp": now - 120}
            assert await _push(app, tx, {CREDENTIAL_CHANGE: revoked}, _user(idp, "alice")) == 202
            assert await _step_up(app, thiefs, key) == (401, "webauthn_credential_disabled")
            status, headers, body = await _begin(app, thiefs)
            assert status == 401, body
            _rfc9470(headers, body)
            assert await _register(app, thiefs, SoftAuthenticator()) == 401
            status, headers, body = await _call(app, "DELETE", f"/v1/webauthn/credentials/{key.id}", token=thiefs)
            assert status == 401
            _rfc9470(headers, body)

            await asyncio.sleep(1.1)  # alice logs in again, after the disable
            fresh = idp.mint(sub="alice", claims={"auth_time": int(time.time())})
            new = SoftAuthenticator()
            assert await _register(app, fresh, new) == 201
            assert await _step_up(app, fresh, new) == (200, "")
            status, headers, _ = await _begin(app, thiefs)  # a usable key again: an assertion from it decides
            assert status == 401 and headers["x-verifier-reason"] == "webauthn_assertion_required"
            # someone who never enrolled still enrolls with a token alone
            assert await _register(app, idp.mint(sub="bob"), SoftAuthenticator()) == 201


async def test_a_replica_the_credential_change_did_not_reach_refuses_the_stolen_token_too(tmp_path: Path) -> None:
    """Two replicas share the credential store (each keeps its own revocation entries: no `state` section). The SSF
    push reaches one: it disables the key in the shared store and refuses the stolen token (an entry); the other
    has no entry, and let the stolen token enroll the thief's key. The disable time in the store now stops it."""
    async with _providers() as (idp,), _ssf() as tx:
        webauthn = _webauthn(tmp_path)
        settings = {"webauthn": webauthn}
        async with (
            _verifier([_issuer(idp, leeway_seconds=0)], [_transmitter(tx, [idp.issuer])], **settings) as a,
            _verifier([_issuer(idp, leeway_seconds=0)], [_transmitter(tx, [idp.issuer])], **settings) as b,
        ):
            now = int(time.time())
            stolen = idp.mint(sub="alice", claims={"auth_time": now - 60})
            key = SoftAuthenticator()
            assert await _register(a, stolen, key) == 201
            revoked = {"change_type": "revoke", "credential_type": "fido2-roaming", "event_timestamp": now - 30}
            assert await _push(a, tx, {CREDENTIAL_CHANGE: revoked}, _user(idp, "alice")) == 202
            assert (await _begin(a, stolen))[1]["x-verifier-reason"] == "credential_revoked"  # the entry, at a
            status, headers, body = await _begin(b, stolen)
            assert status == 401, body
            _rfc9470(headers, body)
            assert await _register(b, stolen, SoftAuthenticator()) == 401
            _, _, listed = await _call(b, "GET", "/v1/webauthn/credentials", token=stolen)
            assert [c["disabled"] for c in listed["credentials"]] == [True]

            await asyncio.sleep(1.1)
            fresh = idp.mint(sub="alice", claims={"auth_time": int(time.time())})
            assert await _register(b, fresh, SoftAuthenticator()) == 201
            status, headers, _ = await _begin(b, stolen)  # a usable key again: an assertion from it decides
            assert status == 401 and headers["x-verifier-reason"] == "webauthn_assertion_required"


# -- finding 7: the WebAuthn endpoints apply every forward-auth check -------------------------------------


async def test_a_certificate_bound_token_without_its_certificate_cannot_enroll_a_passkey(tmp_path: Path) -> None:
    async with _providers() as (idp,), _verifier([_issuer(idp)], webauthn=_webauthn(tmp_path)) as app:
        token = idp.mint(sub="alice", claims={"cnf": {"x5t#S256": "thumb-of-alices-cert"}})
        status, headers, _ = await _call(app, "POST", "/v1/webauthn/register/begin", token=token, body={})
        assert (status, headers["x-verifier-reason"]) == (401, "sender_constraint_failed")
        wrong = {"X-Client-Cert-Thumbprint": "thumb-of-the-attackers-cert"}
        status, _, _ = await _call(app, "POST", "/v1/webauthn/register/begin", token=token, body={}, headers=wrong)
        assert status == 401
        assert (await _forward(app, token))[0] == 401  # as forward-auth says


async def test_a_jwt_the_provider_reports_inactive_cannot_enroll_a_passkey(tmp_path: Path) -> None:
    introspection = IntrospectionConfig(client_id="verifier", client_secret=INTROSPECTION_SECRET)
    async with _providers() as (idp,):
        issuer = _issuer(idp, introspection=introspection, introspect_jwts=True)
        async with _verifier([issuer], webauthn=_webauthn(tmp_path)) as app:
            token = idp.mint(sub="alice", introspectable=True)
            assert (await _forward(app, token))[0] == 200
            status, _, _ = await _call(app, "GET", "/v1/webauthn/credentials", token=token)
            assert status == 200
            revoked = idp.mint(sub="alice", introspectable=True)
            idp.revoke(revoked)
            assert (await _forward(app, revoked))[0] == 401
            status, headers, _ = await _call(app, "POST", "/v1/webauthn/register/begin", token=revoked, body={})
            assert status == 401 and headers["x-verifier-reason"] != "ok"
            assert await _register(app, revoked, SoftAuthenticator()) == 401


async def test_revoked_and_dpop_bound_tokens_cannot_use_the_webauthn_endpoints(tmp_path: Path) -> None:
    async with _providers() as (idp,), _ssf() as tx:
        async with _verifier([_issuer(idp)], [_transmitter(tx, [idp.issuer])], webauthn=_webauthn(tmp_path)) as app:
            token = idp.mint(sub="mallory")
            assert (await _call(app, "GET", "/v1/webauthn/credentials", token=token))[0] == 200
            assert await _push(app, tx, {ACCOUNT_DISABLED: {}}, _user(idp, "mallory")) == 202
            status, headers, _ = await _call(app, "POST", "/v1/webauthn/register/begin", token=token, body={})
            assert (status, headers["x-verifier-reason"]) == (401, "account_disabled")
            bound = idp.mint(sub="alice", claims={"cnf": {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}})
            status, headers, _ = await _call(app, "POST", "/v1/webauthn/register/begin", token=bound, body={})
            assert (status, headers["x-verifier-reason"]) == (401, "sender_constraint_failed")


# -- design risk: clients and users are separate namespaces -----------------------------------------------


async def test_a_client_named_like_a_user_is_not_that_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", "admin-token-for-the-client-test-0123")
    async with _providers() as (idp,), _ssf() as tx:
        async with _verifier(
            [_issuer(idp)], [_transmitter(tx, [idp.issuer])], policies=POLICIES, webauthn=_webauthn(tmp_path)
        ) as app:
            user = idp.mint(sub="alice")
            client = idp.mint(sub=None, claims={"client_id": "alice"})
            # Roles: `subjects: [alice]` is the user's, not the client's.
            assert (await _forward(app, user, "/ops"))[0] == 200
            status, headers = await _forward(app, client, "/ops")
            assert (status, headers["x-verifier-reason"]) == (403, "role_missing")
            # The upstream cannot take the client for the user: no user id for a client token.
            status, headers = await _forward(app, client, "/read")
            assert status == 200 and headers["x-authenticated-userid"] == ""
            # WebAuthn: the user enrolls; the client can neither see nor use those keys, nor enroll.
            key = SoftAuthenticator()
            assert await _register(app, user, key) == 201
            status, headers, _ = await _call(app, "GET", "/v1/webauthn/credentials", token=client)
            assert (status, headers["x-verifier-reason"]) == (403, "webauthn_user_required")
            assert await _register(app, client, SoftAuthenticator()) == 403
            assert (await _step_up(app, client, key))[0] == 403
            # A kill switch on user alice stops the user, not a client that happens to be named alice.
            body = json.dumps({"subject": _user(idp, "alice"), "reason": "stolen laptop"}).encode()
            created = await http_exchange(
                app.ports.http or 0,
                b"POST /v1/admin/revocations HTTP/1.1\r\nHost: v\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer admin-token-for-the-client-test-0123\r\nContent-Length: %d\r\n\r\n" % len(body)
                + body,
            )
            assert created.startswith(b"HTTP/1.1 201")
            assert (await _forward(app, user, "/read"))[0] == 401
            assert (await _forward(app, client, "/read"))[0] == 200


async def test_a_user_who_sets_the_mapped_email_unverified_is_not_granted_its_role() -> None:
    """A role rule on `email` (`boss@corp.example` is admin) granted admin to anyone whose token carried the address:
    at a provider that lets users set their own email (Keycloak's account console, a self-service profile) without
    confirming it, a user typed in the boss's address and got `email_verified: false` (or none) and admin."""
    rules = (RoleRule(role="admin", claim="email", values=("boss@corp.example",)),)
    async with _providers() as (idp,):
        issuer = IssuerSettings(issuer=idp.issuer, audiences=(DEV_AUDIENCE,), algorithms=("ES256",), roles=rules)
        async with _verifier([issuer], policies=POLICIES) as app:
            for unverified in ({}, {"email_verified": False}, {"email_verified": "true"}):
                eve = idp.mint(sub="eve", claims={"email": "boss@corp.example", **unverified})
                status, headers = await _forward(app, eve, "/admin")
                assert (status, headers["x-verifier-reason"]) == (403, "role_missing"), unverified
                status, headers = await _forward(app, eve, "/read")
                assert status == 200 and headers.get("x-authenticated-roles", "") == ""
            boss = idp.mint(sub="boss", claims={"email": "boss@corp.example", "email_verified": True})
            status, headers = await _forward(app, boss, "/admin")
            assert status == 200 and headers["x-authenticated-roles"] == "admin"


async def test_a_keycloak_realm_role_at_its_nested_path_grants_the_route_and_nothing_else_does() -> None:
    """Keycloak puts realm roles in `realm_access.roles`: a rule naming that path read a flat claim of that name,
    which no token has, so every Keycloak user got 403 `role_missing` on the admin route, with nothing at start-up
    or in the answer saying the rule could never match. Now the path is walked, object by object: the same role
    under a sibling key, behind a list or inside a string is still refused."""
    rules = (RoleRule(role="admin", claim="realm_access.roles", values=("admin",)),)
    keycloak = {
        "azp": "orders-web",
        "typ": "Bearer",
        "preferred_username": "alice",
        "resource_access": {"account": {"roles": ["manage-account"]}},
    }
    async with _providers() as (idp,):
        issuer = IssuerSettings(issuer=idp.issuer, audiences=(DEV_AUDIENCE,), algorithms=("ES256",), roles=rules)
        async with _verifier([issuer], policies=POLICIES) as app:
            alice = idp.mint(sub="alice", claims={**keycloak, "realm_access": {"roles": ["offline_access", "admin"]}})
            status, headers = await _forward(app, alice, "/admin")
            assert status == 200 and headers["x-authenticated-roles"] == "admin"
            for shape in (
                {"realm_access": {"groups": ["admin"]}},  # a sibling key
                {"realm_access": [{"roles": ["admin"]}]},  # a list at the intermediate
                {"realm_access": '{"roles": ["admin"]}'},  # a string at the intermediate
                {"realm_access.roles": "not admin"},  # the exact name first: a string is one value
            ):
                eve = idp.mint(sub="eve", claims={**keycloak, **shape})
                status, headers = await _forward(app, eve, "/admin")
                assert (status, headers["x-verifier-reason"]) == (403, "role_missing"), shape
                status, headers = await _forward(app, eve, "/read")
                assert status == 200 and headers.get("x-authenticated-roles", "") == "", shape


async def test_client_and_user_rate_limit_buckets_are_separate() -> None:
    limits = RateLimitSettings(default=RateLimit(per_second=0.001, burst=2))
    async with _providers() as (idp,), _verifier([_issuer(idp)], rate_limits=limits) as app:
        user = idp.mint(sub="alice")
        client = idp.mint(sub=None, claims={"client_id": "alice"})
        assert [(await _forward(app, user))[0] for _ in range(3)] == [200, 200, 429]
        assert [(await _forward(app, client))[0] for _ in range(3)] == [200, 200, 429]


# -- design risk: a transmitter speaks for its own issuers only -------------------------------------------


async def test_each_transmitter_affects_only_the_subjects_of_its_issuers() -> None:
    async with _providers(2) as (one, two), _ssf() as tx_one, _ssf() as tx_two:
        transmitters = [_transmitter(tx_one, [one.issuer]), _transmitter(tx_two, [two.issuer])]
        async with _verifier([_issuer(one), _issuer(two)], transmitters) as app:
            alice_one = one.mint(sub="alice", claims={"email": "alice@example.test", "sid": "s-1"})
            alice_two = two.mint(sub="alice", claims={"email": "alice@example.test", "sid": "s-1"})
            for token in (alice_one, alice_two):
                assert (await _forward(app, token))[0] == 200
            # Transmitter two speaks about issuer one's alice: acknowledged, ignored, counted.
            assert await _push(app, tx_two, {ACCOUNT_DISABLED: {}}, _user(one, "alice")) == 202
            assert (await _forward(app, alice_one))[0] == 200
            ignored = app.metrics.registry.get_sample_value(
                "verifier_ssf_subjects_ignored_total", {"transmitter": tx_two.issuer}
            )
            assert ignored == 1
            # Formats without an issuer reach only the transmitter's own issuers' tokens.
            by_email = {"format": "email", "email": "alice@example.test"}
            assert await _push(app, tx_two, {ACCOUNT_DISABLED: {}}, by_email) == 202
            assert (await _forward(app, alice_one))[0] == 200
            assert (await _forward(app, alice_two))[0] == 401
            by_session = {"format": "opaque", "id": "s-1"}
            assert await _push(app, tx_one, {SESSION_REVOKED: {}}, by_session) == 202
            assert (await _forward(app, alice_one))[0] == 401
            # And transmitter one does reach issuer one's subjects by iss_sub.
            bob_one, bob_two = one.mint(sub="bob"), two.mint(sub="bob")
            assert await _push(app, tx_one, {ACCOUNT_DISABLED: {}}, _user(one, "bob")) == 202
            assert await _push(app, tx_one, {ACCOUNT_DISABLED: {}}, _user(two, "bob")) == 202
            assert (await _forward(app, bob_one))[0] == 401
            assert (await _forward(app, bob_two))[0] == 200


async def test_a_transmitter_must_be_scoped_to_configured_issuers() -> None:
    async with _providers() as (idp,), _ssf() as tx:
        unscoped = {"issuer": tx.issuer, "audience": RECEIVER, "delivery": "push", "allow_insecure_http": True}
        with pytest.raises(ConfigError, match=r"transmitters\[0\]\.subjects_of"):
            async with _verifier([_issuer(idp)], [unscoped]):
                pass
        with pytest.raises(ConfigError, match=r"transmitters\[0\]\.subjects_of\[0\]"):
            async with _verifier([_issuer(idp)], [_transmitter(tx, ["https://elsewhere.example.test"])]):
                pass
