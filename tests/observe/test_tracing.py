"""Decision spans and fetch spans through the running verifier, caught by OpenTelemetry's in-memory
exporter: the gateway's trace is the parent, the attributes say what was decided and never who or
with what token, a malformed `traceparent` starts a new trace, audit lines name the trace."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from typing import Any

import grpc
import pytest
from doorkit import http_exchange, running_verifier
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind

from verifier.config.introspection import IntrospectionConfig
from verifier.config.tracing import TracingConfig
from verifier.decision import Decision
from verifier.observe.otel import OtelTracing, build_tracing, sampler
from verifier.v1 import verifier_pb2, verifier_pb2_grpc

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
SUBJECT = "subject-that-must-stay-secret"
SECRET = "introspection-client-secret-for-the-test"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    yield spans
    spans.clear()


def tracing(exporter: InMemorySpanExporter, **options: Any) -> OtelTracing:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OtelTracing(provider, **options)


def configured(exporter: InMemorySpanExporter, **settings: Any) -> OtelTracing:
    """Tracing as the composition root builds it from the `tracing` section (spans to `exporter`)."""
    config = TracingConfig(traces_url="http://127.0.0.1:4318/v1/traces", **settings)
    return build_tracing(config, SimpleSpanProcessor(exporter))


def forward_auth(path: str, headers: Mapping[str, str]) -> bytes:
    lines = ["GET /v1/forward-auth HTTP/1.1", "Host: verifier", f"X-Forwarded-Uri: {path}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def decisions(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == "verifier.decide"]


async def wait_for_spans(exporter: InMemorySpanExporter, name: str, count: int) -> list[ReadableSpan]:
    for _ in range(200):
        found = [s for s in exporter.get_finished_spans() if s.name == name]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"{count} {name} spans expected, got {[s.name for s in exporter.get_finished_spans()]}")


def everything_recorded(spans: list[ReadableSpan]) -> str:
    """Every name, attribute, event and status text of the spans, as one string to search."""
    parts: list[Any] = []
    for span in spans:
        parts += [span.name, span.status.description, dict(span.attributes or {}), dict(span.resource.attributes)]
        parts += [(e.name, dict(e.attributes or {})) for e in span.events]
        parts += [dict(link.attributes or {}) for link in span.links]
    return json.dumps(parts, default=str)


async def test_a_forward_auth_decision_is_a_server_span_under_the_gateways_trace(
    exporter: InMemorySpanExporter,
) -> None:
    async with running_verifier(tracing=tracing(exporter)) as (app, idp):
        assert app.ports.http is not None
        token = idp.mint(sub=SUBJECT)
        headers = {"Authorization": f"Bearer {token}", "traceparent": TRACEPARENT, "tracestate": "congo=t61rcWkgMzE"}
        first = await http_exchange(app.ports.http, forward_auth("/a", headers))
        second = await http_exchange(app.ports.http, forward_auth("/a", headers))
        refused = await http_exchange(app.ports.http, forward_auth("/a", {"traceparent": TRACEPARENT}))
    assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 200")
    assert refused.startswith(b"HTTP/1.1 401")
    spans = decisions(exporter)
    assert len(spans) == 3
    for span in spans:
        assert span.kind is SpanKind.SERVER
        assert span.context is not None and format(span.context.trace_id, "032x") == TRACE
        assert span.parent is not None and span.parent.is_remote and format(span.parent.span_id, "016x") == PARENT
        assert span.attributes is not None and span.attributes["verifier.door"] == "forward_auth"
    assert spans[0].parent is not None and spans[0].parent.trace_state.get("congo") == "t61rcWkgMzE"
    attributes = [dict(s.attributes or {}) for s in spans]
    assert attributes[0] == {
        "verifier.door": "forward_auth",
        "verifier.issuer": idp.issuer,
        "verifier.outcome": "allow",
        "verifier.reason": "ok",
        "http.response.status_code": 200,
        "verifier.cache.hit": False,
    }
    assert attributes[1]["verifier.cache.hit"] is True and attributes[1]["verifier.issuer"] == idp.issuer
    assert attributes[2]["verifier.outcome"] == "deny" and attributes[2]["verifier.reason"] == "token_missing"


async def test_no_span_carries_the_token_or_the_subject(exporter: InMemorySpanExporter) -> None:
    """The attacker's view: whoever reads the trace backend learns neither the credential nor the user."""
    async with running_verifier(tracing=tracing(exporter)) as (app, idp):
        assert app.ports.http is not None and app.ports.grpc is not None
        tokens = [idp.mint(sub=SUBJECT), idp.mint(sub=SUBJECT, aud="https://elsewhere.test"), "not.a-token." + SUBJECT]
        for token in tokens:
            for _ in range(2):  # first sight and cache hit
                await http_exchange(app.ports.http, forward_auth("/x", {"Authorization": f"Bearer {token}"}))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            await ea_grpc.AuthorizationStub(channel).Check(envoy_request(tokens[0], {}))
    spans = exporter.get_finished_spans()
    assert len(decisions(exporter)) == 7
    recorded = everything_recorded(list(spans))
    for token in tokens:
        assert token not in recorded
        for piece in token.split("."):
            assert len(piece) < 8 or piece not in recorded
    assert SUBJECT not in recorded


