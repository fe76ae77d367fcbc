"""Identity-bound access against the real oidc-provider: user tokens, route policies, DPoP, shared limits.

The provider logs users in through the authorization-code flow with a chosen ``acr``, ``amr`` and
login time (``op_harness.OpenIDProvider.user_token``); its RFC 9068 access tokens carry ``sub``,
``auth_time``, ``acr``, ``amr``, ``groups`` and, when DPoP-bound, ``cnf.jkt``. The verifier runs as
``python -m verifier serve`` and is asked through its forward-auth door, as a gateway would ask it.
Each policy requirement gets one allowed and one refused request; every DPoP failure mode of
RFC 9449 section 4.3 / 7.1 gets a 401 with a ``DPoP`` challenge; two verifier processes on one Redis
share one rate-limit bucket.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from gateways import GatewayProcess, HttpResult, http_request, start_verifier
from op_harness import OpenIDProvider, dpop_proof
from redis_harness import start_redis
from rigs import provider_fixture
from support import b64url

from verifier.config.state import MAX_TIMEOUT_SECONDS

pytestmark = pytest.mark.integration

HOST = "api.example.test"
ADMIN_GROUP = "platform-admins"
MAX_AGE = 900  # seconds; the policies' max_auth_age_seconds
#: One policy per requirement, so each can be met or missed alone; /admin is the README's full policy.
POLICIES: list[dict[str, Any]] = [
    {
        "name": "admin",
        "match": {"path_prefix": "/admin", "methods": ["POST", "PUT", "DELETE"]},
        "require": {
            "roles_any": ["admin"], "scopes_all": ["write"], "amr_any": ["hwk"], "acr_any": ["phr", "phrh"],
            "max_auth_age_seconds": MAX_AGE, "sender_constraint": "dpop",
        },
    },
    {"name": "roles", "match": {"path_prefix": "/roles"}, "require": {"roles_any": ["admin"]}},
    {"name": "ops", "match": {"path_prefix": "/ops"}, "require": {"roles_any": ["ops"]}},
    {"name": "realm", "match": {"path_prefix": "/realm"}, "require": {"roles_any": ["realm-admin"]}},
    {"name": "scopes", "match": {"path_prefix": "/scopes"}, "require": {"scopes_all": ["write"]}},
    {"name": "amr", "match": {"path_prefix": "/amr"}, "require": {"amr_any": ["hwk"]}},
    {"name": "acr", "match": {"path_prefix": "/acr"}, "require": {"acr_any": ["phr", "phrh"]}},
    {"name": "fresh", "match": {"path_prefix": "/fresh"}, "require": {"max_auth_age_seconds": MAX_AGE}},
    {"name": "dpop", "match": {"path_prefix": "/dpop"}, "require": {"sender_constraint": "dpop"}},
    {"name": "rest", "match": {"path_prefix": "/"}, "require": {"authenticated": True}},
]
ROLES: list[dict[str, Any]] = [
    {"role": "admin", "claim": "groups", "values": [ADMIN_GROUP]},
    {"role": "ops", "subjects": ["carol"]},
    {"role": "realm-admin", "claim": "realm_access.roles", "values": ["admin"]},  # Keycloak's realm roles
]
DPOP = {"algorithms": ["ES256", "EdDSA"], "iat_past_seconds": 60}


# ------------------------------------------------------------------------------------------------ fixtures


op = provider_fixture("op", scope="module")


def _issuer_config(op: OpenIDProvider) -> dict[str, Any]:
    return {
        "issuer": op.issuer,
        "audiences": ["https://api.example.test"],
        "algorithms": ["ES256", "RS256", "EdDSA"],
        "leeway_seconds": 30,
        "roles": ROLES,
        "allow_insecure_http": True,  # the provider listens on loopback http
    }


@pytest.fixture(scope="module")
def verifier(op: OpenIDProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    proc = start_verifier(
        tmp_path_factory.mktemp("identity-verifier"),
        issuer=op.issuer,
        extra_config={"issuers": [_issuer_config(op)], "policies": POLICIES, "dpop": DPOP},
    )
    yield proc
    proc.stop()


# ------------------------------------------------------------------------------------------------ helpers


def _ask(
    v: GatewayProcess,
    path: str,
    token: str | None,
    *,
    method: str = "GET",
    scheme: str = "Bearer",
    proof: str | None = None,
) -> HttpResult:
    """Ask the forward-auth door about ``method https://api.example.test<path>``, as a gateway would."""
    headers = {"X-Forwarded-Method": method, "X-Forwarded-Proto": "https", "X-Forwarded-Host": HOST,
               "X-Forwarded-Uri": path}
    if token is not None:
        headers["Authorization"] = f"{scheme} {token}"
    if proof is not None:
        headers["DPoP"] = proof
    return http_request(f"{v.url}/v1/forward-auth", headers=headers)


