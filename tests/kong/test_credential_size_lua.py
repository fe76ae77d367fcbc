"""Large but legitimate credentials through the Kong Lua plugin (kong/plugins/edge-verifier, unmodified, in real
nginx under the PDK shim, with the client header buffers the shipped Kong settings give: deploy/docker-compose.yml
KONG_NGINX_HTTP_LARGE_CLIENT_HEADER_BUFFERS) to the REAL verifier.

The tests are tests/integration/test_credential_size.py's own, imported; only the gateway differs: `edge` here is
the plugin's rig, with answer reuse off so that every request reaches the verifier.
"""

from __future__ import annotations

import pytest
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
def edge(plugin_before_verifier: str) -> Edge:
    """The plugin's rig in front of the verifier."""
    return Edge(name="kong-lua", url=plugin_before_verifier)
