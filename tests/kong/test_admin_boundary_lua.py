"""tests/integration/test_gateway_admin.py through the Kong Lua plugin (kong/plugins/edge-verifier, unmodified, in
real nginx under the PDK shim): a client of Kong never reaches the verifier's admin API.

The tests are that module's own, imported; only the gateway differs: `edge` here is the plugin's rig, with answer
reuse off so that every request reaches the verifier.
"""

from __future__ import annotations

import pytest
from rigs import (  # noqa: F401 - fixtures, requested by name (fresh_upstream_log: autouse here too)
    fresh_upstream_log,
    issuer,
    upstream,
)
from test_gateway_admin import (  # noqa: F401 - fixtures and tests, collected here against this `edge`
    test_a_client_of_the_gateway_never_reaches_the_admin_api,
    test_the_admin_api_answers_its_operator_directly,
    verifier,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def edge(plugin_before_verifier: str) -> str:
    """The plugin's rig in front of the verifier with the admin API on."""
    return plugin_before_verifier
