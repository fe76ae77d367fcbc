"""The bench's signing keys and token minting; ``verifier.devidp`` (bench/idp_helper.py) publishes them.

The bench mints its own tokens, in many processes, with keys it generates, so the keys are the same
for the verifier, the naive baseline and the crypto floor; the provider serving discovery and the JWKS
is the package's dev provider in a process of its own (``write_keys`` hands it the keys), outside
the process under test. Access tokens follow RFC 9068 (``typ: at+jwt``).
"""

from __future__ import annotations

import base64
import concurrent.futures
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


def write_keys(path: Path, keys: dict[str, SigningKey]) -> None:
    """The keys as JSON for bench/idp_helper.py (a loopback-only bench run's own throw-away keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"alg": k.alg, "kid": k.kid, "pem": k.pem.decode()} for k in keys.values()]))


def read_keys(path: Path) -> dict[str, tuple[str, object]]:
    """What ``write_keys`` wrote, as ``DevIdentityProvider(keys=...)`` takes them: alg -> (kid, private key)."""
    return {
        k["alg"]: (k["kid"], serialization.load_pem_private_key(k["pem"].encode(), password=None))
        for k in json.loads(path.read_text())
    }


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
