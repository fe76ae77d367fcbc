"""OpenID Connect Back-Channel Logout 1.0 (`verifier/revocation/logout.py`, `verifier/doors/logout_http.py`): every
malformed logout token refused, valid ones revoke (FrozenClock).

Logout tokens are signed with pyjwt (tokenkit's `mint`), never by the verifier, and posted through the
composition root's router, so the wiring is what runs in production.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hostile_numbers import HOSTILE_IDS, HOSTILE_NUMBERS
from prometheus_client import CollectorRegistry
from support import FrozenClock, SkewedClock, trickled
from tokenkit import (
    ISSUER,
    JWKS_URL,
    KIDS,
    NOW,
    FakeFetcher,
    Mint,
    SigningKeys,
    compact,
    issuer_settings,
    make_issuer_keys,
    public_jwk,
)

from verifier.app import App
from verifier.config.logout import BackchannelLogoutConfig
from verifier.config.state import Purpose, StateConfig
from verifier.doors.logout_http import LOGOUT_PATH
from verifier.doors.routes import HttpAnswer, HttpRequest
from verifier.errors import StateUnavailable
from verifier.observe.metrics import RevocationMetrics
from verifier.principal import Principal
from verifier.revocation import RevocationService
from verifier.revocation.logout import (
    BACKCHANNEL_LOGOUT_EVENT,
    REFUSAL_CODES,
    BackchannelLogout,
    LogoutRefused,
    LogoutTokenVerifier,
)
from verifier.settings import ConfigError, Listen, Settings, parse_settings
from verifier.state.memory import MemoryState

CLIENT = "gateway-client"
FORM = "application/x-www-form-urlencoded"


def logout_claims(**overrides: Any) -> dict[str, Any]:
    """A valid logout token's claims at NOW; `None` removes a claim."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": CLIENT,
        "iat": int(NOW),
        "exp": int(NOW) + 120,
        "jti": "logout-1",
        "sid": "session-1",
        "sub": "user-1",
        "events": {BACKCHANNEL_LOGOUT_EVENT: {}},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def principal(sub: str = "user-1", iss: str = ISSUER, **claims: Any) -> Principal:
    """A caller whose access token was issued 10 s before NOW unless `iat` says otherwise."""
    values: dict[str, Any] = {"iss": iss, "sub": sub, "iat": NOW - 10, "exp": NOW + 300}
    values.update(claims)
    return Principal(
        issuer=iss, subject=sub, client_id=None, scopes=(), roles=frozenset(),
        expires_at=float(values["exp"]), claims=values,
    )


@pytest.fixture
def app(clock: FrozenClock, fetcher: FakeFetcher) -> App:
    """The root with one issuer accepting logout tokens for CLIENT, and no `revocation` section."""
    issuer = issuer_settings(
        algorithms=("ES256", "RS256"), backchannel_logout=BackchannelLogoutConfig(audiences=(CLIENT,))
    )
    return App(Settings(grpc=None, http=None, metrics=None, issuers=(issuer,)), clock=clock, fetcher=fetcher)


@pytest.fixture
async def service(app: App) -> RevocationService:
    assert app.revocation is not None  # built for back-channel logout alone
    await app.revocation.resync()  # the first load, as `start()` makes it: the index answers from now on
    return app.revocation


def sign(mint: Mint, alg: str = "ES256", headers: dict[str, Any] | None = None, **overrides: Any) -> str:
    return mint(logout_claims(**overrides), alg=alg, headers={"typ": "logout+jwt", **(headers or {})})


def form_request(body: bytes | str, content_type: str = FORM) -> HttpRequest:
    raw = body.encode() if isinstance(body, str) else body
    return HttpRequest("POST", LOGOUT_PATH, "", {"content-type": content_type}, raw)


async def post(app: App, token: str) -> HttpAnswer:
    return await app.router.dispatch(form_request("logout_token=" + token))


def error_of(answer: HttpAnswer) -> dict[str, Any]:
    assert answer.status == 400, answer
    assert ("cache-control", "no-store") in answer.headers
    document = json.loads(answer.body)
    assert document["error"] == "invalid_request"
    return dict(document)


def counted(app: App, issuer: str, result: str) -> float:
    value = app.metrics.registry.get_sample_value(
        "verifier_backchannel_logouts_total", {"issuer": issuer, "result": result}
    )
    return value or 0.0


# -- what a valid logout does ------------------------------------------------------------------------------------


