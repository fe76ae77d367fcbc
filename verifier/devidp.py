"""An embedded development identity provider for `verifier dev`: discovery, JWKS and a token mint.

For development on loopback only. It signs RFC 9068 access tokens with ES256, RS256 and EdDSA keys
generated at start-up, so the verifier can be tried with nothing else running.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

DEV_AUDIENCE = "https://api.example.test"
DEFAULT_TTL_SECONDS = 3600  # dev tokens live an hour
MAX_TTL_SECONDS = 86_400


class DevIdentityProvider:
    """A tiny issuer: `/.well-known/openid-configuration`, `/jwks`, `POST /token`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 9400) -> None:
        self.host = host
        self.port = port
        self._keys: dict[str, tuple[str, Any]] = {
            "ES256": (f"dev-es256-{uuid.uuid4().hex[:8]}", ec.generate_private_key(ec.SECP256R1())),
            "RS256": (
                f"dev-rs256-{uuid.uuid4().hex[:8]}",
                rsa.generate_private_key(public_exponent=65537, key_size=2048),
            ),
            "EdDSA": (f"dev-eddsa-{uuid.uuid4().hex[:8]}", ed25519.Ed25519PrivateKey.generate()),
        }
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
            "id_token_signing_alg_values_supported": sorted(self._keys),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
        }

    def jwks(self) -> dict[str, Any]:
        """The public keys."""
        keys = []
        for alg, (kid, private) in self._keys.items():
            algorithm = jwt.get_algorithm_by_name(alg)
            jwk = json.loads(algorithm.to_jwk(private.public_key()))
            jwk.update({"kid": kid, "alg": alg, "use": "sig"})
            keys.append(jwk)
        return {"keys": keys}

    def mint(
        self,
        *,
        sub: str = "dev-user",
        scope: str = "read write",
        aud: str = DEV_AUDIENCE,
        alg: str = "ES256",
        ttl: int = DEFAULT_TTL_SECONDS,
        claims: dict[str, Any] | None = None,
    ) -> str:
        """Signs an access token."""
        if alg not in self._keys:
            raise ValueError(f"alg must be one of {sorted(self._keys)}")
        kid, private = self._keys[alg]
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            "aud": aud,
            "scope": scope,
            "client_id": "dev-client",
            "iat": now,
            "exp": now + max(1, min(ttl, MAX_TTL_SECONDS)),
            "jti": uuid.uuid4().hex,
        }
        body.update(claims or {})
        return jwt.encode(body, private, algorithm=alg, headers={"kid": kid, "typ": "at+jwt"})

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
            return web.json_response(self.jwks(), headers={"Cache-Control": "public, max-age=300"})

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks", jwks)
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        """Stops listening."""
        if self._runner is not None:
            await self._runner.cleanup()
