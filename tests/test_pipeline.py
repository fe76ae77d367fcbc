"""The whole pipeline through the forward-auth door: policies, roles, DPoP, mTLS binding, rate limits."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
import uuid

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from doorkit import http_exchange, running_verifier
from support import FrozenClock, b64url
from tokenkit import ISSUER, FakeFetcher, Mint, claims, issuer_settings

from verifier.app import App
from verifier.binding.dpop import thumbprint
from verifier.config.dpop import DpopConfig
from verifier.config.state import StateConfig
from verifier.request import RequestAttributes
from verifier.settings import (
    PolicySettings,
    RateLimit,
    RateLimitSettings,
    Requirements,
    RoleRule,
    RouteMatch,
    Settings,
)

POLICIES = (
    PolicySettings(name="health", match=RouteMatch(path="/health"), require=Requirements(authenticated=False)),
    PolicySettings(
        name="admin",
        match=RouteMatch(path_prefix="/admin"),
        require=Requirements(roles_any=("admin",), sender_constraint="dpop"),
    ),
    PolicySettings(name="mtls", match=RouteMatch(path_prefix="/bank"), require=Requirements(sender_constraint="mtls")),
    PolicySettings(name="api", match=RouteMatch(path_prefix="/api"), require=Requirements(scopes_all=("read",))),
)


def _request(
    path: str,
    *,
    token: str | None = None,
    scheme: str = "Bearer",
    extra: str = "",
    method: str = "GET",
    host: str = "api.example.test",
) -> bytes:
    auth = f"Authorization: {scheme} {token}\r\n" if token else ""
    return (
        f"GET /v1/forward-auth HTTP/1.1\r\nHost: verifier\r\nX-Forwarded-Method: {method}\r\n"
        f"X-Forwarded-Proto: https\r\nX-Forwarded-Host: {host}\r\nX-Forwarded-Uri: {path}\r\n"
        f"{auth}{extra}\r\n"
    ).encode()


def _parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.lower()] = v.strip()
    return int(lines[0].split()[1]), headers, body


def _proof(key: ec.EllipticCurvePrivateKey, method: str, url: str, token: str, **over: object) -> str:
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    claims = {
        "jti": uuid.uuid4().hex,
        "htm": method,
        "htu": url,
        "iat": int(time.time()),
        "ath": b64url(hashlib.sha256(token.encode()).digest()),
    }
    claims.update(over)
    return jwt.encode(claims, key, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": public})


async def _dpop_get(
    port: int, key: ec.EllipticCurvePrivateKey, token: str, host: str
) -> tuple[int, dict[str, str], bytes]:
    """GET /api/x as the gateway reports it on `host`, with a proof made for that host (the client's choice)."""
    dpop = f"DPoP: {_proof(key, 'GET', f'https://{host}/api/x', token)}\r\n"
    return _parse(await http_exchange(port, _request("/api/x", token=token, scheme="DPoP", extra=dpop, host=host)))


async def test_policies_anonymous_route_unmatched_route_and_scopes() -> None:
    async with running_verifier({"policies": POLICIES}) as (app, idp):
        port = app.ports.http
        status, headers, _ = _parse(await http_exchange(port, _request("/health")))
        assert (status, headers["x-verifier-reason"]) == (200, "anonymous")
        status, headers, _ = _parse(await http_exchange(port, _request("/elsewhere", token=idp.mint())))
        assert (status, headers["x-verifier-reason"]) == (403, "route_not_allowed")
        status, _, _ = _parse(await http_exchange(port, _request("/api/x", token=idp.mint(scope="read"))))
        assert status == 200
        status, headers, _ = _parse(await http_exchange(port, _request("/api/x", token=idp.mint(scope="write"))))
        assert (status, headers["x-verifier-reason"]) == (403, "scope_missing")
        status, headers, _ = _parse(await http_exchange(port, _request("/api/x")))
        # a bare challenge, naming the route's scope (RFC 6750 section 3) so the client knows what to ask for
        assert status == 401 and headers["www-authenticate"] == 'Bearer realm="verifier", scope="read"'


async def test_dpop_bound_token_with_valid_proof_replay_missing_proof_and_downgrade() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jkt = thumbprint(json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())))
    rules = (RoleRule(role="admin", claim="groups", values=("platform-admins",)),)
    async with running_verifier({"policies": POLICIES}, roles=rules) as (app, idp):
        port = app.ports.http
        token = idp.mint(claims={"cnf": {"jkt": jkt}, "groups": ["platform-admins"]})
        url = "https://api.example.test/admin/users"
        proof = _proof(key, "DELETE", url, token)
        ok = _request("/admin/users?page=2", token=token, scheme="DPoP", extra=f"DPoP: {proof}\r\n", method="DELETE")
        status, headers, _ = _parse(await http_exchange(port, ok))
        assert (status, headers["x-authenticated-roles"]) == (200, "admin")
        assert headers["cache-control"] == "no-store"
        # The same proof again: replay.
        status, headers, _ = _parse(await http_exchange(port, ok))
        assert status == 401 and headers["www-authenticate"].startswith(
            'DPoP realm="verifier", error="invalid_dpop_proof"'
        )
        # A proof for another method.
        wrong = _proof(key, "GET", url, token)
        req = _request("/admin/users", token=token, scheme="DPoP", extra=f"DPoP: {wrong}\r\n", method="DELETE")
        assert _parse(await http_exchange(port, req))[0] == 401
        # No proof at all.
        req = _request("/admin/users", token=token, scheme="DPoP", method="DELETE")
        status, headers, _ = _parse(await http_exchange(port, req))
        assert status == 401 and 'algs="' in headers["www-authenticate"]
        # Downgrade: the bound token presented as a plain Bearer token.
        req = _request("/admin/users", token=token, method="DELETE")
        status, headers, _ = _parse(await http_exchange(port, req))
        assert (status, headers["x-verifier-reason"]) == (401, "sender_constraint_failed")
        assert headers["www-authenticate"].startswith("DPoP ")
        # A proof made with another key than the token is bound to.
        other = ec.generate_private_key(ec.SECP256R1())
        req = _request(
            "/admin/users",
            token=token,
            scheme="DPoP",
            extra=f"DPoP: {_proof(other, 'DELETE', url, token)}\r\n",
            method="DELETE",
        )
        assert _parse(await http_exchange(port, req))[0] == 401


