"""The Python Kong plugin (kong/python/edge_verifier.py) under the REAL `kong-python-pluginserver`.

This test plays Kong: it speaks Kong's MessagePack-RPC to the plugin server's unix socket exactly as
kong/runloop/plugin_servers/mp_rpc.lua does (`plugin.GetPluginInfo`, `plugin.StartInstance`,
`plugin.HandleEvent`, then one `plugin.Step*` per PDK call the plugin makes, until the event
answers "ret" or the plugin calls a terminal `kong.response.exit`/`kong.response.error`). The PDK
calls are answered from a request description as Kong would answer them, and recorded, so a test
asserts what the plugin asked Kong to do. Behind the plugin: the REAL verifier (gRPC door), whose
issuer is the REAL oidc-provider (tests/integration/op_harness.py).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from gateways import (
    CLIENT_COPIES,
    GatewayProcess,
    LocalIssuer,
    free_port,
    start_strict_verifier,
    start_verifier,
    unique_token,
    with_a_half_aged_nonce,
)
from op_harness import OTHER_AUDIENCE, OpenIDProvider
from replicas import dpop_proof, public_jwk
from rigs import provider_fixture
from support import StallMeter

from verifier.binding.dpop import thumbprint
from verifier.doors.grpc import server_options
from verifier.settings import DEFAULT_GRPC_MAX_CONCURRENT_STREAMS
from verifier.v1 import verifier_pb2, verifier_pb2_grpc

pytestmark = pytest.mark.integration

msgpack = pytest.importorskip("msgpack", reason="kong-pdk is missing (run .ci/setup.d/31-kong-pdk.sh)")

REPO = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO / "kong" / "python"
PLUGIN = "edge_verifier"  # the plugin server names a plugin after its file
SOCKET_NAME = "python_pluginserver.sock"
START_TIMEOUT_S = 20.0
RPC_TIMEOUT_S = 15.0

# As mp_rpc.lua: the Step method that carries each PDK method's result back.
STEP_FOR = {
    "kong.client.get_credential": "plugin.StepCredential",
    "kong.client.load_consumer": "plugin.StepConsumer",
    "kong.client.get_consumer": "plugin.StepConsumer",
    "kong.client.authenticate": "plugin.StepCredential",
    "kong.request.get_query": "plugin.StepMultiMap",
    "kong.request.get_headers": "plugin.StepMultiMap",
    "kong.response.get_headers": "plugin.StepMultiMap",
}
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
# PDK methods after which Kong never steps the event again: the request is answered.
TERMINAL = {"kong.response.exit", "kong.response.error"}
# The plugin's own answers (kong.response.error's arguments): never to be kept by a cache, a 503 saying when to retry
OWN_ANSWER_HEADERS = {"Cache-Control": "no-store"}
UNAVAILABLE_ANSWER = [[503, "Authorization service unavailable", {**OWN_ANSWER_HEADERS, "Retry-After": "1"}]]
UNKNOWN_CONSUMER = [[403, "The verified identity is not a known consumer", OWN_ANSWER_HEADERS]]
UNEXPECTED = [[500, "An unexpected error occurred", OWN_ANSWER_HEADERS]]


def pluginserver_binary() -> str | None:
    beside = Path(sys.executable).parent / "kong-python-pluginserver"
    return str(beside) if beside.exists() else shutil.which("kong-python-pluginserver")


# --------------------------------------------------------------------------- Kong's side of the RPC


@dataclass
class KongRequest:
    """The request Kong is proxying, as the PDK reports it."""

    headers: dict[str, str | list[str]] = field(default_factory=dict)
    method: str = "GET"
    scheme: str = "http"
    host: str = "api.example.test"
    port: int = 8000
    # what kong.request.get_forwarded_scheme/_port answer: Kong's own, unless a trusted proxy (trusted_ips) or
    # port_maps says otherwise
    forwarded_scheme: str | None = None
    forwarded_port: int | None = None
    path_with_query: str = "/api/items?limit=5"
    client_ip: str = "203.0.113.9"
    client_cert_pem: str = ""  # what nginx's $ssl_client_raw_cert holds when Kong terminated mutual TLS
    consumers: list[dict[str, str]] = field(default_factory=list)  # Kong's datastore
    consumer: dict[str, str] | None = None  # authenticated by an earlier plugin (key-auth, say)
    failing: dict[str, str] = field(default_factory=dict)  # PDK method -> the error Kong's call returns (nil, err)

    def load_consumer(self, name: str, by_username: bool) -> dict[str, str] | None:
        """kong.client.load_consumer: a UUID is tried as an id first, then (if asked) as a username."""
        if UUID.match(name):
            found = next((c for c in self.consumers if c["id"] == name), None)
            if found:
                return found
        return next((c for c in self.consumers if c.get("username") == name), None) if by_username else None

    def answer(self, method: str, args: list[Any]) -> Any:
        """What Kong's PDK returns for `method` (after mp_rpc.lua's fix_mmap for header maps)."""
        if method == "kong.client.load_consumer":
            return self.load_consumer(args[0], bool(args[1:] and args[1]))
        if method == "kong.client.get_consumer":
            return self.consumer
        if method == "kong.nginx.get_var":
            return self.client_cert_pem if args == ["ssl_client_raw_cert"] else None
        if method == "kong.request.get_headers":
            # Kong's headers table: lower-case names; fix_mmap sends a lone string as a 1-list. As
            # ngx.req.get_headers(max), only the first `max` header lines are returned, and over the
            # plugin server's RPC the "truncated" error is lost.
            limit = int(args[0]) if args else 100
            table: dict[str, list[str]] = {}
            lines = 0
            for k, v in self.headers.items():
                for one in v if isinstance(v, list) else [v]:
                    if lines == limit:
                        return table
                    table.setdefault(k.lower(), []).append(one)
                    lines += 1
            return table
        simple = {
            "kong.request.get_method": self.method,
            "kong.request.get_scheme": self.scheme,
            "kong.request.get_host": self.host,
            "kong.request.get_port": self.port,
            "kong.request.get_forwarded_scheme": self.forwarded_scheme or self.scheme,
            "kong.request.get_forwarded_port": self.forwarded_port or self.port,
            "kong.request.get_path_with_query": self.path_with_query,
            "kong.client.get_ip": self.client_ip,
            "kong.client.tls.get_full_client_certificate_chain": self.client_cert_pem,
        }
        return simple.get(method)


class KongRpc:
    """One MessagePack-RPC connection to a plugin server, used the way Kong uses it."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(RPC_TIMEOUT_S)
        self.sock.connect(path)
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.msg_id = 0

    def call(self, method: str, *args: Any) -> Any:
        """Request [0, id, method, args] -> the result of response [1, id, error, result]."""
        self.msg_id += 1
        # A string with surrogate escapes stands for bytes that are not UTF-8: Kong's lua-MessagePack packs every Lua
        # string, a header value or path with a Latin-1 byte included, as a msgpack str, byte for byte.
        self.sock.sendall(msgpack.packb([0, self.msg_id, method, list(args)], unicode_errors="surrogateescape"))
        while True:
            for msg in self.unpacker:
                kind, msg_id, error, result = msg
                assert (kind, msg_id) == (1, self.msg_id), msg
                if error is not None:
                    raise RuntimeError(f"{method}: {error}")
                return result
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("plugin server closed the connection")
            self.unpacker.feed(data)

    def handle_event(self, instance_id: int, phase: str, request: KongRequest) -> list[tuple[str, list[Any]]]:
        """Run one phase of one request as mp_rpc.lua's bridge_loop does; the PDK calls, in order."""
        calls: list[tuple[str, list[Any]]] = []
        step = self.call("plugin.HandleEvent", {"InstanceId": instance_id, "EventName": phase})
        event_id = step["EventId"]
        while step["Data"] != "ret":
            method, args = step["Data"]["Method"], list(step["Data"].get("Args") or [])
            calls.append((method, args))
            if method in TERMINAL:
                break  # Kong's kong.response.exit ends the request; the event is not stepped again
            if method in request.failing:  # mp_rpc.lua's get_step_method: a PDK error is stepped as StepError
                step = self.call("plugin.StepError", {"EventId": event_id, "Data": request.failing[method]})
                continue
            result = request.answer(method, args)
            step = self.call(STEP_FOR.get(method, "plugin.Step"), {"EventId": event_id, "Data": result})
        return calls

    def close(self) -> None:
        self.sock.close()


class PluginServer:
    """`kong-python-pluginserver -d kong/python` on a unix socket in a short temporary prefix."""

    def __init__(self, *extra_args: str, launcher: Sequence[str] | None = None) -> None:
        binary = pluginserver_binary()
        if binary is None:
            msg = "kong-python-pluginserver is missing (run .ci/setup.d/31-kong-pdk.sh)"
            if os.environ.get("CI"):
                pytest.fail(msg)  # CI installs it; a skip there would hide a broken setup
            pytest.skip(msg)
        # unix socket paths are limited to ~107 bytes: keep the prefix short
        self.prefix = tempfile.mkdtemp(prefix="kpy-")
        self.socket_path = os.path.join(self.prefix, SOCKET_NAME)
        self.log_path = os.path.join(self.prefix, "pluginserver.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*(launcher or [binary]), "-p", self.prefix, "-d", str(PLUGIN_DIR), "-vv", *extra_args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"plugin server exited with {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.socket_path):
                with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.socket_path)
                    return
            time.sleep(0.05)
        raise RuntimeError(f"plugin server did not listen in time:\n{self.log()}")

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def connect(self) -> KongRpc:
        return KongRpc(self.socket_path)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.prefix, ignore_errors=True)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=["python-style", "lua-style"])
def pluginserver(request: pytest.FixtureRequest) -> Iterator[PluginServer]:
    """Both return conventions of kong-pdk: `--no-lua-style` (recommended) and the default."""
    server = PluginServer(*(["--no-lua-style"] if request.param == "python-style" else []))
    yield server
    server.stop()


@pytest.fixture
def kong(pluginserver: PluginServer) -> Iterator[KongRpc]:
    rpc = pluginserver.connect()
    yield rpc
    rpc.close()


provider = provider_fixture("provider", scope="module")


