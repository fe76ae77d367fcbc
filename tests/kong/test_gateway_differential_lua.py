"""tests/integration/test_gateway_differential.py's corpus through the Kong Lua plugin (kong/plugins/edge-verifier,
unmodified, in real nginx under the PDK shim, answer reuse off) to the REAL verifier with that module's policies;
test_gateway_differential_python.py runs the same through the Python plugin.

The tests are that module's own, imported; only the gateway differs: `edge` here is the plugin's rig. Each hostile
request (encoded slashes and dots, `;` parameters, `//`, backslashes, `%3F`/`%23`/`%00`, absolute-form targets and
Host disagreements, TE+CL smuggling, obs-fold, NUL/CTL bytes, method case, header blocks near the limits, a format
suffix on an exact-path policy) goes byte for byte to the rig's nginx, whose plugin tells the verifier the method,
host and raw target; the echo upstream's record must fall under what the read-only token (or no token) could pass.

Each runs twice: with the upstream getting the target Kong 3.x's router builds (`kong-3-target`: the path Kong
matched routes on, `kong.tools.uri.normalize`d: unreserved and other non-reserved percent-triplets decoded, dot
segments removed, slashes merged; then escaped, the query as sent: tests/kong/shim/kong_shim.lua) while the plugin
tells the verifier the raw target; and with the raw target passed on (`raw-target`: nginx's `proxy_pass` without a
URI, what these rigs did before, and what the upstream gets where nothing between normalizes it).

What the rig is not: Kong's router. It routes every path and Host to the one upstream (Kong's route names its
`hosts` and `paths`: another Host, or a normalized path under none of them, is Kong's 404 before any plugin, so
the rig passes a superset), and Kong sends the service's host upstream (`preserve_host` off) where the rig sends
the client's. The HTTP/2 cases are Envoy's (the rig speaks HTTP/1.1).
"""

from __future__ import annotations

from typing import Any

import pytest
from rigs import (  # noqa: F401 - fixtures, requested by name (fresh_upstream_log: autouse here too)
    fresh_upstream_log,
    issuer,
    upstream,
)
from test_gateway_differential import (  # noqa: F401 - fixtures and tests, collected here against this `edge`
    read_token,
    test_a_format_suffix_does_not_take_an_exact_paths_handler_to_a_laxer_policy,
    test_a_post_whose_query_names_another_method_is_not_judged_as_a_post,
    test_a_slash_added_or_a_unicode_case_fold_does_not_take_a_path_to_a_laxer_policy,
    test_no_framing_host_or_method_trick_gets_past_what_was_judged,
    test_no_spelling_of_a_protected_target_gets_a_read_only_token_to_it,
    test_no_spelling_of_the_public_path_opens_another_route_without_a_token,
    test_the_exact_path_itself_and_a_file_below_it_keep_their_policies,
    verifier,
    write_token,
)
from test_trust_boundary import Edge

pytestmark = pytest.mark.integration


# How the upstream gets the target: as Kong 3.x's router builds it, or as the client sent it.
FORWARDING = ("kong-3-target", "raw-target")


@pytest.fixture(params=FORWARDING)
def edge(request: pytest.FixtureRequest, start_nginx: Any, verifier: Any, upstream: Any) -> Edge:  # noqa: F811
    """The plugin's rig (answer reuse off) in front of the verifier with the differential's policies."""
    conf = {"url": f"{verifier.url}/v1/forward-auth", "cache_entries": 0}
    url = start_nginx(conf, upstream.port, kong_upstream_uri=request.param == "kong-3-target")
    return Edge(name=f"kong-lua {request.param}", url=str(url))
