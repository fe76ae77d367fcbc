"""Introspection against a real OpenID Provider (node-oidc-provider): the production HTTP/1.1 client end to end.

The provider counts introspection calls on its side (`stats()`), so single flight and caching are
checked where they matter: at the provider.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
from gateways import GatewayProcess, http_request, start_verifier
from op_harness import (  # tests/integration is on sys.path (pytest rootdir-relative import)
    API_AUDIENCE,
    OPAQUE_RESOURCE,
    VERIFIER_CLIENT_ID,
    VERIFIER_CLIENT_SECRET,
    OpenIDProvider,
    start_provider,
)
from prometheus_client import CollectorRegistry
from rigs import provider_fixture
from support import timed

from verifier.app import build_introspector
from verifier.errors import AudienceMismatch, ClaimInvalid, InvalidToken, ProviderUnavailable, WrongTokenType
from verifier.observe.audit import token_hash
from verifier.principal import Principal
from verifier.tokens.introspection import IntrospectionConfig, Introspector
from verifier.tokens.introspection_breaker import BreakerState
from verifier.tokens.introspection_http import IntrospectionHttpClient

pytestmark = pytest.mark.integration


class ShiftedClock:
    """Real time plus an offset the test moves (the provider's `exp` values are real epoch seconds)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


op = provider_fixture("op", scope="module")


fresh_op = provider_fixture("fresh_op")


class Harness:
    """Builds introspectors for a provider and closes them afterwards."""

    def __init__(self, http: IntrospectionHttpClient) -> None:
        self.http = http
        self.clock = ShiftedClock()
        self.registry = CollectorRegistry()
        self.made: list[Introspector] = []

    def introspector(
        self, op: OpenIDProvider, *, audiences: tuple[str, ...] = (OPAQUE_RESOURCE,), **overrides: Any
    ) -> Introspector:
        values: dict[str, Any] = {"client_id": VERIFIER_CLIENT_ID, "client_secret": VERIFIER_CLIENT_SECRET}
        values.update(overrides)
        introspector = build_introspector(
            issuer=op.issuer,
            audiences=audiences,
            config=IntrospectionConfig(**values),
            endpoint=None,  # found by discovery
            http=self.http,
            clock=self.clock,
            registry=self.registry,
        )
        self.made.append(introspector)
        return introspector


@pytest.fixture
async def harness(introspection_http: IntrospectionHttpClient) -> AsyncIterator[Harness]:
    h = Harness(introspection_http)
    yield h
    for introspector in h.made:
        await introspector.close()


async def introspect(introspector: Introspector, token: str) -> Principal:
    return await introspector.introspect(token, token_hash(token))


def introspection_calls(op: OpenIDProvider) -> int:
    return op.stats()["introspection"]


async def test_an_active_opaque_token_becomes_a_principal_named_by_its_client(
    op: OpenIDProvider, harness: Harness
) -> None:
    token = op.opaque_token(scope="read write")
    principal = await introspect(harness.introspector(op), token)
    assert principal.subject == ""  # no sub in a client-credentials token: a client, never a user
    assert principal.client_id == "app"
    assert principal.scopes == ("read", "write")
    assert principal.issuer == op.issuer
    assert principal.claims["aud"] == OPAQUE_RESOURCE
    assert principal.expires_at <= principal.claims["exp"]


async def test_a_garbage_token_is_inactive(op: OpenIDProvider, harness: Harness) -> None:
    with pytest.raises(InvalidToken) as caught:
        await introspect(harness.introspector(op), "not-a-token-the-provider-ever-issued")
    assert caught.value.code == "token_inactive"


async def test_a_revoked_token_is_inactive(op: OpenIDProvider, harness: Harness) -> None:
    token = op.opaque_token()
    op.revoke(token)
    with pytest.raises(InvalidToken, match="not active"):
        await introspect(harness.introspector(op), token)


async def test_a_token_for_another_audience_is_refused(op: OpenIDProvider, harness: Harness) -> None:
    with pytest.raises(AudienceMismatch):
        await introspect(harness.introspector(op, audiences=(API_AUDIENCE,)), op.opaque_token())


def user_tokens_with_refresh(op: OpenIDProvider) -> dict[str, Any]:
    """A user's login asking for offline access: an opaque access token for the opaque resource and a refresh token."""
    answer = op.user_token_response(
        "rt-user", scope="offline_access read write", prompt="consent", resource=OPAQUE_RESOURCE
    )
    assert answer.get("refresh_token"), answer
    return answer


async def test_a_refresh_token_is_not_an_access_token_even_when_aud_is_not_required(
    op: OpenIDProvider, harness: Harness
) -> None:
    """RFC 6749 section 1.5: a refresh token is never presented to a resource server. node-oidc-provider answers one
    as active with the user's `sub`, `client_id`, `scope` and an `exp` days away, but no `aud` and no `token_type`
    (its access tokens' answers always name theirs): with `require_audience: false` (its opaque access tokens
    without a resource indicator carry no `aud`) nothing else told the two apart, and a stolen refresh token was
    taken as the user's access token, for as long as the refresh token lives."""
    tokens = user_tokens_with_refresh(op)
    answer = op.introspect(tokens["refresh_token"])
    assert answer["active"] is True and answer["sub"] == "rt-user"
    assert "aud" not in answer and "token_type" not in answer  # what the provider says of a refresh token
    lax = harness.introspector(op, require_audience=False)
    with pytest.raises(WrongTokenType) as caught:
        await introspect(lax, tokens["refresh_token"])
    assert caught.value.code == "token_type_invalid"
    with pytest.raises(ClaimInvalid):  # aud required (the default): refused for its missing `aud` already
        await introspect(harness.introspector(op), tokens["refresh_token"])
    # The access token of the same login is the user's, whichever the setting.
    access = op.introspect(tokens["access_token"])
    assert access["token_type"] == "Bearer"
    assert (await introspect(lax, tokens["access_token"])).subject == "rt-user"
    assert (await introspect(harness.introspector(op), tokens["access_token"])).subject == "rt-user"


def opaque_verifier(
    tmp_path_factory: pytest.TempPathFactory,
    providers: Sequence[OpenIDProvider],
    *,
    require_audience: bool,
    policies: Sequence[dict[str, Any]] = (),
) -> GatewayProcess:
    """`python -m verifier serve` taking each provider's opaque tokens for `OPAQUE_RESOURCE`."""
    issuers = [
        {
            "issuer": provider.issuer,
            "audiences": [OPAQUE_RESOURCE],
            "algorithms": ["ES256"],
            "allow_insecure_http": True,
            "introspection": {
                "client_id": VERIFIER_CLIENT_ID,
                "client_secret_env": "OPAQUE_OP_SECRET",
                "require_audience": require_audience,
            },
        }
        for provider in providers
    ]
    return start_verifier(
        tmp_path_factory.mktemp("opaque"),
        issuer=providers[0].issuer,
        extra_config={"issuers": issuers, **({"policies": list(policies)} if policies else {})},
        environment={"OPAQUE_OP_SECRET": VERIFIER_CLIENT_SECRET},
    )


@pytest.fixture(scope="module")
def lax_verifier(op: OpenIDProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """`python -m verifier serve` taking the provider's opaque tokens with `require_audience: false`."""
    proc = opaque_verifier(tmp_path_factory, [op], require_audience=False)
    yield proc
    proc.stop()


def ask(verifier: GatewayProcess, token: str, path: str = "/orders") -> tuple[int, str]:
    """The forward-auth door's answer for a request to `path` bearing `token`: its status and reason."""
    headers = {"X-Forwarded-Method": "GET", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example.test",
               "X-Forwarded-Uri": path, "Authorization": f"Bearer {token}"}  # fmt: skip
    answer = http_request(f"{verifier.url}/v1/forward-auth", headers=headers)
    return answer.status, answer.headers.get("x-verifier-reason", "")


def test_a_stolen_refresh_token_is_refused_at_the_forward_auth_door(
    lax_verifier: GatewayProcess, op: OpenIDProvider
) -> None:
    """The same attack through the door a gateway asks: the refresh token is a 401, the login's access token a 200."""
    tokens = user_tokens_with_refresh(op)
    assert ask(lax_verifier, tokens["refresh_token"]) == (401, "token_type_invalid")
    assert ask(lax_verifier, tokens["refresh_token"]) == (401, "token_type_invalid")  # remembered, not taken again
    assert ask(lax_verifier, tokens["access_token"]) == (200, "ok")


@pytest.fixture(scope="module")
def keycloak_op(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenIDProvider]:
    """The provider answering introspection as Keycloak does: `typ` and `token_type` name the token's kind (a refresh
    token's `Refresh`), and a refresh token's answer names an audience."""
    provider = start_provider(tmp_path_factory, introspection_as="keycloak")
    yield provider
    provider.stop()


@pytest.fixture(scope="module", params=[True, False], ids=["require_audience", "audience not required"])
def keycloak_verifier(
    request: pytest.FixtureRequest, keycloak_op: OpenIDProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """`python -m verifier serve` taking the Keycloak-like provider's opaque tokens, `require_audience` either way."""
    proc = opaque_verifier(tmp_path_factory, [keycloak_op], require_audience=request.param)
    yield proc
    proc.stop()


def test_a_stolen_refresh_token_introspected_as_keycloak_answers_is_refused_whichever_the_audience_rule(
    keycloak_verifier: GatewayProcess, keycloak_op: OpenIDProvider
) -> None:
    """A provider that answers for its refresh tokens as Keycloak does: active, the user's `sub` and `scope`, an
    audience, and the kind in `typ` and `token_type` ("Refresh", not a name the verifier refused: only four
    spellings were, and `typ` was not read). A stolen refresh token was taken at the door as the user's access
    token (200, with either `require_audience`); now it is a 401 `token_type_invalid`, remembered (the provider is
    asked once), while the same login's access token (`typ: Bearer`) still passes."""
    tokens = user_tokens_with_refresh(keycloak_op)
    answer = keycloak_op.introspect(tokens["refresh_token"])
    assert answer["active"] is True and answer["sub"] == "rt-user", answer
    assert answer["typ"] == answer["token_type"] == "Refresh" and OPAQUE_RESOURCE in answer["aud"], answer
    keycloak_op.reset_stats()
    assert ask(keycloak_verifier, tokens["refresh_token"]) == (401, "token_type_invalid")
    assert ask(keycloak_verifier, tokens["refresh_token"]) == (401, "token_type_invalid")
    assert introspection_calls(keycloak_op) == 1
    assert keycloak_op.introspect(tokens["access_token"])["typ"] == "Bearer"
    assert ask(keycloak_verifier, tokens["access_token"]) == (200, "ok")


@pytest.fixture(scope="module")
def two_provider_verifier(
    op: OpenIDProvider, keycloak_op: OpenIDProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """Two issuers taking opaque tokens, each trusted by its own routes (`/a/`, `/kc/`), `require_audience: false`:
    the pipeline remembers no introspection refusal (one provider's word is not another's)."""
    policies = [
        {"name": "a", "match": {"path_prefix": "/a/"}, "require": {"issuers_any": [op.issuer]}},
        {"name": "kc", "match": {"path_prefix": "/kc/"}, "require": {"issuers_any": [keycloak_op.issuer]}},
    ]
    proc = opaque_verifier(tmp_path_factory, [op, keycloak_op], require_audience=False, policies=policies)
    yield proc
    proc.stop()


@pytest.mark.parametrize("which", ["node-oidc-provider", "keycloak-like"])
def test_a_stolen_refresh_token_replayed_is_asked_about_once_where_the_pipeline_remembers_no_refusal(
    two_provider_verifier: GatewayProcess, op: OpenIDProvider, keycloak_op: OpenIDProvider, which: str
) -> None:
    """With several opaque-token issuers the pipeline does not remember an introspection refusal, and nor did the
    introspector remember a refused active answer: a stolen refresh token replayed in a loop cost one provider call
    per request (three here). The refusal is now remembered by the introspector (`negative_ttl_seconds`): one call."""
    provider, path = (op, "/a/orders") if which == "node-oidc-provider" else (keycloak_op, "/kc/orders")
    tokens = user_tokens_with_refresh(provider)
    assert ask(two_provider_verifier, tokens["access_token"], path) == (200, "ok")
    provider.reset_stats()
    for _ in range(3):
        assert ask(two_provider_verifier, tokens["refresh_token"], path) == (401, "token_type_invalid")
    assert introspection_calls(provider) == 1


async def test_revoked_after_caching_stays_active_until_the_positive_ttl_then_is_inactive(
    op: OpenIDProvider, harness: Harness
) -> None:
    token = op.opaque_token()
    introspector = harness.introspector(op, positive_ttl_seconds=30)
    op.reset_stats()
    await introspect(introspector, token)
    op.revoke(token)
    harness.clock.advance(29)
    assert (await introspect(introspector, token)).client_id == "app"  # the cached answer, by design
    assert introspection_calls(op) == 1
    harness.clock.advance(2)
    with pytest.raises(InvalidToken, match="not active"):
        await introspect(introspector, token)
    assert introspection_calls(op) == 2


async def test_concurrent_requests_for_one_token_make_one_provider_call(op: OpenIDProvider, harness: Harness) -> None:
    token = op.opaque_token()
    introspector = harness.introspector(op)
    await introspector.client.endpoint()  # discovery first, so only introspection is counted below
    op.reset_stats()
    principals = await asyncio.gather(*(introspect(introspector, token) for _ in range(50)))
    assert {p.client_id for p in principals} == {"app"}
    assert introspection_calls(op) == 1


async def test_distinct_tokens_make_one_call_each(op: OpenIDProvider, harness: Harness) -> None:
    tokens = [op.opaque_token() for _ in range(8)]
    introspector = harness.introspector(op, batch_window_seconds=0.005)
    await introspector.client.endpoint()
    op.reset_stats()
    principals = await asyncio.gather(*(introspect(introspector, t) for t in tokens))
    assert len(principals) == 8
    assert introspection_calls(op) == 8
    batches = harness.registry.get_sample_value("verifier_introspection_batch_size_count", {"issuer": op.issuer})
    assert batches == 8  # one POST per token (RFC 7662): each sent at once, the window is for a batch endpoint


async def test_a_wrong_client_secret_is_provider_unavailable(op: OpenIDProvider, harness: Harness) -> None:
    with pytest.raises(ProviderUnavailable, match="HTTP 401"):
        await introspect(harness.introspector(op, client_secret="wrong"), op.opaque_token())


async def test_a_slow_provider_times_out_and_fails_closed(op: OpenIDProvider, harness: Harness) -> None:
    token = op.opaque_token()
    # 1.5 s, not 0.3 s: the call after the fault, on the same introspector and the real provider, must be
    # answered within it on a stalled runner too; the slowed one answers long after it.
    timeout = 1.5
    introspector = harness.introspector(op, timeout_seconds=timeout)
    await introspector.client.endpoint()
    op.set_fault("introspection", delay_ms=4000)
    try:

        async def timed_out() -> None:
            with pytest.raises(ProviderUnavailable, match="timed out"):
                await introspect(introspector, token)

        _, took, late = await timed(timed_out())  # less how long a loaded machine held this process
        assert took - late < timeout + 0.7, (took, late)
    finally:
        op.clear_faults()
    assert (await introspect(introspector, token)).client_id == "app"  # the timeout was not cached


async def test_a_5xx_is_provider_unavailable_and_not_cached(op: OpenIDProvider, harness: Harness) -> None:
    token = op.opaque_token()
    introspector = harness.introspector(op)
    await introspector.client.endpoint()
    op.set_fault("introspection", status=503)
    try:
        with pytest.raises(ProviderUnavailable, match="HTTP 503"):
            await introspect(introspector, token)
    finally:
        op.clear_faults()
    assert (await introspect(introspector, token)).client_id == "app"


async def test_on_a_fresh_worker_the_breakers_own_probe_closes_the_circuit_once_the_real_provider_is_back(
    op: OpenIDProvider, harness: Harness
) -> None:
    """Before any token was answered active, the half-open probe is a token the verifier made up: the real
    provider must answer it (RFC 7662 section 2.2: `active: false`), and that answer closes the circuit."""
    token = op.opaque_token()
    introspector = harness.introspector(op, breaker_failures=2, breaker_cooldown_seconds=5)
    await introspector.client.endpoint()
    op.set_fault("introspection", status=503)
    try:
        for i in range(2):
            with pytest.raises(ProviderUnavailable, match="HTTP 503"):
                await introspect(introspector, f"never-issued-{i}")
            harness.clock.advance(2)  # failing for the success window without an answer
        assert introspector.breaker.state is BreakerState.OPEN
    finally:
        op.clear_faults()
    harness.clock.advance(5)
    op.reset_stats()
    assert (await introspect(introspector, token)).client_id == "app"
    assert introspection_calls(op) == 2  # our probe, then the caller's token
    assert introspector.breaker.state is BreakerState.CLOSED


async def test_a_stopped_provider_is_unavailable_and_serve_stale_covers_for_it(
    fresh_op: OpenIDProvider, harness: Harness
) -> None:
    token = fresh_op.opaque_token()
    other = fresh_op.opaque_token()
    strict = harness.introspector(fresh_op, positive_ttl_seconds=10)
    lenient = harness.introspector(fresh_op, positive_ttl_seconds=10, serve_stale_on_error=True)
    await introspect(strict, token)
    await introspect(lenient, token)
    fresh_op.stop()
    harness.clock.advance(11)
    with pytest.raises(ProviderUnavailable):
        await introspect(strict, token)
    assert (await introspect(lenient, token)).client_id == "app"
    with pytest.raises(ProviderUnavailable):
        await introspect(lenient, other)  # never seen: nothing to stand in