async def test_a_refused_tokens_own_iss_never_becomes_a_span_attribute(exporter: InMemorySpanExporter) -> None:
    """The attacker's view: a token that does not verify says whatever it likes in `iss` (a fresh value per
    request, kilobytes long); none of it may reach the trace backend as `verifier.issuer`, an indexed attribute
    whose values must be the operator's issuers. A configured issuer's refused token keeps no issuer either: it
    is only ever the issuer of a token that verified."""

    def unsigned(iss: str, sub: str = "s") -> str:
        def b64(document: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()

        return f"{b64({'alg': 'ES256', 'kid': 'k', 'typ': 'JWT'})}.{b64({'iss': iss, 'sub': sub})}.AAAA"

    forged = [f"https://attacker.test/{i}/" + "x" * 4000 for i in range(3)]
    async with running_verifier(tracing=tracing(exporter)) as (app, idp):
        assert app.ports.http is not None
        for iss in [*forged, idp.issuer]:
            headers = {"Authorization": f"Bearer {unsigned(iss)}"}
            answer = await http_exchange(app.ports.http, forward_auth("/a", headers))
            assert answer.startswith(b"HTTP/1.1 401")
    spans = decisions(exporter)
    assert len(spans) == 4
    assert all(s.attributes is not None and s.attributes["verifier.outcome"] == "deny" for s in spans)
    assert [dict(s.attributes or {}).get("verifier.issuer") for s in spans] == [None] * 4
    assert "attacker.test" not in everything_recorded(list(exporter.get_finished_spans()))


@pytest.mark.parametrize(
    "value",
    [
        "00-" + TRACE + "-" + PARENT + "-01" + "0" * 8000,  # far too long
        f"00-{TRACE[:-1]}z-{PARENT}-01",  # bad hex
        f"ff-{TRACE}-{PARENT}-01",  # version ff
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        "\u00ff" * 55,
    ],
)
async def test_a_malformed_traceparent_starts_a_new_trace_and_the_answer_stands(
    exporter: InMemorySpanExporter, value: str
) -> None:
    async with running_verifier(tracing=tracing(exporter)) as (app, idp):
        assert app.ports.http is not None
        headers = {"Authorization": f"Bearer {idp.mint()}", "traceparent": value, "tracestate": "x=" + "y" * 5000}
        answer = await http_exchange(app.ports.http, forward_auth("/m", headers))
    assert answer.startswith(b"HTTP/1.1 200")
    (span,) = decisions(exporter)
    assert span.parent is None  # a root of its own
    assert span.context is not None and span.context.trace_id != 0
    assert format(span.context.trace_id, "032x") != TRACE


def envoy_request(token: str, headers: dict[str, str]) -> ea.CheckRequest:
    request = ea.CheckRequest()
    http = request.attributes.request.http
    http.method, http.host, http.path, http.scheme = "GET", "api.example.test", "/e", "https"
    http.headers.update({"authorization": f"Bearer {token}", **headers})
    return request


async def test_grpc_doors_take_the_parent_from_metadata_then_from_the_checked_request(
    exporter: InMemorySpanExporter,
) -> None:
    other_trace, other_parent = "a" * 32, "b" * 16
    async with running_verifier(tracing=tracing(exporter)) as (app, idp):
        token = idp.mint()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            envoy = ea_grpc.AuthorizationStub(channel)
            # Envoy's CheckRequest headers: the original request's traceparent.
            await envoy.Check(envoy_request(token, {"traceparent": TRACEPARENT}))
            # The call's metadata (Envoy's own ext_authz span, tracing on) wins over the request's header.
            await envoy.Check(
                envoy_request(token, {"traceparent": TRACEPARENT}),
                metadata=(("traceparent", f"00-{other_trace}-{other_parent}-01"),),
            )
            own = verifier_pb2_grpc.VerifierStub(channel)
            await own.Check(
                verifier_pb2.CheckRequest(
                    method="GET", host="api", path="/o", headers={"Authorization": f"Bearer {token}"}
                ),
                metadata=(("traceparent", TRACEPARENT),),
            )
    spans = decisions(exporter)
    assert [dict(s.attributes or {})["verifier.door"] for s in spans] == ["ext_authz", "ext_authz", "grpc"]
    parents = [(format(s.parent.trace_id, "032x"), format(s.parent.span_id, "016x")) for s in spans if s.parent]
    assert parents == [(TRACE, PARENT), (other_trace, other_parent), (TRACE, PARENT)]
    assert [dict(s.attributes or {})["verifier.cache.hit"] for s in spans] == [False, True, True]


async def test_an_introspection_call_is_a_client_span_under_the_decision_that_needed_it(
    exporter: InMemorySpanExporter,
) -> None:
    config = IntrospectionConfig(client_id="verifier", client_secret=SECRET)
    async with running_verifier(tracing=tracing(exporter), introspection=config) as (app, idp):
        assert app.ports.http is not None
        idp.introspection_client_secret = SECRET
        opaque = idp.mint_opaque(sub=SUBJECT)
        headers = {"Authorization": f"Bearer {opaque}", "traceparent": TRACEPARENT}
        answer = await http_exchange(app.ports.http, forward_auth("/i", headers))
        assert answer.startswith(b"HTTP/1.1 200"), answer
        (fetch,) = await wait_for_spans(exporter, "introspection", 1)
    (decision,) = decisions(exporter)
    assert fetch.kind is SpanKind.CLIENT
    assert fetch.parent is not None and decision.context is not None
    assert fetch.parent.span_id == decision.context.span_id and fetch.context.trace_id == decision.context.trace_id
    assert dict(fetch.attributes or {})["http.request.method"] == "POST"
    assert dict(fetch.attributes or {})["server.address"] == "127.0.0.1"
    assert opaque not in everything_recorded(exporter.get_finished_spans())
    assert SECRET not in everything_recorded(exporter.get_finished_spans())
    # The keys fetched at start-up: discovery and JWKS, each a CLIENT span of its own (no decision caused them).
    startup = [s for s in exporter.get_finished_spans() if s.name in ("discovery", "jwks")]
    assert {s.name for s in startup} == {"discovery", "jwks"}
    assert all(s.kind is SpanKind.CLIENT and s.parent is None for s in startup)


async def test_audit_lines_name_the_trace(exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture) -> None:
    """With tracing on: the span's trace (the gateway's, or a new one). Audit lines carry `_json_fields`."""
    caplog.set_level(logging.INFO, logger="verifier.audit")
    async with running_verifier(tracing=tracing(exporter)) as (app, idp):
        assert app.ports.http is not None
        await http_exchange(
            app.ports.http, forward_auth("/t", {"Authorization": f"Bearer {idp.mint()}", "traceparent": TRACEPARENT})
        )
        await http_exchange(app.ports.http, forward_auth("/t", {"Authorization": f"Bearer {idp.mint()}"}))
    lines = [json.loads("{" + r.__dict__["_json_fields"] + "}") for r in caplog.records if r.msg == "signature_check"]
    spans = decisions(exporter)
    assert [line["trace_id"] for line in lines] == [format(s.context.trace_id, "032x") for s in spans if s.context]
    assert lines[0]["trace_id"] == TRACE


async def test_audit_lines_name_the_gateways_trace_with_tracing_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="verifier.audit")
    async with running_verifier() as (app, idp):
        assert app.ports.http is not None and app.tracing is None
        await http_exchange(
            app.ports.http, forward_auth("/t", {"Authorization": f"Bearer {idp.mint()}", "traceparent": TRACEPARENT})
        )
        await http_exchange(
            app.ports.http, forward_auth("/t", {"Authorization": f"Bearer {idp.mint()}", "traceparent": "junk"})
        )
    lines = [json.loads("{" + r.__dict__["_json_fields"] + "}") for r in caplog.records if r.msg == "signature_check"]
    assert len(lines) == 2
    assert lines[0]["trace_id"] == TRACE
    assert "trace_id" not in lines[1]


