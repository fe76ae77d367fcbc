"""Hostile input: property tests for every parser we own, and the atheris fuzz targets run briefly.

Invariants, for any input:
- a parser raises only its own error type (never a library's, never a bare ValueError/TypeError);
- `Pipeline.decide` never raises, never answers `internal_error`, and never allows a random token;
- the forward-auth door answers random bytes with a well-formed HTTP status or closes, and never hangs;
- the gRPC doors answer random `CheckRequest`s (ours and Envoy's, incl. `header_map` and the client
  certificate) with a refusal, and random bytes with a gRPC error, and keep SERVING;
- `parse_settings` lets only `ConfigError` escape.

Example counts are tuned so this file runs in well under a minute; `HYPOTHESIS_PROFILE=long` (see
tests/fuzz/README.md) multiplies them by 50 for a nightly run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as ea
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import FrozenClock
from tokenkit import (
    AUDIENCE,
    DISCOVERY_URL,
    ISSUER,
    JWKS_URL,
    KIDS,
    NOW,
    FakeFetcher,
    b64,
    discovery_document,
    issuer_settings,
)

from verifier import credentials
from verifier.app import App
from verifier.binding.dpop import DpopVerifier
from verifier.config.dpop import DpopConfig
from verifier.credentials import Credential
from verifier.doors.forward_auth import FORWARDED_FAMILIES, attributes_from_http
from verifier.doors.grpc import attributes_from_envoy, attributes_from_own, cert_thumbprint
from verifier.errors import AlgorithmRefused, MalformedToken, VerifierError
from verifier.request import RequestAttributes, Undescribed
from verifier.settings import ConfigError, Settings, parse_settings
from verifier.state.memory import MemoryState
from verifier.tokens import jws
from verifier.tokens.keys import KeyError_, parse_jwk
from verifier.v1 import verifier_pb2

ROOT = Path(__file__).resolve().parent.parent
SCALE = 50 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 1
FAST = {"deadline": None, "suppress_health_check": list(HealthCheck), "derandomize": SCALE == 1}


def examples(n: int) -> Any:
    """Hypothesis settings with `n` examples (x50 in the long profile)."""
    return settings(max_examples=n * SCALE, **FAST)  # type: ignore[arg-type]


# -- strategies ----------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ALGS = ["ES256", "ES384", "ES512", "RS256", "PS256", "EdDSA", "HS256", "none", "NONE", "", "RSA-OAEP"]
header_values = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(ALGS) | json_values,
        "kid": st.sampled_from([*KIDS.values(), "", "x" * 300]) | json_values,
        "typ": st.sampled_from(["at+jwt", "JWT", "dpop+jwt"]) | json_values,
        "jku": st.just("https://evil.example.test/jwks"),
        "jwk": json_values,
        "crit": json_values,
        "b64": st.booleans(),
    },
)
payload_values = st.fixed_dictionaries(
    {},
    optional={
        "iss": st.sampled_from([ISSUER, ISSUER + "/", "https://evil.example.test"]) | json_values,
        "aud": st.sampled_from([AUDIENCE, [AUDIENCE]]) | json_values,
        "sub": st.text(max_size=10) | json_values,
        "exp": st.sampled_from([int(NOW) + 300, math.nan, math.inf, 1e308, -1]) | json_values,
        "iat": json_values,
        "nbf": json_values,
        "scope": json_values,
        "cnf": json_values,
    },
)


def _segment(value: Any) -> str:
    return b64(json.dumps(value).encode())


# A compact JWS from random parts, or random text: the first kind gets past the cheap checks.
random_jws = (
    st.builds(
        lambda h, p, s: f"{_segment(h)}.{_segment(p)}.{b64(s)}",
        header_values,
        payload_values,
        st.binary(min_size=0, max_size=300),
    )
    | st.builds(lambda h, p, s: f"{h}.{p}.{s}", st.text(max_size=40), st.text(max_size=40), st.text(max_size=40))
    | st.text(max_size=200)
    | st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/~", max_size=300)
)
header_text = st.text(max_size=60) | st.sampled_from(["", " ", "\t", "\r\n", "\x00", "\u2028", "\udcff"])
authorization = (
    st.builds(
        lambda scheme, sep, token: f"{scheme}{sep}{token}",
        st.sampled_from(["Bearer", "bearer", "BEARER", "DPoP", "dpop", "Basic", "", "Bearer,"]) | st.text(max_size=8),
        st.sampled_from([" ", "  ", "\t", "", " \t "]),
        random_jws,
    )
    | header_text
)
header_names = st.sampled_from(
    [
        "authorization",
        "dpop",
        "host",
        "x-forwarded-uri",
        "x-original-uri",
        "x-forwarded-method",
        "x-original-method",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-for",
        "x-forwarded-port",
        "x-original-host",
        "x-original-proto",
        "x-authenticated-userid",
        "x-client-cert-thumbprint",
        "x-webauthn-assertion",
    ]
) | st.text(max_size=12)
header_maps = st.dictionaries(header_names, header_text | authorization, max_size=8)


# -- an in-process pipeline over the fake provider ---------------------------------------------------


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


@pytest.fixture(scope="module")
def app(loop: asyncio.AbstractEventLoop, jwks_module: dict[str, Any]) -> App:
    fetcher = FakeFetcher()
    fetcher.serve(DISCOVERY_URL, discovery_document())
    fetcher.serve(JWKS_URL, jwks_module)
    settings_ = Settings(grpc=None, http=None, metrics=None, issuers=(issuer_settings(),), audit=False)
    application = App(settings_, fetcher=fetcher, clock=FrozenClock(NOW))
    issuer_keys = application.keys.get(ISSUER)
    assert issuer_keys is not None
    loop.run_until_complete(issuer_keys.refresh())
    return application


@pytest.fixture(scope="module")
def jwks_module() -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from tokenkit import public_jwk

    return {
        "keys": [
            public_jwk(ec.generate_private_key(ec.SECP256R1()), KIDS["ES256"]),
            public_jwk(rsa.generate_private_key(public_exponent=65537, key_size=2048), KIDS["RS256"]),
            public_jwk(ed25519.Ed25519PrivateKey.generate(), KIDS["EdDSA"]),
            public_jwk(ec.generate_private_key(ec.SECP384R1()), KIDS["ES384"]),
        ]
    }


def decide(app: App, loop: asyncio.AbstractEventLoop, attrs: RequestAttributes) -> None:
    """Runs the pipeline on hostile attributes and checks the invariants."""
    decision = loop.run_until_complete(asyncio.wait_for(app.pipeline.decide(attrs, "fuzz"), 5))
    assert not decision.allowed, (attrs, decision)
    assert decision.status in (400, 401, 403, 503), decision
    assert decision.reason != "internal_error", attrs
    cached = app.pipeline.decide_cached(attrs)  # the synchronous path on the same input
    assert cached is None or not cached.allowed


# -- parsers ------------------------------------------------------------------------------------------


@examples(400)
@given(value=authorization)
def test_credentials_extract_raises_only_missing_or_malformed(value: str) -> None:
    attrs = RequestAttributes(method="GET", scheme="https", host="h", path="/", headers={"authorization": value})
    try:
        credential = credentials.extract(attrs)
    except VerifierError as exc:
        assert exc.code in ("token_missing", "invalid_request"), exc.code
        return
    assert isinstance(credential, Credential)
    assert credential.token and credential.token == credential.token.strip()
    assert credential.token.isascii() and " " not in credential.token


@examples(400)
@given(token=random_jws)
def test_jws_parse_raises_only_malformed_or_refused(token: str) -> None:
    try:
        parsed = jws.parse(token, max_bytes=8192)
    except (MalformedToken, AlgorithmRefused):
        return
    assert isinstance(parsed.alg, str) and parsed.alg.lower() != "none"
    assert not {"jku", "x5u", "jwk", "crit"} & set(parsed.header)
    assert parsed.signature


@examples(250)
@given(
    jwk=st.fixed_dictionaries(
        {},
        optional={
            "kty": st.sampled_from(["RSA", "EC", "OKP", "oct", ""]) | json_values,
            "crv": st.sampled_from(["P-256", "P-384", "P-521", "Ed25519", "Ed448", "X25519", "secp256k1"])
            | json_values,
            "x": st.sampled_from(["", "AA", "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU"]) | json_values,
            "y": st.sampled_from(["", "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"]) | json_values,
            "n": st.sampled_from(["", "AQAB", "A" * 400]) | json_values,
            "e": st.sampled_from(["AQAB", "", "AA", "Aw"]) | json_values,
            "alg": st.sampled_from(ALGS) | json_values,
            "use": st.sampled_from(["sig", "enc"]) | json_values,
            "key_ops": json_values,
            "kid": json_values,
            "d": json_values,
        },
    )
    | st.dictionaries(st.text(max_size=6), json_values, max_size=6)
)
def test_parse_jwk_raises_only_key_error(jwk: dict[str, Any]) -> None:
    try:
        key = parse_jwk(jwk)
    except KeyError_:
        return
    assert key.kty in ("RSA", "EC", "OKP")
    assert "d" not in jwk


def test_parse_jwk_deeply_nested_member_is_a_key_error() -> None:
    nested: list[object] = []
    for _ in range(sys.getrecursionlimit() + 10):  # built iteratively: deeper than json can re-encode
        nested = [nested]
    with pytest.raises(KeyError_):
        parse_jwk({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "z": nested})


@examples(300)
@given(proof=random_jws | st.none(), method=st.sampled_from(["GET", "POST", ""]) | st.text(max_size=5))
def test_dpop_verify_random_proofs_raise_only_verifier_errors(
    proof: str | None, method: str, loop: asyncio.AbstractEventLoop
) -> None:
    clock = FrozenClock(NOW)
    verifier = DpopVerifier(DpopConfig(), MemoryState(clock), clock)
    with pytest.raises(VerifierError):
        loop.run_until_complete(
            verifier.verify(proof, method=method, url="https://api.example.test/x", access_token="t", expected_jkt=None)
        )


@examples(200)
@given(
    header=header_values.map(lambda h: {**h, "typ": "dpop+jwt", "alg": h.get("alg", "ES256")}),
    claims_=payload_values,
    signature=st.binary(min_size=1, max_size=200),
)
def test_dpop_verify_structured_random_proofs_never_pass(
    header: dict[str, Any], claims_: dict[str, Any], signature: bytes, loop: asyncio.AbstractEventLoop
) -> None:
    clock = FrozenClock(NOW)
    verifier = DpopVerifier(DpopConfig(), MemoryState(clock), clock)
    proof = f"{_segment(header)}.{_segment(claims_)}.{b64(signature)}"
    with pytest.raises(VerifierError):
        loop.run_until_complete(
            verifier.verify(proof, method="GET", url="https://a.test/x", access_token="t", expected_jkt=None)
        )


@examples(300)
@given(header=st.text(max_size=300) | st.builds(lambda v: b64(json.dumps(v).encode()), json_values))
def test_webauthn_assertion_header_raises_only_assertion_refused(header: str) -> None:
    assertion = pytest.importorskip("verifier.webauthn.assertion")
    errors = pytest.importorskip("verifier.webauthn.errors")
    with contextlib.suppress(errors.AssertionRefused):
        assertion.parse_assertion(header)


@examples(300)
@given(
    method=st.text(max_size=8),
    target=st.binary(max_size=60).map(lambda b: b"/v1/forward-auth" + b) | st.binary(max_size=60),
    headers=header_maps,
    family=st.sampled_from(sorted(FORWARDED_FAMILIES)),
    thumbprint_header=st.sampled_from(["", "x-client-cert-thumbprint"]),
)
def test_attributes_from_http_never_raises_but_on_an_untold_path_and_pipeline_never_allows(
    method: str,
    target: bytes,
    headers: dict[str, str],
    family: str,
    thumbprint_header: str,
    app: App,
    loop: asyncio.AbstractEventLoop,
) -> None:
    declared = FORWARDED_FAMILIES[family]
    try:
        attrs = attributes_from_http(method, target, headers, "127.0.0.1", declared, thumbprint_header)
    except Undescribed:  # refused by the door (400): neither the family nor the target tells the path
        assert target == b"/v1/forward-auth" and not headers.get(declared.path)
        return
    assert attrs.path.startswith("/") or headers.get(declared.path)
    assert attrs.host == attrs.host.lower()
    decide(app, loop, attrs)


# -- gRPC request attributes -----------------------------------------------------------------------


def _pb(text: str) -> str:
    """Protobuf strings are UTF-8: lone surrogates cannot be sent, so they become U+FFFD."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _pb_map(headers: dict[str, str]) -> dict[str, str]:
    return {_pb(k): _pb(v) for k, v in headers.items()}


