"""Smoke tests of the benchmark harness: the open-loop generator does not hide a stalling server, and a
run writes its results. Real processes on ephemeral loopback ports; about 15 s in all."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("hdrh")
pytest.importorskip("httptools")

from support import free_port

from bench import load, wire

ROOT = Path(__file__).resolve().parent.parent


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, "no-op server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("no-op server never listened")


@pytest.fixture
def stalling_noop() -> Iterator[str]:
    """An HTTP no-op that freezes its event loop for 100 ms every 250 ms."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.baselines",
            "--http",
            f"127.0.0.1:{port}",
            "--pause-ms",
            "100",
            "--pause-every-ms",
            "250",
        ],
        cwd=ROOT,
    )
    try:
        _wait_port(port, proc)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("generator", ["c", "python"])
def test_open_loop_charges_stalls_from_the_intended_send_time(
    stalling_noop: str, tmp_path: Path, generator: str
) -> None:
    payloads = tmp_path / "payloads.bin"
    load.write_payloads(payloads, [wire.http_request(wire.http_headers("token"), stalling_noop)])
    spec = load.LoadSpec(
        door="http",
        addr=stalling_noop,
        mode="open",
        payload_file=str(payloads),
        duration_s=1.0,
        warmup_s=0.2,
        rate=1000,
        connections=1,
        generator=generator,
    )
    result = load.run(spec)
    latency = load.summarize(result.latency)
    service = load.summarize(result.service)
    assert result.errors == 0
    assert result.completed > 500
    # One connection, low concurrency: a closed-loop view (from the actual send) sees one slow request
    # per stall; the open-loop view charges every request scheduled during the 100 ms stalls.
    assert latency["p99"] >= 50.0, latency
    assert service["p99"] < latency["p99"] / 2, (service, latency)


