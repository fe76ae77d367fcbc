"""tests/integration/test_trust_boundary.py's tests that the Kong plugin rigs (real nginx under the PDK shim, running
the Lua plugin, or the Python plugin under its real plugin server) cannot run as written, each with the reason, and
what of them can run: imported by test_trust_boundary_lua.py and test_trust_boundary_python.py, so that an attack
not run through Kong is said, not dropped.

What the rigs lack is Kong itself around the plugin: its router (a route's `hosts`, deploy/kong/kong.yml) and the
`proxy_set_header X-Forwarded-*` lines of its nginx template. Those are Kong's answers, not the plugin's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from gateways import EchoUpstream, http_request
from replicas import dpop_proof, public_jwk
from test_trust_boundary import (
    API_HOST,
    EVIL_HOST,
    Edge,
)
from test_trust_boundary import (
    test_a_client_description_of_the_request_never_reaches_the_upstream as _description_test,
)

from verifier.binding.dpop import thumbprint

KONG_ROUTER = (
    "a Host the gateway does not serve is Kong's router's answer: deploy/kong/kong.yml's route names its `hosts` and "
    "Kong answers any other Host 404 (no route matched) before a plugin runs; the rig has no router, every Host "
    "reaches the plugin (which tells the verifier that host: test_a_dpop_proof_made_for_another_host_is_refused_here)"
)
KONG_SETS = {
    "X-Forwarded-Host": "Kong's nginx template sets X-Forwarded-Host for the upstream from its own state "
                        "(proxy_set_header ... $upstream_x_forwarded_host); the rig's nginx does not",
    "Forwarded": "RFC 7239 Forwarded is Kong's business, not the plugins': Kong neither sets nor clears it, and "
                 "kong/README.md says an upstream reading it behind Kong needs it cleared there",
}


@pytest.mark.skip(reason=KONG_ROUTER)
def test_a_request_for_a_host_the_gateway_does_not_serve_is_refused_unjudged() -> None:
    """test_trust_boundary.py's test of that name: the 421 of the nginx and Envoy templates."""


@pytest.mark.skip(reason=KONG_ROUTER)
def test_a_dpop_proof_made_for_another_host_is_refused_whatever_host_the_client_names() -> None:
    """test_trust_boundary.py's test of that name: its 421 halves are the router's; the rest is below."""


def test_a_dpop_proof_made_for_another_host_is_refused_here(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str]
) -> None:
    """The plugin's half of the test above: a proof made for evil.example, replayed to our host, is refused (the
    plugin tells the verifier the host it routed by, whose htu does not match); a proof for our host passes."""
    key = ec.generate_private_key(ec.SECP256R1())
    tok = tokens("read", cnf={"jkt": thumbprint(public_jwk(key))})
    scheme = edge.url.split("://", 1)[0]
    host = f"{API_HOST}:{edge.port}"

    def sent(proof_host: str) -> Any:
        proof = dpop_proof(key, "GET", f"{scheme}://{proof_host}:{edge.port}/orders", tok)
        return http_request(f"{edge.url}/orders", headers={"Host": host, "Authorization": f"DPoP {tok}", "DPoP": proof})

    r = sent(EVIL_HOST)
    assert r.status == 401, (edge.name, r.status, r.body)
    assert upstream.requests == []
    r = sent(API_HOST)
    assert r.status == 200, (edge.name, r.status, r.body)


def _description_cases() -> list[Any]:
    (mark,) = [m for m in _description_test.pytestmark if m.name == "parametrize"]
    return [pytest.param(*case, marks=pytest.mark.skip(reason=KONG_SETS[case[0]])) if case[0] in KONG_SETS else case
            for case in mark.args[1]]


@pytest.mark.parametrize(("name", "value"), _description_cases())
def test_a_client_description_of_the_request_never_reaches_the_upstream(
    edge: Edge, upstream: EchoUpstream, tokens: Callable[..., str], name: str, value: str
) -> None:
    """test_trust_boundary.py's test of that name, run for the headers the plugin clears (the method and target it
    tells the verifier); those Kong itself sets or leaves are skipped, with the reason."""
    _description_test(edge, upstream, tokens, name, value)
