"""A stand-in verifier for developing the gateway rigs without the real one.

It speaks the two doors the rigs exercise, following the shared contract only as far as the rig tests
need: Envoy's ``envoy.service.auth.v3.Authorization/Check`` over gRPC, and the HTTP forward-auth door
(``/v1/forward-auth[/<path>]``, ``GET /healthz``). Decisions come from pyjwt with the issuer's public key
handed in directly (no discovery). It is a test double, not a reference implementation: the rig tests
run against it so that a broken rig is told apart from a broken verifier.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

# Same module object the tests use, whether or not tests/ is a package.
if __package__:
    from .gateways import LOOPBACK, _QuietHandler, _ServerThread, free_port
else:
    from gateways import LOOPBACK, _QuietHandler, _ServerThread, free_port

REALM = 'Bearer realm="verifier"'


@dataclass(frozen=True, kw_only=True)
class Decision:
    """Allow (status 200) with identity headers, or deny with a status and client headers."""

    status: int
    reason: str
    upstream_headers: Mapping[str, str]
    client_headers: Mapping[str, str]
    body: str = ""


def _deny(status: int, reason: str, error: str | None = None, description: str = "") -> Decision:
    challenge = REALM
    if error:
        challenge += f', error="{error}", error_description="{description}"'
    body = json.dumps({"error": error or "unauthorized", "error_description": description})
    return Decision(
        status=status,
        reason=reason,
        upstream_headers={},
        client_headers={
            "WWW-Authenticate": challenge,
            "X-Verifier-Reason": reason,
            "Content-Type": "application/json",
        },
        body=body,
    )


class StandinPolicy:
    """Bearer JWT check: 401 missing/invalid, 403 wrong audience, 200 with X-Authenticated-* otherwise.

    `allow_client_headers` (called once per allow) go to the client with every allow, as a verifier sends a
    rotated `DPoP-Nonce` or the `RateLimit` state: in the forward-auth answer, and as Envoy's
    `response_headers_to_add`.
    """

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        public_key: ec.EllipticCurvePublicKey,
        allow_client_headers: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        self._issuer = issuer
        self._audience = audience
        self._key = public_key
        self.allow_client_headers = allow_client_headers or dict

    def decide(self, headers: Mapping[str, str]) -> Decision:
        """Decide on the original request's headers (names lower-cased)."""
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return _deny(401, "missing_token")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["ES256"],
                audience=self._audience,
                issuer=self._issuer,
                leeway=30,
            )
        except jwt.InvalidAudienceError:
            return _deny(403, "audience_mismatch", "insufficient_scope", "audience not accepted")
        except jwt.ExpiredSignatureError:
            return _deny(401, "token_expired", "invalid_token", "token expired")
        except jwt.InvalidSignatureError:
            return _deny(401, "bad_signature", "invalid_token", "signature invalid")
        except jwt.InvalidTokenError:
            return _deny(401, "malformed_token", "invalid_token", "token invalid")
        return Decision(
            status=200,
            reason="ok",
            upstream_headers={
                "X-Authenticated-Userid": str(claims["sub"]),
                "X-Authenticated-Scope": str(claims.get("scope", "")),
                "X-Authenticated-Issuer": str(claims["iss"]),
            },
            client_headers={"X-Verifier-Reason": "ok", **self.allow_client_headers()},
        )


class _AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, policy: StandinPolicy) -> None:
        self._policy = policy

    def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        headers = {k.lower(): v for k, v in request.attributes.request.http.headers.items()}
        d = self._policy.decide(headers)

        def hvo(items: Mapping[str, str]) -> list[base_pb2.HeaderValueOption]:
            return [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v)) for k, v in items.items()]

        if d.status == 200:
            to_client = {k: v for k, v in d.client_headers.items() if k != "X-Verifier-Reason"}
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=external_auth_pb2.OkHttpResponse(
                    headers=hvo(d.upstream_headers), response_headers_to_add=hvo(to_client)
                ),
            )
        code = code_pb2.UNAUTHENTICATED if d.status == 401 else code_pb2.PERMISSION_DENIED
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=d.status), headers=hvo(d.client_headers), body=d.body
            ),
        )


class _ForwardAuthHandler(_QuietHandler):
    def _handle(self) -> None:
        self._drain_body()
        owner: Standin = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(200, b'{"status":"ok"}')
            return
        if not (path == "/v1/forward-auth" or path.startswith("/v1/forward-auth/")):
            self._send(404, b'{"error":"not_found"}')
            return
        with owner._lock:
            owner.http_calls.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
            )
        d = owner.policy.decide({k.lower(): v for k, v in self.headers.items()})
        self._send(d.status, d.body.encode(), {**d.client_headers, **d.upstream_headers})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle


class Standin(_ServerThread):
    """Both doors of the stand-in: ``grpc_port`` (Envoy ext_authz v3) and ``http_port`` (forward-auth)."""

    def __init__(self, policy: StandinPolicy) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self.http_calls: list[dict[str, object]] = []
        super().__init__(_ForwardAuthHandler)
        self.http_port = self.port
        self.grpc_port = free_port()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(_AuthorizationServicer(policy), self._grpc)
        self._grpc.add_insecure_port(f"{LOOPBACK}:{self.grpc_port}")
        self._grpc.start()

    def stop(self) -> None:
        """Stop both doors."""
        self._grpc.stop(grace=None)
        super().stop()
