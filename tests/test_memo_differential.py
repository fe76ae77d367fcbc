"""Every memo and cache against none at all: two Apps built from one config, on one clock and one provider.

The first App is the composition root as shipped: the forward-auth door's answer memo, the gRPC doors' request
and answer memos, the verified-token and refused-token caches. The second is the same config with both token
caches at 0 entries, which turns every memo off too (`App`: remembered answers stand for cached tokens): each of
its requests is parsed, verified and checked from scratch. Both are driven through the same generated sequence of
requests (a few drawn per example and sent again and again: tokens of users, roles, a client, DPoP-bound with fresh
and replayed proofs, near `exp`, before `nbf`, signed by a rotated key, junk; on routes that differ by path, method
and host, with roles, scopes, `max_auth_age_seconds`, DPoP, WebAuthn step-up and their own upstream headers; through
the three doors) and of state changes, applied to both alike: the clock (across `exp` and its leeway, `nbf`, the
authentication age, the reuse windows and the identity assertion's renewals), kill-switch entries made and lifted
through the admin API (subject, email, session, a disabled account), SSF events (CAEP session-revoked and
credential-change, RISC account-disabled and -enabled), claims announcements, the revocation store unheard and
reloaded, JWKS rotation, key withdrawal and key replacement under its kid, and a reload (new workers).

Each request is asked three times of each App's door (a first-seen token's answer is not remembered, its second one
is, the third may be the remembered one), and the two answers must be the same decision (`same_decision`):

- forward-auth: the status line, every header and the body;
- our gRPC Check: every field of its `CheckResponse`;
- Envoy's: every field of its `CheckResponse`;

but for the identity assertion (`X-Authenticated-Identity`) and a step-up refusal's fresh WebAuthn challenge. The
App without caches mints an assertion for every request, the other hands one out until half its life: the
assertions' JOSE headers and claims must be equal but for their own `iat`, `exp` and `jti`; the remembered one must
be issued by now and valid for as long as its answer may be reused (at least as long as a new one would be); and
the reuse time (`Cache-Control`, `X-Accel-Expires`, `cache_max_age_seconds`), which follows the assertion's age,
may differ only within the configured ceiling. A difference where the memoized App allows and the other refuses is
reported as a bypass (`BYPASS:`); any other is a correctness bug.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from doorkit import Wire
from envoy.service.auth.v3 import external_auth_pb2 as ea
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ssf_transmitter import ACCOUNT_DISABLED, ACCOUNT_ENABLED, CREDENTIAL_CHANGE, SESSION_REVOKED, SsfTransmitter
from support import FrozenClock
from tokenkit import AUDIENCE, ISSUER, JWKS_URL, KIDS, NOW, FakeFetcher, Mint, SigningKeys, claims, public_jwk

from verifier.app import App
from verifier.binding.dpop import access_token_hash, thumbprint
from verifier.doors.forward_auth import ForwardAuthDoor, _Connection
from verifier.doors.routes import HttpRequest
from verifier.revocation.entry import Effect, Entry, KeyKind, Match, SubjectKey
from verifier.settings import ADMIN_TOKEN_ENV, CacheSettings, Settings, parse_settings
from verifier.v1 import verifier_pb2
from verifier.webauthn import WebAuthnConfig

ADMIN = "admin-secret-0123456789-abcdefghijkl"
TX = "https://ssf.example.test"
RECEIVER = "https://verifier.example.test/ssf"
ASSERTION = "x-authenticated-identity"
HOST = "api.example.test"
PEER = "10.0.0.7"
LIFETIME = 12  # the identity assertion's: renewed every 6 s


def document(assertion_key: Path | None) -> dict[str, Any]:
    """The config both Apps are built from (the second with its token caches at 0 entries)."""
    policies: list[dict[str, Any]] = [
        {"match": {"hosts": ["admin.example.test"]}, "require": {"roles_any": ["admin"]}},
        {"match": {"path_prefix": "/admin", "methods": ["DELETE"]}, "require": {"roles_any": ["admin"]}},
        {"match": {"path_prefix": "/admin"}, "require": {"scopes_all": ["read"]}},
        {"match": {"path_prefix": "/recent"}, "require": {"max_auth_age_seconds": 60}},
        {"match": {"path_prefix": "/dpop"}, "require": {"sender_constraint": "dpop"}},
        {"match": {"path_prefix": "/pay"}, "require": {"step_up": "webauthn"}},
        {
            "match": {"path_prefix": "/orders"},
            "require": {"authenticated": True},
            "upstream": {"headers": [{"header": "X-Authenticated-Email", "claim": "email"}]},
        },
        {"match": {"path": "/health"}, "require": {"authenticated": False}},
        {"match": {"path_prefix": "/api"}, "require": {"authenticated": True}},
    ]
    config: dict[str, Any] = {
        "http": {"listen": "127.0.0.1:0"},  # parsed, never bound (`build`)
        "issuers": [
            {"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["ES256", "RS256"], "leeway_seconds": 5}
        ],
        "policies": policies,
        "dpop": {"algorithms": ["ES256"]},
        "edge_cache": {"max_age_seconds": 10, "refusal_max_age_seconds": 5},
        "revocation": {
            "transmitters": [
                {"issuer": TX, "audience": RECEIVER, "delivery": "push", "subjects_of": [ISSUER]},
            ],
        },
    }
    if assertion_key is not None:
        config["upstream"] = {
            "identity_token": {
                "issuer": "https://verifier.internal",
                "algorithm": "ES256",
                "private_key_file": str(assertion_key),
                "audience": "https://orders.internal",
                "lifetime_seconds": LIFETIME,
                "claims": ["sub", "scope", "roles"],
            }
        }
    return config


class Keepalive:
    """One keep-alive connection to a forward-auth door, reopened when the door closed it."""

    def __init__(self, door: ForwardAuthDoor) -> None:
        self.door = door
        self._open()

    def _open(self) -> None:
        self.wire = Wire(PEER)
        self.connection = _Connection(self.door)
        self.connection.connection_made(self.wire)  # type: ignore[arg-type]

    async def send(self, raw: bytes) -> bytes:
        if self.wire.closed:
            self._open()
        self.wire.out.clear()
        self.connection.data_received(raw)
        for turn in range(5000):  # a first-seen token is answered by a task of its own (step-up: in a thread)
            if b"\r\n\r\n" in b"".join(self.wire.out):
                break
            await asyncio.sleep(0 if turn < 100 else 0.001)
        return b"".join(self.wire.out)


@dataclasses.dataclass
class Ask:
    """One request, in the three doors' forms."""

    token: str | None
    method: str = "GET"
    path: str = "/api/orders/42"
    host: str = HOST
    dpop: str | None = None
    scheme: str = "Bearer"

    def http(self) -> bytes:
        lines = [
            "GET /v1/forward-auth HTTP/1.1",
            "Host: verifier",
            f"X-Forwarded-Method: {self.method}",
            "X-Forwarded-Proto: https",
            f"X-Forwarded-Host: {self.host}",
            f"X-Forwarded-Uri: {self.path}",
        ]
        if self.token is not None:
            lines.append(f"Authorization: {self.scheme} {self.token}")
        if self.dpop is not None:
            lines.append(f"DPoP: {self.dpop}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.token is not None:
            headers["authorization"] = f"{self.scheme} {self.token}"
        if self.dpop is not None:
            headers["dpop"] = self.dpop
        return headers

    def own(self) -> bytes:
        message = verifier_pb2.CheckRequest(method=self.method, scheme="https", host=self.host, path=self.path)
        message.headers.update(self.headers())
        return message.SerializeToString()  # type: ignore[no-any-return]

    def envoy(self, serial: int) -> bytes:
        request = ea.CheckRequest()
        attributes = request.attributes
        attributes.source.address.socket_address.address = "192.0.2.10"
        attributes.source.address.socket_address.port_value = 40_000
        attributes.request.time.seconds = int(NOW) + serial  # fields Envoy fills anew for every request
        http = attributes.request.http
        http.id = str(serial)
        http.method, http.scheme, http.host, http.path = self.method, "https", self.host, self.path
        http.headers.update({"x-request-id": f"req-{serial}", ":path": self.path, **self.headers()})
        return request.SerializeToString()  # type: ignore[no-any-return]


# -- what is compared ---------------------------------------------------------------------------------------------


_CHALLENGE = re.compile(r'challenge"?(=|: )"[^"]*"')  # a step-up refusal's WebAuthn challenge: fresh for every refusal
_REUSE = ("cache-control", "x-accel-expires")  # forward-auth's reuse headers


@dataclasses.dataclass(frozen=True)
class Seen:
    """One answer: the decision compared (the assertion's value and, with an assertion, the reuse time left out),
    and what is checked apart: the reuse time and the assertion's own claims."""

    decision: tuple[Any, ...]
    allowed: bool
    max_age: int  # seconds the answer may be reused (Envoy's answers say none: 0)
    assertion: dict[str, Any] | None  # the identity assertion's claims, if the answer carries one


def _headers(headers: list[tuple[str, str]]) -> tuple[list[tuple[str, Any]], dict[str, Any] | None]:
    """The headers with the assertion's value replaced by its JOSE header and claims but `iat`, `exp` and `jti`
    (and a step-up challenge by a mark); the assertion's claims."""
    kept: list[tuple[str, Any]] = []
    claims_: dict[str, Any] | None = None
    for name, value in headers:
        if name.lower() == ASSERTION:
            claims_ = jwt.decode(value, options={"verify_signature": False})
            rest = {k: v for k, v in claims_.items() if k not in ("iat", "exp", "jti")}
            kept.append((name, (jwt.get_unverified_header(value), rest)))
        else:
            kept.append((name, _CHALLENGE.sub("challenge", value)))
    return kept, claims_


def http_seen(answer: bytes) -> Seen:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("utf-8").split("\r\n")
    headers, claims_ = _headers([(k.strip().lower(), v.strip()) for k, _, v in (x.partition(":") for x in lines[1:])])
    cache = dict(headers).get("cache-control", "")
    max_age = int(cache.rpartition("max-age=")[2]) if "max-age=" in cache else 0
    if claims_ is not None:
        headers = [(k, v) for k, v in headers if k not in _REUSE]
    decision = (lines[0], headers, _CHALLENGE.sub("challenge", body.decode()))
    return Seen(decision, lines[0].startswith("HTTP/1.1 200"), max_age, claims_)


def own_seen(answer: bytes) -> Seen:
    message = verifier_pb2.CheckResponse.FromString(answer)
    upstream, claims_ = _headers([(h.name, h.value) for h in message.upstream_headers])
    client, _ = _headers([(h.name, h.value) for h in message.response_headers])
    max_age = message.cache_max_age_seconds
    del message.upstream_headers[:]
    del message.response_headers[:]
    message.body = _CHALLENGE.sub("challenge", message.body)
    if claims_ is not None:
        message.cache_max_age_seconds = 0
    return Seen((message.SerializeToString(deterministic=True), upstream, client), message.allowed, max_age, claims_)


def envoy_seen(answer: bytes) -> Seen:
    message = ea.CheckResponse.FromString(answer)
    ok, denied = message.ok_response, message.denied_response
    upstream, claims_ = _headers([(h.header.key, h.header.value) for h in ok.headers])
    client, _ = _headers([(h.header.key, h.header.value) for h in denied.headers])
    del ok.headers[:]
    del denied.headers[:]
    denied.body = _CHALLENGE.sub("challenge", denied.body)
    decision = (message.SerializeToString(deterministic=True), upstream, client)
    return Seen(decision, message.status.code == 0, 0, claims_)


def same_decision(memo: Seen, plain: Seen, now: float) -> str:
    """Why the remembered answer `memo` is not the decision `plain` is (empty: it is).

    Equal but for the identity assertion's `iat`, `exp` and `jti`, and, when it carries one, the reuse time: the
    App without caches mints a new assertion for every request and reuses its answer for at most half of its life
    left, the other hands out one assertion (renewed at half its life) with the max-age it was minted with. So the
    remembered assertion must be issued by now, and valid for the whole time its answer may be reused (or as long
    as a new one would be, near the token's `exp`), and that time within the configured ceiling (10 s).
    """
    if memo.decision != plain.decision or memo.allowed != plain.allowed:
        return "the decisions differ"
    if (memo.assertion is None) != (plain.assertion is None):
        return "one answer carries an identity assertion, the other none"
    if memo.assertion is None or plain.assertion is None:
        return "" if memo.max_age == plain.max_age else "the reuse times differ"
    if memo.assertion["iat"] > now:
        return "the remembered assertion is issued after now"
    if memo.assertion["exp"] < min(now + memo.max_age, plain.assertion["exp"]):
        return "the remembered assertion expires while its answer may still be reused"
    if memo.max_age > 10:
        return "the reuse time passes the ceiling"
    return ""


# -- the two Apps ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pair:
    """The App as shipped (`memo`) and the one without caches (`plain`), with what each needs to be driven."""

    memo: App
    plain: App
    connections: dict[int, Keepalive]
    entries: dict[int, list[str]]  # each App's kill-switch entry ids, oldest first

    def apps(self) -> tuple[App, App]:
        return self.memo, self.plain


async def started(settings_: Settings, clock: FrozenClock, fetcher: FakeFetcher) -> App:
    app = App(settings_, clock=clock, fetcher=fetcher)
    await app.start()
    for _ in range(10_000):  # `App.wait_serving` looks every 50 ms: two Apps an example, a hundred examples
        if app.ready():
            return app
        await asyncio.sleep(0.001)
    raise AssertionError("the App did not get ready")


def webauthn(directory: Path) -> WebAuthnConfig:
    """Step-up on `localhost`, its registry in `directory` (each App its own)."""
    directory.mkdir(parents=True, exist_ok=True)
    return WebAuthnConfig(
        rp_id="localhost", rp_name="t", origins=("http://localhost:1",), secret=b"w" * 32,
        sqlite_path=str(directory / "webauthn.sqlite3"),
    )  # fmt: skip


async def build(config: dict[str, Any], clock: FrozenClock, fetcher: FakeFetcher, directory: Path) -> Pair:
    settings_ = dataclasses.replace(parse_settings(config), http=None)  # no listener: the doors are called
    memo = await started(dataclasses.replace(settings_, webauthn=webauthn(directory / "memo")), clock, fetcher)
    uncached = dataclasses.replace(
        settings_,
        cache=CacheSettings(token_entries=0, negative_entries=0),
        webauthn=webauthn(directory / "plain"),
    )
    plain = await started(uncached, clock, fetcher)
    assert memo.forward_auth.memo is not None and memo.grpc._own_answers is not None
    assert plain.forward_auth.memo is None and plain.grpc._own_answers is None and plain.grpc._envoy_answers is None
    return Pair(memo, plain, {id(a): Keepalive(a.forward_auth) for a in (memo, plain)}, {id(memo): [], id(plain): []})


async def stopped(pair: Pair) -> None:
    for app in pair.apps():
        await app.stop(grace=0.1)


# -- the world: tokens, keys, proofs --------------------------------------------------------------------------------


@dataclasses.dataclass
class World:
    """The tokens and keys of one run."""

    tokens: list[str]
    dpop_key: ec.EllipticCurvePrivateKey
    rotated: ec.EllipticCurvePrivateKey  # served under "es-2" after a rotation, and under "es-1" after a replacement
    jwks: dict[str, Any]
    proofs: list[str] = dataclasses.field(default_factory=list)

    def proof(self, token: str, ask: Ask, now: float) -> str:
        claims_ = {
            "jti": str(uuid.uuid4()),
            "htm": ask.method,
            "htu": f"https://{ask.host}{ask.path}",
            "iat": int(now),
            "ath": access_token_hash(token),
        }
        header = {"typ": "dpop+jwt", "jwk": public_jwk(self.dpop_key)}
        made = jwt.encode(claims_, self.dpop_key, algorithm="ES256", headers=header)
        self.proofs.append(made)
        return made


def world(mint: Mint, keys: SigningKeys, jwks: dict[str, Any]) -> World:
    dpop_key = ec.generate_private_key(ec.SECP256R1())
    rotated = ec.generate_private_key(ec.SECP256R1())
    jkt = thumbprint(public_jwk(dpop_key))
    tokens = [
        # 0: near its end, in a session, with an email
        mint(claims(exp=int(NOW) + 25, sid="s-1", email="u1@example.test")),
        # 1: an admin who authenticated 30 s ago (the /recent route refuses 60 s after)
        mint(claims(sub="user-2", auth_time=int(NOW) - 30, roles=["admin"], exp=int(NOW) + 3600, sid="s-2")),
        # 2: not valid for another 20 s (nbf past the 5 s leeway)
        mint(claims(sub="user-3", nbf=int(NOW) + 25, iat=int(NOW) - 10, exp=int(NOW) + 3600)),
        # 3: DPoP-bound
        mint(claims(sub="user-4", cnf={"jkt": jkt}, exp=int(NOW) + 3600)),
        # 4: a client's own token (no user)
        mint(claims(sub=None, client_id="svc-1", exp=int(NOW) + 3600)),
        # 5: junk
        "junk.junk.junk",
        # 6: signed by the next key, "es-2", served only after a rotation
        mint(claims(sub="user-6", exp=int(NOW) + 3600), kid="es-2", key=rotated),
        # 7: "es-1" in its header, signed by the key that replaces es-1's material
        mint(claims(sub="user-7", exp=int(NOW) + 3600), kid=KIDS["ES256"], key=rotated),
        # 8: a second token of user-1 (revocations reach it too), long-lived, read-only
        mint(claims(exp=int(NOW) + 3600, scope="read", email="u1@example.test")),
    ]
    return World(tokens, dpop_key, rotated, jwks)


ROUTES: list[dict[str, str]] = [  # what `Ask` overrides, by index
    {},  # 0: GET /api/orders/42 (authenticated)
    {"path": "/recent/x"},  # 1: max_auth_age_seconds 60
    {"path": "/admin/x", "method": "DELETE"},  # 2: roles_any admin
    {"path": "/admin/x"},  # 3: GET: scopes_all read
    {"host": "admin.example.test", "path": "/anything"},  # 4: the admin host: roles_any admin
    {"path": "/dpop/x"},  # 5: sender_constraint dpop
    {"path": "/health"},  # 6: anonymous
    {"path": "/nowhere"},  # 7: no policy: route_not_allowed
    {"path": "/pay/x", "method": "POST"},  # 8: WebAuthn step-up
    {"path": "/orders/1"},  # 9: its own upstream header
    {"path": "/api/x", "method": "HEAD"},  # 10: GET's policy
    {"host": "Admin.Example.Test.", "path": "/anything"},  # 11: the admin host, spelled otherwise
]
PROOFS = ("none", "fresh", "replayed", "dpop_scheme")


def ask_for(w: World, token: int, route: int, proof: str, now: float) -> Ask:
    text = w.tokens[token] if token < len(w.tokens) else None
    ask = Ask(text, **ROUTES[route])
    if text is not None and proof in ("fresh", "dpop_scheme"):
        ask.dpop = w.proof(text, ask, now)
        if proof == "dpop_scheme":
            ask.scheme = "DPoP"
    elif text is not None and proof == "replayed" and w.proofs:
        ask.dpop = w.proofs[-1]
    return ask


# -- steps ----------------------------------------------------------------------------------------------------------


_serial = iter(range(1, 1 << 30))


async def ask_both(pair: Pair, ask: Ask, door: str, clock: FrozenClock) -> None:
    """The same request to both Apps' door three times (a first-seen token's answer is not remembered, its second one
    is, and the third may be the remembered one)."""
    now = clock.now()
    for attempt in range(3):
        seen = []
        for app in pair.apps():
            if door == "forward_auth":
                seen.append(http_seen(await pair.connections[id(app)].send(ask.http())))
            elif door == "grpc":
                seen.append(own_seen(await app.grpc.check_own(ask.own(), None)))
            else:
                seen.append(envoy_seen(await app.grpc.check_envoy(ask.envoy(next(_serial)), None)))
        memo, plain = seen
        why = same_decision(memo, plain, now)
        if why:
            bypass = memo.allowed and not plain.allowed
            raise AssertionError(
                f"{'BYPASS: ' if bypass else ''}{why}: {door} attempt {attempt} at NOW+{now - NOW}: {ask}\n"
                f"memoized: {memo}\nreference: {plain}"
            )


async def admin(app: App, method: str, path: str, body: Any = None) -> Any:
    answer = await app.router.dispatch(
        HttpRequest(
            method, path, "", {"content-type": "application/json", "authorization": f"Bearer {ADMIN}"},
            json.dumps(body).encode() if body is not None else b"",
        )
    )  # fmt: skip
    assert answer.status in (200, 201, 204), answer
    return answer


KILL = {
    "sub": {"subject": {"format": "iss_sub", "iss": ISSUER, "sub": "user-1"}},
    "admin_sub": {"subject": {"format": "iss_sub", "iss": ISSUER, "sub": "user-2"}},
    "email": {"subject": {"format": "email", "email": "U1@example.test"}},
    "session": {"subject": {"format": "opaque", "id": "s-2"}},
    "disable": {"subject": {"format": "iss_sub", "iss": ISSUER, "sub": "user-4"}, "effect": "disable"},
}


async def change(pair: Pair, w: World, kind: str, arg: Any, clock: FrozenClock, tx: SsfTransmitter) -> None:
    """One step between requests, applied to both Apps alike."""
    if kind == "advance":
        clock.advance(arg)
    elif kind == "kill":
        for app in pair.apps():
            answer = await admin(app, "POST", "/v1/admin/revocations", KILL[arg])
            assert app.revocation is not None  # a POST on a subject killed alike replaces its entry (a new id)
            kept = [i for i in pair.entries[id(app)] if app.revocation.revocations.get(i) is not None]
            pair.entries[id(app)] = [*kept, json.loads(answer.body)["id"]]
    elif kind == "lift":
        for app in pair.apps():
            ids = pair.entries[id(app)]
            if ids:
                await admin(app, "DELETE", f"/v1/admin/revocations/{ids.pop(0 if arg else -1)}")
    elif kind == "ssf":
        user = {"format": "iss_sub", "iss": ISSUER, "sub": "user-1"}
        if arg == "session":
            session = {"format": "opaque", "id": "s-1"}
            event = tx.sign_set({SESSION_REVOKED: {"event_timestamp": int(clock.now())}}, session)
        elif arg in ("disabled", "enabled"):
            kind_ = ACCOUNT_DISABLED if arg == "disabled" else ACCOUNT_ENABLED
            event = tx.sign_set({kind_: {"event_timestamp": int(clock.now())}}, user)
        else:
            event = tx.sign_set(
                {CREDENTIAL_CHANGE: {"event_timestamp": int(clock.now()), "change_type": "revoke",
                                     "credential_type": "password"}},
                {"format": "iss_sub", "iss": ISSUER, "sub": "user-2"},
            )  # fmt: skip
        for app in pair.apps():
            answer = await app.router.dispatch(
                HttpRequest("POST", "/v1/ssf/events", "", {"content-type": "application/secevent+jwt"}, event.encode())
            )
            assert answer.status == 202, answer
    elif kind == "claims":
        entry = Entry(
            id=f"c-{arg}", key=SubjectKey(KeyKind.ISS_SUB, "user-2", ISSUER), effect=Effect.CLAIMS_OVERRIDE,
            match=Match.ISSUED_BEFORE, event_time=clock.now(), expires_at=clock.now() + 3600, source="operator",
            event="operator", overrides={"roles": []} if arg else {"scope": "read"},
        )  # fmt: skip
        for app in pair.apps():
            assert app.revocation is not None
            await app.revocation.add([entry])
    elif kind == "outage":  # the revocation store unheard (503 for all), then loaded again
        for app in pair.apps():
            assert app.revocation is not None
            if arg:
                await app.revocation.resync()
            else:
                app.revocation._unheard()
    elif kind == "unclaim":
        for app in pair.apps():
            assert app.revocation is not None
            await app.revocation.remove(["c-0", "c-1"])
    elif kind in ("rotate", "withdraw", "replace", "restore"):
        jwks = [k for k in w.jwks["keys"] if k["kid"] != KIDS["ES256"]]
        es1 = next(k for k in w.jwks["keys"] if k["kid"] == KIDS["ES256"])
        served = {
            "rotate": [es1, *jwks, public_jwk(w.rotated, "es-2")],
            "withdraw": jwks,
            "replace": [public_jwk(w.rotated, KIDS["ES256"]), *jwks],
            "restore": [es1, *jwks],
        }[kind]
        for app in pair.apps():
            app.fetcher.serve(JWKS_URL, {"keys": served})  # type: ignore[attr-defined]
            await app.keys.issuers[ISSUER].refresh()
    else:
        raise AssertionError(kind)


async def reload(pair: Pair, config: dict[str, Any], clock: FrozenClock, directory: Path) -> Pair:
    """A SIGHUP: new workers on the same file (they start empty: entries in memory are the old worker's)."""
    fetcher = pair.memo.fetcher
    await stopped(pair)
    return await build(config, clock, fetcher, directory)  # type: ignore[arg-type]


# A request: (door, token, route, proof); 9 is no token. Each example draws a few, and its steps send them again
# and again, between the state changes, so that remembered answers meet every change.
REQUEST = st.tuples(
    st.sampled_from(["forward_auth", "grpc", "ext_authz"]),
    st.sampled_from([0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 8, 9]),
    st.sampled_from([0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 10, 11]),
    st.sampled_from(["none", "none", "none", "fresh", "replayed", "dpop_scheme"]),
)
STEP = st.one_of(
    st.tuples(st.just("send"), st.integers(0, 5)),  # the pool's request at this index (modulo its size)
    st.tuples(st.just("send"), st.integers(0, 5)),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 2.5, 4.0, 6.0, 9.5, 20.0, 31.0])),
    st.tuples(st.just("kill"), st.sampled_from(sorted(KILL))),
    st.tuples(st.just("lift"), st.booleans()),
    st.tuples(st.just("ssf"), st.sampled_from(["session", "credential", "disabled", "enabled"])),
    st.tuples(st.just("outage"), st.booleans()),
    st.tuples(st.just("claims"), st.integers(0, 1)),
    st.tuples(st.sampled_from(["unclaim", "rotate", "withdraw", "replace", "restore", "reload"]), st.none()),
)
POOL = st.lists(REQUEST, min_size=1, max_size=4)


