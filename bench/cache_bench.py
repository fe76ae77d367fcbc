"""The cached-token hot path with `cachetools.TLRUCache` against `verifier.tokens.cache.ExpiringCache`.

Issue #19 part 6: use the library wherever it costs no more than 5% of cached throughput. Three
measurements, each in the same process, alternating the caches, five rounds, medians:

- `get`: one positive-cache hit (the probe `decide_cached` makes for a token seen before);
- `decide_cached`: the whole synchronous decision for a cached token, through a real `App`, with the
  pipeline's positive cache being one or the other;
- `put`: a store into a full 100,000-entry cache (a flood of distinct tokens), against the plain-dict
  cache `ExpiringCache` was until #24's soak (its evictions left holes at the dict's front that every
  later eviction walked past);
- bytes per cache entry: what each verified and each refused token adds to a real `App` (tracemalloc).

The TLRU cache expires each item at its own time (the token's `exp`) via `ttu`, as `ExpiringCache` does.

    PYTHONPATH=. python3 -m bench.cache_bench            # or: python3 bench/cache_bench.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
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
PUT_ENTRIES = 100_000  # the default bound (cache.token_entries, cache.negative_entries)
PUT_NUMBER = 20_000


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


class PlainDictCache(Generic[V]):
    """The former `ExpiringCache` (until #24's soak), the baseline of `put`: a plain dict, evicting its first
    entry when full and sweeping expired entries only from its old end."""

    def __init__(self, max_entries: int, clock: Clock) -> None:
        self._max, self._clock = max_entries, clock
        self._data: dict[bytes, tuple[V, float]] = {}

    def get(self, key: bytes) -> V | None:
        entry = self._data.get(key)
        return None if entry is None or self._clock.now() >= entry[1] else entry[0]

    def put(self, key: bytes, value: V, expires_at: float) -> None:
        data, now = self._data, self._clock.now()
        for _ in range(2):
            oldest = next(iter(data), None)
            if oldest is None or data[oldest][1] > now:
                break
            del data[oldest]
        if key not in data and len(data) >= self._max:
            del data[next(iter(data))]
        data[key] = (value, expires_at)


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
        "plain dict (before)": PlainDictCache(ENTRIES, clock),
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


def bench_put() -> dict[str, float]:
    """Microseconds per store into a full cache of PUT_ENTRIES (a flood of distinct tokens), medians of ROUNDS
    alternating rounds, each cache filled afresh."""
    clock = SystemClock()
    makers: dict[str, Callable[[], Any]] = {
        "ExpiringCache": lambda: ExpiringCache(PUT_ENTRIES, clock),
        "plain dict (before)": lambda: PlainDictCache(PUT_ENTRIES, clock),
    }
    runs: dict[str, list[float]] = {name: [] for name in makers}
    for r in range(ROUNDS):
        for name, make in makers.items():
            cache, expires = make(), clock.now() + 3600
            for i in range(PUT_ENTRIES):
                cache.put(i.to_bytes(32, "big"), i, expires)
            keys = [(PUT_ENTRIES * (r + 2) + i).to_bytes(32, "big") for i in range(PUT_NUMBER)]
            put = cache.put
            started = time.perf_counter()
            for key in keys:
                put(key, 0, expires)
            runs[name].append((time.perf_counter() - started) / PUT_NUMBER * 1e6)
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


async def bench_entry_bytes(count: int = 2000) -> dict[str, float]:
    """Bytes each verified and each refused token adds to a real `App` through forward-auth (tracemalloc,
    after a collection): what a cache entry costs, the `cache:` bounds' memory."""
    import gc
    import secrets
    import tracemalloc

    from doorkit import http_exchange, running_verifier

    def request(token: str) -> bytes:
        head = "GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nX-Forwarded-Method: GET\r\nX-Forwarded-Proto: https\r\n"
        tail = f"X-Forwarded-Host: a.test\r\nX-Forwarded-Uri: /x\r\nAuthorization: Bearer {token}\r\n\r\n"
        return (head + tail).encode()

    out = {}
    async with running_verifier() as (app, idp):
        pools = {
            "verified token": (app.positive, [idp.mint(sub=f"user-{i}") for i in range(count + 1)]),
            "refused token": (app.negative, [secrets.token_urlsafe(48) for _ in range(count + 1)]),
        }
        for name, (cache, tokens) in pools.items():
            await http_exchange(app.ports.http, request(tokens.pop()))  # first-use allocations left out
            gc.collect()
            tracemalloc.start()
            before, entries = tracemalloc.get_traced_memory()[0], len(cache)
            for token in tokens:
                await http_exchange(app.ports.http, request(token))
            gc.collect()
            out[name] = (tracemalloc.get_traced_memory()[0] - before) / (len(cache) - entries)
            tracemalloc.stop()
    return out


def _keys(cache: Any) -> list[bytes]:
    return list(cache._data.keys())


def main() -> None:
    """Prints both tables (Markdown)."""
    print(f"cachetools {cachetools.__version__}, Python {sys.version.split()[0]}, medians of {ROUNDS} rounds")
    for title, result, unit in (
        ("positive-cache hit (get)", bench_get(), 1e9),
        ("decide_cached, cached token", asyncio.run(bench_decide()), 1e9),
        (f"store into a full cache of {PUT_ENTRIES:,} (put)", bench_put(), 1e6),
    ):
        base, name_unit = result["ExpiringCache"], "ns" if unit == 1e9 else "us"
        print(f"\n{title}\n\n| cache | {name_unit}/op | ops/s | throughput vs ExpiringCache |")
        print("| --- | ---: | ---: | ---: |")
        for name, per_op in result.items():
            print(f"| {name} | {per_op:.1f} | {unit / per_op:,.0f} | {base / per_op:.1%} |")
    print("\nbytes per cache entry (tracemalloc, a real App through forward-auth)\n\n| entry | bytes |\n| --- | ---: |")
    for name, size in asyncio.run(bench_entry_bytes()).items():
        print(f"| {name} | {size:,.0f} |")


if __name__ == "__main__":
    main()
