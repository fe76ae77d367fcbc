"""The `state` section: where shared state (replay caches, token buckets, revocations) lives.

```yaml
state:                               # optional; without it (or without redis_url) state is in memory
  redis_url: "redis://10.0.0.5:6379/0"   # redis://, rediss:// (TLS) or unix://; no password here
  password_env: VERIFIER_REDIS_PASSWORD  # optional: the environment variable holding the password
  key_prefix: "payments-prod:"       # required with redis_url: this deployment's namespace in Redis
  timeout_seconds: 0.25              # per socket operation; past it the request fails closed (503)
  max_entries: 100000                # without redis_url: rate-limit buckets per process (idle ones go first)
  max_replay_entries: 1000000        # without redis_url: live one-time values, every purpose together
  redis_max_replay_entries: 4000000  # with redis_url: the same in Redis, every replica together
  redis_max_buckets: 1000000         # with redis_url: rate-limit buckets in Redis, every replica together
  webauthn_replay_share: 0.02        # of the bound in use reserved for WebAuthn challenges; DPoP proofs get the rest
  revocation_replay_share: 0.02      # of the bound in use reserved for SET and logout-token jtis
  redis_revocation_replicas: 0       # with redis_url: Redis replicas that confirm a revocation (WAIT) before its 2xx
  # path: /var/lib/verifier          # only without redis_url: a directory for the durable local store
```

Without `redis_url`, revocation entries (kill switch, SSF events) and the replay keys (DPoP proof
`jti`s, WebAuthn challenges, SET and logout-token `jti`s) are kept in SQLite files in `path`, so
they survive a full restart; without `path`, `verifier serve` keeps them in a temporary directory
for the supervisor's lifetime (a reload or a worker restart keeps them, a full restart does not).
Token buckets stay in each process's memory.

The replay keys are bounded per purpose (`Purpose`): DPoP proof `jti`s, which any authenticated client
can mint as fast as he likes, WebAuthn challenges, and revocation events (SET and logout-token `jti`s)
each get their own part of `max_replay_entries`, and a part full of live values refuses new values of
its purpose only (503 `replay_store_full`), so a flood of DPoP proofs never delays a revocation.
With `redis_url` the same shares split `redis_max_replay_entries`, a bound every replica shares, counted in
Redis itself (`verifier.state.redis`): a DPoP flood then stops at its part, below Redis's `maxmemory`, and
the revocation writes still have room. The rate-limit buckets in Redis (one per identity) are bounded the same
way by `redis_max_buckets`: a caller minting identities (many client credentials, a multi-tenant issuer) stops
there, a new identity's first request refused (503, Retry-After), not at a full Redis that refuses every write.
That bound is split per `issuers[]` entry by `split_bound`, as the replay bound is per purpose
(`issuers[].max_buckets_share`, the entries without one equal parts of the rest: `Settings.redis_bucket_bounds`),
so identities minted at one issuer stop at its part and never take another issuer's places.

Redis replicates asynchronously, so a revocation the primary took can be lost when a replica is promoted
(Sentinel, a managed Redis's failover) before it had it, after its sender was acknowledged. With
`redis_revocation_replicas` n > 0 every revocation write (SSF event, logout, kill switch) is followed by
`WAIT n` (`verifier.revocation.store`): fewer confirmations and the sender gets 503 and retries, while the entry
is in effect on the primary and this replica all the same. 0 (the default) asks nothing of replicas. The
decision path never waits; the one-time keys (DPoP proofs and the rest) are not waited for.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from collections.abc import Mapping
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from verifier.config.base import Reader, read_fields, setting
from verifier.private_files import REPLAY_FILE, REVOCATIONS_FILE, sqlite_problem

DEFAULT_MAX_ENTRIES = 100_000  # memory store: rate-limit buckets held (idle ones go first); ~300 bytes each
# Without Redis: live one-time values (DPoP `jti`s, WebAuthn challenges, SET and logout-token `jti`s)
# held at once. Past it a new value is refused (503 replay_store_full), never a live one forgotten. A
# worker serves at most a few thousand DPoP proofs a second and a DPoP `jti` lives 66 s by default
# (`dpop.iat_past_seconds` + `iat_future_seconds` + 1 for a proof made now), at most 71 s (one signed
# `iat_future_seconds` ahead: `DpopConfig.jti_ttl`): 4,000/s x 71 s = 284,000; three and a
# half times that leaves room for a burst or longer windows. ~100 bytes each in memory (~100 MB when full), ~145 in
# the SQLite file (1 KB pages); both grow only as values arrive.
DEFAULT_MAX_REPLAY_ENTRIES = 1_000_000
# Shares of `max_replay_entries` reserved for the purposes a client cannot mint at will; DPoP proofs get
# the rest (96% by default). 2% of the default is 20,000 live values each: revocation events arrive a
# few a second at most (an SET or logout-token `jti` lives until its `iat` + `max_age_seconds` + leeway + 1,
# at most `max_age_seconds` + 2 x leeway + 1: 361 s for a logout token by default, ~55/s sustained to fill
# it; a mass logout of 20,000 sessions at once still fits), WebAuthn challenges at human speed (a challenge
# lives until its expiry + `verifier.config.webauthn.CLOCK_SKEW_SECONDS` + 1, at most 151 s by default).
# With Redis: live one-time values of every replica together, split by the same shares (DPoP 3,840,000). A
# deployment's DPoP proofs at 54,000 a second for 71 s fill the DPoP part: several times a busy deployment's
# peak. A replay key costs ~165 bytes in Redis 7.0 (measured with a 9-byte prefix), so a full bound is
# ~660 MB; `maxmemory` must hold it with room to spare, or Redis is full (every write refused, revocations'
# too) before the bound is: the verifier warns at start-up (`REDIS_BYTES_PER_REPLAY_KEY` below).
DEFAULT_REDIS_MAX_REPLAY_ENTRIES = 4_000_000
REDIS_BYTES_PER_REPLAY_KEY = 200  # the estimate the start-up check uses: the measured 165, a longer prefix
# With Redis: rate-limit buckets (one per identity: issuer and sub, or client id) of every replica together.
# A bucket lives until it would be full again (burst / rate: 1,000 s at 0.001/s) and is counted that long after
# its creation, again when a take moves its expiry past that; so the bound is identities first seen within a
# bucket's time-to-full, about 1,000 new ones a second sustained for 1,000 s: well above what a deployment's
# own users and clients make. Past it a new identity's first request is refused (503, Retry-After), the
# buckets that exist are served; split per `issuers[]` entry (`split_bound`). A bucket key costs ~160 bytes in
# Redis 7.0 (a 32-hex-digit identity hash behind a 9-byte prefix): ~200 MB when full, in `maxmemory`'s arithmetic
# with the replay keys'.
DEFAULT_REDIS_MAX_BUCKETS = 1_000_000
REDIS_BYTES_PER_BUCKET_KEY = 250  # the estimate the start-up check uses: the measured 215, a longer prefix
DEFAULT_WEBAUTHN_REPLAY_SHARE = 0.02
DEFAULT_REVOCATION_REPLAY_SHARE = 0.02
MAX_REPLAY_SHARE = 0.25  # a fraction: a reserved part above a quarter leaves DPoP, the bulk, too little
# Redis replicas that must confirm a revocation write (WAIT) before its sender is acknowledged. 0: none asked
# (a failover may lose an acknowledged revocation). Above 16 is a typo: Redis deployments run a handful.
DEFAULT_REDIS_REVOCATION_REPLICAS = 0
MAX_REDIS_REVOCATION_REPLICAS = 16
DEFAULT_KEY_PREFIX = "verifier:"  # namespace for every key this verifier writes
# Seconds per Redis socket operation (connect, write, read). Redis sits a LAN hop away; a request
# waiting longer than this is better refused (503, fail closed) than left hanging at the gateway.
DEFAULT_TIMEOUT_SECONDS = 0.25
MAX_TIMEOUT_SECONDS = 5.0  # seconds; a slower answer holds the gateway's request too long
_REDIS_SCHEMES = ("redis", "rediss", "unix")
K = TypeVar("K")  # what a bound is split by: a purpose's name, an issuer entry


class Purpose(enum.StrEnum):
    """What a one-time value is for. Each purpose has its own bound in every replay store, so filling
    one never refuses another; the value is the `purpose` label of `verifier_replay_store_full_total`
    (three fixed values, never one a client chose)."""

    DPOP = "dpop"  # DPoP proof jtis (RFC 9449 section 11.1): any authenticated client mints them at will
    WEBAUTHN = "webauthn"  # WebAuthn step-up challenges and registration states
    REVOCATION = "revocation"  # SET (RFC 8417) and back-channel logout-token jtis: revocations


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReplayBounds:
    """Live one-time values a replay store holds per purpose (a local one, or Redis for every replica); each at
    least 1."""

    dpop: int
    webauthn: int
    revocation: int

    def __post_init__(self) -> None:
        if min(self.dpop, self.webauthn, self.revocation) < 1:
            raise ValueError("every replay bound must be at least 1")

    def of(self, purpose: Purpose) -> int:
        """The bound of `purpose`."""
        return int(getattr(self, purpose.name.lower()))

    @classmethod
    def split(
        cls,
        total: int,
        *,
        webauthn_share: float = DEFAULT_WEBAUTHN_REPLAY_SHARE,
        revocation_share: float = DEFAULT_REVOCATION_REPLAY_SHARE,
    ) -> ReplayBounds:
        """`total` split by `split_bound`: each reserved part its share, DPoP the rest (at least 1).
        `parse_state_config` refuses a total too small for that, so only hand-built configs meet the floors."""
        parts = split_bound(total, {"dpop": 0.0, "webauthn": webauthn_share, "revocation": revocation_share})
        return cls(**parts)


def split_bound(total: int, shares: Mapping[K, float]) -> dict[K, int]:
    """`total` split into parts: a part with a share above 0 gets that fraction of it (rounded down, at least 1);
    the parts whose share is 0 split what the others leave in equal parts (rounded down, at least 1). The replay
    bounds' purposes (DPoP the rest) and the rate-limit buckets' issuer entries (`issuers[].max_buckets_share`,
    the entries without one the rest) are split alike; `split_problem` says when the floors would be needed."""
    parts = {key: max(1, math.floor(total * share)) for key, share in shares.items() if share > 0}
    rest = [key for key, share in shares.items() if not share > 0]
    if rest:
        each = max(1, (total - sum(parts.values())) // len(rest))
        parts.update(dict.fromkeys(rest, each))
    return {key: parts[key] for key in shares}


def split_problem(total: int, shares: Mapping[K, float]) -> str:
    """Why `split_bound(total, shares)` cannot give every part one entry of its own within `total` (empty: it
    can): a share below one entry, shares above the whole, or no entry left for the parts without a share."""
    reserved = 0
    for key, share in shares.items():
        if share > 0:
            if math.floor(total * share) < 1:
                return f"{share} of {total} is not one entry ({key})"
            reserved += math.floor(total * share)
    if sum(share for share in shares.values() if share > 0) > 1 + 1e-9:
        return f"the shares come to more than the whole ({total})"
    rest = sum(1 for share in shares.values() if not share > 0)
    if rest and total - reserved < rest:
        return f"{total - reserved} of {total} left for {rest} part(s) without a share: not one entry each"
    return ""


DEFAULT_REPLAY_BOUNDS = ReplayBounds.split(DEFAULT_MAX_REPLAY_ENTRIES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StateConfig:
    """Where shared state lives: Redis when `redis_url` is set, else this process's memory."""

    redis_url: str | None = setting(None, doc="redis://, rediss:// (TLS) or unix://; no password here")
    password_env: str | None = setting(None, doc="environment variable holding the Redis password")
    key_prefix: str = setting(DEFAULT_KEY_PREFIX, doc="required with redis_url: this deployment's namespace")
    timeout_seconds: float = setting(
        DEFAULT_TIMEOUT_SECONDS,
        maximum=MAX_TIMEOUT_SECONDS,
        unit="seconds",
        doc="per Redis operation, above 0; past it the request fails closed (503)",
    )
    max_entries: int = setting(
        DEFAULT_MAX_ENTRIES, minimum=1, unit="entries", doc="without redis_url: rate-limit buckets held per process"
    )
    max_replay_entries: int = setting(
        DEFAULT_MAX_REPLAY_ENTRIES,
        minimum=1,
        unit="entries",
        doc="without redis_url: live one-time values held, all purposes; a full purpose's new ones get 503",
    )
    redis_max_replay_entries: int = setting(
        DEFAULT_REDIS_MAX_REPLAY_ENTRIES,
        minimum=1,
        unit="entries",
        doc="with redis_url: live one-time values in Redis, all replicas and purposes; size maxmemory above it",
    )
    redis_max_buckets: int = setting(
        DEFAULT_REDIS_MAX_BUCKETS,
        minimum=1,
        unit="entries",
        doc="with redis_url: rate-limit buckets in Redis, all replicas, split per issuers[] entry "
        "(max_buckets_share); at its entry's part a new identity gets 503",
    )
    webauthn_replay_share: float = setting(
        DEFAULT_WEBAUTHN_REPLAY_SHARE,
        maximum=MAX_REPLAY_SHARE,
        unit="fraction",
        doc="of the bound in use (max_replay_entries, with Redis redis_max_replay_entries), above 0: WebAuthn's part",
    )
    revocation_replay_share: float = setting(
        DEFAULT_REVOCATION_REPLAY_SHARE,
        maximum=MAX_REPLAY_SHARE,
        unit="fraction",
        doc="of the bound in use, above 0: SET and logout-token jtis' own part (a DPoP flood never fills it)",
    )
    redis_revocation_replicas: int = setting(
        DEFAULT_REDIS_REVOCATION_REPLICAS,
        minimum=0,
        maximum=MAX_REDIS_REVOCATION_REPLICAS,
        unit="replicas",
        doc="with redis_url: replicas that must confirm a revocation (WAIT) before it is acknowledged; else 503",
    )
    password: str | None = dataclasses.field(default=None, repr=False)  # read from `password_env`
    path: str | None = setting(
        None, doc="without redis_url: directory of the durable local store (SQLite: revocations, replay keys)"
    )

    @property
    def replay_bounds(self) -> ReplayBounds:
        """`max_replay_entries` split per purpose (the local stores)."""
        return ReplayBounds.split(
            self.max_replay_entries,
            webauthn_share=self.webauthn_replay_share,
            revocation_share=self.revocation_replay_share,
        )

    @property
    def redis_replay_bounds(self) -> ReplayBounds:
        """`redis_max_replay_entries` split per purpose (Redis, every replica together)."""
        return ReplayBounds.split(
            self.redis_max_replay_entries,
            webauthn_share=self.webauthn_replay_share,
            revocation_share=self.revocation_replay_share,
        )


