"""WebAuthn registry and request-bound step-up, against hand-built WebAuthn structures.

`SoftAuthenticator` builds real authenticatorData (rpIdHash, flags, counter, attested credential data
with a COSE key from `fido2.cose`), clientDataJSON and signatures with a `cryptography` EC key, so the
verifier is checked against structures it did not make itself.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import tracemalloc
from collections.abc import Mapping
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fido2 import cbor
from fido2.webauthn import CollectedClientData
from prometheus_client import CollectorRegistry
from support import FrozenClock, SkewedClock, b64url, file_modes, made_under_umask_022, opened_together
from webauthnkit import FLAGS, ORIGIN, RP_ID, SoftAuthenticator, b64u, encode_header, unb64u

from verifier import private_files
from verifier.config.state import ReplayBounds
from verifier.config.webauthn import CLOCK_SKEW_SECONDS
from verifier.doors.public_origin import PublicOrigins
from verifier.doors.refusals import refuse
from verifier.doors.routes import HttpRequest, Router
from verifier.doors.webauthn_http import add_webauthn_routes
from verifier.errors import InvalidToken, MissingToken, Outcome, ReplayStoreFull, StateUnavailable
from verifier.observe.metrics import WebAuthnMetrics
from verifier.principal import Principal
from verifier.request import RequestAttributes
from verifier.settings import ConfigError
from verifier.state.base import Purpose
from verifier.state.memory import MemoryState
from verifier.webauthn import (
    AssertionRefused,
    RegistrationRefused,
    SqliteCredentialStore,
    WebAuthnConfig,
    WebAuthnService,
    parse_webauthn_config,
)
from verifier.webauthn.assertion import user_handle
from verifier.webauthn.challenge import ChallengeSigner, request_hash, subject_hash
from verifier.webauthn.service import MAX_CREDENTIALS_PER_USER

ISSUER = "https://issuer.example.test"
SECRET = b"s" * 32


def principal(subject: str = "alice", issuer: str = ISSUER) -> Principal:
    return Principal(issuer=issuer, subject=subject, client_id="app", scopes=("read",), roles=frozenset(),
                     expires_at=2e9, claims={"sub": subject, "name": subject.title()})


def attrs(method: str = "POST", path: str = "/payments/transfer", assertion: str | None = None,
          host: str = "api.example.test", scheme: str = "https") -> RequestAttributes:
    headers = {"authorization": "Bearer x"}
    if assertion is not None:
        headers["x-webauthn-assertion"] = assertion
    return RequestAttributes(method=method, scheme=scheme, host=host, path=path, headers=headers)


class Harness:
    """A service with a frozen clock, memory state, an in-memory SQLite store and a router."""

    def __init__(self, origins: PublicOrigins | None = None, *, leeway_seconds: float = 600, **config: Any) -> None:
        self.clock = FrozenClock()
        self.state = MemoryState(self.clock)
        self.registry = CollectorRegistry()
        # The demo routes on unless a test says otherwise: several tests below call its step-up echo.
        self.config = WebAuthnConfig(rp_id=RP_ID, origins=(ORIGIN,), secret=SECRET, **{"demo": True, **config})
        self.service = WebAuthnService(self.config, SqliteCredentialStore(":memory:"), self.state, self.clock,
                                       WebAuthnMetrics(self.registry), leeway_seconds=leeway_seconds)
        self.router = Router()
        self.judged: list[RequestAttributes] = []  # the requests `authenticate` was asked about
        add_webauthn_routes(self.router, self.service, self.authenticate, origins)

    async def authenticate(self, _: HttpRequest, request: RequestAttributes) -> Principal:
        self.judged.append(request)
        value = request.headers.get("authorization", "")
        if not value:
            raise MissingToken()
        if not value.startswith("Bearer token-"):
            raise InvalidToken("token signature does not verify", code="signature_invalid")
        # `token-alice` or `token-alice;auth_time=<epoch>;iat=<epoch>`: the token's times, as the provider set them
        subject, *times = value.removeprefix("Bearer token-").split(";")
        who = principal(subject)
        # a token without times was issued just now, as every provider's has an `iat`
        claims = {k: float(v) for k, _, v in (t.partition("=") for t in times)} or {"iat": self.clock.now()}
        return who._replace(claims={**who.claims, **claims})

    async def call(self, method: str, path: str, *, user: str | None = "alice", body: Any = None,
                   headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        all_headers = {"host": "localhost:9555", **({"content-type": "application/json"} if body is not None else {}),
                       **(headers or {})}
        if user is not None:
            all_headers["authorization"] = f"Bearer token-{user}"
        raw = json.dumps(body).encode() if body is not None else b""
        answer = await self.router.dispatch(HttpRequest(method, path, "", all_headers, raw))
        document = json.loads(answer.body) if answer.body and answer.body[:1] in (b"{", b"[") else answer.body
        return answer.status, dict(answer.headers), document

    async def register(self, authenticator: SoftAuthenticator, user: str = "alice",
                       proof: SoftAuthenticator | None = None, **create: Any) -> int:
        """The whole ceremony; `proof` signs the step-up a user with a credential must pass first."""
        status, _, begun = await self.call("POST", "/v1/webauthn/register/begin", user=user, body={})
        if status == 401 and proof is not None:
            header = encode_header(proof.get(begun["publicKey"]["challenge"]))
            status, _, begun = await self.call("POST", "/v1/webauthn/register/begin", user=user, body={},
                                               headers={"x-webauthn-assertion": header})
        if status != 200:
            return status
        credential = authenticator.create(begun["publicKey"], **create)
        status, _, _ = await self.call("POST", "/v1/webauthn/register/complete", user=user,
                                       body={"state": begun["state"], "credential": credential, "name": "key"})
        return status

    async def challenge(self, who: Principal, request: RequestAttributes) -> AssertionRefused:
        with pytest.raises(AssertionRefused) as caught:
            await self.service.check_step_up(who, request)
        assert caught.value.offer is not None
        return caught.value

    def metric(self, result: str) -> float:
        value = self.registry.get_sample_value("verifier_webauthn_assertions_total", {"result": result})
        return value or 0.0


@pytest.fixture
async def harness() -> Any:
    h = Harness()
    yield h
    await h.service.close()


@pytest.fixture
async def enrolled(harness: Harness) -> tuple[Harness, SoftAuthenticator]:
    authenticator = SoftAuthenticator()
    assert await harness.register(authenticator) == 201
    return harness, authenticator


async def assertion_for(h: Harness, a: SoftAuthenticator, request: RequestAttributes, who: Principal | None = None,
                        **get: Any) -> str:
    refused = await h.challenge(who or principal(), request)
    assert refused.offer is not None
    return encode_header(a.get(refused.offer.challenge, **get))


# --- configuration -------------------------------------------------------------------------------------

def test_parses_a_full_webauthn_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERIFIER_WEBAUTHN_SECRET", "k" * 40)
    config = parse_webauthn_config({
        "rp_id": "localhost", "rp_name": "Demo", "origins": ["http://localhost:9555"],
        "user_verification": "preferred", "attestation": "none", "challenge_timeout_seconds": 60,
        "secret_env": "VERIFIER_WEBAUTHN_SECRET", "storage": {"sqlite_path": ":memory:"},
    })
    assert config.rp_name == "Demo" and config.origins == ("http://localhost:9555",)
    assert config.secret == b"k" * 40 and config.secret_from_env
    assert config.timeout_ms == 60_000 and not config.user_verification_required
    assert config.sqlite_path == ":memory:"
    assert config.first_enrollment_max_auth_age_seconds == 300  # safe by default: a first key needs a recent login
    off = parse_webauthn_config({"rp_id": "localhost", "origins": [ORIGIN], "first_enrollment_max_auth_age_seconds": 0})
    assert off.first_enrollment_max_auth_age_seconds == 0


def test_draws_a_random_secret_per_process_when_the_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VERIFIER_WEBAUTHN_SECRET", raising=False)
    one = parse_webauthn_config({"rp_id": "localhost", "origins": [ORIGIN]})
    two = parse_webauthn_config({"rp_id": "localhost", "origins": [ORIGIN]})
    assert len(one.secret) == 32 and one.secret != two.secret and not one.secret_from_env


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"origins": [ORIGIN]}, "webauthn.rp_id"),
        ({"rp_id": "localhost"}, "webauthn.origins"),
        ({"rp_id": "localhost", "origins": ["http://evil.example"]}, "webauthn.origins[0]"),
        ({"rp_id": "example.com", "origins": ["http://example.com"]}, "webauthn.origins[0]"),  # http off localhost
        ({"rp_id": "example.com", "origins": ["https://example.org"]}, "webauthn.origins[0]"),
        ({"rp_id": "https://example.com", "origins": ["https://example.com"]}, "webauthn.rp_id"),
        ({"rp_id": "localhost", "origins": [ORIGIN], "colour": 1}, "webauthn.colour"),
        ({"rp_id": "localhost", "origins": [ORIGIN], "user_verification": "always"}, "webauthn.user_verification"),
        ({"rp_id": "localhost", "origins": [ORIGIN], "attestation": "direct"}, "webauthn.attestation"),
        ({"rp_id": "localhost", "origins": [ORIGIN], "attestation": "trusted_roots"}, "webauthn.trusted_roots_pem"),
        ({"rp_id": "localhost", "origins": [ORIGIN], "trusted_roots_pem": ["nope"]}, "webauthn.trusted_roots_pem[0]"),
        ({"rp_id": "localhost", "origins": [ORIGIN], "challenge_timeout_seconds": 0},
         "webauthn.challenge_timeout_seconds"),
        ({"rp_id": "localhost", "origins": [ORIGIN], "storage": {"path": "x"}}, "webauthn.storage.path"),
        ({"rp_id": "localhost", "origins": [ORIGIN], "demo": "yes"}, "webauthn.demo"),
        ({"rp_id": "localhost", "origins": [ORIGIN], "first_enrollment_max_auth_age_seconds": 86401},
         "webauthn.first_enrollment_max_auth_age_seconds"),
        ({"rp_id": "localhost", "origins": [ORIGIN], "first_enrollment_max_auth_age_seconds": -1},
         "webauthn.first_enrollment_max_auth_age_seconds"),
        ({"rp_id": "localhost", "origins": [ORIGIN], "secret_env": "SHORT_WEBAUTHN_SECRET"}, "webauthn.secret_env"),
    ],
)
def test_refuses_a_bad_webauthn_section_naming_the_key(
    data: dict[str, Any], key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHORT_WEBAUTHN_SECRET", "short")
    with pytest.raises(ConfigError) as caught:
        parse_webauthn_config(data)
    assert str(caught.value).startswith(key + ":")


# --- registration --------------------------------------------------------------------------------------

async def test_registers_lists_and_deletes_a_credential(harness: Harness) -> None:
    status, _, begun = await harness.call("POST", "/v1/webauthn/register/begin", body={})
    assert status == 200
    options = begun["publicKey"]
    assert options["rp"] == {"id": RP_ID, "name": "edge-verifier"}
    assert unb64u(options["user"]["id"]) == user_handle(ISSUER, "alice")
    assert options["authenticatorSelection"]["userVerification"] == "required"
    assert options["timeout"] == 120_000 and len(unb64u(options["challenge"])) == 32
    assert {p["alg"] for p in options["pubKeyCredParams"]} == {-7, -8, -35, -257, -37}
    a = SoftAuthenticator()
    credential = a.create(options)
    status, headers, created = await harness.call(
        "POST", "/v1/webauthn/register/complete", body={"state": begun["state"], "credential": credential}
    )
    assert status == 201, created
    assert created["id"] == a.id and headers["location"] == f"/v1/webauthn/credentials/{a.id}"
    assert created["transports"] == ["usb"] and created["user_verified"] is True

    status, _, listed = await harness.call("GET", "/v1/webauthn/credentials")
    assert status == 200 and [c["id"] for c in listed["credentials"]] == [a.id]
    status, _, bobs = await harness.call("GET", "/v1/webauthn/credentials", user="bob")
    assert bobs == {"credentials": []}

    status, _, challenged = await harness.call("POST", "/v1/webauthn/register/begin", body={})
    assert status == 401  # a second key needs a step-up with the first
    proof = encode_header(a.get(challenged["publicKey"]["challenge"]))
    status, _, again = await harness.call("POST", "/v1/webauthn/register/begin", body={},
                                          headers={"x-webauthn-assertion": proof})
    assert status == 200
    assert [c["id"] for c in again["publicKey"]["excludeCredentials"]] == [a.id]

    status, _, _ = await harness.call("DELETE", f"/v1/webauthn/credentials/{a.id}", user="bob")
    assert status == 404  # not bob's
    status, headers, challenged = await harness.call("DELETE", f"/v1/webauthn/credentials/{a.id}")
    assert status == 401 and headers["www-authenticate"].startswith("WebAuthn ")
    proof = encode_header(a.get(challenged["publicKey"]["challenge"]))
    status, _, _ = await harness.call("DELETE", f"/v1/webauthn/credentials/{a.id}",
                                      headers={"x-webauthn-assertion": proof})
    assert status == 204
    status, _, _ = await harness.call("DELETE", f"/v1/webauthn/credentials/{a.id}")
    assert status == 404
    _, _, listed = await harness.call("GET", "/v1/webauthn/credentials")
    assert listed == {"credentials": []}


async def test_answers_a_missing_or_bad_token_like_the_decision_module(harness: Harness) -> None:
    status, headers, body = await harness.call("POST", "/v1/webauthn/register/begin", user=None, body={})
    assert status == 401 and headers["www-authenticate"] == 'Bearer realm="verifier"'
    assert headers["x-verifier-reason"] == "token_missing"
    status, headers, body = await harness.call(
        "GET", "/v1/webauthn/credentials", headers={"authorization": "Bearer forged"}, user=None
    )
    assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"]
    assert body["error"] == "invalid_token"


async def _begin_and_create(h: Harness, a: SoftAuthenticator, user: str = "alice", **create: Any) -> tuple[str, Any]:
    _, _, begun = await h.call("POST", "/v1/webauthn/register/begin", user=user, body={})
    return begun["state"], a.create(begun["publicKey"], **create)


def _tamper_state(state: str) -> str:
    body, tag = state.split(".")
    document = json.loads(unb64u(body))
    document["exp"] += 3600
    return b64u(json.dumps(document, separators=(",", ":"), sort_keys=True).encode()) + "." + tag


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("state_body_altered", "webauthn_state_invalid"),
        ("state_tag_altered", "webauthn_state_invalid"),
        ("state_garbage", "webauthn_state_invalid"),
        ("state_of_another_user", "webauthn_state_invalid"),
        ("state_expired", "webauthn_state_expired"),
        ("wrong_origin", "webauthn_registration_invalid"),
        ("cross_origin", "webauthn_registration_invalid"),  # made in a cross-origin iframe (section 7.1 step 10)
        ("wrong_rp_id", "webauthn_registration_invalid"),
        ("no_user_verification", "webauthn_registration_invalid"),
        ("challenge_of_another_ceremony", "webauthn_registration_invalid"),
    ],
)
async def test_refuses_a_registration_that_does_not_verify(harness: Harness, case: str, code: str) -> None:
    a = SoftAuthenticator()
    create: dict[str, Any] = {
        "wrong_origin": {"origin": "http://localhost:1234"},
        "cross_origin": {"cross_origin": True},
        "wrong_rp_id": {"rp_id": "example.com"},
        "no_user_verification": {"flags": FLAGS.UP},
    }.get(case, {})
    state, credential = await _begin_and_create(harness, a, **create)
    if case == "state_body_altered":
        state = _tamper_state(state)
    elif case == "state_tag_altered":
        state = state[:-2] + ("AA" if not state.endswith("AA") else "BB")
    elif case == "state_garbage":
        state = "not-a-state"
    elif case == "state_of_another_user":
        state, _ = await _begin_and_create(harness, SoftAuthenticator(), user="bob")
    elif case == "state_expired":
        harness.clock.advance(121)
    elif case == "challenge_of_another_ceremony":
        state, _ = await _begin_and_create(harness, SoftAuthenticator())
    status, headers, body = await harness.call(
        "POST", "/v1/webauthn/register/complete", body={"state": state, "credential": credential}
    )
    assert status == 400 and body["error"] == code, body
    assert headers["x-verifier-reason"] == code and "www-authenticate" not in headers  # the body, not the token
    _, _, listed = await harness.call("GET", "/v1/webauthn/credentials")
    assert listed == {"credentials": []}


async def test_refuses_a_replayed_registration_state(harness: Harness) -> None:
    a = SoftAuthenticator()
    state, credential = await _begin_and_create(harness, a)
    body = {"state": state, "credential": credential}
    assert (await harness.call("POST", "/v1/webauthn/register/complete", body=body))[0] == 201
    status, _, answer = await harness.call("POST", "/v1/webauthn/register/complete", body=body)
    assert status == 400 and answer["error"] == "webauthn_state_replayed"


async def test_refuses_a_credential_id_registered_to_someone_else(harness: Harness) -> None:
    a = SoftAuthenticator()
    assert await harness.register(a, user="bob") == 201
    assert await harness.register(a, user="alice") == 409
    state, credential = await _begin_and_create(harness, a)
    status, headers, body = await harness.call(
        "POST", "/v1/webauthn/register/complete", body={"state": state, "credential": credential}
    )
    assert (status, body["error"], headers["x-verifier-reason"]) == (409, "webauthn_credential_exists", body["error"])


async def test_refuses_malformed_registration_bodies(harness: Harness) -> None:
    status, _, body = await harness.call("POST", "/v1/webauthn/register/begin", body={"residentKey": "always"})
    assert status == 400 and body["error"] == "invalid_request"
    status, _, body = await harness.call("POST", "/v1/webauthn/register/complete", body=["x"])
    assert status == 400
    state, _ = await _begin_and_create(harness, SoftAuthenticator())
    status, _, body = await harness.call(
        "POST", "/v1/webauthn/register/complete", body={"state": state, "credential": {"id": "x"}}
    )
    assert status == 400 and body["error"] == "webauthn_registration_invalid"


@pytest.mark.parametrize("path", ["/v1/webauthn/register/begin", "/v1/webauthn/register/complete"])
@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
     "application/json-patch+json", "text/plain; a=application/json"],
)
async def test_refuses_a_registration_body_that_a_cross_site_form_could_send(
    harness: Harness, path: str, content_type: str | None
) -> None:
    """A browser sends a cross-site form (text/plain, urlencoded, multipart) without a preflight: its JSON body must
    not reach the registry, which a cookie- or ambient-credential gateway would otherwise let enroll a key. 415 with
    the catalogue's answer, as the admin door's POST; nothing is begun or stored."""
    headers = {"host": "localhost:9555", "authorization": "Bearer token-alice"}
    if content_type is not None:
        headers["content-type"] = content_type
    answer = await harness.router.dispatch(HttpRequest("POST", path, "", headers, b"{}"))
    body = json.loads(answer.body)
    assert (answer.status, body["error"], dict(answer.headers)["x-verifier-reason"]) == (
        415, "invalid_request", "invalid_request"
    ), answer
    assert "application/json" in body["error_description"]
    for accepted in ("application/json", "Application/JSON; charset=utf-8"):
        headers["content-type"] = accepted
        ok = await harness.router.dispatch(HttpRequest("POST", "/v1/webauthn/register/begin", "", headers, b"{}"))
        assert ok.status == 200, ok


@pytest.mark.parametrize(
    "raw",
    [
        '{"residentKey": "preferred"}'.encode("utf-16"),
        b"\xef\xbb\xbf{}",
        b'{"residentKey": "required", "residentKey": "preferred"}',
        b'{"x": NaN}',
    ],
    ids=["utf-16", "bom", "repeated-member", "nan"],
)
async def test_refuses_a_registration_body_that_reads_two_ways(harness: Harness, raw: bytes) -> None:
    """RFC 8259: UTF-8, member names unique, no NaN; else 400 invalid_request (a proxy may read it otherwise)."""
    headers = {"host": "localhost:9555", "authorization": "Bearer token-alice", "content-type": "application/json"}
    answer = await harness.router.dispatch(HttpRequest("POST", "/v1/webauthn/register/begin", "", headers, raw))
    assert (answer.status, json.loads(answer.body)["error"]) == (400, "invalid_request")


async def test_a_user_cannot_register_credentials_without_bound(harness: Harness) -> None:
    # Each registration is a row in the shared registry and an entry in every step-up offer of the user: one
    # token holder (own endpoints are outside the gateway's rate limits) could otherwise grow both forever.
    first = SoftAuthenticator()
    assert await harness.register(first) == 201
    for _ in range(MAX_CREDENTIALS_PER_USER - 1):
        assert await harness.register(SoftAuthenticator(), proof=first) == 201
    status, _, offered = await harness.call("POST", "/v1/webauthn/register/begin", body={})
    assert status == 401  # the step-up comes first: the limit is told only to the credentials' owner
    proof = encode_header(first.get(offered["publicKey"]["challenge"]))
    status, _, body = await harness.call("POST", "/v1/webauthn/register/begin", body={},
                                         headers={"x-webauthn-assertion": proof})
    assert status == 400 and body["error"] == "webauthn_credential_limit", body
    _, _, listed = await harness.call("GET", "/v1/webauthn/credentials")
    assert len(listed["credentials"]) == MAX_CREDENTIALS_PER_USER


async def test_states_begun_below_the_credential_limit_cannot_complete_past_it() -> None:
    h = Harness()
    try:
        authenticators = [SoftAuthenticator() for _ in range(MAX_CREDENTIALS_PER_USER + 2)]
        begun = [await _begin_and_create(h, a) for a in authenticators]  # no credential yet: no step-up
        statuses = []
        for state, credential in begun:
            status, _, body = await h.call(
                "POST", "/v1/webauthn/register/complete", body={"state": state, "credential": credential}
            )
            statuses.append(body.get("error") if status != 201 else 201)
        assert statuses == [201] * MAX_CREDENTIALS_PER_USER + ["webauthn_credential_limit"] * 2
    finally:
        await h.service.close()


async def test_a_stolen_token_alone_cannot_enroll_or_remove_keys_once_the_user_has_one(
    enrolled: tuple[Harness, SoftAuthenticator],
) -> None:
    h, a = enrolled
    attacker = SoftAuthenticator()
    assert await h.register(attacker) == 401
    assert await h.register(attacker, proof=attacker) == 401  # a key that is not enrolled proves nothing
    status, headers, _ = await h.call("DELETE", f"/v1/webauthn/credentials/{a.id}")
    assert status == 401 and headers["x-verifier-reason"] == "webauthn_assertion_required"
    _, _, listed = await h.call("GET", "/v1/webauthn/credentials")
    assert [c["id"] for c in listed["credentials"]] == [a.id]
    # Once revocation disabled every key, the token of before (stolen) does not enroll the thief's: only one that
    # proves a login after the disable does (`test_after_a_revocation_*`).
    await h.service.disable_credentials(ISSUER, "alice", None)
    assert await h.register(attacker) == 401


# --- attestation policy: trusted roots ------------------------------------------------------------------

def _certificate(subject: str, issuer: str, key: Any, signer: Any, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "SE"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Vendor"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Authenticator Attestation"),
        x509.NameAttribute(NameOID.COMMON_NAME, subject),
    ])
    issuer_name = name if subject == issuer else x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "SE"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Vendor"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Authenticator Attestation"),
        x509.NameAttribute(NameOID.COMMON_NAME, issuer),
    ])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )


def _packed_signer(leaf_key: Any, leaf: x509.Certificate) -> Any:
    def sign(auth_data: bytes, client_data: CollectedClientData) -> dict[str, Any]:
        signature = leaf_key.sign(auth_data + client_data.hash, ec.ECDSA(hashes.SHA256()))
        return {"alg": -7, "sig": signature, "x5c": [leaf.public_bytes(serialization.Encoding.DER)]}

    return sign


async def test_trusted_roots_accepts_a_chain_to_a_configured_root_and_refuses_others() -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _certificate("Test Root", "Test Root", root_key, root_key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _certificate("Test Authenticator", "Test Root", leaf_key, root_key, ca=False)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue_leaf = _certificate("Rogue", "Test Root", rogue_key, rogue_key, ca=False)  # claims the root, self-signed
    h = Harness(attestation="trusted_roots",
                trusted_roots_pem=(root.public_bytes(serialization.Encoding.PEM).decode(),))
    try:
        _, _, begun = await h.call("POST", "/v1/webauthn/register/begin", body={})
        assert begun["publicKey"]["attestation"] == "direct"
        assert await h.register(SoftAuthenticator()) == 400  # "none" attestation: nothing to trust
        assert await h.register(SoftAuthenticator(), fmt="packed", signer=_packed_signer(rogue_key, rogue_leaf)) == 400
        assert await h.register(SoftAuthenticator(), fmt="packed", signer=_packed_signer(leaf_key, leaf)) == 201
    finally:
        await h.service.close()


async def test_trusted_roots_refuses_an_ecdaa_packed_attestation_with_a_400() -> None:
    # fido2 raises NotImplementedError for a packed statement naming an ECDAA key: a 400, not a crash (500)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _certificate("Test Root", "Test Root", root_key, root_key, ca=True)
    h = Harness(attestation="trusted_roots",
                trusted_roots_pem=(root.public_bytes(serialization.Encoding.PEM).decode(),))
    try:
        state, credential = await _begin_and_create(
            h, SoftAuthenticator(), fmt="packed", att_stmt={"alg": -7, "sig": b"x", "ecdaaKeyId": b"x"}
        )
        status, _, body = await h.call(
            "POST", "/v1/webauthn/register/complete", body={"state": state, "credential": credential}
        )
        assert status == 400 and body["error"] == "webauthn_registration_invalid", body
    finally:
        await h.service.close()


# --- step-up assertions -------------------------------------------------------------------------------

async def test_a_missing_assertion_is_answered_with_a_bound_challenge(
    enrolled: tuple[Harness, SoftAuthenticator],
) -> None:
    h, a = enrolled
    refused = await h.challenge(principal(), attrs())
    assert refused.code == "webauthn_assertion_required"
    decision = refuse(refused, realm="verifier")
    assert decision.status == 401 and decision.reason == "webauthn_assertion_required"
    header = dict(decision.response_headers)["www-authenticate"]
    assert header.startswith('WebAuthn realm="verifier", error="insufficient_user_authentication"')
    assert f'challenge="{refused.offer.challenge}", rp_id="localhost", timeout=120000' in header  # type: ignore[union-attr]
    body = json.loads(decision.body)
    assert body["publicKey"]["challenge"] == refused.offer.challenge  # type: ignore[union-attr]
    assert body["publicKey"]["rpId"] == RP_ID and body["publicKey"]["userVerification"] == "required"
    assert body["publicKey"]["allowCredentials"] == [{"type": "public-key", "id": a.id, "transports": ["usb"]}]
    raw = unb64u(refused.offer.challenge)  # type: ignore[union-attr]
    ChallengeSigner(SECRET).check(raw, subject=subject_hash(ISSUER, "alice"),
                                  request=request_hash("POST", "https", "api.example.test", "/payments/transfer"),
                                  now=h.clock.now())


async def test_accepts_a_valid_assertion_and_audits_it(
    enrolled: tuple[Harness, SoftAuthenticator], caplog: pytest.LogCaptureFixture
) -> None:
    h, a = enrolled
    header = await assertion_for(h, a, attrs())
    with caplog.at_level(logging.INFO, logger="verifier.audit"):
        await h.service.check_step_up(principal(), attrs(assertion=header))
    records = [r for r in caplog.records if getattr(r, "event", "") == "webauthn_assertion"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert records[0].credential == a.id and records[0].counter == 1 and records[0].decision == "allow"  # type: ignore[attr-defined]
    assert h.metric("ok") == 1
    _, _, listed = await h.call("GET", "/v1/webauthn/credentials")
    assert listed["credentials"][0]["sign_count"] == 1
    assert listed["credentials"][0]["last_used_at"] == h.clock.now()


async def test_refuses_a_replayed_assertion_with_a_fresh_challenge(
    enrolled: tuple[Harness, SoftAuthenticator],
) -> None:
    h, a = enrolled
    header = await assertion_for(h, a, attrs())
    await h.service.check_step_up(principal(), attrs(assertion=header))
    refused = await h.challenge(principal(), attrs(assertion=header))
    assert refused.code == "webauthn_challenge_replayed"
    assert refused.offer is not None and refused.offer.challenge not in header


async def test_a_full_replay_store_refuses_an_assertion_with_503_not_as_a_replay(
    enrolled: tuple[Harness, SoftAuthenticator],
) -> None:
    """A local replay store full of live values cannot burn the challenge: the step-up is refused as unavailable
    (503, try again), not passed and not called a replay."""
    h, a = enrolled
    full = MemoryState(h.clock, replay=ReplayBounds(dpop=1_000, webauthn=1, revocation=1_000))
    await full.first_use("someone else's live value", 300, purpose=Purpose.WEBAUTHN)
    service = WebAuthnService(h.config, h.service._store, full, h.clock, WebAuthnMetrics(CollectorRegistry()))
    header = await assertion_for(h, a, attrs())
    with pytest.raises(ReplayStoreFull) as caught:
        await service.check_step_up(principal(), attrs(assertion=header))
    assert caught.value.code == "replay_store_full" and caught.value.outcome is Outcome.UNAVAILABLE


async def test_a_replay_store_whose_dpop_part_is_full_still_takes_the_challenge(
    enrolled: tuple[Harness, SoftAuthenticator],
) -> None:
    """WebAuthn challenges have their own part of the local replay store: a client's flood of DPoP proofs that
    fills the DPoP part never refuses a step-up (before, one bound for both: 503 replay_store_full)."""
    h, a = enrolled
    store = MemoryState(h.clock, replay=ReplayBounds(dpop=1, webauthn=1, revocation=1))
    await store.first_use("dpop:jti:flood", 300, purpose=Purpose.DPOP)
    with pytest.raises(ReplayStoreFull):
        await store.first_use("dpop:jti:flood-2", 300, purpose=Purpose.DPOP)
    service = WebAuthnService(h.config, h.service._store, store, h.clock, WebAuthnMetrics(CollectorRegistry()))
    header = await assertion_for(h, a, attrs())
    await service.check_step_up(principal(), attrs(assertion=header))  # passes: the challenge is taken
    assert store.held(Purpose.WEBAUTHN) == 1


async def test_a_replay_is_refused_by_another_replica_sharing_state(
    enrolled: tuple[Harness, SoftAuthenticator],
) -> None:
    h, a = enrolled
    store = h.service._store  # the same registry; in production a shared database
    other = WebAuthnService(h.config, store, h.state, h.clock, WebAuthnMetrics(CollectorRegistry()))
    header = await assertion_for(h, a, attrs())
    await other.check_step_up(principal(), attrs(assertion=header))  # a challenge from replica one
    with pytest.raises(AssertionRefused) as caught:
        await h.service.check_step_up(principal(), attrs(assertion=header))
    assert caught.value.code == "webauthn_challenge_replayed"


@pytest.mark.parametrize(
    ("issued_for", "presented_at", "who", "code"),
    [
        (("POST", "/payments/transfer"), ("POST", "/payments/other"), "alice", "webauthn_challenge_mismatch"),
        (("POST", "/payments/transfer"), ("DELETE", "/payments/transfer"), "alice", "webauthn_challenge_mismatch"),
        (("POST", "/payments/transfer"), ("POST", "/payments/transfer?to=mallory"), "alice",
         "webauthn_challenge_mismatch"),
        (("POST", "/payments/transfer"), ("POST", "/payments/transfer"), "bob", "webauthn_challenge_mismatch"),
    ],
)
async def test_refuses_a_challenge_issued_for_another_request_or_subject(
    enrolled: tuple[Harness, SoftAuthenticator],
    issued_for: tuple[str, str],
    presented_at: tuple[str, str],
    who: str,
    code: str,
) -> None:
    h, a = enrolled
    header = await assertion_for(h, a, attrs(*issued_for))
    refused = await h.challenge(principal(who), attrs(*presented_at, assertion=header))
    assert refused.code == code


@pytest.mark.parametrize(
    "presented_at",
    [
        "/payments/transfer/",  # Express (non-strict routing) serves it as /payments/transfer
        "/payments/%74ransfer",  # the same path to every upstream that decodes
        "/payments//transfer",
        "/payments/./transfer",
        "/payments/x/../transfer",
        "/Payments/transfer",  # case-blind routers
        "/payments/transfer;v=2",  # servlet path parameters
        "/payments/transfer#x",
        "/payments/transfer?",
    ],
)
async def test_refuses_an_assertion_for_another_spelling_of_the_path_it_was_made_for(
    enrolled: tuple[Harness, SoftAuthenticator], presented_at: str
) -> None:
    """The challenge binds the target as received, not the policy's normalized reading of it: an assertion made for
    one spelling is refused for every other, even one an upstream serves as the same resource, so it never signs a
    target whose other readings it did not see (the route check weighs those; `verifier.policy.rules`). The one
    accepted is then the exact spelling, and only once."""
    h, a = enrolled
    header = await assertion_for(h, a, attrs(path="/payments/transfer"))
    refused = await h.challenge(principal(), attrs(path=presented_at, assertion=header))
    assert refused.code == "webauthn_challenge_mismatch"
    await h.service.check_step_up(principal(), attrs(path="/payments/transfer", assertion=header))  # unused till now


async def test_refuses_an_assertion_made_for_another_host_on_the_same_path(
    enrolled: tuple[Harness, SoftAuthenticator],
) -> None:
    h, a = enrolled
    header = await assertion_for(h, a, attrs(host="payments.example.test"))
    refused = await h.challenge(principal(), attrs(host="admin.example.test", assertion=header))
    assert refused.code == "webauthn_challenge_mismatch" and "host" in refused.description
    same_host_other_case = await assertion_for(h, a, attrs(host="payments.example.test"))
    await h.service.check_step_up(principal(), attrs(host="Payments.Example.Test", assertion=same_host_other_case))


async def test_refuses_an_assertion_made_for_https_on_the_same_request_over_http(
    enrolled: tuple[Harness, SoftAuthenticator],
) -> None:
    """An assertion made for an https request, presented with the same method, host and path over plain http (where
    anyone on the way reads it), is refused; the same one over https passes, once."""
    h, a = enrolled
    header = await assertion_for(h, a, attrs(scheme="https"))
    refused = await h.challenge(principal(), attrs(scheme="http", assertion=header))
    assert refused.code == "webauthn_challenge_mismatch" and "scheme" in refused.description
    await h.service.check_step_up(principal(), attrs(scheme="HTTPS", assertion=header))


async def test_refuses_an_expired_challenge(enrolled: tuple[Harness, SoftAuthenticator]) -> None:
    h, a = enrolled
    header = await assertion_for(h, a, attrs())
    h.clock.advance(120)
    refused = await h.challenge(principal(), attrs(assertion=header))
    assert refused.code == "webauthn_challenge_expired"


async def test_refuses_a_challenge_this_verifier_did_not_sign(enrolled: tuple[Harness, SoftAuthenticator]) -> None:
    h, a = enrolled
    forged = ChallengeSigner(b"x" * 32).issue(
        subject=subject_hash(ISSUER, "alice"),
        request=request_hash("POST", "https", "api.example.test", "/payments/transfer"),
        expires_at=int(h.clock.now()) + 60,
    )
    for challenge in (b64u(forged), b64u(os.urandom(32))):
        refused = await h.challenge(principal(), attrs(assertion=encode_header(a.get(challenge))))
        assert refused.code == "webauthn_challenge_invalid"


async def test_refuses_a_credential_of_another_user(harness: Harness) -> None:
    bobs = SoftAuthenticator()
    assert await harness.register(bobs, user="bob") == 201
    alices = SoftAuthenticator()
    assert await harness.register(alices, user="alice") == 201
    bobs.user_handle = None  # a U2F-style authenticator sends no user handle
    header = await assertion_for(harness, bobs, attrs())
    refused = await harness.challenge(principal("alice"), attrs(assertion=header))
    assert refused.code == "webauthn_credential_unknown"


@pytest.mark.parametrize(
    ("get", "code"),
    [
        ({"origin": "https://evil.example"}, "webauthn_origin_mismatch"),
        ({"origin": "http://localhost:9556"}, "webauthn_origin_mismatch"),
        ({"cross_origin": True}, "webauthn_origin_mismatch"),
        ({"rp_id": "evil.example"}, "webauthn_rp_id_mismatch"),
        ({"flags": FLAGS.UP}, "webauthn_user_verification_missing"),
        ({"flags": FLAGS.UV}, "webauthn_user_presence_missing"),
    ],
)
async def test_refuses_an_assertion_made_in_the_wrong_context(
    enrolled: tuple[Harness, SoftAuthenticator], get: dict[str, Any], code: str
) -> None:
    h, a = enrolled
    header = await assertion_for(h, a, attrs(), **get)
    refused = await h.challenge(principal(), attrs(assertion=header))
    assert refused.code == code
    assert h.metric(code) == 1


async def test_accepts_a_missing_uv_flag_when_verification_is_only_preferred() -> None:
    h = Harness(user_verification="preferred")
    try:
        a = SoftAuthenticator()
        assert await h.register(a, flags=FLAGS.UP) == 201
        header = await assertion_for(h, a, attrs(), flags=FLAGS.UP)
        await h.service.check_step_up(principal(), attrs(assertion=header))
    finally:
        await h.service.close()


def _tamper(credential: dict[str, Any], part: str) -> dict[str, Any]:
    response = dict(credential["response"])
    if part == "authenticatorData":
        data = bytearray(unb64u(response["authenticatorData"]))
        data[32] |= FLAGS.BE  # flip a flag bit the attacker would like: backup eligible
        response["authenticatorData"] = b64u(bytes(data))
    elif part == "clientDataJSON":
        document = json.loads(unb64u(response["clientDataJSON"]))
        document["extra"] = "tampered"
        response["clientDataJSON"] = b64u(json.dumps(document).encode())
    elif part == "signature":
        signature = bytearray(unb64u(response["signature"]))
        signature[-1] ^= 0x01
        response["signature"] = b64u(bytes(signature))
    return {**credential, "response": response}


@pytest.mark.parametrize("part", ["authenticatorData", "clientDataJSON", "signature"])
async def test_refuses_a_tampered_assertion(enrolled: tuple[Harness, SoftAuthenticator], part: str) -> None:
    h, a = enrolled
    refused = await h.challenge(principal(), attrs())
    assert refused.offer is not None
    credential = _tamper(a.get(refused.offer.challenge), part)
    refused = await h.challenge(principal(), attrs(assertion=encode_header(credential)))
    assert refused.code == "webauthn_signature_invalid"


@pytest.mark.parametrize(
    "header",
    ["!!!", b64u(b"not json"), b64u(b"[]"), b64u(b'{"response": {}}'), "A" * 20000,
     b64u(json.dumps({"id": "AA", "rawId": "AA", "type": "password", "response": {}}).encode())],
)
async def test_refuses_a_malformed_assertion(enrolled: tuple[Harness, SoftAuthenticator], header: str) -> None:
    h, _ = enrolled
    refused = await h.challenge(principal(), attrs(assertion=header))
    assert refused.code == "webauthn_assertion_malformed"


# A JSON number where the WebAuthn JSON has a base64url string: fido2 calls bytes() on it, which allocates
# that many zero bytes (a 9-character header member, 100 MB; 2**70 an OverflowError).
_HUGE = 10**8
_PEAK_BYTES = 16 << 20  # what one assertion or registration may allocate at most, with room


@pytest.mark.parametrize("value", [_HUGE, 2**70])
@pytest.mark.parametrize(
    "member", ["id", "rawId", "clientDataJSON", "authenticatorData", "signature", "userHandle"]
)
async def test_refuses_an_assertion_member_that_is_a_number_without_allocating_it(
    enrolled: tuple[Harness, SoftAuthenticator], member: str, value: int
) -> None:
    h, a = enrolled
    refused = await h.challenge(principal(), attrs())
    assert refused.offer is not None
    credential = a.get(refused.offer.challenge)
    if member in ("id", "rawId"):
        credential[member] = value
    else:
        credential["response"][member] = value
    header = encode_header(credential)
    tracemalloc.start()
    try:
        refused = await h.challenge(principal(), attrs(assertion=header))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.code == "webauthn_assertion_malformed"
    assert peak < _PEAK_BYTES, peak


@pytest.mark.parametrize("value", [_HUGE, 2**70])
@pytest.mark.parametrize("member", ["id", "rawId", "clientDataJSON", "attestationObject"])
async def test_refuses_a_registration_member_that_is_a_number_without_allocating_it(
    harness: Harness, member: str, value: int
) -> None:
    state, credential = await _begin_and_create(harness, SoftAuthenticator())
    if member in ("id", "rawId"):
        credential[member] = value
    else:
        credential["response"][member] = value
    tracemalloc.start()
    try:
        status, _, body = await harness.call(
            "POST", "/v1/webauthn/register/complete", body={"state": state, "credential": credential}
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 400 and body["error"] == "webauthn_registration_invalid", body
    assert peak < _PEAK_BYTES, peak


# authenticatorData with the ED flag and its extensions CBOR cut short, or nested past Python's recursion
# limit: fido2 raises IndexError, struct.error or RecursionError (none a ValueError) while parsing it.
_BAD_EXTENSIONS = (b"\xa1", b"\x1b\x00", b"\xa1\x01", b"\x81" * 3000 + b"\x00")


@pytest.mark.parametrize("extensions", _BAD_EXTENSIONS)
async def test_refuses_an_assertion_whose_authenticator_data_cbor_is_cut_short_or_too_deep(
    enrolled: tuple[Harness, SoftAuthenticator], extensions: bytes
) -> None:
    h, a = enrolled
    refused = await h.challenge(principal(), attrs())
    assert refused.offer is not None
    credential = a.get(refused.offer.challenge)
    auth_data = unb64u(credential["response"]["authenticatorData"])[:37]
    auth_data = auth_data[:32] + bytes([auth_data[32] | FLAGS.ED]) + auth_data[33:] + extensions
    header = encode_header({**credential, "response": {**credential["response"], "authenticatorData": b64u(auth_data)}})
    refused = await h.challenge(principal(), attrs(assertion=header))
    assert refused.code == "webauthn_assertion_malformed"


@pytest.mark.parametrize("attestation", [b"\xa1", b"\x1b\x00", b"\xa3", b"\x81" * 3000 + b"\x00"])
async def test_refuses_a_registration_whose_attestation_cbor_is_cut_short_or_too_deep(
    harness: Harness, attestation: bytes
) -> None:
    state, credential = await _begin_and_create(harness, SoftAuthenticator())
    credential = {**credential, "response": {**credential["response"], "attestationObject": b64u(attestation)}}
    status, _, body = await harness.call(
        "POST", "/v1/webauthn/register/complete", body={"state": state, "credential": credential}
    )
    assert status == 400 and body["error"] == "webauthn_registration_invalid", body



def _reencoded(credential: Mapping[str, Any], **members: Any) -> dict[str, Any]:
    """The credential with members of its attestation object replaced (`authData`, `fmt`, `attStmt`)."""
    attestation = dict(cbor.decode(unb64u(credential["response"]["attestationObject"])))
    attestation.update(members)
    return {**credential, "response": {**credential["response"], "attestationObject": b64u(cbor.encode(attestation))}}


@pytest.mark.parametrize(
    "case",
    ["no attested credential (AT clear)", "fmt a byte string", "fmt a number", "fmt too long", "fmt with a quote"],
)
async def test_refuses_a_registration_whose_attestation_object_is_malformed_and_stores_nothing(
    harness: Harness, case: str
) -> None:
    """Found through the `webauthn_registration` fuzz target (its invariants, on mutations of its seeds):
    authenticator data without attested credential data hit python-fido2's `assert` (an AssertionError out of the
    route), and a `fmt` that is no text string was stored and then broke the 201's JSON (a TypeError out of the
    route, the credential stored all the same)."""
    state, credential = await _begin_and_create(harness, SoftAuthenticator())
    auth_data = cbor.decode(unb64u(credential["response"]["attestationObject"]))["authData"]
    without_at = auth_data[:32] + bytes([auth_data[32] & ~0x40]) + auth_data[33:37]  # rpIdHash, flags, counter
    members: dict[str, Any] = {
        "no attested credential (AT clear)": {"authData": without_at},
        "fmt a byte string": {"fmt": b"none"},
        "fmt a number": {"fmt": 5},
        "fmt too long": {"fmt": "x" * 33},
        "fmt with a quote": {"fmt": 'no"ne'},
    }[case]
    body = {"state": state, "credential": _reencoded(credential, **members)}
    status, _, answer = await harness.call("POST", "/v1/webauthn/register/complete", body=body)
    assert status == 400 and answer["error"] == "webauthn_registration_invalid", answer
    _, _, listed = await harness.call("GET", "/v1/webauthn/credentials")
    assert listed == {"credentials": []}


def _with_public_key(credential: Mapping[str, Any], cose: Mapping[int, Any]) -> dict[str, Any]:
    """The credential with the public key of its attested credential data replaced by `cose`."""
    auth_data = cbor.decode(unb64u(credential["response"]["attestationObject"]))["authData"]
    length = int.from_bytes(auth_data[53:55], "big")  # rpIdHash, flags, counter, aaguid, then the id's length
    return _reencoded(credential, authData=auth_data[: 55 + length] + cbor.encode(dict(cose)))


@pytest.mark.parametrize(
    "cose",
    [
        {1: 2, 3: -7},  # EC2 without its coordinates
        {1: 2, 3: -7, -1: 1, -2: b"\x01" * 32, -3: b"\x02" * 32},  # not a point on P-256
        {1: 1, 3: -8, -1: 6, -2: b"short"},  # an Ed25519 key of 5 bytes
        {1: 3, 3: -257, -1: "n", -2: b"\x01\x00\x01"},  # RSA with a text modulus
    ],
    ids=["EC2 without x and y", "EC2 off the curve", "Ed25519 too short", "RSA modulus not bytes"],
)
async def test_refuses_a_registration_whose_public_key_cannot_be_loaded(
    harness: Harness, cose: Mapping[int, Any]
) -> None:
    """Found through the `webauthn_registration` fuzz target (its invariants, on mutations of its seeds): with
    attestation `none` nothing loads the key at registration, so a key no signature can be checked against was
    stored, and each later step-up with it raised out of the assertion check (a KeyError is none of the errors it
    maps)."""
    state, credential = await _begin_and_create(harness, SoftAuthenticator())
    body = {"state": state, "credential": _with_public_key(credential, cose)}
    status, _, answer = await harness.call("POST", "/v1/webauthn/register/complete", body=body)
    assert status == 400 and answer["error"] == "webauthn_registration_invalid", answer
    _, _, listed = await harness.call("GET", "/v1/webauthn/credentials")
    assert listed == {"credentials": []}


@pytest.mark.parametrize("cose", [{1: 2, 3: -7}, {1: 3, 3: -257, -1: "n", -2: b"\x01\x00\x01"}], ids=["EC2", "RSA"])
async def test_a_stored_public_key_that_cannot_be_loaded_refuses_the_step_up_never_raises(
    harness: Harness, cose: Mapping[int, Any]
) -> None:
    """A credential registered before keys were loaded at registration: its assertions are refused as unverifiable."""
    a = SoftAuthenticator()
    assert await harness.register(a) == 201
    (stored,) = await harness.service.credentials(principal())
    await harness.service._store.delete(stored.issuer, stored.subject, stored.credential_id)
    await harness.service._store.add(dataclasses.replace(stored, public_key=bytes(cbor.encode(dict(cose)))))
    header = await assertion_for(harness, a, attrs())
    with pytest.raises(AssertionRefused) as refused:
        await harness.service.check_step_up(principal(), attrs(assertion=header))
    assert refused.value.code == "webauthn_signature_invalid"

async def test_refuses_a_counter_regression_and_audits_a_warning(
    enrolled: tuple[Harness, SoftAuthenticator], caplog: pytest.LogCaptureFixture
) -> None:
    h, a = enrolled
    await h.service.check_step_up(principal(), attrs(assertion=await assertion_for(h, a, attrs(), counter=5)))
    clone = await assertion_for(h, a, attrs(), counter=5)  # a cloned key replays the same counter
    with caplog.at_level(logging.INFO, logger="verifier.audit"):
        refused = await h.challenge(principal(), attrs(assertion=clone))
    assert refused.code == "webauthn_counter_regression"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].getMessage() == "webauthn_counter_regression"
    assert warnings[0].credential == a.id and warnings[0].counter == 5 and warnings[0].stored_counter == 5  # type: ignore[attr-defined]
    lower = await assertion_for(h, a, attrs(), counter=3)
    assert (await h.challenge(principal(), attrs(assertion=lower))).code == "webauthn_counter_regression"
    higher = await assertion_for(h, a, attrs(), counter=6)
    await h.service.check_step_up(principal(), attrs(assertion=higher))


async def test_accepts_an_authenticator_that_keeps_no_counter(harness: Harness) -> None:
    a = SoftAuthenticator(counter=0, step=0)  # passkeys synced across devices report 0 forever
    assert await harness.register(a) == 201
    for _ in range(2):
        header = await assertion_for(harness, a, attrs())
        await harness.service.check_step_up(principal(), attrs(assertion=header))


async def test_disabled_credentials_are_refused_and_not_offered(
    enrolled: tuple[Harness, SoftAuthenticator],
) -> None:
    h, a = enrolled
    header = await assertion_for(h, a, attrs())
    assert await h.service.disable_credentials(ISSUER, "alice", [a.id, "!!"]) == 1
    refused = await h.challenge(principal(), attrs(assertion=header))
    assert refused.code == "webauthn_credential_disabled"
    assert refused.offer is not None and refused.offer.public_key["allowCredentials"] == []
    _, _, listed = await h.call("GET", "/v1/webauthn/credentials")
    assert listed["credentials"][0]["disabled"] is True


async def test_a_credential_id_named_in_standard_base64_disables_that_credential(harness: Harness) -> None:
    """A transmitter may name a credential in standard base64 (RFC 4648 section 4: `+`, `/`, padded), as providers
    that store the ids so do: the same bytes in the other alphabet. Read as no id at all, the reported key stayed
    enabled (and passed every step-up) while the credential-change was acknowledged."""
    a = SoftAuthenticator()
    a.credential_id = b"\xfb\xff\xbf" + os.urandom(14)  # `+/+/` in standard base64, `-_-_` in base64url
    assert await harness.register(a) == 201
    standard = base64.b64encode(a.credential_id).decode()
    assert "+" in standard and "/" in standard and standard.endswith("=")
    assert await harness.service.disable_credentials(ISSUER, "alice", [standard]) == 1
    _, _, listed = await harness.call("GET", "/v1/webauthn/credentials")
    assert listed["credentials"][0]["disabled"] is True


async def test_a_credential_change_naming_only_ids_that_read_as_none_disables_every_key_of_the_user(
    harness: Harness,
) -> None:
    """A credential-change naming ids none of which reads as a credential id (`fido2:...`, `%%%`): which key changed
    cannot be told, and disabling none left the reported key passing every step-up. All the user's keys are
    disabled (as an authenticator model no key has); another user's stay. One readable id keeps it to that id."""
    first = SoftAuthenticator()
    assert await harness.register(first) == 201
    assert await harness.register(SoftAuthenticator(), proof=first) == 201
    assert await harness.register(SoftAuthenticator(), user="bob") == 201
    assert await harness.service.disable_credentials(ISSUER, "alice", ["fido2:key-1", "%%%", ""]) == 2
    _, _, bobs = await harness.call("GET", "/v1/webauthn/credentials", user="bob")
    assert bobs["credentials"][0]["disabled"] is False
    assert await harness.service.disable_credentials(ISSUER, "bob", ["%%%", b64url(b"not-bobs-key")]) == 0


