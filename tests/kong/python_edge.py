"""The Python Kong plugin as Kong runs it, for the gateway test modules that import their tests from
tests/integration (test_trust_boundary_python.py, test_admin_boundary_python.py, test_identity_size_python.py).

Real nginx (conftest.py's rig, Kong's `large_client_header_buffers`) parses the client's request and proxies it to
the upstream; its access phase runs kong/python/edge_verifier.py, unmodified, under the REAL
`kong-python-pluginserver` (test_python_plugin.py's `PluginServer`, both return conventions), through
tests/kong/shim/mp_rpc.lua: Kong's MessagePack-RPC side of an external plugin, each PDK call the plugin makes answered
by the shim's PDK over ngx.* (the same functions the Lua plugin's rig uses). That PDK is the one stand-in: Kong's
router, its own X-Forwarded-* for the upstream and its error pages are not here. The plugin asks the REAL verifier's
gRPC door; it reuses no answer (it has no decision cache), so every request reaches the verifier.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from test_python_plugin import PLUGIN, PluginServer, grpc_target, pluginserver

__all__ = ["pluginserver", "python_plugin_before_verifier", "start_python_plugin"]

# The plugin's deadline (ms): above its 1 s default, for a test process on a loaded machine.
TIMEOUT_MS = 5000


def start_python_plugin(
    start_nginx: Any,
    server: PluginServer,
    verifier: Any,
    upstream_port: int,
    *,
    underscores_in_headers: bool = True,
    consumers: tuple[dict[str, Any], ...] = (),
    kong_upstream_uri: bool = False,
    public_port: int | None = None,
    trusted_proxy: bool = False,
    **conf: Any,
) -> str:
    """nginx running the Python plugin of `server` against `verifier`'s gRPC door (`conf` overrides its configuration)
    in front of 127.0.0.1:`upstream_port`; the base URL. `underscores_in_headers` is on by default, as in Kong's
    own nginx template; `consumers`: Kong's datastore, `kong_upstream_uri`: the upstream gets the target Kong
    3.x's router builds, not the raw one, `public_port`: Kong's `port_maps`, `trusted_proxy`: its `trusted_ips`
    (conftest.py's `start_nginx`)."""
    # nginx's workers (nobody, under a root master) connect to the plugin server's socket
    os.chmod(server.prefix, 0o755)
    os.chmod(server.socket_path, 0o777)
    plugin_conf = {"grpc_target": grpc_target(verifier), "timeout": TIMEOUT_MS, **conf}
    return str(
        start_nginx(
            plugin_conf,
            upstream_port,
            underscores_in_headers=underscores_in_headers,
            consumers=consumers,
            external={"socket": server.socket_path, "name": PLUGIN},
            kong_upstream_uri=kong_upstream_uri,
            public_port=public_port,
            trusted_proxy=trusted_proxy,
        )
    )


@pytest.fixture
def python_plugin_before_verifier(start_nginx: Any, pluginserver: PluginServer, verifier: Any, upstream: Any) -> str:
    """The Python plugin's rig in front of the requesting module's own `verifier` fixture, passing to its `upstream`
    (as conftest.py's `plugin_before_verifier` for the Lua plugin)."""
    return start_python_plugin(start_nginx, pluginserver, verifier, upstream.port)