async def test_a_logout_with_sid_and_sub_refuses_that_session_and_the_users_sessionless_tokens(
    app: App, service: RevocationService, mint: Mint
) -> None:
    answer = await post(app, sign(mint))
    assert answer.status == 200 and answer.body == b""
    assert ("cache-control", "no-store") in answer.headers
    check = service.revocations.check
    refused = check(principal(sid="session-1", iat=NOW + 5))  # every token of the session, even a later one
    assert refused is not None and refused.code == "session_revoked"
    assert check(principal(sid="session-2")) is None  # the user's other session lives on
    assert check(principal()) is not None  # no sid: may be the logged-out session, fail closed
    assert check(principal(iat=NOW + 1)) is None  # issued after the logout
    assert check(principal(sub="user-2")) is None
    assert check(principal(sub="user-2", sid="session-1")) is not None  # the session, whoever's token
    other = "https://other.example.test"  # another issuer's session ids and users are its own
    assert check(principal(sid="session-1", iss=other)) is None
    assert check(principal(iss=other)) is None


async def test_a_logout_with_sub_only_refuses_every_session_of_the_user_issued_before(
    app: App, service: RevocationService, mint: Mint
) -> None:
    assert (await post(app, sign(mint, sid=None))).status == 200
    check = service.revocations.check
    assert check(principal(sid="session-1")) is not None
    assert check(principal(sid="session-9")) is not None
    assert check(principal()) is not None
    assert check(principal(iat=NOW)) is not None  # at the logout: refused
    assert check(principal(iat=NOW + 1)) is None  # a login after the logout
    assert check(principal(sub="user-2")) is None


async def test_a_logout_with_sid_only_reaches_only_tokens_naming_the_session(
    app: App, service: RevocationService, mint: Mint
) -> None:
    assert (await post(app, sign(mint, sub=None))).status == 200
    check = service.revocations.check
    assert check(principal(sid="session-1")) is not None
    assert check(principal(sub="user-9", sid="session-1")) is not None
    assert check(principal()) is None  # documented limit: a sid-less token cannot be tied to the session


async def test_a_provider_clock_running_ahead_reaches_the_tokens_it_issued_before_the_logout(
    app: App, service: RevocationService, mint: Mint
) -> None:
    """The provider's clock 20 s ahead of ours stamps the logout and its tokens alike: a token it issued 15 s before
    the logout (iat NOW + 5 on its clock) is the logged-out session's. Cut at our clock's NOW, the logout missed it
    and it worked until it expired; a login after the logout (iat NOW + 21) is not reached."""
    assert (await post(app, sign(mint, sid=None, iat=int(NOW) + 20))).status == 200  # within the leeway
    assert service.revocations.check(principal(iat=NOW)) is not None
    assert service.revocations.check(principal(iat=NOW + 5)) is not None
    assert service.revocations.check(principal(iat=NOW + 20)) is not None  # at the logout: refused
    assert service.revocations.check(principal(iat=NOW + 21)) is None


async def test_a_logout_stamped_far_ahead_reaches_no_further_than_the_leeway(
    app: App, service: RevocationService, mint: Mint
) -> None:
    leeway = issuer_settings().leeway_seconds
    assert (await post(app, sign(mint, sid=None, iat=int(NOW) + leeway))).status == 200  # the furthest accepted
    (entry, *_) = service.revocations.entries()
    assert entry.event_time == NOW + leeway


async def test_the_entries_go_once_every_token_they_could_reach_has_expired(
    app: App, service: RevocationService, mint: Mint, clock: FrozenClock
) -> None:
    assert (await post(app, sign(mint))).status == 200
    lifetime = service.entry_lifetime  # max_token_lifetime_seconds, and the longest leeway a token's exp is given
    assert lifetime == service.config.max_token_lifetime_seconds + 600
    clock.advance(lifetime - 1)
    assert service.revocations.expired() == []
    assert service.revocations.check(principal(sid="session-1")) is not None
    clock.advance(2)
    assert len(service.revocations.expired()) == 2
    assert service.revocations.check(principal(sid="session-1")) is None


async def test_an_aud_list_naming_the_client_is_accepted(app: App, mint: Mint) -> None:
    assert (await post(app, sign(mint, aud=["someone-else", CLIENT]))).status == 200


@pytest.mark.parametrize("typ", [None, "logout+jwt", "application/logout+jwt", "Logout+JWT", "JWT"])
async def test_accepted_typ_values(app: App, mint: Mint, typ: str | None) -> None:
    assert (await post(app, sign(mint, headers={"typ": typ}))).status == 200


async def test_without_exp_the_iat_bound_suffices(app: App, mint: Mint) -> None:
    assert (await post(app, sign(mint, exp=None))).status == 200


async def test_with_require_exp_a_logout_token_without_exp_is_refused(
    clock: FrozenClock, fetcher: FakeFetcher, mint: Mint
) -> None:
    """Back-Channel Logout 1.0 errata set 1 makes `exp` REQUIRED: with `backchannel_logout.require_exp` a token
    without one is refused 400 (code `exp`) and changes nothing; one with it is accepted as before. Default false
    (the first edition's providers): `test_without_exp_the_iat_bound_suffices`."""
    issuer = issuer_settings(
        algorithms=("ES256",), backchannel_logout=BackchannelLogoutConfig(audiences=(CLIENT,), require_exp=True)
    )
    strict = App(Settings(grpc=None, http=None, metrics=None, issuers=(issuer,)), clock=clock, fetcher=fetcher)
    assert strict.revocation is not None
    await strict.revocation.resync()
    error_of(await post(strict, sign(mint, exp=None)))
    assert counted(strict, ISSUER, "exp") == 1
    assert strict.revocation.revocations.check(principal(sid="session-1")) is None
    assert (await post(strict, sign(mint, jti="logout-2"))).status == 200