def test_a_verifier_without_tracing_never_loads_opentelemetry() -> None:
    """Off means off: not one OpenTelemetry call per request, not even the import."""
    program = textwrap.dedent(
        """
        import asyncio, sys
        sys.path[:0] = sys.argv[1:]
        from doorkit import http_exchange, running_verifier

        async def main():
            async with running_verifier() as (app, idp):
                raw = (
                    "GET /v1/forward-auth/ HTTP/1.1\\r\\nHost: v\\r\\ntraceparent: 00-%s-%s-01\\r\\n"
                    "Authorization: Bearer %s\\r\\n\\r\\n" % ("1" * 32, "2" * 16, idp.mint())
                ).encode()
                for _ in range(2):
                    assert (await http_exchange(app.ports.http, raw)).startswith(b"HTTP/1.1 200")
            # redis-py loads OpenTelemetry's metrics SDK (and with it the trace API) when it is installed;
            # the tracing SDK, the exporter and our implementation are loaded only when tracing is on.
            print(sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk.trace", "opentelemetry.exporter",
                                                                 "verifier.observe.otel"))))

        asyncio.run(main())
        """
    )
    tests = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-c", program, tests], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


async def test_a_decision_under_an_unsampled_gateway_span_records_nothing_but_names_its_trace(
    exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """Parent-based sampling, opted into (`honour_parent_sampled`): the gateway said "not sampled", so neither the
    decision nor the introspection it causes is exported; the audit line still names the gateway's trace."""
    caplog.set_level(logging.INFO, logger="verifier.audit")
    config = IntrospectionConfig(client_id="verifier", client_secret=SECRET)
    unsampled = f"00-{TRACE}-{PARENT}-00"
    async with running_verifier(tracing=tracing(exporter, honour_parent_sampled=True), introspection=config) as (
        app,
        idp,
    ):
        assert app.ports.http is not None
        idp.introspection_client_secret = SECRET
        exporter.clear()  # the start-up key fetches
        jwt = {"Authorization": f"Bearer {idp.mint()}", "traceparent": unsampled}
        opaque = {"Authorization": f"Bearer {idp.mint_opaque()}", "traceparent": unsampled}
        assert (await http_exchange(app.ports.http, forward_auth("/u", jwt))).startswith(b"HTTP/1.1 200")
        assert (await http_exchange(app.ports.http, forward_auth("/u", opaque))).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.2)
    assert exporter.get_finished_spans() == ()
    lines = [json.loads("{" + r.__dict__["_json_fields"] + "}") for r in caplog.records if r.msg == "signature_check"]
    assert [line["trace_id"] for line in lines] == [TRACE, TRACE]