async def test_an_unbound_token_with_the_dpop_scheme_and_two_dpop_headers_are_refused_at_the_door() -> None:
    """RFC 9449 section 7.1: the DPoP scheme presents a DPoP-bound token; an unbound one (no `cnf.jkt`) is refused
    even with a good proof (`token_not_dpop_bound`). Section 4.3 step 1: a request with two `DPoP` header fields
    (each a good proof for the bound token) carries more than one proof and is refused; either alone passes."""
    key = ec.generate_private_key(ec.SECP256R1())
    jkt = thumbprint(json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())))
    url = "https://api.example.test/orders"
    async with running_verifier() as (app, idp):
        port = app.ports.http
        unbound = idp.mint()
        req = _request("/orders", token=unbound, scheme="DPoP", extra=f"DPoP: {_proof(key, 'GET', url, unbound)}\r\n")
        status, headers, _ = _parse(await http_exchange(port, req))
        assert (status, headers["x-verifier-reason"]) == (401, "token_not_dpop_bound")
        bound = idp.mint(claims={"cnf": {"jkt": jkt}})
        first, second = _proof(key, "GET", url, bound), _proof(key, "GET", url, bound)
        req = _request("/orders", token=bound, scheme="DPoP", extra=f"DPoP: {first}\r\nDPoP: {second}\r\n")
        status, headers, _ = _parse(await http_exchange(port, req))
        assert (status, headers["x-verifier-reason"]) == (401, "dpop_proof_invalid")
        req = _request("/orders", token=bound, scheme="DPoP", extra=f"DPoP: {second}\r\n")
        assert _parse(await http_exchange(port, req))[0] == 200


