"""The key of an Envoy CheckRequest (`verifier/doors/envoy_request.py`): the fields Envoy fills anew for every
request are out of it, everything the answer depends on is in it, and the attributes the pipeline judges are
the key's own translation. An attacker who shares a key with someone shares their answer: equal keys must
mean equal attributes, whatever the bytes (planted look-alikes, merged messages, raw header maps)."""

from __future__ import annotations

import itertools

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as ea
from hypothesis import example, given, settings
from hypothesis import strategies as st

from verifier.doors.envoy_request import request_key
from verifier.doors.grpc import attributes_from_envoy
from verifier.request import RequestAttributes, Undescribed

TOKEN = "Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJjYXJvbCJ9.c2ln"
CERT = "-----BEGIN%20CERTIFICATE-----%0AMIIB-----END%20CERTIFICATE-----%0A"


def envoy(serial: int = 0, *, authorization: str = TOKEN, **changes: str) -> ea.CheckRequest:
    """A CheckRequest as Envoy sends it (deploy/envoy/envoy-grpc.yaml.template), its per-request fields from
    `serial`; `changes`: header=value (`h_` prefix, `_` for `-`) or a field of `http` / `source`."""
    request = ea.CheckRequest()
    attributes = request.attributes
    attributes.source.address.socket_address.address = changes.pop("address", "192.0.2.10")
    attributes.source.address.socket_address.port_value = int(changes.pop("port", "40000"))
    attributes.source.certificate = changes.pop("certificate", "")
    attributes.destination.address.socket_address.address = "127.0.0.1"
    attributes.destination.address.socket_address.port_value = 8080
    attributes.request.time.seconds = 1_796_300_000 + serial
    http = attributes.request.http
    http.id = str(1_000_000 + serial)
    http.method = changes.pop("method", "GET")
    http.scheme = changes.pop("scheme", "https")
    http.host = changes.pop("host", "api.example.test")
    http.path = changes.pop("path", "/api/orders/42")
    http.protocol = "HTTP/1.1"
    http.headers["x-request-id"] = f"8e58bf45-431f-4a31-8b18-{serial:012x}"
    http.headers["x-forwarded-proto"] = "https"
    if authorization:
        http.headers["authorization"] = authorization
    for name, value in changes.items():
        assert name.startswith("h_"), name
        http.headers[name[2:].replace("_", "-")] = value
    return request


def translated(data: bytes) -> tuple[bytes, RequestAttributes]:
    """What the door does with the bytes: the key, and the attributes of the message the key is."""
    message = ea.CheckRequest.FromString(data)
    key = request_key(message)
    return key, attributes_from_envoy(message)


def test_the_fields_envoy_fills_per_request_are_not_in_the_key() -> None:
    keys = {translated(envoy(serial).SerializeToString())[0] for serial in range(5)}
    assert len(keys) == 1
    attrs = translated(envoy(3).SerializeToString())[1]
    assert "x-request-id" not in attrs.headers
    assert attrs.headers["authorization"] == TOKEN and attrs.client_address == "192.0.2.10"


def test_the_attributes_are_the_translation_of_the_key_itself() -> None:
    for request in (envoy(), envoy(7, h_x_authenticated_userid="admin"), envoy(certificate=CERT)):
        key, attrs = translated(request.SerializeToString())
        assert attributes_from_envoy(ea.CheckRequest.FromString(key)) == attrs


# Requests an attacker could send (directly to the gRPC port, or through a gateway that forwards them), each
# next to the ones it must not be mistaken for.
def _planted_entry() -> str:
    entry = ea.CheckRequest()
    entry.attributes.request.http.headers["x-request-id"] = "x"
    return entry.SerializeToString().decode("latin-1")