@pytest.fixture(scope="module")
def verifier(provider: OpenIDProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    v = start_verifier(tmp_path_factory.mktemp("verifier"), issuer=provider.issuer)
    yield v
    v.stop()


@pytest.fixture(scope="module")
def token(provider: OpenIDProvider) -> str:
    return provider.client_credentials_token()


def grpc_target(v: GatewayProcess) -> str:
    target = f"127.0.0.1:{v.extra['grpc_port']}"
    _TARGETS_USED.add(target)
    return target


# Targets the plugin process has been pointed at in this module. Its client keeps state per target across plugin
# instances (channels, reconnect back-off), as Kong's worker does; a fake verifier that got a port an earlier,
# stopped one had would find that state (a broken channel, a back-off) and the plugin would not reach it: a test of
# what the plugin does with a verifier's answer, or its silence, would see "unreachable" instead.
_TARGETS_USED: set[str] = set()


def start_instance(kong: KongRpc, **config: Any) -> int:
    status = kong.call("plugin.StartInstance", {"Name": PLUGIN, "Config": json.dumps(config)})
    return int(status["Id"])


def ask_directly(v: GatewayProcess, authorization: str | None) -> verifier_pb2.CheckResponse:
    """The verifier's own gRPC answer to the question the plugin asks."""
    headers = {"authorization": authorization} if authorization else {}
    with grpc.insecure_channel(grpc_target(v)) as channel:
        return verifier_pb2_grpc.VerifierStub(channel).Check(
            verifier_pb2.CheckRequest(
                method="GET",
                scheme="http",
                host="api.example.test:8000",
                path="/api/items?limit=5",
                headers=headers,
                client_address="203.0.113.9",
            ),
            timeout=5,
        )


def forward_auth_challenge(v: GatewayProcess, authorization: str | None, name: str = "WWW-Authenticate") -> str:
    """A header (the challenge, by default) of the forward-auth door's answer: what the Lua plugin relays."""
    conn = http.client.HTTPConnection("127.0.0.1", v.extra["http_port"], timeout=5)
    try:
        conn.request("GET", "/v1/forward-auth/", headers={"Authorization": authorization} if authorization else {})
        r = conn.getresponse()
        r.read()
        return str(r.getheader(name))
    finally:
        conn.close()


def named(calls: list[tuple[str, list[Any]]], method: str) -> list[list[Any]]:
    return [args for m, args in calls if m == method]


# --------------------------------------------------------------------------- plugin info


def test_plugin_server_reports_name_phase_priority_and_schema(kong):
    info = kong.call("plugin.GetPluginInfo", PLUGIN)

    assert info["Name"] == PLUGIN
    assert info["Phases"] == ["access"]
    assert info["Priority"] == 990
    assert info["Version"] == "0.1.0"
    fields = {next(iter(f)): next(iter(f.values())) for f in info["Schema"]["fields"][0]["config"]["fields"]}
    assert fields["grpc_target"] == {"type": "string", "required": True}
    assert fields["timeout"]["default"] == 1000
    assert fields["fail_open"]["default"] is False
    assert fields["consumer_not_found"] == {"type": "string", "default": "refuse", "required": True,
                                          "one_of": ["refuse", "anonymous"]}
    assert fields["anonymous"] == {"type": "string", "len_min": 1}
    assert fields["streams_per_channel"] == {"type": "integer", "default": DEFAULT_GRPC_MAX_CONCURRENT_STREAMS,
                                             "between": [1, 10_000], "required": True}
    assert fields["max_channels"] == {"type": "integer", "default": 8, "between": [1, 256], "required": True}
    assert fields["reconnect_backoff"] == {"type": "integer", "default": 250, "between": [1, 600_000],
                                           "required": True}
    assert fields["reconnect_backoff_max"] == {"type": "integer", "default": 5000, "between": [1, 600_000],
                                               "required": True}


# --------------------------------------------------------------------------- allow


def test_allow_sets_the_verified_identity_on_the_upstream_request(kong, verifier, provider, token):
    iid = start_instance(kong, grpc_target=grpc_target(verifier), timeout=1000, fail_open=False)
    request = KongRequest(headers={"Authorization": f"Bearer {token}", "X-Authenticated-Userid": "admin"})

    calls = kong.handle_event(iid, "access", request)

    assert not named(calls, "kong.response.exit") and not named(calls, "kong.response.error")
    # the client's spoofed identity is cleared before the verifier's is set
    assert "x-authenticated-userid" in cleared(calls)
    set_headers = {args[0].lower(): args[1] for args in named(calls, "kong.service.request.set_header")}
    assert set_headers == {
        "x-authenticated-userid": "app",
        "x-authenticated-scope": "read write",
        "x-authenticated-issuer": provider.issuer,
    }
    # Authorization is read, never rewritten
    assert all(args[0].lower() != "authorization" for m, args in calls if m.startswith("kong.service.request."))


ADMIN_HOST = "admin.example.test"
HOST_POLICIES = [
    {"name": "admin-host", "match": {"hosts": [ADMIN_HOST]}, "require": {"roles_any": ["admin"]}},
    {"name": "rest", "match": {"path_prefix": "/"}, "require": {"authenticated": True}},
]


@pytest.fixture(scope="module")
def host_policed_verifier(provider: OpenIDProvider, tmp_path_factory: pytest.TempPathFactory
                          ) -> Iterator[GatewayProcess]:
    """The real verifier with the admin host needing the `admin` role (the token has none)."""
    v = start_verifier(tmp_path_factory.mktemp("verifier"), issuer=provider.issuer,
                       extra_config={"policies": HOST_POLICIES})
    yield v
    v.stop()


def test_an_absolute_form_target_naming_a_laxer_host_does_not_open_the_host_headers_one(
    kong, host_policed_verifier, token
):
    """`GET http://api.example.test/orders` with `Host: admin.example.test`: kong.request.get_host is nginx's
    $host (the request line's), while Kong's router routes by the Host header and preserve_host passes it
    upstream. Judged for the API host alone, a token without the admin role reached the admin host."""
    iid = start_instance(kong, grpc_target=grpc_target(host_policed_verifier))
    request = KongRequest(host="api.example.test", path_with_query="/orders",
                          headers={"Host": ADMIN_HOST, "Authorization": f"Bearer {token}"})

    calls = kong.handle_event(iid, "access", request)

    assert not named(calls, "kong.service.request.set_header")
    (exit_args,) = named(calls, "kong.response.exit")
    assert exit_args[0] in (400, 403), exit_args
    # the same request with the admin host in the request line too is the admin host's (403), and one naming
    # the API host both ways passes: the Host header is read only when it names another host
    same = kong.handle_event(iid, "access", KongRequest(host=ADMIN_HOST, path_with_query="/orders", headers={
        "Host": f"{ADMIN_HOST.upper()}.:8000", "Authorization": f"Bearer {token}"}))
    assert [a[0] for a in named(same, "kong.response.exit")] == [403]
    api = kong.handle_event(iid, "access", KongRequest(host="api.example.test", path_with_query="/orders",
                                                       headers={"Host": "api.example.test:8000",
                                                                "Authorization": f"Bearer {token}"}))
    assert not named(api, "kong.response.exit") and named(api, "kong.service.request.set_header")


def established_to(port: int) -> int:
    """ESTABLISHED TCP connections (this network namespace) accepted on local `port`."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def test_requests_of_every_instance_share_one_channel(kong, verifier, token):
    request = KongRequest(headers={"Authorization": f"Bearer {token}"})

    for _ in range(3):  # a new configuration each time, as after Kong config reloads
        iid = start_instance(kong, grpc_target=grpc_target(verifier))
        for _ in range(3):
            calls = kong.handle_event(iid, "access", request)
            assert len(named(calls, "kong.service.request.set_header")) == 3

    assert established_to(verifier.extra["grpc_port"]) == 1


# --------------------------------------------------------------------------- deny


@pytest.mark.parametrize("case", ["no-token", "garbage", "other-audience"])
def test_deny_exits_with_the_verifiers_status_headers_and_body(kong, verifier, provider, case):
    authorization = {
        "no-token": None,
        "garbage": "Bearer not-a-jwt.at.all",
        "other-audience": f"Bearer {provider.client_credentials_token(resource=OTHER_AUDIENCE)}",
    }[case]
    direct = ask_directly(verifier, authorization)
    iid = start_instance(kong, grpc_target=grpc_target(verifier))
    request = KongRequest(headers={"Authorization": authorization} if authorization else {})

    calls = kong.handle_event(iid, "access", request)

    (exit_args,) = named(calls, "kong.response.exit")
    assert calls[-1][0] == "kong.response.exit"  # nothing after: the request is answered
    status, body, headers = exit_args
    assert status == direct.http_status == {"no-token": 401, "garbage": 401, "other-audience": 403}[case]
    assert body == direct.body
    # the lines the forward-auth door adds to the same refusal, which the Lua plugin relays: its reason and its
    # body's type; and no-store, never the verifier's reuse (a gateway's, not the client's)
    assert headers == {**{h.name: h.value for h in direct.response_headers}, "X-Verifier-Reason": direct.reason,
                       "Cache-Control": "no-store", **({"Content-Type": "application/json"} if body else {})}
    challenge = next(v for k, v in headers.items() if k.lower() == "www-authenticate")
    assert challenge.startswith('Bearer realm="verifier"')
    # the same challenge the forward-auth door, and so the Lua plugin, gives the client
    assert challenge == forward_auth_challenge(verifier, authorization)
    if case == "garbage":
        assert 'error="invalid_token"' in challenge and json.loads(body)["error"] == "invalid_token"
    if case == "other-audience":
        assert 'error="insufficient_scope"' in challenge
    assert not named(calls, "kong.service.request.set_header")


# --------------------------------------------------------------------------- verifier down


def test_unreachable_verifier_fails_closed_with_503(kong, token):
    iid = start_instance(kong, grpc_target=f"127.0.0.1:{free_port()}", timeout=500)

    calls = kong.handle_event(iid, "access", KongRequest(headers={"Authorization": f"Bearer {token}"}))

    assert named(calls, "kong.response.error") == UNAVAILABLE_ANSWER
    assert not named(calls, "kong.service.request.set_header")


def test_killed_verifier_fails_closed_with_503(kong, provider, token, tmp_path):
    own = start_verifier(tmp_path, issuer=provider.issuer)
    try:
        iid = start_instance(kong, grpc_target=grpc_target(own), timeout=500)
        request = KongRequest(headers={"Authorization": f"Bearer {token}"})
        assert len(named(kong.handle_event(iid, "access", request), "kong.service.request.set_header")) == 3

        own.proc.kill()
        own.proc.wait(timeout=10)

        for _ in range(2):  # the channel's dead connection, then refused reconnects
            calls = kong.handle_event(iid, "access", request)
            assert named(calls, "kong.response.error") == UNAVAILABLE_ANSWER
    finally:
        own.stop()


class _SlowVerifier(verifier_pb2_grpc.VerifierServicer):
    """Allows every request, but only once released (30 s at most): a plugin that waited for it would pass the
    request, however long a loaded machine made the wait."""

    def __init__(self, answer_first: bool = False) -> None:
        self.released = threading.Event()
        self.answer_first = answer_first  # the first request answered at once: the plugin's channel is up after it

    def Check(self, request: verifier_pb2.CheckRequest, context: grpc.ServicerContext) -> verifier_pb2.CheckResponse:
        if self.answer_first:
            self.answer_first = False
        else:
            self.released.wait(30)
        return verifier_pb2.CheckResponse(allowed=True, http_status=200)


@contextlib.contextmanager
def slow_verifier(answer_first: bool = False) -> Iterator[str]:
    """A `_SlowVerifier` on loopback, released when the block ends; yields its target."""
    servicer = _SlowVerifier(answer_first)
    with fake_verifier(servicer) as target:
        try:
            yield target
        finally:
            servicer.released.set()


@contextlib.contextmanager
def fake_verifier(servicer: verifier_pb2_grpc.VerifierServicer) -> Iterator[str]:
    """A gRPC verifier on loopback answering with `servicer`; yields its target."""
    for _ in range(20):  # a port no earlier target of this module had (`_TARGETS_USED`)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        verifier_pb2_grpc.add_VerifierServicer_to_server(servicer, server)
        target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        if target not in _TARGETS_USED:
            break
        server.stop(grace=None)
    _TARGETS_USED.add(target)
    server.start()
    try:
        yield target
    finally:
        server.stop(grace=None)


# The configured `timeout` (ms) of the slow-verifier test: above the plugin's default (1000), so an answer no
# sooner shows the configured value was used (a stall only ever adds time), and the test needs no upper bound
# tighter than seconds.
SLOW_TIMEOUT_MS = 1500


def test_a_verifier_slower_than_the_deadline_fails_closed(kong, token):
    with slow_verifier() as target:
        iid = start_instance(kong, grpc_target=target, timeout=SLOW_TIMEOUT_MS)
        with StallMeter() as machine:
            started = time.monotonic()
            calls = kong.handle_event(iid, "access", KongRequest(headers={"Authorization": f"Bearer {token}"}))
            elapsed = time.monotonic() - started

    # 503 while the verifier still held its allow: the plugin did not wait for it
    assert named(calls, "kong.response.error") == UNAVAILABLE_ANSWER
    assert elapsed >= SLOW_TIMEOUT_MS / 1000  # the configured timeout, not the default
    assert elapsed - machine.late < SLOW_TIMEOUT_MS / 1000 + 1.5, (elapsed, machine.late)  # and not much longer


def test_fail_open_passes_without_identity(kong, token):
    iid = start_instance(kong, grpc_target=f"127.0.0.1:{free_port()}", timeout=500, fail_open=True)
    request = KongRequest(headers={"Authorization": f"Bearer {token}", "X-Authenticated-Userid": "admin"})

    calls = kong.handle_event(iid, "access", request)

    assert not named(calls, "kong.response.error") and not named(calls, "kong.response.exit")
    assert "x-authenticated-userid" in cleared(calls)
    assert not named(calls, "kong.service.request.set_header")


# --------------------------------------------------------------------------- issue #26: G4, G5, G9

CONSUMER_HEADERS = {
    "x-consumer-id", "x-consumer-custom-id", "x-consumer-username", "x-credential-identifier", "x-anonymous-consumer"
}
IDENTITY_HEADERS = {
    "x-authenticated-userid", "x-authenticated-scope", "x-authenticated-issuer", "x-authenticated-roles"
}


class _RecordingVerifier(verifier_pb2_grpc.VerifierServicer):
    """Allows every request with a fixed identity and keeps what it was asked."""

    def __init__(self) -> None:
        self.requests: list[verifier_pb2.CheckRequest] = []

    def Check(self, request: verifier_pb2.CheckRequest, context: grpc.ServicerContext) -> verifier_pb2.CheckResponse:
        self.requests.append(request)
        return verifier_pb2.CheckResponse(
            allowed=True, http_status=200, upstream_headers=[verifier_pb2.Header(name="X-Authenticated-Userid",
                                                                                 value="app")]
        )


@pytest.fixture
def recording_verifier() -> Iterator[tuple[_RecordingVerifier, str]]:
    servicer = _RecordingVerifier()
    with fake_verifier(servicer) as target:
        yield servicer, target


def cleared(calls: list[tuple[str, list[Any]]]) -> set[str]:
    return {args[0].lower() for args in named(calls, "kong.service.request.clear_header")}


@pytest.mark.parametrize("fail_open", [False, True])
def test_client_consumer_headers_never_reach_the_upstream(kong, recording_verifier, fail_open):
    # G4: the Lua plugin clears them when no Kong authenticator named a consumer; so must this one
    _, target = recording_verifier
    iid = start_instance(kong, grpc_target=target if not fail_open else f"127.0.0.1:{free_port()}",
                         fail_open=fail_open)
    spoofed = {name: "admin" for name in CONSUMER_HEADERS}
    calls = kong.handle_event(iid, "access", KongRequest(headers={"Authorization": "Bearer x", **spoofed}))

    assert not named(calls, "kong.response.error")
    assert cleared(calls) >= CONSUMER_HEADERS


def test_identity_and_consumer_headers_are_cleared_by_name_even_unseen(kong, recording_verifier):
    # G5: clearing does not depend on seeing the header in the (bounded) enumeration
    _, target = recording_verifier
    iid = start_instance(kong, grpc_target=target)
    calls = kong.handle_event(iid, "access", KongRequest(headers={"Authorization": "Bearer x"}))

    assert cleared(calls) >= (CONSUMER_HEADERS | IDENTITY_HEADERS)


def test_every_client_x_authenticated_header_is_cleared(kong, recording_verifier):
    _, target = recording_verifier
    iid = start_instance(kong, grpc_target=target)
    request = KongRequest(headers={"Authorization": "Bearer x", "X-Authenticated-Groups": "admins",
                                   "x-authenticated-tenant": "other"})
    calls = kong.handle_event(iid, "access", request)

    assert {"x-authenticated-groups", "x-authenticated-tenant"} <= cleared(calls)
    assert calls.index(next(c for c in calls if c[0] == "kong.service.request.set_header")) > max(
        i for i, c in enumerate(calls) if c[0] == "kong.service.request.clear_header"
    ), "the verifier's identity is set after the client's is cleared"


def test_identity_headers_spelled_with_underscores_are_cleared(kong, recording_verifier):
    # Kong's own nginx template has `underscores_in_headers on`: `X_Authenticated_Roles` reaches the plugin
    # and the upstream, where CGI-style frameworks (WSGI, Rack, PHP) read it as X-Authenticated-Roles. The
    # Lua plugin clears every such spelling (tests/kong/test_trust_boundary_lua.py); so must this one.
    _, target = recording_verifier
    iid = start_instance(kong, grpc_target=target)
    spoofed = {"X_Authenticated_Roles": "admin", "x_authenticated_userid": "root", "X-Authenticated_Scope": "all",
               "X_Kong_Consumer_Username": "root", "X_Consumer_Groups": "admins", "X_Consumer_ID": "0000"}
    calls = kong.handle_event(iid, "access", KongRequest(headers={"Authorization": "Bearer x", **spoofed}))

    assert not named(calls, "kong.response.error")
    assert {name.lower() for name in spoofed} <= cleared(calls)


@pytest.mark.parametrize("override", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override",
                                      "X_HTTP_Method_Override"])
def test_a_method_override_never_reaches_the_upstream(kong, recording_verifier, override):
    # The verifier judged the request's real method (a GET a read-only token may make): an application
    # framework must not be told to run another one, as the Lua plugin and every gateway template ensure.
    servicer, target = recording_verifier
    iid = start_instance(kong, grpc_target=target)
    calls = kong.handle_event(iid, "access", KongRequest(headers={"Authorization": "Bearer x", override: "DELETE"}))

    (sent,) = servicer.requests
    assert sent.method == "GET"
    assert override.lower() in cleared(calls)


@pytest.mark.parametrize("spoof", ["X-Forwarded-Method", "x_forwarded_method", "X_Forwarded_Host", "X_Forwarded_Proto",
                                   "X_Forwarded_Port", "X_Forwarded_Uri"])
def test_the_clients_words_for_what_the_verifier_is_told_never_reach_the_upstream(kong, recording_verifier, spoof):
    """X-Forwarded-Method is how the Lua plugin tells the verifier the method, and Kong never sets it for the
    upstream: a client's reached the upstream (or a second verifier hop) as if it were what was checked. An
    underscore spelling of any X-Forwarded-* is never Kong's own (Kong sets the dashed -Host/-Proto/-Port), and
    CGI-style frameworks read it as the dashed one. Both cleared, as by the Lua plugin."""
    servicer, target = recording_verifier
    iid = start_instance(kong, grpc_target=target)
    calls = kong.handle_event(iid, "access", KongRequest(headers={"Authorization": "Bearer x", spoof: "DELETE"}))

    (sent,) = servicer.requests[-1:]
    assert sent.method == "GET"
    assert spoof.lower() in cleared(calls)


def test_behind_a_trusted_tls_proxy_the_verifier_is_told_the_scheme_and_port_the_client_used(kong, recording_verifier):
    """A load balancer in `trusted_ips` terminates TLS and sends Kong plain http on 8000 with X-Forwarded-Proto https
    and -Port 443: Kong's forwarded scheme and port are https and 443, the URL the client used (a DPoP proof names
    it). Told Kong's own scheme beside the forwarded port, the verifier judged `http://api.example.test:443/...`
    and every such proof was refused; told Kong's own both, `http://api.example.test:8000/...`."""
    servicer, target = recording_verifier
    iid = start_instance(kong, grpc_target=target)
    request = KongRequest(headers={"Authorization": "Bearer x"}, forwarded_scheme="https", forwarded_port=443)
    kong.handle_event(iid, "access", request)

    (sent,) = servicer.requests[-1:]
    assert (sent.scheme, sent.host) == ("https", "api.example.test")


