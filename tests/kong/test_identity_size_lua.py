"""The total bound on the identity (`upstream.max_total_bytes`) through the Kong Lua plugin
(kong/plugins/edge-verifier, unmodified, in real nginx under the PDK shim) to the REAL verifier.

The tests are tests/integration/test_identity_size.py's own, imported; only the gateway differs: `edge` here is
the plugin's rig, with answer reuse off so that every request reaches the verifier.
"""

from __future__ import annotations

import pytest
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
def edge(plugin_before_verifier: str) -> Edge:
    """The plugin's rig in front of the verifier whose upstream section maps the groups twice."""
    return Edge(name="kong-lua", url=plugin_before_verifier)
