"""Coverage-guided fuzz targets (atheris / libFuzzer), one per parser we own, plus the two doors.

Each target takes the fuzzer's bytes and checks the same invariants as tests/test_hostile_input.py:
a parser raises only its own error, nothing raises out of the pipeline, nothing is allowed. A broken
invariant raises `InvariantBroken`, which atheris reports as a crash and saves as `crash-<sha1>`.

Imports of `verifier` happen in `load()`, inside `atheris.instrument_imports()` (see __main__.py), so
the fuzzer sees coverage of our code, not only of this file.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class InvariantBroken(AssertionError):
    """A target found an input that breaks an invariant."""


# Bugs already reported (each has a strict-xfail test in tests/test_hostile_input.py). They are
# tolerated here so a short CI run keeps finding *new* problems; remove an entry once it is fixed.
KNOWN_BUGS: tuple[tuple[type[BaseException], str], ...] = ()  # every reported bug is fixed

_state: dict[str, Any] = {}


def _known(exc: BaseException) -> bool:
    if isinstance(exc, InvariantBroken):
        return False
    return any(type(exc) is kind and text in str(exc) for kind, text in KNOWN_BUGS)


def load() -> None:
    """Imports the verifier and builds one pipeline over a fake provider (keys loaded)."""
    if _state:
        return
    tests_dir = str(Path(__file__).resolve().parents[2] / "tests")
    if tests_dir not in sys.path:  # tokenkit lives with the tests
        sys.path.insert(0, tests_dir)
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from support import FrozenClock
    from tokenkit import (
        DISCOVERY_URL,
        ISSUER,
        JWKS_URL,
        KIDS,
        NOW,
        FakeFetcher,
        discovery_document,
        issuer_settings,
        public_jwk,
    )

    from verifier.app import App
    from verifier.doors.forward_auth import ForwardAuthDoor
    from verifier.settings import Settings

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    fetcher = FakeFetcher()
    fetcher.serve(DISCOVERY_URL, discovery_document())
    fetcher.serve(
        JWKS_URL,
        {
            "keys": [
                public_jwk(ec.generate_private_key(ec.SECP256R1()), KIDS["ES256"]),
                public_jwk(rsa.generate_private_key(public_exponent=65537, key_size=2048), KIDS["RS256"]),
                public_jwk(ed25519.Ed25519PrivateKey.generate(), KIDS["EdDSA"]),
            ]
        },
    )
    settings = Settings(grpc=None, http=None, metrics=None, issuers=(issuer_settings(),), audit=False)
    app = App(settings, fetcher=fetcher, clock=FrozenClock(NOW))
    issuer_keys = app.keys.get(ISSUER)
    assert issuer_keys is not None
    loop.run_until_complete(issuer_keys.refresh())
    _state.update(loop=loop, app=app, door=ForwardAuthDoor(app.pipeline, app.metrics, lambda: True), now=NOW)


def _compact(data: bytes) -> str:
    """Bytes -> a token: raw text when the first byte is even, else three `|`-separated parts base64url-encoded.

    The second form puts the fuzzer straight into the JSON header and payload checks, which random
    text almost never reaches through base64.
    """
    import base64

    if not data or data[0] % 2 == 0:
        return data[1:].decode("latin-1")
    parts = ([*data[1:].split(b"|", 2), b"", b""])[:3]
    return ".".join(base64.urlsafe_b64encode(p).rstrip(b"=").decode() for p in parts)


def _decide(attrs: Any) -> None:
    app, loop = _state["app"], _state["loop"]
    decision = loop.run_until_complete(asyncio.wait_for(app.pipeline.decide(attrs, "fuzz"), 5))
    if decision.allowed or decision.reason == "internal_error":
        raise InvariantBroken(f"{decision.reason} for {attrs!r}")


def credentials_target(data: bytes) -> None:
    from verifier import credentials
    from verifier.errors import MalformedRequest, MissingToken
    from verifier.request import RequestAttributes

    value = data.decode("latin-1")
    attrs = RequestAttributes(method="GET", scheme="https", host="h", path="/", headers={"authorization": value})
    try:
        credentials.extract(attrs)
    except (MissingToken, MalformedRequest):
        return
    _decide(attrs)


def jws_target(data: bytes) -> None:
    from verifier.errors import AlgorithmRefused, MalformedToken
    from verifier.tokens import jws

    try:
        jws.parse(_compact(data), max_bytes=8192)
    except (MalformedToken, AlgorithmRefused):
        return


def jwk_target(data: bytes) -> None:
    from verifier.tokens.keys import KeyError_, parse_jwk

    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return
    if not isinstance(value, dict):
        return
    try:
        parse_jwk(value)
    except KeyError_:
        return


def dpop_target(data: bytes) -> None:
    from support import FrozenClock

    from verifier.binding.dpop import DpopVerifier
    from verifier.config.dpop import DpopConfig
    from verifier.errors import VerifierError
    from verifier.state.memory import MemoryState

    clock = FrozenClock(_state["now"])
    verifier = DpopVerifier(DpopConfig(), MemoryState(clock), clock)
    try:
        _state["loop"].run_until_complete(
            verifier.verify(_compact(data), method="GET", url="https://a.test/x", access_token="t", expected_jkt=None)
        )
    except VerifierError:
        return
    raise InvariantBroken("a random DPoP proof was accepted")


def webauthn_target(data: bytes) -> None:
    try:
        from verifier.webauthn.assertion import parse_assertion
        from verifier.webauthn.errors import AssertionRefused
    except ImportError:  # the WebAuthn package is optional at this revision
        return
    try:
        parse_assertion(data.decode("latin-1"))
    except AssertionRefused:
        return


def token_target(data: bytes) -> None:
    from verifier.request import RequestAttributes

    token, _, proof = data.partition(b"\n")
    headers = {"authorization": "Bearer " + _compact(token), "dpop": _compact(proof)}
    _decide(RequestAttributes(method="GET", scheme="https", host="api", path="/x", headers=headers))


class _Transport:
    """Enough of an asyncio transport for one forward-auth connection."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed:
            raise InvariantBroken("write after close")
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