async def test_a_full_replay_store_answers_503_try_again_and_still_refuses_the_remembered_proof() -> None:
    """Full of live DPoP jtis, the store refuses a new proof with 503 replay_store_full and Retry-After
    (the client tries again; not "replayed"), and never forgets the remembered one to make room: its replay
    is still a 401. Before, the new proof evicted it and the replay passed. Retry-After is when the remembered
    jti expires and makes room (its whole window, 66 s by default), not a fixed 1."""
    key = ec.generate_private_key(ec.SECP256R1())
    jkt = thumbprint(json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())))
    async with running_verifier({"state": StateConfig(max_replay_entries=1)}) as (app, idp):
        token = idp.mint(scope="read", claims={"cnf": {"jkt": jkt}})

        async def get(proof: str) -> tuple[int, dict[str, str], bytes]:
            req = _request("/api/x", token=token, scheme="DPoP", extra=f"DPoP: {proof}\r\n")
            return _parse(await http_exchange(app.ports.http, req))

        first = _proof(key, "GET", "https://api.example.test/api/x", token)
        assert (await get(first))[0] == 200
        status, headers, body = await get(_proof(key, "GET", "https://api.example.test/api/x", token))
        window = str(math.ceil(DpopConfig().jti_ttl_seconds))
        assert (status, headers["x-verifier-reason"], headers["retry-after"]) == (503, "replay_store_full", window)
        assert json.loads(body)["error"] == "temporarily_unavailable"
        status, headers, _ = await get(first)
        assert (status, headers["x-verifier-reason"]) == (401, "dpop_proof_invalid")
        assert b'verifier_replay_store_full_total{purpose="dpop"} 1.0' in app.metrics.render()


async def test_unbound_token_on_a_dpop_route_is_refused_with_a_dpop_challenge() -> None:
    async with running_verifier({"policies": POLICIES}, roles=(RoleRule(role="admin", subjects=("dev-user",)),)) as (
        app,
        idp,
    ):
        status, headers, _ = _parse(await http_exchange(app.ports.http, _request("/admin", token=idp.mint())))
        assert status == 401 and headers["www-authenticate"].startswith("DPoP ")


async def test_mtls_bound_token_needs_the_matching_certificate_thumbprint() -> None:
    options = {"policies": POLICIES, "mtls_thumbprint_header": "x-client-cert-thumbprint"}
    async with running_verifier(options) as (app, idp):
        token = idp.mint(claims={"cnf": {"x5t#S256": "abc123"}})
        port = app.ports.http
        status, _, _ = _parse(
            await http_exchange(port, _request("/bank", token=token, extra="X-Client-Cert-Thumbprint: abc123\r\n"))
        )
        assert status == 200
        status, headers, _ = _parse(
            await http_exchange(port, _request("/bank", token=token, extra="X-Client-Cert-Thumbprint: zzz\r\n"))
        )
        assert (status, headers["x-verifier-reason"]) == (401, "sender_constraint_failed")
        status, _, _ = _parse(await http_exchange(port, _request("/bank", token=token)))
        assert status == 401
        status, headers, _ = _parse(await http_exchange(port, _request("/bank", token=idp.mint())))
        assert (status, headers["x-verifier-reason"]) == (401, "sender_constraint_failed")


