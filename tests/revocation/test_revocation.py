"""Revocation at the edge: SSF/CAEP/RISC events, forged SETs, the kill switch, expiry (FrozenClock)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hostile_numbers import HOSTILE_IDS, HOSTILE_NUMBERS
from jwt.algorithms import RSAAlgorithm
from prometheus_client import CollectorRegistry
from ssf_transmitter import (
    ACCOUNT_DISABLED,
    ACCOUNT_ENABLED,
    ACCOUNT_PURGED,
    ASSURANCE_LEVEL_CHANGE,
    CREDENTIAL_CHANGE,
    CREDENTIAL_COMPROMISE,
    SESSION_REVOKED,
    TOKEN_CLAIMS_CHANGE,
    SsfTransmitter,
)
from support import FrozenClock, SkewedClock, compare_digest_calls, no_http_session
from tokenkit import ISSUER, NOW, FakeFetcher, issuer_settings

from verifier.app import SSF_USER_AGENT, App
from verifier.checks.base import NO_POLICY
from verifier.checks.revocation import Revocation
from verifier.config.state import ReplayBounds
from verifier.doors.admin_http import MAX_BODY_BYTES, add_admin_routes
from verifier.doors.refusals import refuse
from verifier.doors.routes import HttpAnswer, HttpRequest, Router
from verifier.doors.ssf_http import add_ssf_routes
from verifier.errors import InvalidToken, RevocationNotReplicated, StateUnavailable
from verifier.generation import Generation
from verifier.observe.metrics import RevocationMetrics
from verifier.principal import Principal
from verifier.request import RequestAttributes
from verifier.revocation import Revocations, RevocationService, TokenRevoked, parse_revocation_config
from verifier.revocation import service as service_module
from verifier.revocation.entry import REFUSAL_CODES, Effect, Entry, KeyKind, Match, SubjectKey, email_key
from verifier.revocation.ssf import CredentialRevocation
from verifier.revocation.store import MemoryStore
from verifier.revocation.subjects import MAX_IDENTIFIER_CHARS, SubjectError, subject_keys
from verifier.settings import ConfigError, Settings
from verifier.state.memory import MemoryState

TX = "https://ssf.example.test"
RECEIVER = "https://verifier.example.test/ssf"
LIFETIME = 3600
ENTRY_LIFETIME = LIFETIME + 600  # entries outlive their tokens' exp by the longest leeway an issuer may be given
ADMIN = "admin-secret-0123456789-abcdefghijkl"
USER = {"format": "iss_sub", "iss": ISSUER, "sub": "user-1"}
TX_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def principal(sub: str = "user-1", iss: str = ISSUER, **claims: Any) -> Principal:
    """A verified caller whose token was issued 10 s before NOW unless `iat` says otherwise."""
    values: dict[str, Any] = {"iss": iss, "sub": sub, "iat": NOW - 10, "exp": NOW + 300}
    values.update(claims)
    values = {k: v for k, v in values.items() if v is not None}
    return Principal(
        issuer=iss, subject=sub, client_id=None, scopes=(), roles=frozenset(),
        expires_at=float(values["exp"]), claims=values,
    )


def announced(service: RevocationService, caller: Principal) -> dict[str, Any] | None:
    """The claims the entries reaching `caller` announce, newest event last (None: no entry reaches it)."""
    entries = service.revocations.overrides(caller)
    return None if entries is None else {k: v for e in entries for k, v in (e.overrides or {}).items()}


@pytest.fixture
def transmitter(clock: FrozenClock) -> SsfTransmitter:
    return SsfTransmitter(audience=RECEIVER, issuer=TX, now=clock.now)


@pytest.fixture
def provider(transmitter: SsfTransmitter) -> FakeFetcher:
    fake = FakeFetcher()
    fake.serve(transmitter.configuration_url, transmitter.configuration())
    # beside its ES256 key, an RSA key the transmitter's `algorithms` (ES256) do not allow
    rsa_jwk = {**RSAAlgorithm.to_jwk(TX_RSA.public_key(), as_dict=True), "kid": "tx-rsa", "use": "sig"}
    fake.serve(transmitter.jwks_url, {"keys": [*transmitter.jwks()["keys"], rsa_jwk]})
    return fake


def transmitter_section(**overrides: Any) -> dict[str, Any]:
    tx = {"issuer": TX, "audience": RECEIVER, "delivery": "push", "algorithms": ["ES256"], "max_age_seconds": 300,
          "subjects_of": [ISSUER]}
    return {**tx, **overrides}


def config(**overrides: Any) -> Any:
    return parse_revocation_config({"transmitters": [transmitter_section(**overrides)],
                                    "max_token_lifetime_seconds": LIFETIME})


class Credentials:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple[str, ...], str]] = []

    async def __call__(self, revoked: CredentialRevocation) -> None:
        self.calls.append((revoked.issuer, revoked.subject, revoked.credential_ids, revoked.aaguid))


@pytest.fixture
def credentials() -> Credentials:
    return Credentials()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def service(
    clock: FrozenClock, provider: FakeFetcher, credentials: Credentials, registry: CollectorRegistry
) -> AsyncIterator[RevocationService]:
    svc = RevocationService(
        config(), state=MemoryState(clock), fetcher=provider, clock=clock,
        metrics=RevocationMetrics(registry, REFUSAL_CODES), session=no_http_session,
        on_credential_revoked=credentials, admin_token=ADMIN,
    )
    await svc.start()
    yield svc
    await svc.stop()


def set_request(
    token: str, content_type: str = "application/secevent+jwt", authorization: str | None = None
) -> HttpRequest:
    headers = {"content-type": content_type, **({"authorization": authorization} if authorization is not None else {})}
    return HttpRequest("POST", "/v1/ssf/events", "", headers, token.encode())


async def push(service: RevocationService, token: str, **kwargs: Any) -> HttpAnswer:
    router = Router()
    add_ssf_routes(router, service)
    add_admin_routes(router, service.admin)
    return await router.dispatch(set_request(token, **kwargs))


def body(answer: HttpAnswer) -> Any:
    return json.loads(answer.body) if answer.body else None


# -- events ---------------------------------------------------------------------------------------------


async def test_session_revoked_refuses_every_token_of_the_session(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    token = transmitter.sign_set({SESSION_REVOKED: {"event_timestamp": int(NOW)}}, {"format": "opaque", "id": "s-1"})
    answer = await push(service, token)
    assert answer.status == 202 and answer.body == b""
    refused = service.revocations.check(principal(sid="s-1", iat=NOW + 5))  # even one issued after
    assert isinstance(refused, InvalidToken) and refused.code == "session_revoked"
    assert refused.reusable is False
    assert service.revocations.check(principal(sid="s-2")) is None
    assert service.revocations.check(principal()) is None


async def test_session_revoked_for_a_subject_refuses_tokens_issued_at_or_before_the_event_only(
    service: RevocationService, transmitter: SsfTransmitter, clock: FrozenClock
) -> None:
    token = transmitter.sign_set({SESSION_REVOKED: {"event_timestamp": int(NOW) - 5}}, USER)
    assert (await push(service, token)).status == 202
    assert service.revocations.check(principal(iat=NOW - 10)) is not None
    assert service.revocations.check(principal(iat=NOW - 5)) is not None  # at the event: refused
    assert service.revocations.check(principal(iat=NOW - 4)) is None  # issued after the event
    assert service.revocations.check(principal(sub="user-2", iat=NOW - 10)) is None
    assert service.revocations.check(principal(iss="https://other.example.test", iat=NOW - 10)) is None


async def test_session_revoked_without_event_timestamp_uses_the_set_iat(
    service: RevocationService, transmitter: SsfTransmitter, clock: FrozenClock
) -> None:
    token = transmitter.sign_set({SESSION_REVOKED: {}}, USER, iat=NOW - 20)
    assert (await push(service, token)).status == 202
    assert service.revocations.check(principal(iat=NOW - 20)) is not None
    assert service.revocations.check(principal(iat=NOW - 19)) is None


async def test_a_refusal_is_answered_401_invalid_token_with_the_reason(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    await push(service, transmitter.sign_set({SESSION_REVOKED: {}}, USER))
    refused = service.revocations.check(principal())
    assert isinstance(refused, TokenRevoked) and refused.jti
    decision = refuse(refused, realm="verifier")
    assert decision.status == 401 and decision.reason == "session_revoked" and decision.cache_max_age == 0
    challenge = dict(decision.response_headers)["www-authenticate"]
    assert 'error="invalid_token"' in challenge and 'error_description="session revoked"' in challenge


async def test_the_refusal_is_audited_at_warning_with_the_event_jti(
    service: RevocationService, transmitter: SsfTransmitter, caplog: pytest.LogCaptureFixture
) -> None:
    await push(service, transmitter.sign_set({SESSION_REVOKED: {}}, USER, jti="set-jti-1"))
    with caplog.at_level("WARNING", logger="verifier.audit"):
        service.revocations.check(principal())
    records = [r for r in caplog.records if r.name == "verifier.audit"]
    assert records and records[-1].levelname == "WARNING" and records[-1].__dict__["jti"] == "set-jti-1"


async def test_a_top_level_sub_never_names_the_subject(service: RevocationService, transmitter: SsfTransmitter) -> None:
    """SSF 1.0 names the subject in `sub_id` (or the event's `subject`); RFC 9493 section 4.1: a receiver must not
    rely on both `sub` and `sub_id`. A SET's top-level `sub` reaches nobody: beside `sub_id` it is ignored, and
    alone the SET names no subject and is refused, so the transmitter hears of it."""
    both = transmitter.sign_set({ACCOUNT_DISABLED: {}}, USER, extra={"sub": "victim"})
    assert (await push(service, both)).status == 202
    assert service.revocations.check(principal()) is not None
    assert service.revocations.check(principal(sub="victim")) is None
    alone = transmitter.sign_set({ACCOUNT_DISABLED: {}}, extra={"sub": "victim"})
    answer = await push(service, alone)
    assert answer.status == 400 and body(answer)["err"] == "invalid_request"
    assert service.revocations.check(principal(sub="victim")) is None


async def test_subject_from_the_event_when_there_is_no_sub_id(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    token = transmitter.sign_set({SESSION_REVOKED: {"subject": USER}})
    assert (await push(service, token)).status == 202
    assert service.revocations.check(principal()) is not None


async def test_credential_change_refuses_tokens_authenticated_before_only(
    service: RevocationService, transmitter: SsfTransmitter, credentials: Credentials
) -> None:
    event = {"change_type": "revoke", "credential_type": "fido2-roaming", "event_timestamp": int(NOW) - 100,
             "credential_ids": ["cred-a", "cred-b"]}
    assert (await push(service, transmitter.sign_set({CREDENTIAL_CHANGE: event}, USER))).status == 202
    old = service.revocations.check(principal(auth_time=NOW - 200, iat=NOW - 10))
    assert old is not None and old.code == "credential_revoked" and old.description == "credential revoked"
    assert service.revocations.check(principal(auth_time=NOW - 50, iat=NOW - 10)) is None
    # no auth_time: iat bounds it from above
    assert service.revocations.check(principal(iat=NOW - 150)) is not None
    assert service.revocations.check(principal(iat=NOW - 10)) is None
    assert credentials.calls == [(ISSUER, "user-1", ("cred-a", "cred-b"), "")]


async def test_credential_change_create_or_update_changes_nothing(
    service: RevocationService, transmitter: SsfTransmitter, credentials: Credentials
) -> None:
    event = {"change_type": "update", "credential_type": "password", "credential_ids": ["x"]}
    assert (await push(service, transmitter.sign_set({CREDENTIAL_CHANGE: event}, USER))).status == 202
    assert len(service.revocations) == 0 and credentials.calls == []


@pytest.mark.parametrize("event", [ACCOUNT_DISABLED, CREDENTIAL_COMPROMISE])
async def test_account_disabled_refuses_every_token_until_account_enabled(
    service: RevocationService, transmitter: SsfTransmitter, clock: FrozenClock, event: str
) -> None:
    assert (await push(service, transmitter.sign_set({event: {}}, USER))).status == 202
    refused = service.revocations.check(principal(iat=NOW + 100))
    assert refused is not None and refused.code == "account_disabled"
    clock.advance(LIFETIME * 5)  # no expiry: only account-enabled lifts it
    assert service.revocations.check(principal(iat=clock.now())) is not None
    assert (await push(service, transmitter.sign_set({ACCOUNT_ENABLED: {}}, USER))).status == 202
    assert service.revocations.check(principal(iat=clock.now())) is None
    assert len(service.revocations) == 0


async def test_an_older_account_enabled_does_not_lift_a_newer_disable(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    await push(service, transmitter.sign_set({ACCOUNT_DISABLED: {"event_timestamp": int(NOW)}}, USER))
    await push(service, transmitter.sign_set({ACCOUNT_ENABLED: {"event_timestamp": int(NOW) - 60}}, USER))
    assert service.revocations.check(principal()) is not None


async def test_account_purged_refuses_until_every_token_then_alive_has_expired(
    service: RevocationService, transmitter: SsfTransmitter, clock: FrozenClock
) -> None:
    await push(service, transmitter.sign_set({ACCOUNT_PURGED: {}}, USER))
    assert service.revocations.check(principal()) is not None
    clock.advance(ENTRY_LIFETIME + 1)
    assert service.revocations.check(principal(iat=clock.now())) is None


RISC = "https://schemas.openid.net/secevent/risc/event-type/"


@pytest.mark.parametrize(("event", "code"), [("sessions-revoked", "session_revoked"),
                                             ("identifier-recycled", "account_disabled")])
async def test_risc_sessions_revoked_and_identifier_recycled_refuse_tokens_issued_at_or_before_the_event(
    service: RevocationService, transmitter: SsfTransmitter, clock: FrozenClock, event: str, code: str
) -> None:
    """RISC 1.0 sessions-revoked (CAEP session-revoked's predecessor) ends the account's sessions; identifier-recycled
    gives the identifier to someone else: the tokens issued before belong to the former owner, those after to the
    new one. Both were acknowledged and ignored."""
    token = transmitter.sign_set({RISC + event: {"event_timestamp": int(NOW) - 5}}, USER)
    assert (await push(service, token)).status == 202
    refused = service.revocations.check(principal(iat=NOW - 5))
    assert refused is not None and refused.code == code
    assert service.revocations.check(principal(iat=NOW - 4)) is None  # issued after the event
    assert service.revocations.check(principal(sub="user-2", iat=NOW - 10)) is None
    clock.advance(ENTRY_LIFETIME + 1)  # over once every token then alive has expired
    assert service.revocations.check(principal(iat=NOW - 10)) is None


@pytest.mark.parametrize("event", [ACCOUNT_PURGED, RISC + "identifier-recycled"])
async def test_account_enabled_never_lifts_a_purge_or_a_recycled_identifier(
    service: RevocationService, transmitter: SsfTransmitter, event: str
) -> None:
    """account-enabled lifts what account-disabled and credential-compromise did, nothing else: a purged account's
    tokens, or a recycled identifier's former owner's, are not its new owner's to re-enable."""
    await push(service, transmitter.sign_set({event: {"event_timestamp": int(NOW) - 5}}, USER))
    await push(service, transmitter.sign_set({ACCOUNT_ENABLED: {}}, USER))
    assert service.revocations.check(principal(iat=NOW - 10)) is not None


async def test_events_not_acted_on_are_acknowledged_counted_and_logged_as_unhandled(
    service: RevocationService, transmitter: SsfTransmitter, registry: CollectorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """RFC 8935 section 2: a SET is acknowledged (202) whatever its events; the ones the receiver does not act on
    are counted (bounded labels) and named in the log line, so an operator sees a transmitter sending them."""
    events = {RISC + "recovery-activated": {}, RISC + "identifier-changed": {"new-value": "a@example.test"},
              "https://example.test/event/custom": {}, SESSION_REVOKED: {}}
    with caplog.at_level(logging.INFO, logger="verifier.revocation"):
        assert (await push(service, transmitter.sign_set(events, USER))).status == 202
    value = registry.get_sample_value
    assert value("verifier_ssf_events_unhandled_total", {"event": "recovery-activated"}) == 1
    assert value("verifier_ssf_events_unhandled_total", {"event": "identifier-changed"}) == 1
    assert value("verifier_ssf_events_unhandled_total", {"event": "other"}) == 1
    assert value("verifier_ssf_events_unhandled_total", {"event": "session-revoked"}) is None
    (line,) = [r for r in caplog.records if r.getMessage() == "ssf set accepted"]
    assert line.__dict__["unhandled"] == [RISC + "recovery-activated", RISC + "identifier-changed",
                                          "https://example.test/event/custom"]
    assert len(service.revocations) == 1  # the session-revoked only
    verification = {"https://schemas.openid.net/secevent/ssf/event-type/verification": {"state": "x"}}
    assert (await push(service, transmitter.sign_set(verification))).status == 202  # acknowledging is its handling
    assert value("verifier_ssf_events_unhandled_total", {"event": "verification"}) is None


async def test_assurance_level_change_overrides_acr_of_existing_tokens(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    event = {"namespace": "RFC8176", "current_level": "urn:acr:low", "previous_level": "urn:acr:high",
             "change_direction": "decrease", "event_timestamp": int(NOW)}
    assert (await push(service, transmitter.sign_set({ASSURANCE_LEVEL_CHANGE: event}, USER))).status == 202
    assert service.revocations.check(principal(acr="urn:acr:high")) is None  # not a refusal
    assert announced(service, principal(acr="urn:acr:high")) == {"acr": "urn:acr:low"}
    assert announced(service, principal(iat=NOW + 1)) is None  # a newer token speaks for itself
    assert announced(service, principal(sub="user-2")) is None


async def test_token_claims_change_overrides_claims_but_never_identity_claims(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    # The clients too (`client_id`, `azp`): an announcement never says whom a token was issued to, so no route's
    # `clients_any`, upstream or audit line reads a client the provider did not name.
    event = {"claims": {"role": "guest", "groups": ["a"], "sub": "admin", "exp": 9e9, "client_id": "x", "azp": "y"},
             "event_timestamp": int(NOW)}
    await push(service, transmitter.sign_set({TOKEN_CLAIMS_CHANGE: event}, USER))
    later = {"claims": {"role": "none"}, "event_timestamp": int(NOW) + 0}
    await push(service, transmitter.sign_set({TOKEN_CLAIMS_CHANGE: later}, {"format": "email", "email": "U@x.test"}))
    assert announced(service, principal()) == {"role": "guest", "groups": ["a"]}
    # by email only when the token says the email is verified
    assert announced(service, principal(sub="u2", email="u@X.test")) is None
    assert announced(service, principal(sub="u2", email="u@x.test", email_verified=True)) == {"role": "none"}


def _announcement(source: str, when: float, **claims: Any) -> Entry:
    return Entry(id=f"e-{when}", key=SubjectKey(KeyKind.ISS_SUB, "user-1", ISSUER), effect=Effect.CLAIMS_OVERRIDE,
                 match=Match.ISSUED_BEFORE, event_time=when, expires_at=None, source=source, event="test",
                 overrides=claims)


def test_a_restricting_announcement_keeps_only_what_the_token_holds() -> None:
    from verifier.checks.revocation import announced_claims

    own = {"sub": "u", "scp": ["read", "write"], "groups": ["a", "b"], "acr": "low", "level": 1, "org": {"id": 1}}
    after = announced_claims(own, [_announcement(TX, 1, scope="read admin", groups=["b", "c", 1], acr="high",
                                                 level=True, org={"id": 2}, extra="x", amr=["hwk"])], frozenset())
    # `scope` replaces `scp`, kept to the token's; lists intersected; a moved scalar, an added claim: left out
    assert after == {"sub": "u", "scope": "read", "groups": ["b"]}
    assert announced_claims(own, [_announcement(TX, 1, acr="low", level=1)], frozenset()) == own  # equal: kept
    # newest word per claim: a restrict transmitter may give back what it took, never more
    taken, given = _announcement(TX, 1, groups=["a"]), _announcement(TX, 2, groups=["a", "b", "z"])
    assert announced_claims(own, [taken, given], frozenset())["groups"] == ["a", "b"]
    assert announced_claims(own, [given, taken], frozenset())["groups"] == ["a"]


def test_a_replacing_transmitter_raises_and_a_restricting_one_is_kept_to_what_the_claims_then_hold() -> None:
    from verifier.checks.revocation import announced_claims

    idp, risk = "https://idp.example.test", TX
    own = {"sub": "u", "scope": "read", "acr": "low"}
    raised = _announcement(idp, 1, scope="read write", acr="high")
    assert announced_claims(own, [raised], frozenset({idp})) == {"sub": "u", "scope": "read write", "acr": "high"}
    assert announced_claims(own, [raised], frozenset()) == {"sub": "u", "scope": "read"}  # not configured: restrict
    narrowed = _announcement(risk, 2, scope="write admin")
    assert announced_claims(own, [raised, narrowed], frozenset({idp}))["scope"] == "write"
    # the provider's later word stands as it is
    assert announced_claims(own, [narrowed, raised], frozenset({idp}))["scope"] == "read write"


async def test_unknown_events_are_accepted_and_change_nothing(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    token = transmitter.sign_set({"https://schemas.openid.net/secevent/ssf/event-type/verification": {"state": "x"}})
    assert (await push(service, token)).status == 202
    assert len(service.revocations) == 0


async def test_email_subject_refuses_tokens_carrying_that_email(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    await push(service, transmitter.sign_set({ACCOUNT_DISABLED: {}}, {"format": "email", "email": "Ann@Example.test"}))
    assert service.revocations.check(principal(sub="zz", email="ann@example.TEST")) is not None
    assert service.revocations.check(principal(sub="zz", email="bob@example.test")) is None
    # Only the tokens of the issuers the transmitter speaks for.
    elsewhere = principal(sub="zz", iss="https://other.example.test", email="ann@example.test")
    assert service.revocations.check(elsewhere) is None


NFC_EMAIL = "Jos\u00e9.M\u00fcller@example.test"  # precomposed: what most systems send
NFD_EMAIL = "jose\u0301.mu\u0308ller@EXAMPLE.test"  # the same address decomposed, as another system may keep it


@pytest.mark.parametrize(("announced_as", "carried_as"), [(NFC_EMAIL, NFD_EMAIL), (NFD_EMAIL, NFC_EMAIL)])
async def test_an_email_subject_reaches_the_same_address_in_another_unicode_normalization_form(
    service: RevocationService, transmitter: SsfTransmitter, announced_as: str, carried_as: str
) -> None:
    """An address is the same address whether its accents come precomposed (NFC) or as combining marks (NFD): a
    transmitter and the provider that spell it differently must not let the account's tokens through (was: the
    SET was accepted, 202, and the compromised account's tokens kept passing)."""
    subject = {"format": "email", "email": announced_as}
    assert (await push(service, transmitter.sign_set({ACCOUNT_DISABLED: {}}, subject))).status == 202
    refusal = service.revocations.check(principal(sub="zz", email=carried_as))
    assert isinstance(refusal, TokenRevoked) and refusal.code == "account_disabled"
    # Another address (without the accents) is another user's: untouched.
    assert service.revocations.check(principal(sub="yy", email="jose.muller@example.test")) is None
    # A claims announcement by email reaches the verified address in either form too.
    later = {"claims": {"role": "none"}, "event_timestamp": int(NOW)}
    await push(service, transmitter.sign_set({TOKEN_CLAIMS_CHANGE: later}, subject))
    assert announced(service, principal(sub="u2", email=carried_as, email_verified=True)) == {"role": "none"}


async def test_the_kill_switch_by_email_reaches_the_address_in_either_normalization_form(
    service: RevocationService,
) -> None:
    router = routes(service)
    created = await router.dispatch(admin("POST", document={"subject": {"format": "email", "email": NFD_EMAIL}}))
    assert created.status == 201
    assert isinstance(service.revocations.check(principal(sub="zz", email=NFC_EMAIL)), TokenRevoked)
    assert service.revocations.check(principal(sub="yy", email="jose.muller@example.test")) is None


async def test_an_email_entry_stored_in_another_normalization_form_still_matches() -> None:
    """Entries stored before addresses were normalized (an NFD key in Redis or the SQLite file) still reach the
    tokens, whichever form these carry."""
    index = Revocations(FrozenClock())
    entry = Entry(id="op-legacy", key=SubjectKey(KeyKind.EMAIL, NFD_EMAIL.lower()), effect=Effect.ACCOUNT_DISABLED,
                  match=Match.ALL, event_time=NOW, expires_at=None, source="operator", event="operator")
    index.replace([entry])
    assert index.check(principal(sub="zz", email=NFC_EMAIL)) is not None
    assert index.check(principal(sub="zz", email=NFD_EMAIL)) is not None


UNICODE_DOMAIN_EMAIL = "Ann@B\u00fccher.Example"  # the domain in Unicode labels (U-labels)
A_LABEL_EMAIL = "ann@XN--BCHER-KVA.example"  # the same domain as a directory may keep it: its A-label (RFC 5890)


@pytest.mark.parametrize(
    ("announced_as", "carried_as"), [(UNICODE_DOMAIN_EMAIL, A_LABEL_EMAIL), (A_LABEL_EMAIL, UNICODE_DOMAIN_EMAIL)]
)
async def test_an_email_subject_reaches_the_same_internationalized_domain_in_either_spelling(
    service: RevocationService, transmitter: SsfTransmitter, announced_as: str, carried_as: str
) -> None:
    """`ann@bücher.example` and `ann@xn--bcher-kva.example` are one mailbox: an event naming it in one spelling
    must refuse the tokens carrying the other (was: the SET was accepted, 202, and the tokens kept passing)."""
    subject = {"format": "email", "email": announced_as}
    assert (await push(service, transmitter.sign_set({ACCOUNT_DISABLED: {}}, subject))).status == 202
    refusal = service.revocations.check(principal(sub="zz", email=carried_as))
    assert isinstance(refusal, TokenRevoked) and refusal.code == "account_disabled"
    # Another domain is another mailbox, and the local part is no domain: both untouched.
    assert service.revocations.check(principal(sub="yy", email="ann@bucher.example")) is None
    assert service.revocations.check(principal(sub="yy", email="bob@b\u00fccher.example")) is None


def test_domains_meet_only_in_their_own_a_labels() -> None:
    """Punycode as it is, no IDNA 2003 mapping: `straße.de` is not `strasse.de` (two registrable domains, which
    a grant by email must not merge); the local part keeps its Unicode; case and NFC meet as before."""
    assert email_key("a@Stra\u00dfe.de") == "a@xn--strae-oqa.de" != email_key("a@strasse.de")
    assert email_key("J\u00f6rg@b\u00fccher.example") == "j\u00f6rg@xn--bcher-kva.example"
    assert email_key("a@bu\u0308cher.example") == email_key("a@B\u00dcCHER.example") == "a@xn--bcher-kva.example"
    assert email_key("no-domain-\u00fc") == "no-domain-\u00fc"


async def test_the_kill_switch_by_email_reaches_an_internationalized_domain_in_either_spelling(
    service: RevocationService,
) -> None:
    router = routes(service)
    created = await router.dispatch(admin("POST", document={"subject": {"format": "email", "email": A_LABEL_EMAIL}}))
    assert created.status == 201
    assert isinstance(service.revocations.check(principal(sub="zz", email=UNICODE_DOMAIN_EMAIL)), TokenRevoked)


async def test_an_email_entry_stored_with_a_unicode_domain_still_matches() -> None:
    """Entries stored before domains were keyed by their A-labels (Redis, the SQLite file) reach either spelling."""
    index = Revocations(FrozenClock())
    entry = Entry(id="op-legacy-idn", key=SubjectKey(KeyKind.EMAIL, UNICODE_DOMAIN_EMAIL.lower()),
                  effect=Effect.ACCOUNT_DISABLED, match=Match.ALL, event_time=NOW, expires_at=None,
                  source="operator", event="operator")
    index.replace([entry])
    assert index.check(principal(sub="zz", email=A_LABEL_EMAIL)) is not None
    assert index.check(principal(sub="zz", email=UNICODE_DOMAIN_EMAIL)) is not None


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"credential_type": "fido2-roaming"}, [(ISSUER, "user-1", (), "")]),
        ({"credential_type": "fido-u2f", "fido2_aaguid": "ADCE0002-35BC-C60A-648B-0B25F1F05503"},
         [(ISSUER, "user-1", (), "adce000235bcc60a648b0b25f1f05503")]),
        ({"credential_type": "fido2-platform", "fido2_aaguid": "not-a-uuid"}, [(ISSUER, "user-1", (), "")]),
        ({"credential_type": "password"}, []),
        ({"credential_type": "x509", "credential_ids": ["ours"]}, [(ISSUER, "user-1", ("ours",), "")]),
    ],
)
async def test_credential_change_names_the_webauthn_credentials_to_disable(
    service: RevocationService, transmitter: SsfTransmitter, credentials: Credentials,
    event: dict[str, Any], expected: list[Any],
) -> None:
    body = {"change_type": "delete", **event}
    assert (await push(service, transmitter.sign_set({CREDENTIAL_CHANGE: body}, USER))).status == 202
    assert credentials.calls == expected


async def test_events_about_another_issuers_subjects_are_acknowledged_ignored_and_counted(
    service: RevocationService, transmitter: SsfTransmitter, credentials: Credentials, registry: CollectorRegistry
) -> None:
    other = {"format": "iss_sub", "iss": "https://other.example.test", "sub": "user-1"}
    revoke = {"change_type": "revoke", "credential_type": "fido2-roaming"}
    token = transmitter.sign_set({ACCOUNT_DISABLED: {}, CREDENTIAL_CHANGE: revoke}, other)
    assert (await push(service, token)).status == 202
    assert len(service.revocations) == 0 and credentials.calls == []
    ignored = registry.get_sample_value("verifier_ssf_subjects_ignored_total", {"transmitter": TX})
    assert ignored == 2  # one subject, named by two events
    assert service.revocations.check(principal(iss="https://other.example.test")) is None


def test_subjects_of_must_name_configured_issuers() -> None:
    from verifier.config.revocation import check_transmitter_scopes

    check_transmitter_scopes(config(), [ISSUER])
    with pytest.raises(ConfigError, match=r"^revocation\.transmitters\[0\]\.subjects_of\[0\]: "):
        check_transmitter_scopes(config(), ["https://elsewhere.example.test"])
    with pytest.raises(ConfigError, match=r"^revocation\.transmitters\[0\]\.subjects_of: defaults to"):
        check_transmitter_scopes(config(subjects_of=[TX]), [ISSUER])
    with pytest.raises(ConfigError, match=r"subjects_of: expected a non-empty list"):
        config(subjects_of=[])


@pytest.mark.parametrize("bad", ["grant", "", "Replace", True, ["replace"]])
def test_claims_change_is_restrict_or_replace_and_anything_else_is_refused_at_start_up(bad: Any) -> None:
    """Who may raise a token's claims is the operator's explicit choice: a typo must not start a verifier."""
    from verifier.settings import parse_settings

    def settings(**options: Any) -> Settings:
        issuer = {"issuer": ISSUER, "audiences": ["api"], "algorithms": ["ES256"]}
        transmitter = {"issuer": TX, "audience": RECEIVER, "subjects_of": [ISSUER], **options}
        return parse_settings({"http": {"listen": "127.0.0.1:0"}, "issuers": [issuer],
                               "revocation": {"transmitters": [transmitter]}})

    def claims_change(parsed: Settings) -> str:
        assert parsed.revocation is not None
        return parsed.revocation.transmitters[0].claims_change

    assert claims_change(settings()) == "restrict"
    assert claims_change(settings(claims_change="replace")) == "replace"
    assert config(claims_change="restrict").transmitters[0].claims_change == "restrict"
    with pytest.raises(ConfigError, match=r"revocation\.transmitters\[0\]\.claims_change: expected"):
        settings(claims_change=bad)


def test_subjects_of_may_not_name_an_issuer_template() -> None:
    """A token of a `{tenant}` template names its tenant's issuer, never the template: an event scoped to the template
    could reach no token, and was acknowledged (202) and counted as ignored, a revocation silently lost. Refused at
    start-up, as `backchannel_logout` on a template is."""
    from verifier.settings import parse_settings

    template = "https://login.example.test/{tenant}/v2.0"
    issuer = {"issuer": template, "audiences": ["api"], "algorithms": ["RS256"], "tenants": ["a", "b"]}
    transmitter = {"issuer": TX, "audience": RECEIVER, "subjects_of": [template]}
    with pytest.raises(ConfigError, match=r"^revocation\.transmitters\[0\]\.subjects_of\[0\]: .*template"):
        parse_settings({"http": {"listen": "127.0.0.1:0"}, "issuers": [issuer],
                        "revocation": {"transmitters": [transmitter]}})


# -- forged or unacceptable SETs ---------------------------------------------------------------------------


def _forgeries(tx: SsfTransmitter) -> dict[str, tuple[str, str]]:
    other = ec.generate_private_key(ec.SECP256R1())
    ev = {SESSION_REVOKED: {}}
    return {
        "bad signature": (tx.sign_set(ev, USER, key=other), "authentication_failed"),
        "another audience": (tx.sign_set(ev, USER, aud="https://someone-else.test"), "invalid_audience"),
        "alg none": (tx.sign_set(ev, USER, alg="none"), "invalid_key"),
        "stale iat": (tx.sign_set(ev, USER, iat=NOW - 301), "invalid_request"),
        "future iat": (tx.sign_set(ev, USER, iat=NOW + 60), "invalid_request"),
        "wrong typ": (tx.sign_set(ev, USER, typ="JWT"), "invalid_request"),
        "no typ": (tx.sign_set(ev, USER, typ=None), "invalid_request"),
        "unknown issuer": (tx.sign_set(ev, USER, iss="https://evil.example.test"), "invalid_issuer"),
        "unknown kid": (tx.sign_set(ev, USER, kid="nope"), "invalid_key"),
        "alg not allowed": (tx.sign_set(ev, USER, alg="ES384", key=ec.generate_private_key(ec.SECP384R1())),
                            "invalid_key"),
        "not a JWS": ("garbage", "invalid_request"),
        "malformed subject": (tx.sign_set(ev, {"format": "iss_sub", "iss": ISSUER}), "invalid_request"),
        "no subject": (tx.sign_set(ev), "invalid_request"),
        # RFC 8417 section 2.2 (jti, iat, aud, events) and the checks every signed message shares
        "no jti": (tx.sign_set(ev, USER, extra={"jti": None}), "invalid_request"),
        "empty jti": (tx.sign_set(ev, USER, extra={"jti": ""}), "invalid_request"),
        "jti not a string": (tx.sign_set(ev, USER, extra={"jti": 7}), "invalid_request"),
        "no iat": (tx.sign_set(ev, USER, extra={"iat": None}), "invalid_request"),
        "expired": (tx.sign_set(ev, USER, extra={"exp": NOW - 3600}), "invalid_request"),
        "no aud": (tx.sign_set(ev, USER, extra={"aud": None}), "invalid_audience"),
        "aud list without us": (tx.sign_set(ev, USER, aud=["https://someone-else.test"]), "invalid_audience"),
        "events empty": (tx.sign_set({}, USER), "invalid_request"),
        "events a list": (tx.sign_set(ev, USER, extra={"events": [SESSION_REVOKED]}), "invalid_request"),
        "too many events": (tx.sign_set({SESSION_REVOKED: {}, **{f"https://x.test/e{i}": {} for i in range(10)}},
                                        USER), "invalid_request"),
        "known event not an object": (tx.sign_set(ev, USER, extra={"events": {SESSION_REVOKED: "yes"}}),
                                      "invalid_request"),
        "another event not an object": (
            tx.sign_set(ev, USER, extra={"events": {SESSION_REVOKED: {}, "https://x.test/other": "yes"}}),
            "invalid_request"),
        # token substitution: another kind of JWT signed with the transmitter's keys is not a SET
        "an access token (typ at+jwt)": (tx.sign_set(ev, USER, typ="at+jwt"), "invalid_request"),
        "a logout token (typ logout+jwt)": (tx.sign_set(ev, USER, typ="logout+jwt"), "invalid_request"),
        "an ID token (typ JWT, nonce)": (tx.sign_set(ev, USER, typ="JWT", extra={"nonce": "n-0S6"}), "invalid_request"),
        "RS256 by a transmitter key, off the ES256 allow-list": (
            tx.sign_set(ev, USER, alg="RS256", key=TX_RSA, kid="tx-rsa"), "invalid_key"),
    }


@pytest.mark.parametrize("case", list(_forgeries(SsfTransmitter(audience=RECEIVER, issuer=TX))))
async def test_refuses_a_forged_set_with_the_rfc8935_error_and_changes_nothing(
    service: RevocationService, transmitter: SsfTransmitter, case: str
) -> None:
    token, err = _forgeries(transmitter)[case]
    answer = await push(service, token)
    assert answer.status == 400, case
    assert body(answer)["err"] == err and body(answer)["description"]
    assert dict(answer.headers)["content-type"] == "application/json"
    assert len(service.revocations) == 0
    assert service.revocations.check(principal()) is None


PUSH_AUTHORIZATION = "Bearer push-secret-0123456789-abcdefghij"


async def push_authenticated_service(
    clock: FrozenClock, provider: FakeFetcher, monkeypatch: pytest.MonkeyPatch
) -> RevocationService:
    """A service whose one transmitter pushes with `Authorization: PUSH_AUTHORIZATION` (no loops started)."""
    monkeypatch.setenv("VERIFIER_TEST_PUSH_AUTHORIZATION", PUSH_AUTHORIZATION)
    svc = RevocationService(
        config(push_authorization_env="VERIFIER_TEST_PUSH_AUTHORIZATION"), state=MemoryState(clock),
        fetcher=provider, clock=clock, metrics=RevocationMetrics(CollectorRegistry(), REFUSAL_CODES),
        session=no_http_session,
    )
    await svc.resync()
    return svc


@pytest.mark.parametrize(
    "presented", [None, "", "Bearer wrong", PUSH_AUTHORIZATION[:-1], PUSH_AUTHORIZATION + "x", "bearer push-secret"]
)
async def test_a_push_without_the_transmitters_authorization_is_refused(
    clock: FrozenClock, provider: FakeFetcher, transmitter: SsfTransmitter, monkeypatch: pytest.MonkeyPatch,
    presented: str | None,
) -> None:
    """RFC 8935 section 4.1, SSF 1.0 `delivery.authorization_header`: with `push_authorization_env` set, a push whose
    `Authorization` is not exactly that value is 400 `authentication_failed` and changes nothing, though its SET is
    well signed (a replayed or leaked SET pushed by someone else); with it, the SET is applied (202)."""
    svc = await push_authenticated_service(clock, provider, monkeypatch)
    token = transmitter.sign_set({ACCOUNT_DISABLED: {}}, USER)
    answer = await push(svc, token, authorization=presented)
    assert answer.status == 400 and body(answer)["err"] == "authentication_failed"
    assert svc.revocations.check(principal()) is None
    assert (await push(svc, token, authorization=PUSH_AUTHORIZATION)).status == 202
    assert svc.revocations.check(principal()) is not None


@pytest.mark.parametrize("value", ["Bearer " + "é" * 32, "Bearer ключ-0123456789-abcdefghijkl",
                                   "Bearer push-secret-0123456789\n", "Bearer push\x01secret-0123456789"])
def test_a_push_authorization_no_request_can_present_is_refused_at_start(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The configured value is compared with the push's `Authorization` header, which the doors read as Latin-1
    bytes with its surrounding white space dropped (RFC 9110 section 5.5): a UTF-8 secret, one ending in a newline
    or holding a control character never matched, and every pushed SET was refused `authentication_failed`."""
    monkeypatch.setenv("VERIFIER_TEST_PUSH_AUTHORIZATION", value)
    with pytest.raises(ConfigError, match=r"transmitters\[0\]\.push_authorization_env: ") as refused:
        parse_revocation_config({"transmitters": [{"issuer": "https://a.test", "audience": "x",
                                                   "push_authorization_env": "VERIFIER_TEST_PUSH_AUTHORIZATION"}]})
    assert value.strip() not in str(refused.value)


async def test_the_push_authorization_is_compared_in_constant_time(
    clock: FrozenClock, provider: FakeFetcher, transmitter: SsfTransmitter, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = await push_authenticated_service(clock, provider, monkeypatch)
    calls = compare_digest_calls(monkeypatch)
    await push(svc, transmitter.sign_set({ACCOUNT_DISABLED: {}}, USER), authorization="Bearer wrong")
    assert calls[0] == (b"Bearer wrong", PUSH_AUTHORIZATION.encode())


async def test_a_set_from_a_polled_transmitter_pushed_to_us_is_refused(
    clock: FrozenClock, provider: FakeFetcher, transmitter: SsfTransmitter
) -> None:
    """A transmitter configured for poll delivery (RFC 8936) is not a push transmitter (RFC 8935): its SET pushed
    to `/v1/ssf/events`, well signed, is refused `invalid_issuer` while a push transmitter beside it is served."""
    polled = SsfTransmitter(audience=RECEIVER, issuer="https://polled.example.test", now=clock.now)
    provider.serve(polled.configuration_url, polled.configuration())
    provider.serve(polled.jwks_url, polled.jwks())
    sections = [transmitter_section(), transmitter_section(issuer=polled.issuer, delivery="poll")]
    both = parse_revocation_config({"transmitters": sections, "max_token_lifetime_seconds": LIFETIME})
    svc = RevocationService(
        both, state=MemoryState(clock), fetcher=provider, clock=clock,
        metrics=RevocationMetrics(CollectorRegistry(), REFUSAL_CODES), session=no_http_session,
    )
    await svc.resync()  # the index answers; no poller started (it would make outbound calls)
    answer = await push(svc, polled.sign_set({ACCOUNT_DISABLED: {}}, USER))
    assert answer.status == 400 and body(answer)["err"] == "invalid_issuer"
    assert svc.revocations.check(principal()) is None
    assert (await push(svc, transmitter.sign_set({ACCOUNT_DISABLED: {}}, USER))).status == 202


async def test_refuses_a_replayed_jti(service: RevocationService, transmitter: SsfTransmitter) -> None:
    token = transmitter.sign_set({ACCOUNT_DISABLED: {}}, USER)
    assert (await push(service, token)).status == 202
    await push(service, transmitter.sign_set({ACCOUNT_ENABLED: {}}, USER))
    replay = await push(service, token)
    assert replay.status == 400 and body(replay)["err"] == "invalid_request"
    assert service.revocations.check(principal()) is None  # the replay changed nothing


async def test_a_set_ahead_of_our_clock_is_refused_as_a_replay_until_its_last_acceptable_instant(
    service: RevocationService, transmitter: SsfTransmitter, clock: FrozenClock
) -> None:
    """A SET is accepted while its `iat` is at most `leeway_seconds` ahead and at most `max_age_seconds` old: one
    signed `leeway` ahead, pushed at once, stays acceptable `max_age` + `leeway` after its push. Before, its jti
    lived `max_age` + `leeway` from the push, and at that last instant the replay was accepted again (202: an
    account_enabled re-enables an account disabled since)."""
    token = transmitter.sign_set({ACCOUNT_ENABLED: {}}, USER, iat=NOW + 30)
    assert (await push(service, token)).status == 202
    clock.advance(300 + 30)  # now - iat == max_age_seconds: still accepted, the old key just expired
    replay = await push(service, token)
    assert replay.status == 400 and body(replay)["err"] == "invalid_request"


async def test_a_replica_whose_clock_lags_refuses_a_replayed_set_until_it_is_too_old_there(
    clock: FrozenClock, provider: FakeFetcher, transmitter: SsfTransmitter
) -> None:
    """Two replicas share the replay store (on its own clock, as Redis counts a TTL), their clocks just under the
    transmitter's `leeway_seconds` (30) apart. The replica ahead accepts a SET signed as far ahead as it allows; the
    one behind accepts it until its own clock is `max_age_seconds` past the SET's `iat`. Before, the jti lived
    `max_age` + `leeway` from its use on the replica ahead: gone ~29 s before the replica behind stopped accepting
    the SET, and the replay, in that gap, was applied again (202)."""
    shared = MemoryState(clock)

    def replica(offset: float) -> RevocationService:
        return RevocationService(
            config(), state=shared, fetcher=provider, clock=SkewedClock(clock, offset),
            metrics=RevocationMetrics(CollectorRegistry(), REFUSAL_CODES), session=no_http_session,
        )

    ahead, behind = replica(29), replica(0)
    await ahead.start()
    await behind.start()
    try:
        token = transmitter.sign_set({ACCOUNT_ENABLED: {}}, USER, iat=NOW + 29 + 30)
        assert (await push(ahead, token)).status == 202
        clock.advance(300 + 30 + 1)  # past the old key; `behind` sees the SET 272 s old
        replay = await push(behind, token)
        assert replay.status == 400 and body(replay)["err"] == "invalid_request"
        clock.advance(29)  # past every replica's window: too old, whatever the store holds
        assert (await push(behind, token)).status == 400
    finally:
        await ahead.stop()
        await behind.stop()


async def test_a_set_pushed_while_the_replay_store_is_full_is_503_applied_and_never_replayable(
    clock: FrozenClock, provider: FakeFetcher, transmitter: SsfTransmitter
) -> None:
    """A full local replay store cannot mark the jti: the SET is 503 (the transmitter retries; its effects are
    stored, and stored again alike by the retry), and no jti it already holds is forgotten to make room."""
    svc = RevocationService(
        config(), state=MemoryState(clock, replay=ReplayBounds(dpop=1, webauthn=1, revocation=1)), fetcher=provider,
        clock=clock,
        metrics=RevocationMetrics(CollectorRegistry(), REFUSAL_CODES), session=no_http_session,
    )
    await svc.start()
    try:
        first = transmitter.sign_set({SESSION_REVOKED: {}}, USER)
        assert (await push(svc, first)).status == 202
        clock.advance(10)
        answer = await push(svc, transmitter.sign_set({ACCOUNT_DISABLED: {}}, USER))
        # Retry-After: when the jti held expires and makes room (its iat + max_age_seconds 300 + leeway 30 + 1,
        # 10 s ago)
        assert answer.status == 503 and dict(answer.headers)["retry-after"] == str(300 + 30 + 1 - 10)
        assert body(answer) == {"err": "temporarily_unavailable"}
        refused = svc.revocations.check(principal())
        assert refused is not None and refused.code == "account_disabled"  # applied; only the ack waits
        replay = await push(svc, first)
        assert replay.status == 400 and body(replay)["err"] == "invalid_request"
    finally:
        await svc.stop()


async def test_a_refused_set_does_not_burn_its_jti(service: RevocationService, transmitter: SsfTransmitter) -> None:
    good = transmitter.sign_set({ACCOUNT_DISABLED: {}}, USER, jti="same")
    forged = transmitter.sign_set({ACCOUNT_DISABLED: {}}, USER, jti="same", key=ec.generate_private_key(ec.SECP256R1()))
    assert (await push(service, forged)).status == 400
    assert (await push(service, good)).status == 202


async def test_refuses_another_content_type(service: RevocationService, transmitter: SsfTransmitter) -> None:
    answer = await push(service, transmitter.sign_set({SESSION_REVOKED: {}}, USER), content_type="application/jwt")
    assert answer.status == 400 and body(answer)["err"] == "invalid_request"
    assert len(service.revocations) == 0


async def test_counts_sets_and_refusals(
    service: RevocationService, transmitter: SsfTransmitter, registry: CollectorRegistry
) -> None:
    await push(service, transmitter.sign_set({SESSION_REVOKED: {}}, USER))
    await push(service, transmitter.sign_set({SESSION_REVOKED: {}}, USER, aud="x"))
    service.count_refusal("session_revoked")
    value = registry.get_sample_value
    assert value("verifier_ssf_sets_received_total", {"delivery": "push"}) == 2
    assert value("verifier_ssf_sets_accepted_total", {"delivery": "push"}) == 1
    assert value("verifier_ssf_sets_refused_total", {"delivery": "push", "err": "invalid_audience"}) == 1
    assert value("verifier_ssf_events_total", {"event": "session-revoked"}) == 1
    assert value("verifier_revocation_refusals_total", {"code": "session_revoked"}) == 1
    assert value("verifier_revocation_entries") == 1


# -- the kill switch -----------------------------------------------------------------------------------------


def admin(
    method: str, path: str = "/v1/admin/revocations", document: Any = None, token: str | None = ADMIN
) -> HttpRequest:
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    raw = json.dumps(document).encode() if document is not None else b""
    return HttpRequest(method, path, "", headers, raw)


def routes(service: RevocationService) -> Router:
    router = Router()
    add_ssf_routes(router, service)
    add_admin_routes(router, service.admin)
    return router


async def test_kill_switch_revokes_lists_and_lifts(service: RevocationService, clock: FrozenClock) -> None:
    router = routes(service)
    created = await router.dispatch(admin("POST", document={"subject": USER, "reason": "laptop stolen"}))
    assert created.status == 201
    entry_id = body(created)["id"]
    refused = service.revocations.check(principal())
    assert refused is not None and refused.code == "token_revoked" and refused.reusable is False
    listed = body(await router.dispatch(admin("GET")))["entries"]
    assert [e["id"] for e in listed] == [entry_id] and listed[0]["reason"] == "laptop stolen"
    assert listed[0]["subject"] == USER
    clock.advance(1)
    assert service.revocations.check(principal(iat=clock.now())) is None  # a token issued afterwards
    deleted = await router.dispatch(admin("DELETE", f"/v1/admin/revocations/{entry_id}"))
    assert deleted.status == 204
    assert service.revocations.check(principal()) is None
    assert (await router.dispatch(admin("DELETE", f"/v1/admin/revocations/{entry_id}"))).status == 404


async def test_a_revoke_reaches_tokens_stamped_up_to_the_issuers_leeway_past_our_clock(
    clock: FrozenClock, provider: FakeFetcher, registry: CollectorRegistry
) -> None:
    """A provider's clock may run ahead of ours by its issuer's leeway (its tokens' `iat` that far in our future
    still pass): a `revoke` reaches the tokens stamped up to the issuers' largest leeway past our now, issued before
    the POST on such a clock, and no further; a session's and a `disable` are unchanged (all tokens)."""
    svc = RevocationService(
        config(), state=MemoryState(clock), fetcher=provider, clock=clock,
        metrics=RevocationMetrics(registry, REFUSAL_CODES), session=no_http_session, admin_token=ADMIN,
        leeway_seconds=30,
    )
    await svc.start()
    try:
        router = routes(svc)
        created = await router.dispatch(admin("POST", document={"subject": USER}))
        assert created.status == 201
        assert svc.revocations.check(principal(iat=clock.now() + 25)) is not None  # issued before, 25 s ahead
        assert svc.revocations.check(principal(iat=clock.now() + 30)) is not None
        assert svc.revocations.check(principal(iat=clock.now() + 31)) is None  # issued after the POST
        listed = body(await router.dispatch(admin("GET")))["entries"]
        assert listed[0]["event_time"] == clock.now() + 30
    finally:
        await svc.stop()


async def test_kill_switch_posted_again_for_a_subject_keeps_one_entry_and_a_stale_lift_never_undoes_it(
    service: RevocationService, clock: FrozenClock
) -> None:
    """An operator's retry (after a 503) or a second POST on the same subject and effect replaces the entry: one to
    list, one to lift; the new one reaches what the old one did and more; a DELETE of the old id is 404."""
    router = routes(service)
    first = body(await router.dispatch(admin("POST", document={"subject": USER, "reason": "laptop stolen"})))["id"]
    clock.advance(5)
    issued_between = principal(iat=clock.now() - 1)
    second = await router.dispatch(admin("POST", document={"subject": USER, "reason": "laptop stolen (retry)"}))
    assert second.status == 201
    listed = body(await router.dispatch(admin("GET")))["entries"]
    assert [e["id"] for e in listed] == [body(second)["id"]] != [first]
    assert listed[0]["reason"] == "laptop stolen (retry)" and listed[0]["event_time"] == clock.now()
    assert service.revocations.check(issued_between) is not None  # issued after the first POST, before the second
    assert (await router.dispatch(admin("DELETE", f"/v1/admin/revocations/{first}"))).status == 404
    assert service.revocations.check(principal()) is not None
    # another effect on the same subject is another entry; a lift of one leaves the other
    disabled = body(await router.dispatch(admin("POST", document={"subject": USER, "effect": "disable"})))["id"]
    assert len(body(await router.dispatch(admin("GET")))["entries"]) == 2
    lifted = await router.dispatch(admin("DELETE", f"/v1/admin/revocations/{body(second)['id']}"))
    assert lifted.status == 204
    assert [e["id"] for e in body(await router.dispatch(admin("GET")))["entries"]] == [disabled]


class UnconfirmedStore(MemoryStore):
    """The primary takes every write (this dict); while `confirming` is False no Redis replica confirms a put."""

    def __init__(self) -> None:
        super().__init__()
        self.confirming = False

    async def put(self, entries: Any, *, replacing: Any = ()) -> None:
        await super().put(entries, replacing=replacing)
        if not self.confirming:
            raise RevocationNotReplicated("not confirmed", replicas=1, confirmed=0)


async def test_unconfirmed_entries_are_bounded_and_a_lift_from_elsewhere_is_never_undone(
    clock: FrozenClock, provider: FakeFetcher, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "MAX_UNCONFIRMED", 2)
    store = UnconfirmedStore()
    svc = RevocationService(
        config(), state=MemoryState(clock), fetcher=provider, clock=clock, store=store,
        metrics=RevocationMetrics(registry, REFUSAL_CODES), session=no_http_session, admin_token=ADMIN,
    )
    await svc.start()
    try:
        router = routes(svc)
        for sub in ("user-1", "user-2", "user-3"):
            answer = await router.dispatch(admin("POST", document={"subject": {**USER, "sub": sub}}))
            assert answer.status == 503
        assert len(svc._unconfirmed) == 2  # the oldest forgotten
        await store.delete(list(store._entries))  # a failover to a primary that has none of them
        await svc.resync()
        assert svc.revocations.check(principal("user-1")) is None  # forgotten: dropped with the reload
        assert svc.revocations.check(principal("user-3")) is not None  # kept, and written again
        assert sorted(e.key.value for e in await store.sync([])) == ["user-2", "user-3"]
        lifted = [e.id for e in svc.revocations.entries() if e.key.value == "user-2"]
        svc._on_change([], lifted)  # another replica's lift, heard by pub/sub
        await store.delete(lifted)
        await svc.resync()
        assert svc.revocations.check(principal("user-2")) is None
        store.confirming = True
        await svc.resync()  # written again and confirmed: nothing left to keep
        assert svc._unconfirmed == {}
    finally:
        await svc.stop()


async def test_kill_switch_revokes_a_session(service: RevocationService) -> None:
    router = routes(service)
    answer = await router.dispatch(admin("POST", document={"subject": {"format": "opaque", "id": "sess-9"}}))
    assert answer.status == 201
    assert service.revocations.check(principal(sid="sess-9", iat=NOW + 50)) is not None
    assert service.revocations.check(principal(sid="sess-8")) is None


async def test_kill_switch_disable_lasts_until_deleted(service: RevocationService, clock: FrozenClock) -> None:
    router = routes(service)
    answer = await router.dispatch(admin("POST", document={"subject": USER, "effect": "disable"}))
    clock.advance(LIFETIME * 10)
    refused = service.revocations.check(principal(iat=clock.now()))
    assert refused is not None and refused.code == "account_disabled"
    await router.dispatch(admin("DELETE", f"/v1/admin/revocations/{body(answer)['id']}"))
    assert service.revocations.check(principal(iat=clock.now())) is None


@pytest.mark.parametrize("token", [None, "wrong", ADMIN + "x", ""])
async def test_kill_switch_refuses_without_the_admin_credential(service: RevocationService, token: str | None) -> None:
    router = routes(service)
    for request in (admin("POST", document={"subject": USER}, token=token), admin("GET", token=token),
                    admin("DELETE", "/v1/admin/revocations/x", token=token)):
        answer = await router.dispatch(request)
        assert answer.status == 401
        assert dict(answer.headers)["www-authenticate"].startswith("Bearer")
    assert len(service.revocations) == 0


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({}, f"access_token={ADMIN}"),  # RFC 6750 section 2.3: never read, it ends up in access logs
        ({"authorization": f"Basic {ADMIN}"}, ""),  # the right secret under another scheme
        ({"authorization": f"Bearer\t{ADMIN}"}, ""),
        ({"authorization": ADMIN}, ""),
        ({"authorization": f"Bearer {ADMIN}, Bearer {ADMIN}"}, ""),  # two headers, as the door joins them
        ({"authorization": f"Bearer {ADMIN[:-1]}"}, ""),
        ({"authorization": f"Bearer {ADMIN[:-1]}\u00ff"}, ""),  # the last byte wrong, not ASCII
        ({"authorization": "Bearer " + " " * len(ADMIN)}, ""),
        ({"authorization": "Bearer"}, ""),
    ],
    ids=["query", "basic", "tab", "no-scheme", "two-headers", "prefix", "last-byte", "blank", "scheme-only"],
)
async def test_kill_switch_takes_its_token_from_one_bearer_authorization_only(
    service: RevocationService, headers: dict[str, str], query: str
) -> None:
    """Every other way of presenting the admin token, or a near miss, is 401 and audited; nothing is listed."""
    router = routes(service)
    await router.dispatch(admin("POST", document={"subject": USER}))
    answer = await router.dispatch(HttpRequest("GET", "/v1/admin/revocations", query, headers, b""))
    assert answer.status == 401 and b"entries" not in answer.body
    assert dict(answer.headers)["cache-control"] == "no-store"
    lower = HttpRequest("GET", "/v1/admin/revocations", "", {"authorization": f"bearer {ADMIN}"}, b"")
    assert (await router.dispatch(lower)).status == 200  # RFC 9110 section 11.1: the scheme is case-insensitive


async def test_kill_switch_compares_its_token_in_time_that_depends_on_the_secret_alone(
    service: RevocationService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hmac.compare_digest(presented, secret)`: CPython loops over its second argument, whatever the first's length,
    so neither a shorter nor a longer guess, nor a right prefix, answers sooner (the secret's length stays unknown)."""
    calls = compare_digest_calls(monkeypatch)
    router = routes(service)
    for guess in ("x", ADMIN[:-1], ADMIN + "x" * 100, ADMIN):
        await router.dispatch(admin("GET", token=guess))
    assert calls == [(g.encode(), ADMIN.encode()) for g in ("x", ADMIN[:-1], ADMIN + "x" * 100, ADMIN)]


async def test_kill_switch_answers_through_the_catalogue_mapping(service: RevocationService) -> None:
    """RFC 6750 section 3.1: no token is a bare challenge; a wrong one is invalid_token; every answer names its code."""
    router = routes(service)
    missing = await router.dispatch(admin("GET", token=None))
    wrong = await router.dispatch(admin("GET", token="wrong"))
    absent = await router.dispatch(admin("DELETE", "/v1/admin/revocations/op-nothing"))
    bad = await router.dispatch(admin("POST", document={"subject": USER, "effect": "explode"}))
    assert dict(missing.headers)["www-authenticate"] == 'Bearer realm="verifier-admin"' and not missing.body
    assert 'error="invalid_token"' in dict(wrong.headers)["www-authenticate"]
    assert body(wrong)["error"] == "invalid_token"
    assert (absent.status, body(absent)["error"]) == (404, "not_found")
    assert (bad.status, body(bad)["error"]) == (400, "invalid_request")
    reasons = [dict(a.headers)["x-verifier-reason"] for a in (missing, wrong, absent, bad)]
    assert reasons == ["token_missing", "invalid_token", "not_found", "invalid_request"]


@pytest.mark.parametrize("document", [
    {"subject": {"format": "iss_sub", "iss": ISSUER}},
    {"subject": {"format": "phone_number", "phone_number": "+1"}},
    {"subject": USER, "effect": "explode"},
    {"subject": USER, "reason": 5},
    [1, 2],
])
async def test_kill_switch_refuses_a_bad_body(service: RevocationService, document: Any) -> None:
    answer = await routes(service).dispatch(admin("POST", document=document))
    assert answer.status == 400 and body(answer)["error"] == "invalid_request"


_OTHER = json.dumps({"format": "opaque", "id": "sess-of-nobody"})


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps({"subject": USER}).encode("utf-16"),  # json.loads(bytes) would read it, a proxy in front would not
        json.dumps({"subject": USER}).encode("utf-32"),
        b"\xef\xbb\xbf" + json.dumps({"subject": USER}).encode(),  # a BOM: not JSON text (RFC 8259 section 8.1)
        f'{{"subject": {_OTHER}, "subject": {json.dumps(USER)}}}'.encode(),  # the audit tool reads one, we another
        f'{{"subject": {{"format": "iss_sub", "iss": "{ISSUER}", "sub": "user-1", "sub": "user-2"}}}}'.encode(),
        f'{{"subject": {json.dumps(USER)}, "effect": "revoke", "effect": "disable"}}'.encode(),
        f'{{"subject": {json.dumps(USER)}, "x": NaN}}'.encode(),
        f'{{"subject": {json.dumps(USER)}, "x": -Infinity}}'.encode(),
    ],
    ids=["utf-16", "utf-32", "bom", "two-subjects", "two-subs", "two-effects", "nan", "infinity"],
)
async def test_kill_switch_refuses_a_body_that_reads_two_ways(service: RevocationService, raw: bytes) -> None:
    """JSON is UTF-8 with unique member names and no NaN (RFC 8259): a body a reader in front of us (a proxy, a WAF,
    an audit of the operator's requests) may read otherwise is refused 400 invalid_request, and makes no entry."""
    headers = {"authorization": f"Bearer {ADMIN}", "content-type": "application/json"}
    answer = await routes(service).dispatch(HttpRequest("POST", "/v1/admin/revocations", "", headers, raw))
    assert (answer.status, body(answer)["error"]) == (400, "invalid_request")
    assert dict(answer.headers)["x-verifier-reason"] == "invalid_request"
    assert len(service.revocations) == 0


@pytest.mark.parametrize(
    "content_type",
    [None, "", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
     "application/jsonp", "text/json", "application/json-patch+json"],
    ids=["missing", "empty", "text-plain", "form", "multipart", "jsonp", "text-json", "json-patch"],
)
async def test_kill_switch_refuses_a_body_that_is_not_declared_json(
    service: RevocationService, content_type: str | None
) -> None:
    """A browser posts a form cross-site without asking (a CORS "simple" request): `<form enctype="text/plain">`
    sends `{"subject": ...}` as its body. The kill switch read any body as JSON; now a POST must say
    `application/json`, else 415 with the catalogue's `invalid_request` naming the type, and no entry."""
    request = admin("POST", document={"subject": USER})
    headers = dict(request.headers)
    del headers["content-type"]
    if content_type is not None:
        headers["content-type"] = content_type
    answer = await routes(service).dispatch(dataclasses.replace(request, headers=headers))
    assert (answer.status, body(answer)["error"]) == (415, "invalid_request")
    assert "Content-Type must be application/json" in body(answer)["error_description"]
    assert dict(answer.headers)["x-verifier-reason"] == "invalid_request"
    assert len(service.revocations) == 0


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON", "application/json; charset=utf-8"])
async def test_kill_switch_takes_application_json_with_parameters(
    service: RevocationService, content_type: str
) -> None:
    request = admin("POST", document={"subject": USER})
    answer = await routes(service).dispatch(dataclasses.replace(request, headers={**request.headers,
                                                                                   "content-type": content_type}))
    assert answer.status == 201, body(answer)


async def test_kill_switch_names_its_reason_for_a_body_too_large(service: RevocationService) -> None:
    """A body over the admin API's bound was answered 413 with no `x-verifier-reason` (and no challenge), while
    every other refusal names its catalogued code: a gateway's log or an alert on the reason missed it. Now it is
    the catalogue's `invalid_request` answer, still 413, and makes no entry."""
    raw = json.dumps({"subject": USER, "reason": "x" * (MAX_BODY_BYTES + 1)}).encode()
    request = HttpRequest("POST", "/v1/admin/revocations", "", {"authorization": f"Bearer {ADMIN}"}, raw)
    answer = await routes(service).dispatch(request)
    headers = dict(answer.headers)
    assert (answer.status, body(answer)["error"]) == (413, "invalid_request")
    assert headers["x-verifier-reason"] == "invalid_request" and headers["cache-control"] == "no-store"
    assert headers["www-authenticate"].startswith('Bearer realm="verifier-admin", error="invalid_request"')
    assert len(service.revocations) == 0


async def test_admin_api_is_404_when_the_env_var_is_unset(
    clock: FrozenClock, provider: FakeFetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VERIFIER_ADMIN_TOKEN", raising=False)
    svc = RevocationService(config(), state=MemoryState(clock), fetcher=provider, clock=clock,
                            metrics=RevocationMetrics(CollectorRegistry()), session=no_http_session)
    router = routes(svc)
    assert (await router.dispatch(admin("POST", document={"subject": USER}))).status == 404
    assert (await router.dispatch(admin("PUT"))).status == 404  # not 405: nothing discloses the API
    assert (await router.dispatch(admin("GET"))).status == 404
    assert (await router.dispatch(admin("DELETE", "/v1/admin/revocations/x"))).status == 404


async def test_admin_token_is_read_from_the_environment_by_the_root(
    clock: FrozenClock, provider: FakeFetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The composition root reads VERIFIER_ADMIN_TOKEN and hands it to the service."""
    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", "from-env-" + "e" * 32)
    settings = Settings(grpc=None, http=None, metrics=None, issuers=(issuer_settings(),), revocation=config())
    app = App(settings, clock=clock, fetcher=provider)
    assert app.revocation is not None
    router = routes(app.revocation)
    assert (await router.dispatch(admin("GET", token="from-env-" + "e" * 32))).status == 200
    assert (await router.dispatch(admin("GET", token=ADMIN))).status == 401


async def test_the_root_builds_the_pollers_http_session(clock: FrozenClock, provider: FakeFetcher) -> None:
    """The composition root builds the SSF poller's session (with its User-Agent); the service uses it."""
    settings = Settings(grpc=None, http=None, metrics=None, issuers=(issuer_settings(),), revocation=config())
    app = App(settings, clock=clock, fetcher=provider)
    assert app.revocation is not None
    session = app.revocation._session()
    try:
        assert session is app.sessions.ssf()
        assert session.headers["User-Agent"] == SSF_USER_AGENT
    finally:
        await app.sessions.close()


async def test_the_service_does_not_read_the_environment(
    clock: FrozenClock, provider: FakeFetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a token passed in, the admin API is off, whatever the environment holds."""
    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", "from-env-" + "e" * 32)
    svc = RevocationService(config(), state=MemoryState(clock), fetcher=provider, clock=clock,
                            metrics=RevocationMetrics(CollectorRegistry()), session=no_http_session)
    router = routes(svc)
    assert (await router.dispatch(admin("GET", token="from-env-" + "e" * 32))).status != 200


async def test_before_its_first_load_the_index_refuses_to_decide_even_after_a_kill_switch_entry(
    clock: FrozenClock, provider: FakeFetcher
) -> None:
    """A worker restarted after a crash answers on the shared sockets while its entries are still read:
    "no entry" then means "not known yet", so the check raises 503 state_unavailable, never a pass."""
    svc = RevocationService(config(), state=MemoryState(clock), fetcher=provider, clock=clock,
                            metrics=RevocationMetrics(CollectorRegistry()), session=no_http_session,
                            admin_token=ADMIN)
    other = principal(sub="user-2")
    with pytest.raises(StateUnavailable):
        svc.revocations.check(other)
    answer = await routes(svc).dispatch(admin("POST", document={"subject": USER}))
    assert answer.status == 201
    with pytest.raises(StateUnavailable):  # one entry known is not all of them
        svc.revocations.check(other)
    await svc.start()
    try:
        assert svc.revocations.loaded
        assert svc.revocations.check(other) is None
        assert isinstance(svc.revocations.check(principal()), TokenRevoked)
    finally:
        await svc.stop()


# -- expiry ------------------------------------------------------------------------------------------------------


async def test_entries_expire_once_every_token_they_could_match_has(
    service: RevocationService, transmitter: SsfTransmitter, clock: FrozenClock
) -> None:
    await push(service, transmitter.sign_set({SESSION_REVOKED: {}}, USER))
    await routes(service).dispatch(admin("POST", document={"subject": {"format": "opaque", "id": "s"}}))
    assert len(service.revocations.entries()) == 2
    clock.advance(ENTRY_LIFETIME - 1)  # past the token's exp, within the longest leeway it can be given
    assert service.revocations.check(principal(sid="s", iat=NOW, exp=NOW + LIFETIME)) is not None
    clock.advance(2)
    assert service.revocations.check(principal(sid="s", iat=NOW, exp=NOW + LIFETIME)) is None
    assert service.revocations.entries() == []
    assert len(service.revocations.expired()) == 2
    listed = body(await routes(service).dispatch(admin("GET")))
    assert listed == {"entries": []}


async def test_a_token_that_would_outlive_the_entry_revoking_it_is_refused_from_the_start(
    service: RevocationService, clock: FrozenClock
) -> None:
    """An entry lives `max_token_lifetime_seconds` (and the longest leeway) after its event. A token that lives longer
    (an issuer's lifetime set past the bound) was refused while the kill switch's entry lived, then taken again for
    the rest of its life: revocation ended before the token did. It is refused from the start instead; one within the
    bound is judged by the entries as before, and one without `iat` by what is left of its life."""
    check = Revocation(service.revocations, with_roles=lambda p: p, max_lifetime=LIFETIME, clock=clock)
    request = RequestAttributes(method="GET", scheme="https", host="api", path="/", headers={})
    long_lived = principal(iat=NOW - 10, exp=NOW + 2 * LIFETIME)
    within = principal(iat=NOW - 10, exp=NOW - 10 + LIFETIME)
    created = await routes(service).dispatch(admin("POST", document={"subject": USER, "reason": "key lost"}))
    assert created.status == 201
    clock.advance(ENTRY_LIFETIME + 1)  # the entry is gone; the long-lived token is still within its exp
    assert service.revocations.entries() == []
    with pytest.raises(InvalidToken) as refused:
        check.check_now(long_lived, request, NO_POLICY)
    assert refused.value.code == "token_outlives_revocation"
    assert check.check_now(within, request, NO_POLICY) is within  # it expired with (before) its entry: no gap
    no_iat = principal(iat=None, exp=clock.now() + LIFETIME + 60)
    with pytest.raises(InvalidToken):
        check.check_now(no_iat, request, NO_POLICY)
    assert check.check_now(principal(iat=None, exp=clock.now() + 60), request, NO_POLICY).claims["exp"]


async def test_an_introspected_token_without_exp_is_refused_once_older_than_the_bound(
    service: RevocationService, clock: FrozenClock
) -> None:
    """RFC 7662 makes `exp` optional (a long-lived opaque token, an API key). The kill switch's entry lives
    `max_token_lifetime_seconds` after its event; once it was gone, such a token issued before it was taken again
    for as long as its provider (which never heard of the verifier's kill switch) said active: the stolen token
    outlived its revocation. Its age is bounded instead: older than the bound, an entry that reached it may be gone."""
    check = Revocation(service.revocations, with_roles=lambda p: p, max_lifetime=LIFETIME, clock=clock)
    request = RequestAttributes(method="GET", scheme="https", host="api", path="/", headers={})

    def answered(iat: float) -> Principal:  # what the introspector builds from an answer without exp
        claims = {"iss": ISSUER, "sub": "user-1", "iat": iat}
        return Principal(issuer=ISSUER, subject="user-1", client_id=None, scopes=(), roles=frozenset(),
                         expires_at=clock.now() + 60, claims=claims)  # fmt: skip

    stolen = answered(NOW - 10)
    created = await routes(service).dispatch(admin("POST", document={"subject": USER, "reason": "laptop stolen"}))
    assert created.status == 201
    with pytest.raises(InvalidToken) as refused:
        check.check_now(stolen, request, NO_POLICY)
    assert refused.value.code == "token_revoked"
    clock.advance(LIFETIME + 1)  # the entry is gone; the provider still says active
    stolen = answered(NOW - 10)
    with pytest.raises(InvalidToken) as refused:
        check.check_now(stolen, request, NO_POLICY)
    assert refused.value.code == "token_outlives_revocation"
    fresh = answered(clock.now() - 10)  # issued after the entry: judged by the entries, as before
    assert check.check_now(fresh, request, NO_POLICY) is fresh


async def test_the_verifier_refuses_tokens_that_outlive_its_revocations_at_the_door() -> None:
    """The composition root gives the check `revocation.max_token_lifetime_seconds`: through the forward-auth door,
    a token living longer is a 401 with its reason; one within the bound is allowed."""
    import time

    from doorkit import http_exchange, running_verifier

    bounded = parse_revocation_config({"max_token_lifetime_seconds": LIFETIME})
    async with running_verifier({"revocation": bounded}) as (app, idp):
        now = int(time.time())
        for exp, status, reason in ((now + 2 * LIFETIME, 401, "token_outlives_revocation"), (now + 600, 200, "ok")):
            token = idp.mint(claims={"iat": now, "exp": exp})
            raw = f"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
            answer = await http_exchange(app.ports.http, raw)
            assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
            assert f"x-verifier-reason: {reason}\r\n".encode() in answer


async def test_an_allow_for_a_token_without_exp_is_not_reused_past_the_age_its_revocation_bound_refuses_it_at() -> None:
    """A token without `exp` (an introspection answer: RFC 7662 makes it optional) is refused once older than
    `max_token_lifetime_seconds` (`token_outlives_revocation`). An allow given 10 s before that was reusable for the
    answer's whole freshness (the introspection's positive TTL, a minute): by the gateway (`max-age`) and by the doors'
    answer memos (`decide_cached_stable`), past the moment the verifier itself refuses the token. The composition
    root's checks now bound the reuse by that moment."""
    import time

    from doorkit import running_verifier

    from verifier.authenticators import Seen
    from verifier.observe.metrics import Metrics
    from verifier.pipeline import Pipeline
    from verifier.principal import NO_ROLES
    from verifier.tokens.cache import ExpiringCache

    class Introspected:
        """What `OpaqueIntrospection` hands the pipeline for an answer without `exp`, issued `LIFETIME - 10` s ago."""

        sends_to = None

        def verify_now(self, token: str, seen: Seen) -> Principal:
            now = time.time()
            claims = {"iss": ISSUER, "sub": "user-1", "iat": now - (LIFETIME - 10)}
            return Principal(ISSUER, "user-1", None, (), NO_ROLES, now + 60, claims)

        async def verify(self, token: str, token_hash: bytes, seen: Seen) -> Principal:
            return self.verify_now(token, seen)

    bounded = parse_revocation_config({"max_token_lifetime_seconds": LIFETIME})
    async with running_verifier({"revocation": bounded}) as (app, _):
        checks = app.pipeline._checks  # as the composition root lists them
        for edge_max_age in (60, 0):
            pipeline = Pipeline(
                authenticators=[Introspected()], checks=checks, positive=ExpiringCache(10, app.clock),
                negative=ExpiringCache(10, app.clock), clock=app.clock, metrics=Metrics(), realm="test",
                negative_ttl=10, audit_enabled=False, edge_max_age=edge_max_age,
            )  # fmt: skip
            attrs = RequestAttributes("GET", "https", "api", "/", {"authorization": "Bearer opaque-token"})
            first = pipeline.decide_cached(attrs)
            assert first is not None and first.allowed, first
            assert first.cache_max_age <= 10
            again, until = pipeline.decide_cached_stable(attrs)  # a cached token: offered to the answer memos
            assert again is not None and again.allowed and again.cache_max_age <= 10
            assert until <= time.time() + 10


async def test_a_token_whose_sid_is_a_number_never_escapes_a_session_revocation_at_the_door(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A session revocation names the session as a string (SSF `opaque` id, a logout token's `sid`): a token whose
    `sid` is the number 123 was keyed on no session and passed the revocation of "123". OIDC's `sid` is a string: such
    a token is refused at validation (401 `claim_invalid`), whatever the entries."""
    from doorkit import http_exchange, running_verifier

    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", ADMIN)
    async with running_verifier({"revocation": parse_revocation_config({})}) as (app, idp):
        assert app.revocation is not None
        revoke = admin("POST", document={"subject": {"format": "opaque", "id": "123"}})
        assert (await routes(app.revocation).dispatch(revoke)).status == 201
        for sid, reason in (("123", "token_revoked"), (123, "claim_invalid"), (123.0, "claim_invalid")):
            token = idp.mint(claims={"sid": sid})
            raw = f"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
            answer = await http_exchange(app.ports.http, raw)
            assert answer.startswith(b"HTTP/1.1 401 "), (sid, answer[:200])
            assert f"x-verifier-reason: {reason}\r\n".encode() in answer, (sid, answer[:400])


# -- pieces ------------------------------------------------------------------------------------------------------


def test_subject_identifiers_per_rfc9493() -> None:
    assert subject_keys(USER) == (SubjectKey(KeyKind.ISS_SUB, "user-1", ISSUER),)
    assert subject_keys({"format": "email", "email": "A@B.test"}) == (SubjectKey(KeyKind.EMAIL, "a@b.test"),)
    assert subject_keys({"format": "opaque", "id": "s1"}) == (SubjectKey(KeyKind.SID, "s1"),)
    aliases = {"format": "aliases", "identifiers": [USER, {"format": "email", "email": "a@b.test"}]}
    assert len(subject_keys(aliases)) == 2
    complex_ = {"format": "complex", "user": USER, "session": {"format": "opaque", "id": "s1"}}
    assert subject_keys(complex_, session=True) == (SubjectKey(KeyKind.SID, "s1"),)
    assert subject_keys(complex_) == (SubjectKey(KeyKind.ISS_SUB, "user-1", ISSUER),)
    assert subject_keys({"format": "phone_number", "phone_number": "+1"}) == ()
    assert subject_keys({"format": "complex", "device": {"format": "opaque", "id": "d"}}) == ()  # names no one we key
    nested = {"format": "aliases", "identifiers": [USER]}
    for bad in (
        "x", {"format": "email"}, {}, {"format": "iss_sub", "iss": "i", "sub": 5},
        # malformed, not merely unsupported: refused (400), never acknowledged with nothing changed
        {"format": "aliases", "identifiers": [nested]},
        {"format": "complex", "user": nested},
        {"format": "complex", "user": {"format": "complex", "user": USER}},
        {"format": "complex", "user": "user-1"},
        {"format": "complex", "session": ["s1"], "user": USER},
    ):
        with pytest.raises(SubjectError):
            subject_keys(bad)


def test_entry_round_trips_through_json() -> None:
    entry = Entry(id="e1", key=SubjectKey(KeyKind.ISS_SUB, "u", "i"), effect=Effect.CLAIMS_OVERRIDE,
                  match=Match.ISSUED_BEFORE, event_time=1.5, expires_at=None, source="s", event="ev", jti="j",
                  reason="r", overrides={"acr": "x"})
    assert Entry.from_json(entry.to_json()) == entry
    with pytest.raises(ValueError):
        Entry.from_json('{"id": 1}')


def test_config_defaults_and_discovery_location() -> None:
    parsed = parse_revocation_config({"transmitters": [{"issuer": "https://a.test/tenant", "audience": "x"}]})
    (tx,) = parsed.transmitters
    assert tx.delivery == "push" and tx.algorithms == ("ES256", "RS256", "EdDSA")
    assert tx.discovery == "https://a.test/.well-known/ssf-configuration/tenant"
    assert parsed.max_token_lifetime_seconds == 86400
    assert parse_revocation_config(None).transmitters == ()


@pytest.mark.parametrize(("data", "names"), [
    ({"transmitters": [{"audience": "x"}]}, "revocation.transmitters[0].issuer"),
    ({"transmitters": [{"issuer": "http://idp.example.test", "audience": "x"}]}, "transmitters[0].issuer"),
    ({"transmitters": [{"issuer": "https://a.test", "audience": "x", "delivery": "carrier"}]}, "delivery"),
    ({"transmitters": [{"issuer": "https://a.test", "audience": "x", "algorithms": ["HS256"]}]}, "algorithms[0]"),
    ({"transmitters": [{"issuer": "https://a.test", "audience": "x", "max_age_seconds": 0}]}, "max_age_seconds"),
    ({"transmitters": [{"issuer": "https://a.test", "audience": "x", "poll_interval_seconds": 5}]},
     "poll_interval_seconds"),
    ({"transmitters": [{"issuer": "https://a.test", "audience": "x", "bogus": 1}]}, "transmitters[0].bogus"),
    ({"transmitters": [{"issuer": "https://a.test", "audience": "x"}] * 2}, "transmitters[1].issuer"),
    ({"max_token_lifetime_seconds": -1}, "revocation.max_token_lifetime_seconds"),
    ({"what": 1}, "revocation.what"),
    ({"transmitters": [{"issuer": "https://a.test", "audience": "x", "delivery": "poll",
                        "poll_authorization_env": "VERIFIER_TEST_UNSET_ENV"}]}, "poll_authorization_env"),
    ({"transmitters": [{"issuer": "https://a.test", "audience": "x",
                        "push_authorization_env": "VERIFIER_TEST_UNSET_ENV"}]}, "push_authorization_env"),
    ({"transmitters": [{"issuer": "https://a.test", "audience": "x", "delivery": "poll",
                        "push_authorization_env": "PATH"}]}, "transmitters[0].push_authorization_env"),
])
def test_config_errors_name_the_key(data: Any, names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace("[", r"\[").replace("]", r"\]")):
        parse_revocation_config(data)


# -- hostile numbers (#18 F11) ------------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["iat", "exp"])
@pytest.mark.parametrize("value", HOSTILE_NUMBERS, ids=HOSTILE_IDS)
async def test_a_hostile_number_in_a_set_is_a_clean_400(
    service: RevocationService, transmitter: SsfTransmitter, claim: str, value: Any
) -> None:
    token = transmitter.sign_set({ACCOUNT_DISABLED: {}}, USER, extra={claim: value})
    answer = await push(service, token)
    assert answer.status == 400 and body(answer)["err"] == "invalid_request"
    assert service.revocations.check(principal()) is None


@pytest.mark.parametrize("value", HOSTILE_NUMBERS, ids=HOSTILE_IDS)
async def test_a_hostile_event_timestamp_is_ignored_for_the_set_iat(
    service: RevocationService, transmitter: SsfTransmitter, value: Any
) -> None:
    token = transmitter.sign_set({SESSION_REVOKED: {"event_timestamp": value}}, USER)
    assert (await push(service, token)).status == 202
    (entry,) = service.revocations.entries()
    assert entry.event_time == NOW  # the SET's iat
    assert service.revocations.check(principal(iat=NOW - 1)) is not None


@pytest.mark.parametrize("claim", ["iat", "auth_time"])
@pytest.mark.parametrize("value", HOSTILE_NUMBERS, ids=HOSTILE_IDS)
async def test_a_hostile_iat_or_auth_time_on_a_token_is_refused_not_a_crash(
    service: RevocationService, transmitter: SsfTransmitter, claim: str, value: Any
) -> None:
    """An introspection answer's members are not checked like a JWT's: they reach the index as sent."""
    event = {"change_type": "revoke", "event_timestamp": int(NOW)}
    token = transmitter.sign_set({CREDENTIAL_CHANGE: event}, USER)
    assert (await push(service, token)).status == 202
    refused = service.revocations.check(principal(**{claim: value}))  # no time to compare: fail closed
    assert isinstance(refused, InvalidToken) and refused.code == "credential_revoked"


async def test_a_set_whose_transmitter_keys_are_out_of_reach_is_503_not_500(
    service: RevocationService, transmitter: SsfTransmitter, provider: FakeFetcher, clock: FrozenClock
) -> None:
    """The SET can be judged neither way: RFC 8935 lets the transmitter retry a 5xx; ours is 503 + Retry-After."""
    provider.fault = "unavailable"  # the transmitter rotated to a key we must fetch, and its JWKS answers 503
    event = {SESSION_REVOKED: {"event_timestamp": int(NOW)}}
    token = transmitter.sign_set(event, {"format": "opaque", "id": "s-9"}, kid="ssf-2")
    clock.advance(61)  # past the refetch cooldown of the keys fetched at start
    answer = await push(service, token)
    assert answer.status == 503 and dict(answer.headers)["retry-after"]
    assert body(answer) == {"err": "temporarily_unavailable"}
    assert service.revocations.check(principal(sid="s-9")) is None
    # Once the keys are back the same SET applies: its jti was not burnt by the failure.
    transmitter.kid = "ssf-2"
    provider.serve(transmitter.jwks_url, transmitter.jwks())
    provider.fault = None
    clock.advance(61)  # past the refetch cooldown
    assert (await push(service, token)).status == 202
    assert service.revocations.check(principal(sid="s-9")) is not None


async def test_a_set_signed_with_a_key_rotated_in_during_the_refetch_cooldown_is_503_then_applied(
    service: RevocationService, transmitter: SsfTransmitter, provider: FakeFetcher, clock: FrozenClock
) -> None:
    """Anyone can push a SET with a made-up kid: it refetches the keys and starts the cooldown. A key the transmitter
    rotates in meanwhile is unknown until the cooldown ends; a 400 for the SET it signs would make the transmitter
    drop the event for good (RFC 8935 section 2.3), so it is 503 (retried), and the retry takes effect."""
    clock.advance(31)  # past the cooldown of the fetch at start
    junk = await push(service, transmitter.sign_set({SESSION_REVOKED: {}}, USER, kid="made-up"))
    assert junk.status == 400 and body(junk)["err"] == "invalid_key"  # a fresh fetch says no such key: a verdict
    transmitter.kid = "ssf-2"  # the transmitter rotates, and signs its next event with the new key
    provider.serve(transmitter.jwks_url, transmitter.jwks())
    token = transmitter.sign_set({SESSION_REVOKED: {}}, {"format": "opaque", "id": "s-rot"})
    answer = await push(service, token)
    assert answer.status == 503 and dict(answer.headers)["retry-after"]
    clock.advance(31)  # the transmitter retries after the cooldown: the keys are fetched again
    assert (await push(service, token)).status == 202
    assert service.revocations.check(principal(sid="s-rot")) is not None


@pytest.mark.parametrize("credential_type", [["fido2-roaming"], {"type": "fido2-roaming"}, []])
async def test_a_credential_change_whose_credential_type_is_not_a_string_is_a_clean_400(
    service: RevocationService, transmitter: SsfTransmitter, credentials: Credentials, credential_type: Any
) -> None:
    """CAEP 1.0 section 3.3: `credential_type` is a string. A list or an object crashed the receiver (500, which the
    transmitter retries for ever); it is an event payload that does not conform (RFC 8935 invalid_request)."""
    event = {"change_type": "revoke", "credential_type": credential_type}
    answer = await push(service, transmitter.sign_set({CREDENTIAL_CHANGE: event}, USER))
    assert answer.status == 400 and body(answer)["err"] == "invalid_request"
    assert len(service.revocations) == 0 and credentials.calls == []


async def test_kill_switch_operations_are_audited_with_the_peer_never_the_secret(
    service: RevocationService, transmitter: SsfTransmitter, caplog: pytest.LogCaptureFixture
) -> None:
    """Who revoked or lifted what, on the audit log: the kill switch can lift a transmitter's account-disabled entry,
    and someone holding a stolen admin token must leave a trace. Refused callers are logged too; the secret never."""
    import dataclasses

    from verifier.observe.audit import JsonFormatter

    router = routes(service)
    await push(service, transmitter.sign_set({ACCOUNT_DISABLED: {}}, USER))
    (event_entry,) = service.revocations.entries()
    peer = "192.0.2.7"
    with caplog.at_level(logging.INFO, logger="verifier.audit"):
        created = await router.dispatch(dataclasses.replace(
            admin("POST", document={"subject": {"format": "email", "email": "a@b.test"}, "reason": "stolen"}),
            peer=peer))
        await router.dispatch(dataclasses.replace(
            admin("DELETE", f"/v1/admin/revocations/{event_entry.id}"), peer=peer))
        await router.dispatch(dataclasses.replace(admin("GET", token=ADMIN[:-1] + "Z"), peer="198.51.100.9"))
    assert created.status == 201
    lines = {r.__dict__["event"]: r.__dict__ for r in caplog.records if r.name == "verifier.audit"}
    made = lines["revocation_created"]
    assert made["entry"] == body(created)["id"] and made["peer"] == peer and made["effect"] == "token_revoked"
    assert made["subject"] == {"format": "email", "email": "a@b.test"} and made["reason"] == "stolen"
    lifted = lines["revocation_lifted"]
    assert lifted["entry"] == event_entry.id and lifted["peer"] == peer
    assert lifted["source"] == TX and lifted["effect"] == "account_disabled" and lifted["subject"] == USER
    refused = lines["admin_refused"]
    assert refused["peer"] == "198.51.100.9" and refused["code"] == "invalid_token"
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert ADMIN not in text and ADMIN[:-1] not in text


async def test_a_credential_change_whose_webauthn_keys_could_not_be_disabled_is_503_and_its_retry_disables_them(
    clock: FrozenClock, provider: FakeFetcher, transmitter: SsfTransmitter
) -> None:
    """A credential-change about a stolen security key must disable it in the WebAuthn store. When that store cannot
    be written (SQLite locked, disk full), a 202 would burn the jti with the key still usable for step-up: the
    transmitter's retry would be refused as a replay. It is 503 instead, and the retry disables the key."""
    calls: list[CredentialRevocation] = []

    async def store_down_once(revoked: CredentialRevocation) -> None:
        calls.append(revoked)
        if len(calls) == 1:
            raise StateUnavailable("credential store unavailable: OperationalError")

    svc = RevocationService(
        config(), state=MemoryState(clock), fetcher=provider, clock=clock,
        metrics=RevocationMetrics(CollectorRegistry(), REFUSAL_CODES), session=no_http_session,
        on_credential_revoked=store_down_once,
    )
    await svc.start()
    try:
        event = {"change_type": "revoke", "credential_type": "fido2-roaming", "credential_ids": ["stolen-key"]}
        token = transmitter.sign_set({CREDENTIAL_CHANGE: event}, USER)
        answer = await push(svc, token)
        assert answer.status == 503 and dict(answer.headers)["retry-after"]
        assert (await push(svc, token)).status == 202  # the transmitter's retry: not a replay
        assert len(calls) == 2 and calls[-1].credential_ids == ("stolen-key",)
    finally:
        await svc.stop()


async def test_a_transmitters_account_enabled_never_lifts_the_operators_disable(
    service: RevocationService, transmitter: SsfTransmitter, clock: FrozenClock
) -> None:
    """The kill switch has the last word: RISC account-enabled lifts only that transmitter's own disables, however
    recent its event."""
    created = await routes(service).dispatch(admin("POST", document={"subject": USER, "effect": "disable"}))
    assert created.status == 201
    await push(service, transmitter.sign_set({ACCOUNT_DISABLED: {}}, USER))
    clock.advance(10)
    enabled = transmitter.sign_set({ACCOUNT_ENABLED: {"event_timestamp": int(clock.now())}}, USER)
    assert (await push(service, enabled)).status == 202
    refused = service.revocations.check(principal(iat=clock.now()))
    assert refused is not None and refused.code == "account_disabled"
    assert [e.source for e in service.revocations.entries()] == ["operator"]


async def test_a_revoked_token_stays_refused_through_the_leeway_its_exp_is_given(
    service: RevocationService, transmitter: SsfTransmitter, clock: FrozenClock
) -> None:
    """A token living exactly `max_token_lifetime_seconds` is within the bound, and is still accepted for its issuer's
    leeway past `exp` (30 s by default, up to 600). Entries lasted `max_token_lifetime_seconds` after their event only:
    a token issued at the revocation came back for the last leeway seconds of its life."""
    from tokenkit import issuer_settings as token_issuer

    from verifier.tokens.jwt import check_claims

    created = await routes(service).dispatch(admin("POST", document={"subject": USER, "reason": "stolen"}))
    assert created.status == 201
    await push(service, transmitter.sign_set({SESSION_REVOKED: {}}, {"format": "opaque", "id": "s-leeway"}))
    token = {"iss": ISSUER, "sub": "user-1", "aud": "https://api.example.test", "iat": int(NOW),
             "exp": int(NOW) + LIFETIME}
    leeway = 600  # the largest an issuer may be given
    clock.advance(LIFETIME + leeway - 1)  # past exp, within the leeway: the token itself is still accepted
    check_claims(token, {"alg": "ES256", "typ": "at+jwt"}, token_issuer(audiences=("https://api.example.test",),
                                                                        leeway_seconds=leeway), clock.now())
    assert service.revocations.check(principal(iat=NOW, exp=NOW + LIFETIME)) is not None
    assert service.revocations.check(principal(iat=NOW, exp=NOW + LIFETIME, sid="s-leeway", sub="u9")) is not None


async def test_a_session_revoked_naming_the_session_and_its_user_reaches_the_users_sessionless_tokens(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    """Access tokens often carry no `sid` (oidc-provider leaves it out): such a token cannot be tied to the session,
    so a CAEP session-revoked whose complex subject names the user too reaches it through the user, as a back-channel
    logout naming `sid` and `sub` does. It kept only the session and dropped the user: those tokens stayed valid."""
    subject = {"format": "complex", "user": USER, "session": {"format": "opaque", "id": "s-1"}}
    token = transmitter.sign_set({SESSION_REVOKED: {"event_timestamp": int(NOW)}}, subject)
    assert (await push(service, token)).status == 202
    assert service.revocations.check(principal(sid="s-1", iat=NOW + 5)) is not None  # the session: all its tokens
    assert service.revocations.check(principal(iat=NOW - 10)) is not None  # the user's, without sid, from before
    assert service.revocations.check(principal(iat=NOW + 5)) is None  # issued after the event
    assert service.revocations.check(principal(sid="s-2", iat=NOW - 10)) is None  # another session of the user
    assert service.revocations.check(principal(sub="user-2", iat=NOW - 10)) is None


# -- one token (jwt_id) and one client (complex application) ---------------------------------------------------

OTHER_ISSUER = "https://other.example.test"


def token_of(jti: str | None = "jti-1", client: str | None = None, sub: str = "user-1", iss: str = ISSUER,
             **claims: Any) -> Principal:
    """A caller whose token carries `jti` (None: none) and was issued to `client` (`sub=""`: client credentials)."""
    caller = principal(sub=sub, iss=iss, jti=jti, client_id=client, **claims)
    return caller._replace(client_id=client)


def jwt_id(jti: str = "jti-1", iss: str = ISSUER) -> dict[str, str]:
    return {"format": "jwt_id", "iss": iss, "jti": jti}


def application(client: str = "svc-a", iss: str | None = None) -> dict[str, Any]:
    member = {"format": "iss_sub", "iss": iss, "sub": client} if iss else {"format": "opaque", "id": client}
    return {"format": "complex", "application": member}


def test_a_jwt_id_names_one_token_and_a_complex_application_a_client() -> None:
    assert subject_keys(jwt_id()) == (SubjectKey(KeyKind.JTI, "jti-1", ISSUER),)
    assert subject_keys(application()) == (SubjectKey(KeyKind.CLIENT, "svc-a"),)
    assert subject_keys(application(iss=ISSUER), session=True) == (SubjectKey(KeyKind.CLIENT, "svc-a", ISSUER),)
    aliases = {"format": "aliases", "identifiers": [jwt_id("a"), jwt_id("b")]}
    assert [k.value for k in subject_keys(aliases)] == ["a", "b"]
    # Beside a user or a session the event is about them, as before: the client is not widened to.
    assert subject_keys({"format": "complex", "user": USER, "application": application()["application"]}) == (
        SubjectKey(KeyKind.ISS_SUB, "user-1", ISSUER),)
    assert subject_keys({"format": "complex", "application": {"format": "uri", "uri": "https://app"}}) == ()
    for bad in (
        {"format": "jwt_id", "jti": "j"}, {"format": "jwt_id", "iss": ISSUER},
        {"format": "jwt_id", "iss": 1, "jti": "j"},
        jwt_id("j" * (MAX_IDENTIFIER_CHARS + 1)), jwt_id(iss="i" * (MAX_IDENTIFIER_CHARS + 1)),
        application("c" * (MAX_IDENTIFIER_CHARS + 1)),
        {"format": "complex", "application": {"format": "opaque"}},
        {"format": "complex", "application": {"format": "iss_sub", "sub": "svc-a"}},
        {"format": "complex", "application": {"id": "svc-a"}},
        {"format": "complex", "application": application()},
        {"format": "complex", "application": {"format": "aliases", "identifiers": [USER]}},
        {"format": "complex", "application": "svc-a"},
    ):
        with pytest.raises(SubjectError):
            subject_keys(bad)


def test_jwt_id_and_client_keys_round_trip_and_describe_their_subject() -> None:
    for key, subject in (
        (SubjectKey(KeyKind.JTI, "j", ISSUER), jwt_id("j")),
        (SubjectKey(KeyKind.CLIENT, "svc-a"), application()),
        (SubjectKey(KeyKind.CLIENT, "svc-a", ISSUER), application(iss=ISSUER)),
    ):
        entry = Entry(id="e", key=key, effect=Effect.TOKEN_REVOKED, match=Match.ALL, event_time=1.0,
                      expires_at=2.0, source="operator", event="operator")
        assert Entry.from_json(entry.to_json()) == entry
        assert key.describe() == subject and subject_keys(subject) == (key,)


def index_with(clock: FrozenClock, *keys: SubjectKey, match: Match = Match.ALL) -> Revocations:
    index = Revocations(clock)
    index.replace(
        Entry(id=f"e{i}", key=k, effect=Effect.TOKEN_REVOKED, match=match, event_time=NOW, expires_at=NOW + 60,
              source="operator", event="operator")
        for i, k in enumerate(keys)
    )
    return index


def test_a_jwt_id_entry_refuses_that_token_at_that_issuer_only(clock: FrozenClock) -> None:
    index = index_with(clock, SubjectKey(KeyKind.JTI, "jti-1", ISSUER))
    refused = index.check(token_of("jti-1", iat=NOW + 20))  # an issuer's clock ahead: still the named token
    assert isinstance(refused, TokenRevoked) and refused.code == "token_revoked" and refused.entry_id == "e0"
    assert index.check(token_of("jti-2")) is None
    assert index.check(token_of("jti-1", iss=OTHER_ISSUER)) is None
    assert index.check(token_of(None)) is None  # no `jti`: not matched
    assert index.check(token_of(5)) is None  # type: ignore[arg-type]  # not a string: not matched, not a crash
    assert index.check(token_of("jti-1", sub="", client="svc-a")) is not None  # a client's token too
    index.remove(["e0"])
    assert index.check(token_of("jti-1")) is None


def test_a_client_entry_refuses_the_clients_tokens_and_not_another_clients(clock: FrozenClock) -> None:
    index = index_with(clock, SubjectKey(KeyKind.CLIENT, "svc-a"), SubjectKey(KeyKind.CLIENT, "svc-b", ISSUER))
    assert index.check(token_of(sub="", client="svc-a")) is not None  # client credentials: no user
    assert index.check(token_of(client="svc-a")) is not None  # a user's token issued to the client
    assert index.check(token_of(sub="", client="svc-a", iss=OTHER_ISSUER)) is not None  # an opaque id: any issuer
    assert index.check(token_of(sub="", client="svc-b")) is not None
    assert index.check(token_of(sub="", client="svc-b", iss=OTHER_ISSUER)) is None  # iss_sub: that issuer only
    assert index.check(token_of(sub="", client="svc-c")) is None
    assert index.check(token_of(sub="svc-a", client="svc-c")) is None  # a user named like the client is no client
    assert index.check(token_of(client=None)) is None


def test_a_client_revoked_reaches_tokens_issued_until_then_and_disabled_all(clock: FrozenClock) -> None:
    index = index_with(clock, SubjectKey(KeyKind.CLIENT, "svc-a"), match=Match.ISSUED_BEFORE)
    assert index.check(token_of(sub="", client="svc-a", iat=NOW)) is not None
    assert index.check(token_of(sub="", client="svc-a", iat=NOW + 1)) is None


def test_the_revocation_check_refuses_a_jwt_id_and_a_client_with_their_entry(clock: FrozenClock) -> None:
    index = index_with(clock, SubjectKey(KeyKind.JTI, "jti-9", ISSUER), SubjectKey(KeyKind.CLIENT, "svc-a"))
    check = Revocation(index, with_roles=lambda p: p)
    request = RequestAttributes(method="GET", scheme="https", host="api", path="/", headers={})
    for caller in (token_of("jti-9"), token_of("x", sub="", client="svc-a")):
        with pytest.raises(TokenRevoked):
            check.check_now(caller, request, NO_POLICY)
    assert check.check_now(token_of("x", sub="", client="svc-b"), request, NO_POLICY).client_id == "svc-b"


def test_an_introspected_tokens_jti_and_client_id_are_matched(clock: FrozenClock) -> None:
    from verifier.tokens.jwt import principal_from_claims  # the JWT one names `azp` when `client_id` is absent

    index = index_with(clock, SubjectKey(KeyKind.JTI, "op-jti", ISSUER), SubjectKey(KeyKind.CLIENT, "svc-a"))
    introspected = Principal(issuer=ISSUER, subject="", client_id="svc-z", scopes=(), roles=frozenset(),
                             expires_at=NOW + 60, claims={"iss": ISSUER, "client_id": "svc-z", "jti": "op-jti"})
    assert index.check(introspected) is not None
    assert index.check(introspected._replace(claims={"iss": ISSUER, "client_id": "svc-z"})) is None
    claims = {"iss": ISSUER, "azp": "svc-a", "sub": "u", "iat": NOW - 1, "exp": NOW + 60}
    assert index.check(principal_from_claims(claims, ISSUER)) is not None


async def test_kill_switch_refuses_one_token_by_its_jwt_id(service: RevocationService, clock: FrozenClock) -> None:
    router = routes(service)
    created = await router.dispatch(admin("POST", document={"subject": jwt_id("leaked"), "reason": "in a log"}))
    assert created.status == 201
    assert service.revocations.check(token_of("leaked", iat=NOW + 5)) is not None
    assert service.revocations.check(token_of("another")) is None  # the user's other tokens pass
    listed = body(await router.dispatch(admin("GET")))["entries"]
    assert listed[0]["subject"] == jwt_id("leaked") and listed[0]["expires_at"] == NOW + ENTRY_LIFETIME
    await router.dispatch(admin("DELETE", f"/v1/admin/revocations/{body(created)['id']}"))
    assert service.revocations.check(token_of("leaked")) is None


async def test_kill_switch_refuses_a_clients_tokens_while_another_clients_pass(
    service: RevocationService, clock: FrozenClock
) -> None:
    router = routes(service)
    assert (await router.dispatch(admin("POST", document={"subject": application("svc-a")}))).status == 201
    refused = service.revocations.check(token_of(sub="", client="svc-a"))
    assert refused is not None and refused.code == "token_revoked"
    assert service.revocations.check(token_of(sub="", client="svc-b")) is None
    clock.advance(1)
    assert service.revocations.check(token_of(sub="", client="svc-a", iat=clock.now())) is None  # a new token
    disabled = await router.dispatch(admin("POST", document={"subject": application("svc-b", ISSUER),
                                                              "effect": "disable"}))
    clock.advance(LIFETIME * 10)
    refused = service.revocations.check(token_of(sub="", client="svc-b", iat=clock.now()))
    assert refused is not None and refused.code == "account_disabled"
    assert service.revocations.check(token_of(sub="", client="svc-b", iss=OTHER_ISSUER, iat=clock.now())) is None
    assert [e["subject"] for e in body(await router.dispatch(admin("GET")))["entries"]] == [
        application("svc-b", ISSUER)]  # the revoke expired with every token it could match
    await router.dispatch(admin("DELETE", f"/v1/admin/revocations/{body(disabled)['id']}"))
    assert service.revocations.check(token_of(sub="", client="svc-b", iat=clock.now())) is None


@pytest.mark.parametrize("subject", [
    jwt_id("j" * (MAX_IDENTIFIER_CHARS + 1)),
    {"format": "jwt_id", "jti": "j"},
    {"format": "complex", "application": {"format": "uri", "uri": "https://app"}},
    {"format": "complex", "application": {"format": "opaque", "id": ""}},
])
async def test_kill_switch_refuses_a_bad_jwt_id_or_application(service: RevocationService, subject: Any) -> None:
    answer = await routes(service).dispatch(admin("POST", document={"subject": subject}))
    assert answer.status == 400 and body(answer)["error"] == "invalid_request"
    assert len(service.revocations) == 0


async def test_kill_switch_audits_a_jwt_id_and_a_client_entry_made_and_lifted(
    service: RevocationService, caplog: pytest.LogCaptureFixture
) -> None:
    router = routes(service)
    with caplog.at_level("INFO", logger="verifier.audit"):
        for subject in (jwt_id("leaked"), application("svc-a")):
            created = await router.dispatch(admin("POST", document={"subject": subject}))
            await router.dispatch(admin("DELETE", f"/v1/admin/revocations/{body(created)['id']}"))
    lines = [(r.__dict__["event"], r.__dict__["subject"]) for r in caplog.records if r.name == "verifier.audit"]
    assert lines == [("revocation_created", jwt_id("leaked")), ("revocation_lifted", jwt_id("leaked")),
                     ("revocation_created", application("svc-a")), ("revocation_lifted", application("svc-a"))]


async def test_a_jwt_id_or_client_entry_made_or_lifted_invalidates_remembered_answers(
    clock: FrozenClock, provider: FakeFetcher, registry: CollectorRegistry
) -> None:
    generation = Generation()  # what the answer memos and the remembered decisions are checked against
    svc = RevocationService(config(), state=MemoryState(clock), fetcher=provider, clock=clock,
                            metrics=RevocationMetrics(registry, REFUSAL_CODES), session=no_http_session,
                            admin_token=ADMIN, generation=generation)
    await svc.start()
    try:
        router = routes(svc)
        for subject in (jwt_id("leaked"), application("svc-a")):
            before = generation.value
            created = await router.dispatch(admin("POST", document={"subject": subject}))
            assert generation.value > before
            before = generation.value
            await router.dispatch(admin("DELETE", f"/v1/admin/revocations/{body(created)['id']}"))
            assert generation.value > before
    finally:
        await svc.stop()


@pytest.mark.parametrize("event", [SESSION_REVOKED, CREDENTIAL_CHANGE, ACCOUNT_DISABLED])
async def test_an_ssf_event_naming_a_jwt_id_refuses_that_token(
    service: RevocationService, transmitter: SsfTransmitter, event: str
) -> None:
    body_ = {"event_timestamp": int(NOW) - 30, **({"change_type": "revoke"} if event == CREDENTIAL_CHANGE else {})}
    assert (await push(service, transmitter.sign_set({event: body_}, jwt_id("stolen")))).status == 202
    # issued after the event's time, authenticated after it: the named token all the same
    assert service.revocations.check(token_of("stolen", iat=NOW, auth_time=NOW)) is not None
    assert service.revocations.check(token_of("other", iat=NOW - 60, auth_time=NOW - 60)) is None


async def test_an_ssf_event_naming_a_client_refuses_its_tokens_within_the_transmitters_issuers(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    assert (await push(service, transmitter.sign_set({ACCOUNT_DISABLED: {}}, application("svc-a")))).status == 202
    refused = service.revocations.check(token_of(sub="", client="svc-a"))
    assert refused is not None and refused.code == "account_disabled"
    assert service.revocations.check(token_of(sub="", client="svc-b")) is None
    assert service.revocations.check(token_of(sub="", client="svc-a", iss=OTHER_ISSUER)) is None  # out of scope
    enabled = transmitter.sign_set({ACCOUNT_ENABLED: {}}, application("svc-a"))
    assert (await push(service, enabled)).status == 202
    assert service.revocations.check(token_of(sub="", client="svc-a")) is None


@pytest.mark.parametrize("named", ["svc-a", "svc-b"])
async def test_an_ssf_event_naming_either_client_of_a_token_naming_two_refuses_it(
    service: RevocationService, transmitter: SsfTransmitter, named: str
) -> None:
    """A token requested by one client in another's name (`client_id` svc-a, `azp` svc-b): an event about either
    refuses it. The `azp` one was missed: only `client_id` was looked up, while a route's `clients_any` read `azp`."""
    from verifier.tokens.jwt import principal_from_claims  # the principal as a verified token has it

    assert (await push(service, transmitter.sign_set({ACCOUNT_DISABLED: {}}, application(named)))).status == 202
    base = {"iss": ISSUER, "iat": NOW - 10, "exp": NOW + 300}
    for sub in ("", "user-1"):  # client credentials, and a user's token
        claims = {**base, "client_id": "svc-a", "azp": "svc-b", **({"sub": sub} if sub else {})}
        refused = service.revocations.check(principal_from_claims(claims, ISSUER))
        assert refused is not None and refused.code == "account_disabled", sub
    other = "svc-b" if named == "svc-a" else "svc-a"
    assert service.revocations.check(principal_from_claims({**base, "client_id": other}, ISSUER)) is None
    assert service.revocations.check(principal_from_claims({**base, "azp": other, "client_id": other}, ISSUER)) is None
    assert service.revocations.check(principal_from_claims({**base, "client_id": "svc-c", "azp": "svc-d"},
                                                           ISSUER)) is None  # fmt: skip


async def test_an_ssf_jwt_id_or_client_of_another_issuer_is_acknowledged_and_ignored(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    for subject in (jwt_id("x", OTHER_ISSUER), application("svc-a", OTHER_ISSUER)):
        assert (await push(service, transmitter.sign_set({ACCOUNT_DISABLED: {}}, subject))).status == 202
    assert len(service.revocations) == 0
    assert service.metrics.subjects_ignored.labels(TX)._value.get() == 2


class ReadClaims(dict[str, Any]):
    """Claims that remember which of them were read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)


def test_a_tokens_jti_and_client_are_looked_up_only_while_some_entry_is_keyed_on_them(clock: FrozenClock) -> None:
    """The check stays a few dict lookups: without a jwt_id or client entry, none is made for them."""
    index = index_with(clock, SubjectKey(KeyKind.ISS_SUB, "someone", ISSUER))
    claims = ReadClaims(iss=ISSUER, sub="user-1", jti="jti-1", iat=NOW - 10, exp=NOW + 60)
    caller = token_of()._replace(claims=claims, client_id="svc-a")
    assert index.check(caller) is None and "jti" not in claims.read
    index.add([Entry(id="j", key=SubjectKey(KeyKind.JTI, "jti-1", ISSUER), effect=Effect.TOKEN_REVOKED,
                     match=Match.ALL, event_time=NOW, expires_at=None, source="operator", event="operator")])
    assert index.check(caller) is not None and "jti" in claims.read
    index.remove(["j"])
    claims.read.clear()
    assert index.check(caller) is None and "jti" not in claims.read


async def test_jwt_id_and_client_entries_outlive_a_restart_in_the_durable_local_store(
    clock: FrozenClock, provider: FakeFetcher, tmp_path: Any
) -> None:
    """Without Redis the kill switch's entries sit in the SQLite file: a restarted worker refuses the same tokens."""
    from verifier.revocation.store import SqliteStore

    def started() -> RevocationService:
        return RevocationService(config(), state=MemoryState(clock), fetcher=provider, clock=clock,
                                 metrics=RevocationMetrics(CollectorRegistry(), REFUSAL_CODES),
                                 session=no_http_session, admin_token=ADMIN, store=SqliteStore(str(tmp_path)))

    first = started()
    await first.start()
    for subject in (jwt_id("leaked"), application("svc-a", ISSUER)):
        assert (await routes(first).dispatch(admin("POST", document={"subject": subject}))).status == 201
    await first.stop()
    second = started()
    await second.start()
    try:
        assert second.revocations.check(token_of("leaked")) is not None
        assert second.revocations.check(token_of("x", sub="", client="svc-a")) is not None
        assert second.revocations.check(token_of("x", sub="", client="svc-b")) is None
    finally:
        await second.stop()


# -- matching: an accepted event must reach the tokens it names -----------------------------------------------------


@pytest.mark.parametrize("spelling", [ISSUER + "/", ISSUER.replace("issuer.example", "Issuer.EXAMPLE"),
                                      ISSUER.upper().replace("HTTPS://", "https://") + "/"])
async def test_an_event_naming_the_issuer_in_another_spelling_still_reaches_its_tokens(
    service: RevocationService, transmitter: SsfTransmitter, registry: CollectorRegistry, spelling: str
) -> None:
    """The same issuer URL with a trailing slash, or its host in another case (RFC 3986 section 6.2.2.1): the
    transmitter's own issuer, which it speaks for. Taken as another issuer, the account-disabled event was
    acknowledged (202), counted as ignored, and the lost account's tokens kept working until they expired."""
    subject = {"format": "iss_sub", "iss": spelling, "sub": "user-1"}
    assert (await push(service, transmitter.sign_set({ACCOUNT_DISABLED: {}}, subject))).status == 202
    refused = service.revocations.check(principal())
    assert refused is not None and refused.code == "account_disabled"
    assert registry.get_sample_value("verifier_ssf_subjects_ignored_total", {"transmitter": TX}) is None
    assert [e.key.iss for e in service.revocations.entries()] == [ISSUER]  # as tokens name it


async def test_an_issuer_differing_in_its_path_case_is_another_issuer(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    """Only the scheme and host are case-insensitive: a path in another case is another issuer (a tenant's)."""
    other = {"format": "iss_sub", "iss": ISSUER + "/Tenant", "sub": "user-1"}
    assert (await push(service, transmitter.sign_set({ACCOUNT_DISABLED: {}}, other))).status == 202
    assert len(service.revocations) == 0


@pytest.mark.parametrize("subject", [
    {"format": "phone_number", "phone_number": "+12065550100"},
    {"format": "account", "uri": "acct:user-1@issuer.example.test"},
    {"format": "did", "url": "did:example:123"},
    {"format": "uri", "uri": "https://issuer.example.test/users/user-1"},
    {"format": "complex", "device": {"format": "opaque", "id": "laptop-7"}},
    {"format": "complex", "tenant": {"format": "opaque", "id": "t1"}},
    {"format": "complex", "user": {"format": "phone_number", "phone_number": "+12065550100"}},
    {"format": "aliases", "identifiers": [{"format": "did", "url": "did:example:123"}]},
])
@pytest.mark.parametrize("event", [ACCOUNT_DISABLED, SESSION_REVOKED])
async def test_an_event_whose_subject_names_no_token_we_can_match_is_refused_not_acknowledged(
    service: RevocationService, transmitter: SsfTransmitter, subject: dict[str, Any], event: str
) -> None:
    """A subject format the verifier cannot match tokens by: acknowledged (202) it changed nothing, and the
    transmitter believed the account disabled while its tokens kept working. Refused 400 invalid_request, the
    transmitter sees the event was not acted on (and can send it in a format we match)."""
    answer = await push(service, transmitter.sign_set({event: {}}, subject))
    assert answer.status == 400 and body(answer)["err"] == "invalid_request"
    assert "not supported" in body(answer)["description"]
    assert len(service.revocations) == 0


async def test_aliases_with_one_member_we_match_are_applied_the_rest_ignored(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    subject = {"format": "aliases", "identifiers": [{"format": "phone_number", "phone_number": "+12065550100"}, USER]}
    assert (await push(service, transmitter.sign_set({ACCOUNT_DISABLED: {}}, subject))).status == 202
    refused = service.revocations.check(principal())
    assert refused is not None and refused.code == "account_disabled"


@pytest.mark.parametrize("event", [
    {CREDENTIAL_CHANGE: {"change_type": "revoke", "credential_type": "password", "event_timestamp": int(NOW) + 10}},
    {SESSION_REVOKED: {"event_timestamp": int(NOW) + 10}},
])
async def test_a_transmitter_clock_ahead_of_ours_still_reaches_the_tokens_issued_before_its_event(
    service: RevocationService, transmitter: SsfTransmitter, event: dict[str, Any]
) -> None:
    """The provider's clock runs 10 s ahead of ours (within the leeway). The attacker logs in with the stolen password
    2 s before the user changes it: the token's iat and auth_time are NOW + 8 on the provider's clock, its
    credential-change is stamped NOW + 10. Cut at our clock's NOW, the event missed that token, which worked until
    it expired; a login after the change (NOW + 11) is not reached."""
    token = transmitter.sign_set(event, USER, iat=NOW + 10)
    assert (await push(service, token)).status == 202
    refused = service.revocations.check(principal(iat=NOW + 8, auth_time=NOW + 8))
    assert refused is not None
    assert service.revocations.check(principal(iat=NOW + 11, auth_time=NOW + 11)) is None


async def test_an_event_stamped_far_ahead_reaches_no_further_than_the_transmitters_leeway(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    event = {SESSION_REVOKED: {"event_timestamp": int(NOW) + 10**6}}
    assert (await push(service, transmitter.sign_set(event, USER))).status == 202
    (entry,) = service.revocations.entries()
    assert entry.event_time == NOW + service.config.transmitters[0].leeway_seconds


@pytest.mark.parametrize("subject", [
    {"format": "iss_sub", "iss": ISSUER + "/", "sub": "user-1"},
    {"format": "iss_sub", "iss": ISSUER.upper().replace("HTTPS://", "HTTPS://"), "sub": "user-1"},
    {"format": "jwt_id", "iss": ISSUER + "/", "jti": "jti-1"},
])
async def test_the_kill_switch_keys_an_issuer_in_another_spelling_as_its_tokens_name_it(
    clock: FrozenClock, provider: FakeFetcher, monkeypatch: pytest.MonkeyPatch, subject: dict[str, Any]
) -> None:
    """The operator revokes a stolen laptop's user typing the issuer with a trailing slash (or in capitals): the
    entry was made (201) and listed, and reached none of the user's tokens, which name the issuer as configured."""
    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", ADMIN)
    tenants = issuer_settings(issuer="https://login.example.test/{tenant}/v2.0", tenants=("t1",))
    settings = Settings(grpc=None, http=None, metrics=None, issuers=(issuer_settings(), tenants), revocation=config())
    app = App(settings, clock=clock, fetcher=provider)
    assert app.revocation is not None
    await app.revocation.resync()
    created = await routes(app.revocation).dispatch(admin("POST", document={"subject": subject}))
    assert created.status == 201
    refused = app.revocation.revocations.check(principal(jti="jti-1"))
    assert refused is not None and refused.code == "token_revoked"
    tenant = {"format": "iss_sub", "iss": "https://LOGIN.example.test/t1/v2.0/", "sub": "user-1"}
    assert (await routes(app.revocation).dispatch(admin("POST", document={"subject": tenant}))).status == 201
    assert app.revocation.revocations.check(principal(iss="https://login.example.test/t1/v2.0")) is not None


async def test_an_account_enabled_stamped_before_the_disable_does_not_lift_it_when_both_are_stamped_ahead(
    service: RevocationService, transmitter: SsfTransmitter
) -> None:
    """The provider's clock 10 s ahead: it disables the account at NOW + 10, after enabling it at NOW + 5, and the
    two arrive out of order. Both cut at our NOW, the older enable lifted the newer disable."""
    disable = transmitter.sign_set({ACCOUNT_DISABLED: {"event_timestamp": int(NOW) + 10}}, USER, iat=NOW + 10)
    enable = transmitter.sign_set({ACCOUNT_ENABLED: {"event_timestamp": int(NOW) + 5}}, USER, iat=NOW + 5)
    assert (await push(service, disable)).status == 202
    assert (await push(service, enable)).status == 202
    refused = service.revocations.check(principal())
    assert refused is not None and refused.code == "account_disabled"
