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
    from verifier.v1 import verifier_pb2

    for message_type, translate in (
        (ea.CheckRequest, attributes_from_envoy),
        (verifier_pb2.CheckRequest, attributes_from_own),
    ):
        try:
            message = message_type.FromString(data)
        except DecodeError:
            continue
        _decide(translate(message))  # type: ignore[operator]


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


TARGETS: dict[str, Callable[[bytes], None]] = {
    "credentials": credentials_target,
    "jws": jws_target,
    "jwk": jwk_target,
    "dpop": dpop_target,
    "webauthn": webauthn_target,
    "token": token_target,
    "forward_auth": forward_auth_target,
    "grpc": grpc_target,
    "settings": settings_target,
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
    if name == "grpc":
        from envoy.service.auth.v3 import attribute_context_pb2 as ac
        from envoy.service.auth.v3 import external_auth_pb2 as ea

        http = ac.AttributeContext.HttpRequest(method="GET", path="/a", host="h", headers={"authorization": "Bearer x"})
        message = ea.CheckRequest(attributes=ac.AttributeContext(request=ac.AttributeContext.Request(http=http)))
        return [message.SerializeToString()]
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
    }[name]
