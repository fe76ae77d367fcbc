"""The key of an Envoy CheckRequest (`verifier/doors/envoy_request.py`): the fields Envoy fills anew for every
request are out of it, everything the answer depends on is in it, and the attributes the pipeline judges are
the key's own translation. An attacker who shares a key with someone shares their answer: equal keys must
mean equal attributes, whatever the bytes (planted look-alikes, merged messages, raw header maps)."""

from __future__ import annotations

import itertools

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as ea
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from verifier.doors import envoy_request
from verifier.doors.envoy_request import python_key, request_key
from verifier.doors.grpc import attributes_from_envoy
from verifier.request import DescribedTwice, RequestAttributes, Undescribed

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


@pytest.fixture(autouse=True, params=["native", "python"])
def key_in(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with each of the two keys: the C one (`_envoy_key.c`) and the pure-Python one."""
    if request.param == "python":
        monkeypatch.setattr(envoy_request, "NATIVE", None)
    return str(request.param)


def translated(data: bytes) -> tuple[bytes, RequestAttributes]:
    """What the door does with the bytes: the key, and the attributes of the message the key is."""
    key = request_key(data)
    return key, attributes_from_envoy(ea.CheckRequest.FromString(key))


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


@pytest.mark.parametrize("form", ["header_map", "headers"])
def test_a_header_read_once_sent_twice_reaches_the_translation_twice_and_is_refused(form: str) -> None:
    """Each key keeps every line it does not drop (Envoy's x-request-id), so two X-Forwarded-Proto lines in a raw
    header map, or Envoy's map joining them with ",", come to the translation as two, which refuses them
    (`DescribedTwice`); two Authorization lines are joined for the credential check to refuse, as forward-auth does."""
    request = ea.CheckRequest.FromString(
        _raw_header_map(TOKEN, 3) if form == "header_map" else envoy(3).SerializeToString()
    )
    http = request.attributes.request.http
    if form == "header_map":
        http.header_map.headers.add(key="x-forwarded-proto", raw_value=b"http")
    else:
        http.headers["x-forwarded-proto"] = "https,http"
    with pytest.raises(DescribedTwice):
        translated(request.SerializeToString())
    request = ea.CheckRequest.FromString(_raw_header_map(TOKEN, 3))
    request.attributes.request.http.header_map.headers.add(key="authorization", raw_value=b"Bearer a.b.c")
    assert translated(request.SerializeToString())[1].headers["authorization"] == f"{TOKEN}, Bearer a.b.c"


def _both_forms(merged: bool) -> bytes:
    """`headers` holding only Envoy's x-request-id entry beside a raw `header_map`: in one HttpRequest, or in two
    messages the parser merges into one."""
    request = envoy(4, authorization="")
    http = request.attributes.request.http
    assert set(http.headers) == {"x-request-id", "x-forwarded-proto"}
    del http.headers["x-forwarded-proto"]
    raw = ea.CheckRequest()
    raw.attributes.request.http.header_map.headers.add(key="authorization", raw_value=TOKEN.encode())
    if merged:
        return request.SerializeToString() + raw.SerializeToString()  # type: ignore[no-any-return]
    request.MergeFrom(raw)
    return request.SerializeToString()  # type: ignore[no-any-return]


@pytest.mark.parametrize("merged", [False, True])
def test_both_header_forms_keep_the_request_id_entry_so_the_door_sees_both(key_in: str, merged: bool) -> None:
    """Envoy sends `headers` or `header_map`, never both; the door refuses both (`GrpcDoors.check_envoy`), but it
    judges the key's message, and the keys dropped Envoy's x-request-id entry from `headers`: one holding only it
    was no form beside the raw map, which was judged. Both keys now keep the entry of a request with both forms (the
    C key leaves such a request to the Python key, which keeps it whole), so the door sees, and refuses, both."""
    data = _both_forms(merged)
    if key_in == "native":
        assert envoy_request.NATIVE is not None and envoy_request.NATIVE(data) is None
    http = ea.CheckRequest.FromString(request_key(data)).attributes.request.http
    assert http.HasField("header_map") and dict(http.headers) == {
        "x-request-id": "8e58bf45-431f-4a31-8b18-000000000004"
    }
    # one form alone: the entry is dropped, as before, by either key
    one = ea.CheckRequest.FromString(data)
    one.attributes.request.http.ClearField("header_map")
    assert not ea.CheckRequest.FromString(request_key(one.SerializeToString())).attributes.request.http.headers


def test_another_connection_is_another_key() -> None:
    """The source port stays in the key (clearing it costs every check more than the miss it spares)."""
    assert translated(envoy(1).SerializeToString())[0] != translated(envoy(1, port="40001").SerializeToString())[0]


names = st.sampled_from(["authorization", "x-request-id", "X-Request-Id", "x-authenticated-userid", "dpop", "a"])
values = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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


# The key's own schema (protos/verifier/v1/envoy_key.proto) against Envoy's: every field declared, by number and
# wire type, but the two Envoy fills per request; what the key does not look into kept whole, each occurrence.
PER_REQUEST_FIELDS = {
    ("envoy.service.auth.v3.AttributeContext.Request", 1),
    ("envoy.service.auth.v3.AttributeContext.HttpRequest", 1),
}


def test_the_key_schema_declares_every_field_of_envoys_but_the_per_request_ones() -> None:
    from google.protobuf.descriptor import FieldDescriptor

    from verifier.v1 import envoy_key_pb2

    pairs = [
        (ea.CheckRequest.DESCRIPTOR, envoy_key_pb2.CheckRequest.DESCRIPTOR),
        (
            ea.CheckRequest.DESCRIPTOR.fields_by_name["attributes"].message_type,
            envoy_key_pb2.AttributeContext.DESCRIPTOR,
        ),
    ]
    attribute_context = pairs[1][0]
    request = attribute_context.fields_by_name["request"].message_type
    http = request.fields_by_name["http"].message_type
    pairs += [
        (request, envoy_key_pb2.Request.DESCRIPTOR),
        (http, envoy_key_pb2.HttpRequest.DESCRIPTOR),
        (http.fields_by_name["header_map"].message_type, envoy_key_pb2.HeaderMap.DESCRIPTOR),
    ]
    looked_into = {d.full_name for d, _ in pairs}
    for envoys, ours in pairs:
        declared = {f.number: f for f in ours.fields}
        for field in envoys.fields:
            if (envoys.full_name, field.number) in PER_REQUEST_FIELDS:
                assert field.number not in declared, (envoys.full_name, field.name)
                continue
            mine = declared.pop(field.number)
            assert mine.name == field.name, (envoys.full_name, field.name)
            if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name in looked_into:
                assert mine.type == FieldDescriptor.TYPE_MESSAGE and not mine.is_repeated, field.name
            elif field.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
                # kept as bytes, each occurrence (a message field merges them; each string's UTF-8 is checked)
                assert mine.type == FieldDescriptor.TYPE_BYTES and mine.is_repeated, field.name
            else:
                assert (mine.type, mine.is_repeated) == (field.type, field.is_repeated), field.name
        assert not declared, (envoys.full_name, sorted(declared))  # nothing Envoy's schema does not have


def test_a_look_alike_planted_before_envoys_entry_is_passed_over_and_envoys_entry_still_dropped() -> None:
    planted = _planted_entry()
    keys = set()
    for serial in (1, 2):
        request = envoy(serial)
        http = request.attributes.request.http
        http.method = planted  # field 2, before the headers (3): the first candidate the search finds
        data = request.SerializeToString()
        assert data.find(b"\n\x0cx-request-id") < data.find(f"8e58bf45-431f-4a31-8b18-{serial:012x}".encode())
        key, attrs = translated(data)
        assert attrs.method == planted.upper() and "x-request-id" not in attrs.headers
        keys.add(key)
    assert len(keys) == 1


def test_a_request_describing_no_http_request_stays_without_one_in_its_key() -> None:
    """Removing a candidate entry must not make `http` present: the door refuses a request without it."""
    request = ea.CheckRequest()
    request.attributes.source.certificate = _planted_entry()
    request.attributes.request.time.seconds = 1
    key = request_key(request.SerializeToString())
    assert not ea.CheckRequest.FromString(key).attributes.request.HasField("http")


def test_the_key_is_envoys_message_without_its_per_request_fields() -> None:
    request = envoy(5, certificate=CERT)
    request.attributes.context_extensions["route"] = "orders"
    request.attributes.metadata_context.filter_metadata["f"].fields["k"].string_value = "v"
    request.attributes.tls_session.sni = "api.example.test"
    http = request.attributes.request.http
    http.query, http.fragment, http.size, http.body, http.raw_body = "a=1", "top", 12, "body", b"\xffraw"
    expected = ea.CheckRequest()
    expected.CopyFrom(request)
    expected.attributes.request.ClearField("time")
    expected.attributes.request.http.ClearField("id")
    del expected.attributes.request.http.headers["x-request-id"]
    assert ea.CheckRequest.FromString(request_key(request.SerializeToString())) == expected


def test_bytes_that_are_no_check_request_are_refused_by_the_key() -> None:
    for data in (b"\x0a\x05abc", b"\xff\xff\xff", b"\x0a\x02\x22\x05"):
        with pytest.raises(DecodeError):
            request_key(data)


def _padded(value: int, size: int) -> bytes:
    """`value` as a varint of `size` bytes (continuation bits on zero bytes): the same number, spelled longer."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    while len(out) < size:
        out[-1] |= 0x80
        out.append(0)
    return bytes(out)


def _spelled(where: str, size: int) -> bytes:
    """A CheckRequest whose tag or length `where` is spelled in `size` bytes (the others in one)."""

    def field(tag: int, body: bytes, name: str) -> bytes:
        tag_size, length_size = (size if where == f"{name} {part}" else 1 for part in ("tag", "length"))
        return _padded(tag, tag_size) + _padded(len(body), length_size) + body

    http = field(0x0A, b"1", "id") + b"\x2a\x01/"  # HttpRequest: id, path "/"
    request = field(0x0A, b"\x08\x01", "time") + field(0x12, http, "http")  # Request: time, http
    return field(0x0A, field(0x22, request, "request"), "attributes")


@pytest.mark.parametrize("size", [6, 10])
@pytest.mark.parametrize(
    "where", ["attributes tag", "attributes length", "http tag", "http length", "time tag", "time length", "id tag"]
)
def test_a_tag_or_length_over_five_bytes_is_refused_by_both_keys(where: str, size: int) -> None:
    """Protobuf's parser refuses a tag or a length spelled in more than 5 bytes: so must the key, also where it
    writes that tag and length anew or leaves the field out (the C key took up to 10: a request Envoy's parser
    refuses was translated)."""
    for fine in (1, 5):
        key = request_key(_spelled(where, fine))
        assert ea.CheckRequest.FromString(key) == ea.CheckRequest.FromString(request_key(_spelled(where, 1)))
    data = _spelled(where, size)
    with pytest.raises(DecodeError):
        ea.CheckRequest.FromString(data)
    with pytest.raises(DecodeError):
        request_key(data)


def test_the_c_key_is_built_here(key_in: str) -> None:
    """`pip install -e .` (scripts/setup.sh) builds it; without it every cached ext_authz check costs ~3 us more."""
    if key_in == "python":
        pytest.skip("the C key's own question")
    assert envoy_request.NATIVE is not None


# ... and the headers a door reads once (`DescribedTwice`): both keys keep each line, so a repeat reaches the door.
key_names = st.sampled_from(["authorization", "x-request-id", "X-Request-Id", "dpop", "x-forwarded-proto", "host"])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    headers=st.lists(st.tuples(key_names, values), max_size=6),
    form=st.sampled_from(["headers", "header_map", "both"]),
    serial=st.integers(0, 2**40),
    tail=st.binary(max_size=24),
    cut=st.integers(0, 400),
)
def test_the_c_key_and_the_python_key_are_one_message(
    key_in: str, headers: list[tuple[str, str]], form: str, serial: int, tail: bytes, cut: int
) -> None:
    """Whatever the bytes (Envoy's, raw header maps, trailing garbage, cut short): where the C key takes them its key
    parses as the Python key's message (fields unknown to Envoy's schema aside: the C key copies them), and where
    either is no CheckRequest the door refuses both."""
    native = envoy_request.NATIVE
    if native is None:
        pytest.skip("the C key is not built" if key_in == "native" else "one implementation")
    if key_in == "python":
        pytest.skip("run once")
    request = envoy(serial)
    http = request.attributes.request.http
    raw = form != "headers"
    if form == "header_map":  # as Envoy sends it (`encode_raw_headers`): no `headers`
        http.ClearField("headers")
    if raw:
        for name, value in headers:
            http.header_map.headers.append(base_pb2.HeaderValue(key=name, raw_value=value.encode()))
    else:
        http.headers.update(dict(headers))
    whole = request.SerializeToString()
    if form == "both" and headers:  # both forms, which Envoy never sends: left to the Python key, which keeps both
        assert native(whole) is None
    for data in (whole, whole + tail, whole[:cut], tail):
        c_key = native(data)
        try:
            py_key = python_key(data)
        except DecodeError:
            py_key = None
        if c_key is None:  # the door falls back to the Python key: nothing to compare
            continue
        if py_key is None:  # the Python key refuses it: the C key must not parse as Envoy's message either
            with pytest.raises(DecodeError):
                ea.CheckRequest.FromString(c_key)
            continue
        try:
            c_message = ea.CheckRequest.FromString(c_key)
        except DecodeError:  # not Envoy's message deeper down: the door refuses it as it translates it
            with pytest.raises(DecodeError):
                ea.CheckRequest.FromString(py_key)
            continue
        py_message = ea.CheckRequest.FromString(py_key)
        for message in (c_message, py_message):  # both keep what they do not look into; the C key more
            message.DiscardUnknownFields()
        assert c_message == py_message
    if form == "header_map" or (len(set(dict(headers))) == len(headers) and not raw):
        assert native(whole) == python_key(whole)  # Envoy's own bytes: the very same key
