"""tests/integration/test_gateway_admin.py through the Python Kong plugin (kong/python/edge_verifier.py, unmodified,
under the REAL `kong-python-pluginserver`, run by real nginx as Kong runs an external plugin:
tests/kong/python_edge.py): a client of Kong never reaches the verifier's admin API.

The tests are that module's own, imported; only the gateway differs: `edge` here is the plugin's rig (which asks the
verifier's gRPC door; the admin API is on its HTTP listener).
"""

from __future__ import annotations

import pytest
from python_edge import pluginserver, python_plugin_before_verifier  # noqa: F401 - fixtures, requested by name
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
def edge(python_plugin_before_verifier: str) -> str:  # noqa: F811
    """The Python plugin's rig in front of the verifier with the admin API on."""
    return python_plugin_before_verifier
