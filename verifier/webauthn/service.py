"""The WebAuthn service: request-bound step-up for the pipeline, and the credential registry's endpoints.

Built once by the composition root. The pipeline calls `check_step_up` for a route whose policy says
`require: {step_up: webauthn}`; the forward-auth door's router serves the endpoints that
`register_routes` adds:

| method and path                         | what                                                  |
|-----------------------------------------|-------------------------------------------------------|
| `POST /v1/webauthn/register/begin`      | creation options and a signed state (Bearer token)     |
| `POST /v1/webauthn/register/complete`   | verifies and stores the credential: 201                |
| `GET /v1/webauthn/credentials`          | the caller's credentials                               |
| `DELETE /v1/webauthn/credentials/{id}`  | removes one (id base64url): 204                        |
| `GET /v1/webauthn/demo`                 | a same-origin demo page (when `demo: true`)            |
| `POST /v1/webauthn/demo/protected/{n}`  | a step-up-protected echo the demo page calls           |

A token alone enrolls a user's first credential. Once the user has a usable (enabled) credential,
beginning another registration and deleting a credential need a step-up assertion from an enrolled
credential too (the 401 carries the challenge): otherwise whoever stole the token could enroll their own
key, or delete the user's keys and then enroll, and pass every step-up after that. A credential
disabled by a revocation event no longer counts, so a user whose keys were all revoked enrolls again
with a token (make the provider's login for that strong: `acr`/`amr`/`max_auth_age` policies).

Credentials belong to users, (issuer, `sub`): a client-credentials token (no `sub`) is refused on
every endpoint and step-up with 403 `webauthn_user_required`, whatever its `client_id`. Callers are
authenticated by `Pipeline.authenticate`, which runs the forward-auth checks (revocation, certificate
and DPoP binding, `introspect_jwts`); a CAEP credential-change disables credentials through
`disable_credentials`, wired by the composition root.

Audit: one INFO line on logger `verifier.audit` per accepted assertion (credential id, counter) and per
registration; a counter regression (a cloned authenticator) is a WARNING.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from verifier.clock import Clock
from verifier.decision import refuse
from verifier.doors.routes import HttpAnswer, HttpRequest, Router
from verifier.errors import Forbidden, VerifierError
from verifier.observe.metrics import WebAuthnMetrics
from verifier.principal import Principal
from verifier.request import RequestAttributes, normalize_host
from verifier.state.base import SharedState
from verifier.webauthn.assertion import (
    ASSERTION_HEADER,
    AssertionVerifier,
    CounterRegression,
    binding,
    credential_id_text,
    user_handle,
)
from verifier.webauthn.challenge import ChallengeSigner, b64url, b64url_decode, subject_hash
from verifier.webauthn.config import WebAuthnConfig
from verifier.webauthn.errors import AssertionRefused, Offer, RegistrationRefused
from verifier.webauthn.registration import Registrar, parse_preferences
from verifier.webauthn.store import CredentialStore, DuplicateCredential, StoredCredential

audit_log = logging.getLogger("verifier.audit")
logger = logging.getLogger(__name__)

Authenticate = Callable[[HttpRequest], Awaitable[Principal]]
MAX_BODY_BYTES = 65536  # a registration response with an attestation chain is a few KiB
_MISSING = "webauthn_assertion_required"
_USER_REQUIRED = "webauthn_user_required"  # a client-credentials token has no credentials to assert with


class WebAuthnService:
    """Step-up assertions bound to the request, and the credential registry (see the module docstring)."""

    def __init__(
        self,
        config: WebAuthnConfig,
        store: CredentialStore,
        state: SharedState,
        clock: Clock,
        registry: CollectorRegistry,
        *,
        realm: str = "verifier",
    ) -> None:
        self._config = config
        self._store = store
        self._state = state
        self._clock = clock
        self._realm = realm
        self._signer = ChallengeSigner(config.secret)
        self._assertions = AssertionVerifier(config, store, state, clock, self._signer)
        self._registrar = Registrar(config, self._signer)
        self._demo: HttpAnswer | None = None
        metrics = WebAuthnMetrics(registry)
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

        The refusal always carries a fresh challenge for this subject, method, host and path.
        """
        _require_user(principal)
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
            exc.offer = await self.offer(principal, attrs)
            raise
        self._assertion_total.labels("ok").inc()
        self._audit_assertion(
            logging.INFO, principal, attrs, "allow", "ok", credential_id_text(verified.credential), verified.sign_count
        )

    async def offer(self, principal: Principal, attrs: RequestAttributes) -> Offer:
        """A fresh challenge bound to this subject, method, host and path, with the subject's credentials."""
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
        """Disables the user's listed credentials (base64url ids; None: all, or all of one authenticator
        model when `aaguid`, 32 hex digits, is given). Returns how many changed."""
        ids: list[bytes] | None = None
        if credential_ids is None and aaguid:
            ids = [c.credential_id for c in await self._store.for_user(issuer, subject) if c.aaguid.hex() == aaguid]
        elif credential_ids is not None:
            ids = []
            for text in credential_ids:
                try:
                    ids.append(b64url_decode(text))
                except ValueError:
                    continue  # an id we never issued matches nothing
        count = await self._store.disable(issuer, subject, ids)
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

    # --- HTTP endpoints -----------------------------------------------------------------------------

    def register_routes(self, router: Router, authenticate: Authenticate) -> None:
        """Adds the registry's endpoints (and the demo page when configured) to `router`."""

        def guarded(
            handler: Callable[[HttpRequest, Mapping[str, str], Principal], Awaitable[HttpAnswer]],
        ) -> Callable[[HttpRequest, Mapping[str, str]], Awaitable[HttpAnswer]]:
            async def run(request: HttpRequest, params: Mapping[str, str]) -> HttpAnswer:
                try:
                    principal = await authenticate(request)
                    _require_user(principal)
                    return await handler(request, params, principal)
                except RegistrationRefused as exc:
                    return HttpAnswer.json(400, {"error": exc.code, "error_description": exc.description})
                except VerifierError as exc:
                    return self._refusal(exc)

            return run

        router.add("POST", "/v1/webauthn/register/begin", guarded(self._register_begin))
        router.add("POST", "/v1/webauthn/register/complete", guarded(self._register_complete))
        router.add("GET", "/v1/webauthn/credentials", guarded(self._list))
        router.add("DELETE", "/v1/webauthn/credentials/{id}", guarded(self._delete))
        if self._config.demo:
            router.add("GET", "/v1/webauthn/demo", self._demo_page)
            router.add("POST", "/v1/webauthn/demo/protected/{name}", guarded(self._demo_protected))

    def _refusal(self, error: VerifierError) -> HttpAnswer:
        """The same answer the decision module gives the gateway, as an HTTP answer of our own."""
        decision = refuse(error, realm=self._realm)
        headers = list(decision.response_headers)
        if decision.body:
            headers.append(("content-type", "application/json"))
        headers += [("cache-control", "no-store"), ("x-verifier-reason", decision.reason)]
        return HttpAnswer(decision.status, tuple(headers), decision.body)

    @staticmethod
    def _body(request: HttpRequest) -> Any:
        if len(request.body) > MAX_BODY_BYTES:
            raise RegistrationRefused("the request body is too large", code="invalid_request")
        try:
            return request.json()
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise RegistrationRefused("the request body is not JSON", code="invalid_request") from exc

    async def _guard_enrolled(
        self, request: HttpRequest, principal: Principal, existing: list[StoredCredential]
    ) -> None:
        """A user who has a usable credential proves it before changing the set (see the module docstring)."""
        if any(not c.disabled for c in existing):
            await self.check_step_up(principal, _attributes(request))

    async def _register_begin(self, request: HttpRequest, _: Mapping[str, str], principal: Principal) -> HttpAnswer:
        preferences, _name = parse_preferences(self._body(request))
        existing = await self._store.for_user(principal.issuer, principal.subject)
        await self._guard_enrolled(request, principal, existing)
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
        return HttpAnswer.json(200, {"publicKey": options, "state": state})

    async def _register_complete(self, request: HttpRequest, _: Mapping[str, str], principal: Principal) -> HttpAnswer:
        body = self._body(request)
        if not isinstance(body, Mapping):
            raise RegistrationRefused("expected a JSON object with state and credential", code="invalid_request")
        name = parse_preferences({"name": body.get("name", "")})[1]
        now = self._clock.now()
        try:
            registered, challenge = self._registrar.complete(
                body.get("state"),
                body.get("credential"),
                subject=subject_hash(principal.issuer, principal.subject),
                now=now,
            )
            # The state is single-use too: a second complete with it is a replay.
            ttl = float(self._config.challenge_timeout_seconds + 1)
            if not await self._state.first_use("webauthn-register:" + challenge, ttl):
                raise RegistrationRefused("the registration state was already used", code="webauthn_state_replayed")
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
            self._registration_total.labels("webauthn_credential_exists").inc()
            return HttpAnswer.json(
                409,
                {"error": "webauthn_credential_exists", "error_description": "this credential is already registered"},
            )
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
        location = f"/v1/webauthn/credentials/{credential_id_text(stored)}"
        return HttpAnswer.json(201, _describe(stored), (("location", location),))

    async def _list(self, _: HttpRequest, __: Mapping[str, str], principal: Principal) -> HttpAnswer:
        credentials = await self._store.for_user(principal.issuer, principal.subject)
        return HttpAnswer.json(200, {"credentials": [_describe(c) for c in credentials]})

    async def _delete(self, request: HttpRequest, params: Mapping[str, str], principal: Principal) -> HttpAnswer:
        try:
            credential_id = b64url_decode(params["id"])
        except ValueError:
            return HttpAnswer.json(404, {"error": "not_found"})
        existing = await self._store.for_user(principal.issuer, principal.subject)
        if not any(c.credential_id == credential_id for c in existing):
            return HttpAnswer.json(404, {"error": "not_found"})
        await self._guard_enrolled(request, principal, existing)
        if not await self._store.delete(principal.issuer, principal.subject, credential_id):
            return HttpAnswer.json(404, {"error": "not_found"})
        audit_log.info(
            "webauthn_deleted",
            extra={
                "event": "webauthn_deleted",
                "issuer": principal.issuer,
                "subject": principal.subject,
                "credential": b64url(credential_id),
            },
        )
        return HttpAnswer(204, (("cache-control", "no-store"),))

    async def _demo_page(self, _: HttpRequest, __: Mapping[str, str]) -> HttpAnswer:
        if self._demo is None:
            self._demo = _demo_answer()
        return self._demo

    async def _demo_protected(
        self, request: HttpRequest, params: Mapping[str, str], principal: Principal
    ) -> HttpAnswer:
        await self.check_step_up(principal, _attributes(request))
        return HttpAnswer.json(200, {"ok": True, "subject": principal.subject, "name": params["name"]})

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
            },
        )


