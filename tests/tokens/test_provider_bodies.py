"""Provider answers that arrive in pieces are read whole (issue #26 G1).

Each of the four outbound reads (discovery, JWKS, introspection, RFC 8936 poll) talks to a real loopback
provider (`rawprovider.RawProvider`) that writes the head and the body separately, the body in several
writes with pauses, or chunked. A reader that takes only what is buffered refuses these as "not JSON".
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from rawprovider import RawProvider, Route, json_route
from tokenkit import AUDIENCE

from verifier.app import build_introspector
from verifier.clock import SystemClock
from verifier.config.revocation import parse_revocation_config
from verifier.errors import ProviderUnavailable
from verifier.observe.metrics import Metrics
from verifier.revocation.poll import Outcome, Poller
from verifier.settings import IssuerSettings
from verifier.tokens.fetch import HttpFetcher, read_body
from verifier.tokens.introspection import parse_introspection_config
from verifier.tokens.introspection_http import IntrospectionHttpClient
from verifier.tokens.jwks import IssuerKeys

FRAMINGS = ["split", "chunked", "close"]


def discovery(raw_provider: RawProvider) -> dict[str, Any]:
    return {
        "issuer": raw_provider.url,
        "jwks_uri": raw_provider.url + "/jwks",
        "introspection_endpoint": raw_provider.url + "/introspect",
    }


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_discovery_and_jwks_sent_in_pieces_make_the_issuer_ready(
    raw_provider: RawProvider, http_fetcher: HttpFetcher, jwks_document: dict[str, Any], framing: str
) -> None:
    raw_provider.routes["/.well-known/openid-configuration"] = json_route(discovery(raw_provider), framing=framing)
    raw_provider.routes["/jwks"] = json_route(jwks_document, framing=framing)
    settings = IssuerSettings(issuer=raw_provider.url, audiences=(AUDIENCE,), algorithms=("ES256",))
    issuer_keys = IssuerKeys(settings, http_fetcher, SystemClock(), Metrics(CollectorRegistry()))
    await issuer_keys.refresh()
    assert issuer_keys.ready.is_set()
    assert len(issuer_keys.kids) == len(jwks_document["keys"])


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_an_introspection_answer_sent_in_pieces_is_read_whole(
    raw_provider: RawProvider,
    introspection_http: IntrospectionHttpClient,
    monkeypatch: pytest.MonkeyPatch,
    framing: str,
) -> None:
    monkeypatch.setenv("VERIFIER_RAW_SECRET", "s3cret")
    raw_provider.routes["/.well-known/openid-configuration"] = json_route(discovery(raw_provider), framing=framing)
    answer = {"active": True, "sub": "alice", "aud": AUDIENCE, "scope": "read " + "x" * 4000}
    raw_provider.routes["/introspect"] = json_route(answer, framing=framing)
    config = parse_introspection_config(
        {"client_id": "verifier", "client_secret_env": "VERIFIER_RAW_SECRET"}, "issuers[0].introspection"
    )
    introspector = build_introspector(
        issuer=raw_provider.url,
        audiences=(AUDIENCE,),
        config=config,
        endpoint=None,  # discovered through the same reader
        http=introspection_http,
        clock=SystemClock(),
        registry=CollectorRegistry(),
    )
    try:
        principal = await introspector.introspect("opaque-token", b"h" * 32)
    finally:
        await introspector.close()
    assert principal.subject == "alice"
    assert introspector.breaker.state == 0


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_a_135_kb_poll_answer_sent_in_pieces_is_delivered(
    raw_provider: RawProvider, http_fetcher: HttpFetcher, framing: str
) -> None:
    sets = {f"jti-{i}": "e30." + "A" * 1300 + ".sig" for i in range(100)}
    raw_provider.routes["/poll"] = json_route({"sets": sets, "moreAvailable": False}, framing=framing)
    config = parse_revocation_config({"transmitters": [{
        "issuer": raw_provider.url, "audience": "aud", "delivery": "poll", "algorithms": ["ES256"],
        "poll_endpoint_url": raw_provider.url + "/poll", "jwks_uri": raw_provider.url + "/jwks",
        "allow_insecure_http": True,
    }]})
    (transmitter,) = config.transmitters
    received: list[str] = []

    async def receive(token: str) -> Outcome:
        received.append(token)
        return Outcome(True)

    issuer_keys = IssuerKeys(transmitter.key_settings(), http_fetcher, SystemClock(), Metrics(CollectorRegistry()))
    poller = Poller(transmitter, issuer_keys, lambda: http_fetcher.session, receive)
    assert len(json.dumps({"sets": sets})) > 130_000
    assert await poller.poll_once() is True  # acknowledgements owed
    assert len(received) == len(sets)


async def test_a_body_past_the_bound_is_refused_without_reading_it_all(
    raw_provider: RawProvider, http_fetcher: HttpFetcher
) -> None:
    raw_provider.routes["/big"] = Route(b"[" + b"1," * 5000 + b"1]", framing="chunked")
    async with http_fetcher.session.get(raw_provider.url + "/big") as response:
        with pytest.raises(ProviderUnavailable, match="too large"):
            await read_body(response, 1000, "document")
    raw_provider.routes["/declared"] = Route(b"[" + b"1," * 5000 + b"1]", framing="split")
    async with http_fetcher.session.get(raw_provider.url + "/declared") as response:
        with pytest.raises(ProviderUnavailable, match="too large"):
            await read_body(response, 1000, "document")
    result = await http_fetcher.get_json(raw_provider.url + "/declared", timeout=30, max_bytes=20_000)
    assert len(result.document) == 5001
