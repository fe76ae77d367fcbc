"""The operator's kill switch, served as `POST/GET /v1/admin/revocations`, `DELETE /v1/admin/revocations/{id}`
by `verifier.doors.admin_http`.

A bearer secret from `VERIFIER_ADMIN_TOKEN` guards it (compared with `hmac.compare_digest`); without
that variable the API does not exist (404 on every route, so its presence is not even disclosed).

`POST` takes an RFC 9493 subject and answers 201 `{"id": ...}`:

    {"subject": {"format": "iss_sub", "iss": "...", "sub": "..."}, "reason": "laptop stolen"}
    {"subject": {"format": "opaque", "id": "<sid>"}}                      # one session
    {"subject": {"format": "email", "email": "..."}, "effect": "disable"} # until lifted by DELETE
    {"subject": {"format": "jwt_id", "iss": "...", "jti": "..."}}         # one token (OpenID SSF 1.0)
    {"subject": {"format": "complex", "application": {"format": "opaque", "id": "<client_id>"}}}  # a client
    {"subject": {"format": "complex", "application": {"format": "iss_sub", "iss": "...", "sub": "<client_id>"}}}

`DELETE` of a claims override (an SSF claims announcement) is confirmed by the Redis replicas as a `POST` is
(`state.redis_revocation_replicas`; 503 when not, lifted all the same); a lift of a refusal is not waited for: lost in
a failover, it only brings the refusal back (`verifier.revocation.store`).

The operator's entry on a subject is one per `effect`: a `POST` naming a subject the operator already revoked (or
disabled) the same way, a retry after a 503 among them, replaces that entry in the same write (a new id, its
`event_time` never earlier, its life never shorter; the old id is gone: its `DELETE` answers 404), so a retry never
leaves a second entry to list and to lift, and a lift of the old id can never undo the newer `POST`.

`effect` is `revoke` (default: tokens issued until now are refused, on the issuer's clock: up to the issuers' largest
`leeway_seconds` past ours; a session's or a `jwt_id`'s tokens all; the entry expires once all of them have) or
`disable` (every token of the subject, until DELETE). A client (`application`) is matched by the token's `client_id`
or its `azp` (either), at any issuer for an `opaque` id, at the `iss` an `iss_sub` names; a `jwt_id` by the token's
issuer and `jti` (a token without `jti` is never matched). An `iss` spelling a configured issuer otherwise (a trailing
slash, its host in capitals: `issuer_form`) is keyed as that issuer.

Every entry made or lifted, and every caller refused, is a line on the audit log (`verifier.audit`) with the
caller's address: one secret opens the API, so where it was used from is the only "who" there is. The
presented secret is never logged.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from verifier.clock import Clock
from verifier.errors import (
    InvalidToken,
    MalformedRequest,
    MissingToken,
    NotFound,
    RevocationNotReplicated,
    VerifierError,
)
from verifier.revocation.entry import OPERATOR, Effect, Entry, KeyKind, Match, SubjectKey, issuer_form
from verifier.revocation.index import Revocations
from verifier.revocation.subjects import SubjectError, subject_keys
from verifier.settings import check_admin_token

MAX_REASON_CHARS = 200

audit_log = logging.getLogger("verifier.audit")


class KillSwitch:
    """The kill switch: who may use it, and what its three operations do (HTTP: `doors.admin_http`)."""

    def __init__(
        self,
        *,
        token: str | None,
        revocations: Revocations,
        add: Callable[[list[Entry], list[str]], Awaitable[None]],
        remove: Callable[[list[str], bool], Awaitable[None]],
        clock: Clock,
        entry_lifetime: float,
        issuers: Iterable[str] = (),
        leeway_seconds: float = 0.0,
    ) -> None:
        check_admin_token(token)
        # The configured issuers (a template's listed tenants each), by `issuer_form`: a subject's `iss` in another
        # spelling of one of them is keyed as its tokens name it.
        self._issuers = frozenset(issuers)
        self._forms: dict[str, list[str]] = {}
        for issuer in self._issuers:
            self._forms.setdefault(issuer_form(issuer), []).append(issuer)
        self._token = token.encode() if token else None
        self._revocations = revocations
        self._add = add
        self._remove = remove
        self._clock = clock
        self._entry_lifetime = entry_lifetime  # `RevocationService.entry_lifetime`
        # The issuers' largest `leeway_seconds`: how far ahead of ours a provider's clock may run while its tokens
        # pass (their `iat` up to that far in our future). A `revoke` reaches the tokens issued up to that far past
        # our now: a token issued before the POST on a clock running ahead must not escape it.
        self._leeway = leeway_seconds

    @property
    def enabled(self) -> bool:
        """Whether the API exists at all (an admin token is configured)."""
        return self._token is not None

    def authorize(self, authorization: str, *, peer: str = "") -> None:
        """Returns when the `Authorization` header carries the admin token; else raises (401), and audits the
        refusal with the caller's address `peer`."""
        scheme, _, presented = authorization.partition(" ")
        refusal: VerifierError | None = None
        if not presented.strip():
            refusal = MissingToken("the admin API needs its bearer token")
        else:
            ok = self._token is not None and scheme.lower() == "bearer"
            if not (ok and hmac.compare_digest(presented.strip().encode(), self._token or b"")):
                refusal = InvalidToken("not the admin token")
        if refusal is not None:
            audit_log.warning("admin_refused", extra={"event": "admin_refused", "code": refusal.code, "peer": peer})
            raise refusal

    async def create(self, document: Any, *, peer: str = "") -> Entry:
        """A new entry for the subject named by `document` (see the module docstring), audited with `peer`.

        Raises `MalformedRequest` for a document that does not name exactly one subject, or
        `StateUnavailable` when the store cannot take it.
        """
        if not isinstance(document, dict):
            raise MalformedRequest("body is not a JSON object")
        reason = document.get("reason", "")
        if not isinstance(reason, str):
            raise MalformedRequest("reason must be a string")
        effect_name = document.get("effect", "revoke")
        if effect_name not in ("revoke", "disable"):
            raise MalformedRequest("effect must be revoke or disable")
        try:
            keys = subject_keys(document.get("subject"), session=True)
        except SubjectError as exc:
            raise MalformedRequest(str(exc)) from exc
        if len(keys) != 1:
            raise MalformedRequest(
                "subject must name exactly one iss_sub, email, opaque (session), jwt_id or complex application"
                " identifier"
            )
        key = self._spelled_as_configured(keys[0])
        effect = Effect.ACCOUNT_DISABLED if effect_name == "disable" else Effect.TOKEN_REVOKED
        # The operator's entries on this subject with this effect: the new one takes their place (one entry, whatever
        # the retries after a 503). It reaches every token they reached: never an earlier event, never a shorter life.
        replaced = self._revocations.matching([key], effect, not_after=math.inf, source=OPERATOR)
        if effect_name == "disable":
            match, ahead = Match.ALL, 0.0
        else:
            # A session's tokens, or the one token a `jwt_id` names, whatever their `iat` (an issuer's clock ahead
            # of ours must not let the named token through); the others', those issued until now on the issuer's
            # clock: up to the issuers' largest leeway past ours (a token issued meanwhile is refused too: its holder
            # signs in again).
            match = Match.ALL if key.kind in (KeyKind.SID, KeyKind.JTI) else Match.ISSUED_BEFORE
            ahead = self._leeway if match is Match.ISSUED_BEFORE else 0.0
        now = max([self._clock.now() + ahead, *(e.event_time for e in map(self._revocations.get, replaced) if e)])
        expires = None if effect_name == "disable" else now + self._entry_lifetime
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
            await self._add([entry], replaced)
        except RevocationNotReplicated:
            _audit("revocation_created", entry, peer, replaced)  # in effect (primary, this replica), answered 503
            raise
        _audit("revocation_created", entry, peer, replaced)
        return entry

    def _spelled_as_configured(self, key: SubjectKey) -> SubjectKey:
        """`key` naming its issuer as the configured issuer it spells (a trailing slash, a host in capitals), else
        as given: an entry on `https://idp.example/` would be listed and reach none of `https://idp.example`'s
        tokens."""
        if not key.iss or key.iss in self._issuers:
            return key
        same = self._forms.get(issuer_form(key.iss), ())
        return SubjectKey(key.kind, key.value, same[0]) if len(same) == 1 else key

    def entries(self) -> list[Entry]:
        """Every live entry, events' and operators'."""
        return self._revocations.entries()

    async def lift(self, entry_id: str, *, peer: str = "") -> None:
        """Lifts one entry (an event's too: the operator has the last word), audited with `peer`; raises `NotFound`."""
        entry = self._revocations.get(entry_id)
        if entry is None:
            raise NotFound("no such revocation entry")
        # A lost lift re-revokes (fail closed) but a claims override's could hand back claims it raised: it waits
        # for the Redis replicas (`verifier.revocation.store`), 503 when they do not confirm (lifted all the same).
        try:
            await self._remove([entry_id], entry.effect is Effect.CLAIMS_OVERRIDE)
        except RevocationNotReplicated:
            _audit("revocation_lifted", entry, peer)
            raise
        _audit("revocation_lifted", entry, peer)


def _audit(event: str, entry: Entry, peer: str, replaced: list[str] | None = None) -> None:
    """One audit line: what the operator's caller (at `peer`) made (in place of the entries `replaced`) or lifted,
    whoever's entry it was."""
    audit_log.info(
        event,
        extra={
            "event": event,
            "entry": entry.id,
            "subject": entry.key.describe(),
            "effect": entry.effect.value,
            "source": entry.source,
            "jti": entry.jti,
            "reason": entry.reason,
            "peer": peer,
            **({"replaced": replaced} if replaced else {}),
        },
    )
