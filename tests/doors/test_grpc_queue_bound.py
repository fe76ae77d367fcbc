"""The gRPC doors under a flood over many connections (issue #24 goal 4): goodput must not collapse.

The per-connection stream bound (`grpc_max_concurrent_streams`) holds a client's excess at the client, but not a
flood over many connections: a call whose deadline passes while it waits for the door frees its HTTP/2 stream, not
its place in gRPC's queue of calls not yet taken by Python, so with 128 connections x 4 streams at 100 ms the
queue filled faster than the door took calls and every call it took had already expired (~1% goodput). The queue
is bounded server-wide (`grpc_max_queued_calls`): the excess is refused by gRPC's C core before any Python work.

A real h2load flood against the in-process verifier; figures loose enough for a loaded 2-core CI machine (the
precise ones are the bench's: `python -m bench run --scenario overload --grpc-floods 32x100,128x100`).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import grpc
import pytest
from doorkit import running_verifier
from grpc_health.v1 import health_pb2, health_pb2_grpc

from verifier.app import App
from verifier.v1 import verifier_pb2

pytestmark = pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) is not installed")

METHOD = "/verifier.v1.Verifier/Check"
DEADLINES_MS = (100, 200, 200)  # one flood each at most, until one is served (a busy runner can starve one)


def _allows(app: App) -> float:
    """The own door's allow decisions so far (the verifier's decision counter)."""
    total = 0.0
    for family in app.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "verifier_decisions_total" and sample.labels.get("door") == "grpc":
                total += sample.value if sample.labels.get("outcome") == "allow" else 0.0
    return total


async def _h2load(
    port: int, body: Path, clients: int, streams: int, seconds: float, *headers: str, log: Path | None = None
) -> str:
    cmd = ["h2load", "-c", str(clients), "-m", str(streams), "-t", "1", "-D", f"{seconds:g}s", "-d", str(body)]
    cmd += ["--log-file", str(log)] if log is not None else []
    for header in ("content-type: application/grpc", "te: trailers", *headers):
        cmd += ["-H", header]
    proc = await asyncio.create_subprocess_exec(
        *cmd, f"http://127.0.0.1:{port}{METHOD}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 60)
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def _served_per_cpu_second(app: App, run: asyncio.Future[str] | asyncio.Task[str]) -> tuple[float, float]:
    """(allows, allows per CPU-second of this process) while `run` (an h2load) runs."""
    allows0, cpu0 = _allows(app), time.process_time()
    await run
    allows, cpu = _allows(app) - allows0, time.process_time() - cpu0
    return allows, allows / max(cpu, 1e-3)


async def test_a_flood_over_many_connections_is_still_served_and_the_door_is_healthy_right_after(
    tmp_path: Path,
) -> None:
    async with running_verifier() as (app, idp):
        assert app.ports.grpc is not None
        port = app.ports.grpc
        request = verifier_pb2.CheckRequest(
            method="GET", host="api", path="/x", headers={"authorization": f"Bearer {idp.mint(sub='flood')}"}
        ).SerializeToString()
        body = tmp_path / "check.bin"
        body.write_bytes(b"\x00" + len(request).to_bytes(4, "big") + request)  # one gRPC message frame

        # Capacity: a few connections inside the bound, no deadline (the scheduling-independent figure: allows
        # per CPU-second of the verifier's process).
        _, capacity = await _served_per_cpu_second(app, asyncio.ensure_future(_h2load(port, body, 4, 4, 2)))
        # The flood: 128 connections x 100 streams, each call with a 100 ms deadline. h2load logs no gRPC status:
        # an answer at or past the deadline is gRPC's DEADLINE_EXCEEDED, and an allow made for such a call never
        # reached its caller, so served in time is at least allows - late answers. A runner busy with other work
        # can starve the door of a whole flood's deadlines: then the flood is sent again with a longer deadline.
        # Without the bound every one served ~0 at 100 and 200 ms on this machine (at 400 ms it served: the
        # streams the door allows per connection still bound the queue to ~170 ms of work).
        floods: list[tuple[int, float, int, float]] = []
        for deadline_ms in DEADLINES_MS:
            log = tmp_path / f"flood{deadline_ms}.log"
            flood = asyncio.ensure_future(_h2load(port, body, 128, 100, 3, f"grpc-timeout: {deadline_ms}m", log=log))
            allows, per_cpu = await _served_per_cpu_second(app, flood)
            late = sum(
                int(line.split()[2]) >= deadline_ms * 1000 for line in log.read_text().splitlines() if line.strip()
            )
            served = allows - late
            floods.append((deadline_ms, allows, late, per_cpu * max(0.0, served) / max(allows, 1.0)))
            if served > 0 and floods[-1][3] >= capacity / 10:
                break

        # Healthy right after: a health check and a real check answered, each within 1 s (plus a loaded runner's
        # slack: what the bench measures precisely is the 1 s).
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            started = time.monotonic()
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            answer = verifier_pb2.CheckResponse.FromString(await channel.unary_unary(METHOD)(request, timeout=5))
            took = time.monotonic() - started
        assert health.status == health_pb2.HealthCheckResponse.SERVING and answer.allowed and took < 5

        # Served in time per CPU-second under the flood against allows per CPU-second at capacity: before the queue
        # bound ~0 (the CPU went on calls that expired); with it 30-80% on a loaded 2-core machine. Loose: a tenth.
        _, allows, late, per_cpu = floods[-1]
        assert allows - late > 0 and per_cpu >= capacity / 10, (
            f"floods (deadline ms, allows, answers past it, served in time per CPU-second): {floods}, "
            f"against {capacity:.0f} allows per CPU-second at capacity"
        )
