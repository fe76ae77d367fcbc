"""Issue #23: the shipped gateway configurations reuse the verifier's forward-auth answer for exactly the
lifetime the verifier chose, keyed by the credentials and the request judged: nginx's auth cache
(deploy/nginx/nginx.conf.template, `X-Accel-Expires`), nginx's Lua variant (deploy/nginx/nginx-lua.conf.template
with verifier-reuse.lua, `Cache-Control`) and Envoy's Lua filter (deploy/envoy/envoy-reuse.yaml.template with
verifier-reuse.lua, `Cache-Control`).

Real nginx and real Envoy (the rendered templates) in front of the REAL verifier; a verifier call is counted by
its own `verifier_decisions_total{door="forward_auth"}`. Every test sends tokens no other test sends, so a
gateway's cache never carries an answer from one test into another.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from support import b64url

from verifier.binding.dpop import thumbprint

if __package__:
    from .gateways import (
        ENVOY_REUSE_LUA,
        LOOPBACK,
        NGINX_REUSE_LUA,
        EchoUpstream,
        GatewayProcess,
        HttpResult,
        LocalIssuer,
        http_request,
        kill_switch,
        start_envoy,
        start_gateway_for,
        start_nginx,
        start_verifier,
    )
    from .replicas import dpop_proof, forward_auth_decisions, public_jwk
else:  # tests/ is not a package: pytest put this directory on sys.path
    from gateways import (
        ENVOY_REUSE_LUA,
        LOOPBACK,
        NGINX_REUSE_LUA,
        EchoUpstream,
        GatewayProcess,
        HttpResult,
        LocalIssuer,
        http_request,
        kill_switch,
        start_envoy,
        start_gateway_for,
        start_nginx,
        start_verifier,
    )
    from replicas import dpop_proof, forward_auth_decisions, public_jwk

pytestmark = pytest.mark.integration

#: The Lua filter's bound (MAX_ENTRIES in deploy/envoy/verifier-reuse.lua) and the flood's parallelism
MAX_ENTRIES = 10_000
FLOOD_THREADS = 8
FLOOD_RETRIES = 20  # a credential answered 503 (shed, timed out) is sent again at most this often
#: Junk credentials flooding nginx's Lua variant: 4,000 of 3,000 bytes are more than its 10 MiB dict holds
NGINX_FLOOD, NGINX_JUNK_BYTES = 4_000, 3_000
#: Junk credentials flooding Envoy's Lua filter: 2,000 of 12 KiB (under its 16 KiB key limit) are 24 MiB of keys, more
#: than its byte bound (MAX_BYTES, 20 MiB) though far fewer answers than MAX_ENTRIES
ENVOY_FLOOD, ENVOY_JUNK_BYTES = 2_000, 12 * 1024
RATE_BURST = 3
MAX_AGE = 2  # edge_cache.max_age_seconds and refusal_max_age_seconds: short, so expiry is observable
# Seconds a stored answer is reused at least (nginx counts whole seconds): requests spread over longer than this by
# a stalled runner may rightly be asked again, so the reuse is then measured again with a new token, at most
# ATTEMPTS times in all; a gateway that does not reuse asks again within milliseconds, every time.
SHORTEST_REUSE = MAX_AGE - 1
ATTEMPTS = 3
ADMIN_TOKEN = "an-admin-secret-for-the-reuse-tests-0123"
ADMIN_HOST = "admin.example.test"
AUTH_AGE = 60  # the `recent` policy's max_auth_age_seconds
POLICIES = [
    {"name": "admin-host", "match": {"hosts": [ADMIN_HOST]}, "require": {"roles_any": ["admin"]}},
    {"name": "admin", "match": {"path_prefix": "/admin"}, "require": {"roles_any": ["admin"]}},
    {"name": "writes", "match": {"methods": ["POST", "PUT", "PATCH", "DELETE"]}, "require": {"scopes_all": ["write"]}},
    {"name": "recent", "match": {"path_prefix": "/recent"}, "require": {"max_auth_age_seconds": AUTH_AGE}},
    {"name": "rest", "match": {"path_prefix": "/"}, "require": {"authenticated": True}},
]


@pytest.fixture(scope="module")
def verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VERIFIER_ADMIN_TOKEN", ADMIN_TOKEN)
        proc = start_verifier(
            tmp_path_factory.mktemp("verifier"),
            issuer=issuer.issuer,
            extra_config={
                "policies": POLICIES,
                "edge_cache": {"max_age_seconds": MAX_AGE, "refusal_max_age_seconds": MAX_AGE},
                "revocation": {"transmitters": []},  # the kill switch alone
                # the header a gateway overwrites with the client certificate's thumbprint: every shipped one
                # clears the client's (none terminates mTLS), so a client naming a certificate must never pass
                "mtls_thumbprint_header": "x-client-cert-thumbprint",
            },
        )
    yield proc
    proc.stop()


@pytest.fixture(scope="module", params=["nginx", "nginx-lua", "envoy"])
def gateway(
    request: pytest.FixtureRequest,
    verifier: GatewayProcess,
    upstream: EchoUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """The shipped reusing configurations: nginx's auth cache, nginx with deploy/nginx/verifier-reuse.lua, and
    Envoy with deploy/envoy/verifier-reuse.lua."""
    kind = "envoy-reuse" if request.param == "envoy" else request.param
    gw = start_gateway_for(kind, tmp_path_factory.mktemp(request.param), verifier, upstream.port)
    yield gw.url
    gw.stop()


def token(issuer: LocalIssuer, scope: str = "read", **claims: object) -> str:
    """A token no other request of the module carries (its own subject and jti)."""
    return issuer.mint(sub=f"user-{uuid.uuid4().hex[:8]}", scope=scope, jti=uuid.uuid4().hex, **claims)


def get(url: str, path: str, tok: str, *, method: str = "GET", host: str = "", scheme: str = "Bearer") -> HttpResult:
    headers = {"Authorization": f"{scheme} {tok}"}
    if host:
        headers["Host"] = host
    return http_request(url + path, method=method, headers=headers)


def asked(verifier: GatewayProcess) -> int:
    """How many forward-auth answers the verifier has given so far."""
    return forward_auth_decisions(verifier)


def test_a_repeated_token_is_answered_by_the_gateway_within_max_age_and_asked_again_after(
    gateway: str, verifier: GatewayProcess, issuer: LocalIssuer, upstream: EchoUpstream
) -> None:
    for _ in range(ATTEMPTS):
        tok, before = token(issuer), asked(verifier)
        upstream.clear()
        first = time.monotonic()
        statuses = [get(gateway, "/orders", tok).status]
        stored = time.monotonic()  # the answer was stored by now: its max-age runs out by stored + MAX_AGE
        statuses += [get(gateway, "/orders", tok).status for _ in range(3)]
        reused_for = time.monotonic() - stored
        assert statuses == [200] * 4
        if asked(verifier) - before == 1:
            break
        assert reused_for >= SHORTEST_REUSE, "the gateway asked again within the answer's max-age"
        # a stalled runner took the three requests past the shortest reuse: the gateway was right to ask again
    else:
        raise AssertionError(f"{ATTEMPTS} attempts stalled past the shortest reuse")
    # A cache hit still hands the upstream the verifier's identity, never nothing.
    assert [seen.headers.get("x-authenticated-userid") for seen in upstream.requests] == [
        json.loads(_payload(tok))["sub"]
    ] * 4

    # Asked again once the verifier's max-age is over: not later (nor much sooner). A request counts by
    # when it was sent (a slow machine may take long to answer one the gateway judged in time).
    sent = first
    while asked(verifier) - before == 1:
        assert sent - stored <= MAX_AGE + 0.3, "gateway reused the answer beyond its max-age"
        time.sleep(0.05)
        sent = time.monotonic()
        assert get(gateway, "/orders", tok).status == 200
    assert time.monotonic() - first >= SHORTEST_REUSE


def test_an_answer_fetched_again_after_max_age_is_reused_again(
    gateway: str, verifier: GatewayProcess, issuer: LocalIssuer
) -> None:
    """The second window reuses the new answer: nginx keeps a reused answer's file open between hits
    (open_file_cache), and must read the file refetched after expiry (a new inode), not the expired one
    it still holds, which would send every request to the verifier until the descriptor went stale."""
    for _ in range(ATTEMPTS):
        tok, before = token(issuer), asked(verifier)
        assert get(gateway, "/orders", tok).status == 200
        deadline = time.monotonic() + MAX_AGE + 1.5
        while True:  # a request counts by when it was sent, as above
            time.sleep(0.05)
            sent = time.monotonic()
            assert get(gateway, "/orders", tok).status == 200
            if asked(verifier) - before != 1:
                break
            assert sent < deadline, "the answer was never asked for again"
        refetched = time.monotonic()
        assert asked(verifier) - before == 2
        assert [get(gateway, "/orders", tok).status for _ in range(4)] == [200] * 4
        reused_for = time.monotonic() - refetched
        if asked(verifier) - before == 2:
            return
        assert reused_for >= SHORTEST_REUSE, "the refetched answer was not reused"
    raise AssertionError(f"{ATTEMPTS} attempts stalled past the shortest reuse")


def test_the_cache_header_never_reaches_the_client_or_the_upstream(
    gateway: str, issuer: LocalIssuer, upstream: EchoUpstream
) -> None:
    tok = token(issuer)
    upstream.clear()
    answers = [get(gateway, "/orders", tok), get(gateway, "/orders", tok), get(gateway, "/orders", "garbage")]

    assert [a.status for a in answers] == [200, 200, 401]
    for answer in answers:
        assert not any(name.startswith("x-accel") for name in answer.headers), answer.headers
    for seen in upstream.requests:
        assert not any(name.lower().startswith("x-accel") for name in seen.headers), seen.headers


def test_a_dpop_proof_replayed_within_max_age_is_refused_not_served_from_the_cache(
    gateway: str, verifier: GatewayProcess, issuer: LocalIssuer
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    tok = token(issuer, cnf={"jkt": thumbprint(public_jwk(key))})
    proof = dpop_proof(key, "GET", f"{gateway}/orders", tok)
    headers = {"Authorization": f"DPoP {tok}", "DPoP": proof}
    before = asked(verifier)

    first = http_request(f"{gateway}/orders", headers=headers)
    replayed = http_request(f"{gateway}/orders", headers=headers)

    assert first.status == 200, first.body
    assert replayed.status == 401, "a captured DPoP request replayed through gateway's cache"
    assert asked(verifier) - before == 2


def _proof_as_written(key: ec.EllipticCurvePrivateKey, claims: bytes) -> str:
    """A DPoP proof whose claims are `claims` byte for byte (pyjwt would rewrite them), signed by the client's key."""
    header = json.dumps({"typ": "dpop+jwt", "alg": "ES256", "jwk": public_jwk(key)}).encode()
    signing_input = f"{b64url(header)}.{b64url(claims)}"
    return f"{signing_input}.{b64url(ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode(), key))}"


