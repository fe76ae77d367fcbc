"""What goes on the wire at each front door: request payloads and the canned answers.

The three doors (see the shared contract):

* ``grpc``      -- our own ``verifier.v1.Verifier/Check`` (protos/verifier/v1/verifier.proto)
* ``ext_authz`` -- Envoy's ``envoy.service.auth.v3.Authorization/Check`` (xds-protos)
* ``http``      -- HTTP/1.1 forward-auth on ``/v1/forward-auth`` (Traefik/Caddy-style X-Forwarded-*)

Both doors' messages come from generated code: ``verifier.v1.verifier_pb2`` (the package's own)
and Envoy's xds-protos. gRPC framing (RFC-less, see grpc/doc/PROTOCOL-HTTP2.md): 1 byte compressed flag, 4 bytes
big-endian length, then the message.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import status_pb2

from verifier.v1 import verifier_pb2

AUDIENCE = "https://api.example.test"
ORIGINAL_HOST = "api.example.test"
ORIGINAL_PATH = "/api/orders/42"

GRPC_VERIFIER_METHOD = "/verifier.v1.Verifier/Check"
GRPC_ENVOY_METHOD = "/envoy.service.auth.v3.Authorization/Check"
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
        return GRPC_VERIFIER_METHOD if self is Door.GRPC else GRPC_ENVOY_METHOD


# --- requests per door ----------------------------------------------------------------------------


def _original_headers(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "user-agent": "bench/1", "accept": "*/*"}


def grpc_payload(door: Door, token: str) -> bytes:
    """The serialized request message (no gRPC frame) for one check of ``token`` at a gRPC door."""
    if door is Door.GRPC:
        return verifier_pb2.CheckRequest(
            method="GET",
            scheme="https",
            host=ORIGINAL_HOST,
            path=ORIGINAL_PATH,
            headers=_original_headers(token),
            client_address="192.0.2.10",
        ).SerializeToString()
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method = "GET"
    http.scheme = "https"
    http.host = ORIGINAL_HOST
    http.path = ORIGINAL_PATH
    http.protocol = "HTTP/1.1"
    for name, value in _original_headers(token).items():
        http.headers[name] = value
    request.attributes.source.address.socket_address.address = "192.0.2.10"
    return request.SerializeToString()


def http_headers(token: str) -> dict[str, str]:
    """The headers of one forward-auth request for ``token`` (Traefik/Caddy style)."""
    return {
        "Authorization": f"Bearer {token}",
        "X-Forwarded-Method": "GET",
        "X-Forwarded-Uri": ORIGINAL_PATH,
        "X-Forwarded-Host": ORIGINAL_HOST,
        "X-Forwarded-Proto": "https",
    }


def http_request(token: str, host: str) -> bytes:
    """One raw HTTP/1.1 keep-alive forward-auth request for ``token``."""
    lines = [f"GET {FORWARD_AUTH_PATH} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in http_headers(token).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def grpc_frame(message: bytes) -> bytes:
    """Length-prefix one gRPC message: uncompressed flag + 4-byte big-endian length."""
    return struct.pack(">BI", 0, len(message)) + message


def payload(door: Door, token: str, host: str) -> bytes:
    """What a load generator sends for one check: a gRPC message or a whole HTTP/1.1 request."""
    return http_request(token, host) if door is Door.HTTP else grpc_payload(door, token)


# --- canned answers for the no-op servers ---------------------------------------------------------

VERIFIER_ALLOW = verifier_pb2.CheckResponse(allowed=True, http_status=200, reason="ok").SerializeToString()
ENVOY_ALLOW = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=0), ok_response=external_auth_pb2.OkHttpResponse()
).SerializeToString()
ENVOY_DENY = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=16),
    denied_response=external_auth_pb2.DeniedHttpResponse(),
).SerializeToString()
VERIFIER_DENY = verifier_pb2.CheckResponse(allowed=False, http_status=401, reason="invalid_token").SerializeToString()


def verifier_allowed(response: bytes) -> bool:
    """Whether a serialized ``verifier.v1.CheckResponse`` allows the request."""
    return bool(verifier_pb2.CheckResponse.FromString(response).allowed)


def verifier_authorization(request: bytes) -> str:
    """The Authorization header of a serialized ``verifier.v1.CheckRequest``."""
    return str(verifier_pb2.CheckRequest.FromString(request).headers.get("authorization", ""))


def envoy_allowed(response: bytes) -> bool:
    """Whether a serialized Envoy ``CheckResponse`` allows the request (status code 0)."""
    parsed = external_auth_pb2.CheckResponse.FromString(response)
    return parsed.status.code == 0


def envoy_authorization(request: bytes) -> str:
    """The Authorization header of a serialized Envoy ``CheckRequest``."""
    parsed = external_auth_pb2.CheckRequest.FromString(request)
    return parsed.attributes.request.http.headers.get("authorization", "")


@dataclass(frozen=True, kw_only=True)
class Target:
    """A running server under test: where each of its doors listens."""

    name: str  # "verifier", "noop", "naive"
    grpc_addr: str  # host:port serving both gRPC doors
    http_addr: str  # host:port of forward-auth
    pids: tuple[int, ...]

    def addr(self, door: Door) -> str:
        """host:port of ``door``."""
        return self.http_addr if door is Door.HTTP else self.grpc_addr
