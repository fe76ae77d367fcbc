"""An embedded development identity provider for `verifier dev`: discovery, JWKS and a token mint.

For development on loopback only. It signs RFC 9068 access tokens with ES256, RS256 and EdDSA keys
generated at start-up, so the verifier can be tried with nothing else running. It also mints opaque
tokens and answers for them at an RFC 7662 introspection endpoint (`POST /introspect`,
client_secret_basic or client_secret_post) and at the verifier's batch endpoint
(`POST /introspect/batch`, the protocol in `verifier.tokens.introspection_client`). Calls are counted
so tests can assert how often the verifier asked.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hmac
import json
import secrets
import time
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

DEV_AUDIENCE = "https://api.example.test"
DEFAULT_TTL_SECONDS = 3600  # dev tokens live an hour
MAX_TTL_SECONDS = 86_400
DEV_INTROSPECTION_CLIENT_ID = "verifier"  # the client allowed to introspect
MAX_BATCH_TOKENS = 1000  # tokens per batch call; more is refused with 400


class DevIdentityProvider:
    """A tiny issuer: `/.well-known/openid-configuration`, `/jwks`, `POST /token`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9400,
        *,
        introspection_client_id: str = DEV_INTROSPECTION_CLIENT_ID,
        introspection_client_secret: str | None = None,
        keys: Mapping[str, tuple[str, Any]] | None = None,
        tenants: Sequence[str] = (),
    ) -> None:
        """`port` 0 picks a free port (read `port` after `start`); the secret is random unless given.

        `keys` (alg -> (kid, private key)) replaces the keys generated here, for a caller that mints
        tokens itself (the benchmark, in processes of its own); it must name ES256, RS256 and EdDSA.
        `tenants` adds one issuer per tenant under this one, as multi-tenant providers do:
        `{issuer}/{tenant}` with its own discovery, JWKS and ES256 key (`mint(tenant=...)`).
        """
        self.host = host
        self.port = port
        self.introspection_client_id = introspection_client_id
        self.introspection_client_secret = introspection_client_secret or secrets.token_urlsafe(24)
        self._opaque: dict[str, dict[str, Any]] = {}  # opaque token -> its RFC 7662 answer (without active)
        self.introspection_calls = 0  # POST /introspect requests, authenticated or not
        self.batch_calls = 0  # POST /introspect/batch requests
        self.batch_tokens = 0  # tokens asked about across all batch calls (authenticated or not, answered or not)
        self.fail_status: int | None = None  # answer both introspection endpoints with this status (faults)
        self.delay_seconds = 0.0  # wait this long before answering them (faults)
        self.jwks_delay_seconds = 0.0  # wait this long before answering `/jwks` (a slow provider)
        self._keys: dict[str, tuple[str, Any]] = (
            {
                "ES256": (f"dev-es256-{uuid.uuid4().hex[:8]}", ec.generate_private_key(ec.SECP256R1())),
                "RS256": (
                    f"dev-rs256-{uuid.uuid4().hex[:8]}",
                    rsa.generate_private_key(public_exponent=65537, key_size=2048),
                ),
                "EdDSA": (f"dev-eddsa-{uuid.uuid4().hex[:8]}", ed25519.Ed25519PrivateKey.generate()),
            }
            if keys is None
            else dict(keys)
        )
        self._jwks: dict[str, Any] | None = None  # the public keys never change: built once
        self._tenant_keys: dict[str, tuple[str, ec.EllipticCurvePrivateKey]] = {
            tenant: (f"dev-{tenant}-es256-{uuid.uuid4().hex[:8]}", ec.generate_private_key(ec.SECP256R1()))
            for tenant in tenants
        }
        self.requests: collections.Counter[str] = collections.Counter()  # path -> requests, any path
        self._runner: web.AppRunner | None = None

    @property
    def issuer(self) -> str:
        """The issuer URL."""
        return f"http://{self.host}:{self.port}"

    def discovery(self) -> dict[str, Any]:
        """The OIDC discovery document."""
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}/jwks",
            "token_endpoint": f"{self.issuer}/token",
            "authorization_endpoint": f"{self.issuer}/authorize",
            "introspection_endpoint": f"{self.issuer}/introspect",
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "introspection_batch_endpoint": f"{self.issuer}/introspect/batch",  # ours, not a registered name
            "id_token_signing_alg_values_supported": sorted(self._keys),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
        }

    def tenant_issuer(self, tenant: str) -> str:
        """The issuer URL of one tenant."""
        return f"{self.issuer}/{tenant}"

    def _tenant_discovery(self, tenant: str) -> dict[str, Any]:
        issuer = self.tenant_issuer(tenant)
        return {
            "issuer": issuer,
            "jwks_uri": f"{issuer}/jwks",
            "id_token_signing_alg_values_supported": ["ES256"],
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
        }

    def _tenant_jwks(self, tenant: str) -> dict[str, Any]:
        kid, private = self._tenant_keys[tenant]
        jwk = json.loads(jwt.get_algorithm_by_name("ES256").to_jwk(private.public_key()))
        return {"keys": [{**jwk, "kid": kid, "alg": "ES256", "use": "sig"}]}

    def jwks(self) -> dict[str, Any]:
        """The public keys."""
        if self._jwks is not None:
            return self._jwks
        keys = []
        for alg, (kid, private) in self._keys.items():
            algorithm = jwt.get_algorithm_by_name(alg)
            jwk = json.loads(algorithm.to_jwk(private.public_key()))
            jwk.update({"kid": kid, "alg": alg, "use": "sig"})
            keys.append(jwk)
        self._jwks = {"keys": keys}
        return self._jwks

    def mint(
        self,
        *,
        sub: str | None = "dev-user",
        scope: str = "read write",
        aud: str = DEV_AUDIENCE,
        alg: str = "ES256",
        ttl: int = DEFAULT_TTL_SECONDS,
        claims: dict[str, Any] | None = None,
        introspectable: bool = False,
        tenant: str | None = None,
    ) -> str:
        """Signs an access token.

        `sub=None` makes a client-credentials token (only `client_id`); `introspectable` makes the
        introspection endpoint answer for it (active until `revoke`), as a provider does for its JWTs.
        `tenant` signs as that tenant's issuer, with its ES256 key.
        """
        if tenant is not None:
            if tenant not in self._tenant_keys or alg != "ES256":
                raise ValueError(f"tenant must be one of {sorted(self._tenant_keys)}, signing ES256")
            kid, private = self._tenant_keys[tenant]
        elif alg not in self._keys:
            raise ValueError(f"alg must be one of {sorted(self._keys)}")
        else:
            kid, private = self._keys[alg]
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.issuer if tenant is None else self.tenant_issuer(tenant),
            "sub": sub,
            "aud": aud,
            "scope": scope,
            "client_id": "dev-client",
            "iat": now,
            "exp": now + max(1, min(ttl, MAX_TTL_SECONDS)),
            "jti": uuid.uuid4().hex,
        }
        if sub is None:
            del body["sub"]
        body.update(claims or {})
        token = jwt.encode(body, private, algorithm=alg, headers={"kid": kid, "typ": "at+jwt"})
        if introspectable:
            self._opaque[token] = {**body, "token_type": "Bearer"}
        return token

    def mint_opaque(
        self,
        *,
        sub: str | None = "dev-user",
        scope: str = "read write",
        aud: str | list[str] = DEV_AUDIENCE,
        ttl: int = DEFAULT_TTL_SECONDS,
        client_id: str = "dev-client",
        claims: dict[str, Any] | None = None,
    ) -> str:
        """Issues an opaque access token, answered for by introspection until it expires or is revoked.

        `sub=None` makes a client-credentials token (introspection names only the `client_id`).
        """
        token = secrets.token_urlsafe(32)
        now = int(time.time())
        answer: dict[str, Any] = {
            "iss": self.issuer,
            "aud": aud,
            "scope": scope,
            "client_id": client_id,
            "token_type": "Bearer",
            "iat": now,
            "exp": now + max(1, min(ttl, MAX_TTL_SECONDS)),
            "jti": uuid.uuid4().hex,
        }
        if sub is not None:
            answer["sub"] = sub
        answer.update(claims or {})
        self._opaque[token] = answer
        return token

    def revoke(self, token: str) -> None:
        """Revokes an opaque token (RFC 7009 semantics: introspection says inactive from now on)."""
        self._opaque.pop(token, None)

    @property
    def tokens_asked(self) -> int:
        """Tokens asked about at either endpoint: a POST each at `/introspect`, or in a batch (authenticated or not)."""
        return self.introspection_calls + self.batch_tokens

    def introspection_answer(self, token: str) -> dict[str, Any]:
        """The RFC 7662 section 2.2 answer for `token` (inactive: only `{"active": false}`, section 2.2)."""
        answer = self._opaque.get(token)
        exp = answer.get("exp") if answer is not None else None
        if answer is None or (isinstance(exp, int | float) and exp <= time.time()):
            return {"active": False}
        return {"active": True, **answer}

    def reset_counts(self) -> None:
        """Zeroes the call counters."""
        self.introspection_calls = self.batch_calls = self.batch_tokens = 0

    def _client_authenticated(self, request: web.Request, fields: dict[str, Any]) -> bool:
        """client_secret_basic (RFC 6749 2.3.1, urlencoded parts) or client_secret_post, compared in constant time."""
        client_id: str | None = None
        secret: str | None = None
        header = request.headers.get("Authorization", "")
        if header[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(header[6:], validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return False
            raw_id, sep, raw_secret = decoded.partition(":")
            if not sep:
                return False
            client_id, secret = urllib.parse.unquote(raw_id), urllib.parse.unquote(raw_secret)
        elif isinstance(fields.get("client_id"), str) and isinstance(fields.get("client_secret"), str):
            client_id, secret = fields["client_id"], fields["client_secret"]
        if client_id is None or secret is None:
            return False
        ok_id = hmac.compare_digest(client_id.encode(), self.introspection_client_id.encode())
        ok_secret = hmac.compare_digest(secret.encode(), self.introspection_client_secret.encode())
        return ok_id and ok_secret

    async def _fault(self) -> web.Response | None:
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        if self.fail_status is not None:
            return web.json_response({"error": "injected_fault"}, status=self.fail_status)
        return None

    async def _introspect(self, request: web.Request) -> web.Response:
        self.introspection_calls += 1
        fault = await self._fault()
        if fault is not None:
            return fault
        fields = dict(await request.post())
        if not self._client_authenticated(request, fields):
            return web.json_response(
                {"error": "invalid_client"}, status=401, headers={"WWW-Authenticate": 'Basic realm="devidp"'}
            )
        token = fields.get("token")
        if not isinstance(token, str) or not token:
            return web.json_response({"error": "invalid_request"}, status=400)
        return web.json_response(self.introspection_answer(token), headers={"Cache-Control": "no-store"})

    async def _introspect_batch(self, request: web.Request) -> web.Response:
        self.batch_calls += 1
        try:
            data = await request.json()
        except ValueError:
            data = None
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if isinstance(tokens, list):
            self.batch_tokens += len(tokens)  # asked about, whatever the answer (a fault, a refusal)
        fault = await self._fault()
        if fault is not None:
            return fault
        if not isinstance(data, dict):
            return web.json_response({"error": "invalid_request"}, status=400)
        if not self._client_authenticated(request, data):
            return web.json_response({"error": "invalid_client"}, status=401)
        if (
            not isinstance(tokens, list)
            or len(tokens) > MAX_BATCH_TOKENS
            or not all(isinstance(t, str) and t for t in tokens)
        ):
            return web.json_response({"error": "invalid_request"}, status=400)
        results = [self.introspection_answer(t) for t in tokens]
        return web.json_response({"results": results}, headers={"Cache-Control": "no-store"})

    async def _token(self, request: web.Request) -> web.Response:
        if request.content_type == "application/json":
            try:
                data = await request.json()
            except ValueError:
                return web.json_response({"error": "invalid_request"}, status=400)
        else:
            data = dict(await request.post())
        if not isinstance(data, dict):
            return web.json_response({"error": "invalid_request"}, status=400)
        try:
            extra = data.get("claims") or {}
            if isinstance(extra, str):
                extra = json.loads(extra)
            if data.get("format") == "opaque":
                sub = data.get("sub", "dev-user")
                token = self.mint_opaque(
                    sub=None if sub is None else str(sub),
                    scope=str(data.get("scope", "read write")),
                    aud=str(data.get("aud", DEV_AUDIENCE)),
                    ttl=int(data.get("ttl", DEFAULT_TTL_SECONDS)),
                    claims=extra if isinstance(extra, dict) else None,
                )
                ttl = int(data.get("ttl", DEFAULT_TTL_SECONDS))
                return web.json_response({"access_token": token, "token_type": "Bearer", "expires_in": ttl})
            token = self.mint(
                sub=str(data.get("sub", "dev-user")),
                scope=str(data.get("scope", "read write")),
                aud=str(data.get("aud", DEV_AUDIENCE)),
                alg=str(data.get("alg", "ES256")),
                ttl=int(data.get("ttl", DEFAULT_TTL_SECONDS)),
                claims=extra if isinstance(extra, dict) else None,
            )
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": "invalid_request", "error_description": str(exc)}, status=400)
        ttl = int(data.get("ttl", DEFAULT_TTL_SECONDS))
        return web.json_response({"access_token": token, "token_type": "Bearer", "expires_in": ttl})

    async def start(self) -> None:
        """Listens on loopback."""

        async def discovery(_: web.Request) -> web.Response:
            return web.json_response(self.discovery())

        async def jwks(_: web.Request) -> web.Response:
            if self.jwks_delay_seconds:
                await asyncio.sleep(self.jwks_delay_seconds)
            return web.json_response(self.jwks(), headers={"Cache-Control": "public, max-age=300"})

        async def tenant_document(request: web.Request) -> web.Response:
            tenant = request.match_info["tenant"]
            if tenant not in self._tenant_keys:
                return web.json_response({"error": "no such tenant"}, status=404)
            if request.match_info["document"] == "jwks":
                return web.json_response(self._tenant_jwks(tenant), headers={"Cache-Control": "public, max-age=300"})
            return web.json_response(self._tenant_discovery(tenant))

        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            self.requests[request.path] += 1
            response: web.StreamResponse = await handler(request)
            return response

        app = web.Application(middlewares=[count])
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks", jwks)
        app.router.add_get(r"/{tenant}/{document:jwks|\.well-known/openid-configuration}", tenant_document)
        app.router.add_post("/token", self._token)
        app.router.add_post("/introspect", self._introspect)
        app.router.add_post("/introspect/batch", self._introspect_batch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:  # learn the port the kernel picked, so `issuer` names it
            sockets = getattr(site._server, "sockets", None) or ()
            if sockets:
                self.port = int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stops listening."""
        if self._runner is not None:
            await self._runner.cleanup()