pem_like = st.builds(
    lambda body, quote: (
        "-----BEGIN%20CERTIFICATE-----%0A"
        + (body if quote else body.replace("\n", "%0A"))
        + "%0A-----END%20CERTIFICATE-----"
    ),
    st.text(max_size=200),
    st.booleans(),
) | st.text(max_size=200)
envoy_requests = st.builds(
    lambda method, path, host, scheme, headers, raw, cert, address: ea.CheckRequest(
        attributes=ac.AttributeContext(
            source=ac.AttributeContext.Peer(
                address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=_pb(address))),
                certificate=_pb(cert),
            ),
            request=ac.AttributeContext.Request(
                http=ac.AttributeContext.HttpRequest(
                    method=_pb(method),
                    path=_pb(path),
                    host=_pb(host),
                    scheme=_pb(scheme),
                    headers=_pb_map(headers),
                    header_map=base_pb2.HeaderMap(
                        headers=[base_pb2.HeaderValue(key=_pb(k), raw_value=v) for k, v in raw]
                    ),
                )
            ),
        )
    ),
    st.text(max_size=8),
    st.text(max_size=30),
    st.text(max_size=20),
    st.text(max_size=6),
    header_maps,
    st.lists(
        st.tuples(
            header_names,
            st.binary(max_size=80) | authorization.map(lambda a: a.encode("utf-8", "surrogatepass")).filter(bool),
        ),
        max_size=6,
    ),
    pem_like,
    st.text(max_size=20),
)
own_requests = st.builds(
    lambda method, path, host, headers, thumb: verifier_pb2.CheckRequest(
        method=_pb(method), path=_pb(path), host=_pb(host), headers=_pb_map(headers), client_cert_thumbprint=_pb(thumb)
    ),
    st.text(max_size=8),
    st.text(max_size=30),
    st.text(max_size=20),
    st.dictionaries(header_names | st.sampled_from(["Authorization", "DPoP"]), header_text | authorization, max_size=6),
    st.text(max_size=50),
)