async def test_disable_all_credentials_of_a_subject(harness: Harness) -> None:
    first = SoftAuthenticator()
    assert await harness.register(first) == 201
    assert await harness.register(SoftAuthenticator(), proof=first) == 201
    assert await harness.register(SoftAuthenticator(), user="bob") == 201
    assert await harness.service.disable_credentials(ISSUER, "alice", None) == 2
    _, _, bobs = await harness.call("GET", "/v1/webauthn/credentials", user="bob")
    assert bobs["credentials"][0]["disabled"] is False


async def test_a_user_handle_of_another_user_is_refused(enrolled: tuple[Harness, SoftAuthenticator]) -> None:
    h, a = enrolled
    a.user_handle = user_handle(ISSUER, "bob")
    header = await assertion_for(h, a, attrs())
    assert (await h.challenge(principal(), attrs(assertion=header))).code == "webauthn_credential_unknown"


# --- the demo endpoints ------------------------------------------------------------------------------

async def test_serves_the_demo_page_with_a_strict_policy(harness: Harness) -> None:
    status, headers, page = await harness.call("GET", "/v1/webauthn/demo", user=None)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"navigator.credentials.get" in page
    csp = headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "unsafe-inline" not in csp.split("script-src", 1)[1].split(";")[0]


async def test_the_demo_protected_path_runs_the_step_up(enrolled: tuple[Harness, SoftAuthenticator]) -> None:
    h, a = enrolled
    status, headers, body = await h.call("POST", "/v1/webauthn/demo/protected/transfer")
    assert status == 401 and headers["www-authenticate"].startswith("WebAuthn ")
    assert headers["x-verifier-reason"] == "webauthn_assertion_required"
    header = encode_header(a.get(body["publicKey"]["challenge"]))
    status, _, body = await h.call("POST", "/v1/webauthn/demo/protected/transfer",
                                   headers={"x-webauthn-assertion": header})
    assert status == 200 and body == {"ok": True, "subject": "alice", "name": "transfer"}


