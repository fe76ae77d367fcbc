"""The fused first-seen path (`Pipeline._first_seen_jwt`, #24 goal 2) against the general one, request for request.

Two verifiers on one clock and one provider: the first as served (the fused path on), the second with it off (its
pipeline's `_jwt_first` cleared, so every first-seen token goes through the credential parse, the authenticators,
`_admitted` and `_now`). Each request is decided by both; the decision, the answer bytes, the audit line (all but
its latency), the counts and what the caches hold must be the same, for valid tokens and for every way a token is
refused, and the requests the fused path is not for must go to the general one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from support import FrozenClock, b64url, free_port

from verifier import pipeline as pipeline_module
from verifier.app import App
from verifier.config.upstream import HeaderMapping, UpstreamConfig
from verifier.decision import Decision
from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider
from verifier.doors.forward_auth import DOOR, _answer, attributes_from_http
from verifier.pipeline import Pipeline
from verifier.request import RequestAttributes
from verifier.settings import (
    EdgeCacheSettings,
    IssuerSettings,
    Listen,
    PolicySettings,
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
    PolicySettings(name="api", match=RouteMatch(path_prefix="/api"), require=Requirements(scopes_all=("read",))),
    PolicySettings(name="rest", match=RouteMatch(path_prefix="/"), require=Requirements()),
)
ROLES = (RoleRule(role="admin", claim="groups", values=("platform-admins",)),)


@contextlib.asynccontextmanager
async def _two_verifiers(**options: Any) -> AsyncIterator[tuple[App, App, DevIdentityProvider]]:
    """(fused, general, provider): two verifiers of the same settings on one frozen clock."""
    idp = DevIdentityProvider(port=free_port())
    await idp.start()
    clock = FrozenClock(time.time())
    settings = Settings(
        grpc=Listen(host="127.0.0.1", port=0),
        http=Listen(host="127.0.0.1", port=0),
        metrics=Listen(host="127.0.0.1", port=0),
        issuers=(
            IssuerSettings(
                issuer=idp.issuer, audiences=(DEV_AUDIENCE,), algorithms=("ES256", "RS256", "EdDSA"), roles=ROLES
            ),
        ),
        **options,
    )
    apps = [App(settings, clock=clock), App(settings, clock=clock)]
    try:
        for app in apps:
            await app.start()
            await asyncio.wait_for(app.keys.wait_ready(), 10)
        assert apps[0].pipeline._jwt_first is not None  # as served: the fused path is on
        apps[1].pipeline._jwt_first = None
        yield apps[0], apps[1], idp
    finally:
        for app in apps:
            await app.stop(grace=0.2)
        await idp.stop()


def _attrs(authorization: str | None, path: str = "/orders", extra: dict[str, str] | None = None) -> RequestAttributes:
    headers = {
        "host": "verifier",
        "x-forwarded-method": "GET",
        "x-forwarded-proto": "https",
        "x-forwarded-host": "api.example.test",
        "x-forwarded-uri": path,
        **(extra or {}),
    }
    if authorization is not None:
        headers["authorization"] = authorization
    return attributes_from_http("GET", b"/v1/forward-auth", headers, "127.0.0.1")


def _signed(idp: DevIdentityProvider, claims: dict[str, Any], alg: str = "ES256", **header: Any) -> str:
    """A token signed with the provider's key for `alg`, with the header parameters given."""
    kid, private = idp._keys[alg]
    return jwt.encode(claims, private, algorithm=alg, headers={"kid": kid, "typ": "at+jwt", **header})


