"""deploy/: the compose and Kubernetes files parse, and agree with the plugin, the verifier and each other.

No container engine runs here, so this is what can be checked without one: YAML/JSON syntax, the
plugin's name and config fields against kong/plugins/edge-verifier/schema.lua, the verifier URL against
the verifier's own listen address, the verifier configs through `verifier check-config`, and that every
file the compose services mount or build from exists.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from k8skit import (
    HA,
    SIDECAR,
    Manifest,
    container,
    load_manifest,
    pod_spec,
    redis_conf,
    secret_env,
    verifier_config_text,
    workload,
)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PLUGIN_DIR = REPO / "kong" / "plugins" / "edge-verifier"
SCHEMA_LUA = PLUGIN_DIR / "schema.lua"
PLUGIN_MOUNT = "/usr/local/share/lua/5.1/kong/plugins/edge-verifier"
FORWARD_AUTH_PATH = "/v1/forward-auth"


def schema_name() -> str:
    m = re.search(r'^\s*name\s*=\s*"([^"]+)"', SCHEMA_LUA.read_text(), re.MULTILINE)
    assert m, "schema.lua names no plugin"
    return m.group(1)


def schema_config_fields() -> set[str]:
    """Field names of the plugin's config record (every `{ name = ...` inside `config = { ... }`)."""
    text = SCHEMA_LUA.read_text()
    record = text[text.index("config = {") :]
    return set(re.findall(r"\{\s*([a-z_]+)\s*=\s*(?:typedefs|\{)", record)) - {"config"}


def load_yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def check_config(text: str, tmp_path: Path) -> str:
    """Runs `verifier check-config` on `text`; returns what it printed (its warnings). A `metrics.token_file` the
    deployment mounts from a Secret is replaced by a file here holding a token; a `state.password_env` it sets from
    a Secret is set here."""
    config = yaml.safe_load(text)
    if (config.get("metrics") or {}).get("token_file"):
        token = tmp_path / "metrics-token"
        token.write_text("t" * 64 + "\n")
        text = text.replace(config["metrics"]["token_file"], str(token))
    environment = dict(os.environ)
    if (config.get("state") or {}).get("password_env"):
        environment[config["state"]["password_env"]] = "p" * 32
    path = tmp_path / "verifier.yaml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "verifier", "check-config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
    )
    assert result.returncode == 0, result.stderr or result.stdout
    return result.stderr + result.stdout


def edge_verifier_plugins(declarative: dict[str, Any]) -> list[dict[str, Any]]:
    plugins = list(declarative.get("plugins") or [])
    for service in declarative.get("services") or []:
        plugins += service.get("plugins") or []
        for route in service.get("routes") or []:
            plugins += route.get("plugins") or []
    return [p for p in plugins if p["name"] == schema_name()]


def assert_checked_routes_name_their_hosts(declarative: dict[str, Any]) -> None:
    """The plugin tells the verifier the host Kong routed by (host policies, DPoP's htu); a route without `hosts`
    matches any Host, which lets the client choose it. Every route the plugin runs on names its hosts, none a
    wildcard; and the plugin is never global (it would run on any host's routes)."""
    assert not [p for p in declarative.get("plugins") or [] if p["name"] == schema_name()]
    for service in declarative.get("services") or []:
        on_service = any(p["name"] == schema_name() for p in service.get("plugins") or [])
        for route in service.get("routes") or []:
            if on_service or any(p["name"] == schema_name() for p in route.get("plugins") or []):
                hosts = route.get("hosts") or []
                assert hosts and not [h for h in hosts if "*" in h], (service["name"], route["name"], hosts)


def assert_plugin_points_at_verifier(declarative: dict[str, Any], verifier_config: dict[str, Any]) -> None:
    assert_checked_routes_name_their_hosts(declarative)
    (plugin,) = edge_verifier_plugins(declarative)
    assert set(plugin["config"]) <= schema_config_fields(), set(plugin["config"]) - schema_config_fields()
    url = urlsplit(plugin["config"]["url"])
    assert url.scheme == "http"
    assert f"{url.hostname}:{url.port}" == verifier_config["http"]["listen"]
    assert url.path == FORWARD_AUTH_PATH