def forward_auth_target(data: bytes) -> None:
    """The real forward-auth protocol (httptools parser, attributes, pipeline) over a fake transport."""
    from verifier.doors import forward_auth

    async def drive() -> bytes:
        connection = forward_auth._Connection(_state["door"])
        transport = _Transport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        for start in range(0, len(data), 97):  # arbitrary split points exercise the parser's resumption
            connection.data_received(data[start : start + 97])
        for _ in range(200):
            if not connection.busy:
                break
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        if connection.busy:
            await asyncio.wait_for(
                asyncio.gather(*(f for f in connection._pending if isinstance(f, asyncio.Future))), 5
            )
        connection.connection_lost(None)
        return b"".join(transport.written)

    answer = _state["loop"].run_until_complete(drive())
    check_http_answers(answer)


def _http_head_input(data: bytes) -> bytes:
    """Bytes -> a request: raw when the first byte is even, else a gateway's request (`data[1]` picks it) edited by
    each 3 bytes after (replace, insert or delete at a position), so a run without coverage of the C (not
    instrumented) still spends its inputs near the subset's edges."""
    from doors.test_http_head import GATEWAY_REQUESTS

    if not data or data[0] % 2 == 0:
        return data[1:]
    request = bytearray(GATEWAY_REQUESTS[data[1] % len(GATEWAY_REQUESTS)] if len(data) > 1 else b"")
    for at in range(2, len(data) - 2, 3):
        op, where, byte = data[at] % 3, data[at + 1] * 7 % (len(request) + 1), data[at + 2]
        if op == 0 and where < len(request):
            request[where] = byte
        elif op == 1:
            request.insert(where, byte)
        elif where < len(request):
            del request[where]
    return bytes(request)


def http_head_target(data: bytes) -> None:
    """The forward-auth door's C parse of a whole bodyless request (verifier/doors/_http_head.c) against llhttp:
    wherever the C answers, llhttp makes the same one keep-alive request of the bytes (method, target, fields)."""
    from doors.test_http_head import llhttp

    from verifier.doors.forward_auth import MAX_HEADERS, WHOLE_HEAD

    if WHOLE_HEAD is None:  # not built here: every request goes to llhttp
        return
    data = _http_head_input(data)
    taken = WHOLE_HEAD(data, MAX_HEADERS)
    if taken is None:
        return
    expected = llhttp(data)
    if taken != expected:
        raise InvariantBroken(f"the C parse gives {taken!r}, llhttp {expected!r}")


def check_http_answers(answer: bytes) -> None:
    """Each answer is a well-formed HTTP/1.1 response, and none allows anything."""
    rest = answer
    while rest:
        if not rest.startswith(b"HTTP/1.1 "):
            raise InvariantBroken(f"not an HTTP answer: {rest[:80]!r}")
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            raise InvariantBroken(f"unterminated head: {head[:80]!r}")
        lowered = head.lower()
        if b"x-authenticated-userid" in lowered or b"x-verifier-reason: ok" in lowered:
            raise InvariantBroken(f"allowed: {head[:200]!r}")
        length = 0
        for line in lowered.split(b"\r\n")[1:]:
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        rest = rest[length:]


def grpc_target(data: bytes) -> None:
    from envoy.service.auth.v3 import external_auth_pb2 as ea
    from google.protobuf.message import DecodeError

    from verifier.doors.grpc import attributes_from_envoy, attributes_from_own
    from verifier.request import DescribedTwice, Undescribed
    from verifier.v1 import verifier_pb2

    for message_type, translate, path in (
        (ea.CheckRequest, attributes_from_envoy, lambda m: m.attributes.request.http.path),
        (verifier_pb2.CheckRequest, attributes_from_own, lambda m: m.path),
    ):
        try:
            message = message_type.FromString(data)
        except DecodeError:
            continue
        try:
            attrs = translate(message)  # type: ignore[operator]
        except Undescribed:  # the door answers 400 `invalid_request`: nothing told the path
            if path(message):
                raise InvariantBroken(f"a path was told and refused as untold: {path(message)!r}") from None
            continue
        except DescribedTwice:  # the door answers 400 `invalid_request`: x-forwarded-proto came twice
            continue
        if not path(message):
            raise InvariantBroken(f"no path, judged as {attrs.path!r}")  # a public `/` passed every request
        _decide(attrs)


# The five messages the C key walks (verifier/doors/_envoy_key.c), outermost first: the field that holds the next.
_ENVOY_KEY_LEVELS = (b"\x0a", b"\x22", b"\x12", b"\x6a")  # attributes (1), request (4), http (2), header_map (13)


def _envoy_key_input(data: bytes) -> bytes:
    """Bytes -> a CheckRequest: raw when the first byte is even, else `data[2:]` as the body of the message
    `data[1] % 5` levels down (0: the CheckRequest itself, 4: a HeaderMap), so the fuzzer starts inside the walk."""
    if not data or data[0] % 2 == 0:
        return data[1:]
    body = data[2:]
    for tag in reversed(_ENVOY_KEY_LEVELS[: data[1] % 5 if len(data) > 1 else 0]):
        size, length = len(body), bytearray()
        while size >= 0x80:
            length.append(size & 0x7F | 0x80)
            size >>= 7
        body = tag + bytes(length) + bytes([size]) + body
    return body


def _envoy_message(key: bytes) -> Any:
    from envoy.service.auth.v3 import external_auth_pb2 as ea
    from google.protobuf.message import DecodeError

    try:
        return ea.CheckRequest.FromString(key)
    except DecodeError:
        return None


