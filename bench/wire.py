"""What goes on the wire at each front door: request payloads and the canned answers.

* ``grpc``      -- our own ``verifier.v1.Verifier/Check`` (protos/verifier/v1/verifier.proto)
* ``ext_authz`` -- Envoy's ``envoy.service.auth.v3.Authorization/Check`` (xds-protos)
* ``http``      -- HTTP/1.1 forward-auth on ``/v1/forward-auth`` (Traefik/Caddy-style X-Forwarded-*)

Both gRPC doors' messages come from generated code (``verifier.v1.verifier_pb2`` and Envoy's
xds-protos). gRPC framing (grpc/doc/PROTOCOL-HTTP2.md): 1 byte compressed flag, 4 bytes big-endian
length, then the message.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from envoy.service.auth.v3 import external_auth_pb2 as envoy_pb2
from google.rpc import status_pb2

from verifier.v1 import verifier_pb2

AUDIENCE = "https://api.example.test"
ORIGINAL_HOST = "api.example.test"
ORIGINAL_PATH = "/api/orders/42"
# `--policies`: two route policies, the request (a GET of ORIGINAL_PATH) meeting the second.
TWO_POLICIES = (
    "policies:\n"
    '  - match: {path_prefix: "/admin", methods: [POST, PUT, DELETE]}\n'
    "    require: {roles_any: [admin]}\n"
    f'  - match: {{path_prefix: "/api", hosts: ["{ORIGINAL_HOST}"]}}\n'
    "    require: {authenticated: true}\n"
)
FORWARD_AUTH_PATH = "/v1/forward-auth"


class Door(enum.StrEnum):
    """A front door of the verifier; the value is the name used on the command line and in results."""

    GRPC = "grpc"
    EXT_AUTHZ = "ext_authz"
    HTTP = "http"

    @property
    def is_grpc(self) -> bool:
        """True for the two gRPC doors (HTTP/2), False for forward-auth (HTTP/1.1)."""
        return self is not Door.HTTP

    @property
    def grpc_method(self) -> str:
        """The gRPC method path of this door (only for the gRPC doors)."""
        if self is Door.GRPC:
            return "/verifier.v1.Verifier/Check"
        return "/envoy.service.auth.v3.Authorization/Check"


@dataclass(frozen=True, kw_only=True)
class Target:
    """A running server under test: where each of its doors listens."""

    name: str  # "verifier", "noop", "naive", ...
    grpc_addr: str  # host:port serving both gRPC doors
    http_addr: str  # host:port of forward-auth
    pids: tuple[int, ...]

    def addr(self, door: Door) -> str:
        """host:port of ``door``."""
        return self.http_addr if door is Door.HTTP else self.grpc_addr

    def renamed(self, name: str) -> Target:
        """The same servers under another name in the tables."""
        return Target(name=name, grpc_addr=self.grpc_addr, http_addr=self.http_addr, pids=self.pids)


def grpc_payload(door: Door, token: str, serial: int = 0) -> bytes:
    """The serialized request message (no gRPC frame) for one check of ``token`` at a gRPC door.

    ``ext_authz``: the shape Envoy 1.40 sends with deploy/envoy/envoy-grpc.yaml.template (captured from a real
    Envoy: its headers, pseudo-headers included, both peers, the protocol, empty metadata contexts), with the
    fields Envoy fills anew for every request (``x-request-id``, ``request.time``, ``request.http.id``) derived
    from ``serial``: h2load repeats one message, ``bench.inproc`` varies them (one client connection: one source
    port).
    """
    headers = {"authorization": f"Bearer {token}", "user-agent": "bench/1", "accept": "*/*"}
    if door is Door.GRPC:
        return verifier_pb2.CheckRequest(
            method="GET",
            scheme="https",
            host=ORIGINAL_HOST,
            path=ORIGINAL_PATH,
            headers=headers,
            client_address="192.0.2.10",
        ).SerializeToString()
    request = envoy_pb2.CheckRequest()
    attributes = request.attributes
    attributes.source.address.socket_address.address = "192.0.2.10"
    attributes.source.address.socket_address.port_value = 40_000  # one keep-alive connection
    attributes.destination.address.socket_address.address = "127.0.0.1"
    attributes.destination.address.socket_address.port_value = 8080
    attributes.request.time.seconds, attributes.request.time.nanos = 1_796_300_000 + serial, serial % 1_000_000_000
    http = attributes.request.http
    http.id = str(16_938_230_415_406_314_478 - serial)
    http.method, http.scheme, http.host, http.path, http.protocol = (
        "GET",
        "https",
        ORIGINAL_HOST,
        ORIGINAL_PATH,
        "HTTP/1.1",
    )
    http.headers.update(
        {
            "x-request-id": f"8e58bf45-431f-4a31-8b18-{serial:012x}",
            "x-forwarded-proto": "https",
            "x-forwarded-for": "192.0.2.10",
            "x-envoy-external-address": "192.0.2.10",
            **headers,
            ":scheme": "https",
            ":path": ORIGINAL_PATH,
            ":method": "GET",
            ":authority": ORIGINAL_HOST,
        }
    )
    attributes.metadata_context.SetInParent()
    attributes.route_metadata_context.SetInParent()
    return request.SerializeToString()


def http_headers(token: str, scheme: str = "Bearer", **extra: str) -> dict[str, str]:
    """The headers of one forward-auth request for ``token`` (Traefik/Caddy style), plus ``extra``."""
    return {
        "Authorization": f"{scheme} {token}",
        "X-Forwarded-Method": "GET",
        "X-Forwarded-Uri": ORIGINAL_PATH,
        "X-Forwarded-Host": ORIGINAL_HOST,
        "X-Forwarded-Proto": "https",
        **extra,
    }


def http_request(headers: dict[str, str], host: str, path: str = FORWARD_AUTH_PATH) -> bytes:
    """One raw HTTP/1.1 keep-alive GET with ``headers``."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def payload(door: Door, token: str, host: str) -> bytes:
    """What a load generator sends for one check: a gRPC message or a whole HTTP/1.1 request."""
    return http_request(http_headers(token), host) if door is Door.HTTP else grpc_payload(door, token)