def _reason(answer: HttpResult) -> str:
    return answer.headers.get("x-verifier-reason", "")


def _challenge(answer: HttpResult) -> str:
    return answer.headers.get("www-authenticate", "")


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def _assert_step_up(
    answer: HttpResult, op: OpenIDProvider, *, acr_values: str | None, max_age: int | None, scheme: str = "Bearer"
) -> None:
    """RFC 9470 section 3: 401 insufficient_user_authentication, what to ask for, and where.

    The challenge names the scheme the token came under: a DPoP request gets a ``DPoP`` challenge
    (RFC 9449 section 7.1 takes its error codes from the same registry as RFC 6750).
    """
    challenge = _challenge(answer)
    assert answer.status == 401, (answer.status, challenge, answer.body)
    assert challenge.startswith(f'{scheme} realm="verifier", error="insufficient_user_authentication"'), challenge
    body = answer.json()
    assert body["error"] == "insufficient_user_authentication"
    assert body["authorization_endpoint"] == op.discovery()["authorization_endpoint"]
    if acr_values is not None:
        assert f'acr_values="{acr_values}"' in challenge
    if max_age is not None:
        assert f"max_age={max_age}" in challenge
    assert answer.headers.get("cache-control") == "no-store" or "max-age=0" in answer.headers.get("cache-control", "")


def _assert_forbidden(answer: HttpResult, reason: str) -> None:
    assert (answer.status, _reason(answer)) == (403, reason), answer.body
    assert 'error="insufficient_scope"' in _challenge(answer)


def _assert_dpop_refused(answer: HttpResult) -> None:
    challenge = _challenge(answer)
    assert answer.status == 401, (answer.status, challenge, answer.body)
    assert challenge.startswith('DPoP realm="verifier"'), challenge
    assert 'algs="' in challenge


def _ath(token: str) -> str:
    return b64url(hashlib.sha256(token.encode()).digest())


