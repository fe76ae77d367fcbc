"""Issue #18's attacks through the Python Kong plugin (kong/python/edge_verifier.py, unmodified, under the REAL
`kong-python-pluginserver`, run by real nginx as Kong runs an external plugin: tests/kong/python_edge.py) to the REAL
verifier's gRPC door with the same policies.

The tests are tests/integration/test_trust_boundary.py's own (and test_trust_boundary_lua.py's Kong-specific ones),
imported; only the gateway differs. The plugin has no answer reuse: every request reaches the verifier.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from gateways import EchoUpstream, GatewayProcess
from kong_rig_limits import (  # noqa: F401 - what the rig cannot run, skipped with the reason, and what it can
    test_a_client_description_of_the_request_never_reaches_the_upstream,
    test_a_dpop_proof_made_for_another_host_is_refused_here,
    test_a_dpop_proof_made_for_another_host_is_refused_whatever_host_the_client_names,
    test_a_request_for_a_host_the_gateway_does_not_serve_is_refused_unjudged,
)
from python_edge import pluginserver, start_python_plugin  # noqa: F401 - fixtures, requested by name
from rigs import (  # noqa: F401 - fixtures, requested by name (fresh_upstream_log: autouse here too)
    fresh_upstream_log,
    issuer,
    upstream,
)
from test_python_plugin import PluginServer
from test_trust_boundary import (  # noqa: F401 - fixtures and tests, collected here against this `edge`
    Edge,
    test_a_client_named_request_target_never_reaches_the_upstream,
    test_a_client_naming_a_kong_consumer_never_reaches_the_upstream,
    test_a_client_naming_a_public_path_does_not_open_a_protected_one,
    test_a_client_naming_a_safe_method_does_not_write_with_a_read_only_token,
    test_a_client_naming_another_host_still_gets_the_admin_hosts_policy,
    test_a_client_sent_thumbprint_does_not_stand_in_for_a_certificate,
    test_a_dpop_proof_for_a_path_does_not_pass_for_that_path_with_a_fragment_naming_another,
    test_a_head_request_gets_the_policy_of_the_get_route_it_runs,
    test_a_host_with_userinfo_naming_the_admin_host_is_not_judged_as_the_api_host,
    test_a_method_override_never_reaches_the_upstream,
    test_a_protected_path_with_backslashes_is_not_judged_as_the_public_one,
    test_a_protected_path_with_dot_segments_is_not_judged_as_the_public_one,
    test_a_public_path_with_a_fragment_does_not_open_a_protected_one,
    test_a_public_path_with_dot_segments_does_not_open_a_protected_one,
    test_a_role_or_scope_the_upstream_reads_as_another_never_reaches_it,
    test_a_subject_the_upstream_would_trim_or_unquote_never_reads_as_another_user,
    test_a_unicode_spelling_of_the_admin_host_does_not_pass_as_another_host,
    test_a_write_token_may_post,
    test_an_absolute_form_target_gets_the_policy_of_the_host_it_names,
    test_an_absolute_form_target_naming_a_laxer_host_does_not_open_the_host_headers_one,
    test_an_internationalized_host_gets_its_policy_in_the_form_clients_send,
    test_another_case_of_the_admin_path_does_not_sidestep_its_policy,
    test_another_host_is_served_with_the_same_token,
    test_client_identity_headers_do_not_pass_a_role_check,
    test_client_identity_headers_never_reach_the_upstream_and_the_verifiers_do,
    test_every_spelling_of_the_admin_host_gets_the_admin_hosts_policy,
    test_identity_headers_spelled_with_underscores_never_reach_the_upstream,
    test_path_parameters_do_not_sidestep_the_admin_policy,
    test_the_clients_identity_headers_never_reach_a_public_path,
    test_the_clients_words_for_what_the_verifier_is_told_never_reach_the_upstream,
    test_the_public_path_itself_stays_public,
    test_the_verifiers_roles_reach_the_upstream,
    test_two_host_lines_do_not_sidestep_the_admin_hosts_policy,
    tokens,
    verifier,
)
from test_trust_boundary_lua import (  # noqa: F401 - Kong's own cases, collected here against this `edge`
    test_a_protected_path_with_a_fragment_is_not_judged_as_the_public_one,
    test_behind_a_trusted_tls_proxy_a_proof_for_the_https_url_passes,
    test_behind_port_maps_a_proof_for_the_public_url_passes_and_one_for_kongs_own_port_does_not,
    test_client_kong_consumer_headers_never_reach_the_upstream,
)

pytestmark = pytest.mark.integration


@pytest.fixture(params=["underscores-dropped", "underscores-in-headers-on"])
def edge(
    request: pytest.FixtureRequest,
    start_nginx: Any,
    pluginserver: PluginServer,  # noqa: F811 - the imported fixture, requested by name
    verifier: GatewayProcess,  # noqa: F811
    upstream: EchoUpstream,  # noqa: F811
) -> Iterator[Edge]:
    """The plugin's rig; also with `underscores_in_headers on` (Kong's nginx template), where `X_Authenticated_Roles`
    reaches the plugin."""
    on = request.param == "underscores-in-headers-on"
    base = start_python_plugin(start_nginx, pluginserver, verifier, upstream.port, underscores_in_headers=on)
    yield Edge(name=f"kong-python[{request.node.callspec.params['pluginserver']},{request.param}]", url=base)


@pytest.fixture
def fronted_edge(
    request: pytest.FixtureRequest,
    start_nginx: Any,
    pluginserver: PluginServer,  # noqa: F811
    verifier: GatewayProcess,  # noqa: F811
    upstream: EchoUpstream,  # noqa: F811
) -> Callable[..., Edge]:
    """fronted_edge(label, **rig): the plugin's rig with what stands in front of Kong (test_trust_boundary_lua.py's)."""

    def edge(label: str, **rig: Any) -> Edge:
        base = start_python_plugin(start_nginx, pluginserver, verifier, upstream.port, **rig)
        return Edge(name=f"kong-python[{request.node.callspec.params['pluginserver']},{label}]", url=base)

    return edge