async def test_the_registry_judges_its_requests_on_the_declared_origin_the_host_names_never_the_callers_headers(
) -> None:
    """Behind a TLS-terminating gateway the registry is reached in plain http with the public `Host`: with
    `dpop.origins` declared, the request its DPoP proof and step-up are judged on is on that origin (https, one
    spelling of its host whatever port or case the `Host` has); a `Host` naming no declared origin stays the
    caller's own http://<Host>, and X-Forwarded-Proto/-Host are never read."""
    h = Harness(origins=PublicOrigins.declared(["https://api.example.test"]))
    try:
        a = SoftAuthenticator()
        assert await h.register(a) == 201
        caller = {"x-forwarded-proto": "http", "x-forwarded-host": "evil.example"}
        judged = []
        for host in ("api.example.test", "API.example.test.:443", "evil.example", "api.example.test:8443"):
            await h.call("GET", "/v1/webauthn/credentials", headers={"host": host, **caller})
            judged.append((h.judged[-1].method, h.judged[-1].scheme, h.judged[-1].host, h.judged[-1].path))
        path = "/v1/webauthn/credentials"
        assert judged == [
            ("GET", "https", "api.example.test", path),
            ("GET", "https", "api.example.test", path),
            ("GET", "http", "evil.example", path),
            ("GET", "http", "api.example.test:8443", path),
        ]
        # A step-up challenge given on one spelling of the public host is good on another: the same request.
        route = "/v1/webauthn/demo/protected/transfer"
        status, _, body = await h.call("POST", route, headers={"host": "api.example.test:443"})
        assert status == 401
        header = encode_header(a.get(body["publicKey"]["challenge"]))
        status, _, _ = await h.call("POST", route, headers={"host": "api.example.test", "x-webauthn-assertion": header})
        assert status == 200
    finally:
        await h.service.close()