def test_kongs_own_forwarded_headers_are_left_to_kong(kong, recording_verifier):
    """The dashed X-Forwarded-Host/-Proto/-Port/-For are Kong's: it overwrites them for the upstream from its own
    state, or keeps a trusted proxy's (trusted_ips). The plugin does not second-guess that."""
    _, target = recording_verifier
    iid = start_instance(kong, grpc_target=target)
    mine = {"X-Forwarded-Host": "api.example.test", "X-Forwarded-Proto": "https", "X-Forwarded-Port": "443",
            "X-Forwarded-For": "203.0.113.9"}
    calls = kong.handle_event(iid, "access", KongRequest(headers={"Authorization": "Bearer x", **mine}))

    assert not {name.lower() for name in mine} & cleared(calls)


@pytest.mark.parametrize("spoof", ["X-Original-URL", "X-Original-URI", "X-Rewrite-URL", "X-Forwarded-Uri",
                                   "X_Original_URL"])
def test_a_client_named_request_target_never_reaches_the_upstream(kong, recording_verifier, spoof):
    """The verifier judged the request line's target; an application that takes its path from one of these
    headers instead (IIS behind ARR, Symfony and Zend Framework before CVE-2018-14773's fixes read X-Original-URL
    and X-Rewrite-URL) must not be told /admin/secret by the client, as the Lua plugin ensures."""
    _, target = recording_verifier
    iid = start_instance(kong, grpc_target=target)
    request = KongRequest(headers={"Authorization": "Bearer x", spoof: "/admin/secret"}, path_with_query="/health")

    calls = kong.handle_event(iid, "access", request)

    assert not named(calls, "kong.response.exit") and not named(calls, "kong.response.error")
    assert spoof.lower() in cleared(calls)