def test_a_sampler_that_ignores_the_parent_still_gets_a_span_under_an_unsampled_one(
    exporter: InMemorySpanExporter,
) -> None:
    """OTEL_TRACES_SAMPLER=always_on (not parent-based): the gateway's unsampled flag does not skip the span."""
    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    span = OtelTracing(provider, parent_based=False).decision("forward_auth", f"00-{TRACE}-{PARENT}-00", None, None)
    span.end(Decision(allowed=True, status=200, reason="ok"))
    (finished,) = exporter.get_finished_spans()
    assert finished.context is not None and format(finished.context.trace_id, "032x") == TRACE


@pytest.mark.parametrize(
    ("url", "full"),
    [
        ("https://user:pw@idp.example.test:8443/jwks?key=secret#frag", "https://idp.example.test:8443/jwks"),
        ("http://[::1]:9400/introspect", "http://[::1]:9400/introspect"),
    ],
)
def test_a_fetch_span_names_the_url_without_credentials_or_query(
    exporter: InMemorySpanExporter, url: str, full: str
) -> None:
    with tracing(exporter).fetch("jwks", "GET", url):
        pass
    (span,) = exporter.get_finished_spans()
    assert span.kind is SpanKind.CLIENT and span.name == "jwks"
    assert dict(span.attributes or {})["url.full"] == full
    assert "secret" not in everything_recorded([span]) and "pw" not in everything_recorded([span])