def test_run_writes_results_json_and_markdown(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "run",
            "--scenario",
            "jwt-cached",
            "--quick",
            "--door",
            "http",
            "--no-verifier",
            "--no-naive",
            "--duration",
            "0.5",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    noop = [p for p in results["points"] if p["target"] == "noop" and p["mode"] == "closed"]
    assert noop and noop[0]["throughput"] > 0
    opened = [p for p in results["points"] if p["mode"] == "open"]
    assert opened and opened[0]["latency"]["p99"] > 0
    md = (out / "results.md").read_text()
    assert "### Goals" in md and "| http | noop |" in md
    # Server and client CPU side by side, so a reader sees which side was the limit (#24).
    assert "| server CPU (cores) | client CPU (cores) |" in md
    assert noop[0]["server_cpu_s"] > 0 and noop[0]["client_cpu_s"] > 0
    assert (out / "latency-vs-load.png").stat().st_size > 0


def test_dpop_bench_proofs_match_the_verifiers_thumbprint_and_ath() -> None:
    import jwt as pyjwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from bench import dpop
    from verifier.binding.dpop import access_token_hash, thumbprint

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    jwk = dpop.public_jwk(key)
    assert dpop.thumbprint(jwk) == thumbprint(jwk)
    proof = dpop.mint_proofs(pem, "the-token", 0, 1)[0]
    header = pyjwt.get_unverified_header(proof)
    claims = pyjwt.decode(proof, key.public_key(), algorithms=["ES256"])
    assert header["typ"] == "dpop+jwt" and header["jwk"] == jwk
    assert claims["ath"] == access_token_hash("the-token") and claims["htu"] == dpop.HTU


def test_soak_slope_is_least_squares() -> None:
    from bench.soak import slope

    assert slope([0, 1, 2, 3], [5, 7, 9, 11]) == 2.0
    assert slope([0, 1, 2], [4, 4, 4]) == 0.0
    assert slope([1], [3]) == 0.0


def test_every_stand_alone_measurement_is_a_scenario_of_run() -> None:
    """The seven suites are reached through `run --scenario NAME`; options `run` does not know go to them."""
    from bench import cli
    from bench.scenarios import SUITES, select

    assert set(SUITES) == {
        "introspection",
        "workers",
        "memory",
        "dpop",
        "soak",
        "overload",
        "nginx",
        "edge",
        "generators",
    }
    kinds, suites = select(["jwt-first-seen", "soak"])
    assert [k.name for k in kinds] == ["jwt-first-seen-es256", "jwt-first-seen-rs256", "jwt-first-seen-eddsa"]
    assert [s.name for s in suites] == ["soak"]
    with pytest.raises(SystemExit, match=r"unknown scenario 'nope'.*introspection"):
        select(["nope"])
    with pytest.raises(SystemExit, match=r"unrecognized arguments: --minutes .*soak"):
        cli.main(["run", "--scenario", "jwt-cached", "--minutes", "1"])


@pytest.fixture
def recording_server() -> Iterator[tuple[str, list[str]]]:
    """An HTTP/1.1 keep-alive server that records every Authorization header it is sent."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(200 if self.headers.get("X-Forwarded-Uri") == wire.ORIGINAL_PATH else 400)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()


def _settled(seen: list[str], quiet_s: float = 0.3, limit_s: float = 10.0) -> None:
    """Waits until the recording server has recorded nothing new for `quiet_s`: wrk returns when its time is up, and
    the server's handler threads may still be recording requests sent before that."""
    deadline = time.monotonic() + limit_s
    count = -1
    while count != len(seen) and time.monotonic() < deadline:
        count = len(seen)
        time.sleep(quiet_s)


@pytest.mark.skipif(not __import__("shutil").which("wrk"), reason="wrk is not installed")
def test_wrk_sends_the_fixed_request_or_each_prebuilt_request_in_turn(
    recording_server: tuple[str, list[str]], tmp_path: Path
) -> None:
    addr, seen = recording_server
    url = f"http://{addr}{wire.FORWARD_AUTH_PATH}"
    fixed = load.wrk(url, workdir=tmp_path, duration_s=1, headers=wire.http_headers("one"), connections=2)
    assert fixed.requests > 0 and fixed.refusals == 0 and fixed.cpu_s > 0
    assert set(seen) == {"Bearer one"}
    # One fixed request is wrk's static request: no Lua runs per request.
    assert "function request" not in next(tmp_path.glob("wrk-*.lua")).read_text()
    _settled(seen)  # a request of the first run still being handled when wrk returned (a loaded machine)
    seen.clear()
    rotation = [wire.http_request(wire.http_headers(f"t{i}"), addr) for i in range(3)]
    turn = load.wrk(url, workdir=tmp_path, duration_s=1, rotation=rotation, connections=2)
    assert turn.requests >= 3 and turn.refusals == 0
    _settled(seen)
    assert set(seen) == {"Bearer t0", "Bearer t1", "Bearer t2"}
    assert max(seen.count(t) for t in set(seen)) - min(seen.count(t) for t in set(seen)) <= 2  # in turn


def test_overload_cached_verdict_names_the_no_op_share_on_the_same_stack_at_each_connection_count(
    tmp_path: Path,
) -> None:
    """The forward-auth cached lines, one per flood's connection count, carry the no-op's own share at that count
    (the stack's part of a miss, named as such) and the verdict itself stays on the issue's terms: served against
    capacity at HTTP_CAPACITY connections; a last line gives door and no-op shares at every count."""
    import argparse

    from bench import overload, procs
    from bench.runner import Context

    def door_point(variant: str, share: float, connections: int = 1000, per_cpu: float = 0.0) -> dict[str, object]:
        return dict(
            door="http", tokens="cached", variant=variant, shed_after=0.25, capacity=40_000.0, served_per_s=share * 4e4,
            served_share=share, served_per_cpu_share=per_cpu or share, capacity_cpu_us=10.0, verifier_cpu_us=15.0,
            connections=connections, non_2xx=0, timeouts=0, p99_ms=90.0, max_ms=150.0, over_budget=False,
            budget_ms=1000, rss_before_mb=150.0, rss_after_mb=151.0, rss_settled_mb=151.0, healthy=True, health_s=0.01,
        )  # fmt: skip

    def noop(share: float, connections: int, per_cpu: float = 0.0) -> dict[str, object]:
        return dict(
            door="http", tokens="cached", variant=overload.NOOP, connections=connections, capacity=45_000.0,
            served_per_s=share * 45_000, served_share=share, served_per_cpu_share=per_cpu or share,
            capacity_cpu_us=11.0, verifier_cpu_us=17.5 if connections == 1000 else 12.0, max_ms=120.0,
        )  # fmt: skip

    points = [
        door_point("before", 0.6),
        door_point(overload.SHIPPED, 0.62),
        door_point(overload.SHIPPED, 0.95, connections=160),
        noop(0.64, 1000),
        noop(0.99, 160),
    ]

    goal = overload.verdicts(points)

    assert len(goal) == 3
    at_1000, at_160, by_count = goal
    assert at_1000.startswith("http cached -c 1000 (shipped, 1 reps): goodput MISS (62% of capacity")
    assert "the no-op on the same stack (median of 1): 64% of its capacity, so the door keeps 97%" in at_1000
    assert "door 10.0 -> 15.0 us, no-op 11.0 -> 17.5 us" in at_1000
    assert at_1000.endswith("the goodput MISS is the stack's: per CPU-second the no-op itself keeps 64% here")
    assert at_160.startswith("http cached -c 160 (shipped, 1 reps): goodput PASS (95% of capacity")
    assert "no-op 11.0 -> 12.0 us" in at_160 and "MISS is" not in at_160
    assert by_count.endswith(
        "-c 160 (10x): door 95% (95%), no-op 99% (99%); -c 1000 (62.5x): door 62% (62%), no-op 64% (64%)"
    )
    # A door that misses where the no-op does not, per CPU-second: the door's own; wall-clock only: the machine's.
    door_only = overload.verdicts([door_point(overload.SHIPPED, 0.5, connections=160), noop(0.6, 160, per_cpu=0.9)])
    assert door_only[0].endswith("the goodput MISS is the door's: per CPU-second the no-op keeps 90% here")
    machine = overload.verdicts([door_point(overload.SHIPPED, 0.5, 160, per_cpu=0.85), noop(0.6, 160, per_cpu=0.7)])
    assert "goodput MISS (50% of capacity" in machine[0]
    assert machine[0].endswith("the goodput MISS is the machine's: per verifier CPU-second the door keeps 85%")
    ctx = Context(out=tmp_path, quick=True, args=argparse.Namespace(), servers=procs.Servers(tmp_path))
    text = overload.markdown(ctx, points, goal)
    assert "| 1,000 | 45,000 | 28,800 | 64% (64%) | 11.0 / 17.5 | 120 |" in text
    assert "HTTP: wrk -c 160, 1000, capacity at -c 16" in text
    given = Context(out=tmp_path, quick=True, args=argparse.Namespace(floods="200,2000"), servers=ctx.servers)
    assert overload.floods(given) == [200, 2000]
    given.args.connections = 500
    assert overload.floods(given) == [500]  # one flood, as before --floods
    for bad in ("x", "0,160", ","):
        with pytest.raises(SystemExit, match="--floods: connection counts"):
            overload.floods(Context(out=tmp_path, quick=True, args=argparse.Namespace(floods=bad), servers=ctx.servers))


def test_overload_grpc_floods_are_labelled_by_shape_and_judged_by_calls_served_in_time(tmp_path: Path) -> None:
    """`--grpc-floods` parses CLIENTSxSTREAMS lists; a gRPC verdict line is per flood (the issue's 32x100 keeps its
    old label), judges goodput by the calls served in time (allows minus answers past the deadline), and names the
    grpc.aio no-op under the same flood."""
    import argparse

    from bench import overload, procs
    from bench.runner import Context

    servers = procs.Servers(tmp_path)

    def ctx(**args: object) -> Context:
        return Context(out=tmp_path, quick=True, args=argparse.Namespace(**args), servers=servers)

    assert overload.grpc_floods(ctx()) == [(32, 100)]
    assert overload.grpc_floods(ctx(grpc_floods="32x100,128x100")) == [(32, 100), (128, 100)]
    for bad in ("128", "0x100", "x", "4x4x4"):
        with pytest.raises(SystemExit, match="--grpc-floods"):
            overload.grpc_floods(ctx(grpc_floods=bad))

    def point(variant: str, flood: str, served: float, late: int) -> dict[str, object]:
        return dict(
            door="grpc", variant=variant, bound=4, flood=flood, capacity=1000.0, served=served, seconds=5.0,
            served_share=served / 5 / 1000, in_time_share=max(0.0, served - late) / 5 / 1000, late=late,
            served_per_cpu_share=0.5, verifier_cpu_us=300.0, verifier_cores=1.0, max_ms=150.0, p99_ms=100.0,
            over_budget=0, budget_ms=200, rss_before_mb=150.0, rss_after_mb=151.0, rss_settled_mb=151.0,
            healthy=True, health_s=0.01, refused_streams=0, streams=1000,
        )  # fmt: skip

    points = [
        point(overload.SHIPPED, "32x100", 5000.0, 0),
        point(overload.SHIPPED, "128x100", 5000.0, 3000),  # decisions at capacity, most answered too late
        point(overload.NOOP, "128x100", 4000.0, 0),
    ]
    ours, many = overload.verdicts(points)
    assert ours.startswith("grpc (shipped, 1 reps): goodput PASS (100% of capacity") and "no-op" not in ours
    assert many.startswith("grpc -c 128 -m 100 (shipped, 1 reps): goodput MISS (40% of capacity")
    assert "the grpc.aio no-op under the same flood (median of 1): 80% of its capacity" in many
    assert many.endswith("the door serves 400 per CPU-second, 50% of the no-op's 800")