@pytest.mark.parametrize("written", ["htu-elsewhere-first", "htu-elsewhere-last", "utf-16"])
def test_a_dpop_proof_that_reads_two_ways_is_refused_through_the_gateway(
    gateway: str, verifier: GatewayProcess, issuer: LocalIssuer, written: str
) -> None:
    """RFC 8259 / RFC 9449: a proof naming `htu` twice (a WAF or an upstream checking DPoP reads the first, json.loads
    the last), or in UTF-16, signed by the token's own key, is 401 invalid_dpop_proof through the shipped gateway."""
    key = ec.generate_private_key(ec.SECP256R1())
    tok = token(issuer, cnf={"jkt": thumbprint(public_jwk(key))})
    claims = json.loads(base64.urlsafe_b64decode(dpop_proof(key, "GET", f"{gateway}/orders", tok).split(".")[1] + "=="))
    members = json.dumps(claims)[1:-1]
    elsewhere = f'"htu": "{gateway}/admin/elsewhere"'
    raw = {
        "htu-elsewhere-first": f"{{{elsewhere}, {members}}}".encode(),
        "htu-elsewhere-last": f"{{{members}, {elsewhere}}}".encode(),
        "utf-16": f"{{{members}}}".encode("utf-16"),
    }[written]
    answer = http_request(
        f"{gateway}/orders", headers={"Authorization": f"DPoP {tok}", "DPoP": _proof_as_written(key, raw)}
    )
    assert answer.status == 401, (answer.status, answer.body)
    assert 'error="invalid_dpop_proof"' in answer.headers.get("www-authenticate", ""), answer.headers
    fresh = dpop_proof(key, "GET", f"{gateway}/orders", tok)  # the same token and key with a proof read one way
    assert http_request(f"{gateway}/orders", headers={"Authorization": f"DPoP {tok}", "DPoP": fresh}).status == 200


