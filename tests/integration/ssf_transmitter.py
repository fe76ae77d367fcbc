"""A test SSF 1.0 transmitter: its own ES256 key, metadata, JWKS and an RFC 8936 poll endpoint.

It serves over a stdlib threaded HTTP server on 127.0.0.1 (`start()`/`stop()`, or as a context
manager), signs SETs with pyjwt (an implementation independent of the verifier's), and pushes them
per RFC 8935. Without `start()` its documents can be served through `FakeFetcher` instead.

    with SsfTransmitter(audience=AUD) as tx:
        token = tx.sign_set({SESSION_REVOKED: {"event_timestamp": now}}, sub_id={"format": "opaque", "id": "s1"})
        status, body = tx.push(receiver_url, token)
        tx.enqueue(token)          # for a receiver that polls
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from support import b64url

PUSH_URN = "urn:ietf:rfc:8935"
POLL_URN = "urn:ietf:rfc:8936"
SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
CREDENTIAL_CHANGE = "https://schemas.openid.net/secevent/caep/event-type/credential-change"
ASSURANCE_LEVEL_CHANGE = "https://schemas.openid.net/secevent/caep/event-type/assurance-level-change"
TOKEN_CLAIMS_CHANGE = "https://schemas.openid.net/secevent/caep/event-type/token-claims-change"
ACCOUNT_DISABLED = "https://schemas.openid.net/secevent/risc/event-type/account-disabled"
ACCOUNT_ENABLED = "https://schemas.openid.net/secevent/risc/event-type/account-enabled"
ACCOUNT_PURGED = "https://schemas.openid.net/secevent/risc/event-type/account-purged"
CREDENTIAL_COMPROMISE = "https://schemas.openid.net/secevent/risc/event-type/credential-compromise"


class SsfTransmitter:
    """One transmitter; `issuer` is its base URL (set by `start()`, or given for fetcher-only use)."""

    def __init__(
        self,
        *,
        audience: str,
        issuer: str = "",
        kid: str = "ssf-1",
        now: Callable[[], float] = time.time,
    ) -> None:
        self.audience = audience
        self.issuer = issuer
        self.kid = kid
        self.now = now
        self.key = ec.generate_private_key(ec.SECP256R1())
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.pending: dict[str, str] = {}  # jti -> SET, until acknowledged
        self.acked: list[str] = []
        self.set_errs: dict[str, Any] = {}
        self.poll_requests: list[dict[str, Any]] = []
        self.jwks_status = 200  # set another status to make the JWKS endpoint fail (keys out of reach)

    # -- documents ---------------------------------------------------------------------------------

    @property
    def configuration_url(self) -> str:
        """SSF 1.0 section 7.2.1 (the issuer has no path)."""
        return self.issuer + "/.well-known/ssf-configuration"

    @property
    def jwks_url(self) -> str:
        """Where the JWKS is served."""
        return self.issuer + "/jwks"

    @property
    def poll_url(self) -> str:
        """The RFC 8936 poll endpoint."""
        return self.issuer + "/poll"

    def configuration(self) -> dict[str, Any]:
        """The transmitter metadata (SSF 1.0 section 7.1)."""
        return {
            "spec_version": "1_0",
            "issuer": self.issuer,
            "jwks_uri": self.jwks_url,
            "delivery_methods_supported": [PUSH_URN, POLL_URN],
            "delivery": {"method": POLL_URN, "endpoint_url": self.poll_url},
            "configuration_endpoint": self.issuer + "/streams",
        }

    def jwks(self) -> dict[str, Any]:
        """The public key set."""
        jwk = ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": "ES256"}]}

    # -- SETs --------------------------------------------------------------------------------------

    def sign_set(
        self,
        events: Mapping[str, Mapping[str, Any]],
        sub_id: Mapping[str, Any] | None = None,
        *,
        aud: Any = None,
        iat: float | None = None,
        jti: str | None = None,
        iss: str | None = None,
        typ: str | None = "secevent+jwt",
        key: Any = None,
        kid: str | None = None,
        alg: str = "ES256",
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed SET (RFC 8417) with SSF 1.0's top-level `sub_id`; `alg="none"` makes an unsigned one."""
        payload: dict[str, Any] = {
            "iss": iss if iss is not None else self.issuer,
            "aud": aud if aud is not None else self.audience,
            "iat": int(iat if iat is not None else self.now()),
            "jti": jti or uuid.uuid4().hex,
            "events": {k: dict(v) for k, v in events.items()},
        }
        if sub_id is not None:
            payload["sub_id"] = dict(sub_id)
        payload.update(extra or {})
        headers: dict[str, Any] = {"kid": kid or self.kid}
        if typ is not None:
            headers["typ"] = typ
        if alg == "none":
            header = {"alg": "none", **headers}
            return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}."
        return jwt.encode(payload, key if key is not None else self.key, algorithm=alg, headers=headers)

    def push(self, url: str, token: str, *, content_type: str = "application/secevent+jwt") -> tuple[int, Any]:
        """RFC 8935 push: POSTs the SET; returns (status, decoded JSON body or None)."""
        request = urllib.request.Request(
            url, data=token.encode(), method="POST",
            headers={"Content-Type": content_type, "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                body = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            body, status = exc.read(), exc.code
        return status, json.loads(body) if body else None

    def enqueue(self, token: str) -> str:
        """Makes a SET available to pollers; returns its jti."""
        jti = str(jwt.decode(token, options={"verify_signature": False})["jti"])
        with self._lock:
            self.pending[jti] = token
        return jti

    def _poll(self, request: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.poll_requests.append(dict(request))
            for jti in request.get("ack", []):
                self.pending.pop(jti, None)
                self.acked.append(jti)
            for jti, err in (request.get("setErrs") or {}).items():
                self.pending.pop(jti, None)
                self.set_errs[jti] = err
            limit = int(request.get("maxEvents", 100))
            items = list(self.pending.items())
            return {"sets": dict(items[:limit]), "moreAvailable": len(items) > limit}

    # -- server ------------------------------------------------------------------------------------

    def start(self) -> SsfTransmitter:
        """Serves on an ephemeral loopback port; sets `issuer`."""
        transmitter = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _json(self, status: int, document: Any) -> None:
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/.well-known/ssf-configuration":
                    self._json(200, transmitter.configuration())
                elif self.path == "/jwks" and transmitter.jwks_status != 200:
                    self._json(transmitter.jwks_status, {"error": "temporarily_unavailable"})
                elif self.path == "/jwks":
                    self._json(200, transmitter.jwks())
                else:
                    self._json(404, {"error": "not_found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path != "/poll":
                    self._json(404, {"error": "not_found"})
                    return
                try:
                    request = json.loads(raw or b"{}")
                except ValueError:
                    self._json(400, {"err": "invalid_request"})
                    return
                self._json(200, transmitter._poll(request))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.issuer = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="ssf-transmitter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> SsfTransmitter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