async def test_the_demo_routes_are_off_unless_configured() -> None:
    """A production deployment served a test page (GET /v1/webauthn/demo) and its step-up echo unless the operator
    turned it off: `demo` now defaults to false, in the YAML and in code; `demo: true` turns it on."""
    assert parse_webauthn_config({"rp_id": "localhost", "origins": [ORIGIN]}).demo is False
    assert parse_webauthn_config({"rp_id": "localhost", "origins": [ORIGIN], "demo": True}).demo is True
    config = WebAuthnConfig(rp_id=RP_ID, origins=(ORIGIN,), secret=SECRET)
    assert config.demo is False
    h = Harness()
    await h.service.close()
    h.service = WebAuthnService(config, SqliteCredentialStore(":memory:"), h.state, h.clock,
                                WebAuthnMetrics(CollectorRegistry()))
    h.router = Router()
    add_webauthn_routes(h.router, h.service, h.authenticate)
    try:
        assert (await h.call("GET", "/v1/webauthn/demo", user=None))[0] == 404
        assert (await h.call("POST", "/v1/webauthn/demo/protected/transfer"))[0] == 404
        assert (await h.call("GET", "/v1/webauthn/credentials"))[0] == 200
    finally:
        await h.service.close()


async def test_no_demo_routes_when_disabled() -> None:
    h = Harness(demo=False)
    try:
        assert (await h.call("GET", "/v1/webauthn/demo"))[0] == 404
    finally:
        await h.service.close()