async def run(
    pool: list[tuple[str, int, int, str]],
    steps: list[tuple[str, Any]],
    config: dict[str, Any],
    w: World,
    fetcher: FakeFetcher,
) -> None:
    clock = FrozenClock(NOW)
    tx = SsfTransmitter(audience=RECEIVER, issuer=TX, now=clock.now)
    fetcher.serve(tx.configuration_url, tx.configuration())
    fetcher.serve(tx.jwks_url, tx.jwks())
    directory = Path(tempfile.mkdtemp(prefix="memo-differential-"))
    pair = await build(config, clock, fetcher, directory)
    try:
        for kind, arg in steps:
            if kind == "send":
                door, token, route, proof = pool[arg % len(pool)]
                await ask_both(pair, ask_for(w, token, route, proof, clock.now()), door, clock)
            elif kind == "reload":
                pair = await reload(pair, config, clock, directory)
            else:
                await change(pair, w, kind, arg, clock, tx)
    finally:
        await stopped(pair)
        shutil.rmtree(directory, ignore_errors=True)


Request = tuple[str, int, int, str]
Scenario = tuple[list[Request], list[tuple[str, Any]]]


def scenario(*items: Request | tuple[str, Any]) -> Scenario:
    """An explicit example: requests (4-tuples) and state changes in order, as (pool, steps)."""
    pool: list[Request] = []
    steps: list[tuple[str, Any]] = []
    for item in items:
        if len(item) == 4:
            request: Request = item
            if request not in pool:
                pool.append(request)
            steps.append(("send", pool.index(request)))
        else:
            steps.append(item)
    return pool, steps