async def test_a_token_bound_by_a_confirmation_method_the_verifier_cannot_check_is_not_taken_as_bearer() -> None:
    """RFC 7800 `cnf` names how the presenter proves possession; a method other than RFC 9449 `jkt` or RFC 8705
    `x5t#S256` (an RFC 7800 `jwk` or `kid`, a SHA-1 `x5t`), or a `cnf` that is not an object, cannot be checked
    here, so the token is refused rather than taken as a plain bearer token (a stolen PoP token would pass)."""
    options = {"policies": POLICIES, "mtls_thumbprint_header": "x-client-cert-thumbprint"}
    async with running_verifier(options) as (app, idp):
        port = app.ports.http
        for cnf in (
            {"jwk": {"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}},
            {"kid": "pop-key-1"},
            {"x5t": "abc123"},
            "abc123",
            ["jkt"],
        ):
            token = idp.mint(scope="read", claims={"cnf": cnf})
            status, headers, _ = _parse(await http_exchange(port, _request("/api/x", token=token)))
            assert (status, headers.get("x-verifier-reason")) == (401, "sender_constraint_failed"), cnf
        # Unbound (no cnf, or one naming nothing) and properly bound tokens are judged as before.
        for claims in ({}, {"cnf": {}}):
            token = idp.mint(scope="read", claims=claims)
            assert _parse(await http_exchange(port, _request("/api/x", token=token)))[0] == 200
        token = idp.mint(scope="read", claims={"cnf": {"x5t#S256": "abc123", "x5t": "sha1"}})
        extra = "X-Client-Cert-Thumbprint: abc123\r\n"
        assert _parse(await http_exchange(port, _request("/api/x", token=token, extra=extra)))[0] == 200


async def test_a_cnf_jkt_that_binds_to_no_key_is_refused_alike_under_either_scheme() -> None:
    """`cnf: {"jkt": null}` (or `""`, or a number) is a malformed binding: 401 `claim_invalid` (RFC 6750
    `invalid_token`) under Bearer and DPoP alike. Before, Bearer got `sender_constraint_failed` (the DPoP check let it
    by; the certificate check refused it), DPoP `token_not_dpop_bound`, and `""` under DPoP had its proof checked."""
    key = ec.generate_private_key(ec.SECP256R1())
    url = "https://api.example.test/api/x"
    async with running_verifier({"policies": POLICIES}) as (app, idp):
        port = app.ports.http
        for jkt in (None, "", 42):
            token = idp.mint(scope="read", claims={"cnf": {"jkt": jkt}})
            dpop = f"DPoP: {_proof(key, 'GET', url, token)}\r\n"
            for scheme, extra in (("Bearer", ""), ("DPoP", dpop)):
                req = _request("/api/x", token=token, scheme=scheme, extra=extra)
                status, headers, _ = _parse(await http_exchange(port, req))
                assert (status, headers.get("x-verifier-reason")) == (401, "claim_invalid"), (jkt, scheme)
                assert 'error="invalid_token"' in headers.get("www-authenticate", ""), (jkt, scheme, headers)


async def test_an_allow_under_a_rate_limit_tells_the_client_what_is_left() -> None:
    """The forward-auth allow carries RateLimit-Policy / RateLimit (for the client: the gateways pass them
    on) and stays no-store, so no gateway replays one request's budget to another."""
    limits = RateLimitSettings(default=RateLimit(per_second=0.001, burst=3))
    async with running_verifier({"rate_limits": limits}) as (app, idp):
        token = idp.mint(sub="budget")
        answers = [_parse(await http_exchange(app.ports.http, _request("/x", token=token))) for _ in range(3)]
    assert [a[0] for a in answers] == [200, 200, 200]
    for left, (_, headers, _) in zip((2, 1, 0), answers, strict=True):
        assert headers["ratelimit-policy"] == '"default";q=3;w=3000', headers
        assert headers["ratelimit"].startswith(f'"default";r={left};'), headers
        assert headers["cache-control"] == "no-store" and "retry-after" not in headers
        assert headers["x-authenticated-userid"] == "budget"


async def test_rate_limit_is_exact_at_the_boundary_with_headers() -> None:
    limits = RateLimitSettings(
        default=RateLimit(per_second=0.001, burst=3), roles=(("vip", RateLimit(per_second=1000, burst=1000)),)
    )
    async with running_verifier({"rate_limits": limits}) as (app, idp):
        token = idp.mint(sub="limited")
        port = app.ports.http
        statuses = [(_parse(await http_exchange(port, _request("/x", token=token))))[0] for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        status, headers, body = _parse(await http_exchange(port, _request("/x", token=token)))
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert headers["ratelimit-policy"].startswith('"default";q=3')
        assert headers["ratelimit"].startswith('"default";r=0')
        assert json.loads(body)["error"] == "rate_limited"
        # Another identity has its own bucket; a role with a higher limit gets that limit, on the same
        # bucket (one per identity, issue #26 G14): it refills at the vip rate, 1000/s.
        assert _parse(await http_exchange(port, _request("/x", token=idp.mint(sub="other"))))[0] == 200
        vip = idp.mint(sub="limited", claims={"roles": ["vip"]})
        await asyncio.sleep(0.02)
        answers = [_parse(await http_exchange(port, _request("/x", token=vip))) for _ in range(5)]
        assert [a[0] for a in answers] == [200] * 5


async def test_step_up_route_asks_for_a_webauthn_assertion_every_time(tmp_path) -> None:  # type: ignore[no-untyped-def]
    policies = (
        PolicySettings(name="pay", match=RouteMatch(path_prefix="/pay"), require=Requirements(step_up="webauthn")),
        PolicySettings(name="rest", match=RouteMatch(path_prefix="/"), require=Requirements()),
    )
    config = _webauthn_config(tmp_path)
    async with running_verifier({"policies": policies, "webauthn": config}) as (app, idp):
        token = idp.mint(sub="payer")
        assert _parse(await http_exchange(app.ports.http, _request("/account", token=token)))[0] == 200
        challenges = set()
        for extra in ("", "X-WebAuthn-Assertion: bm90LWpzb24\r\n"):
            status, headers, _ = _parse(
                await http_exchange(app.ports.http, _request("/pay", token=token, extra=extra))
            )
            assert status == 401 and headers["www-authenticate"].startswith("WebAuthn ")
            assert 'rp_id="localhost"' in headers["www-authenticate"]
            assert headers["cache-control"] == "no-store"
            challenges.add(headers["www-authenticate"].split('challenge="', 1)[1].split('"', 1)[0])
        assert len(challenges) == 2  # every refusal carries a fresh challenge


async def test_several_workers_without_redis_refuse_dpop_instead_of_accepting_a_proof_once_per_worker() -> None:
    """#18 F8: each worker had its own replay cache, so one proof was good once per worker."""
    key = ec.generate_private_key(ec.SECP256R1())
    jkt = thumbprint(json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())))
    async with running_verifier({"workers": 2}) as (app, idp):
        token = idp.mint(scope="read", claims={"cnf": {"jkt": jkt}})
        proof = _proof(key, "GET", "https://api.example.test/api/x", token)
        req = _request("/api/x", token=token, scheme="DPoP", extra=f"DPoP: {proof}\r\n")
        status, headers, _ = _parse(await http_exchange(app.ports.http, req))
        assert status == 401 and 'error="invalid_dpop_proof"' in headers["www-authenticate"]
    async with running_verifier({"workers": 1}) as (app, idp):  # one worker: one replay cache, accepted
        token = idp.mint(scope="read", claims={"cnf": {"jkt": jkt}})
        proof = _proof(key, "GET", "https://api.example.test/api/x", token)
        req = _request("/api/x", token=token, scheme="DPoP", extra=f"DPoP: {proof}\r\n")
        assert _parse(await http_exchange(app.ports.http, req))[0] == 200


async def test_a_dpop_proof_for_another_url_does_not_pass_our_own_endpoints_by_the_clients_x_forwarded_headers(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    """Our WebAuthn registry endpoints judged a proof's htm/htu against the X-Forwarded-Method/-Uri the CALLER sent:
    whoever held a DPoP-bound token and one unused proof made for any other request (a proof the client sent to
    another resource server, RFC 9449 section 11.1) called the registry as the user by declaring that request. The
    method and path an endpoint judges are those of the request made to it (as its step-up binding already is)."""


    key = ec.generate_private_key(ec.SECP256R1())
    jkt = thumbprint(json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())))
    config = _webauthn_config(tmp_path)
    async with running_verifier({"webauthn": config}) as (app, idp):
        token = idp.mint(sub="alice", claims={"cnf": {"jkt": jkt}})

        def call(proof: str, forwarded: str = "") -> bytes:
            return _register_begin(token, proof, "verifier.test", forwarded)

        elsewhere = _proof(key, "GET", "https://photos.example.test/albums", token)
        declared = (
            "X-Forwarded-Method: GET\r\nX-Forwarded-Uri: /albums\r\n"
            "X-Forwarded-Host: photos.example.test\r\nX-Forwarded-Proto: https\r\n"
        )
        status, headers, body = _parse(await http_exchange(app.ports.http, call(elsewhere, declared)))
        assert (status, headers.get("x-verifier-reason")) == (401, "dpop_proof_invalid"), (status, body)
        assert headers["www-authenticate"].startswith('DPoP realm="verifier", error="invalid_dpop_proof"')
        # A proof for this very request still passes.
        own = _proof(key, "POST", "http://verifier.test/v1/webauthn/register/begin", token)
        status, _, body = _parse(await http_exchange(app.ports.http, call(own)))
        assert status == 200 and b"publicKey" in body


