"""`verifier serve` on a read-only root filesystem (the shipped Kubernetes and compose deploys run it so).

Without Redis or `state.path`, `serve` keeps revocations and replay keys in a directory it makes in the
temporary directory. It made that directory whatever the config said, so a verifier given `state.path` on
a writable volume still died at start with a traceback where no temporary directory is writable; one
without `state.path` died the same way, naming neither the key nor the variable to set.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from doorkit import free_port, http_exchange

REPO = Path(__file__).resolve().parents[1]
ISSUER = {"issuer": "http://127.0.0.1:9", "audiences": ["a"], "algorithms": ["ES256"], "allow_insecure_http": True}
# A temporary directory nothing can be made in (a regular file, refused even to root), as on a read-only root.
NO_TEMP = (
    "import sys, tempfile; tempfile.tempdir = sys.argv[1]; "
    "from verifier.cli import main; sys.exit(main(sys.argv[2:]))"
)


def _serve(tmp_path: Path, settings: dict[str, object]) -> subprocess.Popen[str]:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    config = tmp_path / "verifier.yaml"
    config.write_text(yaml.safe_dump({"issuers": [ISSUER], **settings}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.Popen(
        [sys.executable, "-c", NO_TEMP, str(blocked), "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def test_serve_with_state_path_needs_no_temporary_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    http = free_port()
    proc = _serve(tmp_path, {"http": {"listen": f"127.0.0.1:{http}"}, "state": {"path": str(state)}})
    try:
        deadline = time.monotonic() + 30
        answer = b""
        while not answer:
            assert proc.poll() is None, f"serve exited {proc.returncode}: {proc.communicate()[1]}"
            assert time.monotonic() < deadline, "serve did not answer"
            try:
                answer = asyncio.run(http_exchange(http, b"GET /livez HTTP/1.1\r\nHost: v\r\n\r\n"))
            except OSError:
                time.sleep(0.2)
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


def test_serve_without_state_path_or_a_temporary_directory_says_what_to_set(tmp_path: Path) -> None:
    proc = _serve(tmp_path, {"http": {"listen": f"127.0.0.1:{free_port()}"}})
    try:
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "state.path" in lines[0] and "TMPDIR" in lines[0]