def translated_or_untold(translate: Any, message: Any, path: str) -> RequestAttributes | None:
    """The gRPC door's translation of `message`, or None when its path is empty: the one refusal it raises (the
    door answers 400 `invalid_request`; judged as `/`, a public `/` let every path through)."""
    if path:
        return translate(message)  # type: ignore[no-any-return]
    with pytest.raises(Undescribed):
        translate(message)
    return None


@examples(200)
@given(request=envoy_requests)
def test_envoy_attributes_never_raise_but_on_no_path_and_pipeline_never_allows(
    request: ea.CheckRequest, app: App, loop: asyncio.AbstractEventLoop
) -> None:
    attrs = translated_or_untold(attributes_from_envoy, request, request.attributes.request.http.path)
    if attrs is not None:
        decide(app, loop, attrs)


@examples(200)
@given(request=own_requests)
def test_own_attributes_never_raise_but_on_no_path_and_pipeline_never_allows(
    request: verifier_pb2.CheckRequest, app: App, loop: asyncio.AbstractEventLoop
) -> None:
    attrs = translated_or_untold(attributes_from_own, request, request.path)
    if attrs is not None:
        decide(app, loop, attrs)


@examples(300)
@given(data=st.binary(max_size=400))
def test_random_protobuf_bytes_parse_or_fail_cleanly(data: bytes, app: App, loop: asyncio.AbstractEventLoop) -> None:
    from google.protobuf.message import DecodeError

    for message_type, translate, path in (
        (ea.CheckRequest, attributes_from_envoy, lambda m: m.attributes.request.http.path),
        (verifier_pb2.CheckRequest, attributes_from_own, lambda m: m.path),
    ):
        try:
            message = message_type.FromString(data)
        except DecodeError:
            continue
        attrs = translated_or_untold(translate, message, path(message))
        if attrs is not None:
            decide(app, loop, attrs)


