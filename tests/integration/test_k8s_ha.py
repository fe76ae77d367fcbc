"""deploy/k8s/verifier-sidecar-ha.yaml as shipped, run: its verifier config with only the addresses rewritten (the
issuer a local provider, the Redis URL's host and port a local redis-server running the shipped redis.conf, the
listeners loopback ports), as many real replicas as the Deployment's `replicas`, each given the variables its
container takes from Secrets. What the file is for then holds: a DPoP proof accepted by one replica is a replay at
every other, a kill switch taken by one replica refuses the token at all of them, and the shipped Redis settings
draw no warning from the verifier (eviction policy, maxmemory against its bounds)."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from gateways import (
    LOOPBACK,
    GatewayProcess,
    LocalIssuer,
    http_request,
    kill_switch,
    run_verifier,
    verifier_unusable_reason,
)
from k8skit import (
    HA,
    Manifest,
    container,
    load_manifest,
    pod_spec,
    redis_conf,
    secret_env,
    verifier_config_text,
    workload,
)
from redis import Redis
from redis_harness import RedisServer, start_redis
from replicas import API_HOST, dpop_call, dpop_proof, forward_auth, public_jwk, start_replicas_with
from support import free_port

from verifier.binding.dpop import thumbprint
from verifier.config.state import MAX_TIMEOUT_SECONDS

pytestmark = pytest.mark.integration

# The Secrets the file's containers read (secretKeyRef: Secret, key), as `kubectl create secret` would hold them.
SECRETS = {
    ("edge-verifier-redis", "password"): "redis-password-of-the-ha-test-0123456789",
    ("edge-verifier-admin-token", "token"): "admin-token-of-the-ha-test-0123456789abcdef",
    ("edge-verifier-metrics-token", "token"): "metrics-token-of-the-ha-test-0123456789abcd",
}
# What the rewrite may change in the shipped verifier config: addresses, and what a local one needs.
REWRITTEN = {
    "grpc.listen",
    "http.listen",
    "metrics.listen",
    "metrics.token_file",  # the Secret's mount: a file here
    "issuers.0.issuer",
    "issuers.0.allow_insecure_http",  # the local provider is plain http on loopback
    "state.redis_url",  # host and port only
    "state.timeout_seconds",  # the product's most: a loaded test machine stalls longer than Redis answers
}
REDIS_ADDRESS_DIRECTIVES = {"bind", "port", "dir"}  # the harness's: loopback, a free port, the test's directory
SYNC_S = 10.0  # seconds for a revocation taken at one replica to refuse at the others (at once, a loaded machine)
WARNINGS = ("redis_evicts_replay_keys", "redis_maxmemory_below_replay_bound")


def local_config(text: str, *, issuer: str, redis: RedisServer, work: Path) -> dict[str, Any]:
    """The shipped verifier config, its addresses those of this machine's issuer, Redis and free loopback ports."""
    config: dict[str, Any] = yaml.safe_load(text)
    for door in ("grpc", "http", "metrics"):
        config[door]["listen"] = f"{LOOPBACK}:{free_port()}"
    token = work / "metrics-token"
    token.write_text(SECRETS[("edge-verifier-metrics-token", "token")])
    token.chmod(0o600)
    config["metrics"]["token_file"] = str(token)
    (entry,) = config["issuers"]
    entry["issuer"] = issuer
    entry["allow_insecure_http"] = True
    url = urlsplit(config["state"]["redis_url"])
    config["state"]["redis_url"] = urlunsplit(url._replace(netloc=f"{LOOPBACK}:{redis.port}"))
    config["state"]["timeout_seconds"] = MAX_TIMEOUT_SECONDS
    return config


def changed(shipped: Any, local: Any, path: str = "") -> set[str]:
    """The dotted paths where two parsed configs differ."""
    if isinstance(shipped, dict) and isinstance(local, dict):
        keys = shipped.keys() | local.keys()
        return set().union(*(changed(shipped.get(k), local.get(k), f"{path}{k}.") for k in keys))
    if isinstance(shipped, list) and isinstance(local, list) and len(shipped) == len(local):
        return set().union(*(changed(a, b, f"{path}{i}.") for i, (a, b) in enumerate(zip(shipped, local, strict=True))))
    return set() if shipped == local else {path.rstrip(".")}


def start_shipped_redis(tmp_path: Path, manifest: Manifest) -> RedisServer:
    """A redis-server with the shipped redis.conf's directives but its addresses, and the shipped password: the one
    the Redis container's `--requirepass $(VARIABLE)` takes from its Secret."""
    args = [
        arg
        for directive, values in redis_conf(manifest).items()
        if directive not in REDIS_ADDRESS_DIRECTIVES
        for arg in (f"--{directive}", *values)
    ]
    server = start_redis(tmp_path, *args)
    redis = container(pod_spec(manifest, "StatefulSet"), "redis")
    command = [*redis.get("command", []), *redis.get("args", [])]
    variable = command[command.index("--requirepass") + 1].removeprefix("$(").removesuffix(")")
    client = Redis.from_url(server.url)
    try:  # set once it answers: the harness's readiness PING carries no password
        client.config_set("requirepass", SECRETS[secret_env(redis)[variable]])
    finally:
        client.close()
    return server


