"""Command line: `verifier serve --config FILE`, `verifier check-config FILE`, `verifier dev`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
from typing import NoReturn

from verifier import gc_policy, ports
from verifier.app import App
from verifier.config.issuer import DEFAULT_MAX_JWKS_KEYS
from verifier.observe.audit import configure_logging
from verifier.settings import ConfigError, IssuerSettings, Listen, Settings, config_warnings, load_settings
from verifier.state import with_default_path
from verifier.tokens.jwks import AMBIGUOUS_KID_MESSAGE, ambiguous_kids, kidless_ambiguous, kidless_ambiguous_message
from verifier.tokens.keys import parse_key_set
from verifier.workers import accept_stop_signals

log = logging.getLogger("verifier.cli")


def _event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _run(app: App, on_ready: object = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    accept_stop_signals()  # a forked worker held them until now: a stop during start-up drains
    await app.start()
    waiter = asyncio.ensure_future(on_ready()) if callable(on_ready) else None
    await stop.wait()
    if waiter is not None:
        waiter.cancel()
    log.info("shutting down", extra={"event": "stopping"})
    await app.stop()


def _config_error(exc: ConfigError) -> int:
    """Prints every problem of a settings file, one a line; the exit code for a bad config."""
    for line in str(exc).splitlines():
        print(f"config error: {line}", file=sys.stderr)
    return 2


def _ports_busy(listeners: list[tuple[str, str, int]], *, reuse_port: bool) -> bool:
    """Prints one line and says True when a listen address is taken (no traceback, the key named)."""
    problem = ports.first_problem(listeners, reuse_port=reuse_port)
    if problem is not None:
        print(f"verifier: {problem}", file=sys.stderr)
    return problem is not None


def cmd_serve(args: argparse.Namespace) -> int:
    """Runs the verifier from a config file."""
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        return _config_error(exc)
    listeners = [
        (f"{name}.listen in {args.config}", listen.host, listen.port)
        for name, listen in (("grpc", settings.grpc), ("http", settings.http), ("admin", settings.admin))
        if listen is not None
    ]
    if settings.metrics is not None:
        listeners += [
            (f"metrics.listen in {args.config} (worker {i} uses its port + {i})", settings.metrics.host, port)
            for i, port in enumerate(
                settings.metrics.port + i if settings.metrics.port else 0 for i in range(settings.workers)
            )
        ]
    # Checked WITHOUT SO_REUSEPORT: a port another verifier (or anything) already shares would otherwise
    # pass, and the kernel would then split the connections between two processes with different configs.
    # The workers themselves set it (they share the ports with each other and, on SIGHUP, with their successor).
    if _ports_busy(listeners, reuse_port=False):
        return 2
    from verifier.workers import Supervisor

    runtime = _StateDirectory()

    def load() -> Settings:
        return runtime.default_for(load_settings(args.config))

    try:
        first = runtime.default_for(settings)
    except ConfigError as exc:
        return _config_error(exc)
    try:
        return Supervisor(first, load, _serve_worker).run()
    except OSError as exc:  # the forward-auth port taken between the check above and the bind
        print(f"verifier: cannot listen on http.listen in {args.config} ({exc})", file=sys.stderr)
        return 2
    finally:
        runtime.remove()


class _StateDirectory:
    """Without Redis or state.path, revocations and replay keys live in a directory the supervisor keeps: a
    reloaded or restarted worker reads them back (a full restart needs state.path). It is made only when a
    configuration needs it, so a verifier given state.path runs where nothing else is writable (a read-only
    root filesystem); one that needs it and cannot make it is refused by name, at start as on SIGHUP."""

    def __init__(self) -> None:
        self.path: str | None = None

    def default_for(self, settings: Settings) -> Settings:
        """`settings` with the supervisor's directory as `state.path` when they name neither Redis nor a path."""
        state = settings.state
        if state is not None and (state.redis_url is not None or state.path is not None):
            return settings
        if self.path is None:
            try:
                self.path = tempfile.mkdtemp(prefix="verifier-state-")
            except OSError as exc:
                raise ConfigError(
                    "state.path: not set, and no directory for the revocation and replay state can be made in the "
                    f"temporary directory ({exc.strerror or exc}); set state.path, or TMPDIR, to a writable directory"
                ) from exc
        return dataclasses.replace(settings, state=with_default_path(settings.state, self.path))

    def remove(self) -> None:
        """Removes the directory, if one was made."""
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def _serve_worker(
    settings: Settings, index: int, ready_fd: int, http_sockets: list[socket.socket], successor: bool
) -> None:
    _event_loop_policy()
    gc_policy.tune()
    app = App(settings, reuse_port=True, http_sockets=http_sockets, accept_when_serving=successor)

    async def ready() -> None:
        await app.wait_serving()
        gc_policy.settle()
        os.write(ready_fd, b"1")
        os.close(ready_fd)

    asyncio.run(_run(app, ready))


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validates a config file without serving."""
    try:
        settings = load_settings(args.file)
    except ConfigError as exc:
        return _config_error(exc)
    for warning in config_warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    for issuer, message in _static_key_warnings(settings):  # what start-up logs for keys on disk or in the YAML
        print(f"warning: issuers[{issuer}]: {message}", file=sys.stderr)
    print(f"ok: {len(settings.issuers)} issuer(s)")
    return 0


def _static_key_warnings(settings: Settings) -> list[tuple[str, str]]:
    """`jwks_kidless_ambiguous` and `jwks_kid_ambiguous` for each issuer whose keys are static (`jwks_file`,
    `jwks_inline`): start-up logs them when it loads them; a fetched JWKS is only known once fetched."""
    warnings = []
    for issuer in settings.issuers:
        if issuer.static_jwks:
            keys, _ = parse_key_set(json.loads(issuer.static_jwks), max_keys=DEFAULT_MAX_JWKS_KEYS)
            warnings += [
                (issuer.issuer, f"{kidless_ambiguous_message(alg, count)} (jwks_kidless_ambiguous)")
                for alg, count in kidless_ambiguous(keys, issuer.algorithms)
            ]
            warnings += [
                (issuer.issuer, f"{AMBIGUOUS_KID_MESSAGE} (jwks_kid_ambiguous): {kid}")
                for kid in sorted(ambiguous_kids(keys))
            ]
    return warnings


def cmd_dev(args: argparse.Namespace) -> int:
    """Runs the verifier against an embedded development identity provider."""
    from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider

    listeners = [
        (f"--{name}-port", "127.0.0.1", getattr(args, f"{name}_port")) for name in ("issuer", "http", "grpc", "metrics")
    ]
    if _ports_busy(listeners, reuse_port=False):
        return 2
    _event_loop_policy()
    idp = DevIdentityProvider(port=args.issuer_port)
    settings = Settings(
        grpc=Listen(host="127.0.0.1", port=args.grpc_port),
        http=Listen(host="127.0.0.1", port=args.http_port),
        metrics=Listen(host="127.0.0.1", port=args.metrics_port),
        issuers=(
            IssuerSettings(
                issuer=idp.issuer,
                audiences=(DEV_AUDIENCE,),
                algorithms=("ES256", "RS256", "EdDSA"),
                jwks_cooldown_seconds=1.0,
            ),
        ),
    )
    app = App(settings)

    async def main() -> None:
        await idp.start()

        async def ready() -> None:
            await app.keys.wait_ready()
            token = idp.mint(sub="alice", scope="read write")
            http = f"http://127.0.0.1:{app.ports.http}/v1/forward-auth"
            print(
                "\nverifier dev is running (Ctrl-C stops it)\n"
                f"  issuer        {idp.issuer}   (POST {idp.issuer}/token mints tokens)\n"
                f"  forward-auth  {http}\n"
                f"  gRPC          127.0.0.1:{app.ports.grpc}  (verifier.v1.Verifier/Check, "
                "envoy.service.auth.v3.Authorization/Check)\n"
                f"  metrics       http://127.0.0.1:{app.ports.metrics}/metrics\n\n"
                "Try:\n"
                f"  curl -i -H {shlex.quote('Authorization: Bearer ' + token)} -H 'X-Forwarded-Uri: /hello' {http}\n"
                f"  curl -i {http} -H 'X-Forwarded-Uri: /hello'      # no token: 401 with a Bearer challenge\n"
                f"  curl -s -X POST -d sub=bob -d scope=read {idp.issuer}/token   # another token\n"
                f'  grpcurl -plaintext -d \'{{"method":"GET","path":"/hello","headers":'
                f'{{"authorization":"Bearer {token}"}}}}\' 127.0.0.1:{app.ports.grpc} verifier.v1.Verifier/Check\n',
                flush=True,
            )

        try:
            await _run(app, ready)
        finally:
            await idp.stop()

    try:
        asyncio.run(main())
    except OSError as exc:  # a port taken between the check above and the bind
        print(
            f"verifier: cannot listen ({exc}); change --issuer-port/--http-port/--grpc-port/--metrics-port",
            file=sys.stderr,
        )
        return 2
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Runs one decision as the service would make it and prints why (never the token)."""
    from verifier.explain import explain, render

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        return _config_error(exc)
    from_stdin = args.token == "-"  # noqa: S105 - "-" names stdin, it is not a password
    token = sys.stdin.read().strip() if from_stdin else args.token.strip()
    if not token:
        print("verifier explain: no token given (pass it, or - to read it from stdin)", file=sys.stderr)
        return 2
    scheme, _, rest = token.partition(" ")
    authorization = token if rest and scheme.lower() in ("bearer", "dpop") else f"Bearer {token}"
    if args.log_level == "INFO":  # key fetches and the audit line would repeat what the report says
        logging.getLogger("verifier").setLevel(logging.WARNING)
    report = asyncio.run(
        explain(
            settings,
            authorization,
            method=args.method.upper(),
            host=args.host,
            path=args.path,
            scheme=args.scheme,
            dpop=args.dpop,
        )
    )
    print(render(report, as_json=args.json))
    return 0 if report.answer["allowed"] else 1