async def test_a_grpc_call_aborted_past_its_deadline_still_ends_its_span(exporter: InMemorySpanExporter) -> None:
    config = IntrospectionConfig(client_id="verifier", client_secret=SECRET)
    async with running_verifier(tracing=tracing(exporter), introspection=config) as (app, idp):
        idp.introspection_client_secret = SECRET
        idp.delay_seconds = 2.0  # the provider answers after the caller's deadline
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            request = verifier_pb2.CheckRequest(
                method="GET", host="api", path="/slow", headers={"Authorization": f"Bearer {idp.mint_opaque()}"}
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await verifier_pb2_grpc.VerifierStub(channel).Check(
                    request, metadata=(("traceparent", TRACEPARENT),), timeout=0.3
                )
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        (span,) = await wait_for_spans(exporter, "verifier.decide", 1)
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT
    assert dict(span.attributes or {})["verifier.outcome"] == "error"
    assert span.status.status_code.name == "ERROR"


def test_the_otlp_exporter_imports_beside_envoys_api() -> None:
    """xds-protos overwrites opentelemetry-proto's modules with an older copy unless scripts/otel_proto.sh
    puts them back: `tracing:` would then fail at start-up with an ImportError (seen on a fresh install)."""
    import envoy.service.auth.v3.external_auth_pb2  # noqa: F401  # Envoy's API (xds-protos), as the gRPC door loads it
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    assert OTLPSpanExporter is not None


FORCED = f"00-{TRACE}-{PARENT}-01"  # what any client can send: "my caller recorded this, record yours too"


def own_check(token: str) -> verifier_pb2.CheckRequest:
    return verifier_pb2.CheckRequest(method="GET", host="api", path="/o", headers={"Authorization": f"Bearer {token}"})


async def every_door_with(app: Any, idp: Any, parent: str) -> None:
    """A first-seen JWT, its cached repeat, a refusal and an opaque token (an introspection fetch) at forward-auth;
    the same token at Envoy's ext_authz (the parent in the checked request's headers, then in the call's metadata)
    and at our own gRPC Check (in the metadata)."""
    assert app.ports.http is not None and app.ports.grpc is not None
    jwt = idp.mint(sub=SUBJECT)
    for headers in (
        {"Authorization": f"Bearer {jwt}", "traceparent": parent},
        {"Authorization": f"Bearer {jwt}", "traceparent": parent},
        {"Authorization": "Bearer not-a-token", "traceparent": parent},
        {"Authorization": f"Bearer {idp.mint_opaque(sub=SUBJECT)}", "traceparent": parent},
    ):
        assert (await http_exchange(app.ports.http, forward_auth("/f", headers)))[:12] in (
            b"HTTP/1.1 200",
            b"HTTP/1.1 401",
        )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
        envoy = ea_grpc.AuthorizationStub(channel)
        await envoy.Check(envoy_request(idp.mint(), {"traceparent": parent}))
        await envoy.Check(envoy_request(idp.mint(), {}), metadata=(("traceparent", parent),))
        own = verifier_pb2_grpc.VerifierStub(channel)
        await own.Check(own_check(idp.mint()), metadata=(("traceparent", parent),))


def assert_one_span_per_door_under_the_parent(spans: list[ReadableSpan]) -> None:
    """One decision span for each decision `every_door_with` asked for, each the `traceparent`'s child."""
    assert [dict(s.attributes or {})["verifier.door"] for s in spans] == [
        *["forward_auth"] * 4,
        "ext_authz",
        "ext_authz",
        "grpc",
    ]
    assert all(s.context is not None and format(s.context.trace_id, "032x") == TRACE for s in spans)
    assert all(s.parent is not None and format(s.parent.span_id, "016x") == PARENT for s in spans)


async def test_a_clients_sampled_flag_does_not_make_the_verifier_record_its_requests(
    exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """The attacker's view: `sample_ratio: 0` (nothing recorded), and a client at the edge sends `traceparent:
    00-<id>-<id>-01` on every request, as the shipped gateways pass it. Following the flag made every one of its
    decisions (and the introspection each opaque token caused) a span exported: the exporter's bill and the
    verifier's CPU were the client's to spend. Now no door records anything; the audit lines still name the trace."""
    caplog.set_level(logging.INFO, logger="verifier.audit")
    config = IntrospectionConfig(client_id="verifier", client_secret=SECRET)
    async with running_verifier(tracing=configured(exporter, sample_ratio=0.0), introspection=config) as (app, idp):
        idp.introspection_client_secret = SECRET
        await every_door_with(app, idp, FORCED)
        await asyncio.sleep(0.2)
    assert [s.name for s in exporter.get_finished_spans()] == []
    lines = [json.loads("{" + r.__dict__["_json_fields"] + "}") for r in caplog.records if r.msg == "signature_check"]
    assert lines and {line.get("trace_id") for line in lines} == {TRACE}  # the trace id continued: correlation


async def test_a_client_cannot_keep_its_requests_out_of_the_traces_either(exporter: InMemorySpanExporter) -> None:
    """`-00` from a client is not followed either: with `sample_ratio: 1` its decisions are recorded like any
    other, under its trace id (correlation), on every door."""
    async with running_verifier(tracing=configured(exporter, sample_ratio=1.0)) as (app, idp):
        exporter.clear()  # the start-up key fetches
        await every_door_with(app, idp, f"00-{TRACE}-{PARENT}-00")
    assert_one_span_per_door_under_the_parent(decisions(exporter))


async def test_honour_parent_sampled_follows_the_gateways_flag_on_every_door(exporter: InMemorySpanExporter) -> None:
    """Opted in (a gateway in front replaces the client's traceparent with its own span): `-01` is recorded
    whatever the ratio says, `-00` is not."""
    config = IntrospectionConfig(client_id="verifier", client_secret=SECRET)
    traced = configured(exporter, sample_ratio=0.0, honour_parent_sampled=True)
    async with running_verifier(tracing=traced, introspection=config) as (app, idp):
        idp.introspection_client_secret = SECRET
        await every_door_with(app, idp, f"00-{TRACE}-{PARENT}-00")
        await asyncio.sleep(0.2)
        assert exporter.get_finished_spans() == ()
        await every_door_with(app, idp, FORCED)
        await wait_for_spans(exporter, "introspection", 1)
    assert_one_span_per_door_under_the_parent(decisions(exporter))


@pytest.mark.parametrize("flags", ["00", "01"])
def test_the_verifiers_draw_decides_never_the_trace_id_the_client_chose(
    exporter: InMemorySpanExporter, flags: str
) -> None:
    """A ratio over the trace id (OpenTelemetry's TraceIdRatioBased) is one the client can pick: a trace id whose
    low 64 bits are 1 is under any ratio's bound. The verifier's own draw decides instead, whatever the flag."""
    config = TracingConfig(traces_url="http://127.0.0.1:4318/v1/traces", sample_ratio=0.01)
    provider = TracerProvider(sampler=sampler(config))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    draws = iter([0.5, 0.005])
    traced = OtelTracing(provider, sample_ratio=0.01, draw=lambda: next(draws))
    chosen = f"00-{'0' * 31}1-{PARENT}-{flags}"
    for _ in range(2):
        traced.decision("forward_auth", chosen, None, None).end(Decision(allowed=True, status=200, reason="ok"))
    (kept,) = decisions(exporter)  # the second draw (0.005 < 0.01) only
    assert kept.context is not None and kept.context.trace_id == 1


DECISION_ATTRIBUTES = {
    "verifier.door", "verifier.outcome", "verifier.reason", "http.response.status_code", "verifier.cache.hit",
    "verifier.issuer",
}  # fmt: skip


async def test_no_span_attribute_is_a_value_the_client_chose(exporter: InMemorySpanExporter) -> None:
    """The attacker's view of the trace backend, whose attribute values it indexes: the client's path, host,
    method, user agent, a header of its own naming, a forged token's iss/kid/alg, an admitted token's subject, a
    `tracestate` (well formed or not), on every door, first sight and cache hit. The decision span's attributes are
    the fixed set, each value the code's, the catalogue's or a verified issuer: the same set of (name, value)
    pairs whatever the client wrote."""
    from doorkit import http_exchange as exchange

    def forged(marker: str) -> str:
        def b64(document: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()

        header, claims = {"alg": f"X{marker}", "kid": marker, "typ": marker}, {"iss": marker, "sub": marker}
        return f"{b64(header)}.{b64(claims)}.AAAA"

    async def send(app: Any, idp: Any, marker: str) -> None:
        tokens = [forged(marker), idp.mint(sub=f"sub-{marker}", scope=f"read {marker}")]
        state = {"tracestate": f"{marker}={marker},zz=" + marker * 40}  # too long: dropped whole
        for token in tokens:
            headers = {"Authorization": f"Bearer {token}", "traceparent": TRACEPARENT, "User-Agent": marker,
                       "X-Forwarded-Host": f"{marker}.example", "X-Forwarded-Method": marker[:6].upper(),
                       marker: marker, "tracestate": f"{marker}={marker}"}  # fmt: skip
            for _ in range(2):  # first sight, then the cache's answer
                await exchange(app.ports.http, forward_auth(f"/{marker}?q={marker}", headers))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            for token in tokens:
                await ea_grpc.AuthorizationStub(channel).Check(
                    envoy_request(token, {"traceparent": TRACEPARENT, "user-agent": marker, marker: marker, **state})
                )
                own = verifier_pb2.CheckRequest(
                    method=marker, path=f"/{marker}", host=f"{marker}.example",
                    headers={"authorization": f"Bearer {token}", "traceparent": TRACEPARENT, "user-agent": marker},
                )  # fmt: skip
                await verifier_pb2_grpc.VerifierStub(channel).Check(own)

    def attributes() -> set[tuple[str, object]]:
        return {pair for span in decisions(exporter) for pair in (span.attributes or {}).items()}

    async with running_verifier(tracing=tracing(exporter)) as (app, idp):
        first, second = "zqa" + "1" * 9, "zqb" + "2" * 9
        await send(app, idp, first)
        after_first = attributes()
        exporter.clear()
        await send(app, idp, second)
        after_second = attributes()
    assert {name for name, _ in after_first} == DECISION_ATTRIBUTES
    assert after_second == after_first
    assert ("verifier.issuer", idp.issuer) in after_first
    assert first not in json.dumps(sorted(map(str, after_first)))
