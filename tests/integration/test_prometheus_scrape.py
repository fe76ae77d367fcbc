"""A real Prometheus (Debian's `prometheus`) scrapes every worker of a `verifier serve` with `workers: 2`.

Prometheus runs on a loopback port with the shipped scrape job (deploy/prometheus/prometheus.yml: its bearer
`authorization` with `credentials_file`, pointed at a temp file; the verifier reads the same file as
`metrics.token_file`), a temp TSDB, and deploy/prometheus/rules.yml; it scrapes worker i's /metrics on the
configured metrics port + i, and the test asks its HTTP API: `up` is 1 for both targets, the verifier's own
metrics are there per worker, the alert rules loaded healthy, and every Grafana dashboard query is valid
PromQL that returns data or at least parses. A second job with a wrong token and a third with none are
refused (401, `up` 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from binaries import require
from doorkit import free_port, http_exchange

from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
SCRAPE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "verifier-dashboard.json"


def _prometheus() -> str:
    return require("prometheus", "Debian's prometheus package, .ci/setup.d/60-prometheus.sh")


def _two_free_ports() -> int:
    """A port p with p + 1 free too (worker 1's metrics port)."""
    for _ in range(50):
        port = free_port()
        with contextlib.suppress(OSError), socket.socket() as sock:
            sock.bind(("127.0.0.1", port + 1))
            return port
    raise RuntimeError("no two neighbouring free ports")


async def _query(session: aiohttp.ClientSession, base: str, promql: str) -> list[dict[str, Any]]:
    async with session.get(f"{base}/api/v1/query", params={"query": promql}) as response:
        body = await response.json()
    assert body["status"] == "success", (promql, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def _until(check: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.5)
    pytest.fail(f"{what}: not seen within {timeout} s (last: {last!r})")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def test_prometheus_scrapes_both_workers_and_loads_the_rules(tmp_path: Path) -> None:
    prometheus = _prometheus()
    idp = DevIdentityProvider(port=0)
    await idp.start()
    http, metrics, prom_port = free_port(), _two_free_ports(), free_port()
    token_file, wrong_token_file = tmp_path / "metrics-token", tmp_path / "wrong-metrics-token"
    token_file.write_text(secrets.token_hex(32) + "\n")  # as `kubectl create secret --from-file` keeps it
    wrong_token_file.write_text(secrets.token_hex(32) + "\n")
    config = tmp_path / "verifier.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "workers": 2,
                "http": {"listen": f"127.0.0.1:{http}"},
                "metrics": {"listen": f"127.0.0.1:{metrics}", "token_file": str(token_file)},
                "issuers": [
                    {
                        "issuer": idp.issuer,
                        "audiences": [DEV_AUDIENCE],
                        "algorithms": ["ES256"],
                        "allow_insecure_http": True,
                    }
                ],
            }
        )
    )
    targets = [f"127.0.0.1:{metrics}", f"127.0.0.1:{metrics + 1}"]
    (shipped,) = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    assert shipped["job_name"] == "edge-verifier" and shipped["authorization"]["type"] == "Bearer"
    job = {**shipped, "static_configs": [{"targets": targets}]}
    job["authorization"] = {**shipped["authorization"], "credentials_file": str(token_file)}
    wrong = {**job, "job_name": "wrong-token"}
    wrong["authorization"] = {"type": "Bearer", "credentials_file": str(wrong_token_file)}
    anonymous = {key: value for key, value in job.items() if key != "authorization"} | {"job_name": "no-token"}
    prom_config = tmp_path / "prometheus.yml"
    prom_config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [job, wrong, anonymous],
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    verifier_log = (tmp_path / "verifier.log").open("wb")
    prom_log = (tmp_path / "prometheus.log").open("wb")
    verifier = subprocess.Popen(
        [sys.executable, "-m", "verifier", "serve", "--config", str(config)],
        stdout=verifier_log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    prom = subprocess.Popen(
        [
            prometheus,
            f"--config.file={prom_config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=prom_log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{prom_port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

            async def workers_serving() -> bool:
                for target in targets:
                    try:
                        async with session.get(f"http://{target}/healthz") as response:
                            if response.status != 200:
                                return False
                    except aiohttp.ClientError:
                        return False
                return True

            await _until(workers_serving, "both workers SERVING")
            token = idp.mint(sub="alice")
            request = f"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
            for _ in range(20):  # fresh connections: both workers decide some
                assert (await http_exchange(http, request)).startswith(b"HTTP/1.1 200")
            await http_exchange(http, b"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\n\r\n")  # one refusal

            async def ready() -> bool:
                try:
                    async with session.get(f"{base}/-/ready") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await _until(ready, "Prometheus ready")

            async def both_up() -> list[dict[str, Any]] | None:
                result = await _query(session, base, 'up{job="edge-verifier"} == 1')
                return result if len(result) == 2 else None

            up = await _until(both_up, "up == 1 for both workers")
            assert {r["metric"]["instance"] for r in up} == set(targets)

            async def refused() -> list[dict[str, Any]] | None:
                async with session.get(f"{base}/api/v1/targets") as response:
                    active = (await response.json())["data"]["activeTargets"]
                others = [t for t in active if t["labels"]["job"] in ("wrong-token", "no-token")]
                return others if len(others) == 4 and all(t["health"] == "down" for t in others) else None

            for target in await _until(refused, "the wrong-token and no-token jobs refused"):
                assert "401" in target["lastError"], target
            assert await _query(session, base, 'up{job=~"wrong-token|no-token"} == 1') == []

            async def keys_per_worker() -> list[dict[str, Any]] | None:
                result = await _query(session, base, 'verifier_jwks_keys{job="edge-verifier"}')
                return result if len(result) == 2 else None

            keys = await _until(keys_per_worker, "verifier_jwks_keys from both workers")
            assert {r["metric"]["issuer"] for r in keys} == {idp.issuer}
            assert all(float(r["value"][1]) >= 1 for r in keys)

            async def decisions() -> float:
                result = await _query(session, base, 'sum(verifier_decisions_total{job="edge-verifier"})')
                return float(result[0]["value"][1]) if result else 0.0

            assert await _until(lambda: _at_least(decisions, 21), "the decisions made") >= 21

            async with session.get(f"{base}/api/v1/rules") as response:
                rules = (await response.json())["data"]["groups"]
            loaded = [rule for group in rules for rule in group["rules"]]
            assert loaded and all(rule["health"] == "ok" for rule in loaded), loaded
            assert len(loaded) == sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
            firing = [r["name"] for r in loaded if r.get("state") == "firing"]
            assert not firing, f"alerts firing on a healthy verifier: {firing}"

            # Every dashboard query is valid PromQL here (Grafana's variables filled in).
            dashboard = json.loads(DASHBOARD.read_text())
            for panel in dashboard["panels"]:
                for target in panel["targets"]:
                    expr = (
                        target["expr"]
                        .replace("$__rate_interval", "1m")
                        .replace("$__range", "5m")
                        .replace("$job", "edge-verifier")
                    )
                    await _query(session, base, expr)
    finally:
        _stop(prom)
        _stop(verifier)
        verifier_log.close()
        prom_log.close()
        await idp.stop()


async def _at_least(read: Any, minimum: float) -> float | None:
    value = float(await read())
    return value if value >= minimum else None
