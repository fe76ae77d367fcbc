"""The operator's kill switch: `POST/GET /v1/admin/revocations`, `DELETE /v1/admin/revocations/{id}`.

A bearer secret from `VERIFIER_ADMIN_TOKEN` guards it (compared with `hmac.compare_digest`); without
that variable the API does not exist (404 on every route, so its presence is not even disclosed).

`POST` takes an RFC 9493 subject and answers 201 `{"id": ...}`:

    {"subject": {"format": "iss_sub", "iss": "...", "sub": "..."}, "reason": "laptop stolen"}
    {"subject": {"format": "opaque", "id": "<sid>"}}                      # one session
    {"subject": {"format": "email", "email": "..."}, "effect": "disable"} # until lifted by DELETE

`effect` is `revoke` (default: tokens issued until now are refused, a session's tokens all; the entry
expires once all of them have) or `disable` (every token of the subject, until DELETE).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from verifier.clock import Clock
from verifier.doors.routes import HttpAnswer, HttpRequest, Router
from verifier.errors import StateUnavailable
from verifier.revocation.entry import OPERATOR, Effect, Entry, KeyKind, Match
from verifier.revocation.index import Revocations
from verifier.revocation.subjects import SubjectError, subject_keys
from verifier.settings import check_admin_token

COLLECTION = "/v1/admin/revocations"
MAX_BODY_BYTES = 16 * 1024  # bytes; a subject and a reason
MAX_REASON_CHARS = 200


class AdminApi:
    """The kill switch's three routes."""

    def __init__(
        self,
        *,
        token: str | None,
        revocations: Revocations,
        add: Callable[[list[Entry]], Awaitable[None]],
        remove: Callable[[list[str]], Awaitable[None]],
        clock: Clock,
        max_token_lifetime: float,
    ) -> None:
        check_admin_token(token)
        self._token = token.encode() if token else None
        self._revocations = revocations
        self._add = add
        self._remove = remove
        self._clock = clock
        self._max_lifetime = max_token_lifetime

    def register(self, router: Router) -> None:
        """Adds the routes."""
        router.add("POST", COLLECTION, self.create)
        router.add("GET", COLLECTION, self.list)
        router.add("DELETE", COLLECTION + "/{id}", self.delete)

    def _refusal(self, request: HttpRequest) -> HttpAnswer | None:
        if self._token is None:
            return HttpAnswer.json(404, {"error": "not_found"})
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), self._token)
        if ok:
            return None
        return HttpAnswer.json(
            401, {"error": "invalid_token"}, (("www-authenticate", 'Bearer realm="verifier-admin"'),)
        )

    async def create(self, request: HttpRequest, params: Mapping[str, str]) -> HttpAnswer:
        """POST: a new entry per key of the subject; answers with the first id (one key in practice)."""
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        if len(request.body) > MAX_BODY_BYTES:
            return HttpAnswer.json(413, {"error": "invalid_request", "error_description": "body too large"})
        try:
            document: Any = request.json()
        except (ValueError, RecursionError):
            return _bad("body is not JSON")
        if not isinstance(document, dict):
            return _bad("body is not a JSON object")
        reason = document.get("reason", "")
        if not isinstance(reason, str):
            return _bad("reason must be a string")
        effect_name = document.get("effect", "revoke")
        if effect_name not in ("revoke", "disable"):
            return _bad("effect must be revoke or disable")
        try:
            keys = subject_keys(document.get("subject"), session=True)
        except SubjectError as exc:
            return _bad(str(exc))
        if len(keys) != 1:
            return _bad("subject must name exactly one iss_sub, email or opaque (session) identifier")
        key = keys[0]
        now = self._clock.now()
        if effect_name == "disable":
            effect, match, expires = Effect.ACCOUNT_DISABLED, Match.ALL, None
        else:
            match = Match.ALL if key.kind is KeyKind.SID else Match.ISSUED_BEFORE
            effect, expires = Effect.TOKEN_REVOKED, now + self._max_lifetime
        entry = Entry(
            id="op-" + secrets.token_urlsafe(12),
            key=key,
            effect=effect,
            match=match,
            event_time=now,
            expires_at=expires,
            source=OPERATOR,
            event=OPERATOR,
            reason=reason[:MAX_REASON_CHARS],
        )
        try:
            await self._add([entry])
        except StateUnavailable:
            return _unavailable()
        return HttpAnswer.json(201, {"id": entry.id}, (("location", f"{COLLECTION}/{entry.id}"),))

    async def list(self, request: HttpRequest, params: Mapping[str, str]) -> HttpAnswer:
        """GET: every live entry, events' and operators'."""
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        return HttpAnswer.json(200, {"entries": [e.public() for e in self._revocations.entries()]})

    async def delete(self, request: HttpRequest, params: Mapping[str, str]) -> HttpAnswer:
        """DELETE: lifts one entry (an event's too: the operator has the last word)."""
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        entry_id = params["id"]
        if self._revocations.get(entry_id) is None:
            return HttpAnswer.json(404, {"error": "not_found"})
        try:
            await self._remove([entry_id])
        except StateUnavailable:
            return _unavailable()
        return HttpAnswer(204, (("cache-control", "no-store"),))


def _bad(description: str) -> HttpAnswer:
    return HttpAnswer.json(400, {"error": "invalid_request", "error_description": description})


def _unavailable() -> HttpAnswer:
    return HttpAnswer.json(503, {"error": "temporarily_unavailable"}, (("retry-after", "1"),))
