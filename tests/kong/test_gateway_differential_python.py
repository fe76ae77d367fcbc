"""tests/integration/test_gateway_differential.py's corpus through the Python Kong plugin
(kong/python/edge_verifier.py, unmodified, under the REAL `kong-python-pluginserver` in both return conventions, run
by real nginx as Kong runs an external plugin: tests/kong/python_edge.py) to the REAL verifier's gRPC door:
test_gateway_differential_lua.py's tests and verifier, with this plugin's rig as `edge` (both ways of forwarding the
target, each under both plugin-server return conventions).
"""

from __future__ import annotations

from typing import Any

import pytest
from python_edge import pluginserver, start_python_plugin  # noqa: F401 - fixtures, requested by name
from test_gateway_differential_lua import *  # noqa: F403 - its fixtures and tests, collected here against this `edge`
from test_gateway_differential_lua import FORWARDING
from test_python_plugin import PluginServer
from test_trust_boundary import Edge


@pytest.fixture(params=FORWARDING)
def edge(
    request: pytest.FixtureRequest,
    start_nginx: Any,
    pluginserver: PluginServer,  # noqa: F811
    verifier: Any,
    upstream: Any,
) -> Edge:
    """The Python plugin's rig in front of that verifier, the upstream getting Kong 3.x's target or the raw one."""
    url = start_python_plugin(
        start_nginx, pluginserver, verifier, upstream.port, kong_upstream_uri=request.param == "kong-3-target"
    )
    return Edge(name=f"kong-python {request.param}", url=url)
