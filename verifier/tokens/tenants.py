"""Issuer templates: one `issuers[]` entry for every tenant of a multi-tenant provider.

`issuer: https://login.microsoftonline.com/{tenant}/v2.0` matches a token's `iss` when the tenant
fills exactly that path segment (`[A-Za-z0-9._-]{1,64}`, no `..`, no `/`, no percent-encoding);
scheme, host and port are the template's, so a token can never choose where keys are fetched from.
Each concrete tenant gets its own `IssuerKeys` (discovery with OIDC Discovery 1.0 section 4.3's exact
issuer check, JWKS, single flight, cooldowns), created on the first token and kept in a bounded LRU.

What a token can make us fetch is bounded: a tenant outside `tenants` is refused before any I/O;
with `tenants: any` a tenant not held costs one discovery, taken from a token bucket of
`new_tenants_per_minute` per template, and a tenant whose discovery failed is not tried again for
`jwks_cooldown_seconds` (a bounded negative cache). A held tenant's JWKS refetch for an unknown kid
takes from the same bucket: each tenant's own cooldown alone let made-up kids sent to `max_tenants`
held tenants cost the provider `max_tenants` fetches per cooldown.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import OrderedDict

from verifier.clock import Clock
from verifier.config.issuer import TENANT_NAME, TENANT_PLACEHOLDER, IssuerSettings
from verifier.errors import ProviderUnavailable, TenantNotAllowed
from verifier.observe.metrics import Metrics
from verifier.observe.tracing import NO_TRACING, Tracing
from verifier.tokens.fetch import Fetcher, url_origin
from verifier.tokens.jwks import REFRESH_AHEAD_SECONDS, IssuerKeys, Withdrawn

SECONDS_PER_MINUTE = 60.0
# How often `run` looks for held tenants whose keys are due: `IssuerKeys.stale` turns true this long before their
# lifetime ends, so a sweep this often starts each refetch by then, as a configured issuer's own loop does.
TENANT_SWEEP_SECONDS = REFRESH_AHEAD_SECONDS


def _retrieved(task: asyncio.Task[IssuerKeys]) -> None:
    if not task.cancelled():
        task.exception()  # a failure is logged and counted by IssuerKeys; waiters get it themselves


class TenantKeys:
    """The keys of every tenant of one issuer template."""

    def __init__(
        self,
        settings: IssuerSettings,
        fetcher: Fetcher,
        clock: Clock,
        metrics: Metrics,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.settings = settings
        self._fetcher = fetcher
        self._clock = clock
        self._metrics = metrics
        self._tracing = tracing
        prefix, suffix = settings.issuer.split(TENANT_PLACEHOLDER)
        self._pattern = re.compile(re.escape(prefix) + r"([A-Za-z0-9._-]{1,64})" + re.escape(suffix))
        self._origin = url_origin(prefix)
        self._allowed = frozenset(settings.tenants)
        self._held: OrderedDict[str, IssuerKeys] = OrderedDict()  # least recently used first
        self.on_withdrawn: Withdrawn | None = None  # handed to each tenant's keys
        self._pending: dict[str, asyncio.Task[IssuerKeys]] = {}  # first fetches in flight
        self._failed: OrderedDict[str, float] = OrderedDict()  # tenant -> when its discovery failed
        self._bucket = float(settings.new_tenants_per_minute)
        self._bucket_at = clock.monotonic()

    def tenant_of(self, iss: str) -> str | None:
        """The tenant `iss` names under this template; None when it does not fit the template.

        Raises `TenantNotAllowed` when it fits but the tenant is not on the allow-list (no I/O).
        """
        match = self._pattern.fullmatch(iss)
        if match is None or not TENANT_NAME.match(match.group(1)):
            return None
        tenant = match.group(1)
        if not self.settings.any_tenant and tenant not in self._allowed:
            raise TenantNotAllowed(f"tenant {tenant!r} is not allowed for this issuer")
        return tenant

    def held(self, tenant: str) -> IssuerKeys | None:
        """The tenant's keys if held, without I/O; keys near their end are refreshed in the background."""
        keys = self._held.get(tenant)
        if keys is not None:
            self._held.move_to_end(tenant)
            if keys.stale:
                keys.refresh_in_background()
        return keys

    async def run(self) -> None:
        """Keeps the held tenants' keys fresh until cancelled (`KeyStore.start`), as each configured issuer's loop
        does (`IssuerKeys.run`). `held` refreshes a tenant's stale keys only when a token of it is verified, and the
        pipeline answers a token it admitted from its token cache: a tenant whose callers all held cached tokens
        never refetched, and a key its provider withdrew (leaked) kept their tokens admitted until their `exp`."""
        while True:
            for keys in list(self._held.values()):
                if keys.stale:
                    keys.refresh_in_background()  # single flight, at most one try per cooldown
            await asyncio.sleep(TENANT_SWEEP_SECONDS)

    async def keys_for(self, tenant: str) -> IssuerKeys:
        """The tenant's keys, discovered and fetched on first use; `ProviderUnavailable` when that cannot be."""
        keys = self.held(tenant)
        if keys is not None:
            return keys
        task = self._pending.get(tenant)
        if task is None:
            failed_at = self._failed.get(tenant)
            now = self._clock.monotonic()
            if failed_at is not None and now - failed_at < self.settings.jwks_cooldown_seconds:
                raise ProviderUnavailable("this tenant's keys could not be fetched; retry later")
            if self.settings.any_tenant and not self._take_token(now):
                raise ProviderUnavailable("too many new tenants of this issuer; retry later")
            task = self._pending[tenant] = asyncio.get_running_loop().create_task(self._first_fetch(tenant))
            task.add_done_callback(_retrieved)
        return await asyncio.shield(task)

    def _admit_refresh(self) -> bool:
        """Whether a held tenant may refetch its keys for an unknown kid: one token from the new-tenant bucket."""
        return self._take_token(self._clock.monotonic())

    def _take_token(self, now: float) -> bool:
        rate = self.settings.new_tenants_per_minute
        self._bucket = min(float(rate), self._bucket + (now - self._bucket_at) * rate / SECONDS_PER_MINUTE)
        self._bucket_at = now
        if self._bucket < 1.0:
            return False
        self._bucket -= 1.0
        return True

    async def _first_fetch(self, tenant: str) -> IssuerKeys:
        keys = IssuerKeys(
            self.settings.for_tenant(tenant),
            self._fetcher,
            self._clock,
            self._metrics,
            self._tracing,
            label=self.settings.issuer,
            origin=self._origin,
            admit=self._admit_refresh if self.settings.any_tenant else None,
        )
        keys.on_withdrawn = self.on_withdrawn
        try:
            await keys.refresh()
        except Exception:  # unavailable, or a document that broke the parser: not asked again this cooldown
            self._remember_failure(tenant)
            raise
        finally:
            self._pending.pop(tenant, None)
        self._failed.pop(tenant, None)
        self._held[tenant] = keys
        while len(self._held) > self.settings.max_tenants:
            _, evicted = self._held.popitem(last=False)
            evicted.release()  # its tokens forgotten too: nothing would see its keys withdrawn
        return keys

    def _remember_failure(self, tenant: str) -> None:
        self._failed[tenant] = self._clock.monotonic()
        self._failed.move_to_end(tenant)
        while len(self._failed) > self.settings.max_tenants:
            self._failed.popitem(last=False)

    @property
    def tenants_held(self) -> int:
        """How many tenants' keys are held."""
        return len(self._held)

    async def stop(self) -> None:
        """Cancels first fetches and refreshes in flight."""
        for keys in self._held.values():
            keys.cancel()
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ProviderUnavailable):
                await task
