"""Issuer keys: OpenID Connect Discovery 1.0 section 4 -> `jwks_uri` -> parsed keys, kept fresh.

Unlike PyJWT's `PyJWKClient` we keep the last good keys when a fetch fails, share one fetch among
concurrent misses (single flight), refresh in the background before the keys go stale (Envoy's
jwks_async_fetcher: shortly before expiry, soon after a failure), and let an unknown `kid` trigger at
most one refresh per issuer per cooldown, so a flood of made-up kids cannot hammer the provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from verifier.clock import Clock
from verifier.errors import ProviderUnavailable, VerifierError
from verifier.observe.metrics import Metrics
from verifier.observe.tracing import NO_TRACING, Tracing
from verifier.settings import DEFAULT_MAX_JWKS_BYTES, DEFAULT_MAX_JWKS_KEYS, IssuerSettings
from verifier.tokens.fetch import Fetcher, FetchResult, check_learned_url
from verifier.tokens.keys import ALG_KEY_TYPES, KeyError_, VerificationKey, parse_key_set

log = logging.getLogger("verifier.jwks")

DEFAULT_JWKS_TTL_SECONDS = 600.0  # when the provider sends no Cache-Control max-age
REFRESH_AHEAD_SECONDS = 5.0  # refetch this long before the keys' lifetime ends
RETRY_AFTER_FAILURE_SECONDS = 1.0  # first retry after a failed fetch; doubles up to the cap
MAX_RETRY_SECONDS = 30.0
# The floor on the time between two rediscoveries (the provider's jwks_uri looked up again after a failed JWKS fetch
# or an unknown kid a refetch did not find): at most one per `jwks_cooldown_seconds`, and never more often than this.
MIN_REDISCOVERY_SECONDS = 1.0
# Keys a token without a `kid` may be tried against (RFC 7515 section 4.1.4 makes `kid` optional): every held key
# fitting its `alg`, as JOSE libraries do, so that a rotation overlap (the old key and the new one published side
# by side) does not refuse the provider's new tokens. Bounded, so that a forged kid-less token costs at most this
# many signature checks; an issuer publishing more keys for one alg has its kid-less tokens refused (`key_unknown`)
# and a `config_warning` (`jwks_kidless_ambiguous`) logged, never only some of its keys tried.
MAX_KIDLESS_KEYS = 4
AMBIGUOUS_KID_MESSAGE = "jwks publishes two keys of one type under one kid: tokens naming it are refused (key_unknown)"

# Told (issuer, kids) when a good fetch no longer holds keys the previous one held (or holds other key
# material under their kid, or the same key with an `alg` that allows fewer algs): tokens verified under them,
# remembered by the token cache, must be judged again.
# Told (issuer, no kids) when a good fetch adds keys and withdraws none: a token without a kid refused under
# the keys of before (none of them verified it) may verify under a new one, so refusals are judged again too.
Withdrawn = Callable[[str, frozenset[str | None]], None]


class IssuerKeys:
    """The current keys of one issuer, and the machinery that keeps them current."""

    def __init__(
        self,
        settings: IssuerSettings,
        fetcher: Fetcher,
        clock: Clock,
        metrics: Metrics,
        tracing: Tracing = NO_TRACING,
        *,
        label: str = "",
        origin: str = "",
        admit: Callable[[], bool] | None = None,
    ) -> None:
        """`origin` (scheme://host[:port]), when given, is the only place learned URLs may point to; `admit`,
        when given, is asked before an unknown kid starts a fetch (an issuer template's budget: False, spent)."""
        self.settings = settings
        # The metrics label: the configured issuer (a template's tenants share theirs, so a flood of
        # made-up tenant names cannot grow the metrics without bound).
        self._label = label or settings.issuer
        self._fetcher = fetcher
        self._tracing = tracing  # a CLIENT span around each discovery and JWKS fetch
        self._clock = clock
        self._metrics = metrics
        self._by_kid: dict[str, VerificationKey] = {}
        # Kids more than one key shares, with all of them: RFC 7517 section 4.5 allows keys of different kty
        # under one kid. Asked only when the kid's key in `_by_kid` does not fit the alg (rare).
        self._shared_kids: dict[str, tuple[VerificationKey, ...]] = {}
        self._keys: tuple[VerificationKey, ...] = ()
        # Kids under which the set publishes two keys of one type (other key material): which one signed is not
        # ours to guess, so neither is held (`_parse`) and a token naming the kid is refused (`key_unknown`).
        self._ambiguous: frozenset[str] = frozenset()
        # alg -> the held keys fitting it, for tokens without a kid (`kidless`), the one that verified the last
        # such token first. Filled on first use, emptied by every fetch; only algs of `ALG_KEY_TYPES` (bounded).
        self._kidless: dict[str, tuple[VerificationKey, ...]] = {}
        self.metadata: Mapping[str, Any] = {}
        self._jwks_uri = settings.jwks_uri
        # Discovery is run again (rate-limited: `_rediscovery_due`) once the jwks_uri it named failed or a kid a
        # refetch from it did not find is asked for: a provider that moved its JWKS is followed, as Kong's
        # openid-connect plugin does; the old keys stay until the new ones are fetched.
        self._rediscover = False
        self._discovered_at = -math.inf
        self._expires_at = 0.0
        self._fetched_at: float | None = None
        self._last_attempt = -1e18
        self._failures = 0
        self._inflight: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self._origin = origin
        self._admit = admit
        self.on_withdrawn: Withdrawn | None = None
        if settings.static_jwks:  # jwks_file / jwks_inline: checked when the settings were loaded
            self._keys, self._ambiguous = self._parse(json.loads(settings.static_jwks), require_one=True)
            self._by_kid, self._shared_kids = _by_kid(self._keys)
            self._warn_kidless(())
            # Never due (refresh_interval() is +Inf: the key-age alert cannot fire for keys on disk).
            self._fetched_at, self._expires_at = clock.monotonic(), math.inf
            self.ready.set()

    @property
    def kids(self) -> tuple[str | None, ...]:
        """The kids currently held."""
        return tuple(k.kid for k in self._keys)

    def find(self, kid: str | None, alg: str) -> VerificationKey | None:
        """The key for `kid` that fits `alg`; without a kid, the first of `kidless(alg)` (try them all: `verify`)."""
        if kid is not None:
            key = self._by_kid.get(kid)
            if key is not None and key.fits(alg):
                return key
            shared = self._shared_kids.get(kid) if key is not None else None
            return next((k for k in shared if k.fits(alg)), None) if shared else None
        fitting = self.kidless(alg)
        return fitting[0] if fitting else None

    def _fitting(self, alg: str) -> tuple[VerificationKey, ...]:
        """Every held key that fits `alg` (its type, curve and own `alg`, as for a token with a kid)."""
        fitting = self._kidless.get(alg)
        if fitting is None:
            fitting = tuple(k for k in self._keys if k.fits(alg))
            if alg in ALG_KEY_TYPES:  # an alg no key fits is not kept: the sender's words do not grow the dict
                self._kidless[alg] = fitting
        return fitting

    def kidless(self, alg: str) -> tuple[VerificationKey, ...]:
        """The keys a token without a kid is tried against, in order (the one that verified the last such token
        first): every held key fitting `alg`; none when more than `MAX_KIDLESS_KEYS` fit (`ambiguous`)."""
        fitting = self._fitting(alg)
        return fitting if len(fitting) <= MAX_KIDLESS_KEYS else ()

    def ambiguous(self, alg: str) -> bool:
        """Whether more than `MAX_KIDLESS_KEYS` held keys fit `alg`: a token without a kid is then refused."""
        return len(self._fitting(alg)) > MAX_KIDLESS_KEYS

    def verify(self, alg: str, signing_input: bytes, signature: bytes) -> VerificationKey | None:
        """The key among `kidless(alg)` whose signature this is (tried in order, at most `MAX_KIDLESS_KEYS`), or
        None. The key that verified is tried first for the next token without a kid: after a rotation overlap
        the new key signs them all, so each costs one signature check again."""
        fitting = self.kidless(alg)
        for index, key in enumerate(fitting):
            if key.verify(alg, signing_input, signature):
                if index:
                    self._kidless[alg] = (key, *fitting[:index], *fitting[index + 1 :])
                return key
        return None

    def has_kid(self, kid: str | None) -> bool:
        """Whether a key with this kid is held (whatever its type), or the kid is `ambiguous_kid`."""
        return kid in self._by_kid or kid in self._ambiguous

    def ambiguous_kid(self, kid: str) -> bool:
        """Whether the set publishes two keys of one type under `kid`: its tokens are refused, no refetch asked."""
        return kid in self._ambiguous

    async def key_for(self, kid: str | None, alg: str, *, retry_while_cooling: bool = False) -> VerificationKey | None:
        """Finds the key, refreshing at most once per cooldown when the kid is unknown.

        `retry_while_cooling`: an unknown kid that the cooldown keeps from being looked up raises
        `ProviderUnavailable` instead of None. For a message whose sender retries a 503 but drops it on a
        400 (a revocation event): anyone can start the cooldown with a made-up kid just before the sender
        rotates its key, and the event signed with the new key must be judged later, not thrown away.
        """
        key = self.find(kid, alg)
        if key is not None or self.has_kid(kid) or self.settings.static_jwks:
            return key  # a known kid of the wrong type, an ambiguous one, keys from a file: refreshing would not help
        cooling = self._clock.monotonic() - self._last_attempt < self.settings.jwks_cooldown_seconds
        if cooling and self._inflight is None:
            if self._failures:
                # The last fetch failed: we cannot tell a rotated key from a forged one. Fail
                # closed with 503 (retry later), not 401 (throw the token away).
                raise ProviderUnavailable("issuer keys unavailable")
            if retry_while_cooling:
                raise ProviderUnavailable("unknown kid; the sender's keys are fetched again after the cooldown")
            return None  # a fetch succeeded recently: an unknown kid now is just unknown
        if self._inflight is None and self._admit is not None and not self._admit():
            # The template's budget is spent (made-up kids sent to many tenants): no fetch, and no verdict
            # on a token whose kid may be a real new key.
            raise ProviderUnavailable("too many key refreshes for this issuer; retry later")
        await self.refresh()  # ProviderUnavailable propagates: 503, never a verdict on the token
        key = self.find(kid, alg)
        if key is None and kid is not None and kid not in self._by_kid and not self.settings.jwks_uri:
            # Still unknown: the provider may have moved its JWKS (the old jwks_uri still answering its old keys).
            # Discovery is asked again (rate-limited: `_rediscovery_due`; a template's tenant also takes from its
            # budget), and a new jwks_uri it names is fetched; the keys held stay until then.
            self._rediscover = True
            if self._inflight is not None or (self._rediscovery_due() and (self._admit is None or self._admit())):
                await self.refresh(relocate=True)
                key = self.find(kid, alg)
        return key

    async def refresh(self, *, relocate: bool = False) -> None:
        """Fetches the keys once, however many callers ask at the same time (single flight). `relocate`: run
        discovery first, and fetch only when it names another jwks_uri (a fetch in flight is joined instead)."""
        task = self._inflight
        if task is None or task.done():  # a fetch that just ended (its callback not yet run) is not this one
            task = self._start(relocate=relocate)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            waiter = asyncio.current_task()
            if waiter is None or waiter.cancelling() or not task.cancelled():
                raise  # this waiter is being cancelled (its deadline, shutdown): that is its own to handle
            # The fetch was cancelled under it (its tenant evicted from the template's LRU): no keys, so no
            # verdict on the token, and never a cancellation the caller did not ask for.
            raise ProviderUnavailable("issuer keys fetch was cancelled; retry later") from None

    def _start(self, *, relocate: bool = False) -> asyncio.Task[None]:
        task = self._inflight = asyncio.get_running_loop().create_task(self._refresh(relocate=relocate))
        task.add_done_callback(self._settled)
        return task

    @property
    def stale(self) -> bool:
        """Whether the keys are due for their refresh (never fetched, or near the end of their lifetime)."""
        return self._clock.monotonic() >= self._expires_at - REFRESH_AHEAD_SECONDS

    def refresh_in_background(self) -> None:
        """Starts a refresh without waiting for it: single flight, at most one try per cooldown."""
        cooling = self._clock.monotonic() - self._last_attempt < self.settings.jwks_cooldown_seconds
        if self._inflight is None and not cooling:
            self._start()

    def cancel(self) -> None:
        """Cancels a fetch in flight (at shutdown)."""
        if self._inflight is not None:
            self._inflight.cancel()

    def release(self) -> None:
        """These keys are let go (a template's tenant evicted): a fetch in flight is cancelled, and `on_withdrawn`
        is told of every key held. Nothing watches them for withdrawal any more, so the tokens they verified are
        forgotten now, not taken from the token cache until their `exp` while the provider may withdraw a key
        unseen; the tenant's next request fetches its keys and is judged afresh."""
        self.cancel()
        if self._keys and self.on_withdrawn is not None:
            self.on_withdrawn(self.settings.issuer, frozenset({k.kid for k in self._keys} | {None}))

    def _settled(self, task: asyncio.Task[None]) -> None:
        # Cleared by the task itself, not by a waiter: a cancelled waiter must not leave a finished
        # fetch behind for the next caller to mistake for a fresh one.
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved: a failure is already logged and counted

    async def _refresh(self, *, relocate: bool = False) -> None:
        self._last_attempt = self._clock.monotonic()
        timeout = self.settings.fetch_timeout_seconds
        issuer = self.settings.issuer
        try:
            # One deadline for discovery and JWKS together, whatever the fetcher does on its own.
            async with asyncio.timeout(timeout):
                if relocate and not await self._relocated(timeout):
                    return  # discovery names the jwks_uri just fetched: nothing new to fetch
                (keys, ambiguous), result = await self._fetch(timeout)
        except TimeoutError:
            error = ProviderUnavailable("issuer keys fetch timed out")
            self._failed(error)
            raise error from None
        except ProviderUnavailable as exc:
            self._failed(exc)
            raise
        self._failures = 0
        self._rediscover = False
        before, self._keys, self._ambiguous = self._keys, keys, ambiguous
        self._by_kid, self._shared_kids = _by_kid(keys)
        self._kidless = {}
        self._warn_kidless(before)
        withdrawn = _withdrawn(before, keys)
        if withdrawn:
            kids = sorted(map(str, withdrawn))
            log.warning(
                "jwks keys withdrawn (or their alg narrowed)",
                extra={"event": "jwks_withdrawn", "issuer": issuer, "kids": kids},
            )
            if self.on_withdrawn is not None:
                self.on_withdrawn(issuer, withdrawn)
        elif before and self.on_withdrawn is not None and _withdrawn(keys, before):  # keys added, none withdrawn
            self.on_withdrawn(issuer, frozenset())
        ttl = result.max_age if result.max_age is not None else DEFAULT_JWKS_TTL_SECONDS
        ttl = min(max(ttl, self.settings.jwks_min_ttl_seconds), self.settings.jwks_max_ttl_seconds)
        now = self._clock.monotonic()
        self._fetched_at = now
        self._expires_at = now + ttl
        self._metrics.jwks_fetch(self._label, "ok")
        self._metrics.jwks_keys(self._label, len(keys))
        log.info("jwks loaded", extra={"event": "jwks_fetch", "issuer": issuer, "kids": [k.kid for k in keys]})
        self.ready.set()

    def _warn_kidless(self, before: Sequence[VerificationKey]) -> None:
        """Logs a `config_warning` for each allowed alg more than `MAX_KIDLESS_KEYS` held keys fit (tokens without
        a kid refused), when the keys of `before` did not already have it logged: at start-up, and at the refresh
        that brings it, not at every one."""
        already = {alg for alg, _ in kidless_ambiguous(before, self.settings.algorithms)}
        for alg, count in kidless_ambiguous(self._keys, self.settings.algorithms):
            if alg not in already:
                log.warning(
                    kidless_ambiguous_message(alg, count),
                    extra={
                        "event": "config_warning",
                        "code": "jwks_kidless_ambiguous",
                        "issuer": self.settings.issuer,
                        "alg": alg,
                        "keys": count,
                    },
                )

    def _rediscovery_due(self) -> bool:
        """Whether discovery is to be run before the next JWKS fetch: never for a configured jwks_uri; before the
        first good fetch, whenever none was found or the last try failed (as ever); after it, once the jwks_uri
        failed or a kid stayed unknown (`_rediscover`), at most once per `jwks_cooldown_seconds` (floor
        `MIN_REDISCOVERY_SECONDS`)."""
        if self.settings.jwks_uri:
            return False
        if not self._jwks_uri or (self._rediscover and self._fetched_at is None):
            return True
        interval = max(self.settings.jwks_cooldown_seconds, MIN_REDISCOVERY_SECONDS)
        return self._rediscover and self._clock.monotonic() - self._discovered_at >= interval

    async def _relocated(self, timeout: float) -> bool:
        """Runs discovery again (when due); whether it named another jwks_uri than the one held."""
        if not self._rediscovery_due():
            return False
        held = self._jwks_uri
        await self._discover(timeout)
        if self._jwks_uri == held:
            self._rediscover = False  # the jwks_uri just fetched is still the provider's
            return False
        return True

    async def _fetch(self, timeout: float) -> tuple[tuple[tuple[VerificationKey, ...], frozenset[str]], FetchResult]:
        if self._rediscovery_due():
            await self._discover(timeout)
        with self._tracing.fetch("jwks", "GET", self._jwks_uri):
            result = await self._fetcher.get_json(self._jwks_uri, timeout=timeout, max_bytes=DEFAULT_MAX_JWKS_BYTES)
        # A JWK Set with no usable key is a good fetch that withdraws every key (a provider that disabled its
        # only, leaked, key): refusing it and keeping the last keys would have them vouch for as long as it lasts.
        return self._parse(result.document, require_one=False), result

    def _failed(self, error: ProviderUnavailable) -> None:
        self._failures += 1
        self._metrics.jwks_fetch(self._label, "error")
        self._rediscover = not self.settings.jwks_uri  # the provider may have moved its JWKS: `_rediscovery_due`
        log.warning(
            "jwks fetch failed",
            extra={
                "event": "jwks_fetch",
                "issuer": self.settings.issuer,
                "error": error.description,
                "kept": len(self._keys),
            },
        )

    async def _discover(self, timeout: float) -> None:
        self._discovered_at = self._clock.monotonic()
        with self._tracing.fetch("discovery", "GET", self.settings.discovery):
            result = await self._fetcher.get_json(
                self.settings.discovery, timeout=timeout, max_bytes=DEFAULT_MAX_JWKS_BYTES
            )
        doc = result.document
        if not isinstance(doc, dict):
            raise ProviderUnavailable("discovery document is not a JSON object")
        # OIDC Discovery section 4.3: the issuer in the document must be exactly the one we asked.
        if doc.get("issuer") != self.settings.issuer:
            raise ProviderUnavailable("discovery issuer does not match the configured issuer")
        jwks_uri = check_learned_url(
            doc.get("jwks_uri"), issuer=self.settings.issuer, what="jwks_uri", origin=self._origin
        )
        self.metadata = doc
        if not self.settings.jwks_uri:
            if self._jwks_uri and jwks_uri != self._jwks_uri:
                log.warning(
                    "jwks_uri moved: the keys are fetched from the new one (the old keys kept until then)",
                    extra={
                        "event": "jwks_uri_moved",
                        "issuer": self.settings.issuer,
                        "old": self._jwks_uri,
                        "new": jwks_uri,
                    },
                )
            self._jwks_uri = jwks_uri

    def _parse(self, document: Any, *, require_one: bool) -> tuple[tuple[VerificationKey, ...], frozenset[str]]:
        """The set's usable keys, and the kids left out because two keys of one type share them (`ambiguous_kids`)."""
        try:
            keys, skipped = parse_key_set(document, max_keys=DEFAULT_MAX_JWKS_KEYS, require_one=require_one)
        except KeyError_ as exc:
            raise ProviderUnavailable(str(exc)) from None
        for error in skipped:
            log.warning(
                "jwks key skipped", extra={"event": "jwks_key_skipped", "issuer": self.settings.issuer, "error": error}
            )
        ambiguous = ambiguous_kids(keys)
        if ambiguous:  # once per fetch
            log.warning(
                AMBIGUOUS_KID_MESSAGE,
                extra={"event": "jwks_kid_ambiguous", "issuer": self.settings.issuer, "kids": sorted(ambiguous)},
            )
            keys = tuple(k for k in keys if k.kid not in ambiguous)
        if not keys:
            log.warning(
                "jwks holds no usable signing key: every token of this issuer is refused (key_unknown)",
                extra={"event": "jwks_no_keys", "issuer": self.settings.issuer, "skipped": len(skipped)},
            )
        return keys, ambiguous

    def next_refresh_in(self) -> float:
        """Seconds until the background loop should fetch again."""
        if self._failures:
            return float(min(RETRY_AFTER_FAILURE_SECONDS * 2.0 ** (self._failures - 1), MAX_RETRY_SECONDS))
        return max(self._expires_at - REFRESH_AHEAD_SECONDS - self._clock.monotonic(), 0.5)

    def refresh_interval(self) -> float:
        """Seconds between refreshes the last good fetch asked for (its max-age within the configured bounds)."""
        return max(self._expires_at - (self._fetched_at or 0.0), 0.0)

    def key_age(self) -> float | None:
        """Seconds since the keys were last fetched."""
        return None if self._fetched_at is None else self._clock.monotonic() - self._fetched_at

    async def run(self) -> None:
        """Keeps the keys fresh until cancelled (keys from a file or the YAML change on reload only)."""
        while not self.settings.static_jwks:
            try:
                await self.refresh()
            except ProviderUnavailable:
                pass  # logged and counted; the last good keys stay
            except Exception:  # a hostile document must not end the loop for good
                self._failures += 1
                log.exception("jwks refresh crashed", extra={"event": "jwks_fetch", "issuer": self.settings.issuer})
            await asyncio.sleep(self.next_refresh_in())


def kidless_ambiguous(keys: Sequence[VerificationKey], algorithms: Sequence[str]) -> list[tuple[str, int]]:
    """Each allowed alg that more than `MAX_KIDLESS_KEYS` of `keys` fit, with how many: a token of that alg
    without a kid is refused (`key_unknown`), whichever key signed it."""
    counts = ((alg, sum(k.fits(alg) for k in keys)) for alg in algorithms)
    return [(alg, count) for alg, count in counts if count > MAX_KIDLESS_KEYS]


def kidless_ambiguous_message(alg: str, count: int) -> str:
    """The `jwks_kidless_ambiguous` warning's text (logged on a fetch; printed by `check-config` for a static JWKS)."""
    return (
        f"the JWKS holds {count} keys for {alg}, more than {MAX_KIDLESS_KEYS}: a token without a kid is refused "
        "(key_unknown), whichever key signed it; tokens with a kid are not affected. Have the provider put a kid in "
        "its tokens, or publish fewer keys"
    )


def _by_kid(
    keys: Sequence[VerificationKey],
) -> tuple[dict[str, VerificationKey], dict[str, tuple[VerificationKey, ...]]]:
    """Each kid's key (the last one under it), and every key of the kids that several keys share (of other types,
    or the same key listed twice: `ambiguous_kids` were left out)."""
    by_kid = {k.kid: k for k in keys if k.kid is not None}
    shared: dict[str, tuple[VerificationKey, ...]] = {}
    if len(by_kid) < sum(k.kid is not None for k in keys):
        for key in keys:
            if key.kid is not None:
                shared[key.kid] = (*shared.get(key.kid, ()), key)
        shared = {kid: held for kid, held in shared.items() if len(held) > 1}
    return by_kid, shared


def ambiguous_kids(keys: Sequence[VerificationKey]) -> frozenset[str]:
    """The kids under which `keys` hold two keys of one type (`kty`) with other key material. RFC 7517 section 4.5
    lets keys of different types share a kid (the token's alg picks one); of two of one type the last one listed won,
    silently. The same key listed twice (with another `alg`, say) is no ambiguity."""
    seen: dict[tuple[str, str], bytes] = {}
    ambiguous: set[str] = set()
    for key in keys:
        if key.kid is not None:
            material = _identity(key)[1]
            if seen.setdefault((key.kid, key.kty), material) != material:
                ambiguous.add(key.kid)
    return frozenset(ambiguous)


def _identity(key: VerificationKey) -> tuple[str | None, bytes]:
    return key.kid, key.key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _withdrawn(before: Sequence[VerificationKey], after: Sequence[VerificationKey]) -> frozenset[str | None]:
    """The kids of keys held `before` that `after` does not hold (the same kid with other key material counts), or
    holds only for fewer algs: a key republished with an `alg` (first without one, or with another) no longer vouches
    for the tokens it verified under the algs it left, so its kid counts as withdrawn (the tokens it verified under
    its remaining alg are judged afresh, and pass again)."""
    if not before:
        return frozenset()
    kept: dict[tuple[str | None, bytes], set[str | None]] = {}
    for key in after:
        kept.setdefault(_identity(key), set()).add(key.alg)
    return frozenset(k.kid for k in before if not _allows(kept.get(_identity(k)), k.alg))


def _allows(algs: set[str | None] | None, alg: str | None) -> bool:
    """Whether a key published with these `alg` members (None: no `alg`, every alg of its type) still allows every
    alg that one published with `alg` allowed."""
    return algs is not None and (None in algs or alg in algs)


class Tenants(Protocol):
    """The keys of an issuer template's tenants (verifier.tokens.tenants.TenantKeys)."""

    settings: IssuerSettings

    def tenant_of(self, iss: str) -> str | None:
        """The tenant `iss` names under the template, None if it does not fit; refuses one not allowed."""
        ...

    on_withdrawn: Withdrawn | None

    def held(self, tenant: str) -> IssuerKeys | None:
        """The tenant's keys if held, without I/O."""
        ...

    async def keys_for(self, tenant: str) -> IssuerKeys:
        """The tenant's keys, fetched on first use."""
        ...

    async def run(self) -> None:
        """Keeps the held tenants' keys fresh until cancelled."""
        ...

    async def stop(self) -> None:
        """Cancels fetches in flight."""
        ...


class KeyStore:
    """All issuers' keys: by exact issuer string, and the tenants of each issuer template."""

    def __init__(self, issuers: Mapping[str, IssuerKeys], templates: Sequence[Tenants] = ()) -> None:
        self.issuers = dict(issuers)
        self.templates = tuple(templates)
        self._tasks: list[asyncio.Task[None]] = []

    def get(self, issuer: str) -> IssuerKeys | None:
        """The keys of a configured issuer, or of a template's tenant whose keys are held (no I/O, no refusal)."""
        keys = self.issuers.get(issuer)
        if keys is not None:
            return keys
        with contextlib.suppress(VerifierError):  # a tenant not allowed has no keys
            found = self.template_of(issuer)
            if found is not None:
                return found[0].held(found[1])
        return None

    def template_of(self, issuer: str) -> tuple[Tenants, str] | None:
        """The template `issuer` fits and its tenant; raises `TenantNotAllowed` when it fits templates
        only with a tenant none of them allows (no I/O)."""
        refused: VerifierError | None = None
        for template in self.templates:
            try:
                tenant = template.tenant_of(issuer)
            except VerifierError as exc:  # TenantNotAllowed: another template may still allow it
                refused = exc
                continue
            if tenant is not None:
                return template, tenant
        if refused is not None:
            raise refused
        return None

    def configured(self, issuer: str) -> str:
        """The `issuers[].issuer` entry that covers `issuer` (itself, or its template); empty when none."""
        if issuer in self.issuers:
            return issuer
        with contextlib.suppress(VerifierError):
            found = self.template_of(issuer)
            if found is not None:
                return found[0].settings.issuer
        return ""

    def watch_withdrawn(self, callback: Withdrawn) -> None:
        """Has `callback` told of every key an issuer (or a template's tenant) withdraws from its JWKS."""
        for keys in self.issuers.values():
            keys.on_withdrawn = callback
        for template in self.templates:
            template.on_withdrawn = callback

    def start(self) -> None:
        """Starts every issuer's background refresh loop (the first iteration fetches at once), and each template's,
        which refreshes its held tenants' keys (their tokens answered from the token cache never ask for them)."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(keys.run()) for keys in self.issuers.values()]
        self._tasks += [loop.create_task(template.run()) for template in self.templates]

    @property
    def ready(self) -> bool:
        """True once every issuer has had one good fetch."""
        return all(keys.ready.is_set() for keys in self.issuers.values())

    async def wait_ready(self) -> None:
        """Waits until every issuer has keys."""
        await asyncio.gather(*(keys.ready.wait() for keys in self.issuers.values()))

    async def stop(self) -> None:
        """Cancels the refresh loops and the tenants' fetches."""
        for template in self.templates:
            await template.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