async def test_with_require_exp_a_logout_token_with_a_null_exp_is_refused(
    clock: FrozenClock, fetcher: FakeFetcher, mint: Mint
) -> None:
    """`"exp": null` is no expiry (the time checks read it as absent): `require_exp` refuses it as it refuses a
    token without the member, not lets it through unbounded by any `exp`."""
    issuer = issuer_settings(
        algorithms=("ES256",), backchannel_logout=BackchannelLogoutConfig(audiences=(CLIENT,), require_exp=True)
    )
    strict = App(Settings(grpc=None, http=None, metrics=None, issuers=(issuer,)), clock=clock, fetcher=fetcher)
    assert strict.revocation is not None
    await strict.revocation.resync()
    token = mint({**logout_claims(), "exp": None}, alg="ES256", headers={"typ": "logout+jwt"})
    error_of(await post(strict, token))
    assert counted(strict, ISSUER, "exp") == 1
    assert strict.revocation.revocations.check(principal(sid="session-1")) is None


async def test_a_replayed_jti_is_refused_and_changes_nothing(
    app: App, service: RevocationService, mint: Mint, clock: FrozenClock
) -> None:
    token = sign(mint)
    assert (await post(app, token)).status == 200
    before = service.revocations.entries()
    clock.advance(5)
    assert error_of(await post(app, token))["error_description"] == "jti already received"
    # the same jti in another token (re-signed, another sid) is a replay too
    assert error_of(await post(app, sign(mint, sid="session-7")))["error_description"] == "jti already received"
    assert service.revocations.entries() == before
    assert counted(app, ISSUER, "replay") == 2 and counted(app, ISSUER, "accepted") == 1