@examples(300)
@given(value=pem_like | st.text(max_size=300))
def test_cert_thumbprint_never_raises(value: str) -> None:
    thumb = cert_thumbprint(value)
    assert thumb == "" or len(thumb) == 43


# -- random tokens through the whole pipeline ------------------------------------------------------


@examples(300)
@given(token=random_jws, scheme=st.sampled_from(["Bearer", "DPoP"]), dpop=st.none() | random_jws)
def test_random_tokens_are_never_allowed(
    token: str, scheme: str, dpop: str | None, app: App, loop: asyncio.AbstractEventLoop
) -> None:
    headers = {"authorization": f"{scheme} {token}"}
    if dpop is not None:
        headers["dpop"] = dpop
    decide(app, loop, RequestAttributes(method="GET", scheme="https", host="api", path="/x", headers=headers))


# -- settings -----------------------------------------------------------------------------------------

SETTINGS_KEYS = [
    "grpc",
    "http",
    "metrics",
    "listen",
    "issuers",
    "issuer",
    "audiences",
    "algorithms",
    "cache",
    "token_entries",
    "max_token_bytes",
    "realm",
    "audit",
    "policies",
    "match",
    "require",
    "path_prefix",
    "rate_limits",
    "default",
    "roles",
    "per_second",
    "burst",
    "dpop",
    "state",
    "leeway_seconds",
    "jwks_uri",
    "fetch_timeout_seconds",
    "jwks_cooldown_seconds",
    "introspection",
    "client_id",
    "role",
    "claim",
    "values",
]
yamlish = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(
        ["127.0.0.1:8080", "http://127.0.0.1:9400", "https://[::1", "ES256", "1:²", "[::1]:80", "http://[a]/"]
    ),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(SETTINGS_KEYS) | st.integers(0, 3), inner, max_size=5)
    ),
    max_leaves=20,
)
VALID = {
    "http": {"listen": "127.0.0.1:8080"},
    "issuers": [
        {"issuer": "http://127.0.0.1:9400", "audiences": ["a"], "algorithms": ["ES256"], "allow_insecure_http": True}
    ],
}


