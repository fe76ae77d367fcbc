"""The in-memory index every decision consults: synchronous, a few dict lookups, no I/O.

`Revocations.check` runs on every decision, cache hits included, so it only reads dicts keyed by
(iss, sub), `email`, `sid`, (iss, `jti`) and `client_id` (the last two only while some entry is keyed so); the
store (memory or Redis) keeps the index in sync from outside.
An entry whose every possible token has expired simply stops matching, before any purge runs.

Until the first full load (`replace`) the index knows nothing, and "no entry" must not be believed:
a worker restarted after a crash, or started beside the old one on SIGHUP, accepts requests on the
shared sockets while its entries are still being read, and its keys may well load first. So `check`
raises `StateUnavailable` (503, fail closed) until the entries are in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from verifier.clock import Clock
from verifier.errors import InvalidToken, StateUnavailable, VerifierError
from verifier.generation import Generation
from verifier.numbers import json_number
from verifier.observe import traceparent
from verifier.observe.audit import trace_fields
from verifier.principal import Principal
from verifier.revocation.entry import Effect, Entry, KeyKind, Match, SubjectKey, email_key

audit_log = logging.getLogger("verifier.audit")

_NO_HEADERS: Mapping[str, str] = {}
_DESCRIPTIONS = {
    Effect.TOKEN_REVOKED: "token revoked",
    Effect.SESSION_REVOKED: "session revoked",
    Effect.CREDENTIAL_REVOKED: "credential revoked",
    Effect.ACCOUNT_DISABLED: "account disabled",
}
# Which refusal wins when several entries match: the broadest and longest-lasting first.
_PRECEDENCE = {
    Effect.ACCOUNT_DISABLED: 0,
    Effect.CREDENTIAL_REVOKED: 1,
    Effect.SESSION_REVOKED: 2,
    Effect.TOKEN_REVOKED: 3,
}


class TokenRevoked(InvalidToken):
    """A token refused because of a revocation entry: final, never reused by a gateway.

    `code` is the entry's effect (`session_revoked`, `credential_revoked`, `account_disabled`,
    `token_revoked`); `jti` and `entry_id` name the event behind it for the audit line.
    """

    code = "token_revoked"
    reusable = False  # the entry can be lifted at any moment; a cached refusal would outlive it

    def __init__(self, description: str = "", *, code: str | None = None, jti: str = "", entry_id: str = "") -> None:
        super().__init__(description, code=code)
        self.jti = jti
        self.entry_id = entry_id


def _reaches(entry: Entry, iat: float | None, auth_time: float | None, has_sid: bool = False) -> bool:
    if entry.match is Match.ALL:
        return True
    if entry.match is Match.SESSIONLESS_ISSUED_BEFORE and has_sid:
        return False  # the token names its session: only an entry on that `sid` reaches it
    # auth_time <= iat always, so without auth_time the iat is a safe upper bound on it.
    when = auth_time if entry.match is Match.AUTHENTICATED_BEFORE and auth_time is not None else iat
    return when is None or when <= entry.event_time  # no time at all: fail closed


class Revocations:
    """The synchronous checker over the current entries."""

    def __init__(
        self,
        clock: Clock,
        trace_id: Callable[[Mapping[str, str]], str] = traceparent.trace_id,
        generation: Generation | None = None,
    ) -> None:
        self._clock = clock
        self._generation = generation or Generation()  # bumped on every change: remembered answers go stale
        self._trace_id = trace_id  # the audit line's trace: the current span's, else the gateway's traceparent
        self._entries: dict[str, Entry] = {}
        self._refusals: dict[tuple[KeyKind, str, str], list[Entry]] = {}
        self._overrides: dict[tuple[KeyKind, str, str], list[Entry]] = {}
        # Entries keyed on a token (`jti`) and on a client: those keys are looked up only while there are some.
        # Plain ints, read on every check: an enum-keyed dict would hash the enum in Python each time.
        self._by_jti = 0
        self._by_client = 0
        self._loaded = False  # set by the first full load: until then no answer can be known
        self._not_loaded = "revocation entries are not loaded yet"  # why not, when not

    @property
    def loaded(self) -> bool:
        """Whether the entries have been loaded once (before that, `check` refuses to decide)."""
        return self._loaded

    def __len__(self) -> int:
        return len(self._entries)

    # -- the hot path ----------------------------------------------------------------------------------

    def check(self, principal: Principal, headers: Mapping[str, str] = _NO_HEADERS) -> VerifierError | None:
        """The refusal for this principal's token, or None when no entry reaches it; `headers` (the request's)
        name the trace of the audit line. Raises `StateUnavailable` before the first load."""
        if not self._loaded:  # entries added before the first load (kill switch, pub/sub) are still partial
            raise StateUnavailable(self._not_loaded)
        if not self._refusals:
            return None
        claims = principal.claims
        found: Entry | None = None
        now: float | None = None
        iat = auth_time = None
        has_sid = False
        for key in self._keys_of(principal, claims, for_overrides=False):
            bucket = self._refusals.get(key)
            if not bucket:
                continue
            if now is None:  # read once, and only for a principal some entry is keyed on
                now = self._clock.now()
                iat, auth_time = json_number(claims.get("iat")), json_number(claims.get("auth_time"))
                sid = claims.get("sid")
                has_sid = isinstance(sid, str) and bool(sid)
            for entry in bucket:
                if found is not None and _PRECEDENCE[entry.effect] >= _PRECEDENCE[found.effect]:
                    continue
                if entry.live(now) and _reaches(entry, iat, auth_time, has_sid):
                    found = entry
        if found is None:
            return None
        audit_log.warning(
            "token_revoked",
            extra={
                "event": "token_revoked",
                "issuer": principal.issuer,
                "subject": principal.subject,
                "client_id": principal.client_id,
                "reason": found.effect.value,
                "jti": found.jti,
                "entry": found.id,
                "source": found.source,
                **trace_fields(self._trace_id(headers)),
            },
        )
        return TokenRevoked(_DESCRIPTIONS[found.effect], code=found.effect.value, jti=found.jti, entry_id=found.id)

    def overrides(self, principal: Principal) -> tuple[Entry, ...] | None:
        """The claims announcements (CLAIMS_OVERRIDE entries) that reach this token, oldest event first, or None.

        How they apply (restrict or replace, by their transmitter) is the check's (`verifier.checks.revocation`)."""
        if not self._overrides:
            return None
        claims = principal.claims
        iat = json_number(claims.get("iat"))
        now = self._clock.now()
        found: list[Entry] = []
        for key in self._keys_of(principal, claims, for_overrides=True):
            found.extend(e for e in self._overrides.get(key, ()) if e.live(now) and _reaches(e, iat, None))
        if not found:
            return None
        return tuple(sorted(found, key=lambda e: (e.event_time, e.id)))

    def _keys_of(
        self, principal: Principal, claims: Mapping[str, Any], *, for_overrides: bool
    ) -> list[tuple[KeyKind, str, str]]:
        # A client-credentials token has no `sub` (its subject is ""): no user's entry reaches it.
        issuer = principal.issuer
        keys = [(KeyKind.ISS_SUB, principal.subject, issuer)]
        # Session ids and emails: the operator's entries (no issuer) and a transmitter's (its issuers').
        sid = claims.get("sid")
        if isinstance(sid, str) and sid:
            keys += ((KeyKind.SID, sid, ""), (KeyKind.SID, sid, issuer))
        email = claims.get("email")
        # An unverified email may be anyone's: good enough to refuse on, never to grant on.
        if isinstance(email, str) and email and (not for_overrides or claims.get("email_verified") is True):
            address = email_key(email)  # lower-cased and NFC: as the entries' keys are
            keys += ((KeyKind.EMAIL, address, ""), (KeyKind.EMAIL, address, issuer))
        if self._by_jti:
            # One token: an RFC 9068 JWT's `jti`, an introspection answer's when it has one; none, no match.
            jti = claims.get("jti")
            if isinstance(jti, str) and jti:
                keys.append((KeyKind.JTI, jti, issuer))
        if self._by_client:
            # The client it was issued to (`client_id`, else `azp`): its own tokens and its users' alike. A token
            # naming two (`azp` another than `client_id`: `verifier.principal.clients_of`) is refused for either.
            client = principal.client_id
            if client:
                keys += ((KeyKind.CLIENT, client, ""), (KeyKind.CLIENT, client, issuer))
            other = principal.other_client
            if other:
                keys += ((KeyKind.CLIENT, other, ""), (KeyKind.CLIENT, other, issuer))
        return keys

    # -- kept in sync by the store ---------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """The live entries, oldest event first."""
        now = self._clock.now()
        return sorted((e for e in self._entries.values() if e.live(now)), key=lambda e: (e.event_time, e.id))

    def get(self, entry_id: str) -> Entry | None:
        """One entry by id."""
        return self._entries.get(entry_id)

    def add(self, entries: Iterable[Entry]) -> None:
        """Adds (or replaces, by id) entries."""
        self._generation.bump()
        for entry in entries:
            self._remove_one(entry.id)
            self._entries[entry.id] = entry
            table = self._overrides if entry.effect is Effect.CLAIMS_OVERRIDE else self._refusals
            table.setdefault(_lookup(entry.key), []).append(entry)
            self._count(entry.key.kind, 1)

    def remove(self, ids: Iterable[str]) -> None:
        """Drops entries by id (unknown ids are ignored)."""
        self._generation.bump()
        for entry_id in ids:
            self._remove_one(entry_id)

    def replace(self, entries: Iterable[Entry]) -> None:
        """Replaces everything with `entries` (a full resync); the first one makes the index answer."""
        self._generation.bump()
        self._entries.clear()
        self._refusals.clear()
        self._overrides.clear()
        self._by_jti = self._by_client = 0
        self.add(entries)
        self._loaded = True

    def out_of_sync(self) -> bool:
        """The store could not be read: entries others added may be missing here, so `check` refuses to decide
        (503) until the next full load (`replace`). Answers remembered from the index go stale at once. True
        when the index was answering until now."""
        if not self._loaded:
            return False
        self._loaded = False
        self._not_loaded = "revocation entries could not be reloaded from the store"
        self._generation.bump()
        return True

    def expired(self) -> list[str]:
        """Ids of entries that can no longer match any live token."""
        now = self._clock.now()
        return [e.id for e in self._entries.values() if not e.live(now)]

    def matching(
        self,
        keys: Iterable[SubjectKey],
        effect: Effect,
        *,
        not_after: float,
        source: str,
        events: Collection[str] | None = None,
    ) -> list[str]:
        """Ids of `effect` entries from `source` on these keys whose event is at or before `not_after` (and, when
        `events` is given, whose event type is one of them)."""
        wanted = {_lookup(k) for k in keys}
        return [
            e.id
            for e in self._entries.values()
            if e.effect is effect
            and e.source == source
            and _lookup(e.key) in wanted
            and e.event_time <= not_after
            and (events is None or e.event in events)
        ]

    def _count(self, kind: KeyKind, change: int) -> None:
        if kind is KeyKind.JTI:
            self._by_jti += change
        elif kind is KeyKind.CLIENT:
            self._by_client += change

    def _remove_one(self, entry_id: str) -> None:
        old = self._entries.pop(entry_id, None)
        if old is None:
            return
        self._count(old.key.kind, -1)
        table = self._overrides if old.effect is Effect.CLAIMS_OVERRIDE else self._refusals
        key = _lookup(old.key)
        bucket = [e for e in table.get(key, ()) if e.id != entry_id]
        if bucket:
            table[key] = bucket
        else:
            table.pop(key, None)


def _lookup(key: SubjectKey) -> tuple[KeyKind, str, str]:
    # An email entry stored before addresses were normalized (Redis, the SQLite file) is indexed as tokens look up.
    value = email_key(key.value) if key.kind is KeyKind.EMAIL else key.value
    return (key.kind, value, key.iss)