def envoy_key_target(data: bytes) -> None:
    from google.protobuf.message import DecodeError

    from verifier.doors.envoy_request import NATIVE, python_key

    message = _envoy_key_input(data)
    try:
        py_key: bytes | None = python_key(message)
    except DecodeError:
        py_key = None
    if NATIVE is None:  # not built here: only the Python key to run
        return
    c_key = NATIVE(message)
    if c_key is None:  # the door falls back to the Python key
        return
    if not isinstance(c_key, bytes):
        raise InvariantBroken(f"the C key returned {type(c_key).__name__}")
    c_message = _envoy_message(c_key)
    if py_key is None:
        if c_message is not None:
            raise InvariantBroken("the Python key refuses the bytes, the C key parses as Envoy's CheckRequest")
        return
    py_message = _envoy_message(py_key)
    if (c_message is None) != (py_message is None):  # the door refuses both keys as it translates them, or neither
        raise InvariantBroken(f"only one key parses as Envoy's CheckRequest: C {c_key!r}, Python {py_key!r}")
    if c_message is None:
        return
    for parsed in (c_message, py_message):  # both keep what they do not look into; the C key more
        parsed.DiscardUnknownFields()
    if c_message != py_message:
        raise InvariantBroken(f"the keys are two messages: C {c_key!r}, Python {py_key!r}")


def settings_target(data: bytes) -> None:
    import yaml

    from verifier.settings import ConfigError, parse_settings

    try:
        document = yaml.safe_load(data)
    except (yaml.YAMLError, ValueError, RecursionError):
        return
    try:
        parse_settings(document)
    except ConfigError:
        return


class _ProviderTransport:
    """Enough of an asyncio transport for the introspection client's side of one connection."""

    def __init__(self) -> None:
        self.aborted = False

    def write(self, data: bytes) -> None:
        if self.aborted:
            raise InvariantBroken("introspection request written on an aborted connection")

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


INTROSPECTION_ISSUER = "https://issuer.fuzz.test"
INTROSPECTION_AUDIENCE = "https://api.fuzz.test"


def _provider_response(data: bytes) -> bytes:
    """Bytes -> the provider's raw HTTP/1.1 answer: as they are when the first byte is even, else the rest as
    the JSON body of a well-framed 200 (so the fuzzer reaches the answer's checks, not only the framing)."""
    if not data or data[0] % 2 == 0:
        return data[1:]
    body = data[1:]
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def _read_provider_answer(raw: bytes) -> Any:
    """The introspection client's HTTP/1.1 parser (`introspection_http._Connection`) over `raw`, then the
    provider closing: the `HttpReply` or the `ProviderUnavailable` its one `done` callback got."""
    from verifier.config.introspection import DEFAULT_MAX_RESPONSE_BYTES
    from verifier.errors import ProviderUnavailable
    from verifier.tokens.introspection_client import HttpReply
    from verifier.tokens.introspection_http import _Connection

    outcomes: list[Any] = []

    async def drive() -> None:
        connection = _Connection()
        transport = _ProviderTransport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        connection.begin(b"POST / HTTP/1.1\r\n\r\n", DEFAULT_MAX_RESPONSE_BYTES, loop.time() + 60, outcomes.append)
        for start in range(0, len(raw), 89):  # arbitrary split points exercise the parser's resumption
            if transport.aborted:
                break
            connection.data_received(raw[start : start + 89])
        connection.connection_lost(None)
        await asyncio.sleep(0)

    _state["loop"].run_until_complete(asyncio.wait_for(drive(), 5))
    if len(outcomes) != 1:
        raise InvariantBroken(f"{len(outcomes)} outcomes for one exchange: {outcomes!r}")
    (outcome,) = outcomes
    if type(outcome) is not HttpReply and not isinstance(outcome, ProviderUnavailable):
        raise InvariantBroken(f"the exchange ended in {outcome!r}")
    if isinstance(outcome, HttpReply) and len(outcome.body) > DEFAULT_MAX_RESPONSE_BYTES:
        raise InvariantBroken(f"a body of {len(outcome.body)} bytes passed the bound")
    return outcome


def _may_be_active(reply: Any, now: float) -> bool:
    """Whether an answer could stand for a principal: an independent, simplified reading of RFC 7662 section 2.2
    and the verifier's rules (200, a JSON object, `"active": true`, our issuer and audience, not expired, a subject)."""
    if reply.status != 200:
        return False
    try:
        answer = json.loads(reply.body.decode())
    except (ValueError, RecursionError):
        return False
    if not isinstance(answer, dict) or answer.get("active") is not True:
        return False
    if answer.get("iss", INTROSPECTION_ISSUER) != INTROSPECTION_ISSUER:
        return False
    aud = answer.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if INTROSPECTION_AUDIENCE not in audiences:
        return False
    exp = answer.get("exp")
    if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int | float) or not exp > now):
        return False
    sub, client_id = answer.get("sub"), answer.get("client_id")
    if sub is not None and not isinstance(sub, str):
        return False
    return bool(sub) or (isinstance(client_id, str) and client_id != "")


class _ReplySeam:
    """The introspection network seam, answering every call with one reply."""

    def __init__(self, reply: Any) -> None:
        self.reply = reply

    async def send(self, request: Any) -> Any:
        return self.reply


def introspection_target(data: bytes) -> None:
    """The provider's raw answer through the HTTP/1.1 client, then the RFC 7662 checks and the principal."""
    from prometheus_client import CollectorRegistry
    from support import FrozenClock

    from verifier.app import build_introspector
    from verifier.errors import AudienceMismatch, InvalidToken, ProviderUnavailable
    from verifier.principal import Principal
    from verifier.tokens.introspection import IntrospectionConfig

    outcome = _read_provider_answer(_provider_response(data))
    if isinstance(outcome, ProviderUnavailable):
        return
    now = _state["now"]
    introspector = build_introspector(
        issuer=INTROSPECTION_ISSUER,
        audiences=(INTROSPECTION_AUDIENCE,),
        config=IntrospectionConfig(client_id="verifier", client_secret="s", endpoint=INTROSPECTION_ISSUER + "/i"),
        clock=FrozenClock(now),
        registry=CollectorRegistry(),
        endpoint=None,
        http=_ReplySeam(outcome),
    )

    async def ask() -> Principal:
        try:
            return await introspector.introspect("opaque-token", b"h" * 32)
        finally:
            await introspector.close()

    try:
        principal = _state["loop"].run_until_complete(asyncio.wait_for(ask(), 5))
    except (InvalidToken, AudienceMismatch, ProviderUnavailable):
        return
    if not isinstance(principal, Principal) or not _may_be_active(outcome, now):
        raise InvariantBroken(f"allowed {principal!r} from {outcome!r}")