@pytest.mark.parametrize("header", ["DPoP", "X-WebAuthn-Assertion"])
def test_a_cached_allow_is_never_served_to_a_request_adding_a_proof_header(
    gateway: str, verifier: GatewayProcess, issuer: LocalIssuer, header: str
) -> None:
    """The same token and request plus a DPoP proof or a WebAuthn assertion is another question (the proof
    is part of the key): the verifier judges it, the gateway never answers it from the cached allow."""
    tok = token(issuer)
    assert [get(gateway, "/orders", tok).status for _ in range(2)] == [200, 200]
    before = asked(verifier)

    http_request(f"{gateway}/orders", headers={"Authorization": f"Bearer {tok}", header: "not-a-proof"})
    assert asked(verifier) - before == 1


@pytest.fixture(scope="module")
def limited_verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A verifier allowing each identity a burst of RATE_BURST requests (then one per 100 s)."""
    proc = start_verifier(
        tmp_path_factory.mktemp("verifier-limited"),
        issuer=issuer.issuer,
        extra_config={
            "edge_cache": {"max_age_seconds": 300},
            "rate_limits": {"default": {"per_second": 0.01, "burst": RATE_BURST}},
        },
    )
    yield proc
    proc.stop()


def test_an_allow_is_not_reused_past_the_authentication_age(
    gateway: str, verifier: GatewayProcess, issuer: LocalIssuer
) -> None:
    """A route's `max_auth_age_seconds` ends the gateway's reuse of an allow when the login ages out (the answer's
    max-age is cut to what is left of it): a request sent after that is refused with the step-up challenge, never
    served the cached pass. And a login in the future (`auth_time` ahead beyond the leeway) is refused outright: it
    was allowed, and reused for the whole max-age on every request until that time."""
    ahead = token(issuer, auth_time=int(time.time()) + 86_400)
    assert [get(gateway, "/recent", ahead).status for _ in range(2)] == [401, 401]
    for left in (0.8, 1.8):  # the login ages out inside the MAX_AGE reuse: the answer no-store, then max-age 1
        auth_time = time.time() - AUTH_AGE + left
        tok = token(issuer, auth_time=auth_time)
        assert get(gateway, "/recent", tok).status == 200
        ends = auth_time + AUTH_AGE
        seen: list[tuple[float, int]] = []
        while time.time() < ends + 1.5:
            sent = time.time()
            answer = get(gateway, "/recent", tok)
            seen.append((sent - ends, answer.status))
            if sent >= ends + 0.3:  # nginx counts whole seconds: the slack the other reuse tests allow
                assert answer.status == 401, f"a cached allow served {sent - ends:.2f} s after the login aged out"
                assert "insufficient_user_authentication" in answer.headers.get("www-authenticate", "")
            time.sleep(0.05)
        assert seen[-1][1] == 401, seen


@pytest.mark.parametrize("name", ["nginx", "nginx-lua", "envoy"])
def test_a_rate_limited_identity_is_counted_on_every_request(
    name: str,
    limited_verifier: GatewayProcess,
    issuer: LocalIssuer,
    upstream: EchoUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """With a rate limit each allow is no-store (the bucket counts gateway requests): no gateway reuses one,
    so the request past the burst is refused, not served the cached allow."""
    port, work = limited_verifier.extra["http_port"], tmp_path_factory.mktemp(f"{name}-limited")
    if name.startswith("nginx"):
        gw = start_nginx(work, port, upstream.port, lua=name == "nginx-lua")
    else:
        gw = start_envoy(work, "reuse", verifier_http_port=port, upstream_port=upstream.port)
    tok, before = token(issuer), asked(limited_verifier)
    try:
        statuses = [get(gw.url, "/orders", tok).status for _ in range(RATE_BURST + 2)]
    finally:
        gw.stop()
    assert statuses == [200] * RATE_BURST + [429] * 2  # nginx.conf.template's too (X-Verifier-Reason: rate_limited)
    assert asked(limited_verifier) - before == RATE_BURST + 2


@pytest.mark.parametrize("name", ["nginx", "nginx-lua", "envoy"])
def test_a_cached_allow_is_never_served_stale_once_the_verifier_is_gone(
    name: str, issuer: LocalIssuer, upstream: EchoUpstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Past its max-age an allow is dead, whether or not the verifier can be asked again: with the verifier gone
    (stopped, unreachable), a request for the answer it gave is the gateway's fail-closed 503, never the stale pass
    (what nginx's proxy_cache_use_stale or a "serve stale on error" would make of it: a revoked token passing for as
    long as the verifier is down)."""
    work = tmp_path_factory.mktemp(f"{name}-stale")
    proc = start_verifier(work, issuer=issuer.issuer, extra_config={"edge_cache": {"max_age_seconds": MAX_AGE}})
    kind = "envoy-reuse" if name == "envoy" else name
    try:
        gw = start_gateway_for(kind, work, proc, upstream.port)
        try:
            for _ in range(ATTEMPTS):
                tok, before = token(issuer), asked(proc)
                assert get(gw.url, "/orders", tok).status == 200
                stored = time.monotonic()  # the answer's max-age ends by stored + MAX_AGE
                assert get(gw.url, "/orders", tok).status == 200
                if asked(proc) - before == 1:
                    break  # the second came from the gateway's cache
                assert time.monotonic() - stored >= SHORTEST_REUSE, "the gateway asked again within the max-age"
            else:
                raise AssertionError(f"{ATTEMPTS} attempts stalled past the shortest reuse")
            proc.stop()
            time.sleep(max(0.0, stored + MAX_AGE + 0.3 - time.monotonic()))
            upstream.clear()

            answers = [get(gw.url, "/orders", tok) for _ in range(3)]
        finally:
            gw.stop()
    finally:
        proc.stop()
    assert [(a.status, a.headers.get("retry-after")) for a in answers] == [(503, "1")] * 3, answers
    assert upstream.requests == []


