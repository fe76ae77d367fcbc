"""The WebAuthn service: request-bound step-up for the pipeline, and the credential registry.

Built once by the composition root. The pipeline calls `check_step_up` for a route whose policy says
`require: {step_up: webauthn}`; `verifier.doors.webauthn_http` serves the registry's endpoints over
HTTP (`begin_registration`, `complete_registration`, `credentials`, `delete_credential`): the methods
return values or raise catalogued errors, never answers.

A user with no credential at all has no assertion to give: a first enrollment needs a token proving a recent
login instead, its `auth_time` (without one, its `iat`; never later than its `iat`) at most
`first_enrollment_max_auth_age_seconds` old, else 401 `insufficient_user_authentication` with an RFC 9470
challenge carrying that `max_age` (0 turns it off: a token alone enrolls a first credential). Otherwise a token
stolen from a user who never enrolled would enroll the thief's key, and pass every step-up after that. Once the
user has a
usable (enabled) credential, beginning another registration and deleting a credential need a step-up
assertion from an enrolled credential too (the 401 carries the challenge): otherwise whoever stole the
token could enroll their own key, or delete the user's keys and then enroll, and pass every step-up after
that. A credential disabled by a revocation event (`disable_credentials`: a CAEP credential-change) no
longer counts and cannot assert, and its disable time is stored with it. A user whose credentials are
all disabled enrolls again, or deletes one of them, only with a token proving an authentication after
the most recent disable: its `auth_time` (without one, its `iat`) later than that time plus the largest
configured issuer leeway (`leeway_seconds`: the provider's clock may run ahead of ours by that much, so
an authentication just before the disable must not pass for one after). Any other token is refused 401
`insufficient_user_authentication` with an RFC 9470 challenge carrying `max_age=0`: the client logs the
user in again at the provider. Otherwise a token stolen before the revocation (still unexpired: only the
key was reported) would enroll the thief's key the moment the user's was disabled. And the last of those
disabled credentials is not deleted (409 `webauthn_revoked_credential_kept`): it is the record of the
revocation, without which the user would be back to a first enrollment a token alone may make; the user
enrolls a new credential first, then deletes the old ones with an assertion from it.

Credentials belong to users, (issuer, `sub`): a client-credentials token (no `sub`) is refused on
every endpoint and step-up with 403 `webauthn_user_required`, whatever its `client_id`. Callers are
authenticated by `Pipeline.authenticate`, which runs the forward-auth checks (revocation, certificate
and DPoP binding, `introspect_jwts`); a CAEP credential-change disables credentials through
`disable_credentials`, wired by the composition root.

Audit: one INFO line on logger `verifier.audit` per accepted assertion (credential id, counter) and per
registration; a counter regression (a cloned authenticator) is a WARNING.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from verifier.clock import Clock
from verifier.config.issuer import MAX_LEEWAY_SECONDS
from verifier.config.webauthn import CLOCK_SKEW_SECONDS, WebAuthnConfig
from verifier.errors import Forbidden, NotFound
from verifier.numbers import json_number
from verifier.observe import traceparent
from verifier.observe.audit import trace_fields
from verifier.observe.metrics import WebAuthnMetrics
from verifier.policy.rules import StepUpRequired
from verifier.principal import Principal
from verifier.request import RequestAttributes
from verifier.state.base import Purpose, SharedState
from verifier.webauthn.assertion import (
    ASSERTION_HEADER,
    AssertionVerifier,
    CounterRegression,
    binding,
    credential_id_text,
    user_handle,
)
from verifier.webauthn.challenge import ChallengeSigner, b64url, b64url_decode, subject_hash
from verifier.webauthn.errors import (
    AssertionRefused,
    CredentialExists,
    Offer,
    RegistrationRefused,
    RevokedCredentialKept,
)
from verifier.webauthn.registration import Registrar, parse_preferences
from verifier.webauthn.store import CredentialStore, DuplicateCredential, StoredCredential

audit_log = logging.getLogger("verifier.audit")
logger = logging.getLogger(__name__)

_MISSING = "webauthn_assertion_required"
_USER_REQUIRED = "webauthn_user_required"  # a client-credentials token has no credentials to assert with


MAX_CREDENTIALS_PER_USER = 50  # registered credentials (disabled ones too) one user may have
_STANDARD_ALPHABET = str.maketrans("+/", "-_")  # RFC 4648 section 4's two characters, as section 5 spells them


class WebAuthnService:
    """Step-up assertions bound to the request, and the credential registry (see the module docstring)."""

    def __init__(
        self,
        config: WebAuthnConfig,
        store: CredentialStore,
        state: SharedState,
        clock: Clock,
        metrics: WebAuthnMetrics,
        *,
        realm: str = "verifier",
        trace_id: Callable[[Mapping[str, str]], str] = traceparent.trace_id,
        leeway_seconds: float = MAX_LEEWAY_SECONDS,
    ) -> None:
        """`leeway_seconds`: the clock skew allowed between the providers and us (the largest issuer leeway); an
        authentication must be this much later than a revocation to count as after it."""
        self._config = config
        self._leeway = leeway_seconds
        self._trace_id = trace_id  # the audit lines' trace: the current span's, else the gateway's traceparent
        self._store = store
        self._state = state
        self._clock = clock
        self.realm = realm  # the realm its refusals' challenges name
        self.demo = config.demo  # whether the demo page and its protected echo are served
        self._signer = ChallengeSigner(config.secret)
        self._assertions = AssertionVerifier(config, store, state, clock, self._signer)
        self._registrar = Registrar(config, self._signer)
        self._assertion_total = metrics.assertions
        self._registration_total = metrics.registrations
        if not config.secret_from_env:
            logger.warning(
                "webauthn: no shared secret in the environment; challenges are signed with a per-process key "
                "(set it on every replica behind one gateway)"
            )

    # --- step-up (the pipeline's side) ---------------------------------------------------------------

    async def check_step_up(self, principal: Principal, attrs: RequestAttributes) -> None:
        """Returns when the request carries a valid assertion bound to it; else raises `AssertionRefused`.

        The refusal always carries a fresh challenge for this subject, method, scheme, host and path.
        """
        require_user(principal)
        header = attrs.headers.get(ASSERTION_HEADER, "")
        try:
            if not header:
                raise AssertionRefused()
            verified = await self._assertions.verify(header, principal, attrs)
        except AssertionRefused as exc:
            self._assertion_total.labels(exc.code).inc()
            if isinstance(exc, CounterRegression):
                self._audit_regression(exc, attrs)
            elif exc.code != _MISSING:
                self._audit_assertion(logging.INFO, principal, attrs, "deny", exc.code, None, None)
            raise exc.replace(offer=await self.offer(principal, attrs)) from None
        self._assertion_total.labels("ok").inc()
        self._audit_assertion(
            logging.INFO, principal, attrs, "allow", "ok", credential_id_text(verified.credential), verified.sign_count
        )

    async def offer(self, principal: Principal, attrs: RequestAttributes) -> Offer:
        """A fresh challenge bound to this subject, method, scheme, host and path, with the subject's credentials."""
        raw = self._signer.issue(
            subject=subject_hash(principal.issuer, principal.subject),
            request=binding(attrs),
            expires_at=int(self._clock.now()) + self._config.challenge_timeout_seconds,
        )
        challenge = b64url(raw)
        credentials = [c for c in await self._store.for_user(principal.issuer, principal.subject) if not c.disabled]
        allow: list[dict[str, Any]] = []
        for c in credentials:
            descriptor: dict[str, Any] = {"type": "public-key", "id": credential_id_text(c)}
            if c.transports:
                descriptor["transports"] = list(c.transports)
            allow.append(descriptor)
        public_key = {
            "challenge": challenge,
            "rpId": self._config.rp_id,
            "timeout": self._config.timeout_ms,
            "userVerification": self._config.user_verification,
            "allowCredentials": allow,
        }
        return Offer(
            challenge=challenge, rp_id=self._config.rp_id, timeout_ms=self._config.timeout_ms, public_key=public_key
        )

    # --- revocation and lifecycle --------------------------------------------------------------------

    async def disable_credentials(
        self, issuer: str, subject: str, credential_ids: list[str] | None, *, aaguid: str = ""
    ) -> int:
        """Disables the user's listed credentials (base64url ids, or the same bytes in standard base64; None, or a
        list none of which reads as an id: all; all of one authenticator model when `aaguid`, 32 hex digits, is
        given). Returns how many changed."""
        ids: list[bytes] | None = None
        if credential_ids is None and aaguid:
            ids = [c.credential_id for c in await self._store.for_user(issuer, subject) if c.aaguid.hex() == aaguid]
        elif credential_ids is not None:
            ids = []
            for text in credential_ids:
                try:
                    # A transmitter may keep the ids in standard base64 (`+`, `/`): the alphabets differ in those
                    # two characters alone, so the id is the same bytes, never another credential's.
                    raw = b64url_decode(text.translate(_STANDARD_ALPHABET))
                except ValueError:
                    continue  # an id we never issued matches nothing
                if raw:  # "" names no credential
                    ids.append(raw)
            if not ids:
                # Named, and none readable as an id: which key changed cannot be told, so every key of the user is
                # disabled (as an authenticator model no key has widens to all): a reported key must not stay usable.
                ids = None
        count = await self._store.disable(issuer, subject, ids, at=self._clock.now())
        which: object = credential_ids if credential_ids is not None else (f"aaguid {aaguid}" if aaguid else "all")
        audit_log.info(
            "webauthn_credentials_disabled",
            extra={
                "event": "webauthn_credentials_disabled",
                "issuer": issuer,
                "subject": subject,
                "credentials": which,
                "count": count,
            },
        )
        return count

    async def close(self) -> None:
        """Closes the credential store."""
        await self._store.close()

    # --- the credential registry (served by verifier.doors.webauthn_http) ----------------------------

    async def _guard_enrolled(
        self, attrs: RequestAttributes, principal: Principal, existing: list[StoredCredential]
    ) -> None:
        """A user who has a usable credential proves it before changing the set; one whose credentials were all
        disabled, a login after that (see the module docstring)."""
        if any(not c.disabled for c in existing):
            await self.check_step_up(principal, attrs)
        elif existing:
            self._require_login_after_revocation(principal, existing)
        else:
            self._require_recent_login(principal)

    def _require_recent_login(self, principal: Principal) -> None:
        """A first enrollment: raises RFC 9470's `insufficient_user_authentication` (`max_age`) unless the token's
        `auth_time`, else its `iat`, and never later than its `iat`, is at most the configured age."""
        max_age = self._config.first_enrollment_max_auth_age_seconds
        if not max_age:
            return
        claims = principal.claims
        issued = json_number(claims.get("iat"))
        authenticated = json_number(claims.get("auth_time"))
        if authenticated is None or (issued is not None and issued < authenticated):
            authenticated = issued
        if authenticated is not None and authenticated + max_age > self._clock.now():
            return
        raise StepUpRequired("enrolling a first WebAuthn credential needs a recent login", max_age=max_age)

    def _require_login_after_revocation(self, principal: Principal, disabled: list[StoredCredential]) -> None:
        """Raises RFC 9470's `insufficient_user_authentication` (`max_age=0`) unless the token's `auth_time`, else
        its `iat`, is later than the most recent disable plus the leeway (a disable of unknown time: now)."""
        now = self._clock.now()
        revoked_at = max(now if c.disabled_at is None else c.disabled_at for c in disabled)
        claims = principal.claims
        authenticated = json_number(claims.get("auth_time"))
        if authenticated is None:
            authenticated = json_number(claims.get("iat"))
        if authenticated is not None and authenticated > revoked_at + self._leeway:
            return
        raise StepUpRequired(
            "the user's WebAuthn credentials were revoked: log in again to enroll or remove one", max_age=0
        )

    async def begin_registration(self, principal: Principal, document: Any, attrs: RequestAttributes) -> dict[str, Any]:
        """Creation options and the signed state for a new credential (`{"publicKey": ..., "state": ...}`)."""
        preferences, _name = parse_preferences(document)
        existing = await self._store.for_user(principal.issuer, principal.subject)
        await self._guard_enrolled(attrs, principal, existing)
        _check_room(existing)  # after the step-up: only the credentials' owner learns of the limit
        claims = principal.claims
        user_name = next(
            (v for v in (claims.get("preferred_username"), claims.get("email")) if isinstance(v, str) and v),
            principal.subject,
        )
        display = claims.get("name")
        options, state = self._registrar.begin(
            user_id=user_handle(principal.issuer, principal.subject),
            user_name=user_name,
            display_name=display if isinstance(display, str) and display else user_name,
            subject=subject_hash(principal.issuer, principal.subject),
            exclude=[c.credential_id for c in existing],
            preferences=preferences,
            now=self._clock.now(),
        )
        return {"publicKey": options, "state": state}

    async def complete_registration(self, principal: Principal, document: Any) -> StoredCredential:
        """Verifies and stores the credential; raises `RegistrationRefused` or `CredentialExists`."""
        if not isinstance(document, Mapping):
            raise RegistrationRefused("expected a JSON object with state and credential", code="invalid_request")
        name = parse_preferences({"name": document.get("name", "")})[1]
        now = self._clock.now()
        try:
            registered, challenge = self._registrar.complete(
                document.get("state"),
                document.get("credential"),
                subject=subject_hash(principal.issuer, principal.subject),
                now=now,
            )
            # The state is single-use too: a second complete with it is a replay. Its `exp` is
            # `challenge_timeout_seconds` past the clock of the replica that began it, which may run ahead of ours,
            # and a replica whose clock lags accepts it until its own clock reaches `exp`: clocks agreeing within
            # CLOCK_SKEW_SECONDS, no replica accepts it `challenge_timeout_seconds` + CLOCK_SKEW_SECONDS from now.
            ttl = float(self._config.challenge_timeout_seconds + CLOCK_SKEW_SECONDS + 1)
            if not await self._state.first_use("webauthn-register:" + challenge, ttl, purpose=Purpose.WEBAUTHN):
                raise RegistrationRefused("the registration state was already used", code="webauthn_state_replayed")
            # states begun below the limit (several in parallel) cannot complete past it
            _check_room(await self._store.for_user(principal.issuer, principal.subject))
        except RegistrationRefused as exc:
            self._registration_total.labels(exc.code).inc()
            raise
        stored = StoredCredential(
            credential_id=registered.credential_id,
            issuer=principal.issuer,
            subject=principal.subject,
            public_key=registered.public_key,
            sign_count=registered.sign_count,
            aaguid=registered.aaguid,
            transports=registered.transports,
            name=name,
            attestation_format=registered.attestation_format,
            user_verified=registered.user_verified,
            backup_eligible=registered.backup_eligible,
            created_at=now,
        )
        try:
            await self._store.add(stored)
        except DuplicateCredential:
            self._registration_total.labels(CredentialExists.code).inc()
            raise CredentialExists("this credential is already registered") from None
        self._registration_total.labels("ok").inc()
        audit_log.info(
            "webauthn_registered",
            extra={
                "event": "webauthn_registered",
                "issuer": principal.issuer,
                "subject": principal.subject,
                "credential": credential_id_text(stored),
                "counter": stored.sign_count,
                "aaguid": stored.aaguid.hex(),
                "attestation": stored.attestation_format,
            },
        )
        return stored

    async def credentials(self, principal: Principal) -> list[StoredCredential]:
        """The caller's credentials (disabled ones too)."""
        return await self._store.for_user(principal.issuer, principal.subject)

    async def delete_credential(self, principal: Principal, credential_id: str, attrs: RequestAttributes) -> None:
        """Removes one of the caller's credentials (id base64url); raises `NotFound` when there is none."""
        try:
            raw_id = b64url_decode(credential_id)
        except ValueError:
            raise NotFound() from None
        existing = await self._store.for_user(principal.issuer, principal.subject)
        if not any(c.credential_id == raw_id for c in existing):
            raise NotFound()
        await self._guard_enrolled(attrs, principal, existing)
        if len(existing) == 1 and existing[0].disabled:
            raise RevokedCredentialKept(
                "the last credential disabled by a revocation is kept: register a new credential first"
            )
        if not await self._store.delete(principal.issuer, principal.subject, raw_id):
            raise NotFound()
        audit_log.info(
            "webauthn_deleted",
            extra={
                "event": "webauthn_deleted",
                "issuer": principal.issuer,
                "subject": principal.subject,
                "credential": b64url(raw_id),
                **trace_fields(self._trace_id(attrs.headers)),
            },
        )

    # --- audit ---------------------------------------------------------------------------------------

    def _audit_assertion(
        self,
        level: int,
        principal: Principal,
        attrs: RequestAttributes,
        decision: str,
        reason: str,
        credential: str | None,
        counter: int | None,
    ) -> None:
        if not audit_log.isEnabledFor(level):
            return
        audit_log.log(
            level,
            "webauthn_assertion",
            extra={
                "event": "webauthn_assertion",
                "issuer": principal.issuer,
                "subject": principal.subject,
                "route": attrs.route,
                "decision": decision,
                "reason": reason,
                "credential": credential,
                "counter": counter,
                **trace_fields(self._trace_id(attrs.headers)),
            },
        )

    def _audit_regression(self, error: CounterRegression, attrs: RequestAttributes) -> None:
        c = error.credential
        audit_log.warning(
            "webauthn_counter_regression",
            extra={
                "event": "webauthn_counter_regression",
                "issuer": c.issuer,
                "subject": c.subject,
                "route": attrs.route,
                "decision": "deny",
                "reason": error.code,
                "credential": credential_id_text(c),
                "counter": error.received,
                "stored_counter": c.sign_count,
                **trace_fields(self._trace_id(attrs.headers)),
            },
        )