def test_more_request_headers_than_can_be_enumerated_are_refused(kong, recording_verifier):
    # G5: a spoofed identity header past the 1000th would not be seen to be cleared
    servicer, target = recording_verifier
    iid = start_instance(kong, grpc_target=target, fail_open=True)
    headers: dict[str, str | list[str]] = {"Authorization": "Bearer x", "X-Padding": ["p"] * 1000,
                                           "X-Authenticated-Tenant": "other"}
    calls = kong.handle_event(iid, "access", KongRequest(headers=headers))

    (exit_args,) = named(calls, "kong.response.exit")
    assert exit_args[0] == 400
    assert not servicer.requests and not named(calls, "kong.service.request.set_header")


def test_a_client_cert_thumbprint_header_is_never_sent_as_the_thumbprint(kong, recording_verifier):
    servicer, target = recording_verifier
    iid = start_instance(kong, grpc_target=target)
    request = KongRequest(scheme="https", headers={"Authorization": "Bearer x", "X-Client-Cert-Thumbprint": "forged"})
    kong.handle_event(iid, "access", request)

    (sent,) = servicer.requests
    assert sent.client_cert_thumbprint == ""
    assert "forged" not in sent.headers.values()


def test_the_thumbprint_comes_from_the_tls_connection_kong_terminated(kong, recording_verifier):
    servicer, target = recording_verifier
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    expected = base64.urlsafe_b64encode(hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()).rstrip(b"=")
    iid = start_instance(kong, grpc_target=target)
    request = KongRequest(scheme="https", client_cert_pem=cert.public_bytes(Encoding.PEM).decode(),
                          headers={"Authorization": "Bearer x", "X-Client-Cert-Thumbprint": "forged"})
    kong.handle_event(iid, "access", request)

    (sent,) = servicer.requests
    assert sent.client_cert_thumbprint == expected.decode()


def test_fail_open_never_passes_a_request_whose_check_timed_out(kong, token):
    # G9: the verifier had the request and was still checking it; only an unreachable verifier fails open
    # The first request is answered, so the second is sent on a connection already up: a connection attempt that a
    # loaded machine made fail inside the 200 ms (UNAVAILABLE: unreachable, so fail_open passes) is another test.
    with slow_verifier(answer_first=True) as target:
        iid = start_instance(kong, grpc_target=target, timeout=200, fail_open=True)
        request = KongRequest(headers={"Authorization": f"Bearer {token}"})
        first = kong.handle_event(iid, "access", request)
        assert not named(first, "kong.response.error") and not named(first, "kong.response.exit")
        calls = kong.handle_event(iid, "access", request)

    assert named(calls, "kong.response.error") == UNAVAILABLE_ANSWER


# A verifier that dies with the request in hand: its process exits inside `Check`, so the connection the check
# was sent on closes under the call (the plugin sees UNAVAILABLE, as for a connection that never came up).
_DYING_VERIFIER = """
import os, sys
from concurrent import futures
import grpc
from verifier.v1 import verifier_pb2_grpc

class Dying(verifier_pb2_grpc.VerifierServicer):
    def Check(self, request, context):
        os._exit(3)

server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
verifier_pb2_grpc.add_VerifierServicer_to_server(Dying(), server)
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
server.wait_for_termination()
"""