FA, OWN, ENVOY = "forward_auth", "grpc", "ext_authz"
EXAMPLES: list[Scenario] = [
    scenario((FA, 0, 0, "none"), ("kill", "sub"), (FA, 0, 0, "none")),
    scenario((ENVOY, 2, 0, "none"), ("advance", 20.0), (ENVOY, 2, 0, "none")),
    scenario((OWN, 1, 1, "none"), ("advance", 20.0), (OWN, 1, 1, "none"), ("advance", 9.5), (OWN, 1, 1, "none")),
    scenario((FA, 8, 0, "none"), ("withdraw", None), (FA, 8, 0, "none")),
    scenario((FA, 2, 0, "none"), ("withdraw", None), (FA, 2, 0, "none")),
    scenario((FA, 7, 0, "none"), ("replace", None), (FA, 7, 0, "none")),
    scenario((OWN, 6, 0, "none"), ("rotate", None), (OWN, 6, 0, "none")),
    scenario((FA, 3, 5, "fresh"), (FA, 3, 5, "replayed"), (ENVOY, 3, 0, "none")),
    scenario((FA, 1, 2, "none"), ("claims", 1), (FA, 1, 2, "none"), ("unclaim", None), (FA, 1, 2, "none")),
    scenario((FA, 0, 0, "none"), ("ssf", "session"), (FA, 0, 0, "none")),
    scenario((OWN, 1, 1, "none"), ("ssf", "credential"), (OWN, 1, 1, "none")),
    scenario((FA, 1, 0, "none"), ("kill", "session"), (FA, 1, 0, "none"), ("lift", True), (FA, 1, 0, "none")),
    scenario((FA, 0, 0, "none"), ("advance", 9.5), (FA, 0, 0, "none"), ("advance", 9.5), (FA, 0, 0, "none")),
    # through the token's last reuse window, its exp and its leeway, and the assertion's renewals, on every door
    scenario(*[step for _ in range(13) for step in ((FA, 0, 10, "none"), (OWN, 0, 0, "none"), ("advance", 2.5))]),
    scenario((ENVOY, 8, 10, "none"), *[step for _ in range(8) for step in (("advance", 2.5), (ENVOY, 8, 10, "none"))]),
    scenario((FA, 1, 8, "none"), (FA, 1, 11, "none"), (OWN, 4, 9, "none"), ("kill", "disable"), (FA, 3, 0, "none")),
    scenario((FA, 0, 11, "none"), (FA, 1, 11, "none"), ("claims", 0), (FA, 1, 11, "none"), ("reload", None)),
    scenario((OWN, 8, 0, "none"), ("ssf", "disabled"), (OWN, 8, 0, "none"), ("ssf", "enabled"), (OWN, 8, 0, "none")),
    scenario((ENVOY, 8, 0, "none"), ("outage", False), (ENVOY, 8, 0, "none"), ("outage", True), (ENVOY, 8, 0, "none")),
]


