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

from bench import loadgen, wire

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
            "bench.noop",
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


def test_open_loop_charges_stalls_from_the_intended_send_time(stalling_noop: str, tmp_path: Path) -> None:
    payloads = tmp_path / "payloads.bin"
    loadgen.write_payloads(payloads, [wire.http_request("token", stalling_noop)])
    spec = loadgen.LoadSpec(
        door="http",
        addr=stalling_noop,
        mode="open",
        payload_file=str(payloads),
        duration_s=1.0,
        warmup_s=0.2,
        rate=1000,
        connections=1,
    )
    result = loadgen.run(spec)
    latency = loadgen.summarize(result.latency)
    service = loadgen.summarize(result.service)
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
    assert (out / "latency-vs-load.png").stat().st_size > 0


def test_dpop_bench_proofs_match_the_verifiers_thumbprint_and_ath() -> None:
    import jwt as pyjwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from bench import dpop_bench
    from verifier.binding.dpop import access_token_hash, thumbprint

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    jwk = dpop_bench.public_jwk(key)
    assert dpop_bench.thumbprint(jwk) == thumbprint(jwk)
    proof = dpop_bench._mint_proofs(pem, "the-token", 1)[0]
    header = pyjwt.get_unverified_header(proof)
    claims = pyjwt.decode(proof, key.public_key(), algorithms=["ES256"])
    assert header["typ"] == "dpop+jwt" and header["jwk"] == jwk
    assert claims["ath"] == access_token_hash("the-token") and claims["htu"] == dpop_bench.HTU


def test_soak_slope_is_least_squares() -> None:
    from bench import extras

    assert extras.slope([0, 1, 2, 3], [5, 7, 9, 11]) == 2.0
    assert extras.slope([0, 1, 2], [4, 4, 4]) == 0.0
    assert extras.slope([1], [3]) == 0.0


def test_every_stand_alone_measurement_is_a_scenario_of_run() -> None:
    """The seven suites are reached through `run --scenario NAME`; options `run` does not know go to them."""
    from bench import cli
    from bench.scenarios import SUITES, select

    assert set(SUITES) == {"introspection", "workers", "memory", "dpop", "soak", "nginx", "edge"}
    scenarios, suites = select(["jwt-first-seen", "soak"])
    assert [s.name for s in scenarios] == ["jwt-first-seen-es256", "jwt-first-seen-rs256", "jwt-first-seen-eddsa"]
    assert [s.name for s in suites] == ["soak"]
    with pytest.raises(SystemExit, match=r"unknown scenario 'nope'.*introspection"):
        select(["nope"])
    with pytest.raises(SystemExit, match="unrecognized arguments: --minutes"):
        cli.main(["run", "--scenario", "jwt-cached", "--minutes", "1"])
