"""Every way in applies the same checks: one logical request through every door gives one decision.

The verifier has three decision doors for the same question: HTTP forward-auth (`/v1/forward-auth`, asked as
Kong's plugin or Traefik ask it with the `x-forwarded` family, as nginx asks it with the `x-original` family,
and as Envoy's HTTP ext_authz mode asks it), our own gRPC `verifier.v1.Verifier/Check` and Envoy's
`envoy.service.auth.v3.Authorization/Check`. One App (the composition root, no listeners, a FrozenClock) is
asked the same logical request through each, each presented as its gateway presents it, and the answers are
reduced to what they decide (`Verdict`): allowed or not, the HTTP status and Envoy's gRPC status, the reason
code, the challenge, the JSON body, the headers for the client, the identity the upstream ends up with, and
how long a gateway may reuse the answer. They must agree; what a door cannot express is left out of its
verdict (None), each with the reason beside it. Every door also answers from the same caches in any order,
so the property covers first-seen and cached answers too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.service.auth.v3 import external_auth_pb2 as ea
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import FrozenClock
from support import b64url as b64
from test_answer_memo import Client
from tokenkit import AUDIENCE, ISSUER, NOW, FakeFetcher, Mint, claims, compact, discovery_document

from verifier.app import App
from verifier.binding.dpop import thumbprint
from verifier.decision import Decision
from verifier.doors.forward_auth import FORWARDED_FAMILIES, ForwardAuthDoor, _leaves_door, attributes_from_http
from verifier.doors.grpc import attributes_from_envoy, attributes_from_own
from verifier.request import RequestAttributes
from verifier.settings import parse_settings
from verifier.v1 import verifier_pb2
from verifier.webauthn.assertion import binding

PARTNER = "https://partner.example.test"  # a second issuer, trusted on /partner alone
PEER = "192.0.2.10"
DPOP_KEY = ec.generate_private_key(ec.SECP256R1())
DPOP_JWK = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(DPOP_KEY.public_key()))
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())

CONFIG: dict[str, Any] = {
    "http": {"listen": "127.0.0.1:0"},
    "issuers": [
        {"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["ES256", "RS256", "EdDSA"]},
        {"issuer": PARTNER, "audiences": [AUDIENCE], "algorithms": ["ES256"]},
    ],
    "dpop": {"algorithms": ["ES256"]},
    "edge_cache": {"max_age_seconds": 10, "refusal_max_age_seconds": 5},
    "upstream": {"headers": [{"header": "X-Authenticated-Email", "claim": "email"}]},
    "policies": [
        {"name": "public", "match": {"path_prefix": "/public"}, "require": {"authenticated": False}},
        {"name": "admin-write", "match": {"path_prefix": "/admin", "methods": ["POST", "PUT", "PATCH", "DELETE"]},
         "require": {"roles_any": ["admin"], "scopes_all": ["write"]}},
        {"name": "admin", "match": {"path_prefix": "/admin"}, "require": {"roles_any": ["admin"]}},
        {"name": "strong", "match": {"path_prefix": "/strong"}, "require": {"acr_any": ["phr"]}},
        {"name": "recent", "match": {"path_prefix": "/recent"}, "require": {"max_auth_age_seconds": 60}},
        {"name": "dpop", "match": {"path_prefix": "/dpop"}, "require": {"sender_constraint": "dpop"}},
        {"name": "partner", "match": {"path_prefix": "/partner"}, "require": {"issuers_any": [PARTNER]},
         "upstream": {"headers": [{"header": "X-Authenticated-Tenant", "claim": "tenant"}]}},
        {"name": "admin-host", "match": {"hosts": ["admin.example.test"], "path_prefix": "/"},
         "require": {"roles_any": ["admin"]}},
        {"name": "api", "match": {"path_prefix": "/api"}, "require": {"authenticated": True}},
    ],
}  # fmt: skip


# -- the logical request ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Logical:
    """One request as the client sent it: the gateways below each present it to their door."""

    method: str
    scheme: str
    host: str  # as the client spelled it, without the port
    port: int | None
    target: str  # path and query as received
    authorization: tuple[str, ...]  # one value per Authorization line (0, 1 or 2 lines)
    proof: str  # "", "valid", "wrong_method", "wrong_key": a DPoP proof made for each door anew (its jti)
    headers: tuple[tuple[str, str], ...]  # the client's other headers, names as it spelled them

    @property
    def authority(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    def dpop(self) -> str | None:
        """A fresh proof (its own jti: each door is one more request to the one replay store)."""
        if not self.proof:
            return None
        token = self.authorization[0].split()[-1] if self.authorization else ""
        method = "PATCH" if self.proof == "wrong_method" and self.method != "PATCH" else self.method
        key = OTHER_KEY if self.proof == "wrong_key" else DPOP_KEY
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        proof_claims = {
            "jti": uuid.uuid4().hex,
            "htm": method,
            "htu": f"{self.scheme.lower()}://{self.authority}{self.target.split('?', 1)[0].split('#', 1)[0]}",
            "iat": int(NOW),
            "ath": b64(hashlib.sha256(token.encode()).digest()),
        }
        return jwt.encode(proof_claims, key, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": public})

    def client_headers(self) -> Iterator[tuple[str, str]]:
        """Every header the client sent (Authorization lines and the proof included), as spelled."""
        for i, value in enumerate(self.authorization):
            yield "Authorization" if i == 0 else "authorization", value  # a second line spelled otherwise
        proof = self.dpop()
        if proof is not None:
            yield "DPoP", proof
        yield from self.headers


_DEFAULT_PORTS = {"http": 80, "https": 443}
_FORWARDED = ("x-forwarded-method", "x-forwarded-uri", "x-forwarded-host", "x-forwarded-port", "x-forwarded-proto",
              "x-forwarded-for")  # fmt: skip


def _joined(pairs: Iterator[tuple[str, str]], separator: str) -> dict[str, str]:
    """Header lines as one map, names lower-cased and repeats joined (Kong's PDK and Envoy do this)."""
    joined: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        joined[key] = value if key not in joined else f"{joined[key]}{separator}{value}"
    return joined


def _http(request_line: str, lines: list[tuple[str, str]]) -> bytes:
    return (request_line + "\r\n" + "".join(f"{n}: {v}\r\n" for n, v in lines) + "\r\n").encode("latin-1")


def as_kong(req: Logical) -> bytes:
    """Kong's Lua plugin (and Traefik): the gateway's own X-Forwarded-* (the client's overwritten), the name apart
    from the port, and the client's other headers (Traefik passes them all; Kong the credential headers)."""
    own = [
        ("X-Forwarded-Method", req.method),
        ("X-Forwarded-Proto", req.scheme.lower()),
        ("X-Forwarded-Host", req.host),
        ("X-Forwarded-Port", str(req.port or _DEFAULT_PORTS.get(req.scheme.lower(), 80))),
        ("X-Forwarded-Uri", req.target),
        ("X-Forwarded-For", PEER),
    ]
    rest = [(n, v) for n, v in req.client_headers() if n.lower() not in _FORWARDED]
    return _http("GET /v1/forward-auth HTTP/1.1", [("Host", "verifier:8080"), *own, *rest])


def as_nginx(req: Logical) -> bytes:
    """nginx `auth_request` with the `x-original` family: its own X-Original-*, and every client header passed
    through, the client's X-Forwarded-* included (the door of this family must not read them)."""
    own = [
        ("X-Original-Method", req.method),
        ("X-Original-URI", req.target),
        ("X-Original-Host", req.authority),
        ("X-Original-Proto", req.scheme.lower()),
    ]
    rest = [(n, v) for n, v in req.client_headers() if not n.lower().startswith("x-original-")]
    return _http("GET /v1/forward-auth HTTP/1.1", [("Host", "verifier"), *own, *rest])


def as_envoy_http(req: Logical) -> bytes:
    """Envoy's HTTP ext_authz mode (deploy/envoy/envoy-http.yaml.template): the client's method, the path appended
    to `path_prefix`, Host as the client sent it, x-forwarded-method/-uri/-host added (`headers_to_add`: the host
    from `:authority`, which policies naming hosts need) and x-forwarded-proto set by the edge; the client's other
    headers as `allowed_headers` lets them through (credentials, trace, identity)."""
    own = [("Host", req.authority), ("X-Forwarded-Proto", req.scheme.lower()), ("X-Forwarded-Method", req.method),
           ("X-Forwarded-Uri", req.target), ("X-Forwarded-Host", req.authority)]  # fmt: skip
    allowed = ("authorization", "dpop", "traceparent", "tracestate")
    rest = [(n, v) for n, v in req.client_headers() if n.lower() in allowed or n.lower().startswith("x-authenticated-")]
    return _http(f"{req.method} /v1/forward-auth{req.target} HTTP/1.1", [*own, *rest])


def as_own(req: Logical) -> bytes:
    """Our own CheckRequest as the Kong Python plugin builds it: the port after the host unless the scheme's
    default, header names lower-cased and repeats joined with ", " (Kong's PDK hands them as lists)."""
    scheme = req.scheme.lower()
    host = req.host if req.port in (None, _DEFAULT_PORTS.get(scheme)) else f"{req.host}:{req.port}"
    message = verifier_pb2.CheckRequest(
        method=req.method, scheme=scheme, host=host, path=req.target, client_address=PEER
    )
    message.headers.update(_joined(req.client_headers(), ", "))
    return message.SerializeToString()  # type: ignore[no-any-return]


def as_envoy(req: Logical) -> bytes:
    """Envoy's CheckRequest: `:authority` as the client sent it, header names lower-case and repeats joined with
    "," (Envoy's ext_authz client), x-forwarded-proto set by the edge Envoy (`use_remote_address`), a request id."""
    request = ea.CheckRequest()
    attributes = request.attributes
    attributes.source.address.socket_address.address = PEER
    http = attributes.request.http
    http.id = uuid.uuid4().hex
    http.method, http.scheme, http.host, http.path = req.method, req.scheme.lower(), req.authority, req.target
    headers = _joined(req.client_headers(), ",")
    headers.update({":method": req.method, ":path": req.target, ":authority": req.authority,
                    "x-forwarded-proto": req.scheme.lower(), "x-request-id": http.id})  # fmt: skip
    http.headers.update(headers)
    return request.SerializeToString()  # type: ignore[no-any-return]


def as_own_spelled(req: Logical) -> bytes:
    """Our own CheckRequest from a client that keys the map by each header's spelling (the proto asks for lower
    case; a map keyed `Authorization` and `authorization` is still two lines of one field)."""
    scheme = req.scheme.lower()
    message = verifier_pb2.CheckRequest(
        method=req.method, scheme=scheme, host=req.authority, path=req.target, client_address=PEER
    )
    spelled: dict[str, str] = {}
    for name, value in req.client_headers():
        spelled[name] = value if name not in spelled else f"{spelled[name]}, {value}"
    message.headers.update(spelled)
    return message.SerializeToString()  # type: ignore[no-any-return]


def as_envoy_spelled(req: Logical) -> bytes:
    """Envoy's CheckRequest from a caller of the gRPC port that is not Envoy: the map keyed by each header's
    spelling (Envoy lower-cases the names; `Authorization` beside `authorization` is still two lines of one field)."""
    request = ea.CheckRequest.FromString(as_envoy(req))
    headers = request.attributes.request.http.headers
    edge = (":method", ":path", ":authority", "x-forwarded-proto", "x-request-id")  # set by Envoy (as_envoy)
    lines = [(n, v) for n, v in req.client_headers() if n.lower() not in edge]
    for name, _ in lines:
        headers.pop(name.lower(), None)
    for name, value in lines:
        headers[name] = value if name not in headers else f"{headers[name]},{value}"
    return request.SerializeToString()  # type: ignore[no-any-return]


def as_envoy_raw(req: Logical) -> bytes:
    """Envoy's CheckRequest with `encode_raw_headers: true`: every line apart in `header_map`, values as bytes."""
    request = ea.CheckRequest.FromString(as_envoy(req))
    http = request.attributes.request.http
    lines = [*((n.lower(), v) for n, v in req.client_headers() if n.lower() != "x-forwarded-proto")]
    lines += [
        (n, v) for n, v in http.headers.items() if n.startswith(":") or n in ("x-forwarded-proto", "x-request-id")
    ]
    http.ClearField("headers")
    for name, value in lines:
        http.header_map.headers.add(key=name, raw_value=value.encode("latin-1"))
    return request.SerializeToString()  # type: ignore[no-any-return]


# -- what each answer decides --------------------------------------------------------------------------------


class Verdict(NamedTuple):
    """An answer reduced to what it decides; None: the door cannot express it (each says why)."""

    allowed: bool
    status: int
    reason: str | None
    challenge: tuple[str, ...]  # WWW-Authenticate values
    body: dict[str, Any] | None  # the refusal's JSON (None: no body)
    to_client: tuple[tuple[str, str], ...]  # other headers for the client (Retry-After, DPoP-Nonce, RateLimit*)
    upstream: tuple[tuple[str, str], ...]  # X-Authenticated-* the upstream receives (allowed), sorted
    max_age: int | None  # how long a gateway may reuse the answer (0: no-store)


_GATEWAY_ONLY = {"x-verifier-reason", "cache-control", "x-accel-expires", "content-type", "content-length",
                 "connection", "www-authenticate", "x-envoy-auth-headers-to-remove"}  # fmt: skip
IDENTITY = "x-authenticated-"
GRPC_BY_STATUS = {401: 16, 403: 7, 429: 8, 503: 14, 400: 3, 404: 5}


def _sent_identity(req: Logical) -> dict[str, str]:
    return {n: v for n, v in _joined(req.client_headers(), ", ").items() if n.startswith(IDENTITY)}


def _upstream(sent: dict[str, str], removed: set[str], set_: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The identity headers the upstream receives: the client's, less those removed, overwritten by ours. None of
    the client's may be left: X-Authenticated-* is ours alone."""
    ours = {n.lower(): v for n, v in set_ if n.lower().startswith(IDENTITY)}
    left = {n for n in sent if n not in removed and n not in ours}
    assert not left, f"the client's {sorted(left)} reach the upstream"
    return tuple(sorted(ours.items()))


def _json(body: bytes | str) -> dict[str, Any] | None:
    return json.loads(body) if body else None


def _max_age(cache_control: str) -> int:
    return 0 if cache_control == "no-store" else int(cache_control.rpartition("max-age=")[2])


def forward_verdict(answer: bytes, req: Logical, *, head: bool = False) -> Verdict:
    """The forward-auth answer, its upstream identity as Envoy's HTTP mode applies it (the most trusting of the
    gateways: it removes what `x-envoy-auth-headers-to-remove` names and copies our X-Authenticated-*)."""
    head_bytes, _, body = answer.partition(b"\r\n\r\n")
    lines = head_bytes.decode("utf-8").split("\r\n")
    status = int(lines[0].split()[1])
    headers = [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    named = dict(headers)
    allowed = status == 200
    removed = {n.strip() for n in named.get("x-envoy-auth-headers-to-remove", "").split(",") if n.strip()}
    return Verdict(
        allowed=allowed,
        status=status,
        reason=named.get("x-verifier-reason"),
        challenge=tuple(v for k, v in headers if k == "www-authenticate"),
        # HEAD: the answer has no content (RFC 9110 section 9.3.2), only its content-length says there was one.
        body=None if head else _json(body),
        to_client=tuple(
            (k, v) for k, v in headers if k not in _GATEWAY_ONLY and not k.startswith((IDENTITY, "x-kong-consumer-"))
        ),
        upstream=_upstream(_sent_identity(req), removed, headers) if allowed else (),
        max_age=_max_age(named["cache-control"]),
    )


def own_verdict(answer: bytes, req: Logical) -> Verdict:
    """Our own CheckResponse. Its upstream identity: ours alone. The proto has no list of headers to remove: its
    gateways (both Kong plugins) clear every X-Authenticated-* the client sent before they ask."""
    response = verifier_pb2.CheckResponse.FromString(answer)
    headers = [(h.name.lower(), h.value) for h in response.response_headers]
    return Verdict(
        allowed=response.allowed,
        status=response.http_status,
        reason=response.reason,
        challenge=tuple(v for k, v in headers if k == "www-authenticate"),
        body=_json(response.body),
        to_client=tuple((k, v) for k, v in headers if k != "www-authenticate"),
        upstream=_upstream({}, set(), [(h.name, h.value) for h in response.upstream_headers])
        if response.allowed
        else (),
        max_age=response.cache_max_age_seconds,
    )


def envoy_verdict(answer: bytes, req: Logical) -> Verdict:
    """Envoy's CheckResponse. An allow carries no reason (ok_response headers go to the upstream, or to the
    client: neither is the gateway's) and no reuse (ext_authz remembers no answer); a refusal's answer is the
    client's, `cache-control: no-store`, whatever the gateway-side reuse."""
    response = ea.CheckResponse.FromString(answer)
    if response.status.code == 0:
        ok = response.ok_response
        return Verdict(
            allowed=True,
            status=200,
            reason=None,
            challenge=(),
            body=None,
            to_client=tuple((h.header.key.lower(), h.header.value) for h in ok.response_headers_to_add),
            upstream=_upstream(
                _sent_identity(req), set(ok.headers_to_remove), [(h.header.key, h.header.value) for h in ok.headers]
            ),
            max_age=None,
        )
    denied = response.denied_response
    headers = [(h.header.key.lower(), h.header.value) for h in denied.headers]
    named = dict(headers)
    assert named["cache-control"] == "no-store"
    assert response.status.code == GRPC_BY_STATUS[denied.status.code], (response.status.code, denied.status.code)
    return Verdict(
        allowed=False,
        status=denied.status.code,
        reason=named.get("x-verifier-reason"),
        challenge=tuple(v for k, v in headers if k == "www-authenticate"),
        body=_json(denied.body),
        to_client=tuple((k, v) for k, v in headers if k not in _GATEWAY_ONLY),
        upstream=(),
        max_age=None,
    )


def agree(verdicts: dict[str, Verdict]) -> None:
    """Every field that every door can express is the same in every door."""
    for field in Verdict._fields:
        values = {door: getattr(v, field) for door, v in verdicts.items() if getattr(v, field) is not None}
        assert len(set(map(repr, values.values()))) <= 1, f"{field} differs: {values}"


# -- the App and the doors ---------------------------------------------------------------------------------


async def parity_app(fetcher: FakeFetcher) -> App:
    """The composition root with CONFIG, no listeners, at NOW; the partner's discovery and keys served too."""
    fetcher.serve(PARTNER + "/.well-known/openid-configuration", discovery_document(PARTNER, PARTNER + "/jwks"))
    fetcher.serve(PARTNER + "/jwks", fetcher.documents[discovery_document()["jwks_uri"]][0])
    built = dataclasses.replace(parse_settings(CONFIG), http=None, grpc=None, metrics=None)
    app = App(built, clock=FrozenClock(NOW), fetcher=fetcher)
    await app.start()
    await asyncio.wait_for(app.keys.wait_ready(), 10)
    await asyncio.wait_for(app.wait_serving(), 10)
    return app


def original_door(app: App) -> ForwardAuthDoor:
    """A forward-auth door of the same pipeline whose operator declared the `x-original` family (nginx)."""
    options = dataclasses.replace(app.settings.forward_auth, forwarded_headers="x-original")
    return ForwardAuthDoor(app.pipeline, app.metrics, app.ready, app.router, settings=options)


async def exchange(door: ForwardAuthDoor, raw: bytes, *, head: bool = False) -> bytes:
    """One request on a fresh connection; its whole answer (a first-seen token's is written by its own task)."""
    client = Client(door, PEER)
    client.send(raw)
    for _ in range(10_000):
        out = b"".join(client.wire.out)
        if b"\r\n\r\n" in out:
            head_bytes, _, body = out.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head_bytes.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            if head or len(body) >= length:
                return out
        await asyncio.sleep(0)
    raise AssertionError(f"no answer to {raw!r}")


LLHTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND"}


class Judged:
    """What the pipeline was asked to judge (`decide_cached`, every door's way in), by door."""

    def __init__(self, app: App) -> None:
        self.seen: list[RequestAttributes] = []
        self.by_door: dict[str, RequestAttributes] = {}
        decide = app.pipeline.decide_cached

        def recording(attrs: RequestAttributes, door: str = "") -> Decision | None:
            self.seen.append(attrs)
            return decide(attrs, door)

        app.pipeline.decide_cached = recording  # type: ignore[method-assign]

    def same(self) -> None:
        """Every door judged one request: method, scheme, host, path and the credential (repeats joined as its
        gateway joins them: Envoy with ",", the others with ", ")."""
        judged = {
            door: (a.method, a.scheme, a.host, a.path, (a.headers.get("authorization") or "").replace(", ", ","))
            for door, a in self.by_door.items()
        }
        assert len(set(judged.values())) <= 1, judged


async def through_every_door(
    app: App, original: ForwardAuthDoor, judged: Judged, req: Logical, order: list[str]
) -> dict[str, Verdict]:
    """The request through each door, in `order` (the first door's answer fills the caches the others read)."""
    verdicts: dict[str, Verdict] = {}
    judged.by_door.clear()
    for door in order:
        judged.seen.clear()
        if door == "kong":
            verdicts[door] = forward_verdict(await exchange(app.forward_auth, as_kong(req)), req)
        elif door == "nginx":
            verdicts[door] = forward_verdict(await exchange(original, as_nginx(req)), req)
        elif door == "envoy_http":
            # Door-specific: Envoy's HTTP mode puts the client's method in its own request line, which llhttp
            # parses only for the methods it knows (an Envoy in front refuses others itself), and appends the
            # client's path to /v1/forward-auth, which with dot segments can lead out of the door (404 by design:
            # README "What each door trusts"; the deployed template adds X-Forwarded-Uri, which the door reads).
            path = ("/v1/forward-auth" + req.target).split("?", 1)[0].encode("latin-1")
            if req.method not in LLHTTP_METHODS or _leaves_door(path) or not req.target.startswith("/"):
                continue
            head = req.method == "HEAD"
            verdicts[door] = forward_verdict(
                await exchange(app.forward_auth, as_envoy_http(req), head=head), req, head=head
            )
        elif door == "grpc":
            verdicts[door] = own_verdict(await app.grpc.check_own(as_own(req), None), req)
        elif door == "grpc_spelled":
            verdicts[door] = own_verdict(await app.grpc.check_own(as_own_spelled(req), None), req)
        elif door == "ext_authz":
            verdicts[door] = envoy_verdict(await app.grpc.check_envoy(as_envoy(req), None), req)
        elif door == "ext_authz_spelled":
            verdicts[door] = envoy_verdict(await app.grpc.check_envoy(as_envoy_spelled(req), None), req)
        else:
            verdicts[door] = envoy_verdict(await app.grpc.check_envoy(as_envoy_raw(req), None), req)
        if judged.seen:  # else answered from the forward-auth door's memo (the same bytes seen before)
            judged.by_door[door] = judged.seen[0]
    return verdicts


DOORS = ["kong", "nginx", "envoy_http", "grpc", "grpc_spelled", "ext_authz", "ext_authz_spelled", "ext_authz_raw"]


# -- tokens --------------------------------------------------------------------------------------------------


def tokens(mint: Mint) -> dict[str, str]:
    """Every kind of credential the property draws from."""
    jkt = thumbprint(DPOP_JWK)
    return {
        "user": mint(claims(email="user-1@example.test")),
        "admin": mint(claims(sub="boss", roles=["admin"], acr="phr", auth_time=int(NOW) - 30, email="b@example.test")),
        "reader": mint(claims(sub="reader", roles=["admin"], scope="read")),
        "expired": mint(claims(exp=int(NOW) - 600, iat=int(NOW) - 900, nbf=int(NOW) - 900)),
        "not_yet": mint(claims(nbf=int(NOW) + 600, iat=int(NOW))),
        "wrong_aud": mint(claims(aud="https://elsewhere.example.test")),
        "wrong_iss": mint(claims(iss="https://evil.example.test")),
        "partner": mint(claims(iss=PARTNER, sub="p-1", tenant="acme")),
        "dpop_bound": mint(claims(sub="holder", cnf={"jkt": jkt})),
        "alg_none": compact({"alg": "none", "typ": "at+jwt"}, claims(), b"").rstrip("."),
        "alg_none_dot": compact({"alg": "none", "typ": "at+jwt"}, claims(), b""),
        "garbage": "a.b.c",
        "not_b64": "tok$en",
        "opaque": "2YotnFZFEjr1zCsicMWpAA",
    }


# -- strategies ----------------------------------------------------------------------------------------------

SEGMENTS = ["public", "admin", "api", "strong", "recent", "dpop", "partner", "users", "x", "ADMIN", "Public",
            "..", ".", "%2e%2e", "%2E", "%2F", "%61dmin", "..;", "a;b=c", "", "%25", "\\"]  # fmt: skip
SUFFIXES = ["", "?q=1", "?next=/admin&x=%2F", "#frag", "#/../admin", "?a=1#b", "/"]
CLEAN = ["/public/x", "/admin/users", "/api/orders/42", "/strong/x", "/recent/x", "/dpop/x", "/partner/x", "/nowhere",
         "/", "/api/x?q=1"]  # fmt: skip
odd_paths = st.builds(
    lambda first, rest, suffix, slash: ("/" if slash else "") + "/".join([first, *rest]) + suffix,
    st.sampled_from(["public", "admin", "api", "strong", "recent", "dpop", "partner", "nowhere", "", "/admin"]),
    st.lists(st.sampled_from(SEGMENTS), max_size=3),
    st.sampled_from(SUFFIXES),
    st.booleans(),
)
paths = st.one_of(st.sampled_from(CLEAN), odd_paths)
TOKEN_KINDS = ["user", "admin", "reader", "expired", "not_yet", "wrong_aud", "wrong_iss", "partner", "dpop_bound",
               "alg_none", "alg_none_dot", "garbage", "not_b64", "opaque"]  # fmt: skip
GOOD_KINDS = ["user", "admin", "reader", "partner", "dpop_bound"]
authorizations = st.one_of(
    st.builds(lambda kind: (f"Bearer {kind}",), st.sampled_from(GOOD_KINDS)),
    st.builds(lambda kind: (f"DPoP {kind}",), st.just("dpop_bound")),
    st.just(()),
    st.builds(
        lambda scheme, space, kind: (f"{scheme}{space}{kind}",),
        st.sampled_from(["Bearer", "bearer", "BEARER", "DPoP", "dpop", "Basic"]),
        st.sampled_from([" ", "  "]),
        st.sampled_from(TOKEN_KINDS),
    ),
    st.tuples(st.sampled_from(["Bearer user", "Bearer admin"]), st.sampled_from(["Bearer admin", "Bearer garbage"])),
)
SMUGGLED = [
    ("X-Authenticated-Userid", "admin"),
    ("X-Authenticated-Roles", "admin"),
    ("x-authenticated-email", "ceo@example.test"),
    ("X-AUTHENTICATED-TENANT", "acme"),
    ("X-Forwarded-Uri", "/public"),
    ("X-Forwarded-Method", "GET"),
    ("X-Forwarded-Host", "public.example.test"),
    ("X-Forwarded-Proto", "http"),
    ("X-Original-URI", "/public"),
    ("X-Original-Method", "GET"),
    ("X-Original-Host", "api.example.test"),
    ("X-HTTP-Method-Override", "GET"),
    ("X-Envoy-Original-Path", "/public"),
    ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ("Forwarded", "for=198.51.100.1;proto=http;host=public.example.test"),
]
requests = st.builds(
    Logical,
    method=st.sampled_from(["GET", "HEAD", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "get", "PROPFIND", "M-SEARCH"]),
    scheme=st.sampled_from(["https", "http", "HTTPS"]),
    host=st.sampled_from(["api.example.test", "admin.example.test", "API.Example.TEST", "admin.example.test."]),
    port=st.sampled_from([None, 443, 80, 8443]),
    target=paths,
    authorization=authorizations,
    proof=st.sampled_from(["", "", "valid", "valid", "wrong_method", "wrong_key"]),
    headers=st.lists(st.sampled_from(SMUGGLED), max_size=4, unique=True).map(tuple),
)


def resolved(req: Logical, minted: dict[str, str]) -> Logical:
    """The request with each Authorization value's token kind replaced by the token."""
    values = []
    for value in req.authorization:
        scheme, space, kind = value.rpartition(" ")
        values.append(f"{scheme}{space}{minted.get(kind, kind)}")
    return dataclasses.replace(req, authorization=tuple(values))


# -- the property --------------------------------------------------------------------------------------------


def test_every_door_decides_a_request_as_every_other(mint: Mint, fetcher: FakeFetcher) -> None:
    loop = asyncio.new_event_loop()
    app = loop.run_until_complete(parity_app(fetcher))
    original = original_door(app)
    judged = Judged(app)
    minted = tokens(mint)

    @settings(max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(req=requests, order=st.permutations(DOORS), forget=st.booleans())
    @example(
        req=Logical("GET", "https", "api.example.test", None, "/api/x", ("Bearer user",), "",
                    (("X-Authenticated-Userid", "admin"),)),
        order=DOORS, forget=True,
    )  # fmt: skip
    @example(  # the route's own upstream header set, the default one (email) absent: the client's removed
        req=Logical("GET", "https", "api.example.test", 443, "/partner/x", ("Bearer partner",), "",
                    (("X-AUTHENTICATED-TENANT", "evil"), ("x-authenticated-email", "ceo@example.test"))),
        order=DOORS[::-1], forget=True,
    )  # fmt: skip
    @example(  # an anonymous allow sets no identity: every X-Authenticated-* the client sent is removed
        req=Logical("HEAD", "http", "API.Example.TEST.", 8443, "/public/x", (), "",
                    (("X-Authenticated-Userid", "admin"), ("X-Authenticated-Roles", "admin"))),
        order=DOORS, forget=False,
    )  # fmt: skip
    @example(  # a DPoP-bound token with its proof, the proof's htu without the default port
        req=Logical("DELETE", "https", "api.example.test", 443, "/dpop/x?y=1", ("DPoP dpop_bound",), "valid",
                    (("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),)),
        order=DOORS, forget=True,
    )  # fmt: skip
    def one(req: Logical, order: list[str], forget: bool) -> None:
        if forget:  # this time the first door is first to see the token
            app.positive.clear()
            app.negative.clear()
        resolved_req = resolved(req, minted)
        verdicts = loop.run_until_complete(through_every_door(app, original, judged, resolved_req, order))
        judged.same()
        agree(verdicts)

    try:
        one()
    finally:
        loop.run_until_complete(app.stop(grace=0.1))
        loop.close()


# -- focused regressions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "authority", "host"),
    [
        ("https", "api.example.test:443", "api.example.test"),
        ("http", "API.Example.test.:80", "api.example.test"),
        ("https", "[::1]:443", "[::1]"),
        ("https", "api.example.test:80", "api.example.test:80"),  # not https' default: kept
        ("http", "api.example.test:8443", "api.example.test:8443"),
    ],
)
def test_every_door_spells_a_host_with_its_schemes_default_port_as_the_host_alone(
    scheme: str, authority: str, host: str
) -> None:
    """`api.example.test:443` over https is `api.example.test` (RFC 3986 section 6.2.3) through every door. Kong's
    plugins send the port apart and forward-auth left a default one out, while nginx's X-Original-Host, a Host
    header, our own CheckRequest's host and Envoy's :authority kept it: a WebAuthn step-up challenge is bound to
    the request's host (`binding`), so the same request was bound to two hosts depending on the door."""
    logical = Logical("GET", scheme, authority.rpartition(":")[0], int(authority.rpartition(":")[2]), "/x", (), "", ())
    translated = {
        "kong": attributes_from_http("GET", b"/v1/forward-auth", _head(as_kong(logical)), PEER),
        "nginx": attributes_from_http(
            "GET", b"/v1/forward-auth", _head(as_nginx(logical)), PEER, FORWARDED_FAMILIES["x-original"]
        ),
        "envoy_http": attributes_from_http("GET", b"/v1/forward-auth/x", _head(as_envoy_http(logical)), PEER),
        "traefik": attributes_from_http(
            "GET",
            b"/v1/forward-auth",
            {"x-forwarded-host": authority, "x-forwarded-proto": scheme, "x-forwarded-uri": "/x"},
            PEER,
        ),
        "grpc": attributes_from_own(verifier_pb2.CheckRequest(method="GET", scheme=scheme, host=authority, path="/x")),
        "ext_authz": attributes_from_envoy(ea.CheckRequest.FromString(as_envoy(logical))),
    }
    assert {door: attrs.host for door, attrs in translated.items()} == dict.fromkeys(translated, host)
    assert len({binding(attrs) for attrs in translated.values()}) == 1


def _head(raw: bytes) -> dict[str, str]:
    """The header fields of a raw request, as the forward-auth door keys them (names lower-case)."""
    lines = raw.decode("latin-1").split("\r\n\r\n", 1)[0].split("\r\n")[1:]
    return _joined(((n, v.strip()) for n, _, v in (line.partition(":") for line in lines)), ", ")


DESCRIBED = {
    "x-forwarded": {"method": "X-Forwarded-Method", "path": "X-Forwarded-Uri", "host": "X-Forwarded-Host",
                    "scheme": "X-Forwarded-Proto", "port": "X-Forwarded-Port"},
    "x-original": {"method": "X-Original-Method", "path": "X-Original-URI", "host": "X-Original-Host",
                   "scheme": "X-Original-Proto"},
}  # fmt: skip
CLIENT_SAYS = {"method": "GET", "path": "/public", "host": "api.example.test", "scheme": "https", "port": "443"}
GATEWAY_SAYS = {
    "method": "DELETE",
    "path": "/admin/users",
    "host": "admin.example.test",
    "scheme": "http",
    "port": "8443",
}


@pytest.mark.parametrize("first", ["client", "gateway"])
@pytest.mark.parametrize(
    ("family", "field"), [(family, field) for family, fields in DESCRIBED.items() for field in fields]
)
async def test_a_header_of_the_declared_family_sent_twice_is_refused_never_judged_joined(
    fetcher: FakeFetcher, family: str, field: str, first: str
) -> None:
    """A gateway that adds its X-Forwarded-Uri beside the client's instead of overwriting it (HAProxy `add-header`,
    Apache `RequestHeader add`) sent two: joined as RFC 9110 section 5.3 joins repeats, `/public, /admin/users`
    met the anonymous /public policy and the request for /admin/users passed without a token. A gRPC door has one
    field for each: the forward-auth door cannot tell which line is the gateway's, so it refuses (400
    `invalid_request`, no reuse), whichever comes first. The other family is never read: sent twice, ignored."""
    app = await parity_app(fetcher)
    try:
        door = app.forward_auth if family == "x-forwarded" else original_door(app)
        other = "x-original" if family == "x-forwarded" else "x-forwarded"
        gateway = [(DESCRIBED[family][f], GATEWAY_SAYS[f]) for f in DESCRIBED[family] if f not in ("method", "path")]
        gateway += [(DESCRIBED[family]["method"], "GET"), (DESCRIBED[family]["path"], "/admin/users")]
        client = (DESCRIBED[family][field], CLIENT_SAYS[field])
        lines = [client, *gateway] if first == "client" else [*gateway, client]
        answer = forward_verdict(
            await exchange(door, _http("GET /v1/forward-auth HTTP/1.1", [("Host", "v"), *lines])), _NOBODY
        )
        assert (answer.status, answer.reason, answer.max_age) == (400, "invalid_request", 0)
        # the other family twice: never read, so the gateway's description alone is judged
        twice = [(n, v) for n in DESCRIBED[other].values() for v in ("/public", "/public")]
        answer = forward_verdict(
            await exchange(door, _http("GET /v1/forward-auth HTTP/1.1", [("Host", "v"), *gateway, *twice])), _NOBODY
        )
        assert (answer.status, answer.reason) == (401, "token_missing")
    finally:
        await app.stop(grace=0.1)


_NOBODY = Logical("GET", "https", "api.example.test", None, "/", (), "", ())


@pytest.mark.parametrize("valid_first", [True, False])
async def test_our_own_check_joins_two_spellings_of_authorization_as_forward_auth_joins_two_lines(
    fetcher: FakeFetcher, mint: Mint, valid_first: bool
) -> None:
    """A CheckRequest whose map holds `Authorization` and `authorization` carries two credentials, as a request
    with two Authorization lines does. Forward-auth and Envoy join repeats (RFC 9110 section 5.3) and refuse the
    two (400 `invalid_request`); our own door lower-cased the names into one dict and kept whichever the map
    yielded last, so a valid token beside garbage was judged, and allowed, alone."""
    app = await parity_app(fetcher)
    try:
        pair = [("Authorization", f"Bearer {mint(claims())}"), ("authorization", "Bearer a.b.c")]
        message = verifier_pb2.CheckRequest(method="GET", scheme="https", host="api.example.test", path="/api/x")
        message.headers.update(pair if valid_first else pair[::-1])
        own = own_verdict(await app.grpc.check_own(message.SerializeToString(), None), _NOBODY)
        lines = [("Host", "v"), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "api.example.test"),
                 ("X-Forwarded-Uri", "/api/x"), *(pair if valid_first else pair[::-1])]  # fmt: skip
        forward = forward_verdict(
            await exchange(app.forward_auth, _http("GET /v1/forward-auth HTTP/1.1", lines)), _NOBODY
        )
        assert (own.allowed, own.status, own.reason) == (forward.allowed, forward.status, forward.reason)
        assert (own.status, own.reason) == (400, "invalid_request")
    finally:
        await app.stop(grace=0.1)


# -- a hostile caller of Envoy's Check ------------------------------------------------------------------------

VALID = "<valid>"  # replaced by a token the issuer signed
HOSTILE_ENVOY = {
    # name: (Envoy's form, the client's lines as Envoy presented them, the host and path the attributes say, the
    # host and path in the request's own pseudo-headers (Envoy's :authority / :path; None: the same))
    "Authorization in upper case": ("headers", [("Authorization", f"Bearer {VALID}")], None),
    "two spellings, the valid one lower": ("headers", [("Authorization", "Bearer a.b.c"),
                                                       ("authorization", f"Bearer {VALID}")], None),
    "two spellings, the valid one upper": ("headers", [("AUTHORIZATION", f"Bearer {VALID}"),
                                                       ("authorization", "Bearer a.b.c")], None),
    "a raw line twice": ("header_map", [("authorization", f"Bearer {VALID}"), ("authorization", "Bearer a.b.c")], None),
    "a raw line in upper case": ("header_map", [("AUTHORIZATION", f"Bearer {VALID}")], None),
    "non-UTF-8 bytes in a raw value": ("header_map", [("authorization", "Bearer \xff\xfe\x80")], None),
    ":authority and host naming another host": ("headers", [("authorization", f"Bearer {VALID}")],
                                                ("api.example.test", "/api/x")),
    ":path naming another path": ("headers", [("authorization", f"Bearer {VALID}")],
                                  ("admin.example.test", "/public/x")),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE_ENVOY))
@pytest.mark.parametrize(("host", "path"), [("admin.example.test", "/admin/users"), ("api.example.test", "/api/x")])
async def test_a_hostile_envoy_check_is_decided_as_forward_auth_decides_the_request_it_describes(
    fetcher: FakeFetcher, mint: Mint, case: str, host: str, path: str
) -> None:
    """A caller of the gRPC port that is not Envoy spells what Envoy never does: names in upper case (Envoy
    lower-cases them), two spellings of Authorization, a raw line twice, bytes that are not UTF-8, pseudo-headers
    that disagree with the attributes. Each is decided as forward-auth decides the request it describes (method,
    host and path from the attributes, as forward-auth takes them from X-Forwarded-*, never from Host). Envoy's door
    kept map names as sent: `Authorization` was no credential (401 `token_missing` for a valid token), and of
    `Authorization` and `authorization` it judged the lower-case one alone (a valid token beside garbage allowed,
    where two lines are 400 `invalid_request`)."""
    form, lines, pseudo = HOSTILE_ENVOY[case]
    token = mint(claims(sub="u", roles=["user"]))
    lines = [(n, v.replace(VALID, token)) for n, v in lines]
    authority, target = pseudo or (host, path)
    app = await parity_app(fetcher)
    try:
        request = ea.CheckRequest()
        request.attributes.source.address.socket_address.address = PEER
        http = request.attributes.request.http
        http.method, http.scheme, http.host, http.path = "GET", "https", host, path
        own = [(":method", "GET"), (":path", target), (":authority", authority), ("host", authority),
               ("x-forwarded-proto", "https")]  # fmt: skip
        if form == "headers":
            for name, value in [*own, *lines]:
                http.headers[name] = value
        else:
            for name, value in [*own, *lines]:
                http.header_map.headers.add(key=name, raw_value=value.encode("latin-1"))
        envoy = envoy_verdict(await app.grpc.check_envoy(request.SerializeToString(), None), _NOBODY)
        described = [("Host", authority), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", host),
                     ("X-Forwarded-Uri", path), ("X-Forwarded-Method", "GET"), *lines]  # fmt: skip
        forward = forward_verdict(
            await exchange(app.forward_auth, _http("GET /v1/forward-auth HTTP/1.1", described)), _NOBODY
        )
        assert (envoy.allowed, envoy.status, envoy.reason or "ok") == (forward.allowed, forward.status, forward.reason)
        assert envoy.upstream == forward.upstream
    finally:
        await app.stop(grace=0.1)


async def test_an_empty_check_and_a_huge_credential_are_decided_as_forward_auth_decides_them(
    fetcher: FakeFetcher,
) -> None:
    """Our CheckRequest with only the path `/`, Envoy's likewise, and a forward-auth check with no header at all (the
    path `/` after the door's) describe one request (`GET /` on no host): the parity policies name hosts, so every
    door refuses it alike, 400 `invalid_request` naming the host its gateway did not send (judged on no host, it met
    none of its host's policies and fell to a laxer one). With no path at all (our empty
    CheckRequest, Envoy's with an empty `http`, forward-auth with nothing after the door's), nothing tells the path:
    every door refuses it alike, 400 `invalid_request` naming what its gateway did not send, never judged as `/`
    (the gRPC doors judged it as `/`: a public `/` let every path through). A 900 KB Authorization is one malformed
    credential through every door."""
    app = await parity_app(fetcher)
    try:
        root = ea.CheckRequest()
        root.attributes.request.http.path = "/"
        own_root = verifier_pb2.CheckRequest(path="/").SerializeToString()
        verdicts = {
            "grpc": own_verdict(await app.grpc.check_own(own_root, None), _NOBODY),
            "ext_authz": envoy_verdict(await app.grpc.check_envoy(root.SerializeToString(), None), _NOBODY),
            "kong": forward_verdict(
                await exchange(app.forward_auth, _http("GET /v1/forward-auth/ HTTP/1.1", [])), _NOBODY
            ),
        }
        no_host = {door: (verdict.body or {}).pop("error_description") for door, verdict in verdicts.items()}
        assert no_host == {
            "grpc": "the gateway sent no host (verifier.v1.CheckRequest.host), and the policies name hosts",
            "ext_authz": "the gateway sent no host (attributes.request.http.host), and the policies name hosts",
            "kong": "the gateway sent no x-forwarded-host header, and the policies name hosts",
        }
        agree({door: v._replace(challenge=tuple(c.replace(no_host[door], "") for c in v.challenge))
               for door, v in verdicts.items()})  # fmt: skip
        assert (verdicts["grpc"].status, verdicts["grpc"].reason) == (400, "invalid_request")
        bare = ea.CheckRequest()
        bare.attributes.request.http.SetInParent()
        untold = {
            "grpc": own_verdict(await app.grpc.check_own(b"", None), _NOBODY),
            "ext_authz": envoy_verdict(await app.grpc.check_envoy(bare.SerializeToString(), None), _NOBODY),
            "kong": forward_verdict(
                await exchange(app.forward_auth, _http("GET /v1/forward-auth HTTP/1.1", [])), _NOBODY
            ),
        }
        missing = {door: (verdict.body or {}).pop("error_description") for door, verdict in untold.items()}
        assert missing == {
            "grpc": "the gateway sent no path (verifier.v1.CheckRequest.path)",
            "ext_authz": "the gateway sent no path (attributes.request.http.path)",
            "kong": "the gateway sent no x-forwarded-uri header and no path after /v1/forward-auth",
        }
        # Alike but for the description, in the body and the challenge.
        agree({door: v._replace(challenge=tuple(c.replace(missing[door], "") for c in v.challenge))
               for door, v in untold.items()})  # fmt: skip
        assert (untold["grpc"].allowed, untold["grpc"].status, untold["grpc"].reason) == (False, 400, "invalid_request")
        huge = f"Bearer {'a.b.' * 225_000}"
        own = verifier_pb2.CheckRequest(method="GET", scheme="https", host="api.example.test", path="/api/x")
        own.headers["authorization"] = huge
        envoy = ea.CheckRequest()
        http = envoy.attributes.request.http
        http.method, http.scheme, http.host, http.path = "GET", "https", "api.example.test", "/api/x"
        http.headers["authorization"] = huge
        verdicts = {
            "grpc": own_verdict(await app.grpc.check_own(own.SerializeToString(), None), _NOBODY),
            "ext_authz": envoy_verdict(await app.grpc.check_envoy(envoy.SerializeToString(), None), _NOBODY),
        }
        agree(verdicts)
        assert (verdicts["grpc"].status, verdicts["grpc"].reason) == (401, "token_malformed")
    finally:
        await app.stop(grace=0.1)


# -- a header the Envoy door reads once, sent twice ------------------------------------------------------------

READ_ONCE = {
    # header: (the path, the Authorization line, the two values: each alone would be judged)
    "x-forwarded-proto": ("/api/x", f"Bearer {VALID}", ("https", "http")),
    "authorization": ("/api/x", None, (f"Bearer {VALID}", "Bearer a.b.c")),
    "dpop": ("/dpop/x", f"DPoP {VALID}", ("<proof>", "<proof>")),
}
ENVOY_FORMS = ["header_map", "headers joined", "headers spelled twice", "one line"]


@pytest.mark.parametrize("form", ENVOY_FORMS)
@pytest.mark.parametrize("header", list(READ_ONCE))
async def test_a_header_the_envoy_door_reads_once_sent_twice_is_refused_as_forward_auth_refuses_it(
    fetcher: FakeFetcher, mint: Mint, header: str, form: str
) -> None:
    """Envoy's door reads `x-forwarded-proto` (the scheme), Authorization and DPoP once each. Sent twice (two
    `header_map` lines; joined with "," in Envoy's map; two spellings of the name in the map), each is refused as
    forward-auth refuses the same header on two lines: the same status, error code, description and challenge. Before,
    Envoy's door joined two X-Forwarded-Proto lines into the scheme `https, http` and allowed the request, where
    forward-auth refuses its family's header twice (400 `invalid_request`, the gateway described the request twice).
    One `header_map` entry holding both values (`one line`) is refused too: real Envoy (1.40) joins two
    X-Forwarded-Proto lines into one such entry (`https,http`, an inline header of its own), so the door cannot tell it
    from a list the client sent on one line, which forward-auth judges as one scheme (no policy reads it; DPoP
    refuses it)."""
    path, authorization, values = READ_ONCE[header]
    token = mint(claims(sub="holder", cnf={"jkt": thumbprint(DPOP_JWK)}) if header == "dpop" else claims())
    proofs = [Logical("GET", "https", "api.example.test", None, path, (f"DPoP {token}",), "valid", ()).dpop()
              for _ in values]  # fmt: skip
    twice = [(header, v.replace(VALID, token).replace("<proof>", proofs[i] or "")) for i, v in enumerate(values)]
    if form == "one line":
        twice = [(header, ", ".join(v for _, v in twice))]
    lines = [("authorization", authorization.replace(VALID, token))] if authorization else []
    app = await parity_app(fetcher)
    try:
        request = ea.CheckRequest()
        request.attributes.source.address.socket_address.address = PEER
        http = request.attributes.request.http
        http.method, http.scheme, http.host, http.path = "GET", "https", "api.example.test", path
        own = [(":method", "GET"), (":path", path), (":authority", "api.example.test")]
        if header != "x-forwarded-proto":
            own.append(("x-forwarded-proto", "https"))
        if form in ("header_map", "one line"):
            for name, value in [*own, *lines, *twice]:
                http.header_map.headers.add(key=name, raw_value=value.encode("latin-1"))
        else:
            for name, value in [*own, *lines]:
                http.headers[name] = value
            if form == "headers joined":
                http.headers[header] = ",".join(v for _, v in twice)
            else:
                http.headers[header], http.headers[header.upper()] = (v for _, v in twice)
        envoy = envoy_verdict(await app.grpc.check_envoy(request.SerializeToString(), None), _NOBODY)
        described = [("Host", "v"), ("X-Forwarded-Host", "api.example.test"), ("X-Forwarded-Uri", path),
                     ("X-Forwarded-Method", "GET"), *lines, *twice]  # fmt: skip
        if header != "x-forwarded-proto":
            described.append(("X-Forwarded-Proto", "https"))
        forward = forward_verdict(
            await exchange(app.forward_auth, _http("GET /v1/forward-auth HTTP/1.1", described)), _NOBODY
        )
        if form == "one line" and header == "x-forwarded-proto":
            assert forward.allowed  # one line to forward-auth, one scheme `https, http` (the divergence kept)
            assert (envoy.status, envoy.reason) == (400, "invalid_request")
            return
        agree({"ext_authz": envoy, "kong": forward})
        assert not forward.allowed and forward.status in (400, 401), forward
        if header == "x-forwarded-proto":
            assert (envoy.status, envoy.reason) == (400, "invalid_request")
    finally:
        await app.stop(grace=0.1)


@pytest.mark.parametrize("method", ["GET, DELETE", "DELETE,GET", " DELETE", "DELETE "])
async def test_a_method_told_twice_in_one_line_or_with_white_space_is_refused_through_every_door(
    fetcher: FakeFetcher, mint: Mint, method: str
) -> None:
    """A read-only admin token on `/admin/users`: DELETE needs the `write` scope (policy admin-write). Forward-auth
    refuses two X-Forwarded-Method lines (400); one line `GET, DELETE` (a gateway appending its own to the client's in
    one line, as RFC 9110 section 5.3 joins two) met no policy naming methods and passed on the plain admin policy
    while the upstream served the DELETE, through every door (our own and Envoy's `method` likewise). Now each method
    it holds is a reading of the route (ambiguous under two policies: 400 `invalid_request`). ` DELETE` (forward-auth's
    parser trims it; a caller of a gRPC door need not) is judged as DELETE by every door (403 `scope_missing`)."""
    token = mint(claims(sub="reader", roles=["admin"], scope="read"))
    app = await parity_app(fetcher)
    try:
        lines = [("Host", "v"), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "api.example.test"),
                 ("X-Forwarded-Uri", "/admin/users"), ("X-Forwarded-Method", method),
                 ("Authorization", f"Bearer {token}")]  # fmt: skip
        own = verifier_pb2.CheckRequest(
            method=method, scheme="https", host="api.example.test", path="/admin/users", client_address=PEER
        )
        own.headers["authorization"] = f"Bearer {token}"
        envoy = ea.CheckRequest()
        http = envoy.attributes.request.http
        http.method, http.scheme, http.host, http.path = method, "https", "api.example.test", "/admin/users"
        http.headers.update({"authorization": f"Bearer {token}", "x-forwarded-proto": "https"})
        verdicts = {
            "kong": forward_verdict(
                await exchange(app.forward_auth, _http("GET /v1/forward-auth HTTP/1.1", lines)), _NOBODY
            ),
            "grpc": own_verdict(await app.grpc.check_own(own.SerializeToString(), None), _NOBODY),
            "ext_authz": envoy_verdict(await app.grpc.check_envoy(envoy.SerializeToString(), None), _NOBODY),
        }
        agree(verdicts)
        expected = (403, "scope_missing") if method.strip() == "DELETE" else (400, "invalid_request")
        assert (verdicts["kong"].status, verdicts["kong"].reason) == expected
    finally:
        await app.stop(grace=0.1)
