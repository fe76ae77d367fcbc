"""Shared state (replay detection, token buckets): the interface and its stores.

Its settings, the `state` section, are `verifier.config.state.StateConfig`; the composition root
(`verifier.app.shared_state`) picks the store.
"""

from __future__ import annotations

import dataclasses

from verifier.config.state import StateConfig, parse_state_config
from verifier.state.base import SharedState, TakeResult
from verifier.state.memory import MemoryState

__all__ = ["MemoryState", "SharedState", "StateConfig", "TakeResult", "parse_state_config", "with_default_path"]


def with_default_path(config: StateConfig | None, directory: str) -> StateConfig:
    """`config` with `path` set to `directory` when it names neither Redis nor a path of its own."""
    config = config or StateConfig()
    if config.redis_url is not None or config.path is not None:
        return config
    return dataclasses.replace(config, path=directory)