def _mutate(document: Any, path: list[int], value: Any) -> Any:
    """Replaces (or adds) one member somewhere inside `document`, chosen by `path`."""
    if not path:
        return value
    if isinstance(document, dict) and document:
        keys = sorted(document, key=str)
        key = keys[path[0] % len(keys)]
        return {**document, key: _mutate(document[key], path[1:], value)}
    if isinstance(document, list) and document:
        i = path[0] % len(document)
        return [*document[:i], _mutate(document[i], path[1:], value), *document[i + 1 :]]
    return value


def _only_config_error(data: Any) -> None:
    with contextlib.suppress(ConfigError):
        parse_settings(data)


@examples(150)
@given(data=yamlish)
def test_parse_settings_random_structures_raise_only_config_error(data: Any) -> None:
    _only_config_error(data)


@examples(200)
@given(path=st.lists(st.integers(0, 5), max_size=4), value=yamlish, extra=st.sampled_from([None, *SETTINGS_KEYS]))
def test_parse_settings_mutated_valid_config_raises_only_config_error(path: list[int], value: Any, extra: Any) -> None:
    document = _mutate(VALID, path, value)
    if extra is not None and isinstance(document, dict):
        document = {**document, extra: value}
    _only_config_error(document)


@examples(100)
@given(text=st.text(max_size=200) | yamlish.map(lambda d: yaml.safe_dump(d)))
def test_load_settings_random_text_raises_only_config_error(
    text: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from verifier.settings import load_settings

    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with contextlib.suppress(yaml.YAMLError):
        yaml.safe_load(text)  # the YAML library itself must not crash either
    with contextlib.suppress(ConfigError):
        load_settings(path)


def _walk(data: Any) -> Iterator[Any]:
    yield data
    if isinstance(data, dict):
        for key, value in data.items():
            yield key
            yield from _walk(value)
    elif isinstance(data, list):
        for item in data:
            yield from _walk(item)


def _has_non_string_key(data: Any) -> bool:
    return any(isinstance(d, dict) and any(not isinstance(k, str) for k in d) for d in _walk(data))


def _has_non_finite(data: Any) -> bool:
    return any(isinstance(d, float) and not math.isfinite(d) for d in _walk(data))


def _has_any(data: Any, needles: tuple[str, ...]) -> bool:
    return any(isinstance(d, str) and any(n in d for n in needles) for d in _walk(data))


SETTINGS_BUGS = [
    pytest.param(
        {**VALID, "http": {"listen": "127.0.0.1:²"}},
        id="superscript-port",
    ),
    pytest.param(
        {**VALID, "issuers": [{**VALID["issuers"][0], "issuer": "http://[::1"}]},  # type: ignore[dict-item]
        id="unclosed-ipv6-issuer",
    ),
    pytest.param(
        {**VALID, "issuers": [{**VALID["issuers"][0], "issuer": "http://[a]/"}]},  # type: ignore[dict-item]
        id="bracketed-non-ip-issuer",
    ),
    pytest.param(
        {**VALID, "rate_limits": {"roles": {5: {"per_second": 1, "burst": 1}}}},
        id="integer-role-name",
    ),
    pytest.param(
        {**VALID, 7: 1, "zz": 2},
        id="mixed-type-unknown-keys",
    ),
]


@pytest.mark.parametrize("data", SETTINGS_BUGS)
def test_parse_settings_yaml_edge_cases_raise_config_error(data: Any) -> None:
    with pytest.raises(ConfigError):
        parse_settings(data)


@pytest.mark.parametrize("key", ["fetch_timeout_seconds", "jwks_cooldown_seconds"])
def test_parse_settings_refuses_nan_numbers(key: str) -> None:
    issuer = {**VALID["issuers"][0], key: float("nan")}  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=key):
        parse_settings({**VALID, "issuers": [issuer]})