def test_fail_open_never_passes_a_request_the_verifier_had_when_it_went_away(kong, token):
    """An attacker's token that makes the verifier crash (or a verifier killed mid-check) must not pass with
    `fail_open`: the check was under way. Only a verifier that could not be connected to passes."""
    dying = subprocess.Popen([sys.executable, "-c", _DYING_VERIFIER], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    try:
        assert dying.stdout is not None
        target = f"127.0.0.1:{int(dying.stdout.readline())}"
        _TARGETS_USED.add(target)
        iid = start_instance(kong, grpc_target=target, timeout=5000, fail_open=True)
        calls = kong.handle_event(iid, "access", KongRequest(headers={"Authorization": f"Bearer {token}"}))
        assert dying.wait(timeout=30) == 3  # it had the request
    finally:
        dying.kill()
        dying.wait(timeout=10)
    assert named(calls, "kong.response.error") == UNAVAILABLE_ANSWER
    assert not named(calls, "kong.service.request.set_header")


def test_the_client_certificate_comes_from_kongs_own_tls_never_from_a_header(kong, token):
    from cryptography.hazmat.primitives.serialization import Encoding
    from support import make_certificate

    from verifier.binding.mtls import thumbprint_from_der

    cert = make_certificate("kong-client")
    pem, expected = cert.public_bytes(Encoding.PEM).decode(), thumbprint_from_der(cert.public_bytes(Encoding.DER))
    capturing = _RecordingVerifier()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    verifier_pb2_grpc.add_VerifierServicer_to_server(capturing, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    spoof = {"Authorization": f"Bearer {token}", "X-Client-Cert-Thumbprint": expected}
    try:
        iid = start_instance(kong, grpc_target=f"127.0.0.1:{port}", timeout=1000)
        for request in (
            KongRequest(headers=spoof, scheme="https", port=443, client_cert_pem=pem),  # mutual TLS at Kong
            KongRequest(headers=spoof, scheme="https", port=443),  # TLS without a client certificate
            KongRequest(headers=spoof, scheme="https", port=443, client_cert_pem="not a certificate"),
            KongRequest(headers=spoof),  # plain http
        ):
            kong.handle_event(iid, "access", request)
    finally:
        server.stop(grace=None)

    assert [r.client_cert_thumbprint for r in capturing.requests] == [expected, "", "", ""]
    assert all("x-client-cert-thumbprint" not in r.headers for r in capturing.requests)


# --------------------------------------------------------------------------- issue #20: Kong consumers

ALICE = {"id": "6f1b5b0e-4a4e-4c53-9a58-2b1f6a0e7c11", "username": "alice", "custom_id": "cust-9"}
GUEST = {"id": "9e9e9e9e-0000-4000-8000-00000000a000", "username": "guest"}
BOB = {"id": "0b0b0b0b-0000-4000-8000-000000000001", "username": "bob"}
# cleared on every request: how the verifier names a consumer, and the one a client claimed to be named by
NAMES_CLEARED = {"x-kong-consumer-username": None, "x-kong-consumer-custom-id": None, "x-kong-consumer-id": None}


class _NamingVerifier(verifier_pb2_grpc.VerifierServicer):
    """Allows every request; `Bearer username=NAME` / `custom_id=VALUE` / `both` name a consumer among the
    upstream headers as the verifier's `upstream.consumer` does (`client-` first: no user id)."""

    def Check(self, request: verifier_pb2.CheckRequest, context: grpc.ServicerContext) -> verifier_pb2.CheckResponse:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        userid = "" if token.startswith("client-") else "user-1"
        token = token.removeprefix("client-")
        headers = [verifier_pb2.Header(name="X-Authenticated-Userid", value=userid)]
        field_, _, value = token.partition("=")
        if field_ in ("username", "both"):
            headers.append(verifier_pb2.Header(name="X-Kong-Consumer-Username", value=value or "alice"))
        if field_ in ("custom_id", "both"):
            headers.append(verifier_pb2.Header(name="X-Kong-Consumer-Custom-Id", value=value or "cust-9"))
        return verifier_pb2.CheckResponse(allowed=True, http_status=200, upstream_headers=headers)


@pytest.fixture(scope="module")
def naming_verifier() -> Iterator[str]:
    with fake_verifier(_NamingVerifier()) as target:
        yield target


def consumer_request(token: str, **kwargs: Any) -> KongRequest:
    spoofed = {name: "admin" for name in CONSUMER_HEADERS} | {"X-Consumer-Groups": "admins", "X-Kong-Consumer-Id": "0"}
    return KongRequest(headers={"Authorization": f"Bearer {token}", **spoofed}, consumers=[ALICE, GUEST], **kwargs)


def upstream_after(calls: list[tuple[str, list[Any]]]) -> dict[str, str | None]:
    """The upstream request's headers this plugin set or cleared, last write wins (None: cleared)."""
    out: dict[str, str | None] = {}
    for method, args in calls:
        if method == "kong.service.request.set_header":
            out[args[0].lower()] = args[1]
        elif method == "kong.service.request.clear_header":
            out[args[0].lower()] = None
    return {k: v for k, v in out.items() if k.startswith(("x-consumer", "x-credential", "x-anonymous", "x-kong"))}


def test_the_named_consumer_is_authenticated_with_the_usual_upstream_headers(kong, naming_verifier):
    iid = start_instance(kong, grpc_target=naming_verifier)

    calls = kong.handle_event(iid, "access", consumer_request("username=alice"))

    assert not named(calls, "kong.response.exit") and not named(calls, "kong.response.error")
    assert named(calls, "kong.client.load_consumer") == [["alice", True]]
    assert named(calls, "kong.client.authenticate") == [[ALICE, {"id": "user-1", "consumer_id": ALICE["id"]}]]
    methods = [m for m, _ in calls]
    # groups an earlier consumer brought are dropped before authenticate would keep them
    assert methods.index("kong.client.set_authenticated_consumer_groups") < methods.index("kong.client.authenticate")
    assert upstream_after(calls) == {
        "x-consumer-id": ALICE["id"],
        "x-consumer-custom-id": "cust-9",
        "x-consumer-username": "alice",
        "x-credential-identifier": "user-1",
        "x-anonymous-consumer": None,
        "x-consumer-groups": None,
        **NAMES_CLEARED,
    }


def test_a_header_value_that_is_not_utf8_never_skips_the_check(kong, verifier, token):
    """A Latin-1 byte in a header the plugin does not read (`User-Agent: 3V\\xe4xel`, kong-python-pdk#146): the
    plugin server's msgpack decoding raised before any plugin ran and closed Kong's connection, which Kong logs
    and proxies the request, unchecked and with the client's X-Authenticated-Userid. Now the plugin runs."""
    iid = start_instance(kong, grpc_target=grpc_target(verifier))
    request = KongRequest(headers={"Authorization": f"Bearer {token}", "User-Agent": "3V\udce4xel/1.5",
                                   "X-Authenticated-Userid": "admin"})

    calls = kong.handle_event(iid, "access", request)

    assert not named(calls, "kong.response.exit") and not named(calls, "kong.response.error")
    assert "x-authenticated-userid" in cleared(calls)
    assert ["x-authenticated-userid", "app"] in named(calls, "kong.service.request.set_header")


@pytest.mark.parametrize("where", ["authorization", "dpop", "host", "path", "name"])
def test_a_value_the_verifier_is_told_that_is_not_utf8_is_refused(kong, recording_verifier, token, where):
    """A value the plugin sends to the verifier (a credential, the Host header, the request target) that is not
    UTF-8 cannot go in the Check's strings, nor a header name in the clear_header Kong must be told: refused as
    malformed (400), never passed unchecked."""
    servicer, target = recording_verifier
    iid = start_instance(kong, grpc_target=target)
    headers: dict[str, str | list[str]] = {"Authorization": f"Bearer {token}"}
    path = "/api/items"
    if where == "path":
        path = "/caf\udce9"
    elif where == "name":
        headers["X-Authenticated-\udce4"] = "admin"
    else:
        headers[where] = "Bearer \udce4" if where == "authorization" else "api.example\udce4.test"
    asked = len(servicer.requests)

    calls = kong.handle_event(iid, "access", KongRequest(headers=headers, path_with_query=path))

    assert [args[0] for args in named(calls, "kong.response.exit")] == [400]
    assert not named(calls, "kong.service.request.set_header")
    assert len(servicer.requests) == asked


# The real plugin server, its kong-pdk changed the way an upgrade could change it: the listener reads Kong's frames
# with msgpack bound when it was imported (as `from msgpack import Unpacker` would), not through the module attribute
# `kong_pdk.listener.msgpack` the plugin wraps to decode strings that are not UTF-8.
LISTENER_CHANGED = """
import sys, types, msgpack
import kong_pdk.listener as listener
handle = listener.Server.handle
listener.Server.handle = types.FunctionType(handle.__code__, {**handle.__globals__, "msgpack": msgpack},
                                            handle.__name__, handle.__defaults__, handle.__closure__)
from kong_pdk.cli import start_server
sys.argv[0] = "kong-python-pluginserver"
start_server()
"""


def test_a_plugin_server_whose_listener_the_fix_misses_refuses_every_instance(recording_verifier, token):
    """The plugin wraps a kong-pdk internal to read frames that are not UTF-8; a kong-pdk that reads them another way
    would leave the wrapper silently unused, and a Latin-1 header would again close Kong's connection before the plugin
    ran (Kong logs it and proxies the request unchecked). The plugin checks at start-up that a frame that is not UTF-8
    reaches it through the listener, and if not refuses to start any instance: Kong's get_instance_id raises under the
    access phase and Kong answers each request 500 (kong/runloop/plugin_servers/plugin.lua, kong/init.lua). Before,
    the instance started and the request below closed the connection: proxied unchecked."""
    _servicer, target = recording_verifier
    server = PluginServer("--no-lua-style", launcher=[sys.executable, "-c", LISTENER_CHANGED])
    try:
        kong = server.connect()
        try:
            assert kong.call("plugin.GetPluginInfo", PLUGIN)["Name"] == PLUGIN  # Kong starts; the plugin is known
            with pytest.raises(RuntimeError, match=r"StartInstance: .*cannot serve.*not UTF-8"):
                iid = start_instance(kong, grpc_target=target)
                kong.handle_event(iid, "access", KongRequest(headers={
                    "Authorization": f"Bearer {token}", "User-Agent": "3V\udce4xel/1.5"}))
            # each request tries again (Kong drops the failed claim) and is refused again
            with pytest.raises(RuntimeError, match="StartInstance: "):
                start_instance(kong, grpc_target=target)
        finally:
            kong.close()
        assert "refusing to serve" in server.log()
    finally:
        server.stop()


def test_the_shipped_plugin_server_passes_the_start_up_check(kong):
    """The same check under the kong-pdk installed here: the wrapper takes, and the plugin serves (the UTF-8 tests
    above show the frames it lets through)."""
    assert kong.call("plugin.GetPluginInfo", PLUGIN)["Name"] == PLUGIN
    assert isinstance(start_instance(kong, grpc_target="127.0.0.1:1"), int)


def test_the_kong_pdk_in_use_is_one_the_listener_fix_is_known_for():
    """pyproject.toml's `kong` extra pins kong-pdk to the releases whose listener the fix was checked against; the
    plugin, its setup script and its README name the same range (an upgrade is a decision, not an accident)."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    pyproject = (REPO / "pyproject.toml").read_text()
    (pinned,) = re.findall(r'"(kong-pdk[^"]*)"', pyproject)
    plugin = (PLUGIN_DIR / f"{PLUGIN}.py").read_text()
    assert f'KONG_PDK_KNOWN = "{pinned}"' in plugin
    assert f"'{pinned}'" in (REPO / ".ci" / "setup.d" / "31-kong-pdk.sh").read_text()
    assert f"'{pinned}'" in (PLUGIN_DIR / "README.md").read_text()
    assert Requirement(pinned).specifier.contains(version("kong-pdk"))


def test_a_pdk_call_that_fails_under_the_plugin_answers_500_never_a_pass(kong, naming_verifier):
    """Kong's datastore failing under kong.client.load_consumer (its `nil, err`): the PDK raises in the plugin.
    Uncaught, the plugin's thread ended without a word to the plugin server, whose step then waited forever;
    Kong's RPC read timed out, Kong logged it and proxied the request, unauthenticated as a consumer, with the
    verifier's identity headers already set. An error is an answer (500), as Kong's own authenticators give."""
    iid = start_instance(kong, grpc_target=naming_verifier)
    request = consumer_request("username=alice", failing={"kong.client.load_consumer": "[postgres] timeout"})

    started = time.monotonic()
    calls = kong.handle_event(iid, "access", request)

    assert time.monotonic() - started < RPC_TIMEOUT_S / 3
    assert named(calls, "kong.response.error") == UNEXPECTED
    assert calls[-1][0] == "kong.response.error"
    assert not named(calls, "kong.client.authenticate")


def test_an_identity_without_a_user_id_authenticates_the_consumer_without_a_credential(kong, naming_verifier):
    iid = start_instance(kong, grpc_target=naming_verifier)

    calls = kong.handle_event(iid, "access", consumer_request("client-username=alice"))

    assert named(calls, "kong.client.authenticate") == [[ALICE, None]]
    after = upstream_after(calls)
    assert after["x-credential-identifier"] is None and after["x-anonymous-consumer"] is None


def test_an_unknown_consumer_is_refused_by_default(kong, naming_verifier):
    iid = start_instance(kong, grpc_target=naming_verifier)

    calls = kong.handle_event(iid, "access", consumer_request("username=mallory"))

    assert named(calls, "kong.response.error") == UNKNOWN_CONSUMER
    assert not named(calls, "kong.client.authenticate")


def test_an_unknown_consumer_passes_as_the_anonymous_consumer_when_configured(kong, naming_verifier):
    iid = start_instance(kong, grpc_target=naming_verifier, consumer_not_found="anonymous", anonymous="guest")

    calls = kong.handle_event(iid, "access", consumer_request("username=mallory"))

    assert not named(calls, "kong.response.error")
    assert named(calls, "kong.client.authenticate") == [[GUEST, None]]
    assert upstream_after(calls) == {
        "x-consumer-id": GUEST["id"],
        "x-consumer-custom-id": None,
        "x-consumer-username": "guest",
        "x-credential-identifier": None,
        "x-anonymous-consumer": "true",
        "x-consumer-groups": None,
        **NAMES_CLEARED,
    }


def test_a_configured_anonymous_consumer_that_does_not_exist_fails_closed(kong, naming_verifier):
    iid = start_instance(kong, grpc_target=naming_verifier, consumer_not_found="anonymous", anonymous="ghost")

    calls = kong.handle_event(iid, "access", consumer_request("username=mallory"))

    assert named(calls, "kong.response.error") == UNEXPECTED
    assert not named(calls, "kong.client.authenticate")


def test_anonymous_is_required_when_unknown_consumers_pass_as_anonymous(kong, naming_verifier):
    with pytest.raises(RuntimeError, match="anonymous is required"):
        start_instance(kong, grpc_target=naming_verifier, consumer_not_found="anonymous")


def test_a_subject_equal_to_another_consumers_id_does_not_become_that_consumer(kong, naming_verifier):
    # kong.client.load_consumer(name, true) tries a UUID as an id first
    iid = start_instance(kong, grpc_target=naming_verifier)

    calls = kong.handle_event(iid, "access", consumer_request(f"username={ALICE['id']}"))

    assert named(calls, "kong.response.error") == UNKNOWN_CONSUMER
    assert not named(calls, "kong.client.authenticate")


@pytest.mark.parametrize("token", ["both", "custom_id=cust-9"])
def test_a_consumer_this_plugin_cannot_find_exactly_fails_closed(kong, naming_verifier, token):
    # two names, or a custom_id: the PDK over the plugin server has no lookup by custom_id
    iid = start_instance(kong, grpc_target=naming_verifier, consumer_not_found="anonymous", anonymous="guest")

    calls = kong.handle_event(iid, "access", consumer_request(token))

    assert named(calls, "kong.response.error") == UNEXPECTED
    assert not named(calls, "kong.client.authenticate")


def test_the_consumer_of_an_earlier_authenticator_is_kept_when_none_is_named(kong, naming_verifier):
    iid = start_instance(kong, grpc_target=naming_verifier)

    calls = kong.handle_event(iid, "access", consumer_request("good", consumer=BOB))

    assert not named(calls, "kong.client.authenticate")
    # bob's X-Consumer-* stay; a client's X-Consumer-Groups and X-Kong-Consumer-* never do
    assert upstream_after(calls) == {"x-consumer-groups": None, **NAMES_CLEARED}


def test_the_naming_headers_never_reach_the_upstream(kong, naming_verifier):
    iid = start_instance(kong, grpc_target=naming_verifier)

    calls = kong.handle_event(iid, "access", consumer_request("username=alice"))

    written = named(calls, "kong.service.request.set_header") + named(calls, "kong.service.request.add_header")
    assert written and not [args for args in written if args[0].lower().startswith("x-kong")]


def test_the_consumer_the_real_verifier_names_is_authenticated(kong, provider, token, tmp_path):
    # the harness's client-credentials tokens have `sub` "app"
    app = {"id": "a0a0a0a0-0000-4000-8000-00000000a001", "username": "app"}
    own = start_verifier(tmp_path, issuer=provider.issuer,
                         extra_config={"upstream": {"consumer": {"claim": "sub", "by": "username"}}})
    try:
        iid = start_instance(kong, grpc_target=grpc_target(own))
        calls = kong.handle_event(iid, "access", KongRequest(headers={"Authorization": f"Bearer {token}"},
                                                             consumers=[app]))
    finally:
        own.stop()

    assert not named(calls, "kong.response.error") and not named(calls, "kong.response.exit")
    assert named(calls, "kong.client.authenticate") == [[app, {"id": "app", "consumer_id": app["id"]}]]
    assert upstream_after(calls)["x-consumer-username"] == "app"


class _AnswerNamingVerifier(verifier_pb2_grpc.VerifierServicer):
    """Allows every request, naming alice in `answer_headers`, as the #20 verifier side does."""

    def Check(self, request: verifier_pb2.CheckRequest, context: grpc.ServicerContext) -> verifier_pb2.CheckResponse:
        return verifier_pb2.CheckResponse(
            allowed=True,
            http_status=200,
            upstream_headers=[verifier_pb2.Header(name="X-Authenticated-Userid", value="user-1")],
            answer_headers=[verifier_pb2.Header(name="X-Kong-Consumer-Username", value="alice")],
        )


def test_a_consumer_named_in_answer_headers_is_authenticated(kong):
    with fake_verifier(_AnswerNamingVerifier()) as target:
        iid = start_instance(kong, grpc_target=target)
        calls = kong.handle_event(iid, "access", consumer_request("good"))

    assert not named(calls, "kong.response.error")
    assert named(calls, "kong.client.authenticate") == [[ALICE, {"id": "user-1", "consumer_id": ALICE["id"]}]]
    assert upstream_after(calls)["x-consumer-username"] == "alice"


# --------------------------------------------------------------------------- headers for the client
# DPoP-Nonce (RFC 9449 section 9) and RateLimit-* are the verifier's, for the client: with a refusal (the
# 401 use_dpop_nonce challenge, the 429) and on an allow. The same cases through Envoy and nginx:
# tests/integration/test_gateway_client_headers.py; the Lua plugin's: tests/kong/test_lua_plugin.py.

RATE_BURST = 2
HTU = "http://api.example.test:8000/api/items"  # KongRequest's defaults, as the verifier rebuilds the URL


@pytest.fixture(scope="module")
def local_issuer() -> Iterator[LocalIssuer]:
    server = LocalIssuer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def strict_verifier(local_issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The real verifier requiring server nonces in DPoP proofs, with a small budget per identity."""
    work = tmp_path_factory.mktemp("strict_verifier")
    proc = start_strict_verifier(work, issuer=local_issuer.issuer, rate_burst=RATE_BURST)
    yield proc
    proc.stop()



def upstream_set(calls: list[tuple[str, list[Any]]]) -> dict[str, str]:
    """The headers this plugin set on the upstream request (names lower-cased)."""
    return {args[0].lower(): args[1] for args in named(calls, "kong.service.request.set_header")}


def exited_headers(calls: list[tuple[str, list[Any]]]) -> tuple[int, dict[str, str]]:
    """The status and headers (names lower-cased) of the plugin's kong.response.exit."""
    ((status, _body, headers),) = named(calls, "kong.response.exit")
    return status, {k.lower(): v for k, v in headers.items()}


def test_the_use_dpop_nonce_challenge_exits_with_the_nonce_and_a_proof_with_it_passes(
    kong, strict_verifier, local_issuer
):
    key = ec.generate_private_key(ec.SECP256R1())
    tok = unique_token(local_issuer, cnf={"jkt": thumbprint(public_jwk(key))})
    iid = start_instance(kong, grpc_target=grpc_target(strict_verifier))

    calls = kong.handle_event(
        iid, "access", KongRequest(headers={"Authorization": f"DPoP {tok}", "DPoP": dpop_proof(key, "GET", HTU, tok)})
    )

    status, headers = exited_headers(calls)
    assert status == 401 and 'error="use_dpop_nonce"' in headers["www-authenticate"], headers
    nonce = headers.get("dpop-nonce", "")
    assert nonce, headers

    proof = dpop_proof(key, "GET", HTU, tok, nonce=nonce)
    calls = kong.handle_event(iid, "access", KongRequest(headers={"Authorization": f"DPoP {tok}", "DPoP": proof}))

    assert not named(calls, "kong.response.exit") and not named(calls, "kong.response.error"), calls
    assert upstream_set(calls)["x-authenticated-userid"].startswith("user-")


def test_an_allow_renews_an_old_nonce_on_the_clients_answer(kong, strict_verifier, local_issuer):
    iid = start_instance(kong, grpc_target=grpc_target(strict_verifier))

    def first():
        key = ec.generate_private_key(ec.SECP256R1())
        tok = unique_token(local_issuer, cnf={"jkt": thumbprint(public_jwk(key))})
        asked = KongRequest(headers={"Authorization": f"DPoP {tok}", "DPoP": dpop_proof(key, "GET", HTU, tok)})
        nonce = exited_headers(kong.handle_event(iid, "access", asked))[1]["dpop-nonce"]
        return (key, tok, nonce), nonce

    def then(sent, nonce):
        key, tok, _ = sent
        proof = dpop_proof(key, "GET", HTU, tok, nonce=nonce)
        return kong.handle_event(iid, "access", KongRequest(headers={"Authorization": f"DPoP {tok}", "DPoP": proof}))

    (_, _, nonce), calls = with_a_half_aged_nonce(first, then)  # past half its lifetime, still good

    to_client = {args[0].lower(): args[1] for args in named(calls, "kong.response.set_header")}
    assert to_client.get("dpop-nonce") not in (None, "", nonce), calls
    assert "dpop-nonce" not in upstream_set(calls)


def test_an_identity_under_a_rate_limit_sees_its_budget_on_allows_and_the_verifiers_429(
    kong, strict_verifier, local_issuer
):
    tok = unique_token(local_issuer)
    iid = start_instance(kong, grpc_target=grpc_target(strict_verifier))
    request = KongRequest(headers={"Authorization": f"Bearer {tok}", **CLIENT_COPIES})
    for left in range(RATE_BURST - 1, -1, -1):
        calls = kong.handle_event(iid, "access", request)
        assert not named(calls, "kong.response.exit")
        to_client = {args[0].lower(): args[1] for args in named(calls, "kong.response.set_header")}
        assert to_client["ratelimit-policy"] == f'"default";q={RATE_BURST};w=2000', to_client
        assert to_client["ratelimit"].startswith(f'"default";r={left};'), to_client

    status, headers = exited_headers(kong.handle_event(iid, "access", request))

    assert status == 429, headers
    assert int(headers["retry-after"]) > 100, headers  # the verifier's (1/0.001 s), not the client's 4242
    assert headers["ratelimit-policy"].startswith(f'"default";q={RATE_BURST}'), headers
    assert headers["ratelimit"].startswith('"default";r=0'), headers


class _ClientHeadersVerifier(verifier_pb2_grpc.VerifierServicer):
    """Allows every request with a rotated nonce and the rate-limit state for the client."""

    SENT = {
        "dpop-nonce": "rotated-nonce",
        "ratelimit-policy": '"default";q=100;w=60',
        "ratelimit": '"default";r=99;t=60',
    }

    def Check(self, request: verifier_pb2.CheckRequest, context: grpc.ServicerContext) -> verifier_pb2.CheckResponse:
        return verifier_pb2.CheckResponse(
            allowed=True,
            http_status=200,
            upstream_headers=[verifier_pb2.Header(name="X-Authenticated-Userid", value="user-1")],
            response_headers=[verifier_pb2.Header(name=k, value=v) for k, v in self.SENT.items()],
        )


def test_an_allow_hands_the_client_the_verifiers_nonce_and_ratelimit_headers_never_the_clients(kong):
    with fake_verifier(_ClientHeadersVerifier()) as target:
        iid = start_instance(kong, grpc_target=target)
        calls = kong.handle_event(iid, "access", KongRequest(headers={"Authorization": "Bearer x", **CLIENT_COPIES}))

    to_client = {args[0].lower(): args[1] for args in named(calls, "kong.response.set_header")}
    assert to_client == _ClientHeadersVerifier.SENT
    assert upstream_set(calls) == {"x-authenticated-userid": "user-1"}


# --------------------------------------------------------------------------- what an answer may hand on
# The Lua plugin's rule (handler.lua's to_decision), in one place in the plugin (`for_upstream`, `for_client`): an
# allow sets the reserved identity family on the upstream request (X-Authenticated-*: the fixed four, mapped claims
# and the signed assertion, which the verifier's configuration keeps under the prefix), a name repeated once with
# its last value; it hands the client a DPoP nonce and rate-limit state. Any other name is not handed on (a
# warning says so). The same through real nginx: test_python_plugin_in_nginx.py, and the Lua plugin's:
# test_lua_plugin.py.

ASSERTION = "eyJhbGciOiJFUzI1NiJ9.e30.sig"
# outside the identity family: names an upstream (or a later plugin: acl reads X-Consumer-Groups) would trust
FOREIGN_UPSTREAM = {"X-Forwarded-User": "root", "X-Consumer-Groups": "admins", "X-Consumer-Username": "root",
                    "X-Remote-User": "root", "Host": "admin.example.test", "Authorization": "Bearer other"}
FOREIGN_CLIENT = {"Set-Cookie": "session=verifier", "Location": "https://evil.example/",
                  "Access-Control-Allow-Origin": "*", "X-Authenticated-Roles": "admin"}


class _ForeignVerifier(verifier_pb2_grpc.VerifierServicer):
    """Allows every request naming, besides the identity family (the assertion, a name twice in two spellings),
    names outside it for the upstream and for the client."""

    def Check(self, request: verifier_pb2.CheckRequest, context: grpc.ServicerContext) -> verifier_pb2.CheckResponse:
        upstream = [("X-Authenticated-Userid", "user-1"), ("X-Authenticated-Identity", ASSERTION),
                    ("X-Authenticated-Roles", "reader"), *FOREIGN_UPSTREAM.items(), ("x-authenticated-roles", "admin")]
        client = [*FOREIGN_CLIENT.items(), ("DPoP-Nonce", "n-1"), ("RateLimit", '"default";r=9;t=60')]
        return verifier_pb2.CheckResponse(
            allowed=True, http_status=200, reason="ok",
            upstream_headers=[verifier_pb2.Header(name=k, value=v) for k, v in upstream],
            response_headers=[verifier_pb2.Header(name=k, value=v) for k, v in client],
        )


def warnings(calls: list[tuple[str, list[Any]]]) -> str:
    return "\n".join(str(args) for args in named(calls, "kong.log.warn"))


def test_an_allow_sets_only_the_identity_family_upstream_and_hands_the_client_only_its_own(kong):
    with fake_verifier(_ForeignVerifier()) as target:
        iid = start_instance(kong, grpc_target=target)
        calls = kong.handle_event(iid, "access", KongRequest(headers={"Authorization": "Bearer x"}))

    assert not named(calls, "kong.response.exit") and not named(calls, "kong.response.error")
    assert named(calls, "kong.service.request.set_header") == [
        ["X-Authenticated-Userid", "user-1"],
        ["X-Authenticated-Identity", ASSERTION],
        ["x-authenticated-roles", "admin"],  # the last spelling and value, as setting one after another
    ]
    assert not named(calls, "kong.service.request.add_header")
    assert named(calls, "kong.response.set_header") == [["DPoP-Nonce", "n-1"], ["RateLimit", '"default";r=9;t=60']]
    said = warnings(calls)
    for name in [*FOREIGN_UPSTREAM, *[k for k in FOREIGN_CLIENT if not k.startswith("X-Authenticated")]]:
        assert name in said, (name, said)


@pytest.mark.parametrize("answered", [0, 199, 302, 401, 503], ids=lambda s: f"allowed-with-{s}")
def test_an_allow_with_a_status_no_allow_has_is_a_503(kong, answered):
    """The Lua plugin reads the verifier's status: only a 2xx is an allow. An allow whose status says otherwise (or
    none: a verifier that never set it) is an answer this plugin cannot act on: unavailable, never a pass."""
    answer = verifier_pb2.CheckResponse(
        allowed=True, http_status=answered, upstream_headers=[verifier_pb2.Header(name="X-Authenticated-Userid",
                                                                                  value="user-1")])

    class Answering(verifier_pb2_grpc.VerifierServicer):
        def Check(self, request, context):
            return answer

    with fake_verifier(Answering()) as target:
        iid = start_instance(kong, grpc_target=target)
        calls = kong.handle_event(iid, "access", KongRequest(headers={"Authorization": "Bearer x"}))

    assert named(calls, "kong.response.error") == UNAVAILABLE_ANSWER
    assert not named(calls, "kong.service.request.set_header")


def test_a_refusal_carries_no_store_and_the_doors_type_line_and_never_connection_or_reuse_headers(kong):
    """As the Lua plugin relays the forward-auth door's refusal: `Cache-Control: no-store` (whatever reuse the verifier
    allows a gateway: `cache_max_age_seconds`, or a Cache-Control of its own) and Content-Type (a JSON body), never
    the answer's own connection and length lines, nor nginx's X-Accel-Expires (handler.lua's NOT_RELAYED)."""
    hop = {"Connection": "close", "Keep-Alive": "timeout=5", "Transfer-Encoding": "chunked", "Content-Length": "0",
           "Upgrade": "h2c", "TE": "trailers", "Trailer": "X-T", "Proxy-Connection": "close", "Date": "yesterday",
           "Server": "verifier", "X-Accel-Expires": "600", "Cache-Control": "private, max-age=30"}
    answer = verifier_pb2.CheckResponse(
        allowed=False, http_status=403, reason="insufficient_scope", body='{"error":"insufficient_scope"}',
        cache_max_age_seconds=30,
        response_headers=[verifier_pb2.Header(name=k, value=v) for k, v in
                          [("WWW-Authenticate", 'Bearer realm="verifier", error="insufficient_scope"'), *hop.items()]],
    )

    class Answering(verifier_pb2_grpc.VerifierServicer):
        def Check(self, request, context):
            return answer

    with fake_verifier(Answering()) as target:
        iid = start_instance(kong, grpc_target=target)
        calls = kong.handle_event(iid, "access", KongRequest(headers={"Authorization": "Bearer x"}))

    status, headers = exited_headers(calls)
    assert status == 403
    assert headers == {"www-authenticate": 'Bearer realm="verifier", error="insufficient_scope"',
                       "x-verifier-reason": "insufficient_scope", "cache-control": "no-store",
                       "content-type": "application/json"}


# --------------------------------------------------------------------------- channel pool (issue #24)

BURST = 12  # concurrent requests: three connections' worth at the verifier's 4 streams each
HOLD_S = 1.5  # the verifier holds each Check until BURST are in flight, or this long


class _GatheringVerifier(verifier_pb2_grpc.VerifierServicer):
    """Holds every Check until `BURST` are in flight at once (or `HOLD_S`), and keeps the peak."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.in_flight = 0
        self.peak = 0

    def Check(self, request: verifier_pb2.CheckRequest, context: grpc.ServicerContext) -> verifier_pb2.CheckResponse:
        with self.cond:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.in_flight >= BURST, timeout=HOLD_S)
            self.in_flight -= 1
        return verifier_pb2.CheckResponse(
            allowed=True, http_status=200,
            upstream_headers=[verifier_pb2.Header(name="X-Authenticated-Userid", value="app")],
        )


@contextlib.contextmanager
def stream_bounded_verifier(
    servicer: verifier_pb2_grpc.VerifierServicer, port: int = 0, **options: Any
) -> Iterator[int]:
    """A gRPC server with the verifier's own server options (SETTINGS_MAX_CONCURRENT_STREAMS = its default 4;
    `options`: others of `server_options`) answering with `servicer`; yields its port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2 * BURST),
        options=server_options(DEFAULT_GRPC_MAX_CONCURRENT_STREAMS, reuse_port=False, **options),
    )
    verifier_pb2_grpc.add_VerifierServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield bound
    finally:
        server.stop(grace=None)