def _check_room(existing: list[StoredCredential]) -> None:
    """Refuses a registration past `MAX_CREDENTIALS_PER_USER`: each credential is a row in the shared registry
    and an entry in every offer made to the user, and our endpoints are outside the gateway's rate limits."""
    if len(existing) >= MAX_CREDENTIALS_PER_USER:
        raise RegistrationRefused(
            f"at most {MAX_CREDENTIALS_PER_USER} credentials per user: delete one first",
            code="webauthn_credential_limit",
        )


def require_user(principal: Principal) -> None:
    """WebAuthn credentials belong to users (issuer, `sub`); a client-credentials token has none."""
    if not principal.subject:
        raise Forbidden("WebAuthn credentials belong to users; this token names a client", code=_USER_REQUIRED)


def describe(c: StoredCredential) -> dict[str, Any]:
    """A credential as the registry's endpoints list it (no key material)."""
    return {
        "id": credential_id_text(c),
        "name": c.name,
        "created_at": c.created_at,
        "last_used_at": c.last_used_at,
        "sign_count": c.sign_count,
        "aaguid": c.aaguid.hex(),
        "transports": list(c.transports),
        "attestation": c.attestation_format,
        "user_verified": c.user_verified,
        "backup_eligible": c.backup_eligible,
        "disabled": c.disabled,
    }