def _examples(test: Callable[..., Any]) -> Callable[..., Any]:
    for pool, steps in EXAMPLES:
        test = example(pool=pool, steps=steps)(test)
    return test


FAST = {"deadline": None, "suppress_health_check": list(HealthCheck), "derandomize": True}


@pytest.fixture(scope="module")
def assertion_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path_factory.mktemp("assertion") / "id.pem"
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    pem.chmod(0o600)
    return pem


def _differential(
    pool: list[Request],
    steps: list[tuple[str, Any]],
    assertion_key: Path | None,
    mint: Mint,
    keys: SigningKeys,
    jwks_document: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both Apps (`run`) over one provider serving discovery and the JWKS, the admin API open to `ADMIN`."""
    monkeypatch.setenv(ADMIN_TOKEN_ENV, ADMIN)
    fetcher = FakeFetcher()
    from tokenkit import DISCOVERY_URL, discovery_document

    fetcher.serve(DISCOVERY_URL, discovery_document())
    fetcher.serve(JWKS_URL, jwks_document)
    asyncio.run(run(pool, steps, document(assertion_key), world(mint, keys, jwks_document), fetcher))


@settings(max_examples=50, **FAST)  # type: ignore[arg-type]
@given(pool=POOL, steps=st.lists(STEP, min_size=1, max_size=25))
@_examples
def test_every_memo_and_cache_answers_as_none_would(
    pool: list[Request],
    steps: list[tuple[str, Any]],
    mint: Mint,
    keys: SigningKeys,
    jwks_document: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _differential(pool, steps, None, mint, keys, jwks_document, monkeypatch)


@settings(max_examples=30, **FAST)  # type: ignore[arg-type]
@given(pool=POOL, steps=st.lists(STEP, min_size=1, max_size=25))
@_examples
def test_with_an_identity_assertion_every_memo_and_cache_answers_as_none_would(
    pool: list[Request],
    steps: list[tuple[str, Any]],
    mint: Mint,
    keys: SigningKeys,
    jwks_document: dict[str, Any],
    assertion_key: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _differential(pool, steps, assertion_key, mint, keys, jwks_document, monkeypatch)

