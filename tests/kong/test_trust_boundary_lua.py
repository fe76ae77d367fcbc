"""Issue #18's attacks through the Kong Lua plugin (kong/plugins/edge-verifier, unmodified, in real nginx
under the PDK shim) to the REAL verifier with the same policies.

The tests are tests/integration/test_trust_boundary.py's own, imported; only the gateway differs: `edge`
here is the plugin's rig, with answer reuse off so that every request reaches the verifier.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from gateways import EchoUpstream, GatewayProcess, http_request
from kong_rig_limits import (  # noqa: F401 - what the rig cannot run, skipped with the reason, and what it can
    test_a_client_description_of_the_request_never_reaches_the_upstream,
    test_a_dpop_proof_made_for_another_host_is_refused_here,
    test_a_dpop_proof_made_for_another_host_is_refused_whatever_host_the_client_names,
    test_a_request_for_a_host_the_gateway_does_not_serve_is_refused_unjudged,
)
from replicas import dpop_proof, public_jwk
from rigs import (  # noqa: F401 - fixtures, requested by name (fresh_upstream_log: autouse here too)
    fresh_upstream_log,
    issuer,
    upstream,
)
from test_trust_boundary import (  # noqa: F401 - fixtures and tests, collected here against this `edge`
    API_HOST,
    Edge,
    raw_get,
    test_a_client_named_request_target_never_reaches_the_upstream,
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

from verifier.binding.dpop import thumbprint

pytestmark = pytest.mark.integration


@pytest.fixture(params=["underscores-dropped", "underscores-in-headers-on"])
def edge(
    request: pytest.FixtureRequest,
    start_nginx: Any,
    verifier: GatewayProcess,  # noqa: F811 - the imported fixture, requested by name
    upstream: EchoUpstream,  # noqa: F811
) -> Iterator[Edge]:
    """The plugin's rig; also with `underscores_in_headers on`, where `X_Authenticated_Roles` reaches the plugin."""
    base = start_nginx(
        {"url": f"{verifier.url}/v1/forward-auth", "cache_entries": 0},
        upstream.port,
        underscores_in_headers=request.param == "underscores-in-headers-on",
    )
    yield Edge(name=f"kong-lua[{request.param}]", url=base)


@pytest.fixture
def fronted_edge(start_nginx: Any, verifier: GatewayProcess, upstream: EchoUpstream) -> Callable[..., Edge]:  # noqa: F811
    """fronted_edge(label, **rig): the plugin's rig with what stands in front of Kong (conftest.py's `start_nginx`):
    `public_port=80`, Kong behind a Kubernetes Service (`port_maps: 80:<its port>`, as
    deploy/k8s/verifier-sidecar.yaml's KONG_PORT_MAPS); `trusted_proxy=True`, behind a TLS-terminating load
    balancer in `trusted_ips` (plain http to Kong, the client's https in X-Forwarded-Proto and -Port)."""

    def edge(label: str, **rig: Any) -> Edge:
        base = start_nginx({"url": f"{verifier.url}/v1/forward-auth", "cache_entries": 0}, upstream.port, **rig)
        return Edge(name=f"kong-lua[{label}]", url=base)

    return edge


def test_behind_port_maps_a_proof_for_the_public_url_passes_and_one_for_kongs_own_port_does_not(
    fronted_edge: Callable[..., Edge], upstream: EchoUpstream, tokens: Any  # noqa: F811
) -> None:
    """Behind a port mapping clients name no port (`http://api.example.test/orders`): the plugin tells the verifier
    the port Kong's `port_maps` maps its own to (`kong.request.get_forwarded_port`), so the DPoP proof the client
    made for the URL it used passes, and one naming Kong's listening port, which no client reached, is refused.
    Before, the plugin told Kong's listening port: every legitimate proof there was refused (invalid_dpop_proof)."""
    mapped_edge = fronted_edge("port_maps 80", public_port=80)
    key = ec.generate_private_key(ec.SECP256R1())
    tok = tokens("read", cnf={"jkt": thumbprint(public_jwk(key))})

    def sent(url: str) -> int:
        return raw_get(mapped_edge, "/orders", {"Host": API_HOST, "Authorization": f"DPoP {tok}",
                                                "DPoP": dpop_proof(key, "GET", url, tok)})

    assert sent(f"http://{API_HOST}:{mapped_edge.port}/orders") == 401, mapped_edge.name
    assert upstream.requests == []
    assert sent(f"http://{API_HOST}/orders") == 200, mapped_edge.name
    assert [r.path for r in upstream.requests] == ["/orders"]


