"""Large but legitimate credentials and identities through the Python Kong plugin (kong/python/edge_verifier.py
under the REAL `kong-python-pluginserver`, played by tests/kong/test_python_plugin.py's Kong) to the REAL verifier's
gRPC door, mapping the groups twice and into the identity assertion (test_identity_size.py's verifier).

Kong's own nginx reads the client's header lines first (the shipped KONG_NGINX_HTTP_LARGE_CLIENT_HEADER_BUFFERS, 16
KiB a line: tests/kong/test_deploy_files.py, and test_credential_size_lua.py through real nginx); past it the plugin
asks with the credential headers only, in a `CheckRequest` far under the door's 1 MiB message bound. Here:
- a token of the verifier's max_token_bytes (and a DPoP-bound one with a proof of its bound) passes with its
  identity; one byte over, and one far over, are the verifier's 401 `invalid_token`, relayed;
- an identity past `upstream.max_total_bytes` is the gRPC door's 403 `upstream_identity_too_large`, relayed as it
  is (test_identity_size.py covered every other gateway), and one near it, from a token at its bound, is set whole.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from gateways import GatewayProcess, LocalIssuer
from replicas import public_jwk
from rigs import issuer  # noqa: F401 - the fixture, requested by name
from test_credential_size import PROOF_BOUND, TOKEN_BOUND, of_length, proof_of, token_of
from test_identity_size import (
    _answer_head_bytes,
    _groups_overage,
    verifier,  # noqa: F401 - the fixture: groups mapped twice and in the assertion
)
from test_python_plugin import (  # noqa: F401 - fixtures, requested by name
    KongRequest,
    ask_directly,
    grpc_target,
    kong,
    named,
    pluginserver,
    start_instance,
)

from verifier.binding.dpop import thumbprint

pytestmark = pytest.mark.integration

HOST, PORT, PATH = "api.example.test", 8000, "/api/items"


def ask(kong, verifier: GatewayProcess, headers: dict[str, str]) -> list[tuple[str, list]]:  # noqa: F811
    iid = start_instance(kong, grpc_target=grpc_target(verifier), timeout=2000)
    return kong.handle_event(iid, "access", KongRequest(headers=headers, host=HOST, port=PORT, path_with_query=PATH))


def upstream_headers(calls: list[tuple[str, list]]) -> dict[str, str]:
    assert not named(calls, "kong.response.exit") and not named(calls, "kong.response.error"), calls[-1]
    return {args[0].lower(): args[1] for args in named(calls, "kong.service.request.set_header")}


def refusal(calls: list[tuple[str, list]]) -> tuple[int, dict[str, str]]:
    (exit_args,) = named(calls, "kong.response.exit")
    status, _body, headers = exit_args
    return status, {k.lower(): v for k, v in headers.items()}


def test_a_token_of_the_bound_passes_with_its_identity(kong, verifier, issuer: LocalIssuer):  # noqa: F811
    token = token_of(issuer, TOKEN_BOUND)

    sent = upstream_headers(ask(kong, verifier, {"Authorization": f"Bearer {token}"}))

    assert sent["x-authenticated-userid"] == "alice"


def test_a_dpop_bound_token_of_the_bound_passes_with_a_proof_of_its_bound(kong, verifier, issuer):  # noqa: F811
    key = ec.generate_private_key(ec.SECP256R1())
    token = token_of(issuer, TOKEN_BOUND, cnf={"jkt": thumbprint(public_jwk(key))})
    proof = proof_of(key, PROOF_BOUND, "GET", f"http://{HOST}:{PORT}{PATH}", token)

    sent = upstream_headers(ask(kong, verifier, {"Authorization": f"DPoP {token}", "DPoP": proof}))

    assert sent["x-authenticated-userid"] == "alice"


@pytest.mark.parametrize("size", [TOKEN_BOUND + 1, 40 * 1024])
def test_a_token_over_the_bound_is_the_verifiers_401(kong, verifier, issuer, size):  # noqa: F811
    token = token_of(issuer, size)

    status, headers = refusal(ask(kong, verifier, {"Authorization": f"Bearer {token}"}))

    assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"], (status, headers)
    assert headers["x-verifier-reason"]


def test_an_identity_past_the_total_is_the_verifiers_403_relayed(kong, verifier, issuer):  # noqa: F811
    token = _groups_overage(issuer)

    calls = ask(kong, verifier, {"Authorization": f"Bearer {token}"})

    status, headers = refusal(calls)
    assert status == 403 and headers["x-verifier-reason"] == "upstream_identity_too_large", (status, headers)
    assert not named(calls, "kong.service.request.set_header")
    direct = ask_directly(verifier, f"Bearer {token}")  # the gRPC door's own answer, relayed as it is
    (exit_args,) = named(calls, "kong.response.exit")
    assert (direct.http_status, direct.reason, direct.body) == (403, "upstream_identity_too_large", exit_args[1])


def test_an_identity_near_the_total_from_a_token_at_its_bound_is_set_whole(kong, verifier, issuer):  # noqa: F811
    groups: list[str] = []
    for count in range(130, 200):  # the most groups whose identity is still allowed
        more = [f"grp-{i:04d}-eng" for i in range(count)]
        candidate = of_length(lambda n, more=more: issuer.mint(groups=more, pad="p" * n), TOKEN_BOUND)
        if _answer_head_bytes(verifier, candidate)[1] != "ok":
            break
        groups, token = more, candidate
    assert _answer_head_bytes(verifier, token)[0] > 7 * 1024

    sent = upstream_headers(ask(kong, verifier, {"Authorization": f"Bearer {token}"}))

    assert sent["x-authenticated-groups"] == ", ".join(groups)
    assert sent["x-authenticated-memberof"] == ", ".join(groups)
    assert sent["x-authenticated-identity"].count(".") == 2