SSF_TRANSMITTER = "https://ssf.fuzz.test"
SSF_RECEIVER = "https://verifier.fuzz.test/ssf"
SSF_ERRORS = frozenset(
    {"invalid_request", "invalid_key", "invalid_issuer", "invalid_audience", "authentication_failed"}
)
_REBUILD_EVERY = 2000  # iterations on one service: its index and jti memory grow with the SETs it accepts


def _ssf_service() -> Any:
    """The SSF receiver (a `RevocationService` with one pushing transmitter, keys loaded) and its route; rebuilt
    now and then, so a long run's accepted SETs do not pile up."""
    built = _state.get("ssf")
    if built is not None and built["uses"] < _REBUILD_EVERY:
        built["uses"] += 1
        return built
    integration = str(Path(__file__).resolve().parents[1] / "integration")
    if integration not in sys.path:  # the test transmitter (its key, JWKS and metadata)
        sys.path.insert(0, integration)
    import logging

    from prometheus_client import CollectorRegistry
    from ssf_transmitter import SsfTransmitter
    from support import FrozenClock, no_http_session
    from tokenkit import ISSUER, FakeFetcher

    from verifier.doors.routes import Router
    from verifier.doors.ssf_http import add_ssf_routes
    from verifier.observe.metrics import RevocationMetrics
    from verifier.revocation import RevocationService, parse_revocation_config
    from verifier.revocation.entry import REFUSAL_CODES
    from verifier.state.memory import MemoryState

    logging.getLogger("verifier.revocation").setLevel(logging.ERROR)  # a refused SET is logged at warning
    loop = _state["loop"]
    if built is not None:
        loop.run_until_complete(built["service"].stop())
    clock = FrozenClock(_state["now"])
    transmitter = (
        built["transmitter"]
        if built is not None
        else SsfTransmitter(audience=SSF_RECEIVER, issuer=SSF_TRANSMITTER, now=clock.now)
    )
    fetcher = FakeFetcher()
    fetcher.serve(transmitter.configuration_url, transmitter.configuration())
    fetcher.serve(transmitter.jwks_url, transmitter.jwks())
    config = parse_revocation_config(
        {
            "transmitters": [
                {
                    "issuer": SSF_TRANSMITTER,
                    "audience": SSF_RECEIVER,
                    "delivery": "push",
                    "algorithms": ["ES256"],
                    "max_age_seconds": 300,
                    "subjects_of": [ISSUER],
                }
            ],
            "max_token_lifetime_seconds": 3600,
        }
    )
    revoked: list[Any] = []

    async def on_credential_revoked(credential: Any) -> None:
        revoked.append(credential)

    service = RevocationService(
        config,
        state=MemoryState(clock),
        fetcher=fetcher,
        clock=clock,
        metrics=RevocationMetrics(CollectorRegistry(), REFUSAL_CODES),
        session=no_http_session,
        on_credential_revoked=on_credential_revoked,
    )
    loop.run_until_complete(service.start())
    router = Router()
    add_ssf_routes(router, service)
    built = _state["ssf"] = {
        "uses": 1,
        "service": service,
        "router": router,
        "transmitter": transmitter,
        "revoked": revoked,
    }
    return built


def _sign_es256(key: Any, header: dict[str, Any], payload: bytes) -> str:
    """A compact JWS over `payload` as it is (any bytes, JSON or not), signed by `key` (ES256)."""
    import base64

    from jwt.algorithms import ECAlgorithm

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    signing_input = b64(json.dumps(header).encode()) + "." + b64(payload)
    signature = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode("ascii"), key)
    return signing_input + "." + b64(signature)


def _message_mode(data: bytes, media: str) -> tuple[int, str, bytes]:
    """(the mode: the first byte mod 4; the Content-Type: mostly `media`, the second byte picks; the rest)."""
    mode = data[0] % 4 if data else 0
    kind = data[1] % 8 if len(data) > 1 else 0
    content_type = {5: "text/plain", 6: "application/jwt", 7: media + "; charset=utf-8"}.get(kind, media)
    return mode, content_type, data[2:]


def _signed_message(
    mode: int, rest: bytes, claims: dict[str, Any], member: str, key: Any, header: dict[str, Any]
) -> str:
    """Mode 2: `rest` as a JSON object over the valid `claims` (any other JSON value as their `member`); mode 3:
    `rest` as the payload, as it is. Signed by `key` (ES256)."""
    if mode == 2:
        try:
            value = json.loads(rest)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict):
            claims.update(value)
        else:
            claims[member] = value
        rest = json.dumps(claims).encode()
    return _sign_es256(key, header, rest)


def _ssf_set(data: bytes, transmitter: Any) -> tuple[bytes, str, bool]:
    """Bytes -> (the pushed body, its Content-Type, whether the transmitter signed it). The first byte picks:

    0 the rest as the body, as it is; 1 `header|payload|signature` (`_compact`), unsigned; 2 the rest as a JSON
    object over a valid SET's claims (iss, aud, iat, a fresh jti), signed; 3 the rest as the payload, signed as it
    is. The second byte's low bits pick the Content-Type (mostly the right one)."""
    import uuid

    mode, content_type, rest = _message_mode(data, "application/secevent+jwt")
    if mode == 0:
        return rest, content_type, False
    if mode == 1:
        return _compact(b"\x01" + rest).encode("ascii"), content_type, False
    # a fresh jti, unless the input names one: a replay is a refusal, not a crash
    claims = {"iss": SSF_TRANSMITTER, "aud": SSF_RECEIVER, "iat": int(_state["now"]), "jti": uuid.uuid4().hex}
    header = {"alg": "ES256", "typ": "secevent+jwt", "kid": transmitter.kid}
    return _signed_message(mode, rest, claims, "events", transmitter.key, header).encode("ascii"), content_type, True


