"""Issue #20: what the upstream receives, through every shipped gateway configuration, from the REAL verifier.

Gateways: the rendered deploy/nginx/nginx.conf.template (real nginx), deploy/envoy/envoy-grpc.yaml.template and
envoy-http.yaml.template (real Envoy). The verifier maps claims to X-Authenticated-Email/-Tenant/-Groups, names
the Kong consumer (an answer header for the Kong plugin, never for an upstream) and signs an identity assertion.
The protected application (an echo upstream on loopback) receives the request; the test then verifies the
assertion it received with PyJWT against the verifier's /.well-known/jwks.json, as an upstream would.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.request import parse_http_list

import grpc
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from verifier.v1 import verifier_pb2, verifier_pb2_grpc

if __package__:
    from .gateways import (
        NGINX_TEMPLATE,
        EchoUpstream,
        GatewayProcess,
        LocalIssuer,
        SeenRequest,
        http_request,
        start_nginx,
        start_verifier,
    )
    from .rigs import fresh_upstream_log
    from .test_trust_boundary import Edge, edge
else:  # tests/ is not a package: pytest put this directory on sys.path
    from gateways import (
        NGINX_TEMPLATE,
        EchoUpstream,
        GatewayProcess,
        LocalIssuer,
        SeenRequest,
        http_request,
        start_nginx,
        start_verifier,
    )
    from rigs import fresh_upstream_log
    from test_trust_boundary import Edge, edge

__all__ = ["edge", "fresh_upstream_log"]  # the trust-boundary rigs, against this verifier and upstream

pytestmark = pytest.mark.integration

ASSERTION_ISSUER = "https://verifier.internal"
ORDERS = "https://orders.internal"
BILLING = "https://billing.internal"
MAX_VALUE_BYTES = 1024
README = Path(__file__).resolve().parents[2] / "README.md"
CLIENT_COPIES = {
    "X-Authenticated-Email": "boss@example.test",
    "X-Authenticated-Tenant": "another-tenant",
    "X-Authenticated-Groups": "admins",
    "X-Authenticated-Identity": "eyJhbGciOiJub25lIn0.eyJzdWIiOiJib3NzIn0.",
    "X-Kong-Consumer-Username": "admin",
    "X-Kong-Consumer-Custom-Id": "c-admin",
    "X-Kong-Consumer-Id": "00000000-0000-0000-0000-000000000000",
}


def _write_key(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, path: Path) -> str:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(path)


@pytest.fixture(scope="module")
def verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    proc = start_identity_verifier(issuer, tmp_path_factory)
    yield proc
    proc.stop()


def start_identity_verifier(
    issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory, *, consumer: bool = True
) -> GatewayProcess:
    """The verifier these tests run against; `consumer=False` names no Kong consumer (the Kong plugin rigs, which
    know none, would refuse every request)."""
    tmp = tmp_path_factory.mktemp("identity")
    key_file = _write_key(ec.generate_private_key(ec.SECP256R1()), tmp / "identity.pem")
    upstream_config = {
        "headers": [
            {"header": "X-Authenticated-Email", "claim": "email"},
            {"header": "X-Authenticated-Tenant", "claim": "org.tenant_id"},
            {"header": "X-Authenticated-Groups", "claim": "groups"},
            {"header": "X-Authenticated-Plan", "claim": "plan"},  # not in the nginx template: its snippet
        ],
        "consumer": {"claim": "sub", "by": "username"},
        "identity_token": {
            "issuer": ASSERTION_ISSUER,
            "algorithm": "ES256",
            "private_key_file": key_file,
            "audience": ORDERS,
            "lifetime_seconds": 60,
            "claims": ["sub", "scope", "roles", "email"],
        },
        "max_value_bytes": MAX_VALUE_BYTES,
    }
    policies = [
        {
            "name": "billing",
            "match": {"path_prefix": "/billing"},
            "upstream": {"identity_token": {"audience": BILLING}},
        },
        {"name": "public", "match": {"path_prefix": "/public"}, "require": {"authenticated": False}},
        {"name": "rest", "match": {"path_prefix": "/"}},
    ]
    if not consumer:
        del upstream_config["consumer"]
    return start_verifier(tmp, issuer=issuer.issuer, extra_config={"upstream": upstream_config, "policies": policies})


@pytest.fixture(scope="module")
def jwks_client(verifier: GatewayProcess) -> jwt.PyJWKClient:
    """What an upstream uses: PyJWT's JWKS client on the verifier's published keys."""
    return jwt.PyJWKClient(f"{verifier.url}/.well-known/jwks.json", cache_keys=True)


class VerifyingUpstream(EchoUpstream):
    """The protected application as one would build it: it verifies the assertion each request carries
    (PyJWT against the verifier's /.well-known/jwks.json, its own audience: /billing is the billing service)
    and keeps the verified claims, or the error, beside what it received."""

    def __init__(self, jwks: jwt.PyJWKClient) -> None:
        self._jwks = jwks
        self.verified: list[dict[str, Any] | Exception] = []
        super().__init__()

    def _record(self, seen: SeenRequest) -> None:
        audience = BILLING if seen.path.startswith("/billing") else ORDERS
        try:
            result: dict[str, Any] | Exception = _verify(seen.headers["x-authenticated-identity"], self._jwks, audience)
        except Exception as exc:  # what the application would answer 401 for
            result = exc
        with self._lock:
            self.verified.append(result)
        super()._record(seen)

    def clear(self) -> None:
        with self._lock:
            self.verified.clear()
        super().clear()


@pytest.fixture(scope="module")
def upstream(verifier: GatewayProcess) -> Iterator[VerifyingUpstream]:
    server = VerifyingUpstream(jwt.PyJWKClient(f"{verifier.url}/.well-known/jwks.json"))
    yield server
    server.stop()


def _through(edge: Edge, upstream: EchoUpstream, path: str, token: str, **extra: str) -> dict[str, str]:
    r = http_request(f"{edge.url}{path}", headers={"Authorization": f"Bearer {token}", **CLIENT_COPIES, **extra})
    assert r.status == 200, (edge.name, r.status, r.body)
    (seen,) = upstream.requests
    return dict(seen.headers)


def _unquoted(value: str) -> str:
    """`value` as a reader that unquotes an RFC 9110 quoted-string (section 5.6.4) takes it; else as it is."""
    value = value.strip(" \t")
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    return re.sub(r"\\(.)", r"\1", value[1:-1])


def _verify(assertion: str, client: jwt.PyJWKClient, audience: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(
        assertion,
        client.get_signing_key_from_jwt(assertion).key,
        algorithms=["ES256"],
        audience=audience,
        issuer=ASSERTION_ISSUER,
        options={"require": ["iss", "aud", "iat", "exp", "jti"]},
    )
    return decoded


def test_mapped_claims_arrive_and_client_copies_never_do(
    edge: Edge, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    token = issuer.mint(email="alice@example.test", org={"tenant_id": "t-42"}, groups=["ops", "billing"])
    seen = _through(edge, upstream, "/orders/1", token)
    assert seen["x-authenticated-email"] == "alice@example.test"
    assert seen["x-authenticated-tenant"] == "t-42"
    assert seen["x-authenticated-groups"] == "ops, billing"
    assert seen["x-authenticated-userid"] == "alice"
    assert seen["authorization"] == f"Bearer {token}"  # the client's token passes unchanged
    # the consumer is named to a Kong plugin only: neither the verifier's answer nor the client's copy arrives
    assert not [name for name in seen if name.startswith("x-kong-consumer")], seen


def test_a_missing_claim_sends_no_header_and_the_clients_copy_is_removed(
    edge: Edge, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    seen = _through(edge, upstream, "/orders/1", issuer.mint())
    for name in ("x-authenticated-email", "x-authenticated-tenant", "x-authenticated-groups"):
        assert name not in seen, (edge.name, name, seen.get(name))
    assert not [name for name in seen if name.startswith("x-kong-consumer")], seen


def test_the_upstream_verifies_the_assertion_against_the_verifiers_jwks(
    edge: Edge, upstream: VerifyingUpstream, issuer: LocalIssuer, jwks_client: jwt.PyJWKClient
) -> None:
    seen = _through(edge, upstream, "/orders/1", issuer.mint(email="alice@example.test", roles=["admin"]))
    assertion = seen["x-authenticated-identity"]
    assert assertion != CLIENT_COPIES["X-Authenticated-Identity"]
    (decoded,) = upstream.verified
    assert isinstance(decoded, dict), (edge.name, decoded)
    assert decoded["sub"] == "alice" and decoded["scope"] == "read write" and decoded["roles"] == ["admin"]
    assert decoded["email"] == "alice@example.test"
    assert decoded["iat"] <= time.time() + 1 < decoded["exp"] <= decoded["iat"] + 60
    assert jwt.get_unverified_header(assertion)["typ"] == "JWT"
    with pytest.raises(jwt.InvalidAudienceError):
        _verify(assertion, jwks_client, BILLING)


def test_a_route_gets_an_assertion_for_its_own_audience(
    edge: Edge, upstream: VerifyingUpstream, issuer: LocalIssuer
) -> None:
    _through(edge, upstream, "/billing/7", issuer.mint())
    (decoded,) = upstream.verified  # the billing service's own audience
    assert isinstance(decoded, dict) and decoded["sub"] == "alice", (edge.name, decoded)


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        (
            {"email": "alice@example.test\r\nX-Injected: yes"},
            {"x-authenticated-email": "alice@example.test\ufffd\ufffdX-Injected: yes"},
        ),
        (
            {"email": "a\nx-authenticated-userid: root"},
            {"x-authenticated-email": "a\ufffdx-authenticated-userid: root"},
        ),
        (
            {"org": {"tenant_id": 42}, "groups": [1, True, "g"]},
            {"x-authenticated-tenant": "42", "x-authenticated-groups": "1, true, g"},
        ),
        ({"org": {"tenant_id": {"deep": {"deeper": ["x"]}}}}, {"x-authenticated-tenant": None}),
        ({"groups": [["nested"]]}, {"x-authenticated-groups": None}),
    ],
    ids=["crlf", "lf-userid", "non-strings", "nested-object", "nested-array"],
)
def test_hostile_claims_never_forge_a_header(
    edge: Edge,
    upstream: EchoUpstream,
    issuer: LocalIssuer,
    claims: dict[str, Any],
    expected: dict[str, str | None],
) -> None:
    seen = _through(edge, upstream, "/orders/1", issuer.mint(**claims))
    for name, value in expected.items():
        got = seen.get(name)
        got = None if got is None else got.encode("latin-1").decode("utf-8")  # http.server reads latin-1
        assert got == value, (edge.name, name, got)
    assert "x-injected" not in seen and seen["x-authenticated-userid"] == "alice", seen


def _elements(value: str) -> list[str]:
    """A comma-separated header list as an RFC 9110 (section 5.6.1) reader takes it: quoted-strings unquoted."""
    elements = []
    for item in parse_http_list(value):
        if len(item) >= 2 and item[0] == item[-1] == '"':
            item = re.sub(r"\\\\(.)", r"\\1", item[1:-1])
        elements.append(item)
    return elements


@pytest.mark.parametrize(
    ("claims", "header", "elements"),
    [
        # A role holding a comma or edge white space is left out of the identity (`principal.roles_of`): the
        # policy and the upstream could not read it alike; quoted or not, it never reaches the upstream.
        ({"roles": ["user,admin"]}, "x-authenticated-roles", []),
        ({"roles": [" admin", "user"]}, "x-authenticated-roles", ["user"]),
        ({"roles": ['"admin"']}, "x-authenticated-roles", ['"admin"']),
        ({"groups": ["eng, admins"]}, "x-authenticated-groups", ["eng, admins"]),
        ({"groups": ['"admins"', "ops"]}, "x-authenticated-groups", ['"admins"', "ops"]),
        ({"groups": ["ops", "admins "]}, "x-authenticated-groups", ["ops", "admins "]),
        ({"groups": ["a\\", "b"]}, "x-authenticated-groups", ["a\\", "b"]),
    ],
    ids=["role-comma", "role-space", "role-quoted", "group-comma", "group-quoted", "group-space", "backslash"],
)
def test_a_role_or_group_never_reads_as_another_one_upstream(
    edge: Edge, upstream: EchoUpstream, issuer: LocalIssuer, claims: dict[str, Any], header: str, elements: list[str]
) -> None:
    """A list element holding the separator, a quote or edge white space is sent as a quoted-string: an RFC 9110
    list reader gets the elements the verifier judged, and a reader splitting at commas never an `admin(s)`."""
    seen = _through(edge, upstream, "/orders/1", issuer.mint(**claims))
    value = seen.get(header, "")
    assert _elements(value) == elements, (edge.name, value)
    naive = [item.strip() for item in value.split(",")]
    assert not {"admin", "admins"} & set(naive), (edge.name, value)


def test_a_claim_too_large_for_a_header_is_refused_and_never_reaches_the_upstream(
    edge: Edge, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    token = issuer.mint(groups=[f"group-{i:04d}" for i in range(MAX_VALUE_BYTES // 8)])
    r = http_request(f"{edge.url}/orders/1", headers={"Authorization": f"Bearer {token}"})
    assert r.status == 403, (edge.name, r.status, r.body)
    assert r.headers.get("x-verifier-reason") == "upstream_claim_too_large", (edge.name, r.headers)
    assert upstream.requests == []


def test_an_allow_with_many_kib_of_identity_headers_is_no_503(
    edge: Edge, verifier: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    """Claims a user may choose (each under max_value_bytes) can make the verifier's answer head longer than
    nginx's default proxy_buffer_size (one page): nginx then answered "upstream sent too big header", a 503
    with Retry-After to a valid token, never the verifier's decision. The shipped templates read such answers."""
    claims = {"email": "e" * 300, "org": {"tenant_id": "t" * 1000}, "plan": "p" * 1000, "groups": ["g" * 240] * 4}
    token = issuer.mint(**claims)
    direct = http_request(
        f"{verifier.url}/v1/forward-auth",
        headers={"Authorization": f"Bearer {token}", "X-Forwarded-Uri": "/orders/1", "X-Forwarded-Host": "api"},
    )
    assert direct.status == 200 and sum(len(k) + len(v) + 4 for k, v in direct.headers.items()) > 4096
    seen = _through(edge, upstream, "/orders/1", token)
    assert seen["x-authenticated-tenant"] == "t" * 1000 and seen["x-authenticated-email"] == "e" * 300, edge.name


def _assertion_from(verifier: GatewayProcess, token: str) -> str:
    """The assertion in the verifier's forward-auth answer (what every gateway copies to the upstream)."""
    r = http_request(
        f"{verifier.url}/v1/forward-auth",
        headers={"Authorization": f"Bearer {token}", "X-Forwarded-Uri": "/orders/1", "X-Forwarded-Host": "api"},
    )
    assert r.status == 200, (r.status, r.body)
    return r.headers["x-authenticated-identity"]


def test_a_rotation_by_reload_keeps_assertions_already_handed_out_verifiable(
    issuer: LocalIssuer, tmp_path: Path
) -> None:
    """SIGHUP with a new key and the old public key: the JWKS lists both, old and new assertions verify."""
    old_key = ec.generate_private_key(ec.SECP256R1())
    identity = {
        "issuer": ASSERTION_ISSUER,
        "private_key_file": _write_key(old_key, tmp_path / "old.pem"),
        "audience": ORDERS,
    }
    proc = start_verifier(tmp_path, issuer=issuer.issuer, extra_config={"upstream": {"identity_token": identity}})
    try:
        before = _assertion_from(proc, issuer.mint())
        old_pub = tmp_path / "old.pub.pem"
        old_pub.write_bytes(
            old_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        assert proc.config_path is not None
        config = yaml.safe_load(proc.config_path.read_text())
        config["upstream"]["identity_token"].update(
            algorithm="EdDSA",
            private_key_file=_write_key(ed25519.Ed25519PrivateKey.generate(), tmp_path / "new.pem"),
            previous_public_key_files=[str(old_pub)],
        )
        proc.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        proc.proc.send_signal(signal.SIGHUP)
        # The old worker serves until the new one is ready, then drains (both answer for a while): take the
        # key set and a new assertion from the new worker once each shows up.
        deadline = time.monotonic() + 30
        jwks: dict[str, Any] | None = None
        after = ""
        while jwks is None or not after:
            assert time.monotonic() < deadline, proc.log()
            document = json.loads(http_request(f"{proc.url}/.well-known/jwks.json").body)
            jwks = document if len(document["keys"]) == 2 else jwks
            candidate = _assertion_from(proc, issuer.mint())
            after = candidate if jwt.get_unverified_header(candidate)["alg"] == "EdDSA" else after
            time.sleep(0.1)
        keys = jwt.PyJWKSet.from_dict(jwks)
        for assertion, algorithm in ((before, "ES256"), (after, "EdDSA")):  # handed out before and after
            kid = jwt.get_unverified_header(assertion)["kid"]
            decoded = jwt.decode(
                assertion, keys[kid].key, algorithms=[algorithm], audience=ORDERS, issuer=ASSERTION_ISSUER
            )
            assert decoded["sub"] == "alice"
        assert jwt.get_unverified_header(after)["kid"] != jwt.get_unverified_header(before)["kid"]
    finally:
        proc.stop()


def test_the_nginx_templates_snippet_copies_another_mapped_header(
    verifier: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer, tmp_path: Path
) -> None:
    """nginx copies answer headers by name: a mapped header outside the template's set needs the two lines
    its header comment documents, and arrives with them; a client's copy never does either way."""
    snippet = "\n".join(
        line.lstrip("#").strip()
        for line in NGINX_TEMPLATE.read_text().splitlines()
        if line.startswith("#        auth_request_set $auth_plan")
        or line.startswith("#        proxy_set_header X-Authenticated-Plan")
    )
    assert snippet.count(";") == 2, snippet
    token = issuer.mint(plan="gold")
    for directives, expected in (("", None), (snippet, "gold")):
        gw = start_nginx(tmp_path, verifier.extra["http_port"], upstream.port, http_directives=directives)
        try:
            upstream.clear()
            r = http_request(
                f"{gw.url}/orders/1", headers={"Authorization": f"Bearer {token}", "X-Authenticated-Plan": "platinum"}
            )
            assert r.status == 200, (r.status, r.body, gw.log())
            (seen,) = upstream.requests
            assert seen.headers.get("x-authenticated-plan") == expected, (directives, seen.headers)
        finally:
            gw.stop()


def test_every_door_answers_the_kong_consumer_to_the_plugin(verifier: GatewayProcess, issuer: LocalIssuer) -> None:
    """The contract with the Kong plugins: forward-auth answer headers, our gRPC `answer_headers`; never upstream."""
    token = issuer.mint()
    r = http_request(
        f"{verifier.url}/v1/forward-auth",
        headers={"Authorization": f"Bearer {token}", "X-Forwarded-Uri": "/orders/1", "X-Forwarded-Host": "api"},
    )
    assert r.status == 200 and r.headers["x-kong-consumer-username"] == "alice", r.headers
    with grpc.insecure_channel(f"127.0.0.1:{verifier.extra['grpc_port']}") as channel:
        answer = verifier_pb2_grpc.VerifierStub(channel).Check(
            verifier_pb2.CheckRequest(
                method="GET", scheme="https", host="api", path="/orders/1", headers={"authorization": f"Bearer {token}"}
            ),
            timeout=10,
        )
    assert answer.allowed
    assert [(h.name, h.value) for h in answer.answer_headers] == [("x-kong-consumer-username", "alice")]
    assert not [h.name for h in answer.upstream_headers if h.name.startswith("x-kong-")]
    assert {h.name for h in answer.upstream_headers} >= {"x-authenticated-userid", "x-authenticated-identity"}


def test_a_reused_answer_never_outlives_its_assertion(
    edge: Edge, verifier: GatewayProcess, upstream: VerifyingUpstream, issuer: LocalIssuer
) -> None:
    """The verifier's max-age (X-Accel-Expires for nginx) ends before the assertion's exp; a gateway that
    reuses the answer (nginx's auth cache, the Envoy reuse filter) hands the upstream one that still verifies."""
    token = issuer.mint()
    r = http_request(
        f"{verifier.url}/v1/forward-auth",
        headers={"Authorization": f"Bearer {token}", "X-Forwarded-Uri": "/orders/1", "X-Forwarded-Host": "api"},
    )
    max_age = int(r.headers["cache-control"].rsplit("=", 1)[1])
    exp = jwt.decode(r.headers["x-authenticated-identity"], options={"verify_signature": False})["exp"]
    assert max_age > 0 and time.time() + max_age <= exp and int(r.headers["x-accel-expires"]) < max_age
    for _ in range(3):
        _through(edge, upstream, "/orders/1", token)
        (verified,) = upstream.verified
        assert isinstance(verified, dict), (edge.name, verified)
        upstream.clear()


# ------------------------------------------------------------------------------------------ the upstream's side


def _readme_snippet(url: str) -> Any:
    """README's "verifying the assertion upstream" code, run as written, with this verifier's URL."""
    text = README.read_text()
    section = text[text.index("**The identity assertion**") : text.index("**Rotating the assertion key**")]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict[str, Any] = {}
    exec(compile(code.replace("http://verifier:8080", url), str(README), "exec"), namespace)
    return namespace["verified_caller"]


def test_the_readmes_snippet_verifies_what_the_upstream_received_and_refuses_forgeries(
    edge: Edge, upstream: VerifyingUpstream, issuer: LocalIssuer, verifier: GatewayProcess
) -> None:
    """The code README gives upstream developers, run against what the upstream received through each gateway:
    it accepts the verifier's assertion, and refuses the client's forged one, another route's, one signed by
    another key under the verifier's `kid`, and one MAC'd with HS256 (the algorithms are pinned)."""
    verified_caller = _readme_snippet(verifier.url)
    assertion = _through(edge, upstream, "/orders/1", issuer.mint(email="alice@example.test"))[
        "x-authenticated-identity"
    ]
    claims = verified_caller(assertion)
    assert (claims["idp"], claims["sub"], claims["email"]) == (issuer.issuer, "alice", "alice@example.test")
    upstream.clear()
    billing = _through(edge, upstream, "/billing/1", issuer.mint())["x-authenticated-identity"]
    kid = jwt.get_unverified_header(assertion)["kid"]
    payload = jwt.decode(assertion, options={"verify_signature": False})
    foreign = jwt.encode(payload, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": kid})
    mac = jwt.encode(
        payload, b"any secret an attacker picks, 32 bytes or more", algorithm="HS256", headers={"kid": kid}
    )
    for forged in (CLIENT_COPIES["X-Authenticated-Identity"], billing, foreign, mac):
        with pytest.raises(jwt.PyJWTError):
            verified_caller(forged)


def test_one_assertion_with_one_jti_arrives_on_each_request_of_a_token_within_half_its_life(
    edge: Edge, upstream: VerifyingUpstream, issuer: LocalIssuer
) -> None:
    """As README says: `jti` names the assertion, not a request (the verifier keeps it with the token's decision,
    a gateway reuses the answer carrying it), so an upstream must not take it as single-use."""
    token = issuer.mint()
    seen = []
    for _ in range(3):
        _through(edge, upstream, "/orders/1", token)
        (decoded,) = upstream.verified
        assert isinstance(decoded, dict), (edge.name, decoded)
        seen.append((decoded["jti"], decoded["iat"]))
        upstream.clear()
    assert len(set(seen)) == 1, (edge.name, seen)


def test_a_token_past_its_exp_within_the_leeway_is_refused_not_sent_an_expired_assertion(
    edge: Edge, upstream: VerifyingUpstream, issuer: LocalIssuer
) -> None:
    """The verifier accepts a token up to its issuer's leeway (30 s here) after `exp`; the assertion, whose `exp` is
    the token's, was born expired, and the upstream refused a request the verifier had let through."""
    token = issuer.mint(exp=int(time.time()) - 5)
    r = http_request(f"{edge.url}/orders/1", headers={"Authorization": f"Bearer {token}"})
    assert (r.status, r.headers.get("x-verifier-reason")) == (401, "token_expired"), (
        edge.name,
        r.status,
        upstream.verified,
    )
    assert upstream.requests == []


def _identity_lines(names: tuple[str, ...]) -> list[str]:
    """The header lines an upstream (or a CGI-style framework, `_` read as `-`) takes as identity."""
    return [n.replace("_", "-") for n in names if n.replace("_", "-").startswith(("x-authenticated-", "x-kong-"))]


@pytest.mark.parametrize(
    "email",
    [
        "a@example.test\r\nX-Authenticated-Userid: root",
        "a@example.test\r\n\r\nGET /admin HTTP/1.1\r\nHost: api",
        "a@example.test\x00X-Authenticated-Roles: admin",
        "a@example.test\x7f\x1b[0m\x0b\x0c",
        "a@example.test, x-authenticated-userid: root",
        "ünïcödé@例え.jp",
        "a" * 300 + "@example.test",  # within max_value_bytes, and the assertion copying it too
    ],
    ids=["crlf-header", "request-split", "nul", "del-esc-vt-ff", "comma-colon", "non-ascii", "long"],
)
def test_an_attacker_chosen_claim_arrives_as_one_header_line_and_forges_none(
    edge: Edge, upstream: VerifyingUpstream, issuer: LocalIssuer, email: str
) -> None:
    """A claim the user edits at the provider (here `email`, and a group name) reaches the upstream as exactly one
    header line per mapping, minus its control characters (UTF-8 kept as is), and no header of its making: the
    upstream gets the verifier's identity headers, each once, and its assertion still verifies."""
    groups = ["ops", "x\r\nX-Authenticated-Roles: admin"]
    token = issuer.mint(email=email, groups=groups, org={"tenant_id": "t-1\nX-Authenticated-Scope: all"})
    r = http_request(f"{edge.url}/orders/1", headers={"Authorization": f"Bearer {token}", **CLIENT_COPIES})
    assert r.status == 200, (edge.name, r.status, r.body)
    (seen,) = upstream.requests
    lines = _identity_lines(seen.names)
    assert sorted(lines) == sorted(
        [
            "x-authenticated-userid",
            "x-authenticated-scope",
            "x-authenticated-issuer",
            "x-authenticated-email",
            "x-authenticated-tenant",
            "x-authenticated-groups",
            "x-authenticated-identity",
        ]
    ), (edge.name, seen.names)
    as_sent = seen.headers["x-authenticated-email"].encode("latin-1").decode("utf-8")  # http.server reads latin-1
    assert as_sent == "".join("\ufffd" if c < " " or "\x7f" <= c <= "\x9f" else c for c in email), (edge.name, as_sent)
    as_sent = seen.headers["x-authenticated-groups"].encode("latin-1").decode("utf-8")
    assert as_sent == "ops, x\ufffd\ufffdX-Authenticated-Roles: admin", (edge.name, as_sent)
    as_sent = seen.headers["x-authenticated-tenant"].encode("latin-1").decode("utf-8")
    assert as_sent == "t-1\ufffdX-Authenticated-Scope: all", (edge.name, as_sent)
    assert (seen.headers["x-authenticated-userid"], seen.headers["x-authenticated-scope"]) == ("alice", "read write")
    (decoded,) = upstream.verified
    assert isinstance(decoded, dict) and decoded["email"] == email, (edge.name, decoded)


@pytest.mark.parametrize("credential", ["none", "garbage", "expired", "valid"])
def test_a_public_route_never_passes_the_clients_identity_headers(
    edge: Edge, upstream: VerifyingUpstream, issuer: LocalIssuer, credential: str
) -> None:
    """`/public` needs no token: the verifier's allow carries no identity (none with no token), and a gateway that
    copied only the answer's headers would let the client's own X-Authenticated-Identity (and the rest) through to
    an upstream that trusts them. Whatever the credential, the upstream sees none of the client's."""
    tokens = {"none": None, "garbage": "not.a.token", "expired": issuer.mint(exp=int(time.time()) - 3600)}
    token = tokens.get(credential, issuer.mint())
    headers = {
        **CLIENT_COPIES,
        "X_Authenticated_Identity": "eyJhbGciOiJub25lIn0.e30.",
        "X-Authenticated-Userid": "root",
        "X-Authenticated-Plan": "enterprise",  # mapped, but not among the nginx template's copied names
    }
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    r = http_request(f"{edge.url}/public/page", headers=headers)
    assert r.status in (200, 401), (edge.name, r.status, r.body)
    for seen in upstream.requests:
        forged = {
            n: seen.headers.get(n) for n in _identity_lines(seen.names) if seen.headers.get(n) in headers.values()
        }
        assert not forged, (edge.name, credential, forged)
        assert seen.headers.get("x-authenticated-identity", "") != headers["X_Authenticated_Identity"]
    if credential in ("none", "valid"):
        assert r.status == 200 and len(upstream.requests) == 1, (edge.name, r.status)


@pytest.mark.parametrize(
    ("claims", "header", "trimmed"),
    [
        ({"email": " boss@example.test"}, "x-authenticated-email", "boss@example.test"),
        ({"email": "boss@example.test "}, "x-authenticated-email", "boss@example.test"),
        ({"email": "boss@example.test\u00a0"}, "x-authenticated-email", "boss@example.test"),
        ({"email": "\u3000boss@example.test"}, "x-authenticated-email", "boss@example.test"),
        ({"email": "boss@example.test\u2028"}, "x-authenticated-email", "boss@example.test"),
        ({"email": "\ufeffboss@example.test"}, "x-authenticated-email", "boss@example.test"),
        ({"groups": ["ops", "admins\u00a0"]}, "x-authenticated-groups", "admins"),
        ({"groups": ["\u2003admins", "ops"]}, "x-authenticated-groups", "admins"),
        ({"groups": ["ops", "admins\u0085"]}, "x-authenticated-groups", "admins"),
        ({"groups": ["ops", "admins\u0000"]}, "x-authenticated-groups", "admins"),
        ({"email": "boss@example.test\u0000"}, "x-authenticated-email", "boss@example.test"),
        ({"email": "boss@\u0007example.test"}, "x-authenticated-email", "boss@example.test"),
        ({"scope": '"admin"'}, "x-authenticated-scope", "admin"),
        ({"scope": '"admin" '}, "x-authenticated-scope", "admin"),
    ],
    ids=[
        "space-before",
        "space-after",
        "nbsp-after",
        "ideographic-before",
        "line-separator",
        "bom",
        "group-nbsp",
        "group-em-space",
        "group-nel",
        "group-nul",
        "nul-after",
        "bel-inside",
        "scope-quoted",
        "scope-quoted-space-after",
    ],
)
def test_a_claim_with_white_space_at_an_edge_never_reads_upstream_as_the_trimmed_value(
    edge: Edge, upstream: VerifyingUpstream, issuer: LocalIssuer, claims: dict[str, Any], header: str, trimmed: str
) -> None:
    """A user who may set their email (or name a group) at the provider to `boss@example.test` plus a space or an
    invisible character at either end: the gateway drops an edge space (OWS), and an upstream trimming the value
    (Python's str.strip, JavaScript's trim, Go's strings.TrimSpace) read another user's `boss@example.test`, or a
    group `admins` the user is not in. Such a value is sent as a quoted-string: read as itself by an RFC 9110
    reader, never as the trimmed one by a trimming one. A control character anywhere was taken out, which made
    `boss@example.test<NUL>` the same `boss@example.test`: it is replaced by U+FFFD now. A token's `scope` of
    `"admin"` sent bare was `admin` to an upstream that unquotes (RFC 9110 section 5.6.4) the header."""
    seen = _through(edge, upstream, "/orders/1", issuer.mint(**claims))
    value = seen.get(header, "").encode("latin-1").decode("utf-8")  # http.server reads latin-1
    readings = {value.strip(), value.strip(" \t"), value.strip("\ufeff \t\u00a0").strip(), _unquoted(value)}
    readings |= {item.strip() for item in value.split(",")} | {
        item.strip("\ufeff").strip() for item in value.split(",")
    }
    assert trimmed not in readings, (edge.name, value)