# A run of token characters this long in a usage error is taken for a token argparse echoed (a token
# given without `--` that starts with `-` is read as options, and the message quotes it): never printed.
_TOKEN_LIKE = re.compile(r"[A-Za-z0-9_~+=.-]{24,}")


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors never echo a token."""

    def error(self, message: str) -> NoReturn:
        """Prints the usage and the message (token-like runs redacted) and exits 2."""
        super().error(_TOKEN_LIKE.sub("[redacted]", message))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    parser = _Parser(prog="verifier", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the verifier")
    serve.add_argument("--config", required=True, help="YAML settings file")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="validate a settings file and exit")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)
    explain = sub.add_parser("explain", help="show the decision for one token and request, and why")
    explain.add_argument("--config", required=True, help="YAML settings file")
    explain.add_argument("--method", default="GET")
    explain.add_argument("--host", default="", help="the request's Host (for host-matched policies)")
    explain.add_argument("--path", default="/", help="the request's path and query")
    explain.add_argument("--scheme", default="http", choices=["http", "https"], help="the request's scheme")
    explain.add_argument("--dpop", default="", help="the request's DPoP proof (never printed)")
    explain.add_argument("--json", action="store_true", help="print the report as JSON")
    explain.add_argument(
        "token", help="the access token (after --, as it may start with -), or - to read it from stdin"
    )
    explain.set_defaults(func=cmd_explain)
    dev = sub.add_parser("dev", help="run against an embedded development identity provider")
    dev.add_argument("--issuer-port", type=int, default=9400)
    dev.add_argument("--http-port", type=int, default=8080)
    dev.add_argument("--grpc-port", type=int, default=50051)
    dev.add_argument("--metrics-port", type=int, default=9464)
    dev.set_defaults(func=cmd_dev)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    return int(args.func(args))