def test_a_no_store_refusal_is_never_reused(gateway: str, verifier: GatewayProcess, issuer: LocalIssuer) -> None:
    tok = token(issuer)
    _revoke(verifier, issuer, tok)  # a revoked token's refusal is no-store: revocation may be lifted
    before = asked(verifier)

    assert [get(gateway, "/orders", tok).status for _ in range(3)] == [401] * 3
    assert asked(verifier) - before == 3


def test_a_token_revoked_by_the_kill_switch_is_refused_by_the_gateway_within_max_age(
    gateway: str, verifier: GatewayProcess, issuer: LocalIssuer
) -> None:
    tok = token(issuer)
    assert get(gateway, "/orders", tok).status == 200  # now in gateway's cache
    _revoke(verifier, issuer, tok)
    revoked_at = time.monotonic()

    sent = time.monotonic()
    while get(gateway, "/orders", tok).status == 200:  # a request counts by when it was sent
        assert sent - revoked_at <= MAX_AGE + 0.5, "gateway kept serving a revoked token"
        time.sleep(0.1)
        sent = time.monotonic()
    assert get(gateway, "/orders", tok).status == 401


def test_a_token_revoked_by_its_jwt_id_or_client_is_refused_by_the_gateway_within_max_age(
    gateway: str, verifier: GatewayProcess, issuer: LocalIssuer
) -> None:
    """The kill switch's one token (`jwt_id`) and client (`complex` `application`): refused through every reusing
    gateway within max_age, the user's other token and another client's passing."""
    leaked = token(issuer)
    kept = issuer.mint(sub=_sub(leaked), scope="read", jti=uuid.uuid4().hex)
    client = f"svc-{uuid.uuid4().hex[:8]}"
    service = issuer.mint(sub=None, client_id=client, scope="read", jti=uuid.uuid4().hex)
    other = issuer.mint(sub=None, client_id=client + "-b", scope="read", jti=uuid.uuid4().hex)
    assert [get(gateway, "/orders", t).status for t in (leaked, kept, service, other)] == [200] * 4  # now cached
    _kill(verifier, {"format": "jwt_id", "iss": issuer.issuer, "jti": json.loads(_payload(leaked))["jti"]})
    _kill(verifier, {"format": "complex", "application": {"format": "opaque", "id": client}})
    revoked_at = time.monotonic()

    sent = time.monotonic()
    while get(gateway, "/orders", leaked).status == 200 or get(gateway, "/orders", service).status == 200:
        assert sent - revoked_at <= MAX_AGE + 0.5, "gateway kept serving a revoked token"
        time.sleep(0.1)
        sent = time.monotonic()
    assert [get(gateway, "/orders", t).status for t in (leaked, kept, service, other)] == [401, 200, 401, 200]


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (("GET", "/orders", ""), ("POST", "/orders", "")),  # a read-only token may not write
        (("GET", "/orders", ""), ("GET", "/admin/users", "")),  # nor open the admin paths
        (("GET", "/orders", ""), ("GET", "/orders/../admin/users", "")),
        (("GET", "/orders", ""), ("GET", "/orders", ADMIN_HOST)),  # nor the admin host
    ],
    ids=["method", "path", "dot-segments", "host"],
)
def test_the_same_token_on_another_request_is_asked_again(
    gateway: str, verifier: GatewayProcess, issuer: LocalIssuer, first: tuple[str, str, str], then: tuple[str, str, str]
) -> None:
    tok = token(issuer)
    method, path, host = first
    assert get(gateway, path, tok, method=method, host=host).status == 200
    before = asked(verifier)

    method, path, host = then
    refused = get(gateway, path, tok, method=method, host=host)
    # Dot segments: 403 where the gateway resolved them (Envoy), else 400 (upstreams read the raw target under two
    # policies: /admin/users, or /orders/.. to one matching it as sent)
    assert refused.status in ((400, 403) if "/../" in path else (403,)), (gateway, refused.status)
    assert asked(verifier) - before == 1
    # Asked again at once, the refusal is the same whether or not gateway kept it.
    again = get(gateway, path, tok, method=method, host=host)
    assert (again.status, again.headers.get("www-authenticate")) == (
        refused.status,
        refused.headers.get("www-authenticate"),
    )


