"""Decisions the gateway may reuse, end to end: real nginx + the Lua plugin + the REAL verifier + a real issuer.

Chain under test: client -> nginx running kong/plugins/edge-verifier (under the PDK shim of
tests/kong/conftest.py) -> `python -m verifier serve` (forward-auth door, `edge_cache` configured) ->
keys from verifier.devidp.DevIdentityProvider (discovery + JWKS over HTTP) -> echo upstream.

How often the verifier was asked is read from its own `verifier_decisions_total{door="forward_auth"}`,
so "served from the plugin's cache" means "the verifier never heard of it".
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from gateways import GatewayProcess, start_verifier
from support import b64url

from verifier.binding.dpop import thumbprint
from verifier.devidp import DevIdentityProvider

pytestmark = pytest.mark.integration

#: The edge_cache section every reuse test runs with (the issue's example values, seconds).
EDGE_CACHE = {"max_age_seconds": 10, "refusal_max_age_seconds": 5}
#: A token this close to its exp shows that reuse stops at exp, not at the ceiling (seconds): long enough for
#: a loaded machine to send the repeats within one reuse (max-age is the whole seconds left, floored).
SHORT_LIFE_S = 6
#: The reuse ceiling beside that token: far beyond its exp, so only exp can end the reuse (seconds).
FAR_CEILING_S = 300
#: Requests sent with one credential when counting how many reached the verifier.
REPEATS = 5
#: Distinct garbage tokens sent to a plugin whose cache holds CACHE_ENTRIES answers.
FLOOD = 60
CACHE_ENTRIES = 8
#: The forward-auth door's decision counter in the verifier's Prometheus text.
DECISIONS = re.compile(r"^verifier_decisions_total\{([^}]*)\}\s+([0-9.eE+-]+)$", re.MULTILINE)
#: The host the client names; the port is nginx's own, as a client would send it. The plugin sends
#: X-Forwarded-Host without a port and X-Forwarded-Port apart; the verifier joins them for DPoP's htu.
HOST = "127.0.0.1"


# --------------------------------------------------------------------------- servers


class _ThreadedIdp:
    """DevIdentityProvider served from its own event loop on a daemon thread (port picked by the kernel)."""

    def __init__(self) -> None:
        self.idp = DevIdentityProvider(port=0)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="devidp", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.idp.start(), self._loop).result(timeout=10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.idp.stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def idp() -> Iterator[DevIdentityProvider]:
    served = _ThreadedIdp()
    yield served.idp
    served.stop()


@pytest.fixture(scope="module")
def start_real_verifier(idp: DevIdentityProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """start_real_verifier(extra_config) -> a verifier trusting the dev issuer, leeway 0 (exp is exp)."""
    started: list[GatewayProcess] = []

    def start(extra_config: dict[str, Any]) -> GatewayProcess:
        v = start_verifier(
            tmp_path_factory.mktemp("verifier"), issuer=idp.issuer, leeway_seconds=0, extra_config=extra_config
        )
        started.append(v)
        return v

    yield start
    for v in started:
        v.stop()


@pytest.fixture(scope="module")
def verifier(start_real_verifier: Any) -> GatewayProcess:
    return start_real_verifier({"edge_cache": EDGE_CACHE})


# --------------------------------------------------------------------------- helpers


def forward_auth_url(v: GatewayProcess) -> str:
    return f"{v.url}/v1/forward-auth"


def call(base: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One GET through nginx; header names lower-cased, repeated headers joined with ", "."""
    port = int(base.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": f"{HOST}:{port}", **(headers or {})})
        r = conn.getresponse()
        merged: dict[str, str] = {}
        for k, v in r.getheaders():
            merged[k.lower()] = f"{merged[k.lower()]}, {v}" if k.lower() in merged else v
        return r.status, merged, r.read()
    finally:
        conn.close()


def asked(v: GatewayProcess) -> float:
    """verifier_decisions_total{door="forward_auth"} summed over outcome and reason."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{v.extra['metrics_port']}/metrics", timeout=5).read().decode()
    return sum(float(value) for labels, value in DECISIONS.findall(text) if 'door="forward_auth"' in labels)


def shim_cache(base: str) -> dict[str, Any]:
    """The plugin's decision-cache counters in nginx's one worker (GET /__shim/cache)."""
    return json.loads(urllib.request.urlopen(f"{base}/__shim/cache", timeout=5).read())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def dpop_proof(key: ec.EllipticCurvePrivateKey, method: str, url: str, token: str) -> str:
    """An RFC 9449 proof for one request (fresh jti), bound to `token` by `ath`."""
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    claims = {
        "jti": uuid.uuid4().hex,
        "htm": method,
        "htu": url,
        "iat": int(time.time()),
        "ath": b64url(hashlib.sha256(token.encode()).digest()),
    }
    return jwt.encode(claims, key, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": public})


def webauthn_challenge(www_authenticate: str) -> str:
    """The challenge parameter of the `WebAuthn` scheme in a WWW-Authenticate value."""
    found = re.search(r'^WebAuthn .*\bchallenge="([^"]+)"', www_authenticate)
    assert found, www_authenticate
    return found.group(1)


# --------------------------------------------------------------------------- reuse bounded by the token


def test_a_token_with_seconds_left_is_reused_while_valid_and_never_after_it_expires(
    start_nginx, echo_upstream, start_real_verifier, idp
):
    verifier = start_real_verifier({"edge_cache": {**EDGE_CACHE, "max_age_seconds": FAR_CEILING_S}})
    base = start_nginx({"url": forward_auth_url(verifier)}, echo_upstream, with_sha256=True)
    exp = int(time.time()) + SHORT_LIFE_S
    token = idp.mint(claims={"exp": exp})
    path = "/api/short-lived"

    before = asked(verifier)
    statuses = [call(base, path, bearer(token))[0] for _ in range(REPEATS)]
    assert statuses == [200] * REPEATS
    assert asked(verifier) - before == 1  # the rest came from the plugin's cache
    assert time.time() < exp, "the machine was too slow to send the repeats within the token's life"

    time.sleep(max(0.0, exp - time.time()) + 1.2)  # past exp (leeway 0), and past any max-age it was given
    status, headers, body = call(base, path, bearer(token))

    assert status == 401
    assert 'error="invalid_token"' in headers["www-authenticate"]
    assert json.loads(body)["error"] == "invalid_token"
    assert asked(verifier) - before == 2  # the refusal came from the verifier, not a stale allow


def test_a_recent_login_route_is_reused_while_the_login_is_recent_and_never_after_it_ages_out(
    start_nginx, echo_upstream, start_real_verifier, idp
):
    """`max_auth_age_seconds` bounds the plugin's reuse as `exp` does: the allow's max-age is cut to what is left of
    the login, and the request after that gets the RFC 9470 challenge from the verifier, not the cached pass. A login
    in the future (`auth_time` ahead of the clock, leeway 0) is refused, never cached as an allow."""
    age = 60
    policies = [{"name": "recent", "match": {"path_prefix": "/"}, "require": {"max_auth_age_seconds": age}}]
    verifier = start_real_verifier(
        {"edge_cache": {**EDGE_CACHE, "max_age_seconds": FAR_CEILING_S}, "policies": policies}
    )
    base = start_nginx({"url": forward_auth_url(verifier)}, echo_upstream, with_sha256=True)
    path = "/api/recent-login"
    ahead = idp.mint(claims={"auth_time": int(time.time()) + 3600})
    assert [call(base, path, bearer(ahead))[0] for _ in range(2)] == [401, 401]

    ends = int(time.time()) + SHORT_LIFE_S  # auth_time + age: the login ages out SHORT_LIFE_S from now
    token = idp.mint(claims={"auth_time": ends - age})
    before = asked(verifier)
    statuses = [call(base, path, bearer(token))[0] for _ in range(REPEATS)]
    assert statuses == [200] * REPEATS
    assert asked(verifier) - before == 1  # the rest came from the plugin's cache
    assert time.time() < ends, "the machine was too slow to send the repeats within the login's age"

    time.sleep(max(0.0, ends - time.time()) + 1.2)  # past the login's age, and past any max-age it was given
    status, headers, body = call(base, path, bearer(token))

    assert status == 401
    assert 'error="insufficient_user_authentication"' in headers["www-authenticate"]
    assert f"max_age={age}" in headers["www-authenticate"]
    assert json.loads(body)["error"] == "insufficient_user_authentication"
    assert asked(verifier) - before == 2  # the refusal came from the verifier, not a stale allow


def test_max_age_zero_sends_every_request_to_the_verifier(start_nginx, echo_upstream, start_real_verifier, idp):
    v = start_real_verifier({"edge_cache": {"max_age_seconds": 0, "refusal_max_age_seconds": 5}})
    base = start_nginx({"url": forward_auth_url(v)}, echo_upstream, with_sha256=True)
    token = idp.mint()

    before = asked(v)
    statuses = [call(base, "/api/no-reuse", bearer(token))[0] for _ in range(REPEATS)]

    assert statuses == [200] * REPEATS
    assert asked(v) - before == REPEATS
    assert shim_cache(base)["stores"] == 0


# --------------------------------------------------------------------------- per-request checks, cache on


def test_a_replayed_dpop_proof_is_refused_with_reuse_on(start_nginx, echo_upstream, verifier, idp):
    base = start_nginx({"url": forward_auth_url(verifier)}, echo_upstream, with_sha256=True)
    key = ec.generate_private_key(ec.SECP256R1())
    jkt = thumbprint(json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())))
    token = idp.mint(claims={"cnf": {"jkt": jkt}})
    path = "/api/dpop"
    url = f"http://{HOST}:{base.rsplit(':', 1)[1]}{path}"  # the URL the client used, port included
    proof = dpop_proof(key, "GET", url, token)
    auth = {"Authorization": f"DPoP {token}", "DPoP": proof}

    before = asked(verifier)
    first, _, _ = call(base, path, auth)
    replay, headers, _ = call(base, path, auth)
    fresh, _, _ = call(base, path, {**auth, "DPoP": dpop_proof(key, "GET", url, token)})

    assert first == 200
    assert replay == 401
    assert headers["www-authenticate"].startswith("DPoP ")
    assert 'error="invalid_dpop_proof"' in headers["www-authenticate"]
    assert fresh == 200
    assert asked(verifier) - before == 3  # every proof was checked by the verifier


def test_a_step_up_route_asks_for_a_fresh_assertion_every_time_with_reuse_on(
    start_nginx, echo_upstream, start_real_verifier, idp, tmp_path
):
    v = start_real_verifier(
        {
            "edge_cache": EDGE_CACHE,
            "policies": [
                {"name": "pay", "match": {"path_prefix": "/pay"}, "require": {"step_up": "webauthn"}},
                {"name": "rest", "match": {"path_prefix": "/"}},
            ],
            "webauthn": {
                "rp_id": "localhost",
                "rp_name": "x",
                "origins": ["http://localhost:1"],
                "storage": {"sqlite_path": str(tmp_path / "webauthn.sqlite3")},  # not the default, in the cwd
            },
        }
    )
    base = start_nginx({"url": forward_auth_url(v)}, echo_upstream, with_sha256=True)
    token = idp.mint()

    before = asked(v)
    answers = [call(base, "/pay/invoice", bearer(token)) for _ in range(3)]

    assert [status for status, _, _ in answers] == [401] * 3
    challenges = [webauthn_challenge(headers["www-authenticate"]) for _, headers, _ in answers]
    assert len(set(challenges)) == 3, challenges
    assert asked(v) - before == 3
    # the same token elsewhere is an ordinary, reusable allow
    assert [call(base, "/other", bearer(token))[0] for _ in range(3)] == [200] * 3
    assert asked(v) - before == 4


def test_a_rate_limit_counts_every_request_with_reuse_on(start_nginx, echo_upstream, start_real_verifier, idp):
    v = start_real_verifier({"edge_cache": EDGE_CACHE, "rate_limits": {"default": {"per_second": 0.001, "burst": 3}}})
    base = start_nginx({"url": forward_auth_url(v)}, echo_upstream, with_sha256=True)
    token = idp.mint()

    statuses = [call(base, "/api/limited", bearer(token))[0] for _ in range(4)]

    assert statuses == [200, 200, 200, 429]


# --------------------------------------------------------------------------- garbage floods


def test_a_flood_of_one_garbage_token_reaches_the_verifier_once_per_refusal_window(
    start_nginx, echo_upstream, verifier
):
    base = start_nginx({"url": forward_auth_url(verifier)}, echo_upstream, with_sha256=True)
    garbage = bearer("not.a.jwt-" + uuid.uuid4().hex)
    window = EDGE_CACHE["refusal_max_age_seconds"]

    before = asked(verifier)
    started = time.monotonic()
    first = [call(base, "/api/flood", garbage)[0] for _ in range(20)]
    assert time.monotonic() - started < window, "the flood took longer than one reuse window"
    assert first == [401] * 20
    assert asked(verifier) - before == 1

    time.sleep(window + 0.5)  # the reuse window is over: the next one is asked again, once
    again = [call(base, "/api/flood", garbage)[0] for _ in range(10)]
    assert again == [401] * 10
    assert asked(verifier) - before == 2


def test_a_flood_of_distinct_garbage_tokens_does_not_grow_the_cache_past_cache_entries(
    start_nginx, echo_upstream, verifier
):
    base = start_nginx(
        {"url": forward_auth_url(verifier), "cache_entries": CACHE_ENTRIES}, echo_upstream, with_sha256=True
    )
    tokens = [f"garbage-{i}.{uuid.uuid4().hex}.x" for i in range(FLOOD)]

    before = asked(verifier)
    assert {call(base, "/api/flood-many", bearer(t))[0] for t in tokens} == {401}
    stats = shim_cache(base)

    assert asked(verifier) - before == FLOOD  # distinct tokens: nothing to reuse
    assert stats["stores"] == FLOOD
    assert stats["entries"] <= CACHE_ENTRIES, stats
    # the oldest refusals were evicted: the first token is asked about again, the last is not
    assert call(base, "/api/flood-many", bearer(tokens[0]))[0] == 401
    assert asked(verifier) - before == FLOOD + 1
    assert call(base, "/api/flood-many", bearer(tokens[-1]))[0] == 401
    assert asked(verifier) - before == FLOOD + 1


def test_the_verifiers_nginx_cache_header_is_never_relayed_to_the_client(start_nginx, echo_upstream, verifier):
    # X-Accel-Expires is for an nginx auth cache (deploy/nginx); relayed, an nginx cache in front of Kong
    # would honour it over `Cache-Control: private` and serve one client's refusal to others.
    base = start_nginx({"url": forward_auth_url(verifier)}, echo_upstream, with_sha256=True)
    for token in ("not.a.jwt-" + uuid.uuid4().hex, "x"):
        status, headers, _ = call(base, "/api/accel", bearer(token))
        assert status == 401
        assert not any(name.lower().startswith("x-accel") for name in headers), headers
