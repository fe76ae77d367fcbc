"""Shared state (replay detection, token buckets): the interface, its settings, and the one builder.

```yaml
state:                               # optional; without it (or without redis_url) state is in memory
  redis_url: "redis://10.0.0.5:6379/0"   # redis://, rediss:// (TLS) or unix://; no password here
  password_env: VERIFIER_REDIS_PASSWORD  # optional: the environment variable holding the password
  key_prefix: "payments-prod:"       # required with redis_url: this deployment's namespace in Redis
  timeout_seconds: 0.25              # per socket operation; past it the request fails closed (503)
  max_entries: 100000                # memory store only: bound per table
  # path: /var/lib/verifier          # only without redis_url: a directory for the durable local store
```

Without `redis_url`, revocation entries (kill switch, SSF events) are kept in a SQLite file in
`path`, so they survive a full restart; without `path`, `verifier serve` keeps them in a temporary
directory for the supervisor's lifetime (a reload or a worker restart keeps them, a full restart
does not).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from verifier.clock import Clock
from verifier.settings import ConfigError
from verifier.state.base import DEFAULT_KEY_PREFIX, DEFAULT_TIMEOUT_SECONDS, SharedState, TakeResult
from verifier.state.memory import DEFAULT_MAX_ENTRIES, MemoryState

__all__ = ["SharedState", "StateConfig", "TakeResult", "build_state", "parse_state_config", "with_default_path"]

MAX_TIMEOUT_SECONDS = 5.0  # seconds; a slower answer holds the gateway's request too long
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_KEYS = ("redis_url", "password_env", "key_prefix", "timeout_seconds", "max_entries", "path")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StateConfig:
    """Where shared state lives: Redis when `redis_url` is set, else this process's memory."""

    redis_url: str | None = None
    key_prefix: str = DEFAULT_KEY_PREFIX
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    max_entries: int = DEFAULT_MAX_ENTRIES
    password: str | None = dataclasses.field(default=None, repr=False)  # read from `password_env`
    path: str | None = None  # without Redis: the directory of the durable local store


def parse_state_config(data: Any, path: str = "state") -> StateConfig:
    """Validates the `state` mapping (None means defaults); raises `ConfigError` naming the key."""
    if data is None:
        return StateConfig()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in _KEYS:
            raise ConfigError(f"{path}.{key}: unknown key")

    def text(key: str) -> str | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}.{key}: expected a non-empty string")
        return value

    url = text("redis_url")
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in _REDIS_SCHEMES:
            raise ConfigError(f"{path}.redis_url: expected a redis://, rediss:// or unix:// URL")
        if parts.password:
            raise ConfigError(f"{path}.redis_url: must not contain a password; use {path}.password_env")
    password: str | None = None
    password_env = text("password_env")
    if password_env is not None:
        if url is None:
            raise ConfigError(f"{path}.password_env: only meaningful with {path}.redis_url")
        password = os.environ.get(password_env)
        if not password:
            raise ConfigError(f"{path}.password_env: environment variable {password_env} is not set")
    prefix = data.get("key_prefix", DEFAULT_KEY_PREFIX)
    if not isinstance(prefix, str):
        raise ConfigError(f"{path}.key_prefix: expected a string")
    if url is not None and not data.get("key_prefix"):
        # Without it two deployments on one Redis share the kill switch (one operator can list and
        # lift the other's entries), SSF effects, replay caches and rate buckets.
        raise ConfigError(
            f"{path}.key_prefix: required with {path}.redis_url: a name for this deployment "
            '(e.g. "payments-prod:") so deployments sharing a Redis never see each other\'s keys'
        )
    timeout = data.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= MAX_TIMEOUT_SECONDS:
        raise ConfigError(f"{path}.timeout_seconds: expected a number in (0, {MAX_TIMEOUT_SECONDS}]")
    entries = data.get("max_entries", DEFAULT_MAX_ENTRIES)
    if isinstance(entries, bool) or not isinstance(entries, int) or entries < 1:
        raise ConfigError(f"{path}.max_entries: expected a positive integer")
    directory = text("path")
    if directory is not None:
        if url is not None:
            raise ConfigError(f"{path}.path: only without {path}.redis_url (Redis keeps the entries)")
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(f"{path}.path: {directory!r} is not a writable directory")
    return StateConfig(
        path=directory,
        redis_url=url,
        key_prefix=prefix,
        timeout_seconds=float(timeout),
        max_entries=entries,
        password=password,
    )


def with_default_path(config: StateConfig | None, directory: str) -> StateConfig:
    """`config` with `path` set to `directory` when it names neither Redis nor a path of its own."""
    config = config or StateConfig()
    if config.redis_url is not None or config.path is not None:
        return config
    return dataclasses.replace(config, path=directory)


def build_state(config: StateConfig | None, clock: Clock) -> SharedState:
    """The configured store: Redis if a URL is set, else a bounded in-memory store."""
    if config is None or config.redis_url is None:
        return MemoryState(clock, max_entries=(config or StateConfig()).max_entries)
    from verifier.state.redis import RedisState  # imported only when configured

    return RedisState(
        config.redis_url,
        key_prefix=config.key_prefix,
        timeout_seconds=config.timeout_seconds,
        password=config.password,
    )
