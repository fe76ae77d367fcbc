"""The OpenTelemetry implementation of `verifier.observe.tracing.Tracing`: spans exported over OTLP/HTTP.

Built by the composition root only when tracing is on (`verifier.config.tracing`); imported nowhere
else, so a verifier without tracing never loads OpenTelemetry. No global provider is installed: the
verifier's tracer is its own, handed down, and an embedding program's tracing is left alone.

The gateway's `traceparent` is parsed by `verifier.observe.traceparent` (strict W3C, bounded), not by
the OpenTelemetry propagator: what does not parse starts a new trace, and nothing the client wrote
is logged. Its sampled flag is the sender's choice, and through the shipped gateways the sender is the
client: unless the operator says a gateway sets it (`honour_parent_sampled`), the verifier replaces it with
a draw of its own at `sample_ratio` before OpenTelemetry sees it (W3C Trace Context section 8.3). The trace
id is kept (correlation); the draw never reads it (a ratio over the trace id is one the client can pick).

Export runs on the SDK's background thread through a bounded queue (`max_queue`): a slow or absent
collector costs dropped spans, never a slower decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from verifier.config.tracing import TracingConfig
from verifier.decision import Decision
from verifier.observe import traceparent
from verifier.observe.tracing import DecisionSpan

DECISION_SPAN = "verifier.decide"
INSTRUMENTATION = "verifier"
ISSUER_HEADER = "x-authenticated-issuer"
MAX_EXPORT_BATCH = 512  # spans per OTLP request (the SDK's default), at most the queue

# Span attribute names (OpenTelemetry semantic conventions where one exists; ours under `verifier.`).
DOOR = "verifier.door"
OUTCOME = "verifier.outcome"
REASON = "verifier.reason"
ISSUER = "verifier.issuer"
CACHE_HIT = "verifier.cache.hit"
STATUS = "http.response.status_code"
FETCH = "verifier.fetch"


def _remote_span(found: traceparent.TraceParent, state: str | None) -> NonRecordingSpan:
    """The gateway's span, as OpenTelemetry's parent of ours."""
    members = traceparent.tracestate(state)
    span_context = SpanContext(
        trace_id=int(found.trace_id, 16),
        span_id=int(found.span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(found.flags & TraceFlags.SAMPLED),
        trace_state=TraceState([tuple(m.split("=", 1)) for m in members.split(",")]) if members else None,  # type: ignore[misc]
    )
    return NonRecordingSpan(span_context)


def _trace_hex(span: trace.Span) -> str:
    span_context = span.get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""


class _Decision:
    """One decision's span; `end` is called once, by the door that started it."""

    __slots__ = ("_cached", "_span")

    def __init__(self, span: trace.Span, cached: str | None) -> None:
        self._span = span
        self._cached = cached

    def current(self) -> AbstractContextManager[object]:
        """The span as the current one (the door keeps exceptions to itself: none are recorded here)."""
        return trace.use_span(self._span, record_exception=False, set_status_on_exception=False)

    def end(self, decision: Decision) -> None:
        """Outcome, reason, status, cache hit and issuer (never the subject), then the end."""
        span = self._span
        span.set_attribute(OUTCOME, decision.outcome)
        span.set_attribute(REASON, decision.reason)
        span.set_attribute(STATUS, decision.status)
        span.set_attribute(CACHE_HIT, self._cached is not None)
        issuer = self._cached
        if not issuer and decision.allowed:
            issuer = next((v for k, v in decision.upstream_headers if k == ISSUER_HEADER), "")
        if issuer:
            span.set_attribute(ISSUER, issuer)
        if decision.outcome == "error":
            span.set_status(Status(StatusCode.ERROR, decision.reason))
        span.end()


class _Unsampled:
    """A decision under a gateway span that was not sampled, with a parent-based sampler: OpenTelemetry would
    make a span that records nothing; this skips making it (the SDK's `start_span` is most of a traced
    decision's cost). The gateway's span is current inside, so fetch spans are not sampled either and audit
    lines name its trace."""

    __slots__ = ("_parent",)

    def __init__(self, parent: NonRecordingSpan) -> None:
        self._parent = parent

    def current(self) -> AbstractContextManager[object]:
        """The gateway's span as the current one."""
        return trace.use_span(self._parent, record_exception=False, set_status_on_exception=False)

    def end(self, decision: Decision) -> None:
        """Nothing was recorded."""


