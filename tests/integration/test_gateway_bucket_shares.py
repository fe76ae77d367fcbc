"""Redis's bound of rate-limit buckets, split per `issuers[]` entry, through every shipped gateway configuration.

The attacker: anyone who can have an identity provider the verifier trusts mint users at will (a self-service
registration provider, a `tenants: any` template's tenant). Before, one bound of buckets (`state.redis_max_buckets`)
for every issuer: the attacker's new `sub`s, one request each, took every place, and from then on every new user of
every other issuer, the operator's own included, was answered 503 through the gateway. Now each entry has its own
part (equal parts by default): the attacker's entry stops at its part (503 with Retry-After, through the gateway;
Envoy's ext_authz over HTTP answers a verifier's 5xx with its own `status_on_error` 503, to which the template adds
Retry-After: 1), the operator's new users still pass to the upstream with their own budget.

Through nginx, nginx with the Lua plugin, and Envoy (ext_authz gRPC, HTTP, reuse); one verifier process
(`verifier serve`) on a real redis-server for the module, so each gateway after the first finds the attacker's part
already full.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis_harness import RedisServer, start_redis

if __package__:
    from .gateways import GATEWAY_KINDS, EchoUpstream, GatewayProcess, LocalIssuer, http_request, start_verifier
    from .test_trust_boundary import Edge
else:  # tests/ is not a package: pytest put this directory on sys.path
    from gateways import GATEWAY_KINDS, EchoUpstream, GatewayProcess, LocalIssuer, http_request, start_verifier
    from test_trust_boundary import Edge

from rigs import fresh_upstream_log, gateway_fixture  # noqa: F401 - autouse: each test sees only its own requests

pytestmark = pytest.mark.integration

PER_ENTRY = len(GATEWAY_KINDS)  # each gateway's own new user needs a place at the operator's entry
FLOOD = PER_ENTRY + 4  # new identities the attacker sends through each gateway


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, LocalIssuer]]:
    """The module's redis-server, and a second trusted provider where anyone can register: its users are whoever
    the attacker makes up."""
    redis, open_issuer = start_redis(tmp_path_factory.mktemp("bucket-shares-redis")), LocalIssuer()
    yield redis, open_issuer
    open_issuer.stop()
    redis.stop()


@pytest.fixture(scope="module")
def verifier(
    issuer: LocalIssuer, backends: tuple[RedisServer, LocalIssuer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    redis, open_issuer = backends
    entry = {"audiences": [issuer.audience], "algorithms": ["ES256"], "allow_insecure_http": True}
    proc = start_verifier(
        tmp_path_factory.mktemp("bucket-shares"),
        issuer=issuer.issuer,
        extra_config={
            "issuers": [{"issuer": issuer.issuer, **entry}, {"issuer": open_issuer.issuer, **entry}],
            "rate_limits": {"default": {"per_second": 0.001, "burst": 3}},
            "state": {"redis_url": redis.url, "key_prefix": "shares:", "redis_max_buckets": 2 * PER_ENTRY},
        },
    )
    yield proc
    proc.stop()


edge = gateway_fixture("edge", GATEWAY_KINDS, lambda kind, url: Edge(name=kind, url=url))


def test_identities_minted_at_one_issuer_never_take_the_operator_s_issuer_s_places(
    edge: Edge, upstream: EchoUpstream, issuer: LocalIssuer, backends: tuple[RedisServer, LocalIssuer]
) -> None:
    _, open_issuer = backends
    answers = [
        http_request(f"{edge.url}/orders/1", headers={"Authorization": f"Bearer {open_issuer.mint(sub=sub)}"})
        for sub in (f"{edge.name}-minted-{i}" for i in range(FLOOD))
    ]
    refused = [r for r in answers if r.status != 200]
    assert refused and all(r.status == 503 for r in refused), (edge.name, [r.status for r in answers])
    # ext_authz over HTTP takes a 5xx for an error: its own 503 (status_on_error), with the template's Retry-After: 1
    assert all(1 <= int(r.headers.get("retry-after", "0")) <= 3_000 for r in refused), refused[0].headers
    assert len(answers) - len(refused) <= PER_ENTRY  # the attacker's entry: its own part, never more
    upstream.clear()
    # The operator's own issuer: a new user passes, with the budget of a fresh bucket.
    token = issuer.mint(sub=f"{edge.name}-alice")
    r = http_request(f"{edge.url}/orders/1", headers={"Authorization": f"Bearer {token}"})
    assert r.status == 200, (edge.name, r.status, r.headers, r.body[:300])
    (seen,) = upstream.requests
    assert seen.headers["x-authenticated-userid"] == f"{edge.name}-alice"
