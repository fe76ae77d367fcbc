"""The cached-token hot path with `cachetools.TLRUCache` against `verifier.tokens.cache.ExpiringCache`.

Issue #19 part 6: use the library wherever it costs no more than 5% of cached throughput. Two
measurements, each in the same process, alternating the two caches, five rounds, medians:

- `get`: one positive-cache hit (the probe `decide_cached` makes for a token seen before);
- `decide_cached`: the whole synchronous decision for a cached token, through a real `App`, with the
  pipeline's positive cache being one or the other.

The TLRU cache expires each item at its own time (the token's `exp`) via `ttu`, as `ExpiringCache` does.

    PYTHONPATH=. python3 -m bench.cache_bench            # or: python3 bench/cache_bench.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import cachetools

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from verifier.clock import Clock, SystemClock  # noqa: E402
from verifier.tokens.cache import ExpiringCache  # noqa: E402

V = TypeVar("V")
ROUNDS = 5
GET_NUMBER = 200_000
DECIDE_NUMBER = 50_000
ENTRIES = 10_000


class TlruTokenCache(Generic[V]):
    """`ExpiringCache`'s interface over `cachetools.TLRUCache` (per-item expiry at `expires_at`)."""

    def __init__(self, max_entries: int, clock: Clock) -> None:
        self._clock = clock
        self._data: cachetools.TLRUCache[bytes, tuple[V, float]] = cachetools.TLRUCache(
            maxsize=max_entries, ttu=lambda _key, value, _now: value[1], timer=clock.now
        )

    def get(self, key: bytes) -> V | None:
        entry = self._data.get(key)
        return None if entry is None else entry[0]

    def put(self, key: bytes, value: V, expires_at: float) -> None:
        if expires_at > self._clock.now():
            self._data[key] = (value, expires_at)


def _get_loop(cache: Any, keys: list[bytes]) -> Callable[[], None]:
    get = cache.get

    def run() -> None:
        for key in keys:
            get(key)

    return run


def bench_get() -> dict[str, float]:
    """Nanoseconds per positive-cache hit, medians of ROUNDS alternating rounds."""
    clock = SystemClock()
    caches: dict[str, Any] = {
        "ExpiringCache": ExpiringCache(ENTRIES, clock),
        "TLRUCache": TlruTokenCache(ENTRIES, clock),
    }
    keys = [i.to_bytes(32, "big") for i in range(1000)]
    for cache in caches.values():
        for key in keys:
            cache.put(key, ("principal", "decision"), clock.now() + 3600)
    runs: dict[str, list[float]] = {name: [] for name in caches}
    loops = {name: _get_loop(cache, keys) for name, cache in caches.items()}
    for _ in range(ROUNDS):
        for name, loop in loops.items():
            seconds = min(timeit.repeat(loop, number=GET_NUMBER // len(keys), repeat=3))
            runs[name].append(seconds / GET_NUMBER * 1e9)
    return {name: statistics.median(values) for name, values in runs.items()}


async def bench_decide() -> dict[str, float]:
    """Nanoseconds per `decide_cached` for a cached token, each cache in turn in the same App."""
    from doorkit import running_verifier

    from verifier.request import RequestAttributes

    async with running_verifier() as (app, idp):
        attrs = RequestAttributes(
            "GET", "https", "api.example.test", "/orders", {"authorization": f"Bearer {idp.mint()}"}
        )
        caches: dict[str, Any] = {
            "ExpiringCache": ExpiringCache(ENTRIES, app.clock),
            "TLRUCache": TlruTokenCache(ENTRIES, app.clock),
        }
        runs: dict[str, list[float]] = {name: [] for name in caches}
        pipeline = app.pipeline
        for _ in range(ROUNDS):
            for name, cache in caches.items():
                pipeline._positive = cache
                first = pipeline.decide_cached(attrs)
                assert first is not None and first.allowed
                assert cache.get(next(iter(_keys(cache)))) is not None
                seconds = min(timeit.repeat(lambda: pipeline.decide_cached(attrs), number=DECIDE_NUMBER, repeat=3))
                runs[name].append(seconds / DECIDE_NUMBER * 1e9)
        return {name: statistics.median(values) for name, values in runs.items()}


def _keys(cache: Any) -> list[bytes]:
    return list(cache._data.keys())


def main() -> None:
    """Prints both tables (Markdown)."""
    print(f"cachetools {cachetools.__version__}, Python {sys.version.split()[0]}, medians of {ROUNDS} rounds")
    for title, result in (
        ("positive-cache hit (get)", bench_get()),
        ("decide_cached, cached token", asyncio.run(bench_decide())),
    ):
        base = result["ExpiringCache"]
        print(f"\n{title}\n\n| cache | ns/op | ops/s | throughput vs ExpiringCache |\n| --- | ---: | ---: | ---: |")
        for name, ns in result.items():
            print(f"| {name} | {ns:.0f} | {1e9 / ns:,.0f} | {base / ns:.1%} |")


if __name__ == "__main__":
    main()