async def test_sqlite_store_survives_a_restart(tmp_path: Any) -> None:
    path = str(tmp_path / "webauthn.sqlite3")
    clock = FrozenClock()
    config = WebAuthnConfig(rp_id=RP_ID, origins=(ORIGIN,), secret=SECRET)
    metrics = WebAuthnMetrics(CollectorRegistry())
    first = WebAuthnService(config, SqliteCredentialStore(path), MemoryState(clock), clock, metrics)
    h = Harness()
    h.service = first
    h.router = Router()
    add_webauthn_routes(h.router, first, h.authenticate)
    a = SoftAuthenticator()
    assert await h.register(a) == 201
    await first.close()
    second = SqliteCredentialStore(path)
    try:
        stored = await second.for_user(ISSUER, "alice")
        assert [c.credential_id for c in stored] == [a.credential_id]
    finally:
        await second.close()


async def test_sqlite_store_file_is_private_to_the_verifier_user(tmp_path: Any) -> None:
    """Who enrolled which authenticator is no other local user's business: the file is 0600 whatever the umask."""
    store = made_under_umask_022(lambda: SqliteCredentialStore(str(tmp_path / "webauthn.sqlite3")))
    try:
        modes = file_modes(tmp_path)
        assert "webauthn.sqlite3" in modes and modes == dict.fromkeys(modes, 0o600)
    finally:
        await store.close()