@pytest.mark.parametrize("spelled", ["/admin/../orders", "/admin/%2e%2e/orders", "/admin/%2E%2E/orders"])
def test_a_target_that_normalizes_to_a_cached_path_never_gets_its_allow_unless_the_upstream_is_sent_that_path(
    gateway: str, verifier: GatewayProcess, issuer: LocalIssuer, upstream: EchoUpstream, spelled: str
) -> None:
    """Raw vs normalized: `/admin/../orders` is `/orders` once resolved, but an upstream reading the target as sent
    serves it under the admin policy. nginx passes the raw target on (its key is `$request_uri`), so it must ask,
    and the verifier refuses the two readings; Envoy resolves it before anything else (`normalize_path`), so its
    upstream gets `/orders`, and the cached allow for `/orders` may serve it. Either way the upstream is only ever
    sent a target the verifier judged: never the raw one on the strength of the normalized one's answer."""
    tok = token(issuer)
    assert get(gateway, "/orders", tok).status == 200  # now cached
    upstream.clear()

    answer = get(gateway, spelled, tok)

    if answer.status == 200:
        assert [seen.path for seen in upstream.requests] == ["/orders"], upstream.requests
    else:
        assert answer.status in (400, 403), (answer.status, answer.body)
        assert upstream.requests == []


def test_the_query_string_is_part_of_the_key(gateway: str, verifier: GatewayProcess, issuer: LocalIssuer) -> None:
    tok = token(issuer)
    before = asked(verifier)
    for path in ("/orders", "/orders?page=2", "/orders?page=3"):
        assert get(gateway, path, tok).status == 200
    assert asked(verifier) - before == 3


def test_another_credential_never_gets_a_cached_allow(gateway: str, issuer: LocalIssuer) -> None:
    victim = token(issuer)
    assert get(gateway, "/orders", victim).status == 200  # the victim's allow is cached

    # Near-misses of the victim's credential must be judged, not served the victim's answer.
    assert get(gateway, "/orders", victim + "x").status == 401
    assert get(gateway, "/orders", victim, scheme="Basic").status == 401
    no_auth = http_request(f"{gateway}/orders", headers={})
    assert no_auth.status == 401


