"""Overload through the shipped Envoy templates (real Envoy, real verifier), not timed.

- A verifier announcing a small `grpc_max_concurrent_streams` (the default, 4) refuses the streams of a burst sent
  before its SETTINGS were read (RST_STREAM), which Envoy's ext_authz answers with its status_on_error 503 (it
  does not retry them). The gRPC template opens at most 4 streams per connection: a burst is spread over more
  connections (or waits, bounded, in Envoy), and a verifier at the default bound never refuses one.

Cluster circuit breakers were tried and left out: their immediate 503s feed closed-loop clients faster than
checks are served (docs/BENCHMARKS.md, "Overload at the three doors").
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

if __package__:
    from .gateways import EchoUpstream, LocalIssuer, envoy_stats, http_request, start_envoy, start_verifier
else:  # tests/ is not a package: pytest put this directory on sys.path
    from gateways import EchoUpstream, LocalIssuer, envoy_stats, http_request, start_envoy, start_verifier

pytestmark = pytest.mark.integration

BURST = 128


def test_a_burst_past_the_verifiers_stream_bound_is_retried_not_answered_503(
    tmp_path: Path, issuer: LocalIssuer, upstream: EchoUpstream
) -> None:
    verifier = start_verifier(tmp_path, issuer=issuer.issuer)  # the shipped default bound
    envoy = start_envoy(tmp_path, "grpc", verifier_grpc_port=verifier.extra["grpc_port"], upstream_port=upstream.port)
    try:
        token = issuer.mint(sub="burst")
        with ThreadPoolExecutor(BURST) as pool:  # a fresh Envoy: its first connection to the verifier
            statuses = list(
                pool.map(
                    lambda _: http_request(f"{envoy.url}/api", headers={"Authorization": f"Bearer {token}"}).status,
                    range(BURST),
                )
            )
        stats = envoy_stats(envoy, "cluster.verifier_grpc.")
        assert statuses == [200] * BURST, (statuses.count(503), {k: v for k, v in stats.items() if v})
        assert stats.get("cluster.verifier_grpc.http2.rx_reset", 0) == 0  # nothing was refused
    finally:
        envoy.stop()
        verifier.stop()