@pytest.mark.parametrize("origin", [[ORIGIN], {"origin": ORIGIN}, 5])
async def test_refuses_a_client_data_origin_that_is_not_a_string(
    enrolled: tuple[Harness, SoftAuthenticator], origin: Any
) -> None:
    # clientDataJSON is the client's: a list or object origin must be refused, not crash the check
    # (it was a TypeError, unhashable, in the allowed-origins lookup: an internal error, not a 401).
    h, a = enrolled
    refused = await h.challenge(principal(), attrs())
    assert refused.offer is not None
    credential = a.get(refused.offer.challenge)
    response = dict(credential["response"])
    document = json.loads(unb64u(response["clientDataJSON"]))
    document["origin"] = origin
    response["clientDataJSON"] = b64u(json.dumps(document).encode())
    header = encode_header({**credential, "response": response})
    refused = await h.challenge(principal(), attrs(assertion=header))
    assert refused.code == "webauthn_assertion_malformed"


async def _fresh_assertion(h: Harness, a: SoftAuthenticator) -> dict[str, Any]:
    """The authenticator's assertion for a fresh challenge bound to `attrs()`, as the browser sends it."""
    refused = await h.challenge(principal(), attrs())
    assert refused.offer is not None
    return a.get(refused.offer.challenge)


def _client_data_members(credential: Mapping[str, Any]) -> str:
    """The members of a credential's clientDataJSON, without the braces (to write around them)."""
    return json.dumps(json.loads(unb64u(credential["response"]["clientDataJSON"])))[1:-1]


def _signed_with_client_data(a: SoftAuthenticator, credential: dict[str, Any], client_data: bytes) -> dict[str, Any]:
    """`credential` with `client_data` as its clientDataJSON, byte for byte, signed again by the authenticator."""
    response = dict(credential["response"])
    auth_data = unb64u(response["authenticatorData"])
    signature = a.key.sign(auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256()))
    response.update(clientDataJSON=b64u(client_data), signature=b64u(signature))
    return {**credential, "response": response}


async def test_refuses_a_signed_registration_client_data_json_offered_as_an_assertion(
    enrolled: tuple[Harness, SoftAuthenticator],
) -> None:
    """Section 7.2 step 11: clientDataJSON of a `webauthn.create` ceremony, over one of our own step-up challenges and
    signed by the user's own key (a page that asked the authenticator to register), is no assertion; and a
    registration's own clientDataJSON (its challenge the registration state's, not ours) is not one either."""
    h, a = enrolled
    credential = await _fresh_assertion(h, a)
    created = _client_data_members(credential).replace('"webauthn.get"', '"webauthn.create"')
    header = encode_header(_signed_with_client_data(a, credential, ("{" + created + "}").encode()))
    refused = await h.challenge(principal(), attrs(assertion=header))
    assert refused.code == "webauthn_client_data_invalid"
    _, _, begun = await h.call("POST", "/v1/webauthn/register/begin", user="carol", body={})
    registration = SoftAuthenticator().create(begun["publicKey"])["response"]["clientDataJSON"]
    as_get = json.loads(unb64u(registration)) | {"type": "webauthn.get"}
    header = encode_header(_signed_with_client_data(a, credential, json.dumps(as_get).encode()))
    refused = await h.challenge(principal(), attrs(assertion=header))
    assert refused.code == "webauthn_challenge_invalid"
    # the user's own assertion, presented with a token of the same `sub` from another issuer
    header = encode_header(credential)
    refused = await h.challenge(principal(issuer="https://other.example.test"), attrs(assertion=header))
    assert refused.code == "webauthn_challenge_mismatch"
    await h.service.check_step_up(principal(), attrs(assertion=header))  # unused till now


BOGUS_CHALLENGE = b64u(b"c" * 32)
# clientDataJSON members -> clientDataJSON as a browser would never write it; fido2's json.loads reads the last member
CLIENT_DATA_READ_TWO_WAYS = {
    "challenge-twice": lambda members: f'{{"challenge": "{BOGUS_CHALLENGE}", {members}}}',
    "origin-twice": lambda members: f'{{"origin": "https://evil.example", {members}}}',
    "type-twice": lambda members: f'{{"type": "webauthn.create", {members}}}',
    "nan": lambda members: f'{{{members}, "x": NaN}}',
    "lone-surrogate": lambda members: f'{{{members}, "x": "\\ud800"}}',  # no Unicode text (I-JSON, RFC 7493)
}


@pytest.mark.parametrize("written", CLIENT_DATA_READ_TWO_WAYS.values(), ids=CLIENT_DATA_READ_TWO_WAYS.keys())
async def test_refuses_a_signed_client_data_json_that_reads_two_ways(
    enrolled: tuple[Harness, SoftAuthenticator], written: Any
) -> None:
    """RFC 8259 (section 5.8.1 clientDataJSON is JSON): two challenges or two origins, the real one last and signed
    by the user's own authenticator, are webauthn_assertion_malformed, not one reading here and another elsewhere."""
    h, a = enrolled
    credential = await _fresh_assertion(h, a)
    members = _client_data_members(credential)
    header = encode_header(_signed_with_client_data(a, credential, written(members).encode()))
    refused = await h.challenge(principal(), attrs(assertion=header))
    assert refused.code == "webauthn_assertion_malformed"
    assert "clientDataJSON" in str(refused)