async def test_a_logout_that_could_not_be_stored_is_503_and_its_retry_applies(
    app: App, service: RevocationService, mint: Mint, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = sign(mint)

    async def down(_: Any, **__: Any) -> None:
        raise StateUnavailable("store down")

    store = service._store
    with monkeypatch.context() as patch:
        patch.setattr(store, "put", down)
        answer = await post(app, token)
    assert answer.status == 503 and dict(answer.headers)["retry-after"]
    assert service.revocations.check(principal(sid="session-1")) is None
    assert (await post(app, token)).status == 200  # the jti was not burnt by the failure
    assert service.revocations.check(principal(sid="session-1")) is not None


async def test_a_logout_arriving_while_the_replay_store_is_full_is_503_applied_and_never_replayable(
    clock: FrozenClock, fetcher: FakeFetcher, mint: Mint
) -> None:
    """The replay store's revocation part full (other logouts and SETs in flight): a logout arriving then must
    still take effect (the provider retries a 503), and its jti must not become replayable: as a SET does."""
    issuer = issuer_settings(
        algorithms=("ES256", "RS256"), backchannel_logout=BackchannelLogoutConfig(audiences=(CLIENT,))
    )
    state = StateConfig(max_replay_entries=100, revocation_replay_share=0.01)  # one revocation value
    settings = Settings(grpc=None, http=None, metrics=None, issuers=(issuer,), state=state)
    app = App(settings, clock=clock, fetcher=fetcher)
    assert app.revocation is not None
    await app.revocation.resync()
    assert await app.state.first_use("bcl:someone-elses-logout", 30.0, purpose=Purpose.REVOCATION)  # full now
    token = sign(mint)
    answer = await post(app, token)
    assert answer.status == 503 and dict(answer.headers)["retry-after"]
    assert app.revocation.revocations.check(principal(sid="session-1")) is not None  # applied all the same
    assert (await post(app, token)).status == 503  # the provider's retry: still no room, still applied
    clock.advance(31)  # the proof's jti expires: room again
    assert (await post(app, token)).status == 200
    clock.advance(5)
    assert error_of(await post(app, token))["error_description"] == "jti already received"
    assert counted(app, ISSUER, "accepted") == 1


async def test_issuer_keys_out_of_reach_is_503_not_a_verdict(
    app: App, service: RevocationService, mint: Mint, fetcher: FakeFetcher
) -> None:
    fetcher.fault = "unavailable"  # discovery and JWKS answer 503: the token can be judged neither way
    answer = await post(app, sign(mint))
    assert answer.status == 503 and dict(answer.headers)["retry-after"]
    assert ("cache-control", "no-store") in answer.headers
    assert service.revocations.entries() == []


async def test_a_logout_is_counted_and_audited(
    app: App, mint: Mint, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="verifier.audit"):
        assert (await post(app, sign(mint, jti="audited-1"))).status == 200
    lines = [r for r in caplog.records if r.getMessage() == "backchannel_logout"]
    assert len(lines) == 1
    line = lines[0].__dict__
    assert line["issuer"] == ISSUER and line["subject"] == "user-1" and line["sid"] == "session-1"
    assert line["jti"] == "audited-1" and len(line["entries"]) == 2
    assert counted(app, ISSUER, "accepted") == 1


# -- every malformed logout token ----------------------------------------------------------------------------------


def _forgeries(mint: Mint, keys: SigningKeys) -> dict[str, tuple[str, str]]:
    """name -> (token, the refusal code counted)."""
    es = KIDS["ES256"]
    return {
        # First to reach the keys: the fetch it makes finds no such kid, a verdict. Within the cooldown after it an
        # unknown kid is a 503 instead (test_a_logout_signed_with_a_key_rotated_in_during_the_refetch_cooldown...).
        "unknown kid": (sign(mint, headers={"kid": "nobody"}), "key"),
        "typ at+jwt (an access token)": (sign(mint, headers={"typ": "at+jwt"}), "typ"),
        "typ secevent+jwt (a SET)": (sign(mint, headers={"typ": "secevent+jwt"}), "typ"),
        "typ not a string": (sign(mint, headers={"typ": 7}), "malformed"),
        "unknown issuer": (sign(mint, iss="https://evil.example.test"), "issuer"),
        "no issuer": (sign(mint, iss=None), "issuer"),
        "alg off the issuer's list": (sign(mint, alg="ES384"), "algorithm"),
        "alg none": (compact({"alg": "none", "typ": "logout+jwt"}, logout_claims(), b""), "algorithm"),
        "HS256 with the public key as secret": (
            compact({"alg": "HS256", "kid": es, "typ": "logout+jwt"}, logout_claims()), "algorithm"),
        "signed by another key": (
            mint(logout_claims(), alg="RS256", key=keys.rs_other, headers={"typ": "logout+jwt"}), "signature"),
        "jku header": (sign(mint, headers={"jku": "https://evil.example.test/jwks"}), "algorithm"),
        "wrong aud": (sign(mint, aud="another-client"), "audience"),
        "aud is the API, not the client": (sign(mint, aud="https://api.example.test"), "audience"),
        "no aud": (sign(mint, aud=None), "audience"),
        "no iat": (sign(mint, iat=None), "iat"),
        "iat in the future": (sign(mint, iat=int(NOW) + 31), "iat"),
        "iat too old": (sign(mint, iat=int(NOW) - 301, exp=int(NOW) + 100), "iat"),
        "expired": (sign(mint, iat=int(NOW) - 100, exp=int(NOW) - 31), "exp"),
        "exp not a number": (sign(mint, exp="soon"), "exp"),
        "no jti": (sign(mint, jti=None), "jti"),
        "empty jti": (sign(mint, jti=""), "jti"),
        "jti not a string": (sign(mint, jti=12), "jti"),
        "jti too long": (sign(mint, jti="j" * 257), "jti"),
        "no events": (sign(mint, events=None), "events"),
        "events a list": (sign(mint, events=[BACKCHANNEL_LOGOUT_EVENT]), "events"),
        "events without the logout member": (
            sign(mint, events={"https://schemas.openid.net/secevent/caep/event-type/session-revoked": {}}), "events"),
        "logout member not an object": (sign(mint, events={BACKCHANNEL_LOGOUT_EVENT: "yes"}), "events"),
        "nonce (an ID token)": (sign(mint, nonce="n-0S6_WzA2Mj"), "nonce"),
        "empty nonce": (sign(mint, nonce=""), "nonce"),
        "neither sid nor sub": (sign(mint, sid=None, sub=None), "subject"),
        "sid not a string": (sign(mint, sid=["session-1"]), "subject"),
        "sid a number": (sign(mint, sid=1), "subject"),  # as an access token's (`check_claims`): never "1"
        "empty sub": (sign(mint, sub="", sid=None), "subject"),
        "sid too long": (sign(mint, sid="s" * 513), "subject"),
        "payload not JSON": (compact({"alg": "ES256", "kid": es}, b"not json"), "malformed"),
        "two segments": ("a.b", "malformed"),
        "too large": (sign(mint, padding="x" * 17_000), "malformed"),
    }


@pytest.fixture(scope="session")
def forgeries(mint: Mint, keys: SigningKeys) -> dict[str, tuple[str, str]]:
    return _forgeries(mint, keys)


async def test_every_malformed_logout_token_is_a_400_that_changes_nothing(
    app: App, service: RevocationService, forgeries: dict[str, tuple[str, str]]
) -> None:
    for name, (token, code) in forgeries.items():
        before = counted(app, ISSUER, code) + counted(app, "unknown", code)
        answer = await post(app, token)
        assert answer.status == 400, name
        description = error_of(answer)["error_description"]
        assert counted(app, ISSUER, code) + counted(app, "unknown", code) == before + 1, (name, description)
    assert service.revocations.entries() == []
    assert counted(app, ISSUER, "accepted") == 0
    # every refusal code is exercised here (a replay, by its own test)
    assert {code for _, code in forgeries.values()} == set(REFUSAL_CODES) - {"replay"}


@pytest.mark.parametrize("value", HOSTILE_NUMBERS, ids=HOSTILE_IDS)
@pytest.mark.parametrize("claim", ["iat", "exp"])
async def test_a_hostile_time_claim_is_a_clean_400(
    app: App, service: RevocationService, mint: Mint, claim: str, value: Any
) -> None:
    error_of(await post(app, sign(mint, **{claim: value})))
    assert service.revocations.entries() == []


# -- the request itself --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ("logout_token=x", "application/json"),
        ("logout_token=x", "multipart/form-data"),
        ("logout_token=x", ""),
        ("", FORM),
        ("token=abc", FORM),
        ("logout_token=", FORM),
        ("logout_token=a&logout_token=b", FORM),
        ("logout_token", FORM),  # a pair without '='
        ("logout_token=a&&x=1", FORM),  # an empty pair
        ("logout_token=%ff%fe", FORM),  # not UTF-8 once decoded
        ("logout_token=caf\u00e9".encode(), FORM),  # not ASCII on the wire
        ("&".join(f"f{i}=1" for i in range(40)) + "&logout_token=x", FORM),
        ("logout_token=" + "a" * 60_000, FORM),
    ],
    ids=["json", "multipart", "no-content-type", "empty", "no-logout_token", "empty-token", "twice", "no-equals",
         "empty-pair", "bad-utf8", "non-ascii", "too-many-fields", "too-large"],
)
async def test_a_malformed_request_is_a_400(app: App, body: str | bytes, content_type: str) -> None:
    answer = await app.router.dispatch(form_request(body, content_type))
    error_of(answer)
    assert counted(app, "unknown", "malformed") == 1


