"""A real OTLP/HTTP trace receiver on loopback: POST /v1/traces with protobuf `ExportTraceServiceRequest`s
(decoded with opentelemetry-proto), every span kept flattened with its resource's attributes."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from gateways import GatewayProcess, LocalIssuer, _QuietHandler, _ServerThread, start_verifier
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

SERVER = 2  # SPAN_KIND_SERVER in opentelemetry-proto
CLIENT = 3  # SPAN_KIND_CLIENT


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class _Handler(_QuietHandler):
    def do_POST(self) -> None:
        owner: OtlpReceiver = self.server.owner  # type: ignore[attr-defined]
        if self.path != "/v1/traces":
            self._send(404, b"")
            return
        body = self._drain_body()
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        owner.receive(self.headers.get("Content-Type", ""), body)
        self._send(200, ExportTraceServiceResponse().SerializeToString(), {"Content-Type": "application/x-protobuf"})


class OtlpReceiver(_ServerThread):
    """Collects the spans exporters send to `{url}/v1/traces`."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.content_types: set[str] = set()
        self.raw = b""  # every body received, to search for what must never be sent
        self._lock = threading.Lock()
        super().__init__(_Handler)

    def receive(self, content_type: str, body: bytes) -> None:
        """Decodes one export request."""
        message = ExportTraceServiceRequest.FromString(body)
        found = []
        for resource_spans in message.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        {
                            "name": span.name,
                            "kind": span.kind,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                            "resource": resource,
                        }
                    )
        with self._lock:
            self.content_types.add(content_type)
            self.raw += body
            self.spans += found

    def named(self, name: str) -> list[dict[str, Any]]:
        """The spans received with this name, in arrival order."""
        with self._lock:
            return [s for s in self.spans if s["name"] == name]

    def wait_for(self, name: str, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """At least `count` spans named `name` (or what came within `timeout`)."""
        deadline = time.monotonic() + timeout
        while len(self.named(name)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.named(name)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    """A module's OTLP receiver (a test module imports it by name)."""
    server = OtlpReceiver()
    yield server
    server.stop()


def exporting_verifier(**tracing: object) -> Any:
    """A module fixture named `verifier` (the one the gateway rigs front): `verifier serve` trusting `issuer`,
    exporting its spans to the module's `receiver` every 0.1 s, with `tracing` added to its `tracing` section.

    In a test module: `verifier = exporting_verifier(sample_ratio=0.0)`.
    """

    @pytest.fixture(name="verifier", scope="module")
    def running(
        issuer: LocalIssuer, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[GatewayProcess]:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export every 0.1 s (a standard variable the SDK reads)
            proc = start_verifier(
                tmp_path_factory.mktemp("verifier"),
                issuer=issuer.issuer,
                extra_config={"tracing": {"otlp_endpoint": receiver.url, **tracing}},
            )
        try:
            yield proc
        finally:
            proc.stop()

    return running