async def test_accepts_a_client_data_json_signed_again_as_written(enrolled: tuple[Harness, SoftAuthenticator]) -> None:
    """The re-signing above makes a valid assertion: each refusal there is for the JSON alone."""
    h, a = enrolled
    credential = await _fresh_assertion(h, a)
    members = _client_data_members(credential)
    header = encode_header(_signed_with_client_data(a, credential, f"{{{members}}}".encode()))
    await h.service.check_step_up(principal(), attrs(assertion=header))


@pytest.mark.parametrize("written", ["bom", "repeated-member", "utf-16"])
async def test_refuses_an_assertion_header_that_reads_two_ways(
    enrolled: tuple[Harness, SoftAuthenticator], written: str
) -> None:
    """The header's own JSON (PublicKeyCredential.toJSON()) is the client's too: read one way or malformed."""
    h, a = enrolled
    text = json.dumps(await _fresh_assertion(h, a))
    raw = {
        "bom": b"\xef\xbb\xbf" + text.encode(),
        "repeated-member": ('{"type": "public-key", ' + text[1:]).encode(),
        "utf-16": text.encode("utf-16"),
    }[written]
    refused = await h.challenge(principal(), attrs(assertion=b64u(raw)))
    assert refused.code == "webauthn_assertion_malformed"


async def test_refuses_a_registration_whose_client_data_json_names_two_challenges(harness: Harness) -> None:
    """Attestation `none` signs nothing over clientDataJSON: a registration naming a foreign challenge first and the
    state's last (fido2 reads the last) is 400 webauthn_registration_invalid, not registered."""
    a = SoftAuthenticator()
    status, _, begun = await harness.call("POST", "/v1/webauthn/register/begin", body={})
    assert status == 200
    credential = a.create(begun["publicKey"])
    client_data = f'{{"challenge": "{BOGUS_CHALLENGE}", {_client_data_members(credential)}}}'.encode()
    credential["response"] = {**credential["response"], "clientDataJSON": b64u(client_data)}
    status, _, body = await harness.call(
        "POST",
        "/v1/webauthn/register/complete",
        body={"state": begun["state"], "credential": credential, "name": "key"},
    )
    assert (status, body["error"]) == (400, "webauthn_registration_invalid"), body


# --- re-enrollment after a revocation -------------------------------------------------------------------
#
# The user's key is reported compromised and disabled (a CAEP credential-change); the thief also holds an access
# token of the user from before, unexpired and unrevoked. Without a usable key there is no assertion to ask for:
# what stands between that token and the thief's own key is a login after the disable (RFC 9470 step-up).

LEEWAY = 30  # the harness's issuers' clock skew allowance (`leeway_seconds`)


def _leeway_harness(**config: Any) -> Harness:
    return Harness(leeway_seconds=LEEWAY, **config)


@pytest.fixture
async def revoked() -> Any:
    """Alice enrolled a key at T-100 (logged in at T-200), the key was disabled at T; the clock is then at T+60."""
    h = _leeway_harness()
    h.clock.advance(-100)
    key = SoftAuthenticator()
    assert await h.register(key, user=f"alice;auth_time={h.clock.now() - 100}") == 201
    h.clock.advance(100)
    h.disabled_at = h.clock.now()  # type: ignore[attr-defined]
    assert await h.service.disable_credentials(ISSUER, "alice", None) == 1
    h.clock.advance(60)
    yield h, key
    await h.service.close()


def _step_up_challenge(headers: Mapping[str, str], body: Any) -> None:
    """RFC 9470 section 3: a Bearer challenge naming insufficient_user_authentication and max_age=0."""
    challenge = headers["www-authenticate"]
    assert challenge.startswith("Bearer "), challenge
    assert 'error="insufficient_user_authentication"' in challenge and "max_age=0" in challenge, challenge
    assert headers["x-verifier-reason"] == "insufficient_user_authentication"
    assert body["error"] == "insufficient_user_authentication" and body["max_age"] == 0, body


async def test_after_a_revocation_a_token_from_before_cannot_begin_a_registration(revoked: Any) -> None:
    h, _ = revoked
    t = h.disabled_at
    for token in (f"alice;auth_time={t - 200};iat={t - 5}",  # stolen before the disable (iat as well)
                  f"alice;auth_time={t - 200};iat={t + 50}",  # refreshed since: auth_time decides, not iat
                  f"alice;iat={t - 5}",  # no auth_time: iat, before
                  "alice;iat=nan"):  # no time at all: refused
        status, headers, body = await h.call("POST", "/v1/webauthn/register/begin", user=token, body={})
        assert status == 401, (token, body)
        _step_up_challenge(headers, body)
    thief = SoftAuthenticator()
    assert await h.register(thief, user=f"alice;auth_time={t - 200}") == 401
    _, _, listed = await h.call("GET", "/v1/webauthn/credentials")
    assert [c["disabled"] for c in listed["credentials"]] == [True]  # nothing enrolled


async def test_after_a_revocation_a_login_after_the_disable_enrolls_again(revoked: Any) -> None:
    h, old = revoked
    t = h.disabled_at
    status, _, _ = await h.call("POST", "/v1/webauthn/register/begin", user=f"alice;auth_time={t + LEEWAY + 1}",
                                body={})
    assert status == 200
    assert await h.register(SoftAuthenticator(), user=f"alice;auth_time={t + LEEWAY + 1}") == 201
    _, _, listed = await h.call("GET", "/v1/webauthn/credentials")
    assert [(c["id"] == old.id, c["disabled"]) for c in listed["credentials"]] == [(True, True), (False, False)]


async def test_after_a_revocation_an_iat_after_the_disable_stands_in_for_auth_time(revoked: Any) -> None:
    h, _ = revoked
    assert await h.register(SoftAuthenticator(), user=f"alice;iat={h.disabled_at + LEEWAY + 1}") == 201


async def test_after_a_revocation_a_login_within_the_leeway_of_the_disable_is_not_after_it(revoked: Any) -> None:
    """The provider's clock may run ahead of ours by the leeway: a login stamped that close after the disable may
    have happened before it, and is refused (erring on the side of a second login)."""
    h, _ = revoked
    t = h.disabled_at
    for auth_time in (t, t + 1, t + LEEWAY):
        status, headers, body = await h.call("POST", "/v1/webauthn/register/begin",
                                             user=f"alice;auth_time={auth_time}", body={})
        assert status == 401, auth_time
        _step_up_challenge(headers, body)
    status, _, _ = await h.call("POST", "/v1/webauthn/register/begin", user=f"alice;auth_time={t + LEEWAY + 1}",
                                body={})
    assert status == 200


async def test_after_a_revocation_the_most_recent_disable_counts(revoked: Any) -> None:
    """Two keys disabled at different times: a login between the two disables is before the last one."""
    h, _ = revoked
    t = h.disabled_at
    fresh = f"alice;auth_time={t + LEEWAY + 1}"
    assert await h.register(SoftAuthenticator(), user=fresh) == 201
    h.clock.advance(600)
    assert await h.service.disable_credentials(ISSUER, "alice", None) == 1
    status, headers, body = await h.call("POST", "/v1/webauthn/register/begin", user=fresh, body={})
    assert status == 401
    _step_up_challenge(headers, body)
    later = f"alice;auth_time={h.clock.now() + LEEWAY + 1}"
    assert (await h.call("POST", "/v1/webauthn/register/begin", user=later, body={}))[0] == 200


async def test_after_a_revocation_a_user_with_an_enabled_key_still_needs_an_assertion(revoked: Any) -> None:
    h, _ = revoked
    t = h.disabled_at
    fresh = f"alice;auth_time={t + LEEWAY + 1}"
    new = SoftAuthenticator()
    assert await h.register(new, user=fresh) == 201
    thief = SoftAuthenticator()
    # a fresh login is no assertion: with a usable key, the key decides
    status, headers, _ = await h.call("POST", "/v1/webauthn/register/begin", user=fresh, body={})
    assert status == 401 and headers["x-verifier-reason"] == "webauthn_assertion_required"
    assert headers["www-authenticate"].startswith("WebAuthn ")
    assert await h.register(thief, user=fresh) == 401
    assert await h.register(thief, user=fresh, proof=new) == 201
    status, headers, _ = await h.call("DELETE", f"/v1/webauthn/credentials/{new.id}", user=fresh)
    assert status == 401 and headers["x-verifier-reason"] == "webauthn_assertion_required"


@pytest.mark.parametrize(
    "times",
    [
        ";iat=nan",  # no login time at all (NaN is none)
        ";auth_time={day_ago}",  # an old login, whatever the token's age
        ";auth_time={day_ago};iat={now}",  # a token refreshed just now from a login of yesterday
        ";iat={hour_ago}",  # no auth_time: the token's own issue time, an hour old
        ";auth_time={now};iat={hour_ago}",  # a login after its token was issued is aged from the token
    ],
)
async def test_a_stolen_token_cannot_enroll_a_first_key_without_a_recent_login(times: str) -> None:
    """A user with no credential has no assertion to ask for: a stolen token alone would enroll the thief's key as
    the user's first, and pass every step-up after that. The first enrollment needs a login at most
    `first_enrollment_max_auth_age_seconds` old (default 300): its `auth_time`, else its `iat` (never later than
    `iat`), answered 401 `insufficient_user_authentication` with max_age otherwise (RFC 9470 section 3)."""
    h = _leeway_harness()
    try:
        now = h.clock.now()
        token = "bob" + times.format(now=now, day_ago=now - 86400, hour_ago=now - 3600)
        status, headers, body = await h.call("POST", "/v1/webauthn/register/begin", user=token, body={})
        assert (status, headers["x-verifier-reason"], body["max_age"]) == (401, "insufficient_user_authentication",
                                                                          300), body
        assert "max_age=300" in headers["www-authenticate"]
        assert await h.register(SoftAuthenticator(), user=token) == 401
        _, _, listed = await h.call("GET", "/v1/webauthn/credentials", user="bob")
        assert listed == {"credentials": []}
        for fresh in (f"bob;auth_time={now - 299}", f"bob;iat={now - 10}", f"bob;auth_time={now - 60};iat={now}"):
            assert (await h.call("POST", "/v1/webauthn/register/begin", user=fresh, body={}))[0] == 200, fresh
        assert await h.register(SoftAuthenticator(), user=f"bob;auth_time={now}") == 201
    finally:
        await h.service.close()


async def test_a_first_enrollment_needs_only_a_token_when_the_operator_turns_the_login_age_off() -> None:
    h = _leeway_harness(first_enrollment_max_auth_age_seconds=0)
    try:
        for token in ("bob;iat=nan", f"bob;auth_time={h.clock.now() - 86400}"):  # no times at all; an old login
            status, _, _ = await h.call("POST", "/v1/webauthn/register/begin", user=token, body={})
            assert status == 200
        assert await h.register(SoftAuthenticator(), user="bob") == 201
    finally:
        await h.service.close()


