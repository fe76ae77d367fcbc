"""A serving worker's cyclic collector (verifier/gc_policy.py): short young collections under gRPC load, and a
start-up heap no later collection walks (issue #24 goal 3: p99 at the gRPC doors)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from verifier import gc_policy

CALLS = 2_000
MOST_CALLS_PER_COLLECTION = 500  # grpc.aio's garbage of at most this many calls in one young collection


@pytest.fixture
def collector() -> Iterator[list[dict[str, Any]]]:
    """The collector as the test found it afterwards; yields the young collections' infos."""
    thresholds, young = gc.get_threshold(), []

    def record(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info["generation"] == 0:
            young.append(info)

    gc.callbacks.append(record)
    try:
        yield young
    finally:
        gc.callbacks.remove(record)
        gc.unfreeze()
        gc.set_threshold(*thresholds)


async def _calls(n: int, *, garbage_per_call: bool = False) -> float:
    """``n`` unary calls through a real grpc.aio server and channel on loopback; with ``garbage_per_call``, the
    objects left in reference cycles per call (what only the cyclic collector frees)."""

    async def noop(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        return b"ok"

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(noop)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.S", {"C": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/t.S/C")
            for _ in range(50):
                await call(b"x")
            if garbage_per_call:
                gc.collect()
                gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                for _ in range(n):
                    await call(b"x")
                if not garbage_per_call:
                    return 0.0
                gc.collect()
                return len(gc.garbage) / n
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
    finally:
        await server.stop(0)


def test_grpc_aio_garbage_is_collected_a_few_hundred_calls_at_a_time(collector: list[dict[str, Any]]) -> None:
    # grpc.aio itself leaves objects in reference cycles on every call (the no-op on the same stack too): a
    # young collection's pause grows with how many calls' worth it takes at once.
    per_call = asyncio.run(_calls(200, garbage_per_call=True))
    assert per_call >= 1, "grpc.aio no longer makes cyclic garbage per call: revisit gc_policy's threshold"
    gc_policy.tune()
    gc.collect()
    collector.clear()
    asyncio.run(_calls(CALLS))
    assert len(collector) >= CALLS // MOST_CALLS_PER_COLLECTION - 1, collector
    assert max(info["collected"] for info in collector) <= per_call * MOST_CALLS_PER_COLLECTION


def test_a_settled_worker_leaves_its_start_up_heap_to_no_collection(collector: list[dict[str, Any]]) -> None:
    import verifier.app  # noqa: F401  (a worker's start-up heap: the whole package and its libraries)

    walked_before = len(gc.get_objects())
    gc_policy.tune()
    gc_policy.settle()
    assert gc.get_freeze_count() >= walked_before // 2
    assert len(gc.get_objects()) < walked_before // 10  # what a full collection walks now
    assert gc.get_threshold()[0] == gc_policy.YOUNG_THRESHOLD
