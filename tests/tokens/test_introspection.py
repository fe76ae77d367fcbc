"""verifier.tokens.introspection: RFC 7662 with single flight, batching, caches and a circuit breaker.

Faults are injected at the one network seam (`IntrospectionHttp`); the last tests run the real aiohttp
path against the embedded dev provider's standard and batch endpoints.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hostile_numbers import HOSTILE_IDS, HOSTILE_NUMBERS
from prometheus_client import CollectorRegistry
from support import FrozenClock, count_loop_lookups

from verifier.app import App, build_introspector
from verifier.checks.introspect_jwts import IntrospectJwts
from verifier.clock import SystemClock
from verifier.config.introspection import (
    DEFAULT_BATCH_WINDOW_SECONDS,
    DEFAULT_MAX_BATCHES_IN_FLIGHT,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_NEGATIVE_TTL_SECONDS,
    DEFAULT_POSITIVE_TTL_SECONDS,
    DEFAULT_TIMEOUT_SECONDS,
)
from verifier.config.issuer import DEFAULT_LEEWAY_SECONDS
from verifier.credentials import Credential, TokenScheme
from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider
from verifier.errors import (
    AudienceMismatch,
    ClaimInvalid,
    InvalidToken,
    Outcome,
    ProviderUnavailable,
    TokenExpired,
    TokenNotYetValid,
    WrongTokenType,
)
from verifier.observe.audit import token_hash
from verifier.principal import Principal
from verifier.revocation.entry import Effect, Entry, KeyKind, Match, SubjectKey
from verifier.revocation.index import Revocations
from verifier.settings import ConfigError, parse_settings
from verifier.tokens.introspection import (
    ClientAuth,
    IntrospectionConfig,
    Introspector,
    parse_introspection_config,
)
from verifier.tokens.introspection_breaker import BreakerState
from verifier.tokens.introspection_client import ASSERTION_TYPE, AnswerTooLarge, HttpReply, HttpRequest
from verifier.tokens.introspection_http import IntrospectionHttpClient

ISSUER = "https://issuer.example.test"
AUDIENCE = "https://api.example.test"
ENDPOINT = ISSUER + "/introspect"
BATCH_ENDPOINT = ISSUER + "/introspect/batch"
NOW = 1_700_000_000.0
SECRET = "s3cret:with/odd&chars"


def active(**overrides: Any) -> dict[str, Any]:
    """An active RFC 7662 answer at NOW; None removes a member."""
    answer: dict[str, Any] = {
        "active": True,
        "iss": ISSUER,
        "sub": "user-1",
        "aud": AUDIENCE,
        "client_id": "client-1",
        "scope": "read write",
        "exp": int(NOW) + 300,
        "iat": int(NOW) - 10,
        "token_type": "Bearer",
    }
    answer.update(overrides)
    return {k: v for k, v in answer.items() if v is not None}


class FakeHttp:
    """The seam, answering from `answers[token]`; `fault` is None, an int status, "timeout" or "down"; a batch
    holding a token of `poison` fails as it says: an int status, "malformed" (not JSON), "short" (one result
    missing), "too_large" (`AnswerTooLarge`) or "timeout"."""

    def __init__(self) -> None:
        self.answers: dict[str, dict[str, Any]] = {}
        self.poison: dict[str, int | str] = {}
        self.requests: list[HttpRequest] = []
        self.fault: int | str | None = None
        self.delay = 0.0
        self.discovery: dict[str, Any] | None = None
        self.encoding = "utf-8"  # of the RFC 7662 answers

    @property
    def posts(self) -> list[HttpRequest]:
        return [r for r in self.requests if r.method == "POST"]

    def tokens_asked(self) -> list[str]:
        asked: list[str] = []
        for r in self.posts:
            if r.url == BATCH_ENDPOINT:
                asked.extend(json.loads(r.body)["tokens"])
            else:
                asked.append(form(r)["token"])
        return asked

    def answer(self, token: str) -> dict[str, Any]:
        return self.answers.get(token, {"active": False})

    async def send(self, request: HttpRequest) -> HttpReply:
        self.requests.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fault == "timeout":
            await asyncio.sleep(request.timeout + 5)
        if self.fault == "down":
            raise ProviderUnavailable("introspection provider unreachable (ClientConnectorError)")
        if isinstance(self.fault, int):
            return HttpReply(self.fault, b'{"error": "server_error"}')
        if request.method == "GET":
            return HttpReply(200, json.dumps(self.discovery).encode())
        if request.url == BATCH_ENDPOINT:
            tokens = json.loads(request.body)["tokens"]
            results = [self.answer(t) for t in tokens]
            for fault in (self.poison[t] for t in tokens if t in self.poison):
                if isinstance(fault, int):
                    return HttpReply(fault, b'{"error": "server_error"}')
                if fault == "malformed":
                    return HttpReply(200, b"<html>Internal error</html>")
                if fault == "too_large":
                    raise AnswerTooLarge("introspection provider answer too large")
                if fault == "timeout":
                    await asyncio.sleep(request.timeout + 5)
                results.pop()  # "short"
            return HttpReply(200, json.dumps({"results": results}).encode())
        return HttpReply(200, json.dumps(self.answer(form(request)["token"])).encode(self.encoding))


def form(request: HttpRequest) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(request.body.decode()))


def config(**overrides: Any) -> IntrospectionConfig:
    values: dict[str, Any] = {"client_id": "verifier", "client_secret": SECRET, "endpoint": ENDPOINT}
    values.update(overrides)
    return IntrospectionConfig(**values)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(NOW)


@pytest.fixture
def http() -> FakeHttp:
    return FakeHttp()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


MakeIntrospector = Callable[..., Introspector]


@pytest.fixture
async def make(http: FakeHttp, clock: FrozenClock, registry: CollectorRegistry) -> AsyncIterator[MakeIntrospector]:
    made: list[Introspector] = []

    def _make(
        given: str | None = None, audiences: tuple[str, ...] = (AUDIENCE,), leeway: float = 0.0, **overrides: Any
    ) -> Introspector:
        """An introspector over the fake seam; `given` is the endpoint argument, `leeway` the issuer's
        `leeway_seconds`, `overrides` the config."""
        introspector = build_introspector(
            issuer=ISSUER,
            audiences=audiences,
            config=config(**overrides),
            leeway_seconds=leeway,
            endpoint=given,
            clock=clock,
            registry=registry,
            http=http,
        )
        made.append(introspector)
        return introspector

    yield _make
    for introspector in made:
        await introspector.close()


async def check(introspector: Introspector, token: str) -> Any:
    return await introspector.introspect(token, token_hash(token))


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, {"issuer": ISSUER, **labels})
    return 0.0 if value is None else value


# -- principal ---------------------------------------------------------------------------------


async def test_an_active_answer_becomes_a_principal_like_jwt_claims(make: MakeIntrospector, http: FakeHttp) -> None:
    http.answers["tok"] = active(cnf={"jkt": "abc"}, acr="urn:mace:incommon:iap:silver", amr=["pwd"], roles=["admin"])
    principal = await check(make(), "tok")
    assert principal.issuer == ISSUER
    assert principal.subject == "user-1"
    assert principal.client_id == "client-1"
    assert principal.scopes == ("read", "write")
    assert principal.roles == frozenset({"admin"})
    assert principal.claims["cnf"] == {"jkt": "abc"}
    assert principal.claims["acr"] == "urn:mace:incommon:iap:silver"
    assert principal.claims["amr"] == ["pwd"]
    assert principal.claims["aud"] == AUDIENCE
    assert principal.claims["exp"] == int(NOW) + 300
    assert "active" not in principal.claims
    # The principal expires when the answer stops being fresh (the positive TTL), not at exp.
    assert principal.expires_at == NOW + DEFAULT_POSITIVE_TTL_SECONDS


async def test_a_client_credentials_answer_without_sub_names_the_client(make: MakeIntrospector, http: FakeHttp) -> None:
    http.answers["tok"] = active(sub=None, client_id="app")
    principal = await check(make(), "tok")
    assert principal.subject == ""  # a client is not a user
    assert principal.client_id == "app"


@pytest.mark.parametrize(
    ("answer", "error", "code"),
    [
        (active(aud="https://other.example.test"), AudienceMismatch, "audience_mismatch"),
        (active(aud=["https://a.test", "https://b.test"]), AudienceMismatch, "audience_mismatch"),
        (active(aud=None), ClaimInvalid, "claim_invalid"),
        (active(iss="https://evil.example.test"), InvalidToken, "issuer_mismatch"),
        (active(active="true"), InvalidToken, "token_inactive"),
        (active(active=1), InvalidToken, "token_inactive"),
        ({"active": False}, InvalidToken, "token_inactive"),
        (active(exp=int(NOW) - 1), TokenExpired, "token_expired"),
        (active(sub=None, client_id=None), ClaimInvalid, "claim_invalid"),
        (active(sub=42), ClaimInvalid, "claim_invalid"),
        (active(sid=123), ClaimInvalid, "claim_invalid"),
        (active(exp="soon"), ClaimInvalid, "claim_invalid"),
        (active(token_type="refresh_token"), WrongTokenType, "token_type_invalid"),
        (active(sub="user-\ud800"), ClaimInvalid, "claim_invalid"),
        (active(email=["a", {"b": "x\udc00"}]), ClaimInvalid, "claim_invalid"),
    ],
    ids=[
        "wrong audience -> 403",
        "no configured audience in a list",
        "aud missing",
        "another issuer",
        "active is the string true",
        "active is the number 1",
        "inactive",
        "expired although active",
        "no subject at all",
        "sub not a string",
        "sid not a string (it escaped every session revocation)",
        "exp not a number",
        "a refresh token",
        "a lone surrogate in sub (no header can carry it)",
        "a lone surrogate in any member",
    ],
)
async def test_refuses_unusable_answers(
    make: MakeIntrospector, http: FakeHttp, answer: dict[str, Any], error: type[Exception], code: str
) -> None:
    http.answers["tok"] = answer
    with pytest.raises(error) as caught:
        await check(make(), "tok")
    assert getattr(caught.value, "code", None) == code


def hydra_answer(token_use: str) -> dict[str, Any]:
    """What Ory Hydra (fosite) answers for one of its tokens: the grant's audience and `token_type` on both
    kinds, only `token_use` telling a refresh token from an access token."""
    return active(token_type="bearer", token_use=token_use, aud=[AUDIENCE], nbf=int(NOW) - 10, ext={})


@pytest.mark.parametrize(
    ("token_use", "code"),
    [
        ("refresh_token", "token_type_invalid"),
        ("Refresh_Token", "token_type_invalid"),
        ("id_token", "token_type_invalid"),
        (7, "claim_invalid"),
        (["access_token"], "claim_invalid"),
    ],
)
async def test_a_refresh_token_named_by_token_use_grants_nothing(
    make: MakeIntrospector, http: FakeHttp, token_use: Any, code: str
) -> None:
    """Hydra introspects its refresh tokens as active, with the access token's `aud` and `token_type`: a stolen
    refresh token presented as a bearer token must not reach the API (RFC 6749 section 1.5; Oathkeeper refuses it)."""
    http.answers["ory_rt_stolen"] = hydra_answer(token_use)
    with pytest.raises(InvalidToken) as caught:
        await check(make(), "ory_rt_stolen")
    assert caught.value.code == code


@pytest.mark.parametrize("cnf", [None, {}, {"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"}, {"jkt": 7}])
async def test_a_dpop_token_that_names_no_key_is_refused_not_taken_as_bearer(
    make: MakeIntrospector, http: FakeHttp, cnf: Any
) -> None:
    """RFC 9449 section 6.2: a DPoP-bound token's answer says `token_type: DPoP` and names its key in `cnf.jkt`.
    Without the key nothing can hold the token to a proof: taken as it stands, a stolen DPoP token would pass as
    a bearer token, with no proof at all."""
    http.answers["stolen-dpop"] = active(token_type="DPoP", cnf=cnf)
    with pytest.raises(ClaimInvalid) as caught:
        await check(make(), "stolen-dpop")
    assert caught.value.code == "claim_invalid"


async def test_a_dpop_token_with_its_key_is_taken(make: MakeIntrospector, http: FakeHttp) -> None:
    http.answers["dpop"] = active(token_type="DPoP", cnf={"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"})
    assert (await check(make(), "dpop")).claims["cnf"]["jkt"] == "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"


@pytest.mark.parametrize("token_use", ["access_token", "ACCESS_TOKEN", ""])
async def test_an_access_token_named_by_token_use_is_taken(
    make: MakeIntrospector, http: FakeHttp, token_use: str
) -> None:
    http.answers["ory_at_ok"] = hydra_answer(token_use)  # "": Go's zero value, as Oathkeeper reads it (absent)
    assert (await check(make(), "ory_at_ok")).subject == "user-1"


async def test_a_fresh_token_from_a_provider_whose_clock_runs_ahead_is_taken(
    make: MakeIntrospector, http: FakeHttp
) -> None:
    """The provider says active; its `nbf` (Hydra: when the token was asked for, a moment ago) is a second ahead of
    our clock. Refused, the valid token was also remembered refused (the pipeline's negative cache, 30 s): a user
    locked out by a second of skew that the issuer's `leeway_seconds` (exp/nbf/iat) is there to absorb."""
    http.answers["fresh"] = active(nbf=int(NOW) + 1, iat=int(NOW) + 1)
    assert (await check(make(leeway=DEFAULT_LEEWAY_SECONDS), "fresh")).subject == "user-1"


async def test_a_token_not_valid_before_the_leeway_is_still_refused(make: MakeIntrospector, http: FakeHttp) -> None:
    http.answers["postdated"] = active(nbf=int(NOW) + DEFAULT_LEEWAY_SECONDS + 1)
    with pytest.raises(TokenNotYetValid):
        await check(make(leeway=DEFAULT_LEEWAY_SECONDS), "postdated")


async def test_an_answer_whose_auth_time_is_beyond_the_leeway_is_refused(
    make: MakeIntrospector, http: FakeHttp
) -> None:
    """An opaque token's `auth_time` gets the JWT's treatment: a login in the future never ages out of a route's
    `max_auth_age_seconds` (nor into an `authenticated_before` revocation). Within the leeway it is skew, taken."""
    http.answers["ahead"] = active(auth_time=int(NOW) + DEFAULT_LEEWAY_SECONDS + 1)
    with pytest.raises(TokenNotYetValid):
        await check(make(leeway=DEFAULT_LEEWAY_SECONDS), "ahead")
    http.answers["skewed"] = active(auth_time=int(NOW) + DEFAULT_LEEWAY_SECONDS)
    assert (await check(make(leeway=DEFAULT_LEEWAY_SECONDS), "skewed")).subject == "user-1"


async def test_a_token_issued_after_the_kill_switch_by_a_clock_running_ahead_is_refused(
    make: MakeIntrospector, http: FakeHttp, clock: FrozenClock
) -> None:
    """The kill switch refuses a user's tokens issued until now (`iat` at or before the entry's time, our clock). An
    answer whose `iat` is ahead of our clock by more than the leeway (a provider clock running minutes ahead) names
    a token the entry can never reach: the user's stolen token outlived the kill switch. A JWT's such `iat` is
    refused (token_not_yet_valid); so is an answer's."""
    revocations = Revocations(clock)
    revocations.replace(
        [Entry(id="op-1", key=SubjectKey(KeyKind.ISS_SUB, "user-1", ISSUER), effect=Effect.TOKEN_REVOKED,
               match=Match.ISSUED_BEFORE, event_time=NOW, expires_at=NOW + 3600, source="operator", event="operator")]
    )  # fmt: skip
    http.answers["stolen"] = active(iat=int(NOW) + 600, exp=int(NOW) + 900)  # issued before it, on a clock 10 min ahead
    try:
        principal = await check(make(leeway=DEFAULT_LEEWAY_SECONDS), "stolen")
    except TokenNotYetValid:
        return
    assert revocations.check(principal) is not None, "the kill switch missed the user's token"


async def test_the_composition_root_hands_each_introspector_its_issuers_leeway(secret_env: str) -> None:
    settings = parse_settings(
        {
            "http": {"listen": "127.0.0.1:0"},
            "issuers": [
                {
                    "issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["ES256"], "jwks_uri": ISSUER + "/jwks",
                    "leeway_seconds": 7, "introspection": {"client_id": "verifier", "client_secret_env": secret_env},
                }
            ],
        }
    )  # fmt: skip
    app = App(settings)
    try:
        assert app.introspectors[ISSUER].leeway_seconds == 7
    finally:
        await app.stop(grace=0)


async def test_an_answer_without_aud_is_accepted_when_audience_is_not_required(
    make: MakeIntrospector, http: FakeHttp
) -> None:
    http.answers["tok"] = active(aud=None)
    assert (await check(make(require_audience=False), "tok")).subject == "user-1"


def oidc_provider_refresh_answer(**overrides: Any) -> dict[str, Any]:
    """What node-oidc-provider answers for one of its refresh tokens: active, the user's `sub`, `scope` and `sid`, an
    `exp` days away, and neither `aud` nor `token_type` (tests/integration/test_introspection_op.py shows it)."""
    answer = active(aud=None, token_type=None, sid="s-1", scope="openid offline_access read", exp=int(NOW) + 14 * 86400)
    answer.update(overrides)
    return answer


@pytest.mark.parametrize(
    "answer",
    [
        oidc_provider_refresh_answer(),
        oidc_provider_refresh_answer(token_type=""),
        oidc_provider_refresh_answer(sub=None),
    ],
    ids=["as answered", "token_type empty", "no sub"],
)
async def test_an_answer_naming_neither_aud_nor_token_type_is_refused_when_audience_is_not_required(
    make: MakeIntrospector, http: FakeHttp, answer: dict[str, Any]
) -> None:
    """RFC 6749 section 1.5: a refresh token never goes to a resource server. With `require_audience: false`,
    `token_type` is the only member that tells node-oidc-provider's access token answers from its refresh token
    answers: one naming neither is refused, and not taken as the user's access token for the weeks it lives."""
    http.answers["rt"] = answer
    with pytest.raises(WrongTokenType) as caught:
        await check(make(require_audience=False), "rt")
    assert caught.value.code == "token_type_invalid"


@pytest.mark.parametrize(
    "token_type", ["Bearer", "bearer", "access_token", "urn:ietf:params:oauth:token-type:access_token"]
)
async def test_an_answer_without_aud_naming_a_token_type_is_taken_when_audience_is_not_required(
    make: MakeIntrospector, http: FakeHttp, token_type: str
) -> None:
    http.answers["tok"] = active(aud=None, token_type=token_type)
    assert (await check(make(require_audience=False), "tok")).subject == "user-1"


# What providers answer for tokens that are not access tokens, each naming its kind its own way.
OTHER_KINDS = {
    "token_type refresh_token": {"token_type": "refresh_token"},
    "token_type Refresh": {"token_type": "Refresh"},
    "token_type refresh (RFC 8693 URI)": {"token_type": "urn:ietf:params:oauth:token-type:refresh_token"},
    "token_type id_token": {"token_type": "id_token"},
    "token_type ID token (RFC 8693 URI)": {"token_type": "urn:ietf:params:oauth:token-type:id_token"},
    "token_type N_A (RFC 8693: not an access token)": {"token_type": "N_A"},
    "token_type PoP (no proof we can ask for)": {"token_type": "PoP"},
    "token_type mac": {"token_type": "mac"},
    "Keycloak refresh token (typ Refresh)": {"token_type": "Bearer", "typ": "Refresh"},
    "Keycloak offline token (typ Offline)": {"token_type": "Bearer", "typ": "Offline"},
    "Keycloak ID token (typ ID)": {"token_type": "Bearer", "typ": "ID"},
    "typ Refresh alone": {"token_type": None, "typ": "Refresh"},
    "typ refresh_token": {"typ": "refresh_token"},
}


@pytest.mark.parametrize(
    ("aud", "require_audience"),
    [(AUDIENCE, True), (AUDIENCE, False), (None, False)],  # without aud and required: refused for that already
    ids=["aud required", "aud not required, with aud", "aud not required, without aud"],
)
@pytest.mark.parametrize("kind", list(OTHER_KINDS.values()), ids=list(OTHER_KINDS))
async def test_an_answer_naming_another_kind_of_token_is_refused_whichever_the_audience_rule(
    make: MakeIntrospector, http: FakeHttp, kind: dict[str, Any], aud: str | None, require_audience: bool
) -> None:
    """RFC 6749 section 1.5: a refresh token never goes to a resource server, nor does an ID token. A provider that
    answers one active says what it is in `token_type` (RFC 7662) or `typ` (Keycloak: `Refresh`, `Offline`, `ID`),
    each its own way: anything but an access token type is refused (an allow-list), and not taken as the user's
    access token for as long as the refresh token lives. Before, only four spellings were refused and `typ` was not
    read: a stolen Keycloak refresh token was the user's access token."""
    http.answers["rt"] = active(aud=aud, **kind)
    with pytest.raises(WrongTokenType) as caught:
        await check(make(require_audience=require_audience), "rt")
    assert caught.value.code == "token_type_invalid"


JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
# What providers answer for their access tokens.
ACCESS_KINDS = {
    "node-oidc-provider, Okta": {"token_type": "Bearer"},
    "upper case": {"token_type": "BEARER"},
    "access_token": {"token_type": "access_token"},
    "RFC 8693 URI": {"token_type": "urn:ietf:params:oauth:token-type:access_token"},
    "DPoP with its key": {"token_type": "DPoP", "cnf": {"jkt": JKT}},
    "Keycloak access token": {"token_type": "Bearer", "typ": "Bearer"},
    "Keycloak DPoP token": {"token_type": "DPoP", "typ": "DPoP", "cnf": {"jkt": JKT}},
    "typ at+jwt (RFC 9068)": {"token_type": "Bearer", "typ": "at+jwt"},
    "typ empty": {"token_type": "Bearer", "typ": ""},
    "typ null": {"token_type": "Bearer", "typ": None},
}
# Answers whose `aud`, `token_type` or `typ` is of no type RFC 7662 (or Keycloak) gives it.
MALFORMED = {
    "aud a number": {"aud": 7},
    "aud an object": {"aud": {"uri": AUDIENCE}},
    "aud an empty list": {"aud": []},
    "aud of no string": {"aud": [7]},
    "aud with a number beside ours": {"aud": [AUDIENCE, 7]},
    "aud with a null beside ours": {"aud": [AUDIENCE, None]},
    "aud true": {"aud": True},
    "aud empty": {"aud": ""},
    "aud a list of empty": {"aud": [""]},
    "aud a list of empties": {"aud": ["", ""]},
    "token_type a list": {"token_type": ["Bearer"]},
    "token_type a number": {"token_type": 1},
    "typ an object": {"typ": {"kind": "Bearer"}},
}
EITHER_AUDIENCE_RULE = pytest.mark.parametrize(
    "require_audience", [True, False], ids=["aud required", "aud not required"]
)


@pytest.mark.parametrize("kind", list(ACCESS_KINDS.values()), ids=list(ACCESS_KINDS))
@EITHER_AUDIENCE_RULE
async def test_an_answer_naming_an_access_token_type_is_taken(
    make: MakeIntrospector, http: FakeHttp, kind: dict[str, Any], require_audience: bool
) -> None:
    http.answers["tok"] = active(**kind)
    assert (await check(make(require_audience=require_audience), "tok")).subject == "user-1"


@pytest.mark.parametrize("malformed", list(MALFORMED.values()), ids=list(MALFORMED))
@EITHER_AUDIENCE_RULE
async def test_a_malformed_aud_or_kind_is_refused_not_taken_as_absent(
    make: MakeIntrospector, http: FakeHttp, malformed: dict[str, Any], require_audience: bool
) -> None:
    """RFC 7662 section 2.2: `aud` is a string or an array of strings. One that is neither (a number, an object, an
    empty array, an array holding a non-string) is an answer we do not understand: counted as absent, it passed
    wherever `aud` may be absent (`require_audience: false`), and a list with our audience beside junk passed
    everywhere. Refused as malformed (`claim_invalid`), as is a `token_type` or `typ` that is not a string."""
    http.answers["tok"] = active(**malformed)
    with pytest.raises(ClaimInvalid) as caught:
        await check(make(require_audience=require_audience), "tok")
    assert caught.value.code == "claim_invalid"
    assert caught.value.claim in malformed


@pytest.mark.parametrize("batch", [False, True], ids=["rfc7662", "batch"])
async def test_a_refused_refresh_token_is_remembered_and_not_asked_about_again(
    make: MakeIntrospector, http: FakeHttp, clock: FrozenClock, registry: CollectorRegistry, batch: bool
) -> None:
    """A refused answer is remembered as an inactive one is (`negative_ttl_seconds`), on the RFC 7662 and the batch
    path alike: where the pipeline does not remember a refusal (several opaque providers; `introspect_jwts`, a check
    run on every request), a stolen refresh token replayed in a loop was one provider call per request."""
    introspector = (
        make(batch_endpoint=BATCH_ENDPOINT, negative_ttl_seconds=10) if batch else make(negative_ttl_seconds=10)
    )
    http.answers["rt"] = active(typ="Refresh")
    http.answers["junk-aud"] = active(aud=[AUDIENCE, 7])
    for token, refusal in (("rt", WrongTokenType), ("junk-aud", ClaimInvalid)):
        for _ in range(3):
            with pytest.raises(refusal):
                await check(introspector, token)
    assert http.tokens_asked() == ["rt", "junk-aud"]
    assert sample(registry, "verifier_introspection_cache_total", polarity="negative", result="hit") == 4
    clock.advance(10)
    with pytest.raises(WrongTokenType):
        await check(introspector, "rt")
    assert http.tokens_asked() == ["rt", "junk-aud", "rt"]


async def test_introspect_jwts_refuses_a_refresh_token_by_the_same_rule_once(
    make: MakeIntrospector, http: FakeHttp
) -> None:
    """`introspect_jwts` asks the provider about a verified JWT on every request: the answer is read by the same rule
    (a Keycloak refresh token, a JWT, answers `typ: Refresh`), and the refusal is remembered by the introspector, since
    the pipeline keeps the JWT's own admission and runs the check again."""
    introspector = make()
    http.answers["eyJ.refresh.jwt"] = active(typ="Refresh")
    check_jwts = IntrospectJwts(frozenset({ISSUER}), {ISSUER: introspector})
    principal = Principal(ISSUER, "user-1", "client-1", (), frozenset(), NOW + 300, {"iss": ISSUER})
    credential = Credential(TokenScheme.BEARER, "eyJ.refresh.jwt")
    assert check_jwts.for_token(principal, credential)
    for _ in range(2):
        with pytest.raises(WrongTokenType):
            await check_jwts.check(principal, credential, None, None)  # type: ignore[arg-type]  # unused by it
    assert http.tokens_asked() == ["eyJ.refresh.jwt"]


async def test_an_audience_in_a_list_is_enough(make: MakeIntrospector, http: FakeHttp) -> None:
    http.answers["tok"] = active(aud=["https://x.test", AUDIENCE])
    assert (await check(make(), "tok")).subject == "user-1"
    http.answers["tok2"] = active(aud=["", AUDIENCE])  # a list naming an audience is judged by the ones it names
    assert (await check(make(), "tok2")).subject == "user-1"


# -- single flight and batching ----------------------------------------------------------------


async def test_concurrent_requests_for_one_token_share_one_provider_call(
    make: MakeIntrospector, http: FakeHttp, registry: CollectorRegistry
) -> None:
    http.answers["tok"] = active()
    http.delay = 0.02
    introspector = make()
    principals = await asyncio.gather(*(check(introspector, "tok") for _ in range(50)))
    assert {p.subject for p in principals} == {"user-1"}
    assert len(http.posts) == 1
    assert sample(registry, "verifier_introspection_coalesced_total") == 49
    assert sample(registry, "verifier_introspection_calls_total", result="ok") == 1


async def test_concurrent_requests_for_an_inactive_token_share_one_call_and_each_get_an_error(
    make: MakeIntrospector, http: FakeHttp
) -> None:
    introspector = make()
    results = await asyncio.gather(*(check(introspector, "garbage") for _ in range(10)), return_exceptions=True)
    assert len(http.posts) == 1
    assert all(isinstance(r, InvalidToken) and r.code == "token_inactive" for r in results)
    assert len({id(r) for r in results}) == 10, "each waiter raises its own exception object"


async def test_distinct_tokens_within_the_window_go_to_the_batch_endpoint_in_one_call(
    make: MakeIntrospector, http: FakeHttp, registry: CollectorRegistry
) -> None:
    tokens = [f"tok-{i}" for i in range(20)]
    for i, token in enumerate(tokens):
        http.answers[token] = active(sub=f"user-{i}")
    introspector = make(batch_endpoint=BATCH_ENDPOINT, batch_window_seconds=0.01)
    principals = await asyncio.gather(*(check(introspector, t) for t in tokens))
    assert [p.subject for p in principals] == [f"user-{i}" for i in range(20)]
    assert len(http.posts) == 1
    assert sorted(http.tokens_asked()) == sorted(tokens)
    assert sample(registry, "verifier_introspection_batch_size_count") == 1
    assert sample(registry, "verifier_introspection_batch_size_sum") == 20


async def test_a_batch_mixes_active_and_inactive_answers(make: MakeIntrospector, http: FakeHttp) -> None:
    http.answers["good"] = active()
    introspector = make(batch_endpoint=BATCH_ENDPOINT, batch_window_seconds=0.01)
    good, bad = await asyncio.gather(check(introspector, "good"), check(introspector, "bad"), return_exceptions=True)
    assert not isinstance(good, BaseException) and good.subject == "user-1"
    assert isinstance(bad, InvalidToken) and bad.code == "token_inactive"
    assert len(http.posts) == 1


async def test_a_lone_surrogate_in_a_batch_refuses_its_own_token_only(make: MakeIntrospector, http: FakeHttp) -> None:
    """The batch's text holds the escape; only the answer that holds the lone surrogate is refused."""
    http.answers["good"] = active()
    http.answers["odd"] = active(sub="user-\ud800")
    introspector = make(batch_endpoint=BATCH_ENDPOINT, batch_window_seconds=0.01)
    good, odd = await asyncio.gather(check(introspector, "good"), check(introspector, "odd"), return_exceptions=True)
    assert not isinstance(good, BaseException) and good.subject == "user-1"
    assert isinstance(odd, ClaimInvalid) and odd.code == "claim_invalid"
    assert len(http.posts) == 1


async def test_a_batch_looks_up_no_running_loop_once_the_introspector_has_run(
    make: MakeIntrospector, http: FakeHttp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch path (the window's timer, the batch's task, the client's call) uses the loop the introspector
    and the client kept: no `get_running_loop()` (a getpid() system call on CPython 3.11) per batch (#24 goal 7)."""
    for token in ("warm", "a", "b"):
        http.answers[token] = active()
    introspector = make(batch_endpoint=BATCH_ENDPOINT, batch_window_seconds=0.01)
    await check(introspector, "warm")
    lookups = count_loop_lookups(monkeypatch)
    principals = await asyncio.gather(check(introspector, "a"), check(introspector, "b"))
    assert [p.subject for p in principals] == ["user-1", "user-1"]
    assert len(http.posts) == 2  # the warm-up's batch, then this one
    assert lookups == []


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
async def test_an_answer_not_in_utf_8_is_malformed(
    make: MakeIntrospector, http: FakeHttp, registry: CollectorRegistry, encoding: str
) -> None:
    """RFC 8259 section 8.1: JSON between systems is UTF-8; `json.loads` would guess UTF-16/32 or skip a BOM."""
    http.answers["tok"] = active()
    http.encoding = encoding
    with pytest.raises(ProviderUnavailable, match="malformed JSON"):
        await check(make(), "tok")
    assert sample(registry, "verifier_introspection_calls_total", result="malformed") == 1


async def test_without_a_batch_endpoint_each_token_gets_its_own_post_at_once(
    make: MakeIntrospector, http: FakeHttp, registry: CollectorRegistry
) -> None:
    """RFC 7662 takes one token per POST: nothing to gather, so the batch window never delays one."""
    tokens = [f"tok-{i}" for i in range(8)]
    for token in tokens:
        http.answers[token] = active()
    introspector = make(batch_window_seconds=10.0)
    async with asyncio.timeout(2):
        await asyncio.gather(*(check(introspector, t) for t in tokens))
    assert len(http.posts) == 8
    assert sorted(http.tokens_asked()) == sorted(tokens)
    assert sample(registry, "verifier_introspection_batch_size_count") == 8  # eight dispatches of one


async def test_a_full_batch_is_sent_without_waiting_for_the_window(make: MakeIntrospector, http: FakeHttp) -> None:
    for i in range(4):
        http.answers[f"tok-{i}"] = active()
    introspector = make(batch_endpoint=BATCH_ENDPOINT, batch_window_seconds=10.0, max_batch_size=2)
    async with asyncio.timeout(2):
        await asyncio.gather(*(check(introspector, f"tok-{i}") for i in range(4)))
    assert len(http.posts) == 2


def batch_tokens(request: HttpRequest) -> list[str]:
    return list(json.loads(request.body)["tokens"])


async def turns(n: int) -> None:
    """n turns of the loop: each token below arrives in a turn of its own, as requests from different connections."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_with_the_batch_calls_at_their_bound_tokens_arriving_in_turns_gather_into_one_call(
    make: MakeIntrospector, http: FakeHttp
) -> None:
    """Group commit (#24 goal 7): with `max_batches_in_flight` batch calls under way, tokens that arrive one loop turn
    apart (a window of 0 would send each at the end of its own turn) share the next call."""
    for token in ("warm", "a", "b", "c", "d"):
        http.answers[token] = active()
    introspector = make(batch_endpoint=BATCH_ENDPOINT, batch_window_seconds=0, max_batches_in_flight=1)
    http.delay = 0.2
    await check(introspector, "warm")  # a call's duration, learned: ~0.2 s
    first = asyncio.ensure_future(check(introspector, "a"))
    await turns(3)
    assert [batch_tokens(r) for r in http.posts[1:]] == [["a"]]  # no call under way: sent at once
    rest = []
    for token in ("b", "c", "d"):
        rest.append(asyncio.ensure_future(check(introspector, token)))
        await turns(3)
    async with asyncio.timeout(2):
        await asyncio.gather(first, *rest)
    assert [batch_tokens(r) for r in http.posts[1:]] == [["a"], ["b", "c", "d"]]


async def test_below_the_bound_a_token_is_not_held_for_the_calls_under_way(
    make: MakeIntrospector, http: FakeHttp
) -> None:
    for token in ("warm", "a", "b"):
        http.answers[token] = active()
    introspector = make(batch_endpoint=BATCH_ENDPOINT, batch_window_seconds=0, max_batches_in_flight=2)
    http.delay = 0.2
    await check(introspector, "warm")
    first = asyncio.ensure_future(check(introspector, "a"))
    await turns(3)
    second = asyncio.ensure_future(check(introspector, "b"))
    await turns(3)
    assert [batch_tokens(r) for r in http.posts[1:]] == [["a"], ["b"]]  # one under way of two: b went at once
    async with asyncio.timeout(2):
        await asyncio.gather(first, second)


async def test_a_slow_provider_does_not_hold_gathered_tokens_for_a_whole_call(
    make: MakeIntrospector, http: FakeHttp
) -> None:
    """The gathering is bounded (25 ms), not the end of a call under way: a provider answering in 1 s would
    otherwise double every gathered token's wait."""
    for token in ("warm", "a", "b"):
        http.answers[token] = active()
    introspector = make(batch_endpoint=BATCH_ENDPOINT, batch_window_seconds=0, max_batches_in_flight=1)
    http.delay = 1.0
    await check(introspector, "warm")
    loop = asyncio.get_running_loop()
    first = asyncio.ensure_future(check(introspector, "a"))
    await turns(3)
    began = loop.time()
    second = asyncio.ensure_future(check(introspector, "b"))
    while len(http.posts) < 3 and loop.time() - began < 0.9:
        await asyncio.sleep(0.005)
    assert [batch_tokens(r) for r in http.posts[1:]] == [["a"], ["b"]]
    assert loop.time() - began < 0.5  # about 25 ms; "a" is still under way
    async with asyncio.timeout(3):
        await asyncio.gather(first, second)


async def test_in_flight_provider_calls_are_bounded(make: MakeIntrospector, http: FakeHttp) -> None:
    peak = 0
    current = 0
    original = http.send

    async def counting(request: HttpRequest) -> HttpReply:
        nonlocal peak, current
        current += 1
        peak = max(peak, current)
        try:
            await asyncio.sleep(0.01)
            return await original(request)
        finally:
            current -= 1

    http.send = counting  # type: ignore[method-assign]
    for i in range(30):
        http.answers[f"tok-{i}"] = active()
    introspector = make(max_in_flight=3)
    await asyncio.gather(*(check(introspector, f"tok-{i}") for i in range(30)))
    assert len(http.posts) == 30
    assert peak == 3


async def test_a_cancelled_waiter_does_not_cancel_the_call_others_wait_for(
    make: MakeIntrospector, http: FakeHttp
) -> None:
    http.answers["tok"] = active()
    http.delay = 0.05
    introspector = make()
    first = asyncio.create_task(check(introspector, "tok"))
    second = asyncio.create_task(check(introspector, "tok"))
    await asyncio.sleep(0.01)
    first.cancel()
    assert (await second).subject == "user-1"
    assert len(http.posts) == 1


def test_an_introspector_asked_from_one_loop_then_another_answers_on_each(
    http: FakeHttp, clock: FrozenClock, registry: CollectorRegistry
) -> None:
    """It keeps the loop it last ran on (no lookup per token, #24 goal 7), but not once that loop has stopped:
    a later loop (a test's next one; the first left open, not closed) gets its own futures and calls."""
    http.answers.update(first=active(), second=active(sub="user-2"))
    introspector = build_introspector(
        issuer=ISSUER, audiences=(AUDIENCE,), config=config(), endpoint=None, clock=clock, registry=registry, http=http
    )
    one, other = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        assert one.run_until_complete(check(introspector, "first")).subject == "user-1"
        assert other.run_until_complete(check(introspector, "second")).subject == "user-2"
        other.run_until_complete(introspector.close())
    finally:
        one.close()
        other.close()


# -- caches ------------------------------------------------------------------------------------


async def test_an_active_answer_is_reused_until_the_positive_ttl(
    make: MakeIntrospector, http: FakeHttp, clock: FrozenClock, registry: CollectorRegistry
) -> None:
    http.answers["tok"] = active(exp=int(NOW) + 3600)
    introspector = make(positive_ttl_seconds=60)
    await check(introspector, "tok")
    clock.advance(59)
    await check(introspector, "tok")
    assert len(http.posts) == 1
    assert sample(registry, "verifier_introspection_cache_total", polarity="positive", result="hit") == 1
    clock.advance(2)
    await check(introspector, "tok")
    assert len(http.posts) == 2


async def test_an_active_answer_is_never_reused_past_the_tokens_exp(
    make: MakeIntrospector, http: FakeHttp, clock: FrozenClock
) -> None:
    http.answers["tok"] = active(exp=int(NOW) + 30)
    introspector = make(positive_ttl_seconds=600)
    principal = await check(introspector, "tok")
    assert principal.expires_at == NOW + 30
    clock.advance(29)
    await check(introspector, "tok")
    assert len(http.posts) == 1
    clock.advance(2)
    http.answers["tok"] = {"active": False}
    with pytest.raises(InvalidToken):
        await check(introspector, "tok")
    assert len(http.posts) == 2


async def test_an_inactive_answer_is_reused_for_the_negative_ttl(
    make: MakeIntrospector, http: FakeHttp, clock: FrozenClock, registry: CollectorRegistry
) -> None:
    introspector = make(negative_ttl_seconds=10)
    for _ in range(3):
        with pytest.raises(InvalidToken, match="not active"):
            await check(introspector, "garbage")
    assert len(http.posts) == 1
    assert sample(registry, "verifier_introspection_cache_total", polarity="negative", result="hit") == 2
    clock.advance(10)
    with pytest.raises(InvalidToken):
        await check(introspector, "garbage")
    assert len(http.posts) == 2


@pytest.mark.parametrize("fault", [503, 500, 401, "timeout", "down"], ids=str)
async def test_failures_are_never_cached(make: MakeIntrospector, http: FakeHttp, fault: int | str) -> None:
    http.answers["tok"] = active()
    http.fault = fault
    introspector = make(timeout_seconds=0.05)
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            await check(introspector, "tok")
    assert len(http.posts) == 2
    http.fault = None
    assert (await check(introspector, "tok")).subject == "user-1"


@pytest.mark.parametrize(
    "answer", [{}, {"error": "temporarily_unavailable"}, {"active": None}, {"status": "ok"}], ids=str
)
@pytest.mark.parametrize("batch", [False, True], ids=["rfc7662", "batch"])
async def test_an_answer_without_active_is_a_provider_failure_never_a_remembered_refusal(
    make: MakeIntrospector, http: FakeHttp, answer: dict[str, Any], batch: bool
) -> None:
    """RFC 7662 section 2.2: `active` is REQUIRED. A 200 without it (an error object from a provider in trouble, the
    wrong endpoint configured) is no verdict on the token: taken as inactive, every user's valid token was refused
    and remembered refused (here and in the pipeline's negative cache) after the provider had recovered."""
    introspector = make(batch_endpoint=BATCH_ENDPOINT) if batch else make()
    http.answers["tok"] = answer
    with pytest.raises(ProviderUnavailable):
        await check(introspector, "tok")
    http.answers["tok"] = active()
    assert (await check(introspector, "tok")).subject == "user-1"


async def test_a_slow_provider_times_out_as_provider_unavailable(
    make: MakeIntrospector, http: FakeHttp, registry: CollectorRegistry
) -> None:
    http.answers["tok"] = active()
    http.delay = 1.0
    with pytest.raises(ProviderUnavailable, match="timed out"):
        await check(make(timeout_seconds=0.05), "tok")
    assert sample(registry, "verifier_introspection_calls_total", result="timeout") == 1


async def test_caches_are_bounded(make: MakeIntrospector, http: FakeHttp) -> None:
    for i in range(3):
        http.answers[f"tok-{i}"] = active()
    introspector = make(positive_entries=2)
    for i in range(3):
        await check(introspector, f"tok-{i}")
    await check(introspector, "tok-0")  # evicted first in, first out
    assert len(http.posts) == 4


# -- serving stale answers ---------------------------------------------------------------------


async def test_serve_stale_on_error_answers_from_a_still_valid_cached_positive(
    make: MakeIntrospector, http: FakeHttp, clock: FrozenClock, registry: CollectorRegistry
) -> None:
    http.answers["tok"] = active(exp=int(NOW) + 3600)
    introspector = make(positive_ttl_seconds=60, serve_stale_on_error=True, stale_ttl_seconds=300)
    await check(introspector, "tok")
    clock.advance(120)
    http.fault = 503
    assert (await check(introspector, "tok")).subject == "user-1"
    assert len(http.posts) == 2, "a stale answer stands in only after the provider was asked"
    assert sample(registry, "verifier_introspection_cache_total", polarity="stale", result="hit") == 1
    clock.advance(300)  # past the stale bound
    with pytest.raises(ProviderUnavailable):
        await check(introspector, "tok")


async def test_serve_stale_never_outlives_the_tokens_exp(
    make: MakeIntrospector, http: FakeHttp, clock: FrozenClock
) -> None:
    http.answers["tok"] = active(exp=int(NOW) + 90)
    introspector = make(positive_ttl_seconds=60, serve_stale_on_error=True, stale_ttl_seconds=3600)
    await check(introspector, "tok")
    clock.advance(91)
    http.fault = "down"
    with pytest.raises(ProviderUnavailable):
        await check(introspector, "tok")


async def test_without_serve_stale_a_down_provider_fails_closed(
    make: MakeIntrospector, http: FakeHttp, clock: FrozenClock
) -> None:
    http.answers["tok"] = active(exp=int(NOW) + 3600)
    introspector = make(positive_ttl_seconds=60)
    await check(introspector, "tok")
    clock.advance(61)
    http.fault = "timeout"
    with pytest.raises(ProviderUnavailable):
        await check(make(positive_ttl_seconds=60, timeout_seconds=0.05), "tok")


@pytest.mark.parametrize(
    "later",
    [{"active": False}, active(exp=int(NOW) + 3600, typ="Refresh"), active(exp=int(NOW) + 3600, aud=[AUDIENCE, 7])],
    ids=["revoked", "now answered as a refresh token", "now answered malformed"],
)
async def test_a_revoked_token_is_not_served_stale(
    make: MakeIntrospector, http: FakeHttp, clock: FrozenClock, later: dict[str, Any]
) -> None:
    """Nor is a token the provider now answers as another kind, or malformed: a refused answer drops the cached one."""
    http.answers["tok"] = active(exp=int(NOW) + 3600)
    introspector = make(positive_ttl_seconds=60, negative_ttl_seconds=5, serve_stale_on_error=True)
    await check(introspector, "tok")
    clock.advance(61)
    http.answers["tok"] = later
    with pytest.raises(InvalidToken):
        await check(introspector, "tok")
    clock.advance(6)
    http.fault = 503
    with pytest.raises(ProviderUnavailable):
        await check(introspector, "tok")


# -- circuit breaker ---------------------------------------------------------------------------


async def test_the_breaker_opens_fails_fast_then_half_opens_after_the_cooldown(
    make: MakeIntrospector, http: FakeHttp, clock: FrozenClock, registry: CollectorRegistry
) -> None:
    http.answers["tok"] = active()
    http.fault = 503
    introspector = make(breaker_failures=3, breaker_cooldown_seconds=5)
    for i in range(3):
        with pytest.raises(ProviderUnavailable):
            await check(introspector, f"tok-{i}")
        clock.advance(1)  # failing for the success window (2 s) without an answer: the count decides
    assert introspector.breaker.state is BreakerState.OPEN
    assert sample(registry, "verifier_introspection_breaker_state") == 1
    for _ in range(5):
        with pytest.raises(ProviderUnavailable, match="circuit open"):
            await check(introspector, "tok")
    assert len(http.posts) == 3, "an open breaker sends nothing"
    assert sample(registry, "verifier_introspection_calls_total", result="circuit_open") == 5

    clock.advance(5)
    assert introspector.breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(ProviderUnavailable):  # the probe (a token of our own) fails: open for another cool-down
        await check(introspector, "tok")
    assert len(http.posts) == 4 and http.tokens_asked()[-1] != "tok"
    assert introspector.breaker.state is BreakerState.OPEN
    with pytest.raises(ProviderUnavailable, match="circuit open"):
        await check(introspector, "tok")

    clock.advance(5)
    http.fault = None
    assert (await check(introspector, "tok")).subject == "user-1"  # the probe (ours failed: the caller's) succeeds
    assert http.tokens_asked()[-1] == "tok" and len(http.posts) == 5
    assert introspector.breaker.state is BreakerState.CLOSED
    assert sample(registry, "verifier_introspection_breaker_state") == 0


async def test_half_open_lets_exactly_one_probe_through(
    make: MakeIntrospector, http: FakeHttp, clock: FrozenClock
) -> None:
    http.fault = "down"
    introspector = make(breaker_failures=1, breaker_cooldown_seconds=1, batch_window_seconds=0)
    for first in ("a", "b"):  # failing for the success window (2 s) without an answer
        with pytest.raises(ProviderUnavailable):
            await check(introspector, first)
        clock.advance(2)
    http.fault = None
    http.delay = 0.02
    for i in range(5):
        http.answers[f"t{i}"] = active()
    results = await asyncio.gather(*(check(introspector, f"t{i}") for i in range(5)), return_exceptions=True)
    assert len(http.posts) == 4  # the two failures, one probe (a token of our own) and the prober's own token
    assert http.tokens_asked()[:2] == ["a", "b"] and http.tokens_asked()[2] not in {f"t{i}" for i in range(5)}
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert introspector.breaker.state is BreakerState.CLOSED


async def test_inactive_answers_do_not_count_as_provider_failures(make: MakeIntrospector, http: FakeHttp) -> None:
    introspector = make(breaker_failures=2)
    for i in range(5):
        with pytest.raises(InvalidToken):
            await check(introspector, f"garbage-{i}")
    assert introspector.breaker.state is BreakerState.CLOSED


# -- a failed batch: split, so one token the provider fails for fails alone -------------------------------


def batch_of(request: HttpRequest) -> list[str]:
    tokens: list[str] = json.loads(request.body)["tokens"]
    return tokens


async def outcomes(introspector: Introspector, tokens: list[str]) -> dict[str, Any]:
    results = await asyncio.gather(*(check(introspector, t) for t in tokens), return_exceptions=True)
    return dict(zip(tokens, results, strict=True))


@pytest.mark.parametrize("poison", [400, 413, 500, 502, "malformed", "short", "too_large"])
async def test_a_batch_the_provider_fails_for_one_token_fails_that_token_alone(
    make: MakeIntrospector, http: FakeHttp, registry: CollectorRegistry, poison: int | str
) -> None:
    """An attacker's token the provider chokes on (a 400, a 500, an answer that is not JSON or one result short)
    used to fail every user's token that shared its batch window. Our own token alone tells the provider is up;
    the batch is then split in halves down to the poison: the others get their answers, inactive ones cached."""
    good = [f"user-{i}" for i in range(6)]
    for i, token in enumerate(good):
        http.answers[token] = active(sub=f"user-{i}")
    http.poison["evil"] = poison
    introspector = make(batch_endpoint=BATCH_ENDPOINT, batch_window_seconds=0.01)
    batch = [*good[:3], "evil", *good[3:], "gone"]
    results = await outcomes(introspector, batch)
    assert [results[t].subject for t in good] == [f"user-{i}" for i in range(6)]
    assert isinstance(results["evil"], ProviderUnavailable)
    assert isinstance(results["gone"], InvalidToken) and results["gone"].code == "token_inactive"
    asked = [batch_of(r) for r in http.posts]
    assert asked[0] == batch
    (ours,) = asked[1]  # is the provider up? a token of our own, alone: nobody else's to choose
    assert ours not in batch
    # 8 tokens, one poison: the halves of 8, of the 4 holding it, of the 2 holding it. At most 2n - 2 in any case.
    assert len(asked) == 2 + 6 <= 2 + 2 * len(batch) - 2
    assert ["evil"] in asked
    assert introspector.breaker.state is BreakerState.CLOSED
    assert sample(registry, "verifier_introspection_failed_batches_total", handling="split") == 1
    calls = len(http.posts)
    with pytest.raises(InvalidToken, match="not active"):  # the inactive answer was kept: no call
        await check(introspector, "gone")
    assert len(http.posts) == calls
    assert sample(registry, "verifier_introspection_cache_total", polarity="negative", result="hit") == 1


async def test_a_batch_with_a_poison_token_in_each_half_still_answers_every_other_token(
    make: MakeIntrospector, http: FakeHttp
) -> None:
    good = [f"user-{i}" for i in range(14)]
    for token in good:
        http.answers[token] = active()
    http.poison.update({"evil-1": 500, "evil-2": 400})
    introspector = make(batch_endpoint=BATCH_ENDPOINT, batch_window_seconds=0.01)
    batch = ["evil-1", *good, "evil-2"]
    results = await outcomes(introspector, batch)
    assert all(results[t].subject == "user-1" for t in good)
    assert isinstance(results["evil-1"], ProviderUnavailable) and isinstance(results["evil-2"], ProviderUnavailable)
    assert len(http.posts) <= 2 + 2 * len(batch) - 2


async def test_a_split_batch_keeps_the_batch_s_deadline_not_one_per_call(
    make: MakeIntrospector, http: FakeHttp
) -> None:
    """The halves of a failed batch, and our own token's call before them, share the batch's deadline: a provider
    answering each call in 0.3 s took five calls in a row (the batch, ours, three levels of halves), 1.5 s, against
    a 0.5 s timeout, because `introspect_batch` dropped the deadline it was given and gave each call its own. The
    tokens not answered by then fail (503), at the deadline."""
    good = [f"user-{i}" for i in range(7)]
    for token in good:
        http.answers[token] = active()
    http.poison["evil"] = 400
    http.delay = 0.3
    introspector = make(batch_endpoint=BATCH_ENDPOINT, batch_window_seconds=0.01, timeout_seconds=0.5)
    started = time.monotonic()
    results = await outcomes(introspector, [*good[:3], "evil", *good[3:]])
    elapsed = time.monotonic() - started
    assert elapsed < 1.1, elapsed  # the deadline (0.5 s) and a window, not five calls of 0.3 s
    assert isinstance(results["evil"], ProviderUnavailable)
    assert any(isinstance(results[t], ProviderUnavailable) for t in good)  # not all answered by the deadline


@pytest.mark.parametrize("poison", [503, 504, 429, 408, "timeout"])
async def test_a_batch_that_says_the_provider_is_down_or_throttling_is_not_asked_again(
    make: MakeIntrospector, http: FakeHttp, registry: CollectorRegistry, poison: int | str
) -> None:
    """503, 504, 429, 408 and a timeout say the provider is overloaded, slow or throttling (and the batch's deadline
    has passed, for a timeout): asking again, token by token, would multiply calls to a provider that cannot
    take them. Every token fails, from one call, as before."""
    for i in range(4):
        http.answers[f"user-{i}"] = active()
    http.poison["evil"] = poison
    introspector = make(batch_endpoint=BATCH_ENDPOINT, batch_window_seconds=0.01, timeout_seconds=0.1)
    results = await outcomes(introspector, ["user-0", "user-1", "evil", "user-2", "user-3"])
    assert all(isinstance(r, ProviderUnavailable) for r in results.values())
    assert len(http.posts) == 1
    assert sample(registry, "verifier_introspection_failed_batches_total", handling="failed") == 1


@pytest.mark.parametrize(
    ("fault", "split"), [(500, True), (502, True), (400, True), (503, False), ("timeout", False), ("down", False)]
)
async def test_a_provider_that_fails_every_call_still_fails_fast_and_opens_the_breaker(
    make: MakeIntrospector, http: FakeHttp, clock: FrozenClock, fault: int | str, split: bool
) -> None:
    """A provider that is down fails our own token too: the batch fails as before, for one call more at most (a
    failure one token may have caused), never one per token; the breaker opens once the window has passed without
    an answer (4xx aside: a refusal is an answer), and then no call goes out."""
    http.fault = fault
    introspector = make(
        batch_endpoint=BATCH_ENDPOINT, batch_window_seconds=0.01, timeout_seconds=0.1, breaker_failures=3
    )
    per_round: list[int] = []
    for round_ in range(4):
        calls = len(http.posts)
        results = await outcomes(introspector, [f"user-{round_}-{i}" for i in range(8)])
        assert all(isinstance(r, ProviderUnavailable) for r in results.values())
        per_round.append(len(http.posts) - calls)
        clock.advance(1)
    first = batch_of(http.posts[0]) if fault != "timeout" else []
    if split:
        assert per_round[0] == 2 and len(batch_of(http.posts[1])) == 1  # the batch, then our own token: no more
        assert batch_of(http.posts[1])[0] not in first
    else:
        assert per_round[0] == 1
    assert all(n <= 2 for n in per_round)
    if fault == 400:  # the provider answers (it refuses us): not a fault, never opens the breaker
        assert introspector.breaker.state is BreakerState.CLOSED
    else:
        assert introspector.breaker.state is BreakerState.OPEN and per_round[-1] == 0


async def test_a_steady_trickle_of_poison_tokens_neither_fails_users_nor_opens_the_breaker(
    make: MakeIntrospector, http: FakeHttp, clock: FrozenClock
) -> None:
    """An attacker puts one token the provider fails for (500) in every batch window, for longer than the success
    window (2 s): every batch used to fail, no call succeeded, and the breaker opened for every user. Now each
    batch is split: the users' tokens are answered, the provider is seen answering, and the breaker stays closed."""
    introspector = make(batch_endpoint=BATCH_ENDPOINT, batch_window_seconds=0.01, breaker_failures=3)
    for round_ in range(8):
        users = [f"user-{round_}-{i}" for i in range(3)]
        for token in users:
            http.answers[token] = active()
        http.poison[f"evil-{round_}"] = 500
        calls = len(http.posts)
        results = await outcomes(introspector, [users[0], f"evil-{round_}", *users[1:]])
        assert [results[t].subject for t in users] == ["user-1"] * 3, round_
        assert isinstance(results[f"evil-{round_}"], ProviderUnavailable)
        assert len(http.posts) - calls <= 2 + 2 * 4 - 2
        assert introspector.breaker.state is BreakerState.CLOSED, round_
        clock.advance(1)


# -- client authentication and endpoints ---------------------------------------------------------


async def test_client_secret_basic_urlencodes_then_base64s_the_credentials(
    make: MakeIntrospector, http: FakeHttp
) -> None:
    http.answers["tok"] = active()
    await check(make(), "tok")
    headers = dict(http.posts[0].headers)
    scheme, _, value = headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    raw_id, _, raw_secret = base64.b64decode(value).decode().partition(":")
    assert (urllib.parse.unquote(raw_id), urllib.parse.unquote(raw_secret)) == ("verifier", SECRET)
    assert form(http.posts[0]) == {"token": "tok", "token_type_hint": "access_token"}
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"


async def test_client_secret_post_puts_the_credentials_in_the_body(make: MakeIntrospector, http: FakeHttp) -> None:
    http.answers["tok"] = active()
    await check(make(client_auth=ClientAuth.CLIENT_SECRET_POST), "tok")
    assert "Authorization" not in dict(http.posts[0].headers)
    body = form(http.posts[0])
    assert (body["client_id"], body["client_secret"], body["token"]) == ("verifier", SECRET, "tok")


@pytest.mark.parametrize("client_auth", [ClientAuth.CLIENT_SECRET_BASIC, ClientAuth.CLIENT_SECRET_POST])
@pytest.mark.parametrize("token", ["a b&c=d+e%f", "tok\r\nX-Evil: 1", "t\u00e9\u2603", "token_type_hint=refresh_token"])
async def test_the_form_body_is_exactly_urlencode_of_the_token_and_the_credentials(
    make: MakeIntrospector, http: FakeHttp, client_auth: ClientAuth, token: str
) -> None:
    # The credentials are encoded once, the token per call: the body must be what urlencode writes.
    with pytest.raises(InvalidToken):  # no answer for it: inactive
        await check(make(client_auth=client_auth, client_secret="s&e=c r+t%"), token)
    post = client_auth is ClientAuth.CLIENT_SECRET_POST
    fields = {"client_id": "verifier", "client_secret": "s&e=c r+t%"} if post else {}
    expected = urllib.parse.urlencode({"token": token, "token_type_hint": "access_token", **fields}).encode()
    assert http.posts[0].body == expected
    assert urllib.parse.parse_qs(http.posts[0].body.decode()) == {
        "token": [token],
        "token_type_hint": ["access_token"],
        **{k: [v] for k, v in fields.items()},
    }


async def test_private_key_jwt_sends_a_fresh_rfc7523_assertion_per_call(make: MakeIntrospector, http: FakeHttp) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    http.answers["a"] = http.answers["b"] = active()
    introspector = make(
        client_auth=ClientAuth.PRIVATE_KEY_JWT, client_secret="", private_key=key, assertion_alg="ES256"
    )
    await check(introspector, "a")
    await check(introspector, "b")
    jtis = set()
    for request in http.posts:
        body = form(request)
        assert body["client_assertion_type"] == ASSERTION_TYPE
        assert "client_secret" not in body and "Authorization" not in dict(request.headers)
        claims = jwt.decode(
            body["client_assertion"],
            key.public_key(),
            algorithms=["ES256"],
            audience=ENDPOINT,
            options={"verify_exp": False, "verify_iat": False},
        )
        assert claims["iss"] == claims["sub"] == "verifier"
        assert claims["aud"] == ENDPOINT
        assert claims["exp"] == int(NOW) + 60
        jtis.add(claims["jti"])
    assert len(jtis) == 2


async def test_the_endpoint_comes_from_discovery_when_not_configured(make: MakeIntrospector, http: FakeHttp) -> None:
    http.discovery = {"issuer": ISSUER, "introspection_endpoint": ISSUER + "/discovered"}
    http.answers["tok"] = active()
    introspector = make(endpoint="")
    await asyncio.gather(check(introspector, "tok"), check(introspector, "tok"))
    assert [r.method for r in http.requests] == ["GET", "POST"]
    assert http.requests[0].url == ISSUER + "/.well-known/openid-configuration"
    assert http.posts[0].url == ISSUER + "/discovered"


async def test_a_batch_endpoint_named_by_discovery_is_used_by_default(make: MakeIntrospector, http: FakeHttp) -> None:
    """#24 goal 7: batch mode by default where the provider offers it (`introspection_batch_endpoint`)."""
    http.discovery = {
        "issuer": ISSUER, "introspection_endpoint": ENDPOINT, "introspection_batch_endpoint": BATCH_ENDPOINT
    }
    for token in ("first", "a", "b"):
        http.answers[token] = active()
    introspector = make(endpoint="")
    await check(introspector, "first")  # learns both endpoints; its own call is one POST
    await asyncio.gather(check(introspector, "a"), check(introspector, "b"))
    assert [r.url for r in http.posts] == [ENDPOINT, BATCH_ENDPOINT]
    assert batch_tokens(http.posts[1]) == ["a", "b"]


@pytest.mark.parametrize(
    ("named", "options"),
    [
        (BATCH_ENDPOINT, {"batch": False}),  # the operator's opt-out
        ("https://elsewhere.example.test/introspect/batch", {}),  # another origin: the secret would go there
        ("http://issuer.example.test/introspect/batch", {}),  # a downgrade to plain http
        (BATCH_ENDPOINT, {"endpoint": ENDPOINT}),  # the RFC 7662 endpoint is configured: discovery is not read
    ],
)
async def test_a_discovered_batch_endpoint_is_not_used_where_it_may_not_be(
    make: MakeIntrospector, http: FakeHttp, named: str, options: dict[str, Any]
) -> None:
    http.discovery = {"issuer": ISSUER, "introspection_endpoint": ENDPOINT, "introspection_batch_endpoint": named}
    for token in ("first", "a", "b"):
        http.answers[token] = active()
    introspector = make(**{"endpoint": "", **options})
    await check(introspector, "first")
    await asyncio.gather(check(introspector, "a"), check(introspector, "b"))
    assert [r.url for r in http.posts] == [ENDPOINT] * 3


async def test_a_batch_endpoint_in_the_key_stores_discovery_is_used(http: FakeHttp, clock: FrozenClock) -> None:
    for token in ("first", "a", "b"):
        http.answers[token] = active()
    introspector = build_introspector(
        issuer=ISSUER,
        audiences=(AUDIENCE,),
        config=config(endpoint=""),
        endpoint=None,
        clock=clock,
        registry=CollectorRegistry(),
        http=http,
        discovered_endpoint=lambda: ENDPOINT,
        discovered_batch_endpoint=lambda: BATCH_ENDPOINT,
    )
    try:
        await check(introspector, "first")
        await asyncio.gather(check(introspector, "a"), check(introspector, "b"))
    finally:
        await introspector.close()
    assert [r.method for r in http.requests] == ["POST", "POST"]  # nothing fetched: the key store's metadata
    assert [r.url for r in http.posts] == [ENDPOINT, BATCH_ENDPOINT]


def test_batch_false_beside_a_batch_endpoint_is_refused(secret_env: str) -> None:
    with pytest.raises(ConfigError, match="batch: false"):
        parse_introspection_config(
            {"client_id": "v", "client_secret_env": secret_env, "batch_endpoint": BATCH_ENDPOINT, "batch": False},
            "issuers[0].introspection",
        )


async def test_discovery_naming_another_issuer_is_refused(make: MakeIntrospector, http: FakeHttp) -> None:
    http.discovery = {"issuer": "https://evil.example.test", "introspection_endpoint": ISSUER + "/x"}
    with pytest.raises(ProviderUnavailable, match="issuer"):
        await check(make(endpoint=""), "tok")
    assert http.posts == []


async def test_the_configured_endpoint_wins_over_the_given_one(make: MakeIntrospector, http: FakeHttp) -> None:
    introspector = make(ISSUER + "/given")  # the config names ENDPOINT
    with pytest.raises(InvalidToken):
        await check(introspector, "tok")
    assert http.posts[0].url == ENDPOINT


async def test_a_given_endpoint_is_used_without_discovery(make: MakeIntrospector, http: FakeHttp) -> None:
    with pytest.raises(InvalidToken):
        await check(make(ISSUER + "/given", endpoint=""), "tok")
    assert [r.url for r in http.requests] == [ISSUER + "/given"]


async def test_two_introspectors_share_one_registry(
    http: FakeHttp, clock: FrozenClock, registry: CollectorRegistry
) -> None:
    for issuer in ("https://a.example.test", "https://b.example.test"):
        introspector = build_introspector(
            issuer=issuer,
            audiences=(AUDIENCE,),
            config=config(),
            endpoint=None,
            clock=clock,
            registry=registry,
            http=http,
        )
        await introspector.close()


async def test_after_close_nothing_is_sent(make: MakeIntrospector, http: FakeHttp) -> None:
    introspector = make(batch_window_seconds=0.05)
    waiting = asyncio.create_task(check(introspector, "tok"))
    await asyncio.sleep(0)
    await introspector.close()
    with pytest.raises(ProviderUnavailable):
        await waiting
    with pytest.raises(ProviderUnavailable):
        await check(introspector, "tok")
    assert http.posts == []


async def test_close_cancels_a_per_token_call_in_flight(clock: FrozenClock, registry: CollectorRegistry) -> None:
    class Stalled:
        """A provider that never answers; remembers whether the call was cancelled."""

        def __init__(self) -> None:
            self.sent = asyncio.Event()
            self.cancelled = False

        async def send(self, request: HttpRequest) -> HttpReply:
            self.sent.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled = True
                raise
            raise AssertionError("never answers")

    stalled = Stalled()
    introspector = build_introspector(
        issuer=ISSUER,
        audiences=(AUDIENCE,),
        config=config(),
        endpoint=None,
        clock=clock,
        registry=registry,
        http=stalled,
    )
    waiting = asyncio.create_task(check(introspector, "tok"))
    await asyncio.wait_for(stalled.sent.wait(), 5)
    await asyncio.wait_for(introspector.close(), 5)
    assert stalled.cancelled  # not left running after close
    with pytest.raises(ProviderUnavailable, match="shutting down"):
        await waiting


async def test_a_finished_per_token_call_is_not_kept(make: MakeIntrospector, http: FakeHttp) -> None:
    # Each first-seen token's call removes itself when it ends (no done callback): nothing accumulates.
    introspector = make()
    for n in range(20):
        http.answers[f"tok{n}"] = active()
    await asyncio.gather(*(check(introspector, f"tok{n}") for n in range(20)))
    http.fault = "down"
    with pytest.raises(ProviderUnavailable):
        await check(introspector, "tok-down")
    assert introspector._calls == {}
    http.fault = None
    http.answers["tok-down"] = active()
    assert (await check(introspector, "tok-down")).subject  # a failed token asked again: a new call
    assert http.tokens_asked().count("tok-down") == 2


# -- configuration -----------------------------------------------------------------------------


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("VERIFIER_IDP_SECRET", SECRET)
    monkeypatch.delenv("VERIFIER_MISSING_SECRET", raising=False)
    return "VERIFIER_IDP_SECRET"


def test_the_readme_example_parses_with_documented_defaults(secret_env: str) -> None:
    parsed = parse_introspection_config(
        {"client_id": "verifier", "client_secret_env": secret_env}, "issuers[0].introspection"
    )
    assert parsed.client_id == "verifier"
    assert parsed.client_secret == SECRET
    assert parsed.client_auth is ClientAuth.CLIENT_SECRET_BASIC
    assert parsed.endpoint == ""
    assert parsed.timeout_seconds == DEFAULT_TIMEOUT_SECONDS
    assert parsed.max_in_flight == DEFAULT_MAX_IN_FLIGHT
    assert parsed.batch_window_seconds == DEFAULT_BATCH_WINDOW_SECONDS
    assert parsed.max_batches_in_flight == DEFAULT_MAX_BATCHES_IN_FLIGHT
    assert parsed.batch is True
    assert parsed.negative_ttl_seconds == DEFAULT_NEGATIVE_TTL_SECONDS
    assert parsed.serve_stale_on_error is False
    assert SECRET not in repr(parsed)


def test_every_key_parses(secret_env: str) -> None:
    parsed = parse_introspection_config(
        {
            "client_id": "verifier",
            "client_auth": "client_secret_post",
            "client_secret_env": secret_env,
            "endpoint": "https://idp.example.test/introspect",
            "batch_endpoint": "https://idp.example.test/introspect/batch",
            "timeout_seconds": 0.5,
            "max_in_flight": 8,
            "batch_window_seconds": 0.002,
            "max_batch_size": 10,
            "max_batches_in_flight": 2,
            "positive_ttl_seconds": 30,
            "negative_ttl_seconds": 5,
            "positive_entries": 10,
            "negative_entries": 10,
            "serve_stale_on_error": True,
            "stale_ttl_seconds": 60,
            "require_audience": False,
            "breaker_failures": 2,
            "breaker_cooldown_seconds": 1,
            "breaker_success_window_seconds": 3,
            "assertion_ttl_seconds": 30,
        },
        "issuers[1].introspection",
    )
    assert parsed.client_auth is ClientAuth.CLIENT_SECRET_POST
    assert parsed.batch_endpoint.endswith("/batch")
    assert parsed.serve_stale_on_error and not parsed.require_audience
    assert parsed.max_batch_size == 10 and parsed.max_batches_in_flight == 2
    assert parsed.breaker_success_window_seconds == 3


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"client_secret_env": "VERIFIER_IDP_SECRET"}, "issuers[0].introspection.client_id: required"),
        ({"client_id": "v"}, "issuers[0].introspection.client_secret_env: required"),
        (
            {"client_id": "v", "client_secret_env": "VERIFIER_MISSING_SECRET"},
            "issuers[0].introspection.client_secret_env: environment variable VERIFIER_MISSING_SECRET is not set",
        ),
        (
            {"client_id": "v", "client_secret_env": "VERIFIER_IDP_SECRET", "client_auth": "tls_client_auth"},
            "issuers[0].introspection.client_auth: 'tls_client_auth' is not one of",
        ),
        (
            {"client_id": "v", "client_secret_env": "VERIFIER_IDP_SECRET", "endpoint": "http://idp.example.test/i"},
            "issuers[0].introspection.endpoint: https is required",
        ),
        (
            {"client_id": "v", "client_secret_env": "VERIFIER_IDP_SECRET", "batch_endpoint": "ftp://x"},
            "issuers[0].introspection.batch_endpoint: expected an http(s) URL",
        ),
        (
            {"client_id": "v", "client_secret_env": "VERIFIER_IDP_SECRET", "timeout_seconds": "2"},
            "issuers[0].introspection.timeout_seconds: expected a finite number",
        ),
        (
            {"client_id": "v", "client_secret_env": "VERIFIER_IDP_SECRET", "max_in_flight": 0},
            "issuers[0].introspection.max_in_flight: 0 is outside",
        ),
        (
            {"client_id": "v", "client_secret_env": "VERIFIER_IDP_SECRET", "serve_stale_on_error": "yes"},
            "issuers[0].introspection.serve_stale_on_error: expected true or false",
        ),
        (
            {"client_id": "v", "client_secret_env": "VERIFIER_IDP_SECRET", "client_secret": "inline"},
            "issuers[0].introspection.client_secret: unknown key",
        ),
        (
            {"client_id": "v", "client_auth": "private_key_jwt"},
            "issuers[0].introspection.private_key_file: private_key_jwt needs one of",
        ),
        (
            {"client_id": "v", "client_auth": "private_key_jwt", "private_key_file": "/nonexistent/key.pem"},
            "issuers[0].introspection.private_key_file: cannot read /nonexistent/key.pem",
        ),
        (
            {"client_id": "v", "client_auth": "private_key_jwt", "private_key_env": "VERIFIER_IDP_SECRET"},
            "issuers[0].introspection.private_key_env: not an unencrypted PEM private key",
        ),
        (
            {"client_id": "v", "client_secret_env": "VERIFIER_IDP_SECRET", "private_key_env": "X"},
            "issuers[0].introspection.private_key_env: only used with private_key_jwt",
        ),
        ("not a mapping", "issuers[0].introspection: expected a mapping"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("issuers") else "",
)
def test_config_errors_name_the_key(secret_env: str, data: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_introspection_config(data, "issuers[0].introspection")
    assert str(caught.value).startswith(message), str(caught.value)


def test_private_key_jwt_reads_the_key_from_a_pem_file_or_an_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path = tmp_path / "client.pem"
    path.write_bytes(pem)
    from_file = parse_introspection_config(
        {"client_id": "v", "client_auth": "private_key_jwt", "private_key_file": str(path)}, "i"
    )
    monkeypatch.setenv("VERIFIER_CLIENT_KEY", pem.decode())
    from_env = parse_introspection_config(
        {"client_id": "v", "client_auth": "private_key_jwt", "private_key_env": "VERIFIER_CLIENT_KEY"}, "i"
    )
    for parsed in (from_file, from_env):
        assert parsed.assertion_alg == "ES256"
        assert parsed.private_key is not None
        assert parsed.client_secret == ""
        assert "BEGIN" not in repr(parsed) and "private_key=" not in repr(parsed)


# -- the real aiohttp path against the embedded dev provider ---------------------------------------


@pytest.fixture
async def devidp() -> AsyncIterator[DevIdentityProvider]:
    idp = DevIdentityProvider(port=0, introspection_client_secret=SECRET)
    await idp.start()
    yield idp
    await idp.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def dev_introspector(
    idp: DevIdentityProvider, http: IntrospectionHttpClient, registry: CollectorRegistry, **overrides: Any
) -> Introspector:
    values: dict[str, Any] = {"client_id": "verifier", "client_secret": SECRET, "batch_window_seconds": 0.01}
    values.update(overrides)
    return build_introspector(
        issuer=idp.issuer,
        audiences=(DEV_AUDIENCE,),
        config=IntrospectionConfig(**values),
        endpoint=None,
        http=http,
        clock=SystemClock(),
        registry=registry,
    )


async def test_dev_provider_batch_endpoint_answers_many_tokens_in_one_http_call(
    devidp: DevIdentityProvider, introspection_http: IntrospectionHttpClient, registry: CollectorRegistry
) -> None:
    tokens = [devidp.mint_opaque(sub=f"user-{i}") for i in range(10)]
    batch = devidp.issuer + "/introspect/batch"
    introspector = dev_introspector(devidp, introspection_http, registry, batch_endpoint=batch)
    try:
        principals = await asyncio.gather(
            *(check(introspector, t) for t in [*tokens, *tokens, "garbage"]), return_exceptions=True
        )
    finally:
        await introspector.close()
    assert [getattr(p, "subject", None) for p in principals[:10]] == [f"user-{i}" for i in range(10)]
    assert isinstance(principals[-1], InvalidToken)
    assert devidp.batch_calls == 1
    assert devidp.batch_tokens == 11
    assert devidp.introspection_calls == 0


async def test_dev_provider_standard_endpoint_is_found_by_discovery_and_counts_calls(
    devidp: DevIdentityProvider, introspection_http: IntrospectionHttpClient, registry: CollectorRegistry
) -> None:
    opaque = devidp.mint_opaque(sub=None, client_id="svc")
    introspector = dev_introspector(devidp, introspection_http, registry, batch=False)  # its batch endpoint: below
    try:
        results = await asyncio.gather(*(check(introspector, opaque) for _ in range(20)))
        assert {(p.subject, p.client_id) for p in results} == {("", "svc")}
        assert devidp.introspection_calls == 1
        devidp.revoke(opaque)
        with pytest.raises(InvalidToken):
            await check(introspector, "not-a-token")
        assert devidp.introspection_calls == 2
    finally:
        await introspector.close()


async def test_dev_provider_batch_endpoint_is_used_by_default_once_discovery_names_it(
    devidp: DevIdentityProvider, introspection_http: IntrospectionHttpClient, registry: CollectorRegistry
) -> None:
    """Over real HTTP: the first token goes alone (discovery learns both endpoints), the next ones in one batch."""
    first, *rest = (devidp.mint_opaque(sub=f"user-{i}") for i in range(6))
    introspector = dev_introspector(devidp, introspection_http, registry)
    try:
        assert (await check(introspector, first)).subject == "user-0"
        principals = await asyncio.gather(*(check(introspector, t) for t in rest))
    finally:
        await introspector.close()
    assert [p.subject for p in principals] == [f"user-{i}" for i in range(1, 6)]
    assert (devidp.introspection_calls, devidp.batch_calls, devidp.batch_tokens) == (1, 1, 5)


async def test_dev_provider_refuses_a_wrong_client_secret(
    devidp: DevIdentityProvider, introspection_http: IntrospectionHttpClient, registry: CollectorRegistry
) -> None:
    introspector = dev_introspector(devidp, introspection_http, registry, client_secret="wrong")
    try:
        with pytest.raises(ProviderUnavailable, match="HTTP 401"):
            await check(introspector, devidp.mint_opaque())
    finally:
        await introspector.close()
    assert sample_any(registry, "verifier_introspection_calls_total", devidp.issuer, "http_4xx") == 1


def sample_any(registry: CollectorRegistry, name: str, issuer: str, result: str) -> float:
    return registry.get_sample_value(name, {"issuer": issuer, "result": result}) or 0.0


async def test_dev_provider_mints_opaque_tokens_at_the_token_endpoint(
    devidp: DevIdentityProvider, session: aiohttp.ClientSession
) -> None:
    async with session.post(devidp.issuer + "/token", json={"format": "opaque", "sub": "alice"}) as response:
        token = (await response.json())["access_token"]
    assert "." not in token
    assert devidp.introspection_answer(token)["sub"] == "alice"
    async with session.get(devidp.issuer + "/.well-known/openid-configuration") as response:
        assert (await response.json())["introspection_endpoint"] == devidp.issuer + "/introspect"


@pytest.mark.parametrize("member", ["exp", "nbf", "iat", "auth_time"])
@pytest.mark.parametrize("value", HOSTILE_NUMBERS, ids=HOSTILE_IDS)
async def test_a_hostile_number_in_an_answer_is_a_clean_401(
    make: MakeIntrospector, http: FakeHttp, member: str, value: Any
) -> None:
    """#18 F11: the answer travels as JSON text, so NaN/Infinity/huge ints arrive as a provider sends them."""
    http.answers["tok"] = active(**{member: value})
    with pytest.raises(InvalidToken) as caught:
        await check(make(), "tok")
    assert caught.value.outcome is Outcome.UNAUTHENTICATED and caught.value.code == "claim_invalid"
