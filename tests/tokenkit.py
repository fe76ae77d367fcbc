"""Shared test kit: signing keys, a token minter, and `FakeFetcher`, the one fault-injection seam.

Keys are generated once per session with `cryptography`; tokens are minted with pyjwt so the verifier
is always checked against an independent implementation, never against itself.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import json
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from support import FrozenClock
from support import b64url as b64

from verifier.errors import ProviderUnavailable
from verifier.observe.metrics import Metrics
from verifier.settings import IssuerSettings
from verifier.tokens.fetch import FetchResult
from verifier.tokens.jwks import IssuerKeys, KeyStore
from verifier.tokens.jwt import JwtVerifier

ISSUER = "https://issuer.example.test"
AUDIENCE = "https://api.example.test"
DISCOVERY_URL = ISSUER + "/.well-known/openid-configuration"
JWKS_URL = ISSUER + "/jwks"
NOW = 1_700_000_000.0  # FrozenClock's default wall time
MAX_TOKEN_BYTES = 8192

# kid -> alg for the session keys served by default
KIDS = {"ES256": "es-1", "RS256": "rs-1", "EdDSA": "ed-1", "ES384": "es384-1"}


@dataclasses.dataclass(frozen=True)
class SigningKeys:
    """The session's private keys, by algorithm."""

    es256: ec.EllipticCurvePrivateKey
    es384: ec.EllipticCurvePrivateKey
    rs256: rsa.RSAPrivateKey
    eddsa: ed25519.Ed25519PrivateKey
    rs_other: rsa.RSAPrivateKey  # a second RSA key for rotation tests

    def for_alg(self, alg: str) -> Any:
        """The private key that signs `alg`."""
        return {
            "ES256": self.es256, "ES384": self.es384, "ES512": None,
            "RS256": self.rs256, "RS384": self.rs256, "RS512": self.rs256,
            "PS256": self.rs256, "PS384": self.rs256, "PS512": self.rs256,
            "EdDSA": self.eddsa,
        }[alg]