def grpc_frame(message: bytes) -> bytes:
    """Length-prefix one gRPC message: uncompressed flag + 4-byte big-endian length."""
    return struct.pack(">BI", 0, len(message)) + message


# --- answers ---------------------------------------------------------------------------------------

ANSWERS = {  # (door, allowed) -> the serialized answer the no-op servers send
    (Door.GRPC, True): verifier_pb2.CheckResponse(allowed=True, http_status=200, reason="ok").SerializeToString(),
    (Door.GRPC, False): verifier_pb2.CheckResponse(
        allowed=False, http_status=401, reason="invalid_token"
    ).SerializeToString(),
    (Door.EXT_AUTHZ, True): envoy_pb2.CheckResponse(
        status=status_pb2.Status(code=0), ok_response=envoy_pb2.OkHttpResponse()
    ).SerializeToString(),
    (Door.EXT_AUTHZ, False): envoy_pb2.CheckResponse(
        status=status_pb2.Status(code=16), denied_response=envoy_pb2.DeniedHttpResponse()
    ).SerializeToString(),
}


def allowed(door: Door, response: bytes) -> bool:
    """Whether a serialized gRPC answer of ``door`` allows the request."""
    if door is Door.GRPC:
        return bool(verifier_pb2.CheckResponse.FromString(response).allowed)
    return envoy_pb2.CheckResponse.FromString(response).status.code == 0


def authorization(door: Door, request: bytes) -> str:
    """The Authorization header of a serialized gRPC request of ``door``."""
    if door is Door.GRPC:
        return str(verifier_pb2.CheckRequest.FromString(request).headers.get("authorization", ""))
    return str(envoy_pb2.CheckRequest.FromString(request).attributes.request.http.headers.get("authorization", ""))