# --- replay keys outlive acceptance on every replica (clocks up to CLOCK_SKEW_SECONDS apart) -----------------


async def test_a_used_challenge_is_refused_by_a_replica_whose_clock_lags_until_it_expires_there() -> None:
    """Two replicas share the replay store (on its own clock), their clocks just under CLOCK_SKEW_SECONDS apart. The
    replica ahead takes an assertion; the one behind still sees its challenge unexpired for that much longer. Before,
    the challenge was remembered until a second past its expiry on the clock of the replica ahead (~28 s before
    the other stopped accepting it): the same assertion, replayed in that gap, passed a second step-up (an
    authenticator without a counter, as most passkeys are, shows no regression)."""
    h = Harness()
    try:
        a = SoftAuthenticator(step=0)  # a counter that stays 0: nothing but the challenge refuses a replay
        assert await h.register(a) == 201
        ahead = WebAuthnService(h.config, h.service._store, h.state, SkewedClock(h.clock, CLOCK_SKEW_SECONDS - 1),
                                WebAuthnMetrics(CollectorRegistry()))
        header = await assertion_for(h, a, attrs())  # issued by the replica behind: it expires 120 s from now there
        await ahead.check_step_up(principal(), attrs(assertion=header))
        h.clock.advance(h.config.challenge_timeout_seconds - (CLOCK_SKEW_SECONDS - 1) + 2)  # old key gone
        refused = await h.challenge(principal(), attrs(assertion=header))
        assert refused.code == "webauthn_challenge_replayed"
    finally:
        await h.service.close()


async def test_after_a_revocation_deleting_needs_a_login_after_it_and_keeps_the_last_disabled_key() -> None:
    """A token of before cannot delete the disabled keys (which would leave a user with no credential, whom a token
    alone enrolls); a login after the disable deletes all but the last, the revocation's record."""
    h = _leeway_harness()
    try:
        first, second = SoftAuthenticator(), SoftAuthenticator()
        old = f"alice;auth_time={h.clock.now() - 10}"
        assert await h.register(first, user=old) == 201
        assert await h.register(second, user=old, proof=first) == 201
        t = h.clock.now()
        assert await h.service.disable_credentials(ISSUER, "alice", None) == 2
        h.clock.advance(120)
        for cid in (first.id, second.id):
            status, headers, body = await h.call("DELETE", f"/v1/webauthn/credentials/{cid}", user=old)
            assert status == 401
            _step_up_challenge(headers, body)
        fresh = f"alice;auth_time={t + LEEWAY + 1}"
        assert (await h.call("DELETE", f"/v1/webauthn/credentials/{first.id}", user=fresh))[0] == 204
        status, headers, body = await h.call("DELETE", f"/v1/webauthn/credentials/{second.id}", user=fresh)
        assert status == 409 and body["error"] == "webauthn_revoked_credential_kept", body
        assert await h.register(SoftAuthenticator(), user=old) == 401  # the record stands
        # the user enrolls a new key with the fresh login, then removes the old one with an assertion from it
        new = SoftAuthenticator()
        assert await h.register(new, user=fresh) == 201
        status, _, challenged = await h.call("DELETE", f"/v1/webauthn/credentials/{second.id}", user=fresh)
        assert status == 401
        proof = encode_header(new.get(challenged["publicKey"]["challenge"]))
        status, _, _ = await h.call("DELETE", f"/v1/webauthn/credentials/{second.id}", user=fresh,
                                    headers={"x-webauthn-assertion": proof})
        assert status == 204
    finally:
        await h.service.close()


async def test_after_a_revocation_a_replica_sharing_the_store_refuses_the_token_of_before(tmp_path: Any) -> None:
    """Two replicas share the credential file: the one that did not receive the event (nor any revocation entry)
    reads the disable time from the store and refuses the stolen token all the same."""
    path = str(tmp_path / "webauthn.sqlite3")
    clock = FrozenClock()
    config = WebAuthnConfig(rp_id=RP_ID, origins=(ORIGIN,), secret=SECRET)
    replicas = []
    for _ in range(2):
        h = Harness()
        h.clock = clock
        h.service = WebAuthnService(config, SqliteCredentialStore(path), MemoryState(clock), clock,
                                    WebAuthnMetrics(CollectorRegistry()), leeway_seconds=LEEWAY)
        h.router = Router()
        add_webauthn_routes(h.router, h.service, h.authenticate)
        replicas.append(h)
    a, b = replicas
    try:
        stolen = f"alice;auth_time={clock.now() - 60}"
        assert await a.register(SoftAuthenticator(), user=stolen) == 201
        t = clock.now()
        assert await a.service.disable_credentials(ISSUER, "alice", None) == 1  # the event reached replica a
        clock.advance(300)
        for h in (a, b):
            status, headers, body = await h.call("POST", "/v1/webauthn/register/begin", user=stolen, body={})
            assert status == 401
            _step_up_challenge(headers, body)
        assert await b.register(SoftAuthenticator(), user=f"alice;auth_time={t + LEEWAY + 1}") == 201
    finally:
        for h in replicas:
            await h.service.close()


async def test_sqlite_store_from_before_disable_times_is_upgraded_on_open(tmp_path: Any) -> None:
    """A file written before `disabled_at`: the column is added, and a credential disabled then counts as disabled
    when the file was opened (its time is unknown: a token must show a login after the upgrade)."""
    import sqlite3

    path = str(tmp_path / "webauthn.sqlite3")
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE webauthn_credentials (
            credential_id BLOB PRIMARY KEY, issuer TEXT NOT NULL, subject TEXT NOT NULL, public_key BLOB NOT NULL,
            sign_count INTEGER NOT NULL, aaguid BLOB NOT NULL, transports TEXT NOT NULL DEFAULT '',
            name TEXT NOT NULL DEFAULT '', attestation_format TEXT NOT NULL DEFAULT 'none',
            user_verified INTEGER NOT NULL DEFAULT 0, backup_eligible INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL, last_used_at REAL, disabled INTEGER NOT NULL DEFAULT 0);
        CREATE INDEX webauthn_credentials_user ON webauthn_credentials (issuer, subject);
    """)
    db.execute("INSERT INTO webauthn_credentials (credential_id, issuer, subject, public_key, sign_count, aaguid, "
               "created_at, disabled) VALUES (x'01', ?, 'alice', x'00', 0, x'00', 1.0, 1)", (ISSUER,))
    db.execute("INSERT INTO webauthn_credentials (credential_id, issuer, subject, public_key, sign_count, aaguid, "
               "created_at, disabled) VALUES (x'02', ?, 'bob', x'00', 0, x'00', 1.0, 0)", (ISSUER,))
    db.commit()
    db.close()
    store = SqliteCredentialStore(path, now=lambda: 1234.0)
    try:
        (alices,) = await store.for_user(ISSUER, "alice")
        (bobs,) = await store.for_user(ISSUER, "bob")
        assert alices.disabled and alices.disabled_at == 1234.0
        assert not bobs.disabled and bobs.disabled_at is None
        assert await store.disable(ISSUER, "bob", None, at=2000.0) == 1
    finally:
        await store.close()
    again = SqliteCredentialStore(path, now=lambda: 9999.0)  # already upgraded: nothing changes
    try:
        assert [c.disabled_at for c in await again.for_user(ISSUER, "alice")] == [1234.0]
        assert [c.disabled_at for c in await again.for_user(ISSUER, "bob")] == [2000.0]
    finally:
        await again.close()


async def test_workers_opening_a_new_registry_together_wait_for_the_one_making_it(tmp_path: Any) -> None:
    """The workers of `verifier serve --workers N` open the registry together at start-up; a journal-mode change
    meeting the lock of the worker making the file was refused at once ("database is locked", whatever the busy
    timeout), and that worker's start-up failed. Each waits instead (`private_files.OPEN_SECONDS`)."""
    path = tmp_path / "webauthn.sqlite3"
    stores = opened_together(path, lambda: SqliteCredentialStore(str(path)))
    try:
        assert await stores[0].disable(ISSUER, "alice", None, at=1.0) == 0
        for store in stores:
            assert await store.for_user(ISSUER, "alice") == []
    finally:
        for store in stores:
            await store.close()


def test_a_registry_still_locked_after_the_start_up_wait_fails_start_up(tmp_path: Any, monkeypatch: Any) -> None:
    """Fail closed, and said as the other stores say it (it was a bare sqlite3.OperationalError)."""
    import sqlite3

    monkeypatch.setattr(private_files, "OPEN_SECONDS", 0.2)
    path = str(tmp_path / "webauthn.sqlite3")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StateUnavailable, match=r"credential store .* unusable: database is locked, still after"):
            SqliteCredentialStore(path)
    finally:
        holder.close()


async def test_a_used_registration_state_is_refused_until_it_expires_on_every_replica() -> None:
    """A registration begun on a replica whose clock runs ahead carries an `exp` that far ahead; completed on another,
    its state was remembered `challenge_timeout_seconds` + 1 there and forgotten while still unexpired: the replay
    reached the credential store (here refused only as a duplicate; after the user removed the key, it registered
    the key again). Now it is remembered until no replica accepts it."""
    h = Harness()
    try:
        ahead = WebAuthnService(h.config, h.service._store, h.state, SkewedClock(h.clock, CLOCK_SKEW_SECONDS - 1),
                                WebAuthnMetrics(CollectorRegistry()))
        alice = principal()._replace(claims={**principal().claims, "iat": h.clock.now()})  # a token issued just now
        begun = await ahead.begin_registration(alice, {}, attrs())
        document = {"state": begun["state"], "credential": SoftAuthenticator().create(begun["publicKey"]), "name": "k"}
        await h.service.complete_registration(principal(), document)
        h.clock.advance(h.config.challenge_timeout_seconds + 2)  # past the old key, the state still unexpired here
        with pytest.raises(RegistrationRefused) as caught:
            await h.service.complete_registration(principal(), document)
        assert caught.value.code == "webauthn_state_replayed"
    finally:
        await h.service.close()


@pytest.mark.parametrize("text", ["%%%", "a%bc", "ab cd", "ab\ncd", "fido2:key-1", "a", "abc=d"])
def test_base64url_with_a_character_outside_its_alphabet_is_refused_not_dropped(text: str) -> None:
    """`urlsafe_b64decode` drops what is not in the alphabet: `%%%` read as no bytes, `a%bc` as `abc`; an id, a state
    or an assertion header so spelled was read as another value instead of refused."""
    from verifier.webauthn.challenge import b64url_decode

    with pytest.raises(ValueError, match="not base64url"):
        b64url_decode(text)