@dataclass(frozen=True)
class Rig:
    issuer: LocalIssuer
    redis: RedisServer
    replicas: list[GatewayProcess]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    reason = verifier_unusable_reason()
    if reason:
        pytest.skip(reason)
    tmp_path = tmp_path_factory.mktemp("k8s-ha")
    manifest = load_manifest(HA)
    text = verifier_config_text(manifest)
    environment = {name: SECRETS[ref] for name, ref in secret_env(container(pod_spec(manifest), "verifier")).items()}
    issuer = LocalIssuer()
    redis = start_shipped_redis(tmp_path, manifest)
    numbers = itertools.count()

    def replica() -> GatewayProcess:
        work = tmp_path / f"replica-{next(numbers)}"
        work.mkdir()
        config = local_config(text, issuer=issuer.issuer, redis=redis, work=work)
        assert changed(yaml.safe_load(text), config) <= REWRITTEN, changed(yaml.safe_load(text), config)
        return run_verifier(work, config, environment=environment)

    try:
        replicas = start_replicas_with(replica, workload(manifest)["spec"]["replicas"])
        try:
            yield Rig(issuer, redis, replicas)
        finally:
            for r in replicas:
                r.stop()
    finally:
        redis.stop()
        issuer.stop()


def test_a_dpop_proof_accepted_by_one_shipped_replica_is_a_replay_at_every_other(rig: Rig) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    token = rig.issuer.mint(cnf={"jkt": thumbprint(public_jwk(key))})
    url = f"https://{API_HOST}/orders/7"
    replicas = rig.replicas
    for first in replicas:
        call = dpop_call(token, dpop_proof(key, "POST", url, token))
        accepted = call(first)
        assert accepted.status == 200, accepted
        for other in replicas:  # the replica that accepted it included
            replayed = call(other)
            assert replayed.status == 401, (other.url, replayed)
            assert replayed.headers["www-authenticate"].startswith('DPoP realm="verifier", error="invalid_dpop_proof"')
    # One proof raced at every replica at once: exactly one of them accepts it.
    call = dpop_call(token, dpop_proof(key, "POST", url, token))
    tries = 4 * len(replicas)
    with ThreadPoolExecutor(max_workers=tries) as pool:
        statuses = list(pool.map(lambda i: call(replicas[i % len(replicas)]).status, range(tries)))
    assert sorted(statuses) == [200] + [401] * (tries - 1), statuses


def test_a_kill_switch_taken_by_one_shipped_replica_refuses_the_token_at_every_replica(rig: Rig) -> None:
    sub = f"ha-user-{uuid.uuid4().hex[:8]}"
    token, bystander = rig.issuer.mint(sub=sub), rig.issuer.mint(sub=f"{sub}-other")
    first, *others = rig.replicas
    for replica in rig.replicas:  # each has judged it (and may hold its answer) before the revocation
        assert forward_auth(replica, authorization=f"Bearer {token}", uri="/api/x").status == 200
    kill_switch(
        first.url,
        SECRETS[("edge-verifier-admin-token", "token")],
        {"format": "iss_sub", "iss": rig.issuer.issuer, "sub": sub},
    )
    for replica in [*others, first]:
        deadline = time.monotonic() + SYNC_S
        while (answer := forward_auth(replica, authorization=f"Bearer {token}", uri="/api/x")).status == 200:
            assert time.monotonic() < deadline, f"{replica.url} still allows a token revoked at {first.url}"
            time.sleep(0.05)
        assert answer.status == 401 and answer.headers["x-verifier-reason"] == "token_revoked", answer
        assert forward_auth(replica, authorization=f"Bearer {bystander}", uri="/api/x").status == 200


def _state_up(replica: GatewayProcess) -> bool:
    token = SECRETS[("edge-verifier-metrics-token", "token")]
    page = http_request(
        f"http://{LOOPBACK}:{replica.extra['metrics_port']}/metrics", headers={"Authorization": f"Bearer {token}"}
    )
    assert page.status == 200, page
    return 'verifier_state_up{backend="redis"} 1.0' in page.body.decode()


def test_the_shipped_redis_settings_draw_no_warning_from_the_replicas(rig: Rig) -> None:
    """Each replica reads Redis's `maxmemory-policy` and `maxmemory` when Redis first answers, and warns when Redis
    would evict replay keys or fill before the verifier's bounds: the shipped redis.conf gives it neither reason."""
    deadline = time.monotonic() + SYNC_S
    while not all(_state_up(r) for r in rig.replicas):  # the ping that comes just before the check
        assert time.monotonic() < deadline, "a replica never reached Redis"
        time.sleep(0.1)
    time.sleep(1.0)  # the check's own round trip, right after the ping
    for replica in rig.replicas:
        log = replica.log()
        assert not [code for code in WARNINGS if code in log], log[-3000:]
