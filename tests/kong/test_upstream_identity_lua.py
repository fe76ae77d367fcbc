"""Issue #20's upstream identity through the Kong Lua plugin (kong/plugins/edge-verifier, unmodified, in real nginx
under the PDK shim, answer reuse off) to the REAL verifier; test_upstream_identity_python.py runs the same through the
Python plugin.

The tests are tests/integration/test_upstream_identity.py's gateway tests, imported and run against the plugin as
`edge`: mapped claims a user can edit, white space and controls at their edges, the assertion as README tells an
upstream to verify it, a token past its `exp` within the leeway, and no client identity on a public route.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from gateways import GatewayProcess, LocalIssuer
from rigs import fresh_upstream_log, issuer  # noqa: F401 - fixtures, requested by name (fresh_upstream_log: autouse)
from test_trust_boundary import Edge
from test_upstream_identity import (  # noqa: F401 - fixtures and tests, collected here against this `edge`
    start_identity_verifier,
    test_a_claim_with_white_space_at_an_edge_never_reads_upstream_as_the_trimmed_value,
    test_a_public_route_never_passes_the_clients_identity_headers,
    test_a_token_past_its_exp_within_the_leeway_is_refused_not_sent_an_expired_assertion,
    test_an_attacker_chosen_claim_arrives_as_one_header_line_and_forges_none,
    test_hostile_claims_never_forge_a_header,
    test_mapped_claims_arrive_and_client_copies_never_do,
    test_one_assertion_with_one_jti_arrives_on_each_request_of_a_token_within_half_its_life,
    test_the_readmes_snippet_verifies_what_the_upstream_received_and_refuses_forgeries,
    upstream,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:  # noqa: F811
    """test_upstream_identity's verifier, naming no Kong consumer (the Kong rigs know none: they would refuse all)."""
    proc = start_identity_verifier(issuer, tmp_path_factory, consumer=False)
    yield proc
    proc.stop()


@pytest.fixture
def edge(plugin_before_verifier: str) -> Edge:
    """The plugin's rig in front of that verifier, passing to its verifying upstream."""
    return Edge(name="kong-lua", url=plugin_before_verifier)