# -- the real doors over sockets ----------------------------------------------------------------------


class ServerThread:
    """The verifier (with the dev issuer) on its own event loop in a thread, for synchronous tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ports: tuple[int, int] = (0, 0)
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced by start()
            self.error = exc
            self._ready.set()

    async def _serve(self) -> None:
        from doorkit import running_verifier

        self._stop = asyncio.Event()
        async with running_verifier() as (app, _idp):
            assert app.ports.http is not None and app.ports.grpc is not None
            self.ports = (app.ports.http, app.ports.grpc)
            await asyncio.wait_for(app.keys.wait_ready(), 10)
            # SERVING is set by a task right after the keys arrive: wait for the gRPC health to say so
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest(service="")
                while (await health.Check(request, timeout=30)).status != health_pb2.HealthCheckResponse.SERVING:
                    await asyncio.sleep(0.05)
            self._ready.set()
            await self._stop.wait()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(30), "verifier did not start"
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    thread = ServerThread()
    thread.start()
    yield thread
    thread.stop()


STATUS_LINE = b"HTTP/1.1 "


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Sends `data`, half-closes, and reads until the server closes; raises on a hang."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before it read everything: allowed
        chunks = []
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, f"server hung on {data[:80]!r}"
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"server hung on {data[:80]!r}") from None
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def check_answers(answer: bytes) -> None:
    """Every answer on the connection is a well-formed HTTP/1.1 response that allows nothing."""
    rest = answer
    while rest:
        assert rest.startswith(STATUS_LINE), rest[:100]
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, head[:100]
        status = int(head[9:12])
        assert 200 <= status <= 599
        lines = head.split(b"\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        assert b"x-authenticated-userid" not in fields, head
        if status == 200:
            assert fields.get(b"x-verifier-reason") is None, head  # only /healthz, /livez, /readyz
        length = int(fields.get(b"content-length", b"0"))
        rest = rest[length:]


http_requests = st.builds(
    lambda method, target, version, headers, body, tail: (
        method
        + b" "
        + target
        + b" "
        + version
        + b"\r\n"
        + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
        + b"\r\n"
        + body
        + tail
    ),
    st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"PRI", b"G\x00T"]) | st.binary(max_size=6),
    st.sampled_from([b"/v1/forward-auth", b"/v1/forward-auth/x?y", b"/healthz", b"*", b"/"]).flatmap(
        lambda t: st.binary(max_size=20).map(lambda b: t + b)
    ),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1\r\nHTTP/1.1", b""]),
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    b"Authorization",
                    b"Content-Length",
                    b"Transfer-Encoding",
                    b"Connection",
                    b"Upgrade",
                    b"X-Forwarded-Uri",
                    b"Host",
                    b"DPoP",
                    b"Expect",
                ]
            )
            | st.binary(max_size=10),
            st.sampled_from(
                [
                    b"Bearer eyJhbGciOiJFUzI1NiJ9.e30.c2ln",
                    b"chunked",
                    b"close",
                    b"-1",
                    b"99999999",
                    b"h2c",
                    b"100-continue",
                    b"5",
                ]
            )
            | st.binary(max_size=40),
        ),
        max_size=8,
    ),
    st.binary(max_size=64),
    st.sampled_from([b"", b"0\r\n\r\n", b"GET /healthz HTTP/1.1\r\n\r\n", b"\r\n\r\n"]),
)


@examples(250)
@given(data=http_requests | st.binary(max_size=512))
def test_forward_auth_door_answers_random_bytes_or_closes_never_hangs(data: bytes, server: ServerThread) -> None:
    check_answers(exchange(server.ports[0], data))


def test_forward_auth_door_survives_oversized_and_slow_inputs(server: ServerThread) -> None:
    port = server.ports[0]
    huge_header = b"GET /v1/forward-auth HTTP/1.1\r\nX-A: " + b"a" * 70_000 + b"\r\n\r\n"
    assert exchange(port, huge_header).startswith(b"HTTP/1.1 431")
    many = b"GET /v1/forward-auth HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n"
    assert exchange(port, many).startswith((b"HTTP/1.1 431", b"HTTP/1.1 400"))  # 431 intended: see below
    body = b"POST /v1/forward-auth HTTP/1.1\r\nContent-Length: 200000\r\n\r\n" + b"b" * 200_000
    assert exchange(port, body).startswith((b"HTTP/1.1 413", b"HTTP/1.1 400"))
    pipelined = b"GET /v1/forward-auth HTTP/1.1\r\nAuthorization: Bearer x.y.z\r\n\r\n" * 200
    answer = exchange(port, pipelined)
    check_answers(answer)
    assert answer.count(STATUS_LINE) == 200
    check_answers(exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n"))
    assert exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /v1/forward-auth HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n", b"431"),
        (b"POST /v1/forward-auth HTTP/1.1\r\nContent-Length: 200000\r\n\r\n" + b"b" * 200_000, b"413"),
    ],
    ids=["200-header-fields", "200kB-body"],
)
def test_forward_auth_door_answers_the_intended_size_statuses(
    request_bytes: bytes, status: bytes, server: ServerThread
) -> None:
    assert exchange(server.ports[0], request_bytes).startswith(b"HTTP/1.1 " + status)


def _grpc_call(channel: grpc.Channel, method: str, payload: bytes) -> tuple[grpc.StatusCode, bytes]:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        return grpc.StatusCode.OK, call(payload, timeout=5)
    except grpc.RpcError as exc:
        return exc.code(), b""  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.ports[1]}") as ch:
        yield ch


@examples(120)
@given(request=envoy_requests)
def test_envoy_door_refuses_random_check_requests(request: ea.CheckRequest, channel: grpc.Channel) -> None:
    code, answer = _grpc_call(channel, "/envoy.service.auth.v3.Authorization/Check", request.SerializeToString())
    http = request.attributes.request.http
    if http.headers and http.HasField("header_map"):  # both forms, even an empty header_map (Envoy sends one): refused
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        return
    assert code == grpc.StatusCode.OK
    response = ea.CheckResponse.FromString(answer)
    assert response.status.code != 0 and response.HasField("denied_response")
    if not http.path:  # nothing tells the path: refused as forward-auth refuses it, never judged as `/`
        assert response.denied_response.status.code == 400
        assert ("x-verifier-reason", "invalid_request") in [
            (h.header.key, h.header.value) for h in response.denied_response.headers
        ]


@examples(80)
@given(request=own_requests)
def test_own_door_refuses_random_check_requests(request: verifier_pb2.CheckRequest, channel: grpc.Channel) -> None:
    code, answer = _grpc_call(channel, "/verifier.v1.Verifier/Check", request.SerializeToString())
    assert code == grpc.StatusCode.OK
    response = verifier_pb2.CheckResponse.FromString(answer)
    assert not response.allowed and response.http_status in (400, 401, 403, 503)
    if not request.path:  # nothing tells the path: refused as forward-auth refuses it, never judged as `/`
        assert (response.http_status, response.reason) == (400, "invalid_request")


@examples(120)
@given(payload=st.binary(max_size=300), own=st.booleans())
def test_grpc_doors_answer_random_bytes_with_an_error_or_a_refusal(
    payload: bytes, own: bool, channel: grpc.Channel
) -> None:
    method = "/verifier.v1.Verifier/Check" if own else "/envoy.service.auth.v3.Authorization/Check"
    code, answer = _grpc_call(channel, method, payload)
    if code == grpc.StatusCode.OK:
        if own:
            assert not verifier_pb2.CheckResponse.FromString(answer).allowed
        else:
            assert ea.CheckResponse.FromString(answer).status.code != 0
    else:
        # grpc.aio reports a request that does not deserialize as UNKNOWN (the sync server says INTERNAL)
        assert code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNKNOWN), code


def test_doors_still_serving_after_the_hostile_input(server: ServerThread, channel: grpc.Channel) -> None:
    assert exchange(server.ports[0], b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


# -- the atheris targets, briefly ---------------------------------------------------------------------

# An iteration budget per target, not a time budget: the same work on a quiet or a loaded machine
# (a 20 s budget timed out when 9 targets start at once on 2 shared cores). 5,000 runs take about
# 20 s for the slowest target (`settings`, ~250 runs/s with all targets sharing 2 cores).
FUZZ_RUNS = int(os.environ.get("FUZZ_RUNS", "5000"))
FUZZ_TIMEOUT_SECONDS = 600  # generous: only a hang should reach it


def _atheris_missing() -> str | None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return "atheris is not installed (.ci/setup.d/45-fuzz.sh could not install it here)"
    return None


@pytest.mark.skipif(_atheris_missing() is not None, reason=str(_atheris_missing()))
@pytest.mark.timeout(FUZZ_TIMEOUT_SECONDS + 60)
def test_atheris_targets_run_clean(tmp_path: Path) -> None:
    """Every target for FUZZ_RUNS inputs, all at once (one process each): no crash, no allow."""
    artifacts = tmp_path
    from fuzz.targets import TARGETS

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    processes = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fuzz",
                name,
                f"-runs={FUZZ_RUNS}",
                "-rss_limit_mb=2048",
                "-print_final_stats=1",
                f"-artifact_prefix={artifacts}/",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for name in TARGETS
    }
    failures = []
    for name, process in processes.items():
        out, _ = process.communicate(timeout=FUZZ_TIMEOUT_SECONDS)
        text = out.decode(errors="replace")
        runs = [line for line in text.splitlines() if "stat::number_of_executed_units" in line]
        if process.returncode != 0 or not runs:
            failures.append(f"{name}: exit {process.returncode}\n{text[-3000:]}")
    assert not failures, "\n\n".join(failures)
