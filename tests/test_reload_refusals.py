"""SIGHUP with a file that cannot be used keeps the running verifier, whatever is wrong with the file.

The supervisor refused a reload only on a ConfigError: a config file that is not UTF-8 (saved in Latin-1,
a binary written over it) raised UnicodeDecodeError out of the supervisor's loop, the supervisor exited
with a traceback and its workers died with it (PR_SET_PDEATHSIG): a bad file and a SIGHUP took the
service down. `check-config` printed the same traceback instead of naming the file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from doorkit import free_port, http_exchange

REPO = Path(__file__).resolve().parents[1]
NOT_UTF8 = b"http: {listen: \"127.0.0.1:1\"}\n# r\xe9sum\xe9 (Latin-1)\n"


def _config(path: Path, http: int) -> None:
    path.write_text(
        f'http: {{listen: "127.0.0.1:{http}"}}\n'
        "issuers:\n"
        '  - {issuer: "http://127.0.0.1:9", audiences: [a], algorithms: [ES256], allow_insecure_http: true}\n'
    )


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}


def _livez(http: int) -> bytes:
    try:
        return asyncio.run(http_exchange(http, b"GET /livez HTTP/1.1\r\nHost: v\r\n\r\n"))
    except OSError:
        return b""


def test_sighup_with_a_config_file_that_is_not_utf8_keeps_the_running_verifier(tmp_path: Path) -> None:
    config = tmp_path / "verifier.yaml"
    http = free_port()
    _config(config, http)
    log = (tmp_path / "log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "verifier", "serve", "--config", str(config)], stdout=log, stderr=log, env=_env()
    )
    try:
        deadline = time.monotonic() + 30
        while not _livez(http).startswith(b"HTTP/1.1 200"):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.2)
        config.write_bytes(NOT_UTF8)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "reload_refused" not in (tmp_path / "log").read_text():
            assert proc.poll() is None, f"serve exited on SIGHUP: {(tmp_path / 'log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no reload_refused logged"
            time.sleep(0.1)
        time.sleep(0.5)
        assert proc.poll() is None
        assert _livez(http).startswith(b"HTTP/1.1 200")
        assert "Traceback" not in (tmp_path / "log").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()


def test_check_config_names_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    config = tmp_path / "verifier.yaml"
    config.write_bytes(NOT_UTF8)
    result = subprocess.run(
        [sys.executable, "-m", "verifier", "check-config", str(config)],
        capture_output=True, text=True, timeout=30, env=_env(),
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(config) in result.stderr and "UTF-8" in result.stderr