@pytest.mark.parametrize(
    ("shape", "content_type"),
    [
        ("logout_token={t}", "application/json"),
        ("logout_token={t}", "text/plain"),
        ("logout_token={t}&logout_token={t}", FORM),
        ("logout_token={t}&&state=1", FORM),
        ("logout_token={t}&state", FORM),
        ("logout_token={t}&state=caf\u00e9", FORM),
    ],
    ids=["json", "text", "twice", "empty-pair", "no-equals", "non-ascii-field"],
)
async def test_a_valid_token_in_a_malformed_request_is_refused(
    app: App, service: RevocationService, mint: Mint, shape: str, content_type: str
) -> None:
    """The request is judged before the token: a good token does not excuse a bad form."""
    answer = await app.router.dispatch(form_request(shape.format(t=sign(mint)), content_type))
    error_of(answer)
    assert service.revocations.entries() == []


async def test_a_charset_parameter_and_other_form_fields_are_fine(app: App, mint: Mint) -> None:
    body = "state=ignored&logout_token=" + sign(mint)
    answer = await app.router.dispatch(form_request(body, FORM + "; charset=UTF-8"))
    assert answer.status == 200


async def test_only_post_is_served(app: App) -> None:
    answer = await app.router.dispatch(HttpRequest("GET", LOGOUT_PATH, "", {}, b""))
    assert answer.status == 405


async def test_no_endpoint_without_backchannel_logout(clock: FrozenClock, fetcher: FakeFetcher) -> None:
    plain = App(Settings(grpc=None, http=None, metrics=None, issuers=(issuer_settings(),)), clock=clock,
                fetcher=fetcher)
    assert plain.revocation is None
    assert (await plain.router.dispatch(form_request("logout_token=x"))).status == 404


async def test_an_issuer_without_backchannel_logout_cannot_log_anyone_out(
    clock: FrozenClock, fetcher: FakeFetcher, mint: Mint
) -> None:
    other = "https://other.example.test"
    fetcher.serve(other + "/.well-known/openid-configuration", {"issuer": other, "jwks_uri": ISSUER + "/jwks"})
    issuers = (
        issuer_settings(backchannel_logout=BackchannelLogoutConfig(audiences=(CLIENT,))),
        issuer_settings(issuer=other),  # same keys, not configured for logout
    )
    app = App(Settings(grpc=None, http=None, metrics=None, issuers=issuers), clock=clock, fetcher=fetcher)
    assert error_of(await post(app, sign(mint, iss=other)))["error_description"].startswith("iss is not")


# -- configuration ---------------------------------------------------------------------------------------------


def _config(logout: Any, **top: Any) -> dict[str, Any]:
    issuer = {"issuer": ISSUER, "audiences": ["https://api.example.test"], "algorithms": ["ES256"],
              "backchannel_logout": logout}
    return {"http": {"listen": "127.0.0.1:0"}, "issuers": [issuer], **top}


