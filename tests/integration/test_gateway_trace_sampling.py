"""The attacker's view through every shipped gateway configuration (real nginx, nginx + Lua; real Envoy in gRPC
mode, HTTP mode and reusing answers in its Lua filter): the gateways pass a client's W3C `traceparent` to the
verifier as sent (correlation), so its sampled flag is the client's. With `sample_ratio: 0` a client sending
`-01` on every request must not make the verifier record and export a span for each one (W3C Trace Context
section 8.3): the spans would reach the real OTLP receiver on loopback here. (The Kong plugins forward only the
credential headers: no `traceparent` reaches the verifier through them.)"""

from __future__ import annotations

import time

import pytest
from gateways import LocalIssuer, http_request
from otlp_receiver import OtlpReceiver, exporting_verifier, receiver  # noqa: F401

# The shipped gateways in front of `verifier` (this module's: it exports spans), as the trust-boundary tests run them.
from test_trust_boundary import Edge, edge  # noqa: F401

pytestmark = pytest.mark.integration

EXPORT_WAIT_SECONDS = 1.0  # ten export rounds at OTEL_BSP_SCHEDULE_DELAY=100 (ms)

verifier = exporting_verifier(sample_ratio=0.0)


def test_a_clients_sampled_flag_through_the_gateway_does_not_make_the_verifier_export_spans(
    edge: Edge,  # noqa: F811
    receiver: OtlpReceiver,  # noqa: F811
    issuer: LocalIssuer,
) -> None:
    trace_id = (edge.name.encode().hex() + "0" * 32)[:31] + "1"
    forced = f"00-{trace_id}-1234567890abcdef-01"
    allowed = {"Authorization": f"Bearer {issuer.mint(sub='alice', scope='read')}", "traceparent": forced}
    for _ in range(3):  # first sight, then whatever the gateway or the verifier remembers
        assert http_request(edge.url + "/forced", headers=allowed).status == 200
    assert http_request(edge.url + "/forced", headers={"traceparent": forced}).status == 401
    time.sleep(EXPORT_WAIT_SECONDS)
    assert [(s["name"], s["trace_id"]) for s in receiver.spans] == []
