"""Shared state (replay detection, token buckets): the interface and the one builder.

Its settings, the `state` section, are `verifier.config.state.StateConfig`.
"""

from __future__ import annotations

import dataclasses

from verifier.clock import Clock
from verifier.config.state import StateConfig, parse_state_config
from verifier.state.base import SharedState, TakeResult
from verifier.state.memory import MemoryState

__all__ = ["SharedState", "StateConfig", "TakeResult", "build_state", "parse_state_config", "with_default_path"]

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