async def test_with_dpop_origins_a_proof_for_another_server_replayed_on_the_host_it_names_is_refused() -> None:
    """A gateway that routes whatever host the client sends (a Kong route without `hosts`, nginx
    `default_server`, Envoy `domains: ["*"]`) reports that host: a proof the victim's client made for
    https://evil.example/api/x, replayed to us with `Host: evil.example`, matched its own htu and passed.
    With `dpop.origins` naming our public origins it is refused; left empty, it still passes (as before)."""
    key = ec.generate_private_key(ec.SECP256R1())
    jkt = thumbprint(json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())))
    for origins, evil_status in (((), 200), (("https://api.example.test",), 401)):
        async with running_verifier({"dpop": DpopConfig(origins=origins)}) as (app, idp):
            token = idp.mint(scope="read", claims={"cnf": {"jkt": jkt}})
            status, headers, _ = await _dpop_get(app.ports.http, key, token, "evil.example")
            assert status == evil_status, origins
            if evil_status == 401:
                assert headers["x-verifier-reason"] == "dpop_proof_invalid"
                assert headers["www-authenticate"].startswith('DPoP realm="verifier", error="invalid_dpop_proof"')
            assert (await _dpop_get(app.ports.http, key, token, "api.example.test"))[0] == 200


async def test_with_dpop_origins_the_webauthn_registry_refuses_a_proof_for_the_host_the_caller_named(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    """The registry endpoints judge htu against the `Host` of the request made to them, which the caller
    writes: the same `dpop.origins` rule applies there (their origin is listed like any other)."""
    key = ec.generate_private_key(ec.SECP256R1())
    jkt = thumbprint(json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())))
    dpop = DpopConfig(origins=("https://api.example.test", "http://verifier.test"), allow_http_origins=True)
    async with running_verifier({"webauthn": _webauthn_config(tmp_path), "dpop": dpop}) as (app, idp):
        token = idp.mint(sub="alice", claims={"cnf": {"jkt": jkt}})

        def call(host: str) -> bytes:
            return _register_begin(token, _proof(key, "POST", f"http://{host}/v1/webauthn/register/begin", token), host)

        status, headers, body = _parse(await http_exchange(app.ports.http, call("evil.example")))
        assert (status, headers.get("x-verifier-reason")) == (401, "dpop_proof_invalid"), (status, body)
        status, _, body = _parse(await http_exchange(app.ports.http, call("verifier.test")))
        assert status == 200 and b"publicKey" in body