def parse_state_config(data: Any, path: str = "state") -> StateConfig:
    """Validates the `state` mapping (None means defaults); problems are named by key (`verifier.config.base`)."""
    if data is None:
        return StateConfig()
    reader = Reader(data, path)
    values = read_fields(reader, StateConfig, key_prefix=reader.raw("key_prefix"))
    url = values["redis_url"]
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in _REDIS_SCHEMES:
            reader.problem("redis_url", "expected a redis://, rediss:// or unix:// URL")
        elif parts.password or any(
            name.strip().lower() == "password" for name, _ in parse_qsl(parts.query, keep_blank_values=True)
        ):  # redis-py reads `?password=` from the query as it reads `user:password@`
            reader.problem("redis_url", f"must not contain a password; use {path}.password_env")
    password_env = values["password_env"]
    if password_env is not None:
        if url is None:
            reader.problem("password_env", f"only meaningful with {path}.redis_url")
        values["password"] = os.environ.get(password_env)
        if not values["password"]:
            reader.problem("password_env", f"environment variable {password_env} is not set")
    if values["redis_revocation_replicas"] and url is None:
        reader.problem("redis_revocation_replicas", f"only meaningful with {path}.redis_url")
    prefix = values["key_prefix"]
    if prefix is None:
        values["key_prefix"] = DEFAULT_KEY_PREFIX
    elif not isinstance(prefix, str):
        reader.problem("key_prefix", "expected a string")
    if url is not None and not prefix:
        # Without it two deployments on one Redis share the kill switch (one operator can list and
        # lift the other's entries), SSF effects, replay caches and rate buckets.
        reader.problem(
            "key_prefix",
            f"required with {path}.redis_url: a name for this deployment "
            '(e.g. "payments-prod:") so deployments sharing a Redis never see each other\'s keys',
        )
    if not values["timeout_seconds"] > 0:
        reader.problem("timeout_seconds", f"expected a number in (0, {MAX_TIMEOUT_SECONDS}]")
    # The bound in use: Redis's with redis_url, the local stores' without.
    total_key = "max_replay_entries" if url is None else "redis_max_replay_entries"
    total = values[total_key]
    for key in ("webauthn_replay_share", "revocation_replay_share"):
        if not values[key] > 0:
            reader.problem(key, f"expected a fraction in (0, {MAX_REPLAY_SHARE}]")
        elif math.floor(total * values[key]) < 1:
            reader.problem(key, f"{values[key]} of {total_key} ({total}) is not one entry: raise either")
    directory = values["path"]
    if directory is not None:
        if url is not None:
            reader.problem("path", f"only without {path}.redis_url (Redis keeps the entries)")
        elif not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
            reader.problem("path", f"{directory!r} is not a writable directory")
        else:
            for name in (REVOCATIONS_FILE, REPLAY_FILE):
                problem = sqlite_problem(os.path.join(directory, name))
                if problem:
                    reader.problem("path", problem)
    reader.done()
    return StateConfig(**values)