# --------------------------------------------------------------------------- every file


@pytest.mark.parametrize(
    "path", sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")]), ids=lambda p: str(p.relative_to(DEPLOY))
)
def test_every_yaml_file_parses(path):
    assert load_yaml_docs(path)


def _readme_block(first_key: str) -> dict[str, Any]:
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    found = [block for block in map(yaml.safe_load, blocks) if next(iter(block)) == first_key]
    assert len(found) == 1, f"README.md: one yaml block starting with {first_key}:"
    return found[0]


def test_the_readmes_kong_plugin_block_names_the_plugin_and_its_fields():
    """README's Kong example (a declarative `plugins:` entry): the plugin's name and only fields its schema has."""
    (plugin,) = _readme_block("plugins")["plugins"]
    assert plugin["name"] == schema_name()
    assert set(plugin["config"]) <= schema_config_fields(), set(plugin["config"]) - schema_config_fields()
    assert plugin["config"]["url"].endswith(FORWARD_AUTH_PATH)


def test_the_readmes_prometheus_block_is_the_shipped_scrape_job():
    """README's scrape job excerpt (`scrape_configs:`) says what deploy/prometheus/prometheus.yml does."""
    (excerpt,) = _readme_block("scrape_configs")["scrape_configs"]
    shipped = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    job = next(j for j in shipped if j["job_name"] == excerpt["job_name"])
    assert job["authorization"] == excerpt["authorization"]


def test_the_schema_helpers_read_the_lua_schema():
    assert schema_name() == "edge-verifier"
    assert {"url", "timeout", "fail_open", "cache_entries"} <= schema_config_fields()


# --------------------------------------------------------------------------- docker compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = load_yaml_docs(DEPLOY / "docker-compose.yml")
    return dict(doc)


def volume_sources(service: dict[str, Any]) -> dict[str, Path]:
    """Bind mounts of a compose service: container path -> host path (relative to deploy/)."""
    out = {}
    for v in service.get("volumes") or []:
        source, target = v.split(":")[:2]
        out[target] = (DEPLOY / source).resolve()
    return out


def test_compose_runs_kong_dbless_with_the_plugin_mounted_and_enabled(compose):
    kong = compose["services"]["kong"]
    env = kong["environment"]
    assert env["KONG_DATABASE"] == "off"
    assert schema_name() in env["KONG_PLUGINS"].split(",")
    assert "bundled" in env["KONG_PLUGINS"].split(",")
    assert re.match(r"kong(/kong-gateway)?:3\.", kong["image"])
    mounts = volume_sources(kong)
    assert mounts[PLUGIN_MOUNT] == PLUGIN_DIR
    assert mounts[env["KONG_DECLARATIVE_CONFIG"]] == DEPLOY / "kong" / "kong.yml"


def test_compose_files_referenced_exist(compose):
    for name, service in compose["services"].items():
        for target, source in volume_sources(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) is missing"
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file(), name


def test_compose_verifier_is_built_from_the_repo_with_the_deploy_config(compose, tmp_path):
    verifier = compose["services"]["verifier"]
    assert (DEPLOY / verifier["build"]["context"]).resolve() == REPO
    # the image's CMD reads /etc/verifier/config.yaml
    assert "/etc/verifier/config.yaml" in (REPO / "Dockerfile").read_text()
    assert volume_sources(verifier)["/etc/verifier/config.yaml"] == DEPLOY / "verifier.yaml"
    # the plugin reaches it on loopback: same network namespace as kong
    assert verifier["network_mode"] == "service:kong"
    check_config((DEPLOY / "verifier.yaml").read_text(), tmp_path)


def test_compose_declarative_config_points_the_plugin_at_the_verifier(compose):
    (declarative,) = load_yaml_docs(DEPLOY / "kong" / "kong.yml")
    (verifier_config,) = load_yaml_docs(DEPLOY / "verifier.yaml")
    assert declarative["_format_version"] == "3.0"
    assert_plugin_points_at_verifier(declarative, verifier_config)