def ssf_target(data: bytes) -> None:
    """A pushed SET (RFC 8935) through `POST /v1/ssf/events`: answered 202, 400 with an RFC 8935 err, or 503;
    never an exception; an entry or a disabled credential only from a SET the transmitter signed and we took."""
    from verifier.doors.routes import HttpRequest

    built = _ssf_service()
    service, revoked = built["service"], built["revoked"]
    body, content_type, signed = _ssf_set(data, built["transmitter"])
    entries, credentials = len(service.revocations), len(revoked)
    request = HttpRequest("POST", "/v1/ssf/events", "", {"content-type": content_type}, body)
    answer = _state["loop"].run_until_complete(asyncio.wait_for(built["router"].dispatch(request), 5))
    changed = len(service.revocations) != entries or len(revoked) != credentials
    _check_receipt(answer, ("err", "description", SSF_ERRORS), 202, signed=signed, changed=changed, body=body)


def _check_receipt(
    answer: Any, errors: tuple[str, str, frozenset[str]], accepted: int, *, signed: bool, changed: bool, body: bytes
) -> None:
    """A signed message's receiver answered `accepted`, 503, or 400 with a JSON error (`errors`: the code's member,
    the description's, the codes allowed); it took only a message its sender signed, and changed nothing unless it
    took it."""
    code, description, codes = errors
    if answer.status == 400:
        document = json.loads(answer.body)
        if document.get(code) not in codes or not isinstance(document.get(description), str):
            raise InvariantBroken(f"not an error of the protocol: {answer.body!r}")
    elif answer.status not in (accepted, 503):
        raise InvariantBroken(f"answered {answer.status}: {answer.body!r}")
    if answer.status == accepted and not signed:
        raise InvariantBroken(f"took a message its sender did not sign: {body[:200]!r}")
    if changed and answer.status != accepted:
        raise InvariantBroken(f"answered {answer.status} yet revoked something: {body[:200]!r}")


LOGOUT_CLIENT = "gateway-client"


def _logout_app() -> Any:
    """The composition root with one issuer accepting back-channel logout tokens for `LOGOUT_CLIENT` (its ES256
    key kept here, to sign with); rebuilt now and then, so a long run's logouts do not pile up."""
    built = _state.get("logout")
    if built is not None and built["uses"] < _REBUILD_EVERY:
        built["uses"] += 1
        return built
    import logging

    from cryptography.hazmat.primitives.asymmetric import ec
    from support import FrozenClock
    from tokenkit import DISCOVERY_URL, JWKS_URL, KIDS, FakeFetcher, discovery_document, issuer_settings, public_jwk

    from verifier.app import App
    from verifier.config.logout import BackchannelLogoutConfig
    from verifier.settings import Settings

    logging.getLogger("verifier.revocation").setLevel(logging.ERROR)  # a refused logout is logged at warning
    logging.getLogger("verifier.audit").setLevel(logging.ERROR)  # an accepted one at info
    key = built["key"] if built is not None else ec.generate_private_key(ec.SECP256R1())
    fetcher = FakeFetcher()
    fetcher.serve(DISCOVERY_URL, discovery_document())
    fetcher.serve(JWKS_URL, {"keys": [public_jwk(key, KIDS["ES256"])]})
    issuer = issuer_settings(
        algorithms=("ES256",), backchannel_logout=BackchannelLogoutConfig(audiences=(LOGOUT_CLIENT,))
    )
    app = App(
        Settings(grpc=None, http=None, metrics=None, issuers=(issuer,), audit=False),
        fetcher=fetcher,
        clock=FrozenClock(_state["now"]),
    )
    assert app.revocation is not None
    _state["loop"].run_until_complete(app.revocation.resync())  # the first load: the index answers from now on
    built = _state["logout"] = {"uses": 1, "app": app, "key": key, "kid": KIDS["ES256"]}
    return built


def _logout_body(data: bytes, key: Any, kid: str) -> tuple[bytes, str, bool]:
    """Bytes -> (the posted body, its Content-Type, whether the issuer signed the token). The first byte picks:

    0 the rest as the body, as it is; 1 `logout_token=` and `header|payload|signature` (`_compact`), unsigned;
    2 the rest as a JSON object over a valid logout token's claims (a fresh jti), signed; 3 the rest as the payload,
    signed as it is. The second byte's low bits pick the Content-Type (mostly the right one)."""
    import urllib.parse
    import uuid

    from tokenkit import ISSUER

    mode, content_type, rest = _message_mode(data, "application/x-www-form-urlencoded")
    if mode == 0:
        return rest, content_type, False
    if mode == 1:
        return b"logout_token=" + _compact(b"\x01" + rest).encode("ascii"), content_type, False
    now = int(_state["now"])
    claims = {"iss": ISSUER, "aud": LOGOUT_CLIENT, "iat": now, "exp": now + 120, "jti": uuid.uuid4().hex}
    claims["events"] = {"http://schemas.openid.net/event/backchannel-logout": {}}
    token = _signed_message(mode, rest, claims, "sid", key, {"alg": "ES256", "typ": "logout+jwt", "kid": kid})
    return ("logout_token=" + urllib.parse.quote(token, safe="")).encode("ascii"), content_type, True


def logout_target(data: bytes) -> None:
    """A back-channel logout request through `POST /v1/backchannel-logout` (the root's router): answered 200,
    400 `invalid_request` or 503, never an exception; an entry only from a token the issuer signed and we took."""
    from verifier.doors.logout_http import LOGOUT_PATH
    from verifier.doors.routes import HttpRequest

    built = _logout_app()
    app = built["app"]
    body, content_type, signed = _logout_body(data, built["key"], built["kid"])
    entries = len(app.revocation.revocations)
    request = HttpRequest("POST", LOGOUT_PATH, "", {"content-type": content_type}, body)
    answer = _state["loop"].run_until_complete(asyncio.wait_for(app.router.dispatch(request), 5))
    changed = len(app.revocation.revocations) != entries
    if ("cache-control", "no-store") not in answer.headers:
        raise InvariantBroken(f"answered {answer.status} without no-store")
    errors = ("error", "error_description", frozenset({"invalid_request"}))
    _check_receipt(answer, errors, 200, signed=signed, changed=changed, body=body)