def test_config_reads_the_section() -> None:
    settings = parse_settings(_config({"audiences": [CLIENT], "max_age_seconds": 60}))
    assert settings.issuers[0].backchannel_logout == BackchannelLogoutConfig(audiences=(CLIENT,), max_age_seconds=60)
    strict = parse_settings(_config({"audiences": [CLIENT], "require_exp": True})).issuers[0].backchannel_logout
    assert strict is not None and strict.require_exp
    assert not BackchannelLogoutConfig(audiences=(CLIENT,)).require_exp


@pytest.mark.parametrize(
    ("logout", "top", "names"),
    [
        ({}, {}, "issuers[0].backchannel_logout.audiences: expected a non-empty list"),
        ({"audiences": []}, {}, "issuers[0].backchannel_logout.audiences"),
        ({"audiences": [CLIENT], "max_age": 5}, {}, "issuers[0].backchannel_logout.max_age: unknown key"),
        ({"audiences": [CLIENT], "max_age_seconds": 0}, {}, "issuers[0].backchannel_logout.max_age_seconds"),
        ("yes", {}, "issuers[0].backchannel_logout: expected a mapping"),
        ({"audiences": [CLIENT]}, {"workers": 2}, "issuers[].backchannel_logout"),
    ],
)
def test_config_errors_name_the_key(logout: Any, top: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(_config(logout, **top))
    assert names in str(caught.value)


async def test_a_logout_survives_a_restart_in_the_durable_local_store(
    clock: FrozenClock, fetcher: FakeFetcher, mint: Mint, tmp_path: Path
) -> None:
    """Without Redis, a logout is in the SQLite store before the provider gets its 200: a restart keeps it."""
    issuer = issuer_settings(backchannel_logout=BackchannelLogoutConfig(audiences=(CLIENT,)))
    settings = Settings(grpc=None, http=None, metrics=None, issuers=(issuer,), state=StateConfig(path=str(tmp_path)))
    first = App(settings, clock=clock, fetcher=fetcher)
    assert first.revocation is not None
    await first.revocation.start()
    try:
        assert (await post(first, sign(mint))).status == 200
    finally:
        await first.revocation.stop()
    second = App(settings, clock=clock, fetcher=fetcher)
    assert second.revocation is not None
    await second.revocation.start()
    try:
        assert second.revocation.revocations.check(principal(sid="session-1")) is not None
    finally:
        await second.revocation.stop()


async def test_a_full_revocation_part_answers_503_with_the_seconds_until_it_has_room(
    clock: FrozenClock, fetcher: FakeFetcher, mint: Mint
) -> None:
    """The revocation part of the local replay store (here one entry) full: the logout is 503 and its
    Retry-After is when the jti held expires (its token's iat + max_age + leeway + 1, 10 s ago), not a fixed 1."""
    issuer = issuer_settings(backchannel_logout=BackchannelLogoutConfig(audiences=(CLIENT,)))
    state = StateConfig(max_replay_entries=100, revocation_replay_share=0.01)
    settings = Settings(grpc=None, http=None, metrics=None, issuers=(issuer,), state=state)
    app = App(settings, clock=clock, fetcher=fetcher)
    assert app.revocation is not None
    await app.revocation.resync()
    assert (await post(app, sign(mint, jti="first"))).status == 200
    clock.advance(10)
    answer = await post(app, sign(mint, jti="second", iat=int(NOW) + 10, exp=int(NOW) + 130))
    assert issuer.backchannel_logout is not None
    window = issuer.backchannel_logout.max_age_seconds + issuer.leeway_seconds + 1  # the first token's iat is NOW
    assert answer.status == 503 and dict(answer.headers)["retry-after"] == str(window - 10)
    assert json.loads(answer.body) == {"error": "temporarily_unavailable"}


async def test_the_http_door_reads_a_logout_sent_in_pieces(
    clock: FrozenClock, fetcher: FakeFetcher, mint: Mint
) -> None:
    """Through the real forward-auth listener: headers and form arrive in pieces, plain and chunked."""
    issuer = issuer_settings(backchannel_logout=BackchannelLogoutConfig(audiences=(CLIENT,)))
    settings = Settings(grpc=None, http=Listen(host="127.0.0.1", port=0), metrics=None, issuers=(issuer,))
    app = App(settings, clock=clock, fetcher=fetcher)
    await app.start()
    try:
        await asyncio.wait_for(app.wait_serving(), 10)
        assert app.ports.http is not None
        for jti, chunked in (("pieces-1", False), ("pieces-2", True)):
            form = ("logout_token=" + sign(mint, jti=jti, sid=jti)).encode()
            framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(form)}"
            head = f"POST {LOGOUT_PATH} HTTP/1.1\r\nHost: verifier\r\nContent-Type: {FORM}\r\n{framing}\r\n\r\n"
            pieces = (form[:100], form[100:])
            body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n" if chunked else form
            answer = await trickled(app.ports.http, head.encode() + body, 97, 0.005)
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert b"cache-control: no-store" in answer.lower()
            assert app.revocation is not None
            assert app.revocation.revocations.check(principal(sid=jti)) is not None
    finally:
        await app.stop(grace=0.5)


