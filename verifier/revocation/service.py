"""The revocation service: receives SETs (push and poll), runs the kill switch, keeps the index in sync.

Built once by the composition root. `revocations` is the synchronous checker the pipeline consults on
every decision; `start()` returns only once the current entries are loaded (a late replica never
reports SERVING with an empty index). It speaks no HTTP: `verifier.doors.ssf_http` serves the push
endpoint (`receive`) and `verifier.doors.admin_http` the kill switch (`admin`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence

import aiohttp

from verifier.clock import Clock
from verifier.config.issuer import MAX_LEEWAY_SECONDS
from verifier.config.revocation import POLL, PUSH, RevocationConfig, TransmitterConfig
from verifier.errors import ProviderUnavailable, RevocationNotReplicated, StateUnavailable
from verifier.generation import Generation
from verifier.observe.metrics import RevocationMetrics, TransmitterKeyMetrics
from verifier.observe.tracing import NO_TRACING, Tracing
from verifier.revocation.admin import KillSwitch
from verifier.revocation.entry import Effect, Entry
from verifier.revocation.index import Revocations
from verifier.revocation.poll import Outcome, Poller
from verifier.revocation.ssf import (
    LIFTED_BY_ACCOUNT_ENABLED,
    CredentialRevocation,
    Effects,
    SetRefused,
    SetVerifier,
    effects_of,
    short_name,
)
from verifier.revocation.store import MemoryStore, RevocationStore
from verifier.state.base import SharedState
from verifier.tokens.fetch import Fetcher
from verifier.tokens.jwks import IssuerKeys

log = logging.getLogger("verifier.revocation")

START_TIMEOUT_SECONDS = 10.0  # seconds start() keeps trying to load the entries before failing
LOAD_RETRY_SECONDS = 0.2  # between attempts at the initial load
RESYNC_RETRY_SECONDS = 1.0  # between reloads while the last one failed (the replica answers 503 meanwhile)
# Changes this replica applied that the Redis replicas did not confirm, kept and sent again until they do: beyond
# this many the oldest is forgotten (its sender was answered 503 and may still retry it).
MAX_UNCONFIRMED = 10_000

CredentialCallback = Callable[[CredentialRevocation], Awaitable[None]]  # disables WebAuthn credentials


class RevocationService:
    """SSF receiver + kill switch + the shared index."""

    def __init__(
        self,
        config: RevocationConfig,
        *,
        state: SharedState,
        fetcher: Fetcher,
        clock: Clock,
        metrics: RevocationMetrics,
        session: Callable[[], aiohttp.ClientSession],
        on_credential_revoked: CredentialCallback | None = None,
        store: RevocationStore | None = None,
        admin_token: str | None = None,
        tracing: Tracing = NO_TRACING,
        generation: Generation | None = None,
        issuers: Iterable[str] = (),
        leeway_seconds: float = 0.0,
    ) -> None:
        self.config = config
        # How long after its event an entry lasts: a token it can match lives `max_token_lifetime_seconds` at most
        # (longer ones are refused outright), and is still accepted for its issuer's leeway past its `exp`.
        self.entry_lifetime = float(config.max_token_lifetime_seconds + MAX_LEEWAY_SECONDS)
        self._tracing = tracing  # CLIENT spans around the transmitters' metadata, JWKS and poll fetches
        self._clock = clock
        self.metrics = metrics  # the root's, with `REFUSAL_CODES` exported at zero
        self.revocations = Revocations(clock, tracing.trace_id, generation)
        # Read off the index at each scrape: 1 while it answers, 0 while it refuses to decide (503).
        self.metrics.in_sync.set_function(lambda: 1.0 if self.revocations.loaded else 0.0)
        self._store: RevocationStore = store if store is not None else MemoryStore()  # the root picks the store
        key_metrics = TransmitterKeyMetrics(self.metrics)
        self._transmitters: dict[str, tuple[TransmitterConfig, IssuerKeys]] = {
            t.issuer: (t, IssuerKeys(t.key_settings(), fetcher, clock, key_metrics, tracing))
            for t in config.transmitters
        }
        self._verifier = SetVerifier(self._transmitters, state, clock)
        self._on_credential_revoked = on_credential_revoked
        self.admin = KillSwitch(
            token=admin_token or None,  # the root reads it from the environment; None disables the admin API
            revocations=self.revocations,
            add=self.add,
            remove=self.remove,
            clock=clock,
            entry_lifetime=self.entry_lifetime,
            issuers=issuers,  # the token issuers, for the kill switch's spelling of an `iss`
            leeway_seconds=leeway_seconds,  # the token issuers' largest: how far ahead their clocks may run
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._session = session  # the poller's: the root builds it and closes it
        self._loading: list[tuple[list[Entry], list[str]]] | None = None  # changes seen during a reload
        # Entries added (id -> entry) and lifted (id -> None) here that too few Redis replicas confirmed: a failover
        # to a replica without them would make the reload undo them here too, so each reload keeps them here and
        # writes them again, until the replicas confirm or another change (a lift, a new add) overtakes them.
        self._unconfirmed: dict[str, Entry | None] = {}

    # -- for the lead --------------------------------------------------------------------------------

    def count_refusal(self, code: str) -> None:
        """Counts one request refused for revocation (call it with the refusal's code)."""
        self.metrics.refusal(code)

    @property
    def push_enabled(self) -> bool:
        """Whether a transmitter pushes (RFC 8935), so `POST /v1/ssf/events` is served."""
        return any(t.delivery == PUSH for t in self.config.transmitters)

    async def start(self) -> None:
        """Subscribes, loads every entry (retrying up to the start timeout), then starts the loops."""
        await self._with_retry(self._store.subscribe)
        await self._with_retry(self.resync)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._store.listen(self._on_change, self.resync, self._unheard)),
            loop.create_task(self._maintain()),
        ]
        for transmitter, keys in self._transmitters.values():
            self._tasks.append(loop.create_task(keys.run()))
            if transmitter.delivery == POLL:
                poller = Poller(
                    transmitter,
                    keys,
                    self._session,
                    self._receive_polled,
                    functools.partial(self._count_poll, transmitter.issuer),
                    tracing=self._tracing,
                )
                self._tasks.append(loop.create_task(poller.run()))

    async def stop(self) -> None:
        """Stops the loops and releases connections."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._store.close()

    # -- keeping the index in sync ------------------------------------------------------------------

    async def _with_retry(self, step: Callable[[], Awaitable[None]]) -> None:
        deadline = self._clock.monotonic() + START_TIMEOUT_SECONDS
        while True:
            try:
                await step()
                return
            except StateUnavailable:
                if self._clock.monotonic() >= deadline:
                    raise
                await asyncio.sleep(LOAD_RETRY_SECONDS)

    async def resync(self) -> None:
        """Replaces the index with the store's entries; changes seen meanwhile are applied on top."""
        self._loading = []
        try:
            entries = await self._store.sync(self.revocations.entries())
        except StateUnavailable:
            self.metrics.syncs.labels("error").inc()
            raise
        finally:
            pending, self._loading = self._loading, None
        self.revocations.replace(entries)
        if self._unconfirmed:  # before any await: not one request sees them undone
            now = self._clock.now()
            for entry_id, entry in list(self._unconfirmed.items()):
                if entry is not None and not entry.live(now):
                    del self._unconfirmed[entry_id]
            self.revocations.add(e for e in self._unconfirmed.values() if e is not None)
            self.revocations.remove(i for i, e in self._unconfirmed.items() if e is None)
        for added, removed in pending or ():
            self._apply(added, removed)
        self.metrics.syncs.labels("ok").inc()
        self.metrics.entries.set(len(self.revocations))
        if self._unconfirmed:
            await self._confirm()

    async def _confirm(self) -> None:
        """Writes the unconfirmed changes again (a primary promoted without them gets them back, the other replicas
        hear of them) and forgets those the Redis replicas now confirm."""
        added = [e for e in self._unconfirmed.values() if e is not None]
        lifted = [i for i, e in self._unconfirmed.items() if e is None]
        if added:
            await self._write_again([e.id for e in added], self._store.put(added))
        if lifted:
            await self._write_again(lifted, self._store.delete(lifted, replicated=True))

    async def _write_again(self, ids: list[str], write: Awaitable[None]) -> None:
        try:
            await write
        except StateUnavailable as exc:
            log.warning(
                "revocation changes still not confirmed by the Redis replicas; kept here",
                extra={"event": "revocation_not_replicated", "entries": ids, "error": exc.description},
            )
            return
        self._confirmed(ids)

    def _unheard(self) -> None:
        """The subscription is broken or silent: others' entries may be going unheard, so the index refuses to
        decide (503) until the subscription is back and a full reload has run."""
        if self.revocations.out_of_sync():
            log.error(
                "revocation subscription lost; refusing with 503 until it is back and the entries are reloaded",
                extra={"event": "revocation_store"},
            )

    def _on_change(self, added: list[Entry], removed: list[str]) -> None:
        if self._loading is not None:
            self._loading.append((added, removed))
        self._apply(added, removed)

    def _apply(self, added: list[Entry], removed: list[str]) -> None:
        self.revocations.add(added)
        self.revocations.remove(removed)
        self.metrics.entries.set(len(self.revocations))
        if self._unconfirmed:  # an unconfirmed change overtaken by a newer one (this replica's own echo is not)
            for entry in added:
                if entry.id in self._unconfirmed and self._unconfirmed[entry.id] is None:
                    del self._unconfirmed[entry.id]
            for entry_id in removed:
                if self._unconfirmed.get(entry_id) is not None:
                    del self._unconfirmed[entry_id]

    def _keep_unconfirmed(self, added: list[Entry], lifted: Sequence[str]) -> None:
        """Remembers changes the Redis replicas did not confirm (`_unconfirmed`), the oldest forgotten beyond
        `MAX_UNCONFIRMED`."""
        for entry_id in lifted:
            self._unconfirmed.pop(entry_id, None)
            self._unconfirmed[entry_id] = None
        for entry in added:
            self._unconfirmed.pop(entry.id, None)
            self._unconfirmed[entry.id] = entry
        while len(self._unconfirmed) > MAX_UNCONFIRMED:
            forgotten = next(iter(self._unconfirmed))
            del self._unconfirmed[forgotten]
            log.error(
                "too many revocation changes not confirmed by the Redis replicas; forgetting the oldest",
                extra={"event": "revocation_not_replicated", "entries": [forgotten]},
            )

    async def _maintain(self) -> None:
        """Periodically reloads everything and drops entries no live token can match.

        A reload that fails means this replica cannot hear of the entries others add (Redis unreachable from
        here, perhaps not from them): its "no entry" is no longer known, so it refuses with 503 until a reload
        succeeds, tried again every `RESYNC_RETRY_SECONDS`."""
        wait = self.config.resync_interval_seconds
        while True:
            await asyncio.sleep(wait)
            expired = self.revocations.expired()
            try:
                if expired:  # on the store's clock (Redis's), not ours: ours may run ahead of the others'
                    self._apply([], await self._store.expire(expired))
                await self.resync()
                wait = self.config.resync_interval_seconds
            except StateUnavailable as exc:
                if self.revocations.out_of_sync():
                    log.error(
                        "revocation resync failed; refusing with 503 until the entries are reloaded",
                        extra={"event": "revocation_store", "error": exc.description},
                    )
                wait = min(self.config.resync_interval_seconds, RESYNC_RETRY_SECONDS)

    async def add(self, entries: list[Entry], replacing: Sequence[str] = ()) -> None:
        """Stores entries and applies them here at once (the other replicas hear of them by pub/sub); the ids
        `replacing` (entries the new ones supersede) are removed in the same write.

        Entries the primary took but too few Redis replicas confirmed (`RevocationNotReplicated`) are applied here
        all the same (fail closed: this replica refuses what it was told of), counted, and the error raised on,
        so the sender is not acknowledged and sends again. They are also kept (`_unconfirmed`): a sender need not
        retry, and after a failover to a replica that never had them the reloads would drop them, so each reload keeps
        them here and writes them again until the replicas confirm them."""
        try:
            await self._store.put(entries, replacing=replacing)
        except RevocationNotReplicated as exc:
            self._apply(entries, list(replacing))
            self._keep_unconfirmed(entries, replacing)
            self._not_replicated([e.id for e in entries], exc)
            raise
        self._apply(entries, list(replacing))
        self._confirmed([e.id for e in entries])

    def _not_replicated(self, ids: list[str], exc: RevocationNotReplicated) -> None:
        self.metrics.not_replicated.inc()
        log.error(
            "revocation not confirmed by enough Redis replicas; not acknowledged, applied here",
            extra={
                "event": "revocation_not_replicated",
                "entries": ids,
                "replicas": exc.replicas,
                "confirmed": exc.confirmed,
            },
        )

    async def remove(self, ids: list[str], replicated: bool = False) -> None:
        """Removes entries everywhere; `replicated`, confirmed by the Redis replicas as `add` is, else removed here
        all the same, counted and `RevocationNotReplicated` raised on."""
        try:
            await self._store.delete(ids, replicated=replicated)
        except RevocationNotReplicated as exc:
            self._apply([], ids)
            self._keep_unconfirmed([], ids)
            self._not_replicated(ids, exc)
            raise
        self._apply([], ids)
        if replicated:
            self._confirmed(ids)

    def _confirmed(self, ids: list[str]) -> None:
        """The Redis replicas confirmed these (a sender's retry): nothing left to keep."""
        if self._unconfirmed:
            for entry_id in ids:
                self._unconfirmed.pop(entry_id, None)

    # -- receiving SETs -----------------------------------------------------------------------------

    async def receive(self, token: str, *, delivery: str, authorization: str | None = None) -> Effects:
        """Verifies one SET, applies its events, then marks its jti; raises `SetRefused` or `StateUnavailable`.

        `authorization`: a push request's `Authorization` header (`TransmitterConfig.push_authorization`)."""
        self.metrics.sets_received.labels(delivery).inc()
        try:
            verified = await self._verifier.verify(token, delivery=delivery, authorization=authorization)
            effects = effects_of(verified, now=self._clock.now(), entry_lifetime=self.entry_lifetime)
            await self._verifier.check_fresh(verified)
        except SetRefused as exc:
            self.metrics.sets_refused.labels(delivery, "replay" if exc.replay else exc.err).inc()
            log.warning(
                "ssf set refused",
                extra={"event": "ssf_set", "delivery": delivery, "err": exc.err, "description": exc.description},
            )
            raise
        lifted: list[str] = []
        for key, event_time in effects.lift:
            lifted += self.revocations.matching(
                [key],
                Effect.ACCOUNT_DISABLED,
                not_after=event_time,
                source=verified.transmitter.issuer,
                events=LIFTED_BY_ACCOUNT_ENABLED,
            )
        if effects.add:
            await self.add(list(effects.add))
        if lifted:
            await self.remove(lifted)
        for revoked in effects.credentials:
            await self._credentials_revoked(revoked)
        await self._verifier.claim(verified)  # only now: a retry after a failure above is applied again
        self.metrics.sets_accepted.labels(delivery).inc()
        if effects.ignored:
            self.metrics.subjects_ignored.labels(verified.transmitter.issuer).inc(effects.ignored)
        for event in effects.events:
            self.metrics.events.labels(short_name(event)).inc()
        for event in effects.unhandled:
            self.metrics.events_unhandled.labels(short_name(event)).inc()
        log.info(
            "ssf set accepted",
            extra={
                "event": "ssf_set",
                "delivery": delivery,
                "transmitter": verified.transmitter.issuer,
                "jti": verified.jti,
                "events": list(effects.events),
                "entries": [e.id for e in effects.add],
                "lifted": lifted,
                "ignored_subjects": effects.ignored,
                "unhandled": list(effects.unhandled),
            },
        )
        return effects

    async def _credentials_revoked(self, revoked: CredentialRevocation) -> None:
        if self._on_credential_revoked is None:
            return
        try:
            await self._on_credential_revoked(revoked)
        except StateUnavailable:
            # The credential store cannot be written: the key stays usable, so the SET must not be marked received
            # (503 / not acknowledged; the retry stores the same entries and disables the keys again).
            raise
        except Exception:  # a bug in the callback: the entries are stored; retrying would not fix it
            log.exception("credential revocation callback failed", extra={"event": "ssf_set"})

    def _count_poll(self, transmitter: str, result: str) -> None:
        self.metrics.polls.labels(transmitter, result).inc()

    async def _receive_polled(self, token: str) -> Outcome | None:
        try:
            await self.receive(token, delivery=POLL)
        except SetRefused as exc:
            return Outcome(True) if exc.replay else Outcome(False, exc.err, exc.description)
        except (StateUnavailable, ProviderUnavailable):
            # The store, or the transmitter's keys: judged neither way, so neither acknowledged nor reported in
            # `setErrs` (which the transmitter takes as final, dropping the event): delivered again later, as a
            # pushed SET is retried after our 503.
            return None
        return Outcome(True)
