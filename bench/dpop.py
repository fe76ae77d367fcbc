"""``python -m bench run --scenario dpop [--quick]``: a DPoP-bound token (RFC 9449) over forward-auth, with the no-op.

The client holds one P-256 key; the bench's provider signs one ES256 access token bound to it
(``cnf.jkt``, RFC 9449 section 6.1), so the verifier caches the token, and every request carries a
fresh proof (``DPoP`` header: ``typ: dpop+jwt``, the public JWK, ``jti``, ``htm``, ``htu``, ``iat``,
``ath``; sections 4.2 and 7.1) minted before the point (proofs are single use and acceptable for 60 s,
so each point mints its own pool). Requests: ``Authorization: DPoP <token>`` + ``DPoP: <proof>``.

Measured alternately: the verifier with DPoP, the verifier with a plain cached Bearer token (the cost
of the proof), and the no-op given the DPoP requests. Maximum throughput with wrk (closed loop, the
pre-built requests in turn); latency with the open-loop generator at ``--fraction`` (default 0.5) of
the verifier's DPoP maximum, from the intended send time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import sys
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench import idp, report, runner, wire
from bench.runner import Context
from bench.wire import Door

HTU = f"https://{wire.ORIGINAL_HOST}{wire.ORIGINAL_PATH}"  # what the verifier rebuilds from X-Forwarded-*


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    """The client's public key as a JWK (RFC 7517)."""
    nums = key.public_key().public_numbers()
    return {"kty": "EC", "crv": "P-256", "x": _b64(nums.x.to_bytes(32, "big")), "y": _b64(nums.y.to_bytes(32, "big"))}


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256) of an EC key: the required members, sorted, no whitespace."""
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    return _b64(hashlib.sha256(canonical.encode()).digest())


def mint_proofs(pem: bytes, token: str, _start: int, count: int) -> list[str]:
    """``count`` fresh proofs for GET ``HTU`` with ``token`` (``idp.fan_out`` spreads them over the cores)."""
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    header = {"typ": "dpop+jwt", "jwk": public_jwk(key)}
    claims = {"htm": "GET", "htu": HTU, "iat": int(time.time()), "ath": _b64(hashlib.sha256(token.encode()).digest())}
    return [jwt.encode(claims | {"jti": secrets.token_urlsafe(12)}, key, "ES256", header) for _ in range(count)]


def run(ctx: Context) -> None:
    """Closed-loop maxima, then open-loop latency; writes results."""
    duration, fraction = ctx.opt("duration", 5.0, 2.0), ctx.opt("fraction", 0.5)
    client = ec.generate_private_key(ec.SECP256R1())
    pem = client.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    issuer = idp.Issuer(ctx.servers)
    token = issuer.idp.mint(sub="dpop-user", aud=wire.AUDIENCE, claims={"cnf": {"jkt": thumbprint(public_jwk(client))}})
    verifier, noop = ctx.servers.start_verifier(issuer.url), ctx.servers.start_baseline("noop")

    def requests(n: int) -> list[dict[str, str]]:
        return [wire.http_headers(token, "DPoP", DPoP=p) for p in idp.fan_out(mint_proofs, n, pem, token)]

    # Correctness: a fresh proof is accepted, the bound token used as Bearer is refused.
    ok = ctx.guard(verifier, Door.HTTP, token, True, **requests(1)[0]) and ctx.guard(verifier, Door.HTTP, token, False)
    rows: list[dict[str, Any]] = []
    for name, kind, target in (
        ("verifier", "DPoP + proof", verifier),
        ("verifier", "Bearer (jwt-cached)", verifier),
        ("noop", "DPoP + proof", noop),
    ):
        dpop = kind.startswith("DPoP")
        headers = requests(ctx.opt("pool", 30_000)) if dpop else []
        p = runner.closed(ctx, target, Door.HTTP, [issuer.cached_token], duration_s=duration, headers=headers)
        rows.append(ctx.record(p | dict(kind=kind, correct=ok)))
        print(f"bench: closed {name} {kind}: {p['throughput']:,.0f}/s, {p['refusals']} refused", file=sys.stderr)
    rate = max(50.0, rows[0]["throughput"] * fraction)
    for target in (verifier, noop):
        payloads = [wire.http_request(h, target.http_addr) for h in requests(int(rate * (duration + 0.5) * 1.1) + 100)]
        p = runner.open_loop(ctx, target, Door.HTTP, payloads, rate, duration_s=duration)
        rows.append(ctx.record(p | dict(kind="DPoP + proof", correct=ok)))
        print(f"bench: open {target.name} at {rate:,.0f}/s: p99 {p['latency']['p99']:.2f} ms", file=sys.stderr)
    result = dict(duration_s=duration, fraction=fraction, warnings=ctx.warnings, rows=rows)
    report.write(ctx.out, markdown(ctx, result), result)


def markdown(ctx: Context, r: dict[str, Any]) -> str:
    """Closed-loop and open-loop tables, and the ratios."""
    closed = [x for x in r["rows"] if x["mode"] == "closed"]
    opened = [x for x in r["rows"] if x["mode"] == "open"]
    headers = ["target", "credential", "checks/s (wrk, c=16)", "refused", "errors", "requests in turn"]
    headers += ["server CPU/check us", "server CPU (cores)", "wrk CPU (cores)", "load avg"]
    rows = [
        [
            x["target"],
            x["kind"],
            report.fmt(x["throughput"]),
            f"{x['refusals']:,}",
            x["errors"],
            f"{x['pool']:,}",
            report.fmt(x["cpu_per_check_us"]),
            report.cores(x["server_cpu_s"], x["seconds"]),
            report.cores(x["client_cpu_s"], x["seconds"]),
            x["loadavg"],
        ]
        for x in closed
    ]
    open_headers = ["target", "offered/s", "achieved/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "send lag p99 ms"]
    open_headers += ["allowed", "refused", "errors+dropped", "client CPU (cores)", "load avg"]
    open_rows = [
        [x["target"], report.fmt(x["offered_rate"]), report.fmt(x["throughput"])]
        + [f"{x['latency'][k]:.2f}" for k in ("p50", "p90", "p99", "p99.9")]
        + [f"{x['lag']['p99']:.2f}", f"{x['allowed']:,}", f"{x['refusals']:,}", x["errors"] + x["dropped"]]
        + [report.cores(x["client_cpu_s"], x["seconds"]), x["loadavg"]]
        for x in opened
    ]
    what = "Forward-auth, one DPoP-bound ES256 token (cached by the verifier) + a fresh ES256 proof per request; "
    lines = [ctx.header(what + f"{r['duration_s']:g} s per point"), "", report.table(headers, rows, left=2)]
    lines += ["", report.table(open_headers, open_rows)]
    dpop, bearer, noop = (x["throughput"] for x in closed)
    lines += ["", f"DPoP throughput / Bearer cached throughput (the proof's cost): {dpop / bearer:.2f}; "]
    lines[-1] += f"DPoP throughput / no-op throughput: {dpop / noop:.2f}. (No target is set in the issue for DPoP.)"
    return "\n".join(lines + [f"- warning: {w}" for w in r["warnings"]]) + "\n"
