"""Where a forward-auth check's CPU goes, without sockets: a real `App` in this process, fed raw requests.

``python -m bench.inproc [--policies] [--first-seen] [--no-memo] [--profile]`` starts the bench's provider, builds the
verifier from the same config ``bench run`` uses, and feeds one connection (a fake transport: no
syscalls, no event-loop wake-ups) the same forward-auth request as ``wrk`` sends. It prints the CPU per
check (cached: the best of 7 passes of 20,000; first-seen: one pass over 5,000 fresh ES256 tokens) and,
with ``--profile``, cProfile's top functions. The gap between this and ``bench run``'s server CPU per
check is the I/O (read, write, epoll) that the no-op pays too. The same raw request again is answered by
the door's answer memo; ``--no-memo`` measures the path every other request takes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import idp, procs, wire

CACHED_PASSES, CACHED_REQUESTS, FIRST_SEEN_REQUESTS = 7, 20_000, 5_000


class _Transport:
    """What the connection writes to: counts answers, keeps the last."""

    def __init__(self) -> None:
        self.answers = 0
        self.last = b""

    def write(self, data: bytes) -> None:
        self.answers += 1
        self.last = data

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None

    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


async def _measure(config: Path, tokens: list[str], first_seen: bool, profile: bool, memo: bool) -> None:
    from verifier.app import App
    from verifier.doors import forward_auth
    from verifier.settings import load_settings

    app = App(load_settings(str(config)))
    await app.start()
    try:
        await asyncio.wait_for(app.keys.wait_ready(), 10)
        if not memo:
            app.forward_auth.memo = None
        conn = forward_auth._Connection(app.forward_auth)
        transport = _Transport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        requests = [wire.http_request(wire.http_headers(t), "127.0.0.1") for t in tokens]
        conn.data_received(requests[0])  # warm: the cached token is admitted here
        await asyncio.sleep(0.01)
        profiler = cProfile.Profile() if profile else None
        best = float("inf")
        for _ in range(1 if first_seen else CACHED_PASSES):
            started = time.process_time()
            if profiler:
                profiler.enable()
            for raw in requests[1:]:
                conn.data_received(raw)
            if profiler:
                profiler.disable()
            best = min(best, time.process_time() - started)
        if not transport.last.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"not an allow: {transport.last[:80]!r}")
        what = "first-seen ES256" if first_seen else "cached"
        print(f"{what}: {best / (len(requests) - 1) * 1e6:.2f} us CPU per check ({transport.answers} answers)")
        if profiler:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    finally:
        await app.stop(grace=0.1)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.inproc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", action="store_true", help="two route policies (bench run --policies)")
    parser.add_argument("--first-seen", action="store_true", help="each ES256 token once, instead of one token")
    parser.add_argument("--no-memo", action="store_true", help="without the door's answer memo")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    args = parser.parse_args()
    import gc

    import uvloop

    from verifier import cli

    young = getattr(cli, "GC_YOUNG_THRESHOLD", None)  # as `verifier serve`'s workers run (older trees: the default)
    if young is not None:
        gc.set_threshold(young, *gc.get_threshold()[1:])

    with tempfile.TemporaryDirectory() as tmp:
        servers = procs.Servers(Path(tmp))
        try:
            issuer = idp.Issuer(servers)
            tokens = issuer.mint("ES256", FIRST_SEEN_REQUESTS + 1) if args.first_seen else [issuer.cached_token]
            tokens = tokens if args.first_seen else tokens * (CACHED_REQUESTS + 1)
            config = Path(tmp) / "inproc.yaml"
            config.write_text(
                'grpc: {listen: "127.0.0.1:0"}\nhttp: {listen: "127.0.0.1:0"}\n'
                f'issuers:\n  - issuer: "{issuer.url}"\n    audiences: ["{wire.AUDIENCE}"]\n'
                "    algorithms: [ES256, RS256, EdDSA]\n    leeway_seconds: 30\n    allow_insecure_http: true\n"
                + (wire.TWO_POLICIES if args.policies else "")
            )
            uvloop.install()
            asyncio.run(_measure(config, tokens, args.first_seen, args.profile, not args.no_memo))
        finally:
            servers.stop()


if __name__ == "__main__":
    main()
