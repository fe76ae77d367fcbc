"""Each RFC 8936 poll request is a CLIENT span "ssf.poll" (a failed one marked), and the transmitter's JWKS
fetch a "jwks" span; the poll's bearer secret is in no span."""

from __future__ import annotations

import contextlib
import os

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry
from rawprovider import RawProvider, json_route

from verifier.clock import SystemClock
from verifier.config.revocation import parse_revocation_config
from verifier.errors import ProviderUnavailable
from verifier.observe.metrics import Metrics
from verifier.observe.otel import OtelTracing
from verifier.revocation.poll import Outcome, Poller
from verifier.tokens.fetch import HttpFetcher
from verifier.tokens.jwks import IssuerKeys

POLL_SECRET = "poll-bearer-secret-never-in-a-span"


async def test_a_poll_is_a_client_span_and_a_failed_one_is_marked(
    raw_provider: RawProvider, http_fetcher: HttpFetcher
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = OtelTracing(provider)
    os.environ["POLL_TOKEN_FOR_TRACING_TEST"] = POLL_SECRET
    try:
        config = parse_revocation_config(
            {
                "transmitters": [
                    {
                        "issuer": raw_provider.url,
                        "audience": "aud",
                        "delivery": "poll",
                        "algorithms": ["ES256"],
                        "poll_endpoint_url": raw_provider.url + "/poll?tenant=t1",
                        "jwks_uri": raw_provider.url + "/jwks",
                        "allow_insecure_http": True,
                        "poll_authorization_env": "POLL_TOKEN_FOR_TRACING_TEST",
                    }
                ]
            }
        )
    finally:
        del os.environ["POLL_TOKEN_FOR_TRACING_TEST"]
    (transmitter,) = config.transmitters
    keys = IssuerKeys(transmitter.key_settings(), http_fetcher, SystemClock(), Metrics(CollectorRegistry()), tracing)
    raw_provider.routes["/jwks"] = json_route({"keys": []}, pause=0)

    async def receive(token: str) -> Outcome:
        return Outcome(True)

    poller = Poller(transmitter, keys, lambda: http_fetcher.session, receive, tracing=tracing)
    raw_provider.routes["/poll"] = json_route({"sets": {}, "moreAvailable": False}, pause=0)
    assert await poller.poll_once() is False
    raw_provider.routes["/poll"] = json_route({"error": "down"}, status=503, pause=0)
    try:
        await poller.poll_once()
    except ProviderUnavailable:
        pass
    else:
        raise AssertionError("a 503 poll must fail")
    with contextlib.suppress(ProviderUnavailable):  # an empty key set is refused; the fetch is still a span
        await keys.refresh()
    spans = exporter.get_finished_spans()
    polls = [s for s in spans if s.name == "ssf.poll"]
    assert len(polls) == 2 and all(s.kind is SpanKind.CLIENT for s in polls)
    assert polls[0].status.status_code is StatusCode.UNSET
    assert polls[1].status.status_code is StatusCode.ERROR
    assert polls[1].status.description == "HTTP 503 from poll endpoint"
    assert dict(polls[1].attributes or {})["error.type"] == "ProviderUnavailable"
    assert dict(polls[0].attributes or {})["url.full"] == raw_provider.url + "/poll"  # no query
    assert [s.name for s in spans if s.name == "jwks"] == ["jwks"]
    for span in spans:
        assert POLL_SECRET not in str(dict(span.attributes or {})) and "tenant=t1" not in str(
            dict(span.attributes or {})
        )
