"""Through every shipped gateway configuration (real nginx; real Envoy in gRPC mode, HTTP mode and reusing
answers in its Lua filter) the client's W3C `traceparent` reaches the verifier: its decision span, exported to
a real OTLP receiver on loopback, is a child of the client's span. A malformed one starts a new trace and the
request is still judged."""

from __future__ import annotations

import pytest
from gateways import LocalIssuer, http_request
from otlp_receiver import OtlpReceiver, exporting_verifier, receiver  # noqa: F401

# The shipped gateways in front of `verifier` (this module's: it exports spans), as the trust-boundary tests run them.
from test_trust_boundary import Edge, edge  # noqa: F401

pytestmark = pytest.mark.integration

PARENT = "1234567890abcdef"

verifier = exporting_verifier()


def test_the_verifiers_decision_joins_the_clients_trace(
    edge: Edge,  # noqa: F811
    receiver: OtlpReceiver,  # noqa: F811
    issuer: LocalIssuer,
) -> None:
    name, url = edge.name, edge.url
    trace_id = (name.encode().hex() + "0" * 32)[:31] + "1"
    headers = {
        "Authorization": f"Bearer {issuer.mint(sub='alice', scope='read')}",
        "traceparent": f"00-{trace_id}-{PARENT}-01",
        "tracestate": "edge=test",
    }
    before = len(receiver.named("verifier.decide"))
    assert http_request(url + "/traced", headers=headers).status == 200
    spans = receiver.wait_for("verifier.decide", before + 1)
    mine = [s for s in spans if s["trace_id"] == trace_id]
    assert len(mine) == 1, [(s["span_id"], s["attributes"]) for s in mine]
    assert mine[0]["parent_span_id"] == PARENT
    assert mine[0]["attributes"]["verifier.outcome"] == "allow"
    assert mine[0]["attributes"]["verifier.door"] == ("ext_authz" if name == "envoy-grpc" else "forward_auth")


def test_a_malformed_traceparent_through_the_gateway_starts_a_new_trace(
    edge: Edge,  # noqa: F811
    receiver: OtlpReceiver,  # noqa: F811
    issuer: LocalIssuer,
) -> None:
    url = edge.url
    headers = {"Authorization": f"Bearer {issuer.mint(sub='alice', scope='read')}", "traceparent": "ff-" + "f" * 60}
    before = len(receiver.named("verifier.decide"))
    assert http_request(url + "/untraced", headers=headers).status == 200
    spans = receiver.wait_for("verifier.decide", before + 1)
    assert len(spans) == before + 1, spans[before:]
    assert spans[-1]["parent_span_id"] == "" and spans[-1]["trace_id"] != "f" * 32