def _require_user(principal: Principal) -> None:
    """WebAuthn credentials belong to users (issuer, `sub`); a client-credentials token has none."""
    if not principal.subject:
        raise Forbidden("WebAuthn credentials belong to users; this token names a client", code=_USER_REQUIRED)


def _attributes(request: HttpRequest) -> RequestAttributes:
    """One of our own endpoints' requests as the attributes a step-up is bound to."""
    path = request.path + (f"?{request.query}" if request.query else "")
    return RequestAttributes(
        method=request.method,
        scheme="http",
        host=normalize_host(request.headers.get("host", "")),
        path=path,
        headers=request.headers,
        client_address=request.peer,
    )


def _describe(c: StoredCredential) -> dict[str, Any]:
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


def _demo_answer() -> HttpAnswer:
    """The demo page, with a CSP that allows exactly its one inline script (by hash) and nothing else."""
    page = importlib.resources.files("verifier.webauthn").joinpath("static/demo.html").read_bytes()
    script = page.split(b"<script>", 1)[1].split(b"</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
    csp = (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; connect-src 'self'; "
        "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    )
    return HttpAnswer(
        200,
        (
            ("content-type", "text/html; charset=utf-8"),
            ("cache-control", "no-store"),
            ("content-security-policy", csp),
            ("x-content-type-options", "nosniff"),
            ("referrer-policy", "no-referrer"),
        ),
        page,
    )