async def test_a_logout_signed_with_a_key_rotated_in_during_the_refetch_cooldown_is_503_then_applied(
    app: App, service: RevocationService, mint: Mint, keys: SigningKeys, fetcher: FakeFetcher,
    jwks_document: dict[str, Any], clock: FrozenClock,
) -> None:
    """Any client can send an access token with a made-up kid: it refetches the issuer's keys and starts the cooldown.
    A key the provider rotates in meanwhile is unknown until the cooldown ends; a 400 for the logout token it signs
    would be final (section 2.8: the provider does not retry it) and the session would stay alive, so it is 503, and
    the provider's retry takes effect."""
    junk = await post(app, sign(mint, headers={"kid": "made-up"}, jti="junk"))  # refetches: a fresh verdict
    assert error_of(junk)["error_description"] == "no key of the sender fits the kid and alg"
    fetcher.serve(JWKS_URL, {"keys": [*jwks_document["keys"], public_jwk(keys.rs_other, "rotated-in")]})
    token = mint(logout_claims(), alg="RS256", kid="rotated-in", key=keys.rs_other, headers={"typ": "logout+jwt"})
    answer = await post(app, token)
    assert answer.status == 503 and dict(answer.headers)["retry-after"]
    assert service.revocations.check(principal(sid="session-1")) is None
    clock.advance(31)  # the provider retries after the cooldown: the keys are fetched again
    assert (await post(app, token)).status == 200
    assert service.revocations.check(principal(sid="session-1")) is not None


async def test_a_logout_without_kid_signed_by_the_new_key_of_a_rotation_overlap_is_applied(
    app: App, service: RevocationService, mint: Mint, keys: SigningKeys, fetcher: FakeFetcher,
    jwks_document: dict[str, Any],
) -> None:
    """The provider publishes its old RSA key and its new one: a logout token without a kid signed by the new one
    is checked against both (as an access token is), not refused for want of one key."""
    fetcher.serve(JWKS_URL, {"keys": [*jwks_document["keys"], public_jwk(keys.rs_other, "rotated-in")]})
    forged = mint(logout_claims(jti="forged"), alg="RS256", kid=None, key=keys.rs_other, headers={"typ": "logout+jwt"})
    head, body, sig = forged.split(".")
    flipped = "A" if sig[100] != "A" else "B"  # one signature byte changed, in the middle (never padding bits)
    refused = await post(app, f"{head}.{body}.{sig[:100]}{flipped}{sig[101:]}")
    assert error_of(refused)["error_description"] == "signature does not verify"
    token = mint(logout_claims(), alg="RS256", kid=None, key=keys.rs_other, headers={"typ": "logout+jwt"})
    assert (await post(app, token)).status == 200
    assert service.revocations.check(principal(sid="session-1")) is not None


# -- the jti is remembered until no replica accepts the token ---------------------------------------------------


def receiver(clock: FrozenClock, offset: float, state: MemoryState, fetcher: FakeFetcher) -> BackchannelLogout:
    """One replica's logout receiver (its clock `offset` seconds off the store's), on a shared replay store."""
    settings = issuer_settings(algorithms=("ES256",), backchannel_logout=BackchannelLogoutConfig(audiences=(CLIENT,)))
    replica_clock = SkewedClock(clock, offset)
    keys = make_issuer_keys(settings, fetcher, replica_clock)  # type: ignore[arg-type]

    async def add(_: list[Any]) -> None:
        return None

    return BackchannelLogout(
        LogoutTokenVerifier({ISSUER: (settings, keys)}, replica_clock), state=state, add=add,
        metrics=RevocationMetrics(CollectorRegistry(), REFUSAL_CODES), clock=replica_clock, entry_lifetime=3600,
    )


async def test_a_logout_token_ahead_of_our_clock_is_refused_as_a_replay_until_its_last_acceptable_instant(
    clock: FrozenClock, fetcher: FakeFetcher, mint: Mint
) -> None:
    """A logout token is accepted while its `iat` is at most the issuer's `leeway_seconds` (30) ahead and at most
    `max_age_seconds` (300) old; without `exp`, nothing else ends it. One signed `leeway` ahead, received at once,
    stays acceptable 330 s. Before, its jti lived 330 s from its receipt, and at that last instant the replay was
    accepted again."""
    logout = receiver(clock, 0, MemoryState(clock), fetcher)
    token = sign(mint, iat=int(NOW) + 30, exp=None)
    await logout.receive(token)
    clock.advance(300 + 30)  # now - iat == max_age_seconds: still accepted, the old key just expired
    with pytest.raises(LogoutRefused) as caught:
        await logout.receive(token)
    assert caught.value.code == "replay"


