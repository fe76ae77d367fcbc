"""The bench's C open-loop generator (bench/c/openloop.c): built on demand, its command line, its answer.

bench/load.py's Python open loop runs behind its own schedule by 0.1-40 ms on a busy machine (more than the
latencies it must resolve); the C generator keeps one schedule over N keep-alive connections in one
epoll thread with a timerfd, so its own lag is microseconds on an idle core. It measures latency from the
intended send time (coordinated omission corrected) and reports its own lag apart (actual send - the
moment the request could have been sent). See the header of the C file for what it counts.

The binary is compiled with ``gcc -O2`` the first time it is needed, cached under BUILD_DIR by the
source's hash (gitignored: bench/results/). :func:`binary` returns None, with the reason in
:func:`unavailable`, when gcc or the libnghttp2 headers are missing (.ci/setup.d/40-bench.sh installs
them); bench/load.py then falls back to its Python open loop.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

SOURCE = Path(__file__).resolve().parent / "c" / "openloop.c"
BUILD_DIR = Path(__file__).resolve().parent / "results" / ".build"
CFLAGS = ("-O2", "-Wall")
LIBS = ("-lnghttp2", "-lm")
#: the allow rule per gRPC method: our CheckResponse.allowed (field 1) is true; Envoy's
#: CheckResponse.status (field 1) has code (field 1) 0 (OK).
ALLOW_RULES = {
    "/verifier.v1.Verifier/Check": "1=1",
    "/envoy.service.auth.v3.Authorization/Check": "1.1=0",
}
HISTOGRAMS = ("latency", "service", "lag", "wait")

_why_not: list[str] = []


def binary() -> Path | None:
    """The compiled generator (built now if this source has not been built yet), or None if it cannot be."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join((*CFLAGS, *LIBS)).encode()).hexdigest()[:16]
    exe = BUILD_DIR / f"openloop-{digest}"
    _why_not.clear()
    if exe.exists():
        return exe
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        _why_not[:] = ["no C compiler (gcc)"]
        return None
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(f"{exe.name}.{os.getpid()}.tmp")
    proc = subprocess.run([gcc, *CFLAGS, "-o", str(tmp), str(SOURCE), *LIBS], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        _why_not[:] = [f"gcc failed (libnghttp2-dev missing?): {proc.stderr.strip().splitlines()[-1:]}"]
        return None
    os.replace(tmp, exe)  # atomic: concurrent builds of the same source end with the same file
    return exe


def unavailable() -> str:
    """Why :func:`binary` returned None ("" if it did not)."""
    return _why_not[0] if _why_not else ""


def argv(
    *,
    grpc_method: str | None,
    addr: str,
    payload_file: str,
    rate: float,
    connections: int,
    duration_s: float,
    warmup_s: float,
    drain_s: float,
    poisson: bool = False,
    grpc_timeout: str = "",
    pool_max: int = 0,
) -> list[str]:
    """The generator's options: HTTP/1.1 when ``grpc_method`` is None (each payload record a whole raw
    request), else gRPC (each record one message; the allow rule of ALLOW_RULES when the method has one;
    ``pool_max``: Envoy's connection pool, ``connections`` growing to ``pool_max``, else fixed connections)."""
    out = ["--addr", addr, "--payloads", payload_file, "--rate", repr(rate), "--connections", str(connections)]
    out += ["--duration", repr(duration_s), "--warmup", repr(warmup_s), "--drain", repr(drain_s)]
    out += ["--poisson"] if poisson else []
    if grpc_method is None:
        return ["--mode", "http", *out]
    out += ["--mode", "grpc", "--path", grpc_method]
    out += ["--allow", ALLOW_RULES[grpc_method]] if grpc_method in ALLOW_RULES else []
    out += ["--pool-max", str(pool_max)] if pool_max else []
    return out + (["--grpc-timeout", grpc_timeout] if grpc_timeout else [])


def histogram(buckets: Sequence[Sequence[int]]) -> HdrHistogram:
    """The generator's [microseconds, count] buckets as the bench's HdrHistogram (bench/load.py's range)."""
    hist = HdrHistogram(1, 120_000_000, 3)
    for value, count in buckets:
        hist.record_value(min(max(1, int(value)), 120_000_000), int(count))
    return hist


def outcome(answer: dict[str, Any], grpc: bool) -> dict[str, int]:
    """Allowed / denied / errors as bench/load.py counts them: forward-auth 200 allows, 401 and 403 refuse;
    gRPC status OK with the allow rule met allows, otherwise refuses; every other answer and every
    connection error (refused, closed, malformed, reset) is an error."""
    transport = sum(answer["errors"].values())
    if grpc:
        ok = answer["allowed"] + answer["denied"]
        other = sum(answer["grpc_status"].values()) - ok
        return dict(allowed=answer["allowed"], denied=answer["denied"], errors=transport + other)
    codes = {int(k): v for k, v in answer["http_status"].items()}
    allowed, denied = codes.get(200, 0), codes.get(401, 0) + codes.get(403, 0)
    return dict(allowed=allowed, denied=denied, errors=transport + sum(codes.values()) - allowed - denied)