def _registration_service() -> Any:
    """A WebAuthn registry (in-memory SQLite) behind its routes, with a stub authentication that names the user of
    the `Bearer token-<user>` header; rebuilt now and then, so a long run's registrations do not pile up."""
    built = _state.get("webauthn_registry")
    if built is not None and built["uses"] < _REBUILD_EVERY:
        built["uses"] += 1
        return built
    from prometheus_client import CollectorRegistry
    from support import FrozenClock
    from webauthnkit import ORIGIN, RP_ID

    from verifier.doors.routes import Router
    from verifier.doors.webauthn_http import add_webauthn_routes
    from verifier.errors import MissingToken
    from verifier.observe.metrics import WebAuthnMetrics
    from verifier.principal import Principal
    from verifier.state.memory import MemoryState
    from verifier.webauthn import SqliteCredentialStore, WebAuthnConfig, WebAuthnService

    loop = _state["loop"]
    if built is not None:
        loop.run_until_complete(built["service"].close())
    clock = FrozenClock(_state["now"])
    config = WebAuthnConfig(  # no warning; the stub's tokens carry no login time, and a first enrollment is the target
        rp_id=RP_ID, origins=(ORIGIN,), secret=b"s" * 32, secret_from_env=True, first_enrollment_max_auth_age_seconds=0
    )
    service = WebAuthnService(
        config, SqliteCredentialStore(":memory:"), MemoryState(clock), clock, WebAuthnMetrics(CollectorRegistry())
    )

    async def authenticate(_: Any, attrs: Any) -> Principal:
        value = attrs.headers.get("authorization", "")
        if not value.startswith("Bearer token-"):
            raise MissingToken()
        return _principal_of(value.removeprefix("Bearer token-"))

    router = Router()
    add_webauthn_routes(router, service, authenticate)
    built = _state["webauthn_registry"] = {
        "uses": 1,
        "service": service,
        "router": router,
        "users": built["users"] if built is not None else 0,
    }
    return built


def _registration_body(data: bytes, state: str, challenge: str) -> tuple[bytes, bytes | None, bytes | None]:
    """Bytes -> (the register/complete body, its clientDataJSON, its attestationObject). The first byte picks:

    even: the rest as the body, `@STATE@` and `@CHALLENGE@` replaced by the ceremony's; odd: a well-formed body
    around `clientDataJSON` and `attestationObject` given raw (each after a two-byte length; `@CHALLENGE@`
    replaced in the first), base64url-encoded by the target, so the fuzzer reaches fido2's checks and CBOR."""
    import base64

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    if not data or data[0] % 2 == 0:
        body = data[1:].replace(b"@STATE@", state.encode()).replace(b"@CHALLENGE@", challenge.encode())
        return body, None, None
    rest = data[1:]
    size = int.from_bytes(rest[:2], "big")
    client_data = rest[2 : 2 + size].replace(b"@CHALLENGE@", challenge.encode())
    rest = rest[2 + size :]
    size = int.from_bytes(rest[:2], "big")
    attestation, credential_id = rest[2 : 2 + size], rest[2 + size :] or b"\x01"
    document = {
        "state": state,
        "name": "key",
        "credential": {
            "id": b64(credential_id),
            "rawId": b64(credential_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64(client_data),
                "attestationObject": b64(attestation),
                "transports": ["usb", "x"],
            },
            "clientExtensionResults": {},
        },
    }
    return json.dumps(document).encode(), client_data, attestation


def _registration_may_verify(client_data: bytes | None, attestation: bytes | None, challenge: str) -> bool:
    """Whether a registration could verify: an independent, simplified reading of W3C WebAuthn section 7.1 steps
    5-14 (clientDataJSON's type, challenge and origin; the authenticator data's rpIdHash and UP flag)."""
    import hashlib

    from fido2 import cbor
    from webauthnkit import ORIGIN, RP_ID

    if client_data is None or attestation is None:
        return True  # a body given whole: judged by the ceremony's own checks only
    try:
        collected = json.loads(client_data)
        auth_data = cbor.decode(attestation)["authData"]
    except Exception:  # anything unreadable cannot verify
        return False
    if not isinstance(collected, dict) or not isinstance(auth_data, bytes) or len(auth_data) < 37:
        return False
    return (
        collected.get("type") == "webauthn.create"
        and collected.get("challenge") == challenge
        and collected.get("origin") == ORIGIN
        and auth_data[:32] == hashlib.sha256(RP_ID.encode()).digest()
        and bool(auth_data[32] & 0x01)
    )


def webauthn_registration_target(data: bytes) -> None:
    """A registration response (`POST /v1/webauthn/register/complete`) after a real `register/begin`: answered by
    the route, never an exception; 201 (a stored credential) only from a response that can verify."""
    from verifier.doors.routes import HttpRequest

    built = _registration_service()
    built["users"] += 1
    user = f"u{built['users']}"  # a fresh user: no step-up before its first credential
    headers = {"host": "localhost:9555", "authorization": f"Bearer token-{user}", "content-type": "application/json"}
    loop, router = _state["loop"], built["router"]
    begun = loop.run_until_complete(
        router.dispatch(HttpRequest("POST", "/v1/webauthn/register/begin", "", headers, b"{}"))
    )
    if begun.status != 200:
        raise InvariantBroken(f"register/begin answered {begun.status}: {begun.body!r}")
    document = json.loads(begun.body)
    state, challenge = document["state"], document["publicKey"]["challenge"]
    body, client_data, attestation = _registration_body(data, state, challenge)
    request = HttpRequest("POST", "/v1/webauthn/register/complete", "", headers, body)
    answer = loop.run_until_complete(asyncio.wait_for(router.dispatch(request), 5))
    stored = loop.run_until_complete(built["service"].credentials(_principal_of(user)))
    if answer.status == 201:
        if not stored or not _registration_may_verify(client_data, attestation, challenge):
            raise InvariantBroken(f"registered from {body[:300]!r}")
    elif stored:
        raise InvariantBroken(f"answered {answer.status} yet stored a credential: {body[:300]!r}")
    elif answer.status < 400 or answer.status >= 500:
        raise InvariantBroken(f"answered {answer.status}: {answer.body!r}")


