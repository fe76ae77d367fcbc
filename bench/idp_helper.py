"""The embedded dev provider (verifier/devidp.py) in a process of its own, with a control port for the bench.

``python -m bench.idp_helper --port P [--keys FILE] [--control C --delay 0.02 --opaque 10100 --tokens FILE]``

* serves ``DevIdentityProvider`` on 127.0.0.1:P (discovery, JWKS, ``/introspect``, ``/introspect/batch``)
  with ``delay_seconds`` set, so every introspection call takes about that long (the provider's latency);
* with ``--keys`` (bench/issuer.py's ``write_keys``), signs with the bench's keys: the bench mints its
  JWTs itself, in many processes, and the provider only publishes the public halves;
* mints ``--opaque`` opaque tokens at start-up and writes them, one a line, to ``--tokens``;
* with ``--control``, answers on 127.0.0.1:C: ``GET /counts`` (``introspection_calls``, ``batch_calls``,
  ``batch_tokens``), ``POST /reset``, ``POST /delay?seconds=S``.

The introspection client secret is read from the environment variable ``BENCH_IDP_SECRET`` (random
when unset); the verifier and the naive baseline are given the same one. A process of its own keeps the provider's
CPU out of the verifier's and in the table's "provider CPU" column.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

from aiohttp import web

from bench import issuer
from verifier.devidp import DevIdentityProvider

SECRET_ENV = "BENCH_IDP_SECRET"
CLIENT_ID = "verifier"


async def _serve(args: argparse.Namespace) -> None:
    idp = DevIdentityProvider(
        port=args.port,
        introspection_client_id=CLIENT_ID,
        introspection_client_secret=os.environ.get(SECRET_ENV),
        keys=issuer.read_keys(Path(args.keys)) if args.keys else None,
    )
    idp.delay_seconds = args.delay
    if args.tokens:
        tokens = [idp.mint_opaque(sub=f"user-{i}", ttl=args.ttl) for i in range(args.opaque)]
        Path(args.tokens).write_text("\n".join(tokens) + "\n")
    await idp.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if args.control is None:
        await stop.wait()
        await idp.stop()
        return

    async def counts(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "introspection_calls": idp.introspection_calls,
                "batch_calls": idp.batch_calls,
                "batch_tokens": idp.batch_tokens,
            }
        )

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
    await stop.wait()
    await control.cleanup()
    await idp.stop()


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.idp_helper")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control", type=int, help="port of the counters and the delay knob")
    parser.add_argument("--keys", help="signing keys written by bench.issuer.write_keys")
    parser.add_argument("--delay", type=float, default=0.02, help="seconds per introspection call")
    parser.add_argument("--opaque", type=int, default=0, help="opaque tokens to mint at start-up")
    parser.add_argument("--ttl", type=int, default=3600)
    parser.add_argument("--tokens", help="file for the minted opaque tokens")
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