async def test_behind_a_tls_gateway_the_webauthn_registry_judges_a_dpop_proof_on_the_declared_public_origin(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    """A gateway that terminates TLS proxies the registry in plain http with the public `Host`: the client's proof
    names https://api.example.test/v1/webauthn/..., which the registry compared with http://<Host>/... and never
    matched. With `dpop.origins` declared, the request is on the declared origin its `Host` names (its scheme
    https); a `Host` naming no declared origin is refused, X-Forwarded-Proto/-Host or not."""
    key = ec.generate_private_key(ec.SECP256R1())
    jkt = thumbprint(json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())))
    dpop = DpopConfig(origins=("https://api.example.test",))
    async with running_verifier({"webauthn": _webauthn_config(tmp_path), "dpop": dpop}) as (app, idp):
        token = idp.mint(sub="alice", claims={"cnf": {"jkt": jkt}})

        def call(host: str, htu_origin: str, forwarded: str = "") -> bytes:
            proof = _proof(key, "POST", f"{htu_origin}/v1/webauthn/register/begin", token)
            return _register_begin(token, proof, host, forwarded)

        for host in ("api.example.test", "API.example.test.:443"):
            status, _, body = _parse(await http_exchange(app.ports.http, call(host, "https://api.example.test")))
            assert status == 200 and b"publicKey" in body, (host, status, body)
        refused = (
            call("evil.example", "https://evil.example"),
            call("evil.example", "http://evil.example"),
            call("evil.example", "https://api.example.test"),  # our own origin's proof, on a host of the caller's
            call("evil.example", "https://api.example.test", "X-Forwarded-Host: api.example.test\r\n"
                 "X-Forwarded-Proto: https\r\n"),
            call("api.example.test", "http://api.example.test"),  # the scheme is the origin's, not the hop's
        )
        for request in refused:
            status, headers, body = _parse(await http_exchange(app.ports.http, request))
            assert (status, headers.get("x-verifier-reason")) == (401, "dpop_proof_invalid"), (request, body)
            assert headers["www-authenticate"].startswith('DPoP realm="verifier", error="invalid_dpop_proof"')


