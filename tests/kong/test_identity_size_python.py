"""The total bound on the identity (`upstream.max_total_bytes`) through the Python Kong plugin
(kong/python/edge_verifier.py, unmodified, under the REAL `kong-python-pluginserver`, run by real nginx as Kong runs an
external plugin: tests/kong/python_edge.py) to the REAL verifier's gRPC door.

The tests are tests/integration/test_identity_size.py's own, imported; only the gateway differs: `edge` here is the
plugin's rig, which reuses no answer. test_python_plugin_sizes.py asks the same of the plugin's PDK calls.
"""

from __future__ import annotations

import pytest
from python_edge import pluginserver, python_plugin_before_verifier  # noqa: F401 - fixtures, requested by name
from rigs import (  # noqa: F401 - fixtures, requested by name (fresh_upstream_log: autouse here too)
    fresh_upstream_log,
    issuer,
    upstream,
)
from test_identity_size import (  # noqa: F401 - fixtures and tests, collected here against this `edge`
    test_a_groups_overage_identity_is_refused_by_the_verifier_not_by_the_gateway,
    test_a_large_identity_under_the_total_passes_whole,
    test_a_normal_identity_still_passes,
    test_an_identity_near_the_total_from_a_token_at_its_bound_passes_whole,
    verifier,
)
from test_trust_boundary import Edge

pytestmark = pytest.mark.integration


@pytest.fixture
def edge(python_plugin_before_verifier: str) -> Edge:  # noqa: F811
    """The Python plugin's rig in front of the verifier whose upstream section maps the groups twice."""
    return Edge(name="kong-python", url=python_plugin_before_verifier)