async def test_a_replica_whose_clock_lags_refuses_a_replayed_logout_token(
    clock: FrozenClock, fetcher: FakeFetcher, mint: Mint
) -> None:
    """Two replicas share the replay store (on its own clock), their clocks just under the issuer's `leeway_seconds`
    apart. The one ahead receives a token signed as far ahead as it allows; the one behind accepts it until its own
    clock is `max_age_seconds` past the `iat`. Before, the jti was gone ~29 s before that: the replay was accepted."""
    shared = MemoryState(clock)
    ahead, behind = receiver(clock, 29, shared, fetcher), receiver(clock, 0, shared, fetcher)
    token = sign(mint, iat=int(NOW) + 29 + 30, exp=None)
    await ahead.receive(token)
    clock.advance(300 + 30 + 1)  # past the old key; `behind` sees the token 272 s old
    with pytest.raises(LogoutRefused) as caught:
        await behind.receive(token)
    assert caught.value.code == "replay"


# -- token substitution (section 2.4 explicit typing, section 2.6 steps 3 to 6) ---------------------------------


def client_token(**claims: Any) -> dict[str, Any]:
    """Claims the provider gives the client in another kind of token (an access token, an ID token) at NOW."""
    base = {"iss": ISSUER, "aud": CLIENT, "sub": "user-1", "sid": "session-1", "iat": int(NOW), "exp": int(NOW) + 300}
    return {**base, **claims}


@pytest.mark.parametrize(
    ("typ", "code"), [("at+jwt", "typ"), ("JWT", "events"), (None, "events")], ids=["at+jwt", "JWT", "no typ"]
)
async def test_an_access_token_posted_as_a_logout_token_is_refused(
    app: App, service: RevocationService, mint: Mint, typ: str | None, code: str
) -> None:
    """The provider's access token for the client (its keys, `aud` the client id, `sub` and `sid`) is not a logout
    token: typed `at+jwt` it is refused by its type; with a legacy type or none, for want of the logout event."""
    claims = client_token(jti="at-1", scope="openid", client_id=CLIENT)
    answer = await post(app, mint(claims, headers={"typ": typ}))
    assert answer.status == 400 and error_of(answer)
    assert counted(app, ISSUER, code) == 1
    assert service.revocations.entries() == []


async def test_an_id_token_posted_as_a_logout_token_is_refused(
    app: App, service: RevocationService, mint: Mint
) -> None:
    """An ID token (OIDC Core 2: `aud` the client id, `sub`, `sid`, `nonce`, `at_hash`) has no logout event; one
    given the event all the same is still refused by its `nonce` (section 2.6 step 6)."""
    claims = client_token(jti="id-0", auth_time=int(NOW) - 5, nonce="n-0S6_WzA2Mj", at_hash="77QmUPtjPfzWtF2AnpK9RQ")
    answer = await post(app, mint(claims, headers={"typ": "JWT"}))
    assert answer.status == 400 and counted(app, ISSUER, "events") == 1
    with_event = {**claims, "jti": "id-1", "events": {BACKCHANNEL_LOGOUT_EVENT: {}}}
    answer = await post(app, mint(with_event, headers={"typ": "JWT"}))
    assert answer.status == 400 and counted(app, ISSUER, "nonce") == 1
    assert service.revocations.entries() == []


@pytest.mark.parametrize("typ", ["logout+jwt", None], ids=["logout+jwt", "no typ"])
async def test_a_logout_token_presented_as_an_access_token_at_the_forward_auth_door_is_refused(
    typ: str | None,
) -> None:
    """A genuine logout token (the provider's key, `aud` the API's audience as well as the client's: the worst
    case) presented as a Bearer token through the forward-auth door is 401 `token_type_invalid`, typed or not;
    posted where it belongs, the same token is a valid logout (200)."""
    import time

    import jwt
    from doorkit import http_exchange, running_verifier

    from verifier.devidp import DEV_AUDIENCE

    logout = BackchannelLogoutConfig(audiences=(DEV_AUDIENCE,))
    async with running_verifier(backchannel_logout=logout) as (app, idp):
        kid, private = idp._keys["ES256"]
        now = int(time.time())
        claims = {
            "iss": idp.issuer,
            "aud": DEV_AUDIENCE,
            "sub": "someone-else",
            "sid": "s-9",
            "iat": now,
            "exp": now + 120,
            "jti": f"bcl-{typ}",
            "events": {BACKCHANNEL_LOGOUT_EVENT: {}},
        }
        token = jwt.encode(claims, private, algorithm="ES256", headers={"kid": kid, **({"typ": typ} if typ else {})})
        raw = f"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        answer = await http_exchange(app.ports.http, raw)
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        assert b"x-verifier-reason: token_type_invalid\r\n" in answer
        body = f"logout_token={token}".encode()
        raw = (
            f"POST {LOGOUT_PATH} HTTP/1.1\r\nHost: v\r\nContent-Type: {FORM}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        assert (await http_exchange(app.ports.http, raw)).startswith(b"HTTP/1.1 200 ")