IDENTITY = ("x-authenticated-userid", "x-authenticated-scope", "x-authenticated-roles")
#: What a caller without roles sends on its cache hits: another caller's identity, which must never reach the upstream
SMUGGLED = {"X-Authenticated-Roles": "admin", "X-Authenticated-Scope": "read write admin"}


def test_a_reused_allow_hands_the_upstream_its_own_callers_identity_never_another_nor_a_smuggled_one(
    gateway: str, verifier: GatewayProcess, issuer: LocalIssuer, upstream: EchoUpstream
) -> None:
    """Two callers on the same request, their answers reused in turn: every request reaches the upstream with its
    own caller's X-Authenticated-* (the admin's roles never on the other's), and headers the other sends under the
    identity names (its userid set to the admin's, a role, a scope) on a cache hit are the verifier's values or
    gone, never the client's."""
    for _ in range(ATTEMPTS):
        admin = token(issuer, scope="read write", roles=["admin"])
        plain = token(issuer)
        expected = {
            admin: (_sub(admin), "read write", "admin"),
            plain: (_sub(plain), "read", None),
        }
        before = asked(verifier)
        upstream.clear()
        sent: list[str] = []
        started = time.monotonic()
        for tok in (admin, plain) * 3:
            headers = {"Authorization": f"Bearer {tok}"}
            if tok == plain:
                headers.update(SMUGGLED, **{"X-Authenticated-Userid": _sub(admin)})
            assert http_request(f"{gateway}/orders", headers=headers).status == 200
            sent.append(tok)
        elapsed = time.monotonic() - started
        seen = [tuple(r.headers.get(name) for name in IDENTITY) for r in upstream.requests]
        assert seen == [expected[tok] for tok in sent], "an upstream saw another caller's or a smuggled identity"
        if asked(verifier) - before == 2:
            return  # four of the six were cache hits
        assert elapsed >= SHORTEST_REUSE, "the gateway asked again within the answers' max-age"
    raise AssertionError(f"{ATTEMPTS} attempts stalled past the shortest reuse")


def test_a_certificate_bound_token_never_passes_on_a_thumbprint_the_client_names(
    gateway: str, verifier: GatewayProcess, issuer: LocalIssuer, upstream: EchoUpstream
) -> None:
    """RFC 8705: a token bound to a client certificate (`cnf.x5t#S256`), sent over a connection without one but with
    X-Client-Cert-Thumbprint naming its certificate, is refused, and asked about every time (a sender-constrained
    token's answer is never reusable, nor is its refusal). The verifier reads that header here (as it would behind a
    gateway terminating mTLS): no gateway passes the client's own account of a certificate, nor serves a stored
    answer for it."""
    thumbprint = b64url(uuid.uuid4().bytes * 2)  # 32 bytes: what a SHA-256 of a certificate looks like
    tok = token(issuer, cnf={"x5t#S256": thumbprint})
    before = asked(verifier)
    upstream.clear()

    answers = [
        http_request(
            f"{gateway}/orders", headers={"Authorization": f"Bearer {tok}", "X-Client-Cert-Thumbprint": thumbprint}
        )
        for _ in range(3)
    ]

    assert [a.status for a in answers] == [401] * 3, [(a.status, a.body) for a in answers]
    assert 'error="invalid_token"' in answers[-1].headers.get("www-authenticate", ""), answers[-1].headers
    assert asked(verifier) - before == 3
    assert upstream.requests == []


def test_a_cached_refusal_does_not_refuse_another_token(
    gateway: str, verifier: GatewayProcess, issuer: LocalIssuer
) -> None:
    garbage = f"not-a-jwt-{uuid.uuid4().hex}"
    before = asked(verifier)
    # A flood of the same garbage costs one verifier call per refusal_max_age window.
    answers = [get(gateway, "/orders", garbage) for _ in range(5)]
    assert [a.status for a in answers] == [401] * 5
    assert asked(verifier) - before == 1
    # A refusal from the cache is the verifier's refusal: its challenge and reason included.
    assert len({(a.headers.get("www-authenticate"), a.headers.get("x-verifier-reason")) for a in answers}) == 1
    assert "invalid_token" in answers[-1].headers["www-authenticate"]
    # ...and poisons nothing: a valid token on the same request is judged on its own.
    assert get(gateway, "/orders", token(issuer)).status == 200
    assert asked(verifier) - before == 2


def _payload(tok: str) -> str:
    part = tok.split(".")[1]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode()


def _sub(tok: str) -> str:
    return str(json.loads(_payload(tok))["sub"])


def _revoke(verifier: GatewayProcess, issuer: LocalIssuer, tok: str) -> None:
    _kill(verifier, {"format": "iss_sub", "iss": issuer.issuer, "sub": _sub(tok)})


def _kill(verifier: GatewayProcess, subject: dict[str, object]) -> None:
    kill_switch(verifier.url, ADMIN_TOKEN, subject)


