"""The shipped gateway templates (deploy/nginx, deploy/envoy) render the way the README says and stay valid.

The rigs (gateways.py) render with :func:`render_template`; a user renders with
`envsubst '${LISTEN_HOST} ${LISTEN_PORT} ...'`. Both must give the same file, and nginx's own variables
(`$host`, `$request_uri`, ...) must come through untouched.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

if __package__:
    from .gateways import (
        ENVOY_GRPC_TEMPLATE,
        ENVOY_HTTP_TEMPLATE,
        ENVOY_REUSE_LUA,
        ENVOY_REUSE_TEMPLATE,
        NGINX_LUA_TEMPLATE,
        NGINX_TEMPLATE,
        TEMPLATE_VARIABLES,
        envoy_binary,
        render_template,
    )
else:  # tests/ is not a package: pytest put this directory on sys.path
    from gateways import (
        ENVOY_GRPC_TEMPLATE,
        ENVOY_HTTP_TEMPLATE,
        ENVOY_REUSE_LUA,
        ENVOY_REUSE_TEMPLATE,
        NGINX_LUA_TEMPLATE,
        NGINX_TEMPLATE,
        TEMPLATE_VARIABLES,
        envoy_binary,
        render_template,
    )

TEMPLATES = (NGINX_TEMPLATE, NGINX_LUA_TEMPLATE, ENVOY_GRPC_TEMPLATE, ENVOY_HTTP_TEMPLATE, ENVOY_REUSE_TEMPLATE)
VALUES = {
    "LISTEN_HOST": "127.0.0.1",
    "LISTEN_PORT": 18080,
    "ADMIN_PORT": 19901,
    "VERIFIER_HOST": "127.0.0.1",
    "VERIFIER_HTTP_PORT": 19000,
    "VERIFIER_GRPC_PORT": 19001,
    "UPSTREAM_HOST": "127.0.0.1",
    "UPSTREAM_PORT": 13000,
    "VERIFIER_LUA": "/etc/envoy/verifier-reuse.lua",
    "PUBLIC_HOSTS": "api.example.test www.example.test",
    "PUBLIC_DOMAINS": '"api.example.test", "api.example.test:*"',
}
#: The nginx variables the trust boundary rests on (docs/SECURITY-TESTING.md, "Trust boundary").
NGINX_VARIABLES = ("$host", "$request_uri", "$request_method", "$scheme", "$server_port", "$remote_addr")


def used(template: Path) -> dict[str, object]:
    names = set(re.findall(r"\$\{([A-Z_]+)\}", template.read_text()))
    return {k: v for k, v in VALUES.items() if k in names}


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_envsubst_with_the_named_variables_renders_the_same_file(template: Path) -> None:
    envsubst = shutil.which("envsubst")
    if envsubst is None:
        pytest.skip("envsubst missing: apt-get install gettext-base")
    values = used(template)
    shell_format = " ".join(f"${{{k}}}" for k in TEMPLATE_VARIABLES)
    env = {k: str(v) for k, v in values.items()}

    out = subprocess.run(
        [envsubst, shell_format], input=template.read_text(), env=env, capture_output=True, text=True, check=True
    )

    assert out.stdout == render_template(template, **values)
    assert "${" not in out.stdout


def lua_path(template: Path) -> dict[str, object]:
    """Envoy validates the Lua filter's file too: the shipped one, where it lies in the repository."""
    return {"VERIFIER_LUA": ENVOY_REUSE_LUA} if "${VERIFIER_LUA}" in template.read_text() else {}


@pytest.mark.parametrize("template", (NGINX_TEMPLATE, NGINX_LUA_TEMPLATE), ids=lambda p: p.name)
def test_nginx_variables_survive_rendering(template: Path) -> None:
    rendered = render_template(template, **used(template))

    for variable in NGINX_VARIABLES:
        assert variable in rendered, variable
    assert "X-Forwarded-Host $host;" in rendered
    directives = [line for line in rendered.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in directives if "$http_host" in line]


def test_a_placeholder_left_without_a_value_is_refused() -> None:
    values = used(NGINX_TEMPLATE)
    del values["UPSTREAM_PORT"]

    with pytest.raises(ValueError, match="UPSTREAM_PORT"):
        render_template(NGINX_TEMPLATE, **values)


@pytest.mark.parametrize(
    "template", (ENVOY_GRPC_TEMPLATE, ENVOY_HTTP_TEMPLATE, ENVOY_REUSE_TEMPLATE), ids=lambda p: p.name
)
def test_the_envoy_templates_pass_envoys_own_validation(template: Path, tmp_path: Path) -> None:
    rendered = render_template(template, **{**used(template), **lua_path(template)})
    yaml.safe_load(rendered)
    config = tmp_path / "envoy.yaml"
    config.write_text(rendered)

    check = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "--config-path", str(config), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert check.returncode == 0, check.stdout + check.stderr
