"""Issue #20's upstream identity through the Python Kong plugin (kong/python/edge_verifier.py, unmodified, under the
REAL `kong-python-pluginserver`, run by real nginx as Kong runs an external plugin: tests/kong/python_edge.py) to the
REAL verifier's gRPC door: test_upstream_identity_lua.py's tests and verifier, with this plugin's rig as `edge`.
"""

from __future__ import annotations

import pytest
from python_edge import pluginserver, python_plugin_before_verifier  # noqa: F401 - fixtures, requested by name
from test_trust_boundary import Edge
from test_upstream_identity_lua import *  # noqa: F403 - its fixtures and tests, collected here against this `edge`


@pytest.fixture
def edge(python_plugin_before_verifier: str) -> Edge:  # noqa: F811
    """The Python plugin's rig in front of that verifier, passing to its verifying upstream."""
    return Edge(name="kong-python", url=python_plugin_before_verifier)
