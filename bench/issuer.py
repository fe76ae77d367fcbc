"""A tiny local token issuer for the bench: keys, OIDC discovery + JWKS over HTTP, and token minting.

The bench mints its own tokens rather than use ``verifier dev`` so that the issuer is outside the
process under test and the keys are the same for the verifier, the naive baseline and the
crypto floor. Access tokens follow RFC 9068 (``typ: at+jwt``); discovery is OpenID Connect
Discovery 1.0 section 4; the JWKS is RFC 7517.

``python -m bench.issuer --dir D --port P`` serves ``D/openid-configuration.json`` and ``D/jwks.json``.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import http.server
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from bench import wire

ALGORITHMS = ("ES256", "RS256", "EdDSA")
TOKEN_LIFETIME_S = 3600  # long enough for the longest full run; the verifier caches up to exp
RSA_BITS = 2048  # what most providers publish


@dataclass(frozen=True, kw_only=True)
class SigningKey:
    """One private key of the bench issuer."""

    alg: str
    kid: str
    pem: bytes

    def private_key(self) -> object:
        """The loaded ``cryptography`` private key."""
        return serialization.load_pem_private_key(self.pem, password=None)

    def public_jwk(self) -> dict[str, str]:
        """The public half as a JWK with ``kid``, ``alg`` and ``use``."""
        algo = jwt.get_algorithm_by_name(self.alg)
        public = self.private_key().public_key()  # type: ignore[attr-defined]
        jwk = json.loads(algo.to_jwk(public))
        jwk.update(kid=self.kid, alg=self.alg, use="sig")
        return dict(jwk)


def generate_keys() -> dict[str, SigningKey]:
    """One fresh key per algorithm."""
    keys: dict[str, SigningKey] = {}
    for alg in ALGORITHMS:
        if alg == "ES256":
            private: object = ec.generate_private_key(ec.SECP256R1())
        elif alg == "RS256":
            private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        else:
            private = ed25519.Ed25519PrivateKey.generate()
        pem = private.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        keys[alg] = SigningKey(alg=alg, kid=f"bench-{alg.lower()}-{secrets.token_hex(4)}", pem=pem)
    return keys


def write_documents(directory: Path, issuer: str, keys: dict[str, SigningKey]) -> None:
    """Write the discovery document and the JWKS the issuer process serves."""
    directory.mkdir(parents=True, exist_ok=True)
    discovery = {
        "issuer": issuer,
        "jwks_uri": f"{issuer}/jwks.json",
        "id_token_signing_alg_values_supported": list(ALGORITHMS),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
    }
    (directory / "openid-configuration.json").write_text(json.dumps(discovery))
    (directory / "jwks.json").write_text(json.dumps({"keys": [k.public_jwk() for k in keys.values()]}))


def _mint_batch(alg: str, kid: str, pem: bytes, issuer: str, start: int, count: int, now: int) -> list[str]:
    key = serialization.load_pem_private_key(pem, password=None)
    headers = {"kid": kid, "typ": "at+jwt"}
    out = []
    for i in range(start, start + count):
        claims = {
            "iss": issuer,
            "aud": wire.AUDIENCE,
            "sub": f"user-{i}",
            "scope": "orders:read orders:write",
            "client_id": "bench",
            "iat": now,
            "exp": now + TOKEN_LIFETIME_S,
            "jti": secrets.token_urlsafe(12),
        }
        out.append(jwt.encode(claims, key, algorithm=alg, headers=headers))  # type: ignore[arg-type]
    return out


def mint(key: SigningKey, issuer: str, count: int, *, processes: int | None = None) -> list[str]:
    """``count`` distinct tokens signed by ``key`` (RSA signing is slow: fan out over processes)."""
    now = int(time.time())
    processes = processes or (os.cpu_count() or 1)
    if count < 2000 or processes == 1:
        return _mint_batch(key.alg, key.kid, key.pem, issuer, 0, count, now)
    per = -(-count // processes)
    with concurrent.futures.ProcessPoolExecutor(processes) as pool:
        futures = [
            pool.submit(_mint_batch, key.alg, key.kid, key.pem, issuer, i * per, min(per, count - i * per), now)
            for i in range(processes)
            if count - i * per > 0
        ]
        return [token for f in futures for token in f.result()]


def garbage_tokens(count: int) -> list[str]:
    """Tokens that are not JWTs at all, plus some that look like one and are not: a flood of junk."""
    out = []
    for i in range(count):
        if i % 2:
            out.append(secrets.token_urlsafe(48))
        else:
            head = base64.urlsafe_b64encode(b'{"alg":"ES256","kid":"nope"}').rstrip(b"=").decode()
            out.append(f"{head}.{secrets.token_urlsafe(64)}.{secrets.token_urlsafe(64)}")
    return out


class _Handler(http.server.BaseHTTPRequestHandler):
    directory: Path
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        name = {
            "/.well-known/openid-configuration": "openid-configuration.json",
            "/jwks.json": "jwks.json",
        }.get(self.path.split("?")[0])
        if name is None:
            self.send_error(404)
            return
        body = (self.directory / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=300")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the naive baseline fetches per request: keep stderr quiet


def serve(directory: Path, port: int) -> None:
    """Serve the documents on 127.0.0.1:``port`` until killed."""
    handler = type("Handler", (_Handler,), {"directory": directory})
    http.server.ThreadingHTTPServer.daemon_threads = True
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.issuer")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    serve(args.dir, args.port)


if __name__ == "__main__":
    main()
