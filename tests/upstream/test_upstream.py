"""What the upstream receives (issue #20): mapped claims, the Kong consumer, the identity assertion.

Through the real pipeline and doors (the forward-auth HTTP answer, our gRPC Check, Envoy's ext_authz
answer), with an injected clock for the assertion's renewal; assertions are checked with PyJWT against
the JWKS the verifier serves at /.well-known/jwks.json.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from doorkit import http_exchange
from envoy.service.auth.v3 import external_auth_pb2 as ea
from support import FrozenClock
from tokenkit import AUDIENCE, ISSUER, NOW, FakeFetcher, claims

from verifier.app import App
from verifier.claimpath import find_claim
from verifier.config.base import ConfigError
from verifier.config.upstream import ConsumerMapping, HeaderMapping, UpstreamConfig
from verifier.doors.grpc import envoy_response, own_response
from verifier.principal import Principal
from verifier.request import RequestAttributes
from verifier.settings import Settings, parse_settings
from verifier.upstream import UpstreamAnswers, UpstreamIdentityTooLarge, wire_bytes, wire_chars
from verifier.upstream.assertion import IdentityAssertions
from verifier.upstream.claims import UpstreamClaimTooLarge, header_value
from verifier.v1 import verifier_pb2

ASSERTION_ISSUER = "https://verifier.internal"
ORDERS = "https://orders.internal"
BILLING = "https://billing.internal"


# ------------------------------------------------------------------------------------------------ helpers


def _pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, path: Path) -> str:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(path)


def _public_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, path: Path) -> str:
    path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return str(path)


def _document(upstream: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "http": {"listen": "127.0.0.1:0"},
        "issuers": [{"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["ES256"]}],
        "edge_cache": {"max_age_seconds": 10},
        **extra,
    }
    if upstream is not None:
        document["upstream"] = upstream
    return document


def _identity(key_file: str, **over: Any) -> dict[str, Any]:
    return {
        "issuer": ASSERTION_ISSUER,
        "algorithm": "ES256",
        "private_key_file": key_file,
        "audience": ORDERS,
        "lifetime_seconds": 60,
        "claims": ["sub", "scope", "roles", "email", "acr", "amr"],
        **over,
    }


def _attrs(token: str, path: str = "/", **headers: str) -> RequestAttributes:
    return RequestAttributes(
        method="GET",
        scheme="https",
        host="api.example.test",
        path=path,
        headers={"authorization": f"Bearer {token}", **headers},
    )


Started = Callable[[dict[str, Any]], Any]


@pytest.fixture
async def started(fetcher: FakeFetcher) -> AsyncIterator[Callable[[dict[str, Any]], Any]]:
    """`await started(document)`: a running App (frozen clock at NOW, the fake provider) from a YAML document."""
    apps: list[App] = []

    async def start(document: dict[str, Any]) -> App:
        app = App(parse_settings(document), clock=FrozenClock(NOW), fetcher=fetcher)
        await app.start()
        await asyncio.wait_for(app.keys.wait_ready(), 5)
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop(grace=0.1)


def _headers(decision: Any) -> dict[str, str]:
    return dict(decision.upstream_headers)


# ------------------------------------------------------------------------------------------ claim rendering


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice@example.test", "alice@example.test"),
        ("alice\r\nX-Authenticated-Userid: admin", "alice\ufffd\ufffdX-Authenticated-Userid: admin"),
        ("a\x00b\x7fc\td\x85", "a\ufffdb\ufffdc\ufffdd\ufffd"),
        ("admins\x00", "admins\ufffd"),
        (" boss@example.test", '" boss@example.test"'),
        ("boss@example.test\u00a0", '"boss@example.test\u00a0"'),
        ("\ufeffboss", '"\ufeffboss"'),
        ('"boss"', '"\\"boss\\""'),
        ('say "hi", bob', 'say "hi", bob'),
        (42, "42"),
        (1.5, "1.5"),
        (True, "true"),
        (False, "false"),
        (["a", "b\r\nc", 3, None], "a, b\ufffd\ufffdc, 3, null"),
        (["ops", "admins\u00a0", "\u3000x"], 'ops, "admins\u00a0", "\u3000x"'),
        (["eng, admins", '"ops"', " x", "a\\b"], '"eng, admins", "\\"ops\\"", " x", "a\\\\b"'),
        ({"tenant": "t1"}, None),
        (["a", ["nested"]], None),
        (["a", {"o": 1}], None),
        ([], None),
        ("", None),
        (None, None),
    ],
    ids=[
        "string",
        "crlf-injection",
        "controls",
        "control-at-the-end",
        "space-before",
        "nbsp-after",
        "bom-before",
        "quoted",
        "inner-quotes-and-comma",
        "int",
        "float",
        "true",
        "false",
        "array",
        "array-unicode-white-space",
        "array-elements-quoted",
        "object",
        "nested-array",
        "object-in-array",
        "empty-array",
        "empty-string",
        "null",
    ],
)
def test_a_claim_is_rendered_so_no_value_can_forge_a_header(value: object, expected: str | None) -> None:
    rendered = header_value(value, 4096, "claim")
    assert rendered == expected
    assert rendered is None or not any(c in rendered for c in "\r\n\x00")
    assert rendered is None or rendered == rendered.strip()  # no reader trims it into another value


def test_a_value_over_the_bound_is_refused_not_cut() -> None:
    with pytest.raises(UpstreamClaimTooLarge):
        header_value("x" * 4097, 4096, "claim")
    with pytest.raises(UpstreamClaimTooLarge):
        header_value("é" * 2049, 4096, "claim")  # 4098 bytes in UTF-8, 2049 characters
    with pytest.raises(UpstreamClaimTooLarge):
        header_value(["group"] * 1_000_000, 4096, "claim")  # stops at the bound, not after a million
    assert header_value("x" * 4096, 4096, "claim") == "x" * 4096


def test_a_claim_is_found_by_its_exact_name_before_a_dotted_path() -> None:
    found = {"org": {"tenant_id": "t-1", "deep": {"er": 7}}, "https://example.test/tenant": "ns", "org.x": "flat"}
    assert find_claim(found, "org.tenant_id") == "t-1"
    assert find_claim(found, "org.deep.er") == 7
    assert find_claim(found, "https://example.test/tenant") == "ns"
    assert find_claim(found, "org.x") == "flat"
    assert find_claim(found, "org.missing") is None
    assert find_claim(found, "org.tenant_id.more") is None


def test_a_deeply_nested_claim_is_looked_up_without_recursion() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(50_000):
        node["a"] = {}
        node = node["a"]
    assert header_value(find_claim({"c": deep}, "c"), 4096, "c") is None  # an object: no header, no recursion
    assert isinstance(find_claim({"c": deep}, "c." + ".".join(["a"] * 100)), dict)


# ------------------------------------------------------------------------------------------ configuration


def _problem(document: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_settings(document)
    return str(caught.value)


def test_mapped_header_names_must_stay_under_the_reserved_prefix(tmp_path: Path) -> None:
    assert "must start with X-Authenticated-" in _problem(_document({"headers": [{"header": "X-Email", "claim": "e"}]}))
    assert "own identity headers" in _problem(
        _document({"headers": [{"header": "X-Authenticated-Userid", "claim": "email"}]})
    )
    assert "not a header name" in _problem(_document({"headers": [{"header": "X-Authenticated-A B", "claim": "e"}]}))
    twice = [{"header": "X-Authenticated-E", "claim": "a"}, {"header": "x-authenticated-e", "claim": "b"}]
    assert "mapped twice" in _problem(_document({"headers": twice}))
    key = _pem(ec.generate_private_key(ec.SECP256R1()), tmp_path / "k.pem")
    clash = {"headers": [{"header": "X-Authenticated-Identity", "claim": "a"}], "identity_token": _identity(key)}
    assert "also a mapped header" in _problem(_document(clash))
    route = {"headers": [{"header": "X-Authenticated-Identity", "claim": "a"}]}
    policies = [{"match": {"path_prefix": "/"}, "upstream": route}]
    assert "carries the assertion" in _problem(_document({"identity_token": _identity(key)}, policies=policies))


def test_the_assertion_key_must_fit_its_algorithm_and_be_readable(tmp_path: Path) -> None:
    p384 = _pem(ec.generate_private_key(ec.SECP384R1()), tmp_path / "p384.pem")
    assert "does not fit ES256" in _problem(_document({"identity_token": _identity(p384)}))
    ed = _pem(ed25519.Ed25519PrivateKey.generate(), tmp_path / "ed.pem")
    assert "does not fit ES256" in _problem(_document({"identity_token": _identity(ed)}))
    p256 = _pem(ec.generate_private_key(ec.SECP256R1()), tmp_path / "p256.pem")
    assert "does not fit EdDSA" in _problem(_document({"identity_token": _identity(p256, algorithm="EdDSA")}))
    assert "expected one of ES256, EdDSA" in _problem(_document({"identity_token": _identity(p256, algorithm="RS256")}))
    assert "cannot read" in _problem(_document({"identity_token": _identity(str(tmp_path / "absent.pem"))}))
    (tmp_path / "junk.pem").write_text("not a key")
    assert "not an unencrypted PEM private key" in _problem(
        _document({"identity_token": _identity(str(tmp_path / "junk.pem"))})
    )
    assert "lifetime_seconds: 5 is outside" in _problem(
        _document({"identity_token": _identity(p256, lifetime_seconds=5)})
    )
    assert "lifetime_seconds: 7200 is outside" in _problem(
        _document({"identity_token": _identity(p256, lifetime_seconds=7200)})
    )
    assert "set by the verifier itself" in _problem(
        _document({"identity_token": _identity(p256, claims=["sub", "exp"])})
    )
    policies = [{"match": {"path_prefix": "/"}, "upstream": {"identity_token": {"audience": ORDERS}}}]
    assert "needs upstream.identity_token" in _problem(_document({}, policies=policies))
    parse_settings(_document({"identity_token": _identity(ed, algorithm="EdDSA")}))  # fits: no error


# ------------------------------------------------------------------------------- through the real pipeline


async def test_mapped_claims_reach_the_upstream_headers_of_every_door(started: Started, mint: Any) -> None:
    mapping = [
        {"header": "X-Authenticated-Email", "claim": "email"},
        {"header": "X-Authenticated-Tenant", "claim": "org.tenant_id"},
        {"header": "X-Authenticated-Groups", "claim": "groups"},
        {"header": "X-Authenticated-Level", "claim": "level"},
        {"header": "X-Authenticated-Absent", "claim": "nope"},
    ]
    app = await started(_document({"headers": mapping}))
    token = mint(claims(email="a@example.test\r\nX-Evil: 1", org={"tenant_id": "t-9"}, groups=["g1", "g2"], level=3))
    decision = await app.pipeline.decide(_attrs(token), "test")
    assert decision.allowed, decision.reason
    headers = _headers(decision)
    assert headers["x-authenticated-email"] == "a@example.test\ufffd\ufffdX-Evil: 1"
    assert headers["x-authenticated-tenant"] == "t-9"
    assert headers["x-authenticated-groups"] == "g1, g2"
    assert headers["x-authenticated-level"] == "3"
    assert "x-authenticated-absent" not in headers
    assert headers["x-authenticated-userid"] == "user-1"  # the fixed four stay
    head = decision.http_head.decode()
    assert "x-authenticated-tenant: t-9\r\n" in head and "\r\nX-Evil" not in head
    own = verifier_pb2.CheckResponse.FromString(own_response(decision))
    assert {h.name: h.value for h in own.upstream_headers}["x-authenticated-tenant"] == "t-9"
    envoy = ea.CheckResponse.FromString(envoy_response(decision))
    assert {h.header.key: h.header.value for h in envoy.ok_response.headers}["x-authenticated-groups"] == "g1, g2"


@pytest.mark.parametrize(
    ("field", "value", "header"),
    [
        ("scopes", ('"admin"',), '"\\"admin\\""'),
        ("scopes", (" admin",), '" admin"'),
        ("scopes", ("admin\u00a0",), '"admin\u00a0"'),
        ("scopes", ("read", "ad\x00min"), "read ad\ufffdmin"),
        ("scopes", ("read", "write"), "read write"),
        ("issuer", '"https://idp.example.test"', '"\\"https://idp.example.test\\""'),
        ("issuer", "https://idp.example.test ", '"https://idp.example.test "'),
        ("issuer", "\u3000https://idp.example.test", '"\u3000https://idp.example.test"'),
        (
            "issuer",
            "https://idp\r\nx-authenticated-userid: root",
            "https://idp\ufffd\ufffdx-authenticated-userid: root",
        ),
        ("issuer", "https://idp.example.test", "https://idp.example.test"),
    ],
    ids=[
        "scope-quoted",
        "scope-edge-space",
        "scope-edge-nbsp",
        "scope-control",
        "scope-plain",
        "issuer-quoted",
        "issuer-edge-space",
        "issuer-edge-ideographic",
        "issuer-crlf",
        "issuer-plain",
    ],
)
def test_the_scope_and_issuer_headers_are_written_like_the_userid(field: str, value: Any, header: str) -> None:
    """Every X-Authenticated-* value by one rule: controls replaced by U+FFFD, and a value a reader would take as
    another (an edge space a gateway drops, an NBSP an upstream trims, `"admin"` unquoted as `admin`) as an
    RFC 9110 quoted-string. The scope and issuer headers were only stripped of controls."""
    principal = Principal(
        issuer="https://idp.example.test",
        subject="alice",
        client_id=None,
        scopes=("read",),
        roles=frozenset(),
        expires_at=NOW + 60,
        claims={},
    )._replace(**{field: value})
    name = "x-authenticated-scope" if field == "scopes" else "x-authenticated-issuer"
    answer = UpstreamAnswers().answer(principal, UpstreamAnswers().default, 10, NOW)
    assert _headers(answer)[name] == header


async def test_a_token_scope_that_would_unquote_as_another_is_a_quoted_string(started: Started, mint: Any) -> None:
    """A token's `scope` of `"admin"` is not the scope `admin` here (a policy asking for `admin` refuses it), and
    must not read as `admin` upstream: sent bare, an upstream that unquotes the header got `admin`."""
    app = await started(_document())
    decision = await app.pipeline.decide(_attrs(mint(claims(scope='"admin" '))), "test")
    assert decision.allowed, decision.reason
    assert _headers(decision)["x-authenticated-scope"] == '"\\"admin\\""'
    assert 'x-authenticated-scope: "\\"admin\\""\r\n' in decision.http_head.decode()


@pytest.mark.parametrize(
    "claim", [{"email": "a\ud800b"}, {"sub": "user-\udc00"}, {"roles": ["r\ud800"]}], ids=["mapped", "sub", "roles"]
)
async def test_a_claim_holding_a_lone_surrogate_is_refused_and_answered_on_the_http_door(
    started: Started, mint: Any, claim: dict[str, Any]
) -> None:
    """A signed claim may hold an escaped lone surrogate (`"\\ud800"`, valid JSON): UTF-8 cannot carry it in a
    header. It was allowed, then its answer could not be written: the forward-auth door answered
    400 and closed the connection (the gateway's other requests on it lost), and a rate limit made it a 503."""
    app = await started(
        _document(
            {"headers": [{"header": "X-Authenticated-Email", "claim": "email"}]},
            rate_limits={"default": {"per_second": 1, "burst": 5}},
        )
    )
    bad, good = mint(claims(**claim)), mint(claims(email="ok@example.test"))
    decision = await app.pipeline.decide(_attrs(bad), "test")
    assert (decision.allowed, decision.status, decision.reason) == (False, 401, "token_malformed")
    request = (
        "GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nX-Forwarded-Method: GET\r\nX-Forwarded-Uri: /\r\n"
        "X-Forwarded-Host: api.example.test\r\nX-Forwarded-Proto: https\r\nAuthorization: Bearer {}\r\n\r\n"
    )
    raw = "".join(request.format(t) for t in (good, bad, good)).encode()
    answer = await http_exchange(
        app.ports.http, raw + b"GET /healthz HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\r\n", read_until_close=True
    )
    statuses = [line for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
    assert statuses[:3] == [b"HTTP/1.1 200 OK", b"HTTP/1.1 401 Unauthorized", b"HTTP/1.1 200 OK"], answer


async def test_the_header_tuples_are_built_once_per_admitted_token(started: Started, mint: Any) -> None:
    app = await started(_document({"headers": [{"header": "X-Authenticated-Email", "claim": "email"}]}))
    token = mint(claims(email="a@example.test"))
    first = await app.pipeline.decide(_attrs(token), "test")
    again = app.pipeline.decide_cached(_attrs(token), "test")
    assert again is first  # the cached record's answer: nothing rebuilt, nothing re-serialized


async def test_a_client_sent_copy_of_a_mapped_header_is_removed_when_the_claim_is_missing(
    started: Started, mint: Any
) -> None:
    app = await started(_document({"headers": [{"header": "X-Authenticated-Email", "claim": "email"}]}))
    attrs = _attrs(mint(claims()), **{"x-authenticated-email": "boss@example.test"})
    decision = await app.pipeline.decide(attrs, "test")
    assert decision.allowed and "x-authenticated-email" not in _headers(decision)
    envoy = ea.CheckResponse.FromString(envoy_response(decision, attrs.headers))
    assert "x-authenticated-email" in envoy.ok_response.headers_to_remove


@pytest.mark.parametrize(
    "claim",
    [["g" * 30] * 130, "x" * 4097, {"a": "b"}],
    ids=["huge-array", "huge-string", "object"],
)
async def test_a_claim_too_large_for_a_header_refuses_with_403_and_an_object_sends_nothing(
    started: Started, mint: Any, claim: object
) -> None:
    app = await started(_document({"headers": [{"header": "X-Authenticated-Groups", "claim": "groups"}]}))
    decision = await app.pipeline.decide(_attrs(mint(claims(groups=claim))), "test")
    if isinstance(claim, dict):
        assert decision.allowed and "x-authenticated-groups" not in _headers(decision)
        return
    assert (decision.allowed, decision.status, decision.reason) == (False, 403, "upstream_claim_too_large")
    assert not decision.upstream_headers
    # the cached record answers the same, without rebuilding
    assert app.pipeline.decide_cached(_attrs(mint(claims(groups=claim))), "test") is decision


# ------------------------------------------------------------------------------------ the identity's total


def _principal(**claims_: Any) -> Principal:
    roles = claims_.get("roles", [])
    return Principal(ISSUER, "alice", "c", ("read",), frozenset(roles), NOW + 300, {"sub": "alice", **claims_})


def test_the_total_is_counted_as_the_head_sends_it() -> None:
    """`name: value\r\n` in UTF-8, as the forward-auth door writes it and the gateway's buffer holds it."""
    answers = UpstreamAnswers(UpstreamConfig(headers=_mappings("groups", "memberof"), consumer=None))
    decision = answers.answer(_principal(groups=["ops", "bücher", "日本"], roles=["admin"]), answers.default, 10, NOW)
    sent = b"".join(f"{n}: {v}\r\n".encode() for n, v in decision.upstream_headers)
    assert wire_bytes(decision.upstream_headers) == len(sent) and len(sent) > len(sent.decode())
    assert wire_bytes(()) == 0


def _mappings(*names: str) -> tuple[HeaderMapping, ...]:
    """The groups claim under each of `names`."""
    return tuple(HeaderMapping(header=f"x-authenticated-{name}", claim="groups") for name in names)


def test_an_identity_at_the_total_passes_and_one_byte_more_is_refused_not_cut() -> None:
    principal = _principal(groups=[f"grp-{i:04d}" for i in range(100)])
    config = UpstreamConfig(headers=_mappings("groups", "memberof"), max_total_bytes=262144)
    size = wire_bytes(
        UpstreamAnswers(config).answer(principal, UpstreamAnswers(config).default, 10, NOW).upstream_headers
    )
    assert 2048 < size < 4096
    exact = UpstreamAnswers(dataclasses.replace(config, max_total_bytes=size))
    assert exact.answer(principal, exact.default, 10, NOW).allowed
    under = UpstreamAnswers(dataclasses.replace(config, max_total_bytes=size - 1))
    with pytest.raises(UpstreamIdentityTooLarge) as refused:
        under.answer(principal, under.default, 10, NOW)
    assert refused.value.code == "upstream_identity_too_large" and isinstance(refused.value, UpstreamClaimTooLarge)


def test_the_total_is_in_utf8_bytes_not_characters() -> None:
    """Claims may hold any Unicode: an identity under the bound in characters but over it in bytes is refused."""
    principal = _principal(groups=["日本" * 50] * 3)  # 3 bytes a character
    config = UpstreamConfig(headers=_mappings("groups"), max_value_bytes=1024, max_total_bytes=1024)
    built = UpstreamAnswers(dataclasses.replace(config, max_total_bytes=4096)).answer(
        principal, UpstreamAnswers(config).default, 10, NOW
    )
    assert wire_chars(built.upstream_headers) <= 1024 < wire_bytes(built.upstream_headers)
    answers = UpstreamAnswers(config)
    with pytest.raises(UpstreamIdentityTooLarge):
        answers.answer(principal, answers.default, 10, NOW)


def test_the_fixed_four_count_even_with_no_upstream_section() -> None:
    """`X-Authenticated-Roles` has no per-value bound of its own: a user with many roles was past nginx's buffer."""
    answers = UpstreamAnswers()
    assert answers.plain
    assert answers.answer(_principal(roles=["admin", "ops"]), answers.default, 10, NOW).allowed
    many = _principal(roles=[f"role-{i:05d}-engineering" for i in range(400)])  # ~8.8 KiB joined
    with pytest.raises(UpstreamIdentityTooLarge):
        answers.answer(many, answers.default, 10, NOW)


def test_the_kong_consumer_counts_toward_the_total() -> None:
    principal = _principal(team="t" * 600)
    config = UpstreamConfig(consumer=ConsumerMapping(claim="team"), max_total_bytes=1024)
    assert (
        wire_bytes(
            UpstreamAnswers(UpstreamConfig()).answer(principal, UpstreamAnswers().default, 10, NOW).upstream_headers
        )
        < 1024 - 600
    )
    answers = UpstreamAnswers(dataclasses.replace(config, max_total_bytes=1024))
    with pytest.raises(UpstreamIdentityTooLarge):
        answers.answer(_principal(team="t" * 1000), answers.default, 10, NOW)
    assert answers.answer(principal, answers.default, 10, NOW).answer_headers


def test_max_total_bytes_is_validated_at_start_up_against_max_value_bytes() -> None:
    # A config from before the total's bound that raised only the value's starts as before: the total follows.
    raised = parse_settings(_document({"max_value_bytes": 16384})).upstream
    assert raised is not None and raised.max_total_bytes == 16384
    assert "less than max_value_bytes" in _problem(_document({"max_value_bytes": 4096, "max_total_bytes": 2048}))
    assert "upstream.max_total_bytes" in _problem(_document({"max_total_bytes": 512}))
    settings = parse_settings(_document({"max_value_bytes": 16384, "max_total_bytes": 16384}))
    assert settings.upstream is not None and settings.upstream.max_total_bytes == 16384
    assert parse_settings(_document({})).upstream.max_total_bytes == 8192  # type: ignore[union-attr]


async def test_an_identity_past_the_total_refuses_with_403_on_every_door_and_is_remembered(
    started: Started, mint: Any, tmp_path: Path
) -> None:
    """Every value under max_value_bytes; the groups twice and the assertion together past max_total_bytes."""
    key = _pem(ec.generate_private_key(ec.SECP256R1()), tmp_path / "k.pem")
    upstream = {
        "headers": [
            {"header": "X-Authenticated-Groups", "claim": "groups"},
            {"header": "X-Authenticated-Memberof", "claim": "groups"},
        ],
        "identity_token": _identity(key),
        "max_total_bytes": 4096,
    }
    app = await started(_document(upstream))
    groups = [f"grp-{i:04d}" for i in range(220)]  # 2.2 KiB a header
    token = mint(claims(groups=groups))
    decision = await app.pipeline.decide(_attrs(token), "test")
    assert (decision.allowed, decision.status, decision.reason) == (False, 403, "upstream_identity_too_large")
    assert not decision.upstream_headers
    assert b"X-Authenticated" not in decision.http_head and b"x-authenticated" not in decision.http_head
    assert b"x-verifier-reason: upstream_identity_too_large" in decision.http_head
    envoy = ea.CheckResponse.FromString(envoy_response(decision, _attrs(token).headers))
    assert envoy.denied_response.status.code == 403 and not envoy.ok_response.headers
    assert app.pipeline.decide_cached(_attrs(token), "test") is decision  # the record answers the same
    small = await app.pipeline.decide(_attrs(mint(claims(groups=groups[:20]))), "test")
    assert small.allowed and _headers(small)["x-authenticated-memberof"] == ", ".join(groups[:20])


async def test_a_routes_headers_arrive_when_the_upstream_section_maps_nothing(started: Started, mint: Any) -> None:
    """A route's `upstream.headers` with no top-level mapping: the fixed-four shortcut must not drop them."""
    policies = [
        {
            "match": {"path_prefix": "/plan"},
            "upstream": {"headers": [{"header": "X-Authenticated-Plan", "claim": "plan"}]},
        },
        {"match": {"path_prefix": "/"}},
    ]
    app = await started(_document(None, policies=policies))
    token = mint(claims(plan="gold"))
    assert _headers(await app.pipeline.decide(_attrs(token, "/plan/1"), "test"))["x-authenticated-plan"] == "gold"
    assert "x-authenticated-plan" not in _headers(await app.pipeline.decide(_attrs(token, "/other"), "test"))


async def test_a_route_adding_headers_is_bounded_too(started: Started, mint: Any) -> None:
    policies = [
        {
            "match": {"path_prefix": "/wide"},
            "upstream": {"headers": [{"header": "X-Authenticated-Bio", "claim": "bio"}]},
        },
        {"match": {"path_prefix": "/"}},
    ]
    upstream = {"headers": [{"header": "X-Authenticated-Email", "claim": "email"}]}
    app = await started(_document({**upstream, "max_value_bytes": 1024, "max_total_bytes": 1024}, policies=policies))
    token = mint(claims(bio="b" * 1000))
    assert (await app.pipeline.decide(_attrs(token, "/narrow"), "test")).allowed
    wide = await app.pipeline.decide(_attrs(token, "/wide"), "test")
    assert (wide.allowed, wide.reason) == (False, "upstream_identity_too_large"), wide


async def test_the_consumer_is_answered_to_the_plugin_never_to_the_upstream(started: Started, mint: Any) -> None:
    app = await started(_document({"consumer": {"claim": "sub", "by": "username"}}))
    attrs = _attrs(mint(claims(sub="alice")))
    decision = await app.pipeline.decide(attrs, "test")
    assert decision.answer_headers == (("x-kong-consumer-username", "alice"),)
    assert not any(name.startswith("x-kong-") for name, _ in decision.upstream_headers)
    assert "x-kong-consumer-username: alice\r\n" in decision.http_head.decode()  # forward-auth: for the plugin
    own = verifier_pb2.CheckResponse.FromString(own_response(decision))
    assert [(h.name, h.value) for h in own.answer_headers] == [("x-kong-consumer-username", "alice")]
    assert all(not h.name.startswith("x-kong-") for h in own.upstream_headers)
    envoy = ea.CheckResponse.FromString(envoy_response(decision))
    assert all(not h.header.key.startswith("x-kong-") for h in envoy.ok_response.headers)
    # a client-credentials token names no consumer
    client = await app.pipeline.decide(_attrs(mint(claims(sub=None))), "test")
    assert client.allowed and client.answer_headers == ()


@pytest.mark.parametrize("sub", ["mallory\x00", "mallory\r\n", "alice ", " alice", "alice\t"])
async def test_a_consumer_name_the_answer_cannot_carry_as_it_is_is_refused(
    started: Started, mint: Any, sub: str
) -> None:
    """Stripped of its control characters, `mallory\\x00` named the consumer `mallory`; HTTP drops white space at
    either end of a field value, so the Kong Lua plugin read `alice ` as `alice`: another subject's consumer, with its
    ACL groups and per-consumer plugins. Such a name is refused, never sent altered (an upstream header may be)."""
    app = await started(_document({"consumer": {"claim": "sub", "by": "username"}}))
    decision = await app.pipeline.decide(_attrs(mint(claims(sub=sub))), "test")
    assert (decision.allowed, decision.status, decision.reason) == (False, 403, "upstream_consumer_unnamable")
    inner = await app.pipeline.decide(_attrs(mint(claims(sub="mal lory"))), "test")  # inner white space stays
    assert inner.answer_headers == (("x-kong-consumer-username", "mal lory"),)


async def test_the_consumer_by_custom_id_from_a_nested_claim(started: Started, mint: Any) -> None:
    app = await started(_document({"consumer": {"claim": "org.customer", "by": "custom_id"}}))
    decision = await app.pipeline.decide(_attrs(mint(claims(org={"customer": "c-7"}))), "test")
    assert decision.answer_headers == (("x-kong-consumer-custom-id", "c-7"),)


# --------------------------------------------------------------------------------------- the assertion


async def _jwks(app: App) -> dict[str, Any]:
    assert app.ports.http is not None
    answer = await http_exchange(app.ports.http, b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: verifier\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"application/jwk-set+json" in head
    document: dict[str, Any] = json.loads(body)
    return document


def _verify(assertion: str, jwks: dict[str, Any], audience: str, now: float) -> dict[str, Any]:
    kid = jwt.get_unverified_header(assertion)["kid"]
    jwk = next(k for k in jwks["keys"] if k["kid"] == kid)
    # The verifier's clock is frozen at `now`: expiry is checked against it, not the wall clock.
    decoded: dict[str, Any] = jwt.decode(
        assertion,
        jwt.PyJWK(jwk),
        algorithms=["ES256", "EdDSA"],
        audience=audience,
        issuer=ASSERTION_ISSUER,
        options={"require": ["iss", "aud", "iat", "exp", "jti"], "verify_exp": False, "verify_iat": False},
    )
    assert decoded["iat"] <= now < decoded["exp"], "expired (or not yet valid) at the verifier's time"
    return decoded


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
async def test_the_assertion_verifies_against_the_published_jwks(
    started: Started, mint: Any, tmp_path: Path, algorithm: str
) -> None:
    key = ec.generate_private_key(ec.SECP256R1()) if algorithm == "ES256" else ed25519.Ed25519PrivateKey.generate()
    identity = _identity(_pem(key, tmp_path / "id.pem"), algorithm=algorithm)
    app = await started(_document({"identity_token": identity}))
    token = mint(claims(email="a@example.test", acr="phr", amr=["hwk"], roles=["admin"], secret="not-listed"))
    decision = await app.pipeline.decide(_attrs(token), "test")
    assertion = _headers(decision)["x-authenticated-identity"]
    header = jwt.get_unverified_header(assertion)
    assert header["typ"] == "JWT" and header["alg"] == algorithm
    decoded = _verify(assertion, await _jwks(app), ORDERS, NOW)
    assert decoded["sub"] == "user-1" and decoded["scope"] == "read write" and decoded["roles"] == ["admin"]
    assert decoded["idp"] == app.settings.issuers[0].issuer  # whose `sub` it is: ours is `iss`
    assert decoded["email"] == "a@example.test" and decoded["acr"] == "phr" and decoded["amr"] == ["hwk"]
    assert "secret" not in decoded and decoded["exp"] - decoded["iat"] == 60 and decoded["jti"]
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(
            assertion,
            jwt.PyJWK((await _jwks(app))["keys"][0]),
            algorithms=[algorithm],
            audience=BILLING,
            options={"verify_exp": False},
        )
    # the client's token passes unchanged: the assertion is added, never swapped in
    assert token not in decision.http_head.decode()


async def test_the_assertions_client_id_is_the_client_the_verifier_judged(
    started: Started, mint: Any, tmp_path: Path
) -> None:
    """`client_id` in the assertion is the token's `client_id`, else its `azp` (as revocation and `clients_any`
    read it); a listed `azp` is the token's own."""
    key = ec.generate_private_key(ec.SECP256R1())
    identity = _identity(_pem(key, tmp_path / "id.pem"), claims=["sub", "client_id", "azp"])
    app = await started(_document({"identity_token": identity}))
    jwks = await _jwks(app)
    for token_claims, expected in (
        (claims(), {"client_id": "client-1"}),
        (claims(client_id=None, azp="svc-b"), {"client_id": "svc-b", "azp": "svc-b"}),  # Keycloak, Entra v2
        (claims(azp="svc-b"), {"client_id": "client-1", "azp": "svc-b"}),  # two clients: each in its claim
    ):
        decision = await app.pipeline.decide(_attrs(mint(token_claims)), "test")
        decoded = _verify(_headers(decision)["x-authenticated-identity"], jwks, ORDERS, NOW)
        assert {k: v for k, v in decoded.items() if k in ("client_id", "azp")} == expected, token_claims


async def test_a_listed_dotted_path_is_copied_into_the_assertion_at_its_path(
    started: Started, mint: Any, tmp_path: Path
) -> None:
    """`claims: [realm_access.roles]` copied nothing: only exact top-level names were read. The member is now copied
    at its path (an upstream reads it as it would the token), an exact name holding dots still wins, and a whole
    object listed beside one of its members is copied whole."""
    listed = ["sub", "realm_access.roles", "resource_access.api.roles", "https://ns.example/a.b", "org", "org.id"]
    identity = _identity(_pem(ec.generate_private_key(ec.SECP256R1()), tmp_path / "id.pem"), claims=listed)
    app = await started(_document({"identity_token": identity}))
    token_claims = claims(
        realm_access={"roles": ["admin", "user"], "other": "not listed"},
        resource_access={"api": {"roles": ["reader"]}, "web": {"roles": ["x"]}},
        **{"https://ns.example/a.b": "flat"},
        org={"id": "o-1", "name": "Org"},
    )
    decision = await app.pipeline.decide(_attrs(mint(token_claims)), "test")
    decoded = _verify(_headers(decision)["x-authenticated-identity"], await _jwks(app), ORDERS, NOW)
    assert decoded["realm_access"] == {"roles": ["admin", "user"]}
    assert decoded["resource_access"] == {"api": {"roles": ["reader"]}}
    assert decoded["https://ns.example/a.b"] == "flat" and decoded["org"] == {"id": "o-1", "name": "Org"}
    absent = await app.pipeline.decide(_attrs(mint(claims(realm_access=["not", "an", "object"]))), "test")
    assert "realm_access" not in _verify(_headers(absent)["x-authenticated-identity"], await _jwks(app), ORDERS, NOW)


def test_a_listed_assertion_claim_is_checked_at_start_up(tmp_path: Path) -> None:
    key = _pem(ec.generate_private_key(ec.SECP256R1()), tmp_path / "k.pem")
    assert "segment is empty" in _problem(_document({"identity_token": _identity(key, claims=["realm_access..r"])}))
    for claim in ("exp.x", "idp"):  # under a claim the verifier sets: overwritten, never seen
        assert "set by the verifier itself" in _problem(_document({"identity_token": _identity(key, claims=[claim])}))


async def test_reuse_never_outlives_the_assertion_and_it_is_reminted_at_half_life(
    started: Started, mint: Any, tmp_path: Path
) -> None:
    identity = _identity(_pem(ec.generate_private_key(ec.SECP256R1()), tmp_path / "id.pem"), lifetime_seconds=12)
    app = await started(_document({"identity_token": identity}, edge_cache={"max_age_seconds": 60}))
    clock: FrozenClock = app.clock  # type: ignore[assignment]
    token = mint(claims())
    first = await app.pipeline.decide(_attrs(token), "test")
    first_assertion = _headers(first)["x-authenticated-identity"]
    exp = jwt.decode(first_assertion, options={"verify_signature": False})["exp"]
    assert 0 < first.cache_max_age <= 6 and NOW + first.cache_max_age <= exp
    clock.advance(3)
    same = await app.pipeline.decide(_attrs(token), "test")
    assert _headers(same)["x-authenticated-identity"] == first_assertion
    assert clock.now() + same.cache_max_age <= exp
    clock.advance(4)  # past half-life: a fresh assertion, stored for the next requests
    renewed = await app.pipeline.decide(_attrs(token), "test")
    second = _headers(renewed)["x-authenticated-identity"]
    assert second != first_assertion
    decoded = _verify(second, await _jwks(app), ORDERS, clock.now())
    assert decoded["exp"] == int(clock.now()) + 12 and clock.now() + renewed.cache_max_age <= decoded["exp"]
    assert app.pipeline.decide_cached(_attrs(token), "test") is renewed
    for _ in range(20):  # every answer, at every moment, is reusable only while its assertion is valid
        clock.advance(0.9)
        answer = app.pipeline.decide_cached(_attrs(token), "test")
        assert answer is not None and answer.allowed
        left = jwt.decode(_headers(answer)["x-authenticated-identity"], options={"verify_signature": False})["exp"]
        assert clock.now() + answer.cache_max_age <= left and left - clock.now() >= 12 / 2 - 1


async def test_the_assertion_never_outlives_the_token(started: Started, mint: Any, tmp_path: Path) -> None:
    identity = _identity(_pem(ec.generate_private_key(ec.SECP256R1()), tmp_path / "id.pem"), lifetime_seconds=600)
    app = await started(_document({"identity_token": identity}))
    decision = await app.pipeline.decide(_attrs(mint(claims(exp=int(NOW) + 30))), "test")
    decoded = jwt.decode(_headers(decision)["x-authenticated-identity"], options={"verify_signature": False})
    assert decoded["exp"] == int(NOW) + 30


async def test_a_token_past_its_exp_within_the_leeway_gets_no_assertion_born_expired(
    started: Started, mint: Any, tmp_path: Path
) -> None:
    """Accepted within its issuer's leeway after `exp`, a token used to get an assertion whose `exp` (the token's)
    was at or before its `iat`: an upstream verifying it refused a request the verifier let through. It is refused
    as expired now (the assertion never outlives the token), and no answer carrying an assertion is reused past
    its `exp`."""
    identity = _identity(_pem(ec.generate_private_key(ec.SECP256R1()), tmp_path / "id.pem"))
    app = await started(_document({"identity_token": identity}))
    late = await app.pipeline.decide(_attrs(mint(claims(exp=int(NOW) - 5))), "test")
    assert not late.allowed and late.status == 401 and late.reason == "token_expired", late
    assert "x-authenticated-identity" not in _headers(late) and late.cache_max_age <= 0
    # a token expiring within the second still gets one, valid past its `iat`, reused for no longer than it
    near = await app.pipeline.decide(_attrs(mint(claims(exp=int(NOW) + 1))), "test")
    decoded = jwt.decode(_headers(near)["x-authenticated-identity"], options={"verify_signature": False})
    assert near.allowed and decoded["iat"] < decoded["exp"] == int(NOW) + 1
    assert NOW + near.cache_max_age <= decoded["exp"]


async def test_a_route_names_its_own_audience_and_adds_headers(started: Started, mint: Any, tmp_path: Path) -> None:
    identity = _identity(_pem(ec.generate_private_key(ec.SECP256R1()), tmp_path / "id.pem"))
    policies = [
        {
            "match": {"path_prefix": "/billing"},
            "upstream": {
                "identity_token": {"audience": BILLING},
                "headers": [
                    {"header": "X-Authenticated-Email", "claim": "billing_email"},
                    {"header": "X-Authenticated-Plan", "claim": "plan"},
                ],
            },
        },
        {"match": {"path_prefix": "/"}},
    ]
    upstream = {"identity_token": identity, "headers": [{"header": "X-Authenticated-Email", "claim": "email"}]}
    app = await started(_document(upstream, policies=policies))
    token = mint(claims(email="a@example.test", billing_email="billing@example.test", plan="gold"))
    jwks = await _jwks(app)
    orders = await app.pipeline.decide(_attrs(token, "/orders/1"), "test")
    billing = await app.pipeline.decide(_attrs(token, "/billing/1"), "test")
    assert _verify(_headers(orders)["x-authenticated-identity"], jwks, ORDERS, NOW)
    assert _verify(_headers(billing)["x-authenticated-identity"], jwks, BILLING, NOW)
    assert _headers(orders)["x-authenticated-email"] == "a@example.test" and "x-authenticated-plan" not in _headers(
        orders
    )
    assert _headers(billing)["x-authenticated-email"] == "billing@example.test"
    assert _headers(billing)["x-authenticated-plan"] == "gold"
    # each route's answer is kept in the token's record
    assert app.pipeline.decide_cached(_attrs(token, "/billing/2"), "test") is billing
    assert app.pipeline.decide_cached(_attrs(token, "/orders/2"), "test") is orders


async def test_a_rotation_keeps_old_assertions_verifiable_until_they_expire(
    fetcher: FakeFetcher, mint: Any, tmp_path: Path
) -> None:
    old_key = ec.generate_private_key(ec.SECP256R1())
    new_key = ed25519.Ed25519PrivateKey.generate()
    before = App(
        parse_settings(_document({"identity_token": _identity(_pem(old_key, tmp_path / "old.pem"))})),
        clock=FrozenClock(NOW),
        fetcher=fetcher,
    )
    await before.start()
    try:
        await asyncio.wait_for(before.keys.wait_ready(), 5)
        old_assertion = _headers(await before.pipeline.decide(_attrs(mint(claims())), "test"))[
            "x-authenticated-identity"
        ]
    finally:
        await before.stop(grace=0.1)
    rotated = _identity(
        _pem(new_key, tmp_path / "new.pem"),
        algorithm="EdDSA",
        previous_public_key_files=[_public_pem(old_key, tmp_path / "old.pub.pem")],
    )
    after = App(parse_settings(_document({"identity_token": rotated})), clock=FrozenClock(NOW + 20), fetcher=fetcher)
    await after.start()
    try:
        await asyncio.wait_for(after.keys.wait_ready(), 5)
        jwks = await _jwks(after)
        assert len(jwks["keys"]) == 2 and len({k["kid"] for k in jwks["keys"]}) == 2
        assert _verify(old_assertion, jwks, ORDERS, NOW + 20)["sub"] == "user-1"  # still verifiable
        new_assertion = _headers(await after.pipeline.decide(_attrs(mint(claims())), "test"))[
            "x-authenticated-identity"
        ]
        assert jwt.get_unverified_header(new_assertion)["alg"] == "EdDSA"
        assert _verify(new_assertion, jwks, ORDERS, NOW + 20)["sub"] == "user-1"
        # once the old assertion's exp has passed, PyJWT refuses it however it is signed
        with pytest.raises(jwt.ExpiredSignatureError):
            kid = jwt.get_unverified_header(old_assertion)["kid"]
            jwt.decode(
                old_assertion,
                jwt.PyJWK(next(k for k in jwks["keys"] if k["kid"] == kid)),
                algorithms=["ES256"],
                audience=ORDERS,
            )
    finally:
        await after.stop(grace=0.1)


async def test_no_jwks_endpoint_without_an_assertion(started: Started) -> None:
    app = await started(_document())
    assert app.ports.http is not None
    answer = await http_exchange(app.ports.http, b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: v\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404")


def test_settings_without_upstream_keep_the_fixed_four() -> None:
    settings: Settings = parse_settings(_document())
    assert settings.upstream is None


async def test_an_assertion_is_handed_out_only_in_the_first_half_of_its_life(
    started: Started, mint: Any, tmp_path: Path
) -> None:
    """With a gateway reuse (10 s) shorter than half its life (30 s), the hot path still renews at half-life."""
    identity = _identity(_pem(ec.generate_private_key(ec.SECP256R1()), tmp_path / "id.pem"), lifetime_seconds=60)
    app = await started(_document({"identity_token": identity}, edge_cache={"max_age_seconds": 10}))
    clock: FrozenClock = app.clock  # type: ignore[assignment]
    token = mint(claims(exp=int(NOW) + 3600))
    first = _headers(await app.pipeline.decide(_attrs(token), "test"))["x-authenticated-identity"]
    for _ in range(70):
        clock.advance(1)
        answer = app.pipeline.decide_cached(_attrs(token), "test")
        assert answer is not None and answer.allowed and answer.cache_max_age == 10
        assertion = jwt.decode(_headers(answer)["x-authenticated-identity"], options={"verify_signature": False})
        assert assertion["exp"] - clock.now() >= 30, (clock.now() - NOW, assertion["exp"] - NOW)
    assert _headers(answer)["x-authenticated-identity"] != first


@pytest.mark.parametrize("depth", [10, 400, 900, 940, 950, 956, 990, 1200])
async def test_a_deeply_nested_claim_never_breaks_the_assertion(
    started: Started, mint: Any, tmp_path: Path, depth: int
) -> None:
    identity = _identity(_pem(ec.generate_private_key(ec.SECP256R1()), tmp_path / "id.pem"))
    mapping = [{"header": "X-Authenticated-Email", "claim": "email"}]
    app = await started(_document({"identity_token": identity, "headers": mapping}))
    nested: list[Any] = []
    inner = nested
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 2 * depth)  # only to sign the test token; the verifier runs with the default
    try:
        token = mint(claims(email=nested))
    finally:
        sys.setrecursionlimit(limit)
    decision = await app.pipeline.decide(_attrs(token), "test")
    assert decision.reason != "internal_error"
    if decision.allowed:
        assert "x-authenticated-email" not in _headers(decision)
        assertion = jwt.decode(_headers(decision)["x-authenticated-identity"], options={"verify_signature": False})
        assert "email" not in assertion or isinstance(assertion["email"], list)


def test_a_claim_json_cannot_encode_is_refused_not_a_crash(tmp_path: Path) -> None:
    """An identity from elsewhere (introspection, a claims change) may hold what JSON cannot encode."""
    settings = parse_settings(
        _document({"identity_token": _identity(_pem(ec.generate_private_key(ec.SECP256R1()), tmp_path / "k.pem"))})
    )
    assert settings.upstream is not None and settings.upstream.identity_token is not None
    assertions = IdentityAssertions(settings.upstream.identity_token)
    deep: list[Any] = []
    inner = deep
    for _ in range(sys.getrecursionlimit() * 2):
        inner.append([])
        inner = inner[0]
    circular: dict[str, Any] = {}
    circular["self"] = circular
    for value in (deep, circular):
        principal = Principal(
            issuer=ISSUER,
            subject="u",
            client_id=None,
            scopes=(),
            roles=frozenset(),
            expires_at=NOW + 60,
            claims={"email": value},
        )
        with pytest.raises(UpstreamClaimTooLarge):
            assertions.mint(principal, ORDERS, NOW)