def test_behind_a_trusted_tls_proxy_a_proof_for_the_https_url_passes(
    fronted_edge: Callable[..., Edge], upstream: EchoUpstream, tokens: Any  # noqa: F811
) -> None:
    """The client used `https://api.example.test/orders` (its proof says so); the load balancer sent Kong plain http
    with X-Forwarded-Proto https and -Port 443. The plugin tells the verifier the scheme and the port alike, as
    Kong's `get_forwarded_*` give them: https and 443. Told Kong's own scheme beside the forwarded port, the verifier
    judged `http://api.example.test:443/orders` and refused the proof; a proof naming plain http is refused."""
    proxied_edge = fronted_edge("trusted proxy", trusted_proxy=True)
    key = ec.generate_private_key(ec.SECP256R1())
    tok = tokens("read", cnf={"jkt": thumbprint(public_jwk(key))})

    def sent(url: str) -> int:
        return raw_get(proxied_edge, "/orders", {"Host": API_HOST, "X-Forwarded-Proto": "https",
                                                 "X-Forwarded-Port": "443", "Authorization": f"DPoP {tok}",
                                                 "DPoP": dpop_proof(key, "GET", url, tok)})

    assert sent(f"http://{API_HOST}/orders") == 401, proxied_edge.name
    assert sent(f"https://{API_HOST}/orders") == 200, proxied_edge.name
    assert [r.path for r in upstream.requests] == ["/orders"]


def test_client_kong_consumer_headers_never_reach_the_upstream(
    edge: Edge,
    upstream: EchoUpstream,  # noqa: F811
    tokens: Any,  # noqa: F811
) -> None:
    """Kong's consumer headers (set by its authenticators, and by acl after this plugin) from a client: with
    no consumer authenticated, every one is a claim nobody checked (issue #20)."""
    spoof = {
        "X-Consumer-ID": "0000",
        "X-Consumer-Username": "root",
        "X-Consumer-Custom-ID": "root",
        "X-Credential-Identifier": "root",
        "X-Anonymous-Consumer": "false",
        "X-Consumer-Groups": "admins",
        "X-Kong-Consumer-Username": "root",
        # with `underscores_in_headers on` (Kong's own nginx template), CGI-style frameworks read these as
        # X-Consumer-ID and X-Consumer-Username
        "X_Consumer_ID": "0000",
        "X_Consumer_Username": "root",
    }

    r = http_request(f"{edge.url}/orders", headers={**spoof, "Authorization": f"Bearer {tokens('read')}"})

    assert r.status == 200, (edge.name, r.status, r.body)
    (seen,) = upstream.requests
    assert seen.headers["x-authenticated-userid"] == "alice"
    spoofed_values = {k.lower().replace("_", "-"): v for k, v in spoof.items()}
    leaked = {k: v for k, v in seen.headers.items() if spoofed_values.get(k.replace("_", "-")) == v}
    assert not leaked, leaked


@pytest.mark.parametrize("target", ["/admin/secret#/../../health", "/admin/secret#/%2e%2e/%2E%2E/health"])
def test_a_protected_path_with_a_fragment_is_not_judged_as_the_public_one(
    edge: Edge,
    upstream: EchoUpstream,  # noqa: F811
    target: str,
) -> None:
    """Kong's kong.request.get_path() normalizes (dot segments resolved, `#` a plain byte): the raw
    `/admin/secret#/../../health` is `/health` to it, while Kong's router passes the raw path upstream, where
    a server that drops the fragment serves /admin/secret. The verifier must be told the raw path, whose
    readings it weighs (test_trust_boundary.py's fragment tests), not Kong's one reading of it."""
    status = raw_get(edge, target, {"Host": API_HOST})

    assert status in (400, 401), (edge.name, target, status)
    assert upstream.requests == []