def _principal_of(user: str) -> Any:
    from verifier.principal import Principal

    return Principal(
        issuer="https://issuer.fuzz.test",
        subject=user,
        client_id="app",
        scopes=(),
        roles=frozenset(),
        expires_at=2e9,
        claims={"sub": user},
    )


TARGETS: dict[str, Callable[[bytes], None]] = {
    "credentials": credentials_target,
    "jws": jws_target,
    "jwk": jwk_target,
    "dpop": dpop_target,
    "webauthn": webauthn_target,
    "token": token_target,
    "forward_auth": forward_auth_target,
    "grpc": grpc_target,
    "envoy_key": envoy_key_target,
    "http_head": http_head_target,
    "settings": settings_target,
    "introspection": introspection_target,
    "ssf": ssf_target,
    "logout": logout_target,
    "webauthn_registration": webauthn_registration_target,
}


def run_one(name: str) -> Callable[[bytes], None]:
    """The target `name`, with already-reported bugs tolerated (see KNOWN_BUGS)."""
    target = TARGETS[name]

    def guarded(data: bytes) -> None:
        try:
            target(data)
        except Exception as exc:
            if _known(exc):
                return
            raise

    return guarded


def _registration_seeds() -> list[bytes]:
    """Registration responses of a software authenticator, the challenge left as `@CHALLENGE@`."""
    import base64

    from webauthnkit import SoftAuthenticator

    seeds = []
    for fmt in ("none", "packed"):
        authenticator = SoftAuthenticator()
        placeholder = "A" * 43  # a 32-byte challenge's length, then replaced by the marker
        credential = authenticator.create({"challenge": placeholder, "user": {"id": "AA"}}, fmt=fmt)
        parts = [
            base64.urlsafe_b64decode(credential["response"][name] + "==")
            for name in ("clientDataJSON", "attestationObject")
        ]
        parts[0] = parts[0].replace(placeholder.encode(), b"@CHALLENGE@")
        seeds.append(
            b"\x01" + b"".join(len(part).to_bytes(2, "big") + part for part in parts) + authenticator.credential_id
        )
        seeds.append(b"\x00" + json.dumps({"state": "@STATE@", "credential": credential, "name": "k"}).encode())
    return seeds