def _claims(idp: DevIdentityProvider, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    body = {"iss": idp.issuer, "sub": "u1", "aud": DEV_AUDIENCE, "scope": "read", "iat": now, "exp": now + 600}
    body.update(over)
    return body


def _forged(token: str) -> str:
    """The token with one signature byte changed (a middle character: never only padding bits)."""
    head, payload, sig = token.split(".")
    mid = len(sig) // 2
    return f"{head}.{payload}.{sig[:mid]}{'A' if sig[mid] != 'A' else 'B'}{sig[mid + 1 :]}"


def _authorizations(idp: DevIdentityProvider) -> list[tuple[str, str | None, str]]:
    """(what, Authorization value, path): every kind of first sight, the fused path's and the general one's."""
    now = int(time.time())
    valid = idp.mint()
    odd_subject = idp.mint(sub="x\r\ny: 1\u2028")
    none_alg = b64url(json.dumps({"alg": "none", "typ": "at+jwt"}).encode()) + "." + b64url(b'{"iss":"x"}') + "."
    cases: list[tuple[str, str | None, str]] = [
        ("valid", f"Bearer {valid}", "/orders"),
        ("valid again: cached", f"Bearer {valid}", "/orders"),
        ("valid, another path", f"Bearer {idp.mint()}", "/api/items?page=2"),
        ("RS256", f"Bearer {idp.mint(alg='RS256')}", "/orders"),
        ("EdDSA", f"Bearer {idp.mint(alg='EdDSA')}", "/orders"),
        ("client credentials", f"Bearer {idp.mint(sub=None)}", "/orders"),
        ("roles and scp", f"Bearer {idp.mint(claims={'roles': ['b', 'a'], 'groups': ['platform-admins']})}", "/orders"),
        ("control characters in sub", f"Bearer {odd_subject}", "/orders"),
        ("short-lived: max-age cut", f"Bearer {idp.mint(ttl=5)}", "/orders"),
        ("mapped claim", f"Bearer {idp.mint(claims={'team': 'blue'})}", "/orders"),
        ("mapped claim too long for a header", f"Bearer {idp.mint(claims={'team': 'x' * 300})}", "/orders"),
        ("aud list", f"Bearer {_signed(idp, _claims(idp, aud=['other', DEV_AUDIENCE]))}", "/orders"),
        ("legacy typ JWT", f"Bearer {_signed(idp, _claims(idp), typ='JWT')}", "/orders"),
        ("expired", f"Bearer {idp.mint(claims={'exp': now - 120})}", "/orders"),
        ("not yet valid", f"Bearer {idp.mint(claims={'nbf': now + 600})}", "/orders"),
        ("issued in the future", f"Bearer {idp.mint(claims={'iat': now + 600})}", "/orders"),
        ("exp not a number", f"Bearer {idp.mint(claims={'exp': 'soon'})}", "/orders"),
        ("wrong audience", f"Bearer {idp.mint(aud='https://elsewhere.example')}", "/orders"),
        ("no audience", f"Bearer {_signed(idp, {k: v for k, v in _claims(idp).items() if k != 'aud'})}", "/orders"),
        ("ID token", f"Bearer {idp.mint(claims={'nonce': 'n'})}", "/orders"),
        ("wrong typ", f"Bearer {_signed(idp, _claims(idp), typ='dpop+jwt')}", "/orders"),
        ("bad signature", f"Bearer {_forged(idp.mint())}", "/orders"),
        ("bad signature, RS256", f"Bearer {_forged(idp.mint(alg='RS256'))}", "/orders"),
        ("ES256 header on the RS256 key", f"Bearer {_signed(idp, _claims(idp), kid=idp._keys['RS256'][0])}", "/orders"),
        ("alg none", f"Bearer {none_alg}", "/orders"),
        ("alg HS256", f"Bearer {jwt.encode(_claims(idp), 'k' * 32, algorithm='HS256')}", "/orders"),
        ("jku in header", f"Bearer {_signed(idp, _claims(idp), jku='https://evil.example/jwks')}", "/orders"),
        ("unknown kid: needs I/O", f"Bearer {_signed(idp, _claims(idp), kid='no-such-key')}", "/orders"),
        ("untrusted issuer", f"Bearer {idp.mint(claims={'iss': 'https://other.example'})}", "/orders"),
        ("payload not JSON", "Bearer eyJhbGciOiJFUzI1NiJ9.bm90IGpzb24.c2ln", "/orders"),
        ("not base64url but b64token", "Bearer eyJhbGciOiJFUzI1NiJ9.e30~.c2ln", "/orders"),
        ("four segments", "Bearer eyJhbGciOiJFUzI1NiJ9.e30.c2ln.c2ln", "/orders"),
        ("not b64token", "Bearer eyJhbGciOiJFUzI1NiJ9.e30@.c2ln", "/orders"),
        ("trailing space", f"Bearer {idp.mint()} ", "/orders"),
        ("opaque", "Bearer c29tZS1vcGFxdWUtdG9rZW4", "/orders"),
        ("lower-case scheme", f"bearer {idp.mint()}", "/orders"),
        ("two spaces", f"Bearer  {idp.mint()}", "/orders"),
        ("DPoP scheme, no proof", f"DPoP {idp.mint()}", "/orders"),
        ("DPoP-bound as Bearer", f"Bearer {idp.mint(claims={'cnf': {'jkt': 'A' * 43}})}", "/orders"),
        ("certificate-bound, no certificate", f"Bearer {idp.mint(claims={'cnf': {'x5t#S256': 'A' * 43}})}", "/orders"),
        ("no token", None, "/orders"),
        ("Basic", "Basic dXNlcjpwYXNz", "/orders"),
    ]
    return cases


def _audit_lines(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    lines = [json.loads("{" + r.__dict__["_json_fields"] + "}") for r in records if r.msg == "signature_check"]
    for line in lines:
        assert isinstance(line.pop("latency_ms"), float)  # the one field that is the clock's, not the request's
    return lines


def _counts(app: App) -> tuple[dict[Any, int], dict[Any, int]]:
    hot = app.metrics._hot
    return dict(hot.cache), dict(hot.signatures)


def _held(pipeline: Pipeline) -> tuple[dict[bytes, Any], dict[bytes, Any]]:
    """What the caches hold, comparable across two verifiers (checks by class, refusals by class and text)."""
    positive = {
        key: (admitted._replace(checks=tuple(type(c).__name__ for c in admitted.checks)), expiry)
        for key, admitted, expiry in pipeline._positive.entries()
    }
    negative = {
        key: ((type(r.error).__name__, r.error.code, str(r.error), r.scheme), expiry)
        for key, r, expiry in pipeline._negative.entries()
    }
    return positive, negative


async def _decide(app: App, attrs: RequestAttributes) -> tuple[Decision | None, float, Decision | None]:
    """The forward-auth door's decision (with until when it may be remembered) and, when it needs I/O, the
    asynchronous one."""
    decision, stable_until = app.forward_auth.decide_cached(attrs)
    later = await app.pipeline.decide_after_miss(attrs, DOOR) if decision is None else None
    return decision, stable_until, later


def _bytes(decision: Decision | None, attrs: RequestAttributes) -> bytes | None:
    return None if decision is None else _answer(decision, True, attrs.headers)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"edge_cache": EdgeCacheSettings(max_age_seconds=30)}, id="no-policies"),
        pytest.param({"policies": POLICIES}, id="policies"),
        pytest.param(  # a mapped claim: a value too long for a header refuses the token after its signature check
            {
                "upstream": UpstreamConfig(
                    headers=(HeaderMapping(header="x-authenticated-team", claim="team"),), max_value_bytes=256
                )
            },
            id="mapped-claim",
        ),
    ],
)
async def test_the_fused_path_answers_audits_counts_and_caches_as_the_general_path(
    options: dict[str, Any], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="verifier.audit")
    async with _two_verifiers(**options) as (fused, general, idp):
        taken: list[bool] = []  # per call of the fused path: whether it answered (else the general path did)
        original = Pipeline._first_seen_jwt

        def spy(self: Pipeline, *args: Any) -> Decision | None:
            answer = original(self, *args)
            taken.append(answer is not pipeline_module._GENERAL)
            return answer

        monkeypatch.setattr(Pipeline, "_first_seen_jwt", spy)
        answered = 0
        for what, authorization, path in _authorizations(idp):
            attrs = _attrs(authorization, path)
            results = []
            for app in (fused, general):
                caplog.clear()
                calls = len(taken)
                decision, stable_until, later = await _decide(app, attrs)
                results.append(
                    (
                        decision,
                        stable_until,
                        _bytes(decision, attrs),
                        later,
                        _bytes(later, attrs),
                        _audit_lines(caplog.records),
                        _counts(app),
                        _held(app.pipeline),
                    )
                )
                if app is general:
                    assert len(taken) == calls, what  # the general verifier never takes the fused path
                elif taken[calls:] == [True]:
                    answered += 1
            assert results[0] == results[1], what
        # The fused path answered every first sight of `Bearer <JWS>` above (the rest went to the general one).
        assert answered == 32
        assert fused.metrics._hot.signatures  # and the comparisons above compared signature checks


