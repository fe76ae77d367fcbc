"""Real Envoy (gRPC ext_authz, the shipped template) to a real verifier whose gRPC connections live 1 s: at each
connection's age the verifier sends GOAWAY, lets the checks in flight finish within the grace and closes it; Envoy's
pool opens the next connection. Clients calling without pause across several ages see no failed request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

if __package__:
    from .gateways import EchoUpstream, GatewayProcess, LocalIssuer, http_request, start_gateway_for, start_verifier
else:  # tests/ is not a package: pytest put this directory on sys.path
    from gateways import EchoUpstream, GatewayProcess, LocalIssuer, http_request, start_gateway_for, start_verifier

from rigs import fresh_upstream_log  # noqa: F401 - autouse: each test sees only its own requests

pytestmark = pytest.mark.integration

AGE, GRACE = 1, 1
CALLERS, SECONDS = 4, 4.0  # each connection's age passes ~3 times under the callers


@pytest.fixture(scope="module")
def envoy(
    issuer: LocalIssuer, upstream: EchoUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    verifier = start_verifier(
        tmp_path_factory.mktemp("verifier"),
        issuer=issuer.issuer,
        extra_config={"grpc_max_connection_age_seconds": AGE, "grpc_max_connection_age_grace_seconds": GRACE},
    )
    try:
        gateway = start_gateway_for("envoy-grpc", tmp_path_factory.mktemp("envoy"), verifier, upstream.port)
        yield gateway
        gateway.stop()
    finally:
        verifier.stop()


def test_envoys_pooled_connections_lose_no_request_across_the_verifiers_connection_age(
    envoy: GatewayProcess, issuer: LocalIssuer
) -> None:
    headers = {"Authorization": f"Bearer {issuer.mint(sub='carol')}"}
    stop = time.monotonic() + SECONDS

    def caller(i: int) -> list[int]:
        statuses = []
        n = 0
        while time.monotonic() < stop:
            # a new path each time: no answer Envoy or the verifier remembers, every request a check
            statuses.append(http_request(f"{envoy.url}/r/{i}/{n}", headers=headers).status)
            n += 1
        return statuses

    with ThreadPoolExecutor(CALLERS) as pool:
        statuses = [s for result in pool.map(caller, range(CALLERS)) for s in result]
    assert len(statuses) >= CALLERS * 10
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
