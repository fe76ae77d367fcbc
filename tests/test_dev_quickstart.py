"""The README's quick start: `verifier dev` (what scripts/dev.sh runs) starts, and the examples it prints work and
answer what the README's sample says."""

from __future__ import annotations

import json
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from binaries import require
from google.protobuf import json_format
from support import free_port

from verifier.v1 import verifier_pb2, verifier_pb2_grpc

REPO = Path(__file__).resolve().parents[1]


def _readme_sample() -> tuple[str, list[str]]:
    """`# HTTP/1.1 200 OK, x-authenticated-userid: alice, cache-control: private, max-age=10` under the curl example."""
    found = re.search(r"\n# (HTTP/1\.1 \d{3} [^,]+), (.*)\n", (REPO / "README.md").read_text())
    assert found is not None, "README.md lost the sample answer of the quick start's curl"
    return found.group(1), re.split(r", (?=[a-z-]+: )", found.group(2))


@pytest.fixture(scope="module")
def printed() -> Iterator[list[str]]:
    """The lines `verifier dev` prints up to its grpcurl example; it is stopped (SIGINT, as Ctrl-C) afterwards."""
    ports = [x for flag in ("issuer", "http", "grpc", "metrics") for x in (f"--{flag}-port", str(free_port()))]
    proc = subprocess.Popen(
        [sys.executable, "-m", "verifier", "dev", *ports],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or ()], daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + 30
    try:
        while not any("grpcurl" in line for line in seen):
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        yield seen
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=15) == 0
        finally:
            proc.kill()


def _example(printed: list[str], start: str) -> list[str]:
    line = next(line.strip() for line in printed if line.strip().startswith(start))
    return shlex.split(line.split("   #")[0].split("      #")[0])


def _curl(argv: list[str]) -> tuple[str, dict[str, str], str]:
    result = subprocess.run(
        [require("curl", "Debian's curl"), "-sS", *argv[1:]], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.replace("\r\n", "\n").partition("\n\n")
    status, *fields = head.splitlines()
    return status, {k.lower(): v for k, _, v in (f.partition(": ") for f in fields)}, body


def test_the_printed_curl_answers_what_the_readme_shows(printed: list[str]) -> None:
    argv = _example(printed, "curl -i -H")
    assert argv[-1].endswith("/v1/forward-auth") and "X-Forwarded-Uri: /hello" in argv
    status, headers, _ = _curl(argv)
    sample_status, sample_headers = _readme_sample()
    assert status == sample_status
    for field in sample_headers:
        name, _, value = field.partition(": ")
        assert headers.get(name) == value, (field, headers)
    assert headers["x-authenticated-scope"] == "read write" and headers["x-verifier-reason"] == "ok"


def test_the_printed_curl_without_a_token_is_a_bearer_challenge(printed: list[str]) -> None:
    status, headers, _ = _curl(_example(printed, "curl -i http"))
    assert status == "HTTP/1.1 401 Unauthorized"
    assert headers["www-authenticate"] == 'Bearer realm="verifier"' and headers["x-verifier-reason"] == "token_missing"


def test_the_printed_token_mint_gives_another_token_the_verifier_takes(printed: list[str]) -> None:
    _, _, body = _curl(["curl", "-i", *_example(printed, "curl -s -X POST")[2:]])
    token = json.loads(body)["access_token"]
    argv = _example(printed, "curl -i -H")
    argv[argv.index(next(a for a in argv if a.startswith("Authorization:")))] = f"Authorization: Bearer {token}"
    status, headers, _ = _curl(argv)
    assert status == "HTTP/1.1 200 OK" and headers["x-authenticated-userid"] == "bob"
    assert headers["x-authenticated-scope"] == "read"


def test_the_printed_grpcurl_request_is_allowed_as_alice(printed: list[str]) -> None:
    """The request grpcurl would send (its -d JSON, to the printed address and method), through a Python stub."""
    argv = _example(printed, "grpcurl")
    assert argv[-1] == "verifier.v1.Verifier/Check"
    request = json_format.Parse(argv[argv.index("-d") + 1], verifier_pb2.CheckRequest())
    with grpc.insecure_channel(argv[-2]) as channel:
        answer = verifier_pb2_grpc.VerifierStub(channel).Check(request, timeout=10)
    assert answer.allowed and answer.http_status == 200 and answer.subject == "alice"
    assert ("x-authenticated-userid", "alice") in [(h.name, h.value) for h in answer.upstream_headers]


def test_the_readme_names_the_ports_verifier_dev_listens_on_by_default() -> None:
    from verifier.cli import build_parser

    args = build_parser().parse_args(["dev"])
    text = " ".join((REPO / "README.md").read_text().split())
    expected = (
        f"a local issuer on `127.0.0.1:{args.issuer_port}`",
        f"forward-auth on `:{args.http_port}`, gRPC on `:{args.grpc_port}`, metrics on `:{args.metrics_port}`",
    )
    for phrase in expected:
        assert phrase in text, phrase