def burst(pluginserver: PluginServer, iid: int, n: int) -> list[list[tuple[str, list[Any]]]]:
    """`n` requests at once, each on its own connection to the plugin server (as Kong's workers)."""
    rpcs = [pluginserver.connect() for _ in range(n)]
    try:
        request = KongRequest(headers={"Authorization": "Bearer x"})
        with futures.ThreadPoolExecutor(max_workers=n) as pool:
            return list(pool.map(lambda rpc: rpc.handle_event(iid, "access", request), rpcs))
    finally:
        for rpc in rpcs:
            rpc.close()


def test_more_checks_than_one_connections_streams_are_in_flight_at_once(pluginserver, kong):
    servicer = _GatheringVerifier()
    with stream_bounded_verifier(servicer) as port:
        iid = start_instance(kong, grpc_target=f"127.0.0.1:{port}", timeout=10_000)

        answers = burst(pluginserver, iid, BURST)

        assert all(named(calls, "kong.service.request.set_header") == [["X-Authenticated-Userid", "app"]]
                   for calls in answers)
        # one channel would hold 4 in flight and queue the rest at the client
        assert servicer.peak == BURST
        assert established_to(port) == BURST // DEFAULT_GRPC_MAX_CONCURRENT_STREAMS


def test_the_channel_bound_holds_and_the_rest_wait_for_a_stream(pluginserver, kong):
    servicer = _GatheringVerifier()
    with stream_bounded_verifier(servicer) as port:
        iid = start_instance(kong, grpc_target=f"127.0.0.1:{port}", timeout=10_000, max_channels=2)

        answers = burst(pluginserver, iid, BURST)

        assert all(named(calls, "kong.service.request.set_header") == [["X-Authenticated-Userid", "app"]]
                   for calls in answers)
        assert servicer.peak == 2 * DEFAULT_GRPC_MAX_CONCURRENT_STREAMS
        assert established_to(port) == 2