VARIANTS: dict[str, bytes] = {
    "plain": envoy().SerializeToString(),
    "another token": envoy(
        authorization="Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.c2ln"
    ).SerializeToString(),
    "no token": envoy(authorization="").SerializeToString(),
    "another path": envoy(path="/admin/users").SerializeToString(),
    "path naming the request id": envoy(path="/api/orders/42?x-request-id=1").SerializeToString(),
    "another method": envoy(method="DELETE").SerializeToString(),
    "another host": envoy(host="admin.example.test").SerializeToString(),
    # the scheme judged is Envoy's X-Forwarded-Proto (over h2c `http.scheme` is the client's `:scheme`)
    "another scheme": envoy(scheme="http", h_x_forwarded_proto="http").SerializeToString(),
    "another client": envoy(address="198.51.100.7").SerializeToString(),
    "a client certificate": envoy(certificate=CERT).SerializeToString(),
    "smuggled identity": envoy(h_x_authenticated_userid="admin").SerializeToString(),
    "upper-case request id header": envoy(h_X_Request_Id="1").SerializeToString(),
    "request id entry planted in a value": envoy(h_x_note=_planted_entry()).SerializeToString(),
    "a DPoP proof": envoy(h_dpop="eyJ0eXAiOiJkcG9wK2p3dCJ9.e30.c2ln").SerializeToString(),
    "a traceparent": envoy(h_traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").SerializeToString(),
    # Two messages back to back are one merged message on the wire: the later token wins the map entry.
    "merged with another token": envoy().SerializeToString()
    + envoy(authorization="Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.c2ln").SerializeToString(),
    "merged with a smuggled header": envoy().SerializeToString()
    + ea.CheckRequest(
        attributes={"request": {"http": {"headers": {"x-authenticated-userid": "admin"}}}}
    ).SerializeToString(),
}


def _raw_header_map(authorization: str, serial: int) -> bytes:
    """`encode_raw_headers: true`: the headers as `header_map` (bytes values), `headers` empty."""
    request = envoy(serial, authorization="")
    http = request.attributes.request.http
    http.ClearField("headers")
    raw = (("x-request-id", f"id-{serial}"), ("authorization", authorization), ("x-forwarded-proto", "https"))
    for key, value in raw:
        http.header_map.headers.append(base_pb2.HeaderValue(key=key, raw_value=value.encode()))
    return request.SerializeToString()  # type: ignore[no-any-return]


VARIANTS["raw header map"] = _raw_header_map(TOKEN, 0)
VARIANTS["raw header map, another token"] = _raw_header_map("Bearer other", 0)


def test_requests_that_differ_in_anything_the_answer_reads_never_share_a_key() -> None:
    translations = {name: translated(data) for name, data in VARIANTS.items()}
    alike = []
    for (a, (key_a, attrs_a)), (b, (key_b, attrs_b)) in itertools.combinations(translations.items(), 2):
        if attrs_a != attrs_b:
            assert key_a != key_b, (a, b)  # different requests never share an answer
        else:
            alike.append((a, b))
    # The same requests spelled differently: as Envoy's raw header map; as two messages merged (the later wins); with
    # a request id in a spelling Envoy never sends (kept in the key: another key, a miss; dropped from the
    # attributes in any spelling, as it is from the key in Envoy's).
    assert alike == [
        ("plain", "upper-case request id header"),
        ("plain", "raw header map"),
        ("another token", "merged with another token"),
        ("smuggled identity", "merged with a smuggled header"),
        ("upper-case request id header", "raw header map"),
    ]


def test_a_raw_header_map_loses_its_request_id_too() -> None:
    assert translated(_raw_header_map(TOKEN, 1))[0] == translated(_raw_header_map(TOKEN, 2))[0]
    assert "x-request-id" not in translated(_raw_header_map(TOKEN, 1))[1].headers


def test_another_connection_is_another_key() -> None:
    """The source port stays in the key (clearing it costs every check more than the miss it spares)."""
    assert translated(envoy(1).SerializeToString())[0] != translated(envoy(1, port="40001").SerializeToString())[0]


names = st.sampled_from(["authorization", "x-request-id", "X-Request-Id", "x-authenticated-userid", "dpop", "a"])
values = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    headers=st.lists(st.tuples(names, values), max_size=6),
    path=values,
    serials=st.tuples(st.integers(0, 2**31), st.integers(0, 2**31)),
    other=st.lists(st.tuples(names, values), max_size=6),
)
@example(headers=[], path="", serials=(0, 0), other=[])  # no path: refused, never a key's shared `/`
def test_equal_keys_mean_equal_attributes_and_only_the_request_id_header_is_dropped(
    headers: list[tuple[str, str]], path: str, serials: tuple[int, int], other: list[tuple[str, str]]
) -> None:
    seen: dict[bytes, RequestAttributes] = {}
    keys = []
    for serial, extra in ((serials[0], headers), (serials[1], headers), (serials[0], other)):
        request = envoy(serial, authorization="", path=path)
        request.attributes.request.http.headers.update(dict(extra))
        data = request.SerializeToString()
        if not path:  # nothing tells the path: never translated (judged as `/`, a public `/` passed it), refused
            with pytest.raises(Undescribed):
                translated(data)
            with pytest.raises(Undescribed):
                attributes_from_envoy(ea.CheckRequest.FromString(data))
            return
        key, attrs = translated(data)
        untouched = attributes_from_envoy(ea.CheckRequest.FromString(data))
        assert attrs == untouched._replace(headers={k: v for k, v in untouched.headers.items() if k != "x-request-id"})
        assert seen.setdefault(key, attrs) == attrs
        keys.append(key)
    assert keys[0] == keys[1]  # the same request at another moment: one key
