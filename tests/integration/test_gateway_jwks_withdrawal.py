"""Through every shipped gateway configuration (real nginx, nginx Lua, Envoy gRPC/HTTP/reuse) in front of the real
verifier process: a provider that withdraws every key (a JWK Set with none left, as Keycloak serves with its only
key disabled after a leak) has every token those keys signed refused, from the fetch that says so on.

The holder of the leaked key mints a new token after the withdrawal: 401 `key_unknown`, and the upstream never
sees the request. A JWKS that is not a key set at all (an HTML error page) is a failed fetch that keeps the keys.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from gateways import EchoUpstream, GatewayProcess, LocalIssuer, http_request, start_verifier
from rigs import gateway_fixture

pytestmark = pytest.mark.integration

STRANGER = ec.generate_private_key(ec.SECP256R1())
# `issuer` (rigs, module-scoped: this module's own) has its key set changed by the tests, and restored.


@pytest.fixture(scope="module")
def verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The real verifier, refetching the JWKS on every unknown kid (no cooldown), so a test can make it look."""
    entry = {
        "issuer": issuer.issuer,
        "audiences": [issuer.audience],
        "algorithms": ["ES256"],
        "allow_insecure_http": True,
        "jwks_cooldown_seconds": 0,
    }
    proc = start_verifier(tmp_path_factory.mktemp("verifier"), issuer=issuer.issuer, extra_config={"issuers": [entry]})
    yield proc
    proc.stop()


edge = gateway_fixture("edge")


def _status(url: str, token: str) -> int:
    return http_request(url + "/orders", headers={"Authorization": f"Bearer {token}"}).status


def _refetch(url: str, issuer: LocalIssuer) -> int:
    """A token under a kid never published: the verifier fetches the JWKS again and refuses the token (401; 503
    when the fetch failed: a rotated key cannot be told from a forged one). The answer's status."""
    return _status(url, issuer.mint(signing_key=STRANGER, headers={"kid": uuid.uuid4().hex}, sub="probe"))


def _serve(issuer: LocalIssuer, jwks: Any) -> None:
    if jwks is None:
        issuer.__dict__.pop("jwks", None)  # the issuer's own key set again
    else:
        issuer.jwks = lambda: jwks  # type: ignore[method-assign]


def _until(check: Any, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def keys_published(edge: str, issuer: LocalIssuer) -> Iterator[None]:
    """The issuer's key published and held by the verifier (the module's verifier is shared by every gateway)."""
    _serve(issuer, None)
    assert _refetch(edge, issuer) == 401
    assert _until(lambda: _status(edge, issuer.mint(sub="alice")) == 200)
    yield
    _serve(issuer, None)


@pytest.mark.parametrize(
    "withdrawn",
    [{"keys": []}, {"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0c2VjcmV0"}]}],
    ids=["empty-key-set", "only-an-oct-key"],
)
@pytest.mark.usefixtures("keys_published")
def test_a_token_signed_by_a_withdrawn_key_is_refused_through_the_gateway(
    edge: str, issuer: LocalIssuer, upstream: EchoUpstream, withdrawn: dict[str, Any]
) -> None:
    _serve(issuer, withdrawn)
    probe = _refetch(edge, issuer)
    upstream.clear()
    leaked = issuer.mint(sub="mallory")  # minted after the withdrawal with the leaked key, never seen before
    assert _status(edge, leaked) == 401
    assert upstream.requests == []
    assert probe == 401  # a good fetch (no keys), not a failed one (503)


@pytest.mark.usefixtures("keys_published")
def test_an_html_page_instead_of_the_jwks_keeps_the_keys(edge: str, issuer: LocalIssuer) -> None:
    _serve(issuer, "<html>maintenance</html>")  # served as a JSON string: not a key set
    assert _refetch(edge, issuer) == 503
    assert _status(edge, issuer.mint(sub="bob")) == 200