def _proof_without_ath(key: ec.EllipticCurvePrivateKey, htm: str, htu: str) -> str:
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    claims = {"jti": str(uuid.uuid4()), "htm": htm, "htu": htu, "iat": int(time.time())}
    return jwt.encode(claims, key, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": public})


# ------------------------------------------------------------------------------------------------ user tokens


def test_the_provider_issues_user_tokens_with_authentication_context(op: OpenIDProvider) -> None:
    before = int(time.time())
    token = op.user_token("alice", acr="phrh", amr=["hwk", "pin"], auth_age_seconds=1200, groups=[ADMIN_GROUP])
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    claims = _claims(token)
    assert (claims["sub"], claims["acr"], claims["amr"], claims["groups"]) == ("alice", "phrh", ["hwk", "pin"],
                                                                              [ADMIN_GROUP])
    assert claims["aud"] == "https://api.example.test" and claims["iss"] == op.issuer
    assert before - 1200 - 2 <= claims["auth_time"] <= int(time.time()) - 1200 + 2
    assert set(claims["scope"].split()) == {"read", "write"}
    assert "cnf" not in claims


# ------------------------------------------------------------------------------------------------ roles, scopes


def test_roles_from_the_groups_claim_allow_and_their_absence_is_403(
    op: OpenIDProvider, verifier: GatewayProcess
) -> None:
    allowed = _ask(verifier, "/roles/x", op.user_token("alice", groups=[ADMIN_GROUP]))
    assert allowed.status == 200, allowed.body
    assert "admin" in allowed.headers["x-authenticated-roles"].split(",")
    assert allowed.headers["x-authenticated-userid"] == "alice"
    _assert_forbidden(_ask(verifier, "/roles/x", op.user_token("bob", groups=["staff"])), "role_missing")


@pytest.mark.parametrize(
    "shape",
    [
        {"realm_access": {"groups": ["admin"]}},  # the role under a sibling key
        {"realm_access": [{"roles": ["admin"]}]},  # a list at the intermediate
        {"realm_access": '{"roles": ["admin"]}'},  # a string at the intermediate
        {"resource_access": {"realm_access": {"roles": ["admin"]}}},  # the path one level down
    ],
    ids=["sibling", "list", "string", "deeper"],
)
def test_a_keycloak_realm_role_at_its_nested_path_allows_and_nothing_else_there_does(
    op: OpenIDProvider, verifier: GatewayProcess, shape: dict[str, Any]
) -> None:
    """A rule on `realm_access.roles` (where Keycloak puts realm roles) read a flat claim of that name that no token
    has: every user got 403 `role_missing`, with nothing saying the rule could never match. The provider's real
    access token, with the role nested as Keycloak nests it, now gets the role; the same role anywhere else does
    not."""
    keycloak = {"realm_access": {"roles": ["offline_access", "admin"]}}
    allowed = _ask(verifier, "/realm/x", op.user_token("alice", claims=keycloak))
    assert allowed.status == 200, allowed.body
    assert "realm-admin" in allowed.headers["x-authenticated-roles"].split(",")
    _assert_forbidden(_ask(verifier, "/realm/x", op.user_token("eve", claims=shape)), "role_missing")


def test_roles_from_subjects_allow_that_user_only(op: OpenIDProvider, verifier: GatewayProcess) -> None:
    assert _ask(verifier, "/ops", op.user_token("carol")).status == 200
    _assert_forbidden(_ask(verifier, "/ops", op.user_token("dave")), "role_missing")


def test_scopes_all_allows_the_full_set_and_refuses_a_narrower_token(
    op: OpenIDProvider, verifier: GatewayProcess
) -> None:
    assert _ask(verifier, "/scopes", op.user_token(scope="read write")).status == 200
    _assert_forbidden(_ask(verifier, "/scopes", op.user_token(scope="read")), "scope_missing")


# ------------------------------------------------------------------------------------------------ step-up (RFC 9470)


def test_amr_any_allows_a_hardware_key_and_challenges_a_password(op: OpenIDProvider, verifier: GatewayProcess) -> None:
    assert _ask(verifier, "/amr", op.user_token(amr=["hwk", "pin"])).status == 200
    _assert_step_up(_ask(verifier, "/amr", op.user_token(amr=["pwd"])), op, acr_values=None, max_age=None)


@pytest.mark.parametrize("acr", ["phr", "phrh"])
def test_acr_any_allows_each_listed_level(op: OpenIDProvider, verifier: GatewayProcess, acr: str) -> None:
    assert _ask(verifier, "/acr", op.user_token(acr=acr)).status == 200


def test_acr_any_challenges_a_weaker_level_with_acr_values(op: OpenIDProvider, verifier: GatewayProcess) -> None:
    _assert_step_up(_ask(verifier, "/acr", op.user_token(acr="pwd")), op, acr_values="phr phrh", max_age=None)


def test_max_auth_age_allows_a_fresh_login_and_challenges_an_old_one(
    op: OpenIDProvider, verifier: GatewayProcess
) -> None:
    fresh = _ask(verifier, "/fresh", op.user_token(auth_age_seconds=0))
    assert fresh.status == 200
    # The gateway may not reuse the answer past the moment the login becomes too old.
    cache = fresh.headers.get("cache-control", "")
    assert cache == "no-store" or int(cache.rsplit("max-age=", 1)[1]) <= MAX_AGE
    _assert_step_up(
        _ask(verifier, "/fresh", op.user_token(auth_age_seconds=MAX_AGE + 100)), op, acr_values=None, max_age=MAX_AGE
    )


# ------------------------------------------------------------------------------------------------ the README policy


def test_the_full_admin_policy_allows_a_strong_fresh_dpop_bound_admin(
    op: OpenIDProvider, verifier: GatewayProcess
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    token = op.user_token("alice", acr="phr", amr=["hwk"], groups=[ADMIN_GROUP], scope="read write", dpop_key=key)
    proof = dpop_proof(key, "DELETE", f"https://{HOST}/admin/users", access_token=token)
    answer = _ask(verifier, "/admin/users", token, method="DELETE", scheme="DPoP", proof=proof)
    assert answer.status == 200, answer.body
    assert answer.headers["x-authenticated-userid"] == "alice"
    assert answer.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    ("login", "expected"),
    [
        ({"groups": ["staff"]}, "role_missing"),
        ({"scope": "read"}, "scope_missing"),
        ({"acr": "pwd"}, "step_up"),
        ({"amr": ["pwd"]}, "step_up"),
        ({"auth_age_seconds": MAX_AGE + 60}, "step_up"),
        ({"bound": False}, "dpop"),
    ],
    ids=["role", "scope", "acr", "amr", "auth_age", "unbound"],
)
def test_the_full_admin_policy_refuses_each_unmet_requirement(
    op: OpenIDProvider, verifier: GatewayProcess, login: dict[str, Any], expected: str
) -> None:
    options: dict[str, Any] = {"acr": "phr", "amr": ["hwk"], "groups": [ADMIN_GROUP], "scope": "read write"}
    bound = login.pop("bound", True)
    options.update(login)
    key = ec.generate_private_key(ec.SECP256R1())
    token = op.user_token("alice", dpop_key=key if bound else None, **options)
    url = f"https://{HOST}/admin/users"
    if bound:
        answer = _ask(verifier, "/admin/users", token, method="DELETE", scheme="DPoP",
                      proof=dpop_proof(key, "DELETE", url, access_token=token))
    else:
        answer = _ask(verifier, "/admin/users", token, method="DELETE")
    if expected == "step_up":
        _assert_step_up(answer, op, acr_values="phr phrh", max_age=MAX_AGE, scheme="DPoP")
    elif expected == "dpop":
        _assert_dpop_refused(answer)
        assert _reason(answer) == "sender_constraint_failed"
    else:
        _assert_forbidden(answer, expected)


# ------------------------------------------------------------------------------------------------ DPoP (RFC 9449)


@pytest.fixture(scope="module")
def bound(op: OpenIDProvider) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A DPoP key and a user token the real provider bound to it (``cnf.jkt``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    response = op.user_token_response("alice", dpop_key=key)
    assert response["token_type"] == "DPoP"
    token = str(response["access_token"])
    assert "jkt" in _claims(token)["cnf"]
    return key, token


def test_dpop_valid_proof_is_allowed_and_its_replay_refused(
    verifier: GatewayProcess, bound: tuple[ec.EllipticCurvePrivateKey, str]
) -> None:
    key, token = bound
    proof = dpop_proof(key, "POST", f"https://{HOST}/dpop/orders", access_token=token)
    first = _ask(verifier, "/dpop/orders", token, method="POST", scheme="DPoP", proof=proof)
    assert first.status == 200, first.body
    assert first.headers["cache-control"] == "no-store"
    replayed = _ask(verifier, "/dpop/orders", token, method="POST", scheme="DPoP", proof=proof)
    _assert_dpop_refused(replayed)
    assert 'error="invalid_dpop_proof"' in _challenge(replayed), _challenge(replayed)


def test_dpop_a_client_credentials_token_bound_by_the_provider_works_too(
    op: OpenIDProvider, verifier: GatewayProcess
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    token = op.client_credentials_token(dpop_key=key)
    proof = dpop_proof(key, "GET", f"https://{HOST}/dpop", access_token=token)
    assert _ask(verifier, "/dpop", token, scheme="DPoP", proof=proof).status == 200


def _bad_proof(case: str, key: ec.EllipticCurvePrivateKey, token: str, other_token: str) -> str | None:
    url = f"https://{HOST}/dpop/orders"
    if case == "wrong_htm":
        return dpop_proof(key, "GET", url, access_token=token)
    if case == "wrong_htu":
        return dpop_proof(key, "POST", f"https://{HOST}/dpop/elsewhere", access_token=token)
    if case == "wrong_host":
        return dpop_proof(key, "POST", "https://evil.example.test/dpop/orders", access_token=token)
    if case == "stale_iat":
        return dpop_proof(key, "POST", url, access_token=token, iat=int(time.time()) - 600)
    if case == "future_iat":
        return dpop_proof(key, "POST", url, access_token=token, iat=int(time.time()) + 600)
    if case == "ath_of_another_token":
        return dpop_proof(key, "POST", url, access_token=other_token)
    if case == "no_ath":
        return _proof_without_ath(key, "POST", url)
    if case == "other_key":
        return dpop_proof(ec.generate_private_key(ec.SECP256R1()), "POST", url, access_token=token)
    if case == "garbage":
        return "not.a.proof"
    assert case == "missing"
    return None


#: case -> (X-Verifier-Reason, a word of the error_description): each refused for its own reason.
BAD_PROOFS: dict[str, tuple[str, str]] = {
    "wrong_htm": ("dpop_proof_invalid", "htm"),
    "wrong_htu": ("dpop_proof_invalid", "htu"),
    "wrong_host": ("dpop_proof_invalid", "htu"),
    "stale_iat": ("dpop_proof_invalid", "too old"),
    "future_iat": ("dpop_proof_invalid", "future"),
    "ath_of_another_token": ("dpop_proof_invalid", "ath"),
    "no_ath": ("dpop_proof_invalid", "ath"),
    "other_key": ("sender_constraint_failed", "key"),
    "garbage": ("dpop_proof_invalid", "JWS"),
    "missing": ("dpop_proof_invalid", "missing"),
}


@pytest.mark.parametrize("case", list(BAD_PROOFS))
def test_dpop_bad_or_missing_proof_is_refused_with_a_dpop_challenge(
    op: OpenIDProvider, verifier: GatewayProcess, bound: tuple[ec.EllipticCurvePrivateKey, str], case: str
) -> None:
    key, token = bound
    other_token = op.client_credentials_token(dpop_key=key)
    proof = _bad_proof(case, key, token, other_token)
    answer = _ask(verifier, "/dpop/orders", token, method="POST", scheme="DPoP", proof=proof)
    _assert_dpop_refused(answer)
    reason, word = BAD_PROOFS[case]
    assert _reason(answer) == reason
    assert word in _challenge(answer).split('error_description="', 1)[1].split('"', 1)[0]
    assert answer.headers.get("cache-control") == "no-store"


def test_dpop_bound_token_presented_as_bearer_is_a_downgrade(
    verifier: GatewayProcess, bound: tuple[ec.EllipticCurvePrivateKey, str]
) -> None:
    key, token = bound
    # With or without a proof alongside, a bound token under the Bearer scheme is refused ...
    for proof in (None, dpop_proof(key, "POST", f"https://{HOST}/dpop/orders", access_token=token)):
        answer = _ask(verifier, "/dpop/orders", token, method="POST", proof=proof)
        _assert_dpop_refused(answer)
        assert _reason(answer) == "sender_constraint_failed"
    # ... on any route, not only where a policy asks for DPoP (RFC 9449 section 7.1).
    _assert_dpop_refused(_ask(verifier, "/anything", token))


def test_dpop_bound_token_with_its_proof_passes_a_route_without_a_dpop_policy(
    verifier: GatewayProcess, bound: tuple[ec.EllipticCurvePrivateKey, str]
) -> None:
    key, token = bound
    proof = dpop_proof(key, "GET", f"https://{HOST}/anything", access_token=token)
    assert _ask(verifier, "/anything", token, scheme="DPoP", proof=proof).status == 200


def test_dpop_route_refuses_an_unbound_user_token(op: OpenIDProvider, verifier: GatewayProcess) -> None:
    answer = _ask(verifier, "/dpop/orders", op.user_token("alice"), method="POST")
    _assert_dpop_refused(answer)
    assert _reason(answer) == "sender_constraint_failed"


# ------------------------------------------------------------------------------------------------ shared rate limits


def test_two_verifiers_on_one_redis_share_one_rate_limit_bucket(
    op: OpenIDProvider, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("shared-bucket")
    redis = start_redis(tmp)
    replicas: list[GatewayProcess] = []
    try:
        config = {
            "issuers": [_issuer_config(op)],
            "rate_limits": {"default": {"per_second": 0.01, "burst": 4}},
            # The most the product accepts per Redis operation (not the 0.25 s default): this test is about one
            # shared bucket, and a stalled runner must not turn a take into 503 state_unavailable.
            "state": {"redis_url": redis.url, "key_prefix": "identity-op:", "timeout_seconds": MAX_TIMEOUT_SECONDS},
        }
        for _ in range(2):
            replicas.append(start_verifier(tmp, issuer=op.issuer, extra_config=config))
        token = op.user_token("rate-limited-user")
        statuses = [_ask(replicas[i % 2], "/api", token).status for i in range(8)]
        assert statuses == [200, 200, 200, 200, 429, 429, 429, 429], statuses
        for replica in replicas:
            refused = _ask(replica, "/api", token)
            assert refused.status == 429 and int(refused.headers["retry-after"]) >= 1
            assert refused.headers["ratelimit-policy"].startswith('"default";q=4')
        # Another identity has its own bucket, on either replica.
        other = op.user_token("another-user")
        assert [_ask(r, "/api", other).status for r in replicas] == [200, 200]
    finally:
        for replica in replicas:
            replica.stop()
        redis.stop()