def _flood(url: str, count: int, credential: Callable[[int], str]) -> tuple[list[int], int]:
    """The statuses of `count` requests, each with its own `credential(i)`, FLOOD_THREADS at a time, and how
    many were sent again. A 503 (the verifier shedding load, or the gateway's own timeout for it: a loaded
    machine) is never stored, so that credential is sent again, as a client would, until it is judged; each
    credential must end up judged (stored) exactly once for the flood to fill the cache."""

    def flood(worker: int) -> tuple[list[int], int]:
        conn = http.client.HTTPConnection(LOOPBACK, int(url.rsplit(":", 1)[1]), timeout=60)
        statuses, again = [], 0
        for i in range(worker, count, FLOOD_THREADS):
            headers = {"Authorization": f"Bearer {credential(i)}"}
            for attempt in range(FLOOD_RETRIES + 1):
                conn.request("GET", "/orders", headers=headers)
                response = conn.getresponse()
                response.read()
                if response.status != 503 or attempt == FLOOD_RETRIES:
                    break
                again += 1
                time.sleep(0.05)
            statuses.append(response.status)
        conn.close()
        return statuses, again

    with concurrent.futures.ThreadPoolExecutor(FLOOD_THREADS) as pool:
        batches = list(pool.map(flood, range(FLOOD_THREADS)))
    return [s for statuses, _ in batches for s in statuses], sum(again for _, again in batches)


@pytest.fixture()
def long_lived_verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A verifier whose answers (refusals included) may be reused for 300 s: nothing expires during a test."""
    proc = start_verifier(
        tmp_path_factory.mktemp("verifier-bound"),
        issuer=issuer.issuer,
        extra_config={"edge_cache": {"max_age_seconds": 300, "refusal_max_age_seconds": 300}},
    )
    yield proc
    proc.stop()


def test_envoys_reuse_cache_is_bounded(
    issuer: LocalIssuer,
    upstream: EchoUpstream,
    long_lived_verifier: GatewayProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A flood of distinct tokens cannot grow the Lua filter's cache past its bound: once it holds
    MAX_ENTRIES answers (none expired: everything is reusable for 300 s here) it starts over, so an
    answer stored before the flood is asked again. Without a bound it would still be served from memory."""
    proc = long_lived_verifier
    gw = start_envoy(
        tmp_path_factory.mktemp("envoy-bound"),
        "reuse",
        verifier_http_port=proc.extra["http_port"],
        upstream_port=upstream.port,
    )
    try:
        tok = token(issuer)
        assert get(gw.url, "/orders", tok).status == 200
        assert get(gw.url, "/orders", tok).status == 200
        assert asked(proc) == 1  # the second came from Envoy's cache

        statuses, _ = _flood(gw.url, MAX_ENTRIES, lambda i: f"junk-{i}-{uuid.uuid4().hex}")
        assert statuses == [401] * MAX_ENTRIES

        before = asked(proc)
        assert get(gw.url, "/orders", tok).status == 200
        assert asked(proc) == before + 1, "the cache kept growing past its bound"
    finally:
        gw.stop()


def _assert_a_flood_of_long_junk_evicts_the_answer_before_it(
    gw: GatewayProcess, proc: GatewayProcess, issuer: LocalIssuer, flood: int, junk_bytes: int
) -> None:
    """An answer the gateway reuses, then `flood` distinct junk credentials of about `junk_bytes` each, every one
    judged once (plus its 503s): past the gateway's bound, the answer stored before the flood is asked again."""
    tok = token(issuer)
    assert [get(gw.url, "/orders", tok).status for _ in range(2)] == [200, 200]
    assert asked(proc) == 1  # the second came from the gateway's cache
    padding = "j" * junk_bytes
    statuses, again = _flood(gw.url, flood, lambda i: f"{padding}-{i}-{uuid.uuid4().hex}")
    assert statuses == [401] * flood
    assert asked(proc) == 1 + flood + again
    before = asked(proc)
    assert get(gw.url, "/orders", tok).status == 200
    assert asked(proc) == before + 1, "the cache kept growing past its bound"