def unguarded_routes(declarative: dict[str, Any]) -> list[str]:
    """The routes of a Kong declarative config that reach the upstream of a service behind the plugin without the
    plugin running: it is named neither on the route, nor on its service, nor globally."""
    name = schema_name()

    def guarded(entity: dict[str, Any]) -> bool:
        return any(p.get("name") == name and p.get("enabled", True) for p in entity.get("plugins") or ())

    if any(
        p.get("name") == name and p.get("enabled", True) and not p.get("service") and not p.get("route")
        for p in declarative.get("plugins") or ()
    ):
        return []
    services = {s["name"]: s for s in declarative.get("services") or ()}
    protected = {s.get("url") or s.get("host") for s in services.values() if guarded(s)}
    routes = [(r, s) for s in services.values() for r in s.get("routes") or ()]
    routes += [
        (r, services.get((r.get("service") or {}).get("name", r.get("service"))))
        for r in declarative.get("routes") or ()
    ]
    return [
        str(route.get("name"))
        for route, service in routes
        if not guarded(route)
        and (service is None or (not guarded(service) and (service.get("url") or service.get("host")) in protected))
    ]


def test_no_shipped_kong_route_reaches_a_protected_upstream_without_the_plugin(k8s):
    """deploy/kong/kong.yml shipped `echo-open`: `/open`, no plugin, to the protected routes' upstream. Kong keeps `%2F`
    encoded, so `/open%2F..%2Fapi/x` was routed there unjudged and an upstream that decodes it read /api/x. Neither
    shipped declarative config (compose's, the k8s ConfigMap's) has a route to a protected upstream without it."""
    shipped = {
        "deploy/kong/kong.yml": load_yaml_docs(DEPLOY / "kong" / "kong.yml")[0],
        "k8s kong-declarative": yaml.safe_load(k8s[("ConfigMap", "kong-declarative")]["data"]["kong.yml"]),
    }
    for where, declarative in shipped.items():
        assert unguarded_routes(declarative) == [], where
    leaky = {
        "services": [
            {"name": "a", "url": "http://u", "plugins": [{"name": schema_name()}], "routes": [{"name": "x"}]},
            {"name": "b", "url": "http://u", "routes": [{"name": "open"}]},
        ]
    }
    assert unguarded_routes(leaky) == ["open"]  # the check itself sees the shape that shipped


def test_keycloak_realm_issues_tokens_the_verifier_accepts(compose):
    keycloak = compose["services"]["keycloak"]
    assert keycloak["image"].startswith("quay.io/keycloak/keycloak:")
    assert keycloak["command"][0] == "start-dev" and "--import-realm" in keycloak["command"]
    (realm_file,) = [s for t, s in volume_sources(keycloak).items() if t.startswith("/opt/keycloak/data/import/")]
    realm = json.loads(realm_file.read_text())
    (verifier_config,) = load_yaml_docs(DEPLOY / "verifier.yaml")
    (issuer,) = verifier_config["issuers"]

    hostname = next(a.split("=", 1)[1] for a in keycloak["command"] if a.startswith("--hostname="))
    assert issuer["issuer"] == f"{hostname}/realms/{realm['realm']}"
    audiences = {
        m["config"]["included.custom.audience"]
        for c in realm["clients"]
        for m in c.get("protocolMappers", [])
        if m["protocolMapper"] == "oidc-audience-mapper" and m["config"].get("access.token.claim") == "true"
    }
    assert audiences and audiences <= set(issuer["audiences"])
    # Keycloak listens where the issuer URL says, inside kong's network namespace (loopback for the verifier)
    assert f"--http-port={urlsplit(issuer['issuer']).port}" in keycloak["command"]
    assert keycloak["network_mode"] == "service:kong"


# --------------------------------------------------------------------------- kubernetes


@pytest.fixture(scope="module", params=[SIDECAR, HA], ids=lambda p: p.name)
def k8s(request: pytest.FixtureRequest) -> Manifest:
    """Each shipped Kubernetes file: every check of this section holds for the single-replica one and the highly
    available one alike."""
    return load_manifest(request.param)


@pytest.fixture(scope="module")
def sidecar() -> Manifest:
    return load_manifest(SIDECAR)


@pytest.fixture(scope="module")
def ha() -> Manifest:
    return load_manifest(HA)


