"""Every verifier configuration the repository ships passes `verifier check-config`, with only the warnings meant.

Shipped: deploy/verifier.yaml (also with its commented Keycloak role rules switched on), the Kubernetes ConfigMap's
config.yaml in deploy/k8s/verifier-sidecar.yaml and in verifier-sidecar-ha.yaml, and every ```yaml block of
README.md. A README block that is a fragment (no `issuers`, or no listener) is checked inside a minimal
configuration; the files the examples name
(`/etc/verifier/...`, `/var/lib/verifier/...`) are made in a temporary directory. A setting renamed, removed or
made stricter that breaks an example fails here. The README's configuration reference is also checked field by field
in tests/test_readme.py; tests/kong/test_deploy_files.py checks the deploy files against the gateways as well.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from k8skit import HA, SIDECAR, load_manifest, verifier_config_text
from support import make_certificate

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"

# README blocks that are not the verifier's configuration, by their first key
NOT_VERIFIER = {"plugins": "Kong's declarative config", "scrape_configs": "Prometheus' scrape job"}
BASE = {
    "http": {"listen": "127.0.0.1:8080"},
    "issuers": [
        {"issuer": "https://idp.example.test", "audiences": ["https://api.example.test"], "algorithms": ["ES256"]}
    ],
}
# warnings a shipped example prints on purpose (a part of each line); anything else fails
INTENDED: dict[str, list[str]] = {}


def _readme_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", README.read_text(), re.DOTALL)


def _with_roles_on(text: str) -> str:
    """deploy/verifier.yaml's commented `roles:` example, switched on."""
    return re.sub(r"^(\s*)# (roles:|  - \{role:)", r"\1\2", text, flags=re.M)


def _shipped() -> dict[str, str]:
    deploy = (REPO / "deploy" / "verifier.yaml").read_text()
    configs = {"deploy/verifier.yaml": deploy, "deploy/verifier.yaml+roles": _with_roles_on(deploy)}
    for manifest in (SIDECAR, HA):
        configs[str(manifest.relative_to(REPO))] = verifier_config_text(load_manifest(manifest))
    for index, block in enumerate(_readme_blocks()):
        first = next(iter(yaml.safe_load(block)))
        if first not in NOT_VERIFIER:
            configs[f"README.md#{index}"] = block
    return configs


def test_the_roles_example_of_deploy_verifier_yaml_is_switched_on() -> None:
    deploy = (REPO / "deploy" / "verifier.yaml").read_text()
    on = yaml.safe_load(_with_roles_on(deploy))
    assert on != yaml.safe_load(deploy) and len(on["issuers"][0]["roles"]) == 2


def test_every_readme_yaml_block_is_checked_or_named_as_another_programs() -> None:
    firsts = [next(iter(yaml.safe_load(block))) for block in _readme_blocks()]
    assert sorted(f for f in firsts if f in NOT_VERIFIER) == sorted(NOT_VERIFIER)
    assert sum(1 for name in _shipped() if name.startswith("README")) == len(firsts) - len(NOT_VERIFIER) >= 5


def _files(root: Path) -> dict[str, str]:
    """The paths the examples name, made under root: prefix -> its stand-in."""
    etc, keys, metrics, lib = (root / name for name in ("etc", "keys", "metrics", "lib"))
    for directory in (etc, keys, metrics, lib):
        directory.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    for path in (keys / "identity.pem", etc / "identity.pem"):
        path.write_bytes(pem)
        path.chmod(0o600)
    numbers = key.public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

    jwk = {"kty": "EC", "crv": "P-256", "x": b64(numbers.x), "y": b64(numbers.y), "kid": "batch-1", "alg": "ES256"}
    (etc / "batch-jwks.json").write_text(json.dumps({"keys": [jwk]}))
    (etc / "internal-ca.pem").write_bytes(make_certificate("internal CA").public_bytes(serialization.Encoding.PEM))
    (metrics / "token").write_text("m" * 64 + "\n")
    (metrics / "token").chmod(0o600)
    return {
        "/etc/verifier-keys/": f"{keys}/",
        "/etc/verifier-metrics/": f"{metrics}/",
        "/etc/verifier/": f"{etc}/",
        "/var/lib/verifier/": f"{lib}/",
    }


@pytest.mark.parametrize("name", sorted(_shipped()))
def test_a_shipped_configuration_passes_check_config(name: str, tmp_path: Path) -> None:
    text = _shipped()[name]
    for prefix, stand_in in _files(tmp_path).items():
        text = text.replace(prefix, stand_in)
    config = yaml.safe_load(text)
    if "issuers" not in config or not {"grpc", "http"} & set(config):  # a fragment: in the smallest whole
        config = {**BASE, **config}
    path = tmp_path / "verifier.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "VERIFIER_IDP_SECRET": "s" * 32,
        "VERIFIER_WEBAUTHN_SECRET": "w" * 32,
        "VERIFIER_METRICS_TOKEN": "t" * 32,
        "VERIFIER_SSF_PUSH_AUTHORIZATION": "Bearer " + "p" * 32,
        "VERIFIER_REDIS_PASSWORD": "r" * 32,
    }
    result = subprocess.run(
        [sys.executable, "-m", "verifier", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: "), result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    intended = INTENDED.get(name, [])
    assert len(warnings) == len(intended) and all(any(i in w for w in warnings) for i in intended), warnings