class OtelTracing:
    """Spans from one tracer of the given provider (the composition root's; the tests' in-memory one).

    `parent_based`: the provider's sampler follows the parent's sampled flag (the default), so a decision
    under an unsampled parent needs no span of its own. `honour_parent_sampled`: the flag the gateway's
    `traceparent` carries is that parent's; when False (the default: a client may have written it) it is
    replaced by `draw() < sample_ratio`, the verifier's own decision (`draw`: uniform in [0, 1)).
    """

    def __init__(
        self,
        provider: TracerProvider,
        *,
        parent_based: bool = True,
        honour_parent_sampled: bool = False,
        sample_ratio: float = 1.0,
        draw: Callable[[], float] = random.random,  # sampling, not a secret: nothing to guess
    ) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer(INSTRUMENTATION)
        self._parent_based = parent_based or not honour_parent_sampled
        self._honour = honour_parent_sampled
        self._ratio = sample_ratio
        self._draw = draw

    def decision(self, door: str, parent: str | None, state: str | None, cached: str | None) -> DecisionSpan:
        """A SERVER span, child of the gateway's span when its `traceparent` parses (never the ambient
        context: a decision is a root of ours unless the gateway says otherwise)."""
        found = traceparent.parse(parent)
        if found is None:
            context = otel_context.Context()
        else:
            if not self._honour:  # the sender's flag is not ours to follow: our own draw stands in for it
                kept = TraceFlags.SAMPLED if self._draw() < self._ratio else 0
                found = found._replace(flags=(found.flags & ~TraceFlags.SAMPLED) | kept)
            remote = _remote_span(found, state)
            if not found.sampled and self._parent_based:
                return _Unsampled(remote)
            context = trace.set_span_in_context(remote)
        span = self._tracer.start_span(DECISION_SPAN, context=context, kind=SpanKind.SERVER, attributes={DOOR: door})
        return _Decision(span, cached)

    @contextlib.contextmanager
    def fetch(self, what: str, method: str, url: str) -> Iterator[object]:
        """A CLIENT span around one outbound call; a failure marks it (its type and our description)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets
        attributes: dict[str, str | int] = {
            FETCH: what,
            "http.request.method": method,
            # No query (it may carry a secret) and no user info.
            "url.full": f"{parts.scheme}://{netloc}{f':{parts.port}' if parts.port else ''}{parts.path}",
            "server.address": host,
        }
        if parts.port:
            attributes["server.port"] = parts.port
        with self._tracer.start_as_current_span(
            what, kind=SpanKind.CLIENT, attributes=attributes, record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                yield span
            except BaseException as exc:
                span.set_attribute("error.type", type(exc).__name__)
                description = getattr(exc, "description", "")
                span.set_status(Status(StatusCode.ERROR, description if isinstance(description, str) else ""))
                raise

    def token_checked(self, headers: Mapping[str, str], issuer: str) -> str:
        """The issuer onto the current decision's span; its trace id for the audit line."""
        span = trace.get_current_span()
        if issuer:
            span.set_attribute(ISSUER, issuer)
        return _trace_hex(span) or traceparent.trace_id(headers)

    def trace_id(self, headers: Mapping[str, str]) -> str:
        """The current span's trace, else the gateway's."""
        return _trace_hex(trace.get_current_span()) or traceparent.trace_id(headers)

    async def shutdown(self) -> None:
        """Exports what is queued (on a thread: the export may wait on the collector) and stops."""
        await asyncio.to_thread(self.provider.shutdown)


def sampler(config: TracingConfig) -> Sampler:
    """The configured ratio of new traces; parent-based unless OTEL_TRACES_SAMPLER said otherwise. Always
    parent-based when the gateway's flag is not honoured: `OtelTracing` has put its own draw in its place."""
    ratio = TraceIdRatioBased(config.sample_ratio)
    return ParentBased(root=ratio) if config.parent_based or not config.honour_parent_sampled else ratio


def build_tracing(config: TracingConfig, processor: SpanProcessor | None = None) -> OtelTracing:
    """The provider the configuration describes: OTLP/HTTP protobuf to `traces_url` through a bounded
    batch queue (`processor` replaces it in tests)."""
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}), sampler=sampler(config))
    if processor is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=config.traces_url, timeout=config.export_timeout_seconds)
        processor = BatchSpanProcessor(
            exporter,
            max_queue_size=config.max_queue,
            max_export_batch_size=min(MAX_EXPORT_BATCH, config.max_queue),
            export_timeout_millis=config.export_timeout_seconds * 1000,
        )
    provider.add_span_processor(processor)
    return OtelTracing(
        provider,
        parent_based=config.parent_based,
        honour_parent_sampled=config.honour_parent_sampled,
        sample_ratio=config.sample_ratio,
    )