def _kidless(claims: dict[str, Any], private: Any, alg: str = "ES256") -> str:
    """A token with no `kid` header at all, signed by `private`."""
    return jwt.encode(claims, private, algorithm=alg, headers={"typ": "at+jwt"})


async def test_the_fused_path_agrees_on_tokens_without_kid_in_a_rotation_overlap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The provider publishes a second ES256 key (its new signing key) beside the old one: tokens without a kid
    signed by either are taken, by both paths alike, and the audit line names the kid of the key that verified."""
    caplog.set_level(logging.INFO, logger="verifier.audit")
    async with _two_verifiers() as (fused, general, idp):
        old_kid, old = idp._keys["ES256"]
        new = ec.generate_private_key(ec.SECP256R1())
        public = json.loads(jwt.get_algorithm_by_name("ES256").to_jwk(new.public_key()))
        new_jwk = {**public, "kid": "new", "use": "sig"}
        idp._jwks = {"keys": [*idp.jwks()["keys"], new_jwk]}
        for app in (fused, general):
            await app.keys.issuers[idp.issuer].refresh()
        claims = _claims(idp)
        cases = [
            ("old key", _kidless(claims, old), old_kid),
            ("new key", _kidless({**claims, "sub": "u2"}, new), "new"),
            ("new key again: tried first", _kidless({**claims, "sub": "u3"}, new), "new"),
            ("RS256: one key fits", _kidless(claims, idp._keys["RS256"][1], "RS256"), idp._keys["RS256"][0]),
            ("forged", _forged(_kidless({**claims, "sub": "u4"}, new)), None),
            ("a key not published", _kidless(claims, ec.generate_private_key(ec.SECP256R1())), None),
        ]
        for what, token, verified_by in cases:
            attrs = _attrs(f"Bearer {token}")
            results = []
            for app in (fused, general):
                caplog.clear()
                decision, stable_until, later = await _decide(app, attrs)
                lines = _audit_lines(caplog.records)
                answer = _bytes(decision, attrs)
                results.append((decision, stable_until, answer, later, lines, _counts(app), _held(app.pipeline)))
            assert results[0] == results[1], what
            decision, lines = results[0][0], results[0][4]
            assert decision is not None, what  # held keys: answered without I/O
            assert decision.allowed == (verified_by is not None), (what, decision)
            assert [line.get("kid") for line in lines] == [verified_by], what
            if verified_by is None:
                assert decision.reason == "signature_invalid", what