@pytest.fixture(scope="session")
def keys() -> SigningKeys:
    """One key per family, generated once per session."""
    return SigningKeys(
        es256=ec.generate_private_key(ec.SECP256R1()),
        es384=ec.generate_private_key(ec.SECP384R1()),
        rs256=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        eddsa=ed25519.Ed25519PrivateKey.generate(),
        rs_other=rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def public_jwk(private_key: Any, kid: str | None = None, **extra: Any) -> dict[str, Any]:
    """The public JWK of a private key, with `kid` and any extra members."""
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(extra)
    return dict(jwk)


EDWARDS_KEYS = (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)  # signed without a separate hash


def x5c_certificate(private_key: Any, subject_key: Any = None) -> str:
    """A self-signed certificate (standard base64 DER, as in `x5c`) for `subject_key` (default: `private_key`)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer.example.test")])
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key((subject_key or private_key).public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(private_key, None if isinstance(private_key, EDWARDS_KEYS) else hashes.SHA256())
    )
    return base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()


def private_jwk(private_key: Any, kid: str) -> dict[str, Any]:
    """The private JWK (with `d` and friends) of a key: must never be accepted from a JWKS."""
    if isinstance(private_key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(private_key, as_dict=True)
    elif isinstance(private_key, ec.EllipticCurvePrivateKey):
        jwk = ECAlgorithm.to_jwk(private_key, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(private_key, as_dict=True)
    return {**jwk, "kid": kid}


@pytest.fixture(scope="session")
def jwks_document(keys: SigningKeys) -> dict[str, Any]:
    """The default JWKS: one public key per supported family."""
    return {
        "keys": [
            public_jwk(keys.es256, KIDS["ES256"]),
            public_jwk(keys.rs256, KIDS["RS256"]),
            public_jwk(keys.eddsa, KIDS["EdDSA"]),
            public_jwk(keys.es384, KIDS["ES384"]),
        ]
    }


def compact(header: Mapping[str, Any], payload: Mapping[str, Any] | bytes, signature: bytes = b"sig") -> str:
    """A hand-built compact JWS (for tokens pyjwt refuses to make)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return f"{b64(json.dumps(header).encode())}.{b64(body)}.{b64(signature)}"


def claims(**overrides: Any) -> dict[str, Any]:
    """A valid access-token claim set at `NOW`; `None` values remove a claim."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "user-1",
        "aud": AUDIENCE,
        "exp": int(NOW) + 300,
        "iat": int(NOW) - 10,
        "nbf": int(NOW) - 10,
        "client_id": "client-1",
        "scope": "read write",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


Mint = Callable[..., str]


@pytest.fixture(scope="session")
def mint(keys: SigningKeys) -> Mint:
    """`mint(claims, alg="ES256", kid=<default>, headers=None, key=None)` signs with pyjwt.

    `headers` are merged over `{"kid": kid, "typ": "at+jwt"}`; a header whose value is None is dropped.
    """

    def _mint(
        token_claims: Mapping[str, Any] | None = None,
        alg: str = "ES256",
        kid: str | None = "",
        headers: Mapping[str, Any] | None = None,
        key: Any = None,
    ) -> str:
        merged: dict[str, Any] = {"typ": "at+jwt"}
        if kid == "":
            kid = KIDS.get(alg)
        if kid is not None:
            merged["kid"] = kid
        merged.update(headers or {})
        # pyjwt drops a falsy typ; every other None-valued header is dropped here
        merged = {k: v for k, v in merged.items() if v is not None or k == "typ"}
        signing_key = key if key is not None else keys.for_alg(alg)
        return jwt.encode(
            dict(token_claims if token_claims is not None else claims()),
            signing_key,
            algorithm=alg,
            headers=merged,
        )

    return _mint


class FakeFetcher:
    """Implements `verifier.tokens.fetch.Fetcher` from a dict of documents, with injectable faults.

    `documents[url] = (document, max_age)`; `faults[url]` (or `fault` for every URL) is one of
    "timeout", "unavailable", "malformed", "malformed_json", or ("delay", seconds). Every call is
    counted in `calls[url]`, faulty or not.
    """

    def __init__(self, documents: dict[str, tuple[Any, float | None]] | None = None) -> None:
        self.documents: dict[str, tuple[Any, float | None]] = dict(documents or {})
        self.faults: dict[str, Any] = {}
        self.fault: Any = None
        self.delay: float = 0.0  # added to every call
        self.calls: Counter[str] = Counter()
        self.timeouts: list[float] = []

    @property
    def total(self) -> int:
        """Calls to any URL."""
        return sum(self.calls.values())

    def serve(self, url: str, document: Any, max_age: float | None = None) -> None:
        """Sets (or replaces) what `url` answers."""
        self.documents[url] = (document, max_age)

    async def get_json(self, url: str, *, timeout: float, max_bytes: int) -> FetchResult:
        """Answers from `documents`, after any injected fault."""
        self.calls[url] += 1
        self.timeouts.append(timeout)
        fault = self.faults.get(url, self.fault)
        if self.delay:
            await asyncio.sleep(self.delay)
        if isinstance(fault, tuple) and fault[0] == "delay":
            await asyncio.sleep(fault[1])
        elif fault == "timeout":
            raise ProviderUnavailable("provider timed out")  # what HttpFetcher turns a TimeoutError into
        elif fault == "unavailable":
            raise ProviderUnavailable("HTTP 503 from provider")
        elif fault == "malformed_json":
            raise ProviderUnavailable("provider sent malformed JSON")
        elif fault == "malformed":
            return FetchResult("<html>not a key set</html>", None)
        if url not in self.documents:
            raise ProviderUnavailable("HTTP 404 from provider")
        document, max_age = self.documents[url]
        return FetchResult(json.loads(json.dumps(document)), max_age)


def discovery_document(issuer: str = ISSUER, jwks_uri: str = JWKS_URL) -> dict[str, Any]:
    """A minimal OIDC discovery document."""
    return {"issuer": issuer, "jwks_uri": jwks_uri, "authorization_endpoint": issuer + "/authorize"}


@pytest.fixture
def fetcher(jwks_document: dict[str, Any]) -> FakeFetcher:
    """A provider serving discovery and the default JWKS."""
    fake = FakeFetcher()
    fake.serve(DISCOVERY_URL, discovery_document())
    fake.serve(JWKS_URL, jwks_document)
    return fake


@pytest.fixture
def clock() -> FrozenClock:
    """A clock at `NOW` that moves only when told."""
    return FrozenClock(NOW)


def issuer_settings(**overrides: Any) -> IssuerSettings:
    """Issuer settings for `ISSUER`, allowing every asymmetric family the session keys cover."""
    values: dict[str, Any] = {
        "issuer": ISSUER,
        "audiences": (AUDIENCE,),
        "algorithms": ("ES256", "ES384", "RS256", "EdDSA"),
    }
    values.update(overrides)
    return IssuerSettings(**values)


@pytest.fixture
def settings() -> IssuerSettings:
    """The default issuer settings."""
    return issuer_settings()


def make_issuer_keys(settings: IssuerSettings, fetcher: FakeFetcher, clock: FrozenClock) -> IssuerKeys:
    """IssuerKeys wired to the fake provider."""
    return IssuerKeys(settings, fetcher, clock, Metrics())


def make_verifier(
    settings: IssuerSettings, fetcher: FakeFetcher, clock: FrozenClock
) -> tuple[JwtVerifier, IssuerKeys]:
    """A JwtVerifier with one issuer, and that issuer's keys."""
    issuer_keys = make_issuer_keys(settings, fetcher, clock)
    store = KeyStore({settings.issuer: issuer_keys})
    return JwtVerifier({settings.issuer: settings}, store, clock, max_token_bytes=MAX_TOKEN_BYTES), issuer_keys
