"""The bench's token issuer: ``verifier.devidp`` in a process of its own, with the bench's keys.

The bench generates one key per algorithm and writes them to the run's folder; ``python -m bench.idp``
serves ``DevIdentityProvider`` with them on loopback (discovery, JWKS, ``/introspect``, ``/introspect/batch``),
outside the process under test, and :class:`Issuer` mints RFC 9068 access tokens with the same
provider class in the bench's own processes (RSA signing is slow: large pools fan out over the cores).

``python -m bench.idp --port P --keys FILE [--control C --delay 0.02 --opaque N --tokens FILE]``: with
``--control``, answers ``GET /counts``, ``POST /reset`` and ``POST /delay?seconds=S`` on 127.0.0.1:C;
``--opaque`` mints that many opaque tokens at start-up into ``--tokens``. The introspection client
secret is ``BENCH_IDP_SECRET`` from the environment (the verifier and the naive baseline get the same).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import json
import os
import secrets
import signal
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from bench import procs, wire
from verifier.devidp import DevIdentityProvider

SECRET_ENV = "BENCH_IDP_SECRET"
CLIENT_ID = "verifier"
ALGORITHMS = ("ES256", "RS256", "EdDSA")


def generate_keys(path: Path) -> None:
    """One fresh private key per algorithm, as PEM in a JSON file (a loopback run's throw-away keys)."""
    makers: dict[str, Any] = {
        "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "EdDSA": ed25519.Ed25519PrivateKey.generate,
    }
    pems = {
        alg: make().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        for alg, make in makers.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({alg: [f"bench-{alg.lower()}-{secrets.token_hex(4)}", pem.decode()] for alg, pem in pems.items()})
    )


def read_keys(path: Path) -> dict[str, tuple[str, Any]]:
    """alg -> (kid, private key), as ``DevIdentityProvider(keys=...)`` takes them."""
    return {
        alg: (kid, serialization.load_pem_private_key(pem.encode(), password=None))
        for alg, (kid, pem) in json.loads(path.read_text()).items()
    }


def fan_out(make: Callable[..., list[str]], count: int, *args: Any) -> list[str]:
    """``make(*args, start, n)`` over the cores for ``count`` items (signing is slow, RSA most)."""
    n = os.cpu_count() or 1
    if count < 2000 or n == 1:
        return make(*args, 0, count)
    per = -(-count // n)
    with concurrent.futures.ProcessPoolExecutor(n) as pool:
        parts = [pool.submit(make, *args, i, min(per, count - i)) for i in range(0, count, per)]
        return [t for f in parts for t in f.result()]


def _mint(keys_file: str, port: int, alg: str, start: int, count: int) -> list[str]:
    idp = DevIdentityProvider(port=port, keys=read_keys(Path(keys_file)))
    return [idp.mint(sub=f"user-{i}", aud=wire.AUDIENCE, alg=alg) for i in range(start, start + count)]


def garbage(count: int) -> list[str]:
    """Tokens that are not JWTs at all, and some that look like one and are not: a flood of junk."""
    head = base64.urlsafe_b64encode(b'{"alg":"ES256","kid":"nope"}').rstrip(b"=").decode()
    return [
        secrets.token_urlsafe(48) if i % 2 else f"{head}.{secrets.token_urlsafe(64)}.{secrets.token_urlsafe(64)}"
        for i in range(count)
    ]


class Issuer:
    """The provider process and minting with its keys."""

    def __init__(self, servers: procs.Servers, *, opaque: int = 0, delay_s: float = 0.0) -> None:
        self.port, self.control = procs.free_port(), procs.free_port()
        self.keys_file = servers.out / "issuer-keys.json"
        generate_keys(self.keys_file)
        self.tokens_file = servers.out / "opaque-tokens.txt"
        cmd = [sys.executable, "-m", "bench.idp", "--port", str(self.port), "--keys", str(self.keys_file)]
        cmd += ["--control", str(self.control), "--delay", str(delay_s), "--opaque", str(opaque)]
        self.proc = servers.spawn([*cmd, "--tokens", str(self.tokens_file)], "provider.log")
        procs.wait_port(f"127.0.0.1:{self.control}", self.proc, timeout=60)
        self.opaque = self.tokens_file.read_text().split() if opaque else []
        self.idp = DevIdentityProvider(port=self.port, keys=read_keys(self.keys_file))
        self.cached_token = self.mint("ES256", 1)[0]

    @property
    def url(self) -> str:
        """The issuer URL."""
        return self.idp.issuer

    def mint(self, alg: str, count: int) -> list[str]:
        """``count`` distinct access tokens signed with ``alg``."""
        return fan_out(_mint, count, str(self.keys_file), self.port, alg)

    def _control(self, path: str, method: str = "GET") -> dict[str, Any]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.control}{path}", method=method, data=b"" if method == "POST" else None
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            return dict(json.loads(resp.read()))

    def counts(self) -> dict[str, int]:
        """devidp's call counters."""
        return {k: int(v) for k, v in self._control("/counts").items()}

    def reset(self) -> None:
        """Zero the counters."""
        self._control("/reset", "POST")


async def _serve(args: argparse.Namespace) -> None:
    from aiohttp import web

    idp = DevIdentityProvider(
        port=args.port,
        introspection_client_id=CLIENT_ID,
        introspection_client_secret=os.environ.get(SECRET_ENV),
        keys=read_keys(Path(args.keys)),
    )
    idp.delay_seconds = args.delay
    tokens = [idp.mint_opaque(sub=f"user-{i}") for i in range(args.opaque)]
    Path(args.tokens).write_text("\n".join(tokens) + "\n")
    await idp.start()

    async def counts(_: web.Request) -> web.Response:
        names = ("introspection_calls", "batch_calls", "batch_tokens")
        return web.json_response({k: getattr(idp, k) for k in names})

    async def reset(_: web.Request) -> web.Response:
        idp.reset_counts()
        return web.json_response({})

    async def delay(request: web.Request) -> web.Response:
        idp.delay_seconds = float(request.query["seconds"])
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/counts", counts)
    app.router.add_post("/reset", reset)
    app.router.add_post("/delay", delay)
    control = web.AppRunner(app, access_log=None)
    await control.setup()
    await web.TCPSite(control, "127.0.0.1", args.control).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await control.cleanup()
    await idp.stop()


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.idp")
    for name, kind in (
        ("port", int),
        ("keys", str),
        ("control", int),
        ("delay", float),
        ("opaque", int),
        ("tokens", str),
    ):
        parser.add_argument(f"--{name}", type=kind, required=True)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.install()
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
