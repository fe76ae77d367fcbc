"""Single-use values stay single-use through what the operator does to `verifier serve` without Redis.

The attacker captured one DPoP request (proof and token: they travel together) and replays it. The
verifier refuses the replay, and must go on refusing it after SIGHUP (the new worker starts beside the
old one, on the same sockets), after a worker is killed and replaced, and (with `state.path`) after a
full restart: the replay memory lives in a file on the host, not in a worker's memory. In memory,
each of those forgot the proof and let it through again within its `iat` window.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from doorkit import http_exchange
from replicas import dpop_proof, public_jwk
from served import served_verifier, state_section

from verifier.binding.dpop import thumbprint

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("durable", [False, True], ids=["default", "state_path"])
async def test_a_replayed_dpop_proof_stays_refused_after_sighup_a_worker_restart_and_a_full_restart(
    tmp_path: Path, durable: bool
) -> None:
    state = state_section(tmp_path, durable)
    async with served_verifier(tmp_path, lambda _: "dpop: {iat_past_seconds: 600}\n" + state) as (idp, served):
        key = ec.generate_private_key(ec.SECP256R1())
        token = idp.mint(sub="alice", ttl=600, claims={"cnf": {"jkt": thumbprint(public_jwk(key))}})
        carol = idp.mint(sub="carol", ttl=600)

        def captured(proof: str) -> bytes:
            return (
                "GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: api\r\n"
                f"X-Forwarded-Uri: /orders\r\nX-Forwarded-Method: GET\r\nAuthorization: DPoP {token}\r\n"
                f"DPoP: {proof}\r\n\r\n"
            ).encode()

        first = captured(dpop_proof(key, "GET", "https://api/orders", token))

        async def replay_refused(when: str) -> None:
            await served.serving(carol)
            answer = await http_exchange(served.http, first)
            refused = answer.startswith(b"HTTP/1.1 401 ") and b"DPoP proof replayed" in answer
            assert refused, f"passed again after {when}"
            fresh = captured(dpop_proof(key, "GET", "https://api/orders", token))
            assert (await served.request(fresh))[0] == 200, f"a fresh proof refused after {when}"

        await served.serving(carol)
        assert (await served.request(first))[0] == 200
        await replay_refused("its first use")
        await served.through_restarts(replay_refused, full=durable)