def test_envoys_reuse_cache_is_bounded_in_bytes_not_only_in_answers(
    issuer: LocalIssuer,
    upstream: EchoUpstream,
    long_lived_verifier: GatewayProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Keys are the client's bytes (an Authorization up to the filter's 16 KiB key limit): bounded by answers alone,
    10,000 of them would hold some 160 MiB per Envoy worker thread. A flood of 2,000 distinct 12 KiB junk
    credentials (24 MiB, past the byte bound) makes the filter start over, so the answer stored before the flood
    is asked again. Bounded by answers only, it would still be served from memory."""
    proc = long_lived_verifier
    gw = start_envoy(
        tmp_path_factory.mktemp("envoy-bound-bytes"),
        "reuse",
        verifier_http_port=proc.extra["http_port"],
        upstream_port=upstream.port,
    )
    try:
        _assert_a_flood_of_long_junk_evicts_the_answer_before_it(gw, proc, issuer, ENVOY_FLOOD, ENVOY_JUNK_BYTES)
    finally:
        gw.stop()


def test_nginx_luas_reuse_cache_is_bounded(
    issuer: LocalIssuer,
    upstream: EchoUpstream,
    long_lived_verifier: GatewayProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """deploy/nginx/verifier-reuse.lua keeps answers in `lua_shared_dict verifier_answers 10m` and a
    per-worker copy of at most 1,000. A flood of distinct long junk credentials (some 4 KiB stored each:
    more than 10 MiB in all) evicts the answer stored before it, least recently used, from both: it is
    asked again. With either store unbounded (one worker here, so its copy is the one asked) it would not be."""
    proc = long_lived_verifier
    gw = start_nginx(
        tmp_path_factory.mktemp("nginx-lua-bound"), proc.extra["http_port"], upstream.port, workers=1, lua=True
    )
    try:
        _assert_a_flood_of_long_junk_evicts_the_answer_before_it(gw, proc, issuer, NGINX_FLOOD, NGINX_JUNK_BYTES)
    finally:
        gw.stop()


def test_an_error_in_nginxs_reuse_filter_fails_closed(
    issuer: LocalIssuer, verifier: GatewayProcess, upstream: EchoUpstream, tmp_path: Path
) -> None:
    """A Lua error on the way (here: raised first thing in access()) is nginx's 500, which the template turns
    into its 503: never a pass, whatever the verifier would have said."""
    broken = tmp_path / "verifier-reuse.lua"
    access = "function M.access()\n"
    broken.write_text(NGINX_REUSE_LUA.read_text().replace(access, f"{access}  error('x')\n"))
    gw = start_nginx(tmp_path, verifier.extra["http_port"], upstream.port, lua=True, lua_file=broken)
    upstream.clear()
    try:
        answer = get(gw.url, "/orders", token(issuer))
    finally:
        gw.stop()
    assert (answer.status, answer.headers.get("retry-after")) == (503, "1")
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("failing", "with_token"),
    [("relay_refusal", False), ("apply_allow", True)],
    ids=["on-a-refusal", "on-an-allow"],
)
def test_an_error_in_envoys_reuse_filter_fails_closed(
    issuer: LocalIssuer,
    verifier: GatewayProcess,
    upstream: EchoUpstream,
    tmp_path: Path,
    failing: str,
    with_token: bool,
) -> None:
    """A Lua error in the filter (here: raised first thing where it relays a refusal, or applies an allow) is a 503,
    never a pass. Envoy's Lua filter logs a script error and lets the request go on to the upstream: a request
    without any credential reached it."""
    broken = tmp_path / "verifier-reuse.lua"
    start = f"local function {failing}(handle, "
    source = ENVOY_REUSE_LUA.read_text()
    assert source.count(start) == 1
    head, rest = source.split(start)
    line_end = rest.index("\n") + 1
    broken.write_text(f"{head}{start}{rest[:line_end]}  error('x')\n{rest[line_end:]}")
    gw = start_envoy(
        tmp_path, "reuse", verifier_http_port=verifier.extra["http_port"], upstream_port=upstream.port, lua_file=broken
    )
    upstream.clear()
    try:
        headers = {"Authorization": f"Bearer {token(issuer)}"} if with_token else {}
        answer = http_request(gw.url + "/orders", headers=headers)
    finally:
        gw.stop()
    assert (answer.status, answer.headers.get("retry-after")) == (503, "1")
    assert upstream.requests == []


def test_a_token_of_a_quick_role_gives_no_fresh_burst_through_the_gateway(
    issuer: LocalIssuer, upstream: EchoUpstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """One identity, two tokens: one without roles (the default, a burst of RATE_BURST back in 1,000 s each) and one
    with a quick role (a bucket of 1, a token back every 0.25 s). Before, one request with the quick token let the
    bucket lapse a quarter second later, and the next with the plain token found a whole new burst through nginx,
    as often as the caller liked. Now the bucket is kept until it would be full under every limit."""
    work = tmp_path_factory.mktemp("quick-role")
    limits = {"default": {"per_second": 0.001, "burst": RATE_BURST}, "roles": {"quick": {"per_second": 4, "burst": 1}}}
    proc = start_verifier(work, issuer=issuer.issuer, extra_config={"rate_limits": limits})
    try:
        gw = start_gateway_for("nginx", work, proc, upstream.port)
        try:
            sub = f"user-{uuid.uuid4().hex[:8]}"
            plain = issuer.mint(sub=sub, scope="read", jti=uuid.uuid4().hex)
            quick = issuer.mint(sub=sub, scope="read", jti=uuid.uuid4().hex, roles=["quick"])
            drained = [get(gw.url, "/orders", plain).status for _ in range(RATE_BURST + 1)]
            get(gw.url, "/orders", quick)  # one take under the quick limit, allowed or not
            time.sleep(0.5)
            after = get(gw.url, "/orders", plain)
        finally:
            gw.stop()
    finally:
        proc.stop()
    assert drained == [200] * RATE_BURST + [429]
    assert (after.status, after.headers.get("x-verifier-reason")) == (429, "rate_limited")  # before: 200