def test_k8s_verifier_is_a_non_root_sidecar_with_a_healthz_readiness_probe(k8s):
    spec = pod_spec(k8s)
    verifier = container(spec, "verifier")
    sc = verifier["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "/healthz" in json.dumps(verifier["readinessProbe"])
    mounts = {m["mountPath"]: m["name"] for m in verifier["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/etc/verifier"]]["configMap"]["name"] == "edge-verifier-config"
    assert ("ConfigMap", "edge-verifier-config") in k8s


def test_k8s_verifier_config_is_valid_and_listens_on_loopback(k8s, tmp_path):
    text = verifier_config_text(k8s)
    check_config(text, tmp_path)
    config = yaml.safe_load(text)
    assert config["http"]["listen"].startswith("127.0.0.1:")
    probe = json.dumps(container(pod_spec(k8s), "verifier")["readinessProbe"])
    assert f"http://{config['http']['listen']}/healthz" in probe


def test_k8s_kong_loads_the_plugin_and_points_it_at_the_sidecar(k8s):
    spec = pod_spec(k8s)
    kong = container(spec, "kong")
    env = {e["name"]: e["value"] for e in kong["env"]}
    assert env["KONG_DATABASE"] == "off"
    assert schema_name() in env["KONG_PLUGINS"].split(",")
    mounts = {m["mountPath"]: m["name"] for m in kong["volumeMounts"]}
    assert PLUGIN_MOUNT in mounts
    assert kong["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["runAsNonRoot"] is True

    declarative = yaml.safe_load(k8s[("ConfigMap", "kong-declarative")]["data"]["kong.yml"])
    verifier_config = yaml.safe_load(verifier_config_text(k8s))
    assert Path(env["KONG_DECLARATIVE_CONFIG"]).parent.as_posix() in mounts
    assert_plugin_points_at_verifier(declarative, verifier_config)


def test_k8s_kong_maps_every_service_port_to_the_one_it_listens_on(k8s):
    """Clients reach the Service's port (80), Kong listens on its container's (8000): without `port_maps` the plugin
    told the verifier 8000 (`kong.request.get_forwarded_port` answers the listening port), and every DPoP proof for
    `http://api.example.test/...` was refused for naming no port. Each Service port maps to its target's."""
    spec = pod_spec(k8s)
    kong = container(spec, "kong")
    env = {e["name"]: e["value"] for e in kong["env"]}
    maps = dict(pair.strip().split(":") for pair in env.get("KONG_PORT_MAPS", "").split(",") if pair.strip())
    listening = {p["name"]: p["containerPort"] for p in kong["ports"]}
    proxy_listen = {int(part.split(":")[-1].split()[0]) for part in env["KONG_PROXY_LISTEN"].split(",")}
    service = k8s[("Service", "kong-proxy")]
    for port in service["spec"]["ports"]:
        target = listening[port["targetPort"]] if isinstance(port["targetPort"], str) else port["targetPort"]
        assert target in proxy_listen, port
        assert maps.get(str(port["port"])) == str(target), (port, env.get("KONG_PORT_MAPS"))


# --------------------------------------------------------------------------- read-only root, probes


def _needs_temp_dir(config: dict[str, Any]) -> bool:
    """Without Redis or state.path, `verifier serve` keeps revocations and replay keys in the temporary directory."""
    state = config.get("state") or {}
    return not (state.get("redis_url") or state.get("path"))


def test_k8s_verifier_has_a_writable_temporary_directory_on_its_read_only_root(k8s):
    """readOnlyRootFilesystem and no writable /tmp: `verifier serve` could not make its state directory and
    never started (state.path unset in the shipped config). The file with Redis keeps the /tmp all the same."""
    spec = pod_spec(k8s)
    verifier = container(spec, "verifier")
    assert verifier["securityContext"]["readOnlyRootFilesystem"] is True
    config = yaml.safe_load(verifier_config_text(k8s))
    assert _needs_temp_dir(config) or config["state"]["redis_url"]
    mounts = {m["mountPath"]: m for m in verifier["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "/tmp" in mounts and not mounts["/tmp"].get("readOnly"), "no writable /tmp for the verifier"
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


def test_compose_verifier_has_a_writable_temporary_directory_on_its_read_only_root(compose):
    verifier = compose["services"]["verifier"]
    assert verifier["read_only"] is True
    (config,) = load_yaml_docs(DEPLOY / "verifier.yaml")
    assert _needs_temp_dir(config)
    assert "/tmp" in [t.split(":")[0] for t in verifier.get("tmpfs", [])], "no writable /tmp for the verifier"


def test_k8s_liveness_does_not_restart_a_verifier_that_is_only_not_ready(k8s):
    """/healthz is 503 until the keys are loaded (an identity provider down): a liveness probe on it restarted
    the container over an outage it cannot fix, and a restart drops the kill switch kept without state.path.
    Liveness asks /livez (the process answers); readiness asks /healthz."""
    verifier = container(pod_spec(k8s), "verifier")
    liveness = json.dumps(verifier["livenessProbe"])
    assert "/livez" in liveness and "/healthz" not in liveness
    assert "/healthz" in json.dumps(verifier["readinessProbe"])


def test_k8s_verifier_reads_its_private_keys_from_a_secret_only_it_can_read(k8s):
    """A Secret volume is 0644 unless `defaultMode` says otherwise: every user of the container could read the
    identity assertion's signing key (and the verifier warned, `private_key_readable`). Its files are root's,
    so the shipped volume is 0440 with the pod's fsGroup the verifier's group: the verifier reads the keys
    and no one else does (`verifier.private_files`: group read only of a root-owned file)."""
    from verifier.private_files import ROOT_OWNED_EXPOSING_BITS

    spec = pod_spec(k8s)
    verifier = container(spec, "verifier")
    volumes = {v["name"]: v for v in spec["volumes"]}
    secrets = [volumes[m["name"]] for m in verifier["volumeMounts"] if "secret" in volumes[m["name"]]]
    assert secrets, "no Secret volume for the verifier's private keys"
    for volume in secrets:
        items = volume["secret"].get("items", [])
        modes = [volume["secret"]["defaultMode"], *(i["mode"] for i in items if "mode" in i)]
        for mode in modes:
            assert not mode & ROOT_OWNED_EXPOSING_BITS, f"{volume['name']}: mode {mode:04o} lets others read the keys"
            if mode & 0o040:  # the group reads them: the verifier's group, given to the pod's volumes by fsGroup
                assert spec["securityContext"]["fsGroup"] == verifier["securityContext"]["runAsGroup"]
        kong = container(spec, "kong")
        assert volume["name"] not in [m["name"] for m in kong["volumeMounts"]]  # fsGroup is Kong's group too


def test_k8s_metrics_answer_only_the_bearer_of_a_token_from_a_secret_only_the_verifier_reads(k8s, tmp_path):
    """The sidecar's metrics listener is 0.0.0.0:9464, for Prometheus outside the pod, and had no authentication:
    anyone reaching the pod read the issuers, key ages and refusal counts. It now names a `metrics.token_file` in a
    Secret volume of its own (required, 0440 as the keys; Kong does not mount it), and check-config says nothing
    about an open metrics listener (`metrics_unauthenticated`)."""
    from verifier.config.base import is_loopback_host
    from verifier.private_files import ROOT_OWNED_EXPOSING_BITS

    text = verifier_config_text(k8s)
    metrics = yaml.safe_load(text)["metrics"]
    assert not is_loopback_host(metrics["listen"].rpartition(":")[0].strip("[]"))
    assert "token_env" not in metrics and "token" not in metrics
    token_file = Path(metrics["token_file"])
    spec = pod_spec(k8s)
    verifier = container(spec, "verifier")
    (mount,) = [m for m in verifier["volumeMounts"] if Path(m["mountPath"]) == token_file.parent]
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    assert volume["secret"]["secretName"] == "edge-verifier-metrics-token"
    assert not volume["secret"].get("optional"), "the verifier refuses its config without the token file"
    assert not volume["secret"]["defaultMode"] & ROOT_OWNED_EXPOSING_BITS
    assert mount["name"] not in [m["name"] for m in container(spec, "kong")["volumeMounts"]]
    assert "/metrics needs no credentials" not in check_config(text, tmp_path)  # metrics_unauthenticated


# --------------------------------------------------------------------------- request size


def _buffer_bytes(buffers: str) -> int:
    """The size of one of nginx's `large_client_header_buffers` ("4 16k" -> 16384): a header line's bound."""
    size = buffers.split()[1].lower()
    return int(size[:-1]) * {"k": 1024, "m": 1024 * 1024}[size[-1]] if size[-1] in "km" else int(size)


def test_kong_reads_a_token_and_a_proof_of_the_verifiers_bounds_each_on_one_line(compose, k8s):
    """Kong runs on nginx, which reads each client header line into one `large_client_header_buffers` buffer (4 8k
    by default: an `Authorization: Bearer` line with a valid 8 KiB token was Kong's 400 before the plugin ran). Both
    shipped Kong settings raise it alike, to a line that holds a token of the verifier's `max_token_bytes` and a
    DPoP proof of its `dpop.max_proof_bytes` (what tests/kong/test_credential_size_lua.py runs through the plugin)."""
    from verifier.config.dpop import DEFAULT_MAX_PROOF_BYTES
    from verifier.settings import DEFAULT_MAX_TOKEN_BYTES

    name = "KONG_NGINX_HTTP_LARGE_CLIENT_HEADER_BUFFERS"
    in_compose = compose["services"]["kong"]["environment"][name]
    in_k8s = {e["name"]: e["value"] for e in container(pod_spec(k8s), "kong")["env"]}[name]
    assert in_compose == in_k8s
    line = _buffer_bytes(in_compose)
    configs = [
        yaml.safe_load((DEPLOY / "verifier.yaml").read_text()),
        yaml.safe_load(verifier_config_text(k8s)),
    ]
    for config in configs:
        token = config.get("max_token_bytes", DEFAULT_MAX_TOKEN_BYTES)
        proof = (config.get("dpop") or {}).get("max_proof_bytes", DEFAULT_MAX_PROOF_BYTES)
        assert len("Authorization: DPoP \r\n") + token <= line and len("DPoP: \r\n") + proof <= line


def test_k8s_replicas_share_one_replay_state_or_there_is_one(k8s):
    """Without `state.redis_url` each pod's verifier keeps DPoP proof `jti`s in its own SQLite file under /tmp
    (`workers: 1` counts as shared state, so DPoP is on). With two replicas behind the Service, a proof and its
    token accepted by one pod were accepted again by the other within `dpop.iat_past_seconds` (RFC 9449 section
    11.1): a captured DPoP request replayed until it lands on the pod that has not seen it. Several replicas need a
    Redis every pod shares."""
    replicas = workload(k8s)["spec"].get("replicas", 1)
    config = yaml.safe_load(verifier_config_text(k8s))
    shared = bool((config.get("state") or {}).get("redis_url"))
    assert replicas == 1 or shared, f"{replicas} replicas, each with its own DPoP replay cache"


def test_k8s_the_single_replica_file_stays_one_pod_without_redis_and_points_at_the_ha_file(sidecar, ha):
    """verifier-sidecar.yaml: one pod, its state its own (no Redis to share); its `replicas` comment names the
    highly available file, which runs several pods sharing a Redis."""
    assert workload(sidecar)["spec"]["replicas"] == 1
    assert "state" not in yaml.safe_load(verifier_config_text(sidecar))
    comment = SIDECAR.read_text().split("  replicas: 1")[0].rsplit("spec:", 1)[1]
    assert HA.name in comment, comment
    assert workload(ha)["spec"]["replicas"] >= 3  # one lost, one drained, one serving
    assert yaml.safe_load(verifier_config_text(ha))["state"]["redis_url"]


# --------------------------------------------------------------------------- the highly available file


def _without(mapping: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k not in keys}


def test_k8s_ha_verifier_config_is_the_single_replica_ones_with_a_shared_state(sidecar, ha, tmp_path):
    """The HA ConfigMap's verifier config is the sidecar's, `state` added: a Redis (`redis_url`, no password in it),
    the password from the environment, this deployment's own `key_prefix`; and `revocation`, the kill switch the
    replicas share through it. `verifier check-config` takes it."""
    from verifier.config.state import parse_state_config

    text = verifier_config_text(ha)
    check_config(text, tmp_path)
    config = yaml.safe_load(text)
    assert _without(config, "state", "revocation") == yaml.safe_load(verifier_config_text(sidecar))
    assert config["revocation"] == {}
    state = config["state"]
    url = urlsplit(state["redis_url"])
    assert url.scheme in ("redis", "rediss") and url.hostname and not url.password and not url.username
    assert state["key_prefix"] and state["key_prefix"] != "verifier:"  # its own, not the default every install has
    assert parse_state_config({**state, "password_env": "PATH"}).redis_url == state["redis_url"]


def test_k8s_ha_redis_service_is_where_the_verifier_config_points(ha):
    """redis_url's host is the shipped Redis Service, its port the Service's, which reaches the Redis container's port,
    the one redis.conf listens on; the Service selects the Redis StatefulSet's pods (one of them)."""
    url = urlsplit(yaml.safe_load(verifier_config_text(ha))["state"]["redis_url"])
    service = ha[("Service", url.hostname)]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    redis = workload(ha, "StatefulSet")
    assert redis["spec"]["replicas"] == 1
    labels = redis["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert redis["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert not service["spec"]["selector"].items() <= workload(ha)["spec"]["template"]["metadata"]["labels"].items()
    server = container(pod_spec(ha, "StatefulSet"), "redis")
    (listening,) = [
        p for p in server["ports"] if p["name"] == port["targetPort"] or p["containerPort"] == port["targetPort"]
    ]
    assert redis_conf(ha)["port"] == [str(listening["containerPort"])]
    policy = ha[("NetworkPolicy", url.hostname)]  # only Kong's pods (the verifiers) reach it
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ((rule,),) = [r["from"] for r in policy["spec"]["ingress"]]
    assert rule["podSelector"]["matchLabels"] == workload(ha)["spec"]["selector"]["matchLabels"]
    assert [p["port"] for r in policy["spec"]["ingress"] for p in r["ports"]] == [listening["containerPort"]]


def test_k8s_ha_redis_password_is_one_secret_for_the_verifier_and_redis(ha):
    """The verifier reads Redis's password from the variable `state.password_env` names, set from a Secret; Redis
    requires the same Secret's key (`--requirepass`, expanded by Kubernetes from its own variable); redis-cli's
    probe too. Never a literal, never in the URL (the verifier refuses that)."""
    state = yaml.safe_load(verifier_config_text(ha))["state"]
    verifier = secret_env(container(pod_spec(ha), "verifier"))
    secret = verifier[state["password_env"]]
    server = container(pod_spec(ha, "StatefulSet"), "redis")
    command = [*server.get("command", []), *server.get("args", [])]
    variable = command[command.index("--requirepass") + 1]
    assert variable.startswith("$(") and variable.endswith(")"), variable
    assert secret_env(server)[variable[2:-1]] == secret
    assert secret_env(server)["REDISCLI_AUTH"] == secret
    assert "requirepass" not in redis_conf(ha)
    optional = {
        e["name"]: e["valueFrom"]["secretKeyRef"].get("optional", False)
        for e in container(pod_spec(ha), "verifier")["env"]
    }
    assert optional[state["password_env"]] is False  # a verifier without it refuses its config


def _bytes(size: str) -> int:
    """A redis.conf memory size ("384mb", "1gb", "1000000") in bytes, as Redis reads it."""
    units = {"kb": 1000, "k": 1000, "mb": 1000**2, "m": 1000**2, "gb": 1000**3, "g": 1000**3}
    units |= {"kib": 1024, "mib": 1024**2, "gib": 1024**3}
    m = re.fullmatch(r"(\d+)([a-z]*)", size.lower())
    assert m, size
    return int(m.group(1)) * units.get(m.group(2), 1)


def _quantity(size: str) -> int:
    """A Kubernetes memory quantity ("768Mi") in bytes."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|K|M|G)?", size)
    assert m, size
    return int(m.group(1)) * {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "K": 1000, "M": 1000**2, "G": 1000**3}.get(
        m.group(2) or "", 1
    )


def test_k8s_ha_redis_never_evicts_holds_the_verifiers_bounds_and_keeps_them_across_a_restart(ha):
    """What the verifier needs of Redis (README, "State and durability"; `verifier.state.redis`): `noeviction`, since
    every replay key has a TTL and any other policy drops live ones (their replays pass); a `maxmemory` above the
    bounds' keys at the verifier's own estimates (below it, the verifier warns: `redis_maxmemory_below_replay_bound`),
    inside the container's memory limit; the append-only file, fsynced every second, on a persistent volume."""
    from verifier.config.state import (
        DEFAULT_REDIS_MAX_BUCKETS,
        DEFAULT_REDIS_MAX_REPLAY_ENTRIES,
        REDIS_BYTES_PER_BUCKET_KEY,
        REDIS_BYTES_PER_REPLAY_KEY,
    )
    from verifier.state.redis import SAFE_EVICTION_POLICY

    conf = redis_conf(ha)
    state = yaml.safe_load(verifier_config_text(ha))["state"]
    assert conf["maxmemory-policy"] == [SAFE_EVICTION_POLICY]
    needed = (
        state.get("redis_max_replay_entries", DEFAULT_REDIS_MAX_REPLAY_ENTRIES) * REDIS_BYTES_PER_REPLAY_KEY
        + state.get("redis_max_buckets", DEFAULT_REDIS_MAX_BUCKETS) * REDIS_BYTES_PER_BUCKET_KEY
    )
    (maxmemory,) = conf["maxmemory"]
    assert _bytes(maxmemory) >= needed * 1.25, (maxmemory, needed)  # with room for the revocation entries
    server = container(pod_spec(ha, "StatefulSet"), "redis")
    assert _quantity(server["resources"]["limits"]["memory"]) >= _bytes(maxmemory) * 1.5  # the AOF rewrite's fork
    assert conf["appendonly"] == ["yes"] and conf["appendfsync"] == ["everysec"]
    (data,) = conf["dir"]
    (mount,) = [m for m in server["volumeMounts"] if m["mountPath"] == data]
    assert not mount.get("readOnly")
    claims = [c["metadata"]["name"] for c in workload(ha, "StatefulSet")["spec"]["volumeClaimTemplates"]]
    assert mount["name"] in claims  # a persistent volume, not an emptyDir


def test_k8s_ha_redis_runs_non_root_on_a_read_only_root(ha):
    spec = pod_spec(ha, "StatefulSet")
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    sc = container(spec, "redis")["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]


def test_k8s_ha_kong_declarative_config_is_the_single_replica_files(sidecar, ha):
    """Kong routes and asks the verifier the same way in both files: scaling out changes nothing Kong does."""
    assert ha[("ConfigMap", "kong-declarative")] == sidecar[("ConfigMap", "kong-declarative")]
    assert ha[("Service", "kong-proxy")] == sidecar[("Service", "kong-proxy")]


def test_k8s_ha_pod_is_the_single_replica_pod_but_for_redis_and_spreading(sidecar, ha):
    """The same pod, security settings, probes, volumes and Kong container included; the HA pod adds only the
    anti-affinity and the verifier's variables from Secrets (Redis's password, the optional kill-switch token)."""
    one, many = pod_spec(sidecar), pod_spec(ha)
    assert _without(many, "affinity", "containers") == _without(one, "containers")
    assert container(many, "kong") == container(one, "kong")
    assert _without(container(many, "verifier"), "env") == _without(container(one, "verifier"), "env")
    assert "env" not in container(one, "verifier")
    assert set(secret_env(container(many, "verifier"))) == {
        yaml.safe_load(verifier_config_text(ha))["state"]["password_env"],
        "VERIFIER_ADMIN_TOKEN",
    }
    assert _without(workload(ha)["spec"], "replicas", "template") == _without(
        workload(sidecar)["spec"], "replicas", "template"
    )
    assert workload(ha)["spec"]["template"]["metadata"] == workload(sidecar)["spec"]["template"]["metadata"]


def test_k8s_ha_pods_spread_over_nodes_and_a_drain_keeps_most_of_them(ha):
    """Preferred anti-affinity on the node for Kong's own pods, and a PodDisruptionBudget over the same pods that lets
    a drain take one at a time."""
    deployment = workload(ha)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (term,) = pod_spec(ha)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    (budget,) = [d for (kind, _), d in ha.items() if kind == "PodDisruptionBudget"]
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert budget["spec"]["maxUnavailable"] == 1 < deployment["spec"]["replicas"]
