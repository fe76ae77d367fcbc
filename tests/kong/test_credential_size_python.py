"""Large but legitimate credentials through the Python Kong plugin (kong/python/edge_verifier.py, unmodified, under
the REAL `kong-python-pluginserver`, run by real nginx with the client header buffers the shipped Kong settings give, as
Kong runs an external plugin: tests/kong/python_edge.py) to the REAL verifier's gRPC door.

The tests are tests/integration/test_credential_size.py's own, imported; only the gateway differs: `edge` here is
the plugin's rig, which reuses no answer. test_python_plugin_sizes.py asks the same of the plugin's PDK calls.
"""

from __future__ import annotations

import pytest
from python_edge import pluginserver, python_plugin_before_verifier  # noqa: F401 - fixtures, requested by name
from rigs import (  # noqa: F401 - fixtures, requested by name (fresh_upstream_log: autouse here too)
    fresh_upstream_log,
    issuer,
    upstream,
)
from test_credential_size import (  # noqa: F401 - fixtures and tests, collected here against this `edge`
    test_a_dpop_bound_token_of_the_bound_passes_with_a_proof_of_its_bound,
    test_a_token_far_past_the_bound_is_a_4xx_never_a_5xx,
    test_a_token_of_exactly_the_verifiers_bound_passes,
    test_a_token_one_byte_over_the_bound_is_the_verifiers_401_not_the_gateways,
    test_headers_near_the_verifiers_header_bound_still_reach_a_decision,
    test_headers_past_the_bound_are_a_4xx_never_a_5xx,
    test_more_header_fields_than_the_verifier_reads_are_a_431_never_a_5xx,
    verifier,
)
from test_trust_boundary import Edge

pytestmark = pytest.mark.integration


@pytest.fixture
def edge(python_plugin_before_verifier: str) -> Edge:  # noqa: F811
    """The Python plugin's rig in front of the verifier."""
    return Edge(name="kong-python", url=python_plugin_before_verifier)
