"""URLs learned from a provider's metadata pass the same check as configured ones (issue #26 G13).

`jwks_uri`, the introspection endpoint and the RFC 8936 poll endpoint come from documents the provider
serves; a credential (the client secret, the poll bearer) or a trust decision (the keys) must never
follow one that is plain http off loopback, or plain http at all for an https issuer.
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from support import FrozenClock
from tokenkit import AUDIENCE, FakeFetcher, discovery_document, make_issuer_keys

from verifier.app import build_introspector
from verifier.config.introspection import IntrospectionConfig
from verifier.errors import ProviderUnavailable
from verifier.revocation import parse_revocation_config
from verifier.revocation.poll import poll_endpoint
from verifier.settings import IssuerSettings
from verifier.tokens.introspection_client import HttpReply, HttpRequest

LOOPBACK = "http://127.0.0.1:9400"
HTTPS = "https://idp.example.test"


class RecordingHttp:
    """An introspection seam that records every request and answers active."""

    def __init__(self) -> None:
        self.requests: list[HttpRequest] = []

    async def send(self, request: HttpRequest) -> HttpReply:
        self.requests.append(request)
        return HttpReply(200, b'{"active": true, "sub": "x"}')


@pytest.mark.parametrize(
    ("issuer", "jwks_uri"),
    [
        (LOOPBACK, "http://evil.example.test/jwks"),  # plain http off loopback
        (LOOPBACK, "ftp://127.0.0.1/jwks"),
        (HTTPS, "http://127.0.0.1:1/jwks"),  # a downgrade, even to loopback
        (HTTPS, "https://[::1/jwks"),
    ],
)
async def test_a_discovered_jwks_uri_failing_the_url_check_is_never_fetched(
    issuer: str, jwks_uri: str, jwks_document: dict[str, Any]
) -> None:
    settings = IssuerSettings(issuer=issuer, audiences=(AUDIENCE,), algorithms=("ES256",))
    fetcher = FakeFetcher()
    fetcher.serve(settings.discovery, discovery_document(issuer, jwks_uri))
    fetcher.serve(jwks_uri, jwks_document)
    keys = make_issuer_keys(settings, fetcher, FrozenClock())
    with pytest.raises(ProviderUnavailable, match="jwks_uri"):
        await keys.refresh()
    assert fetcher.calls[jwks_uri] == 0
    assert not keys.ready.is_set()


@pytest.mark.parametrize(
    ("issuer", "learned"),
    [(LOOPBACK, "http://evil.example.test/introspect"), (HTTPS, "http://127.0.0.1:1/introspect")],
)
@pytest.mark.parametrize("source", ["key-store discovery", "own discovery"])
async def test_the_client_secret_never_goes_to_a_learned_introspection_endpoint_failing_the_check(
    issuer: str, learned: str, source: str
) -> None:
    http = RecordingHttp()
    discovery = {"issuer": issuer, "introspection_endpoint": learned}

    async def send(request: HttpRequest) -> HttpReply:
        if request.method == "GET":
            http.requests.append(request)
            import json

            return HttpReply(200, json.dumps(discovery).encode())
        return await RecordingHttp.send(http, request)

    http.send = send  # type: ignore[method-assign]
    introspector = build_introspector(
        issuer=issuer,
        audiences=(AUDIENCE,),
        config=IntrospectionConfig(client_id="verifier", client_secret="s" * 32),
        endpoint=None,
        clock=FrozenClock(),
        registry=CollectorRegistry(),
        http=http,
        discovered_endpoint=(lambda: learned) if source == "key-store discovery" else None,
    )
    try:
        with pytest.raises(ProviderUnavailable, match="introspection_endpoint"):
            await introspector.introspect("opaque", b"o" * 32)
    finally:
        await introspector.close()
    assert all(r.method == "GET" for r in http.requests), "no POST carried the client secret"


@pytest.mark.parametrize(
    ("issuer", "learned"),
    [(LOOPBACK, "http://evil.example.test/poll"), (HTTPS, "http://127.0.0.1:1/poll"), (LOOPBACK, "http://[::1/p")],
)
def test_a_learned_poll_endpoint_failing_the_check_is_never_used(issuer: str, learned: str) -> None:
    config = parse_revocation_config(
        {"transmitters": [{"issuer": issuer, "audience": "a", "delivery": "poll", "allow_insecure_http": True}]}
    )
    (transmitter,) = config.transmitters
    metadata = {"delivery": {"method": "urn:ietf:rfc:8936", "endpoint_url": learned}}
    assert poll_endpoint(transmitter, metadata) == ""


def test_a_learned_loopback_poll_endpoint_of_a_loopback_transmitter_is_used() -> None:
    config = parse_revocation_config(
        {"transmitters": [{"issuer": LOOPBACK, "audience": "a", "delivery": "poll", "allow_insecure_http": True}]}
    )
    (transmitter,) = config.transmitters
    metadata = {"delivery": {"method": "urn:ietf:rfc:8936", "endpoint_url": LOOPBACK + "/poll"}}
    assert poll_endpoint(transmitter, metadata) == LOOPBACK + "/poll"