async def test_a_certificate_bound_token_does_not_pass_our_own_endpoints_on_a_thumbprint_header_the_caller_wrote(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    """`mtls_thumbprint_header` names what a gateway overwrites on the forward-auth requests it sends; nothing
    publishes our WebAuthn registry through a gateway (the shipped configs do not route it; Kong's plugin forwards
    no thumbprint to an upstream), so there the header is the caller's own. With a stolen certificate-bound token
    and the thumbprint (it is in the token), an attacker without the certificate began enrolling a key as the user."""

    config = _webauthn_config(tmp_path)
    options = {"webauthn": config, "mtls_thumbprint_header": "x-client-cert-thumbprint"}
    async with running_verifier(options) as (app, idp):
        bound = b64url(hashlib.sha256(b"the victim's certificate").digest())
        token = idp.mint(sub="alice", claims={"cnf": {"x5t#S256": bound}})
        request = (
            f"POST /v1/webauthn/register/begin HTTP/1.1\r\nHost: verifier.test\r\nAuthorization: Bearer {token}\r\n"
            f"X-Client-Cert-Thumbprint: {bound}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        ).encode()
        status, headers, body = _parse(await http_exchange(app.ports.http, request))
        assert (status, headers.get("x-verifier-reason")) == (401, "sender_constraint_failed"), (status, body)


def _register_begin(token: str, proof: str, host: str, extra: str = "") -> bytes:
    """`POST /v1/webauthn/register/begin` straight to the verifier, with a DPoP-bound token and its proof."""
    return (
        f"POST /v1/webauthn/register/begin HTTP/1.1\r\nHost: {host}\r\n{extra}"
        f"Authorization: DPoP {token}\r\nDPoP: {proof}\r\nContent-Type: application/json\r\n"
        "Content-Length: 2\r\n\r\n{}"
    ).encode()


def _webauthn_config(tmp_path):  # type: ignore[no-untyped-def]
    """WebAuthn on `localhost` with its credentials in `tmp_path`."""
    import os

    from verifier.webauthn import WebAuthnConfig

    return WebAuthnConfig(
        rp_id="localhost",
        rp_name="t",
        origins=("http://localhost:1",),
        secret=os.urandom(32),
        sqlite_path=str(tmp_path / "w.sqlite3"),
    )


async def test_a_token_refused_as_not_yet_valid_is_taken_the_moment_its_nbf_or_iat_comes_within_the_leeway(
    clock: FrozenClock, fetcher: FakeFetcher, mint: Mint
) -> None:
    """The refused-token cache kept a `token_not_yet_valid` refusal for `cache.negative_ttl_seconds` (30 s): a token
    that became valid meanwhile stayed refused, on every door, while a verifier without the cache took it
    (tests/test_memo_differential.py)."""
    settings = Settings(grpc=None, http=None, metrics=None, issuers=(issuer_settings(leeway_seconds=5),))
    app = App(settings, clock=clock, fetcher=fetcher)
    await app.keys.issuers[ISSUER].refresh()
    for claim in ("nbf", "iat"):
        token = mint(claims(**{claim: int(clock.now()) + 25}))  # taken 20 s from now (5 s of leeway)
        attrs = RequestAttributes("GET", "https", "api.example.test", "/x", {"authorization": f"Bearer {token}"})
        assert (await app.pipeline.decide(attrs, "test")).reason == "token_not_yet_valid"
        clock.advance(19.5)
        assert (await app.pipeline.decide(attrs, "test")).reason == "token_not_yet_valid"
        clock.advance(0.5)
        assert (await app.pipeline.decide(attrs, "test")).allowed, claim