def _envoy_key_seeds() -> list[bytes]:
    """A check as Envoy sends it (its per-request fields, a map and a raw header map), whole and each message of the
    walk on its own."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.auth.v3 import external_auth_pb2 as ea

    request = ea.CheckRequest()
    attributes = request.attributes
    attributes.source.address.socket_address.address = "192.0.2.10"
    attributes.source.address.socket_address.port_value = 40000
    attributes.request.time.seconds = 1_796_300_000
    http = attributes.request.http
    http.id, http.method, http.host, http.path = "1000000", "GET", "api.example.test", "/api/orders/42"
    http.headers.update({"x-request-id": "8e58bf45-431f-4a31-8b18-000000000001", "authorization": "Bearer x"})
    http.header_map.headers.append(base_pb2.HeaderValue(key="x-request-id", raw_value=b"id-1"))
    http.header_map.headers.append(base_pb2.HeaderValue(key="authorization", raw_value=b"Bearer x"))
    seeds = [b"\x00" + request.SerializeToString()]
    inner: Any = request
    for level, field in enumerate(("attributes", "request", "http", "header_map")):
        seeds.append(bytes([1, level]) + inner.SerializeToString())
        inner = getattr(inner, field)
    seeds.append(bytes([1, 4]) + inner.SerializeToString())
    return seeds


def seeds(name: str) -> list[bytes]:
    """A few valid-looking inputs per target, so a short run starts past the outer syntax checks."""
    import base64

    from tokenkit import AUDIENCE, ISSUER, KIDS, NOW

    header = json.dumps({"alg": "ES256", "typ": "at+jwt", "kid": KIDS["ES256"]}).encode()
    payload = json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "u", "exp": NOW + 300, "iat": NOW}).encode()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
        "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
    }
    proof_header = json.dumps({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}).encode()
    proof_claims = json.dumps({"jti": "j", "htm": "GET", "htu": "https://a.test/x", "iat": NOW, "ath": "x"}).encode()
    token = b"\x01" + header + b"|" + payload + b"|" + b"s" * 64
    config = (
        b'http: {listen: "127.0.0.1:8080"}\ngrpc: {listen: "[::1]:50051"}\nissuers:\n'
        b'  - {issuer: "http://127.0.0.1:9400", audiences: [a], algorithms: [ES256, RS256],\n'
        b"     leeway_seconds: 30, fetch_timeout_seconds: 5, roles: [{role: admin, scope: admin}],\n"
        b"     allow_insecure_http: true}\n"
        b"cache: {token_entries: 10}\npolicies:\n  - {name: p, match: {path_prefix: /a, methods: [GET]},\n"
        b"     require: {scopes_all: [read], sender_constraint: dpop}}\n"
        b"rate_limits: {default: {per_second: 1, burst: 2}, roles: {admin: {per_second: 5, burst: 5}}}\n"
        b"dpop: {algorithms: [ES256], iat_past_seconds: 60}\n"
    )
    request = (
        b"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nX-Forwarded-Uri: /a?b\r\nX-Forwarded-Method: POST\r\n"
        b"Authorization: Bearer eyJhbGciOiJFUzI1NiJ9.e30.c2ln\r\nDPoP: a.b.c\r\n\r\n"
    )
    assertion = base64.urlsafe_b64encode(
        json.dumps(
            {
                "id": "AA",
                "rawId": "AA",
                "type": "public-key",
                "response": {"clientDataJSON": "e30", "authenticatorData": "AA", "signature": "AA"},
            }
        ).encode()
    ).rstrip(b"=")
    introspection_answer = json.dumps(
        {
            "active": True,
            "iss": INTROSPECTION_ISSUER,
            "aud": [INTROSPECTION_AUDIENCE],
            "sub": "u",
            "client_id": "c",
            "scope": "read write",
            "exp": NOW + 300,
            "iat": NOW,
            "nbf": NOW,
            "token_type": "DPoP",
            "cnf": {"jkt": "abc"},
            "token_use": "access_token",
            "roles": ["admin"],
        }
    ).encode()

    def framed(status: bytes, headers: bytes, body: bytes) -> bytes:
        return b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n" + headers + b"\r\n" + body

    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(introspection_answer), introspection_answer)
    ssf_seeds: list[bytes] = []
    if name == "ssf":
        caep = "https://schemas.openid.net/secevent/caep/event-type/"
        risc = "https://schemas.openid.net/secevent/risc/event-type/"
        subject = {"format": "iss_sub", "iss": ISSUER, "sub": "u"}
        events = [
            {caep + "session-revoked": {"event_timestamp": NOW, "subject": {"format": "opaque", "id": "s"}}},
            {
                caep + "credential-change": {
                    "change_type": "revoke",
                    "credential_type": "fido2-roaming",
                    "fido2_aaguid": "00000000-0000-0000-0000-000000000000",
                }
            },
            {caep + "assurance-level-change": {"current_level": "nist-aal1", "reason_admin": {"en": "r"}}},
            {caep + "token-claims-change": {"claims": {"role": "ro", "sub": "x"}}},
            {risc + "account-disabled": {}, risc + "account-enabled": {"event_timestamp": NOW + 1}},
            {risc + "account-purged": {"subject": {"format": "email", "email": "a@b.test"}}},
        ]
        ssf_seeds = [b"\x02\x00" + json.dumps({"sub_id": subject, "events": e}).encode() for e in events]
        ssf_seeds.append(
            b"\x02\x00"
            + json.dumps(
                {
                    "events": events[1],
                    "sub_id": {"format": "complex", "user": subject, "session": {"format": "opaque", "id": "s"}},
                }
            ).encode()
        )
        ssf_seeds.append(
            b"\x03\x00"
            + json.dumps(
                {
                    "iss": "https://ssf.fuzz.test",
                    "aud": "https://verifier.fuzz.test/ssf",
                    "iat": NOW,
                    "jti": "j",
                    "sub_id": subject,
                    "events": events[4],
                }
            ).encode()
        )
        ssf_seeds.append(
            b"\x01\x00"
            + json.dumps({"alg": "none", "typ": "secevent+jwt"}).encode()
            + b"|"
            + json.dumps({"iss": "https://ssf.fuzz.test", "events": events[4]}).encode()
            + b"|"
        )
        ssf_seeds.append(b"\x00\x00eyJhbGciOiJFUzI1NiJ9.e30.c2ln")
    registration_seeds: list[bytes] = []
    if name == "webauthn_registration":
        registration_seeds = _registration_seeds()
    if name == "grpc":
        from envoy.service.auth.v3 import attribute_context_pb2 as ac
        from envoy.service.auth.v3 import external_auth_pb2 as ea

        http = ac.AttributeContext.HttpRequest(method="GET", path="/a", host="h", headers={"authorization": "Bearer x"})
        message = ea.CheckRequest(attributes=ac.AttributeContext(request=ac.AttributeContext.Request(http=http)))
        return [message.SerializeToString()]
    if name == "envoy_key":
        return _envoy_key_seeds()
    if name == "http_head":
        from doors.test_http_head import GATEWAY_REQUESTS, NEAR_MISSES

        return [*GATEWAY_REQUESTS, *NEAR_MISSES.values()]
    return {
        "credentials": [b"Bearer abc.def.ghi", b"DPoP eyJ.e30.c2ln", b"Basic dTpw"],
        "jws": [token, b"\x00eyJhbGciOiJFUzI1NiJ9.e30.c2ln"],
        "jwk": [
            json.dumps(jwk).encode(),
            b'{"kty":"RSA","n":"AQAB","e":"AQAB"}',
            b'{"kty":"OKP","crv":"Ed25519","x":"AA"}',
        ],
        "dpop": [b"\x01" + proof_header + b"|" + proof_claims + b"|" + b"s" * 64],
        "webauthn": [assertion],
        "token": [token + b"\n\x01" + proof_header + b"|" + proof_claims + b"|sig"],
        "forward_auth": [request, request * 3, b"GET /healthz HTTP/1.1\r\n\r\n"],
        "settings": [config],
        "introspection": [
            b"\x01" + introspection_answer,
            b"\x00" + framed(b"200 OK", b"Content-Length: %d\r\n" % len(introspection_answer), introspection_answer),
            b"\x00" + framed(b"200 OK", b"Transfer-Encoding: chunked\r\n", chunked),
            b"\x00"
            + b"HTTP/1.1 100 Continue\r\n\r\n"
            + framed(b"200 OK", b"Connection: close\r\n", b'{"active":false}'),
            b"\x00" + framed(b"503 Service Unavailable", b"Content-Length: 9\r\n", b"<html>WAF"),
        ],
        "ssf": ssf_seeds,
        "webauthn_registration": registration_seeds,
        "logout": [
            b"\x02\x00" + json.dumps({"sid": "s", "sub": "u"}).encode(),
            b"\x02\x00" + json.dumps({"sid": None, "sub": "u", "aud": [LOGOUT_CLIENT, "x"]}).encode(),
            b"\x02\x00" + json.dumps({"sid": "s", "exp": None}).encode(),
            b"\x03\x00"
            + json.dumps(
                {
                    "iss": ISSUER,
                    "aud": LOGOUT_CLIENT,
                    "iat": NOW,
                    "jti": "j",
                    "sid": "s",
                    "events": {"http://schemas.openid.net/event/backchannel-logout": {}},
                }
            ).encode(),
            b"\x01\x00" + json.dumps({"alg": "none"}).encode() + b"|{}|",
            b"\x00\x00logout_token=eyJhbGciOiJFUzI1NiJ9.e30.c2ln&state=x",
        ],
    }[name]
