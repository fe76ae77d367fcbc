"""What goes on the wire at each front door: request payloads and the canned answers.

The three doors (see the shared contract):

* ``grpc``      -- our own ``verifier.v1.Verifier/Check`` (protos/verifier/v1/verifier.proto)
* ``ext_authz`` -- Envoy's ``envoy.service.auth.v3.Authorization/Check`` (xds-protos)
* ``http``      -- HTTP/1.1 forward-auth on ``/v1/forward-auth`` (Traefik/Caddy-style X-Forwarded-*)

The verifier's proto is encoded by hand (a handful of string fields and one map) so the bench
neither needs generated code nor collides with the ``verifier`` package's own generated modules.
gRPC framing (RFC-less, see grpc/doc/PROTOCOL-HTTP2.md): 1 byte compressed flag, 4 bytes
big-endian length, then the message.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import status_pb2

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


# --- protobuf wire format, just enough for verifier.v1 --------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def _str_field(number: int, value: str) -> bytes:
    return _len_field(number, value.encode()) if value else b""


def encode_verifier_check_request(
    *, method: str, scheme: str, host: str, path: str, headers: dict[str, str], client_address: str
) -> bytes:
    """Serialize a ``verifier.v1.CheckRequest`` (fields 1-6; map entries are key=1, value=2)."""
    out = bytearray()
    out += _str_field(1, method)
    out += _str_field(2, scheme)
    out += _str_field(3, host)
    out += _str_field(4, path)
    for name, value in headers.items():
        out += _len_field(5, _str_field(1, name) + _str_field(2, value))
    out += _str_field(6, client_address)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def decode_fields(data: bytes) -> dict[int, list[int | bytes]]:
    """Decode the top level of a protobuf message into {field number: [values]} (varint and LEN only)."""
    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
            fields.setdefault(number, []).append(value)
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            fields.setdefault(number, []).append(data[pos : pos + length])
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    return fields


def decode_verifier_headers(request: bytes) -> dict[str, str]:
    """The ``headers`` map of a serialized ``verifier.v1.CheckRequest``."""
    headers: dict[str, str] = {}
    for entry in decode_fields(request).get(5, []):
        assert isinstance(entry, bytes)
        kv = decode_fields(entry)
        key = kv.get(1, [b""])[0]
        value = kv.get(2, [b""])[0]
        assert isinstance(key, bytes) and isinstance(value, bytes)
        headers[key.decode()] = value.decode()
    return headers


def verifier_allowed(response: bytes) -> bool:
    """Whether a serialized ``verifier.v1.CheckResponse`` allows the request (field 1)."""
    return bool(decode_fields(response).get(1, [0])[0])


def encode_verifier_check_response(*, allowed: bool, http_status: int, reason: str) -> bytes:
    """Serialize a minimal ``verifier.v1.CheckResponse``."""
    out = bytearray()
    if allowed:
        out += b"\x08\x01"
    out += _varint(2 << 3) + _varint(http_status)
    out += _str_field(5, reason)
    return bytes(out)


# --- requests per door ----------------------------------------------------------------------------


def _original_headers(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "user-agent": "bench/1", "accept": "*/*"}


def grpc_payload(door: Door, token: str) -> bytes:
    """The serialized request message (no gRPC frame) for one check of ``token`` at a gRPC door."""
    if door is Door.GRPC:
        return encode_verifier_check_request(
            method="GET",
            scheme="https",
            host=ORIGINAL_HOST,
            path=ORIGINAL_PATH,
            headers=_original_headers(token),
            client_address="192.0.2.10",
        )
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

VERIFIER_ALLOW = encode_verifier_check_response(allowed=True, http_status=200, reason="ok")
ENVOY_ALLOW = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=0), ok_response=external_auth_pb2.OkHttpResponse()
).SerializeToString()
ENVOY_DENY = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=16),
    denied_response=external_auth_pb2.DeniedHttpResponse(),
).SerializeToString()
VERIFIER_DENY = encode_verifier_check_response(allowed=False, http_status=401, reason="invalid_token")


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
