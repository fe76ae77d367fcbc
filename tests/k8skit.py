"""deploy/k8s: the shipped Kubernetes manifests read as objects, for the static checks (tests/kong/test_deploy_files.py)
and the integration test that runs the highly available file's verifier config (tests/integration/test_k8s_ha.py)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
SIDECAR = K8S / "verifier-sidecar.yaml"  # one Kong pod, the verifier's state its own
HA = K8S / "verifier-sidecar-ha.yaml"  # three Kong pods sharing a Redis shipped beside them

Manifest = dict[tuple[str, str], dict[str, Any]]  # (kind, metadata.name) -> the object


def load_manifest(path: Path) -> Manifest:
    """Every object of a multi-document manifest, by kind and name."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def workload(manifest: Manifest, kind: str = "Deployment") -> dict[str, Any]:
    """The manifest's one object of `kind` (a Deployment: Kong's pods)."""
    (found,) = [d for (k, _), d in manifest.items() if k == kind]
    return found


def pod_spec(manifest: Manifest, kind: str = "Deployment") -> dict[str, Any]:
    """The pod template's spec of the manifest's one `kind`."""
    return dict(workload(manifest, kind)["spec"]["template"]["spec"])


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    """The container `name` of a pod spec."""
    (c,) = [c for c in spec["containers"] if c["name"] == name]
    return dict(c)


def verifier_config_text(manifest: Manifest) -> str:
    """The verifier's config.yaml as the ConfigMap ships it."""
    return str(manifest[("ConfigMap", "edge-verifier-config")]["data"]["config.yaml"])


def redis_conf(manifest: Manifest) -> dict[str, list[str]]:
    """The directives of the redis.conf a ConfigMap ships (directive -> its arguments; "" for `save ""`)."""
    (text,) = [
        d["data"]["redis.conf"] for (k, _), d in manifest.items() if k == "ConfigMap" and "redis.conf" in d["data"]
    ]
    directives: dict[str, list[str]] = {}
    for line in str(text).splitlines():
        words = shlex.split(line, comments=True)
        if words:
            directives[words[0].lower()] = words[1:]
    return directives


def secret_env(c: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """A container's environment variables taken from Secrets: name -> (Secret, key)."""
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in c.get("env") or ()
        if "secretKeyRef" in (e.get("valueFrom") or {})
    }