class _UnhurriedVerifier(verifier_pb2_grpc.VerifierServicer):
    """Allows every Check after 0.3 s: Checks are in flight whenever a connection's age comes."""

    def Check(self, request: verifier_pb2.CheckRequest, context: grpc.ServicerContext) -> verifier_pb2.CheckResponse:
        time.sleep(0.3)
        return verifier_pb2.CheckResponse(
            allowed=True, http_status=200,
            upstream_headers=[verifier_pb2.Header(name="X-Authenticated-Userid", value="app")],
        )


def test_checks_across_the_verifiers_connection_age_are_all_answered(pluginserver, kong):
    """The verifier ends each gRPC connection at its age (GOAWAY, then a grace for the Checks in flight): the
    plugin's channels reconnect and no Check fails (here ages of 1 s, ~3 of them; a grace of 0 fails some)."""
    with stream_bounded_verifier(_UnhurriedVerifier(), max_age=1.0, max_age_grace=1.0) as port:
        iid = start_instance(kong, grpc_target=f"127.0.0.1:{port}", timeout=10_000)
        stop = time.monotonic() + 3.5
        answers = []
        while time.monotonic() < stop:
            answers += burst(pluginserver, iid, 8)

    assert len(answers) >= 8 * 5
    assert all(named(calls, "kong.service.request.set_header") == [["X-Authenticated-Userid", "app"]]
               for calls in answers), [named(calls, "kong.response.error") for calls in answers]


def test_a_channel_whose_verifier_went_away_is_not_reused(kong, token):
    port = free_port()
    iid = start_instance(kong, grpc_target=f"127.0.0.1:{port}", timeout=2000)
    request = KongRequest(headers={"Authorization": f"Bearer {token}"})
    with stream_bounded_verifier(_RecordingVerifier(), port):
        assert named(kong.handle_event(iid, "access", request), "kong.service.request.set_header")
    calls = kong.handle_event(iid, "access", request)
    assert named(calls, "kong.response.error") == UNAVAILABLE_ANSWER

    with stream_bounded_verifier(_RecordingVerifier(), port):
        # back at once: a new connection, not the old channel's reconnect back-off (1 s and growing)
        calls = kong.handle_event(iid, "access", request)

    assert named(calls, "kong.service.request.set_header") == [["X-Authenticated-Userid", "app"]]


@pytest.mark.parametrize(("field", "value"), [
    ("max_channels", 0), ("max_channels", 1000), ("streams_per_channel", 0), ("max_channels", "many"),
    ("reconnect_backoff", 0), ("reconnect_backoff", 600_001), ("reconnect_backoff_max", True),
    ("reconnect_backoff_max", 100),  # below reconnect_backoff's default 250
])
def test_a_pool_setting_out_of_range_is_refused(kong, field, value):
    with pytest.raises(RuntimeError, match=field):
        start_instance(kong, grpc_target="127.0.0.1:1", **{field: value})


def _plugin_module() -> Any:
    """kong/python/edge_verifier.py loaded in this process (the plugin server imports it by file)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("edge_verifier_in_process", PLUGIN_DIR / f"{PLUGIN}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_channels_of_failed_calls_are_closed_and_the_pool_never_passes_its_bound(monkeypatch):
    plugin = _plugin_module()
    opened: list[grpc.Channel] = []
    real = grpc.insecure_channel
    monkeypatch.setattr(plugin.grpc, "insecure_channel", lambda *a, **kw: opened.append(real(*a, **kw)) or opened[-1])
    clock = FakeClock()
    client, request = plugin.VerifierClient(clock=clock), verifier_pb2.CheckRequest(method="GET", path="/")
    dead = f"127.0.0.1:{free_port()}"
    backoff = plugin.Backoff(0.25, 5.0)

    for _ in range(5):  # nothing listens: every call fails UNAVAILABLE on a fresh connection
        clock.now += 3600.0  # past any reconnect back-off
        with pytest.raises(grpc.RpcError) as failed:
            client.check(dead, request, timeout_s=2.0, streams=4, max_channels=2, backoff=backoff)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE

    assert len(opened) == 5
    for channel in opened:  # each closed once its call ended: none left behind
        with pytest.raises(ValueError, match="closed channel"):
            verifier_pb2_grpc.VerifierStub(channel).Check(request, timeout=1)

    servicer = _GatheringVerifier()
    with stream_bounded_verifier(servicer) as port, futures.ThreadPoolExecutor(BURST) as pool:
        live = f"127.0.0.1:{port}"
        calls = [pool.submit(client.check, live, request, timeout_s=10.0, streams=4, max_channels=2,
                             backoff=backoff) for _ in range(BURST)]
        assert all(c.result().allowed for c in calls)
    assert len(opened) == 5 + 2 and servicer.peak == 8


# --------------------------------------------------------------------------- reconnect back-off


class FakeClock:
    """`time.monotonic` for `VerifierClient`, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RefusingVerifier:
    """A verifier that refuses: it accepts each connection and closes it at once (a restarting or overloaded
    server), counting the connection attempts. Every attempt is counted before the client sees it fail."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port), backlog=128)
        self.attempts = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed by stop()
            self.attempts += 1
            conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (Linux)
        self.sock.close()
        self.thread.join(timeout=10)


@contextlib.contextmanager
def refusing_verifier(port: int) -> Iterator[RefusingVerifier]:
    refuser = RefusingVerifier(port)
    try:
        yield refuser
    finally:
        refuser.stop()


REFUSING_BACKOFF_MS = 2000  # long enough that a loaded machine sends many requests within it


def attempts_allowed(elapsed_s: float, backoff_ms: int) -> int:
    """Connection attempts a back-off of `backoff_ms` (its shortest jittered wait: -20%) allows in `elapsed_s`."""
    return 1 + int(elapsed_s / (0.8 * backoff_ms / 1000.0))


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_a_refusing_verifier_sees_one_connection_per_back_off_and_no_check_gets_an_identity(kong, token, fail_open):
    port = free_port()
    iid = start_instance(kong, grpc_target=f"127.0.0.1:{port}", timeout=5000, fail_open=fail_open,
                         reconnect_backoff=REFUSING_BACKOFF_MS, reconnect_backoff_max=REFUSING_BACKOFF_MS)
    request = KongRequest(headers={"Authorization": f"Bearer {token}", "X-Authenticated-Userid": "admin"})

    with refusing_verifier(port) as refuser:
        started = time.monotonic()
        answers = [kong.handle_event(iid, "access", request) for _ in range(20)]
        elapsed = time.monotonic() - started

    if fail_open:  # what fail_open does with an unreachable verifier: pass without identity
        assert not any(named(calls, "kong.response.error") or named(calls, "kong.response.exit") for calls in answers)
    else:
        assert all(named(calls, "kong.response.error") == UNAVAILABLE_ANSWER for calls in answers)
    assert all("x-authenticated-userid" in cleared(calls) for calls in answers)
    assert not any(named(calls, "kong.service.request.set_header") for calls in answers)
    # without a back-off: one connection per request, 20
    assert 1 <= refuser.attempts <= attempts_allowed(elapsed, REFUSING_BACKOFF_MS), (refuser.attempts, elapsed)


def test_a_returning_verifier_is_used_once_the_back_off_has_passed_however_hard_clients_push(kong, token):
    port = free_port()
    backoff_s = 1.0
    iid = start_instance(kong, grpc_target=f"127.0.0.1:{port}", timeout=5000,
                         reconnect_backoff=int(backoff_s * 1000), reconnect_backoff_max=int(backoff_s * 1000))
    request = KongRequest(headers={"Authorization": f"Bearer {token}", "X-Authenticated-Userid": "admin"})
    with refusing_verifier(port) as refuser:
        before = time.monotonic()  # the back-off begins after this and lasts 0.8-1.2 s
        assert named(kong.handle_event(iid, "access", request), "kong.response.error") == UNAVAILABLE_ANSWER
        after = time.monotonic()
        assert refuser.attempts == 1

    with stream_bounded_verifier(_RecordingVerifier(), port):
        back = time.monotonic()
        deadline = back + 60.0  # a loaded machine is slow, never that slow
        while True:
            # clients keep asking through the back-off: none gets through, none lengthens it
            calls = kong.handle_event(iid, "access", request)
            if named(calls, "kong.service.request.set_header"):
                break
            assert named(calls, "kong.response.error") == UNAVAILABLE_ANSWER
            assert time.monotonic() < deadline, "the returning verifier was never used"
        passed = time.monotonic()
        again = kong.handle_event(iid, "access", request)

    assert named(calls, "kong.service.request.set_header") == [["X-Authenticated-Userid", "app"]]
    assert named(again, "kong.service.request.set_header") == [["X-Authenticated-Userid", "app"]]
    assert passed >= before + 0.8 * backoff_s  # the verifier was not asked within the back-off
    # the first request after the back-off connects (slack: one request's turn on a loaded machine)
    assert passed - max(back, after + 1.2 * backoff_s) < 5.0, (passed - back, passed - after)


def test_a_request_the_verifier_refuses_to_read_starts_no_back_off(kong, token):
    """A client cannot put the plugin into back-off: a Check the verifier rejects for its size (a status of its
    own, RESOURCE_EXHAUSTED) on a connection that has never answered is no failed connection attempt."""
    with stream_bounded_verifier(_RecordingVerifier()) as port:
        iid = start_instance(kong, grpc_target=f"127.0.0.1:{port}", timeout=5000,
                             reconnect_backoff=60_000, reconnect_backoff_max=60_000)
        huge = KongRequest(headers={"Authorization": "Bearer " + "a" * (2 << 20)})

        assert named(kong.handle_event(iid, "access", huge), "kong.response.error") == UNAVAILABLE_ANSWER
        calls = kong.handle_event(iid, "access", KongRequest(headers={"Authorization": f"Bearer {token}"}))

        assert named(calls, "kong.service.request.set_header") == [["X-Authenticated-Userid", "app"]]
        assert established_to(port) == 1  # the same connection: the oversized Check did not retire it


def _recording_client(monkeypatch: pytest.MonkeyPatch, spreads: list[float] | None = None) -> tuple[Any, Any, FakeClock,
                                                                                                 list[grpc.Channel]]:
    """The plugin's VerifierClient on a fake clock (and jitter), recording the channels (connection attempts)."""
    plugin = _plugin_module()
    opened: list[grpc.Channel] = []
    real = grpc.insecure_channel
    monkeypatch.setattr(plugin.grpc, "insecure_channel", lambda *a, **kw: opened.append(real(*a, **kw)) or opened[-1])
    clock = FakeClock()
    jitter = iter(spreads or [])
    client = plugin.VerifierClient(clock=clock, spread=lambda: next(jitter, 0.0))
    return plugin, client, clock, opened


def _try(client: Any, target: str, backoff: Any, timeout_s: float = 5.0) -> grpc.RpcError | None:
    """One Check through `client`: None when answered, else the error."""
    try:
        client.check(target, verifier_pb2.CheckRequest(method="GET", path="/"), timeout_s=timeout_s, streams=4,
                     max_channels=8, backoff=backoff)
    except grpc.RpcError as exc:
        return exc
    return None


def _unavailable(error: grpc.RpcError | None) -> bool:
    return isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.UNAVAILABLE


def test_the_back_off_grows_by_1_6_to_its_ceiling_and_checks_within_it_never_connect(monkeypatch):
    # jitter: none, +20 %, -20 %, then none
    plugin, client, clock, opened = _recording_client(monkeypatch, [0.0, 1.0, -1.0])
    backoff, dead = plugin.Backoff(0.1, 0.5), f"127.0.0.1:{free_port()}"
    waits = [0.1, 0.16 * 1.2, 0.256 * 0.8, 0.4096, 0.5, 0.5]

    for attempt, wait in enumerate(waits, 1):
        failed_at = clock.now
        assert _unavailable(_try(client, dead, backoff)) and len(opened) == attempt
        clock.now = failed_at + wait - 0.001
        for _ in range(20):  # within the back-off: unavailable at once, no connection tried
            assert isinstance(_try(client, dead, backoff), plugin.ReconnectBackoff)
        assert len(opened) == attempt
        clock.now = failed_at + wait + 0.001  # past it: the next Check connects

    # the verifier is back: the attempt after the back-off is answered, and the back-off is forgotten
    with stream_bounded_verifier(_RecordingVerifier(), int(dead.rsplit(":", 1)[1])):
        assert _try(client, dead, backoff) is None
    assert _unavailable(_try(client, dead, backoff))  # its working connection lost: not a failed attempt...
    failed_at = clock.now
    assert _unavailable(_try(client, dead, backoff))  # ...the new one is, the first again
    clock.now = failed_at + 0.1 - 0.001
    assert isinstance(_try(client, dead, backoff), plugin.ReconnectBackoff)
    clock.now = failed_at + 0.1 + 0.001
    assert _unavailable(_try(client, dead, backoff))
    assert len(opened) == len(waits) + 1 + 2


@contextlib.contextmanager
def hanging_verifier(port: int) -> Iterator[None]:
    """Accepts connections on `port` and never answers (a verifier too busy to serve): Checks run to their
    deadline."""
    sock = socket.create_server(("127.0.0.1", port), backlog=128)
    try:
        yield
    finally:
        sock.close()


def test_after_a_lost_connection_one_attempt_at_a_time_however_many_checks_wait(monkeypatch):
    plugin, client, _clock, opened = _recording_client(monkeypatch)
    backoff, port = plugin.Backoff(60.0, 60.0), free_port()
    target = f"127.0.0.1:{port}"
    with stream_bounded_verifier(_RecordingVerifier(), port):
        assert _try(client, target, backoff) is None
    # its working connection lost: no back-off (the next Check may connect at once), but a suspect target
    assert _unavailable(_try(client, target, backoff))

    with hanging_verifier(port), futures.ThreadPoolExecutor(8) as pool:
        errors = list(pool.map(lambda _: _try(client, target, backoff, timeout_s=3.0), range(8)))

    # two channels' worth of Checks, one connection attempt: they all wait on it (to their deadline here)
    assert len(opened) == 2
    assert all(isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED for e in errors), errors
