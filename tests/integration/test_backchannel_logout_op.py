"""Back-Channel Logout 1.0 end to end, with the real npm oidc-provider posting its own logout tokens.

A user logs in at the provider (authorization code + PKCE), calls the API through the shipped nginx
configuration (in front of replica B) and straight at replica A; then logs out at the provider
(RP-initiated logout, confirmation form posted). The provider posts its logout token to replica A's
`POST /v1/backchannel-logout`; replica A refuses the token at once, replica B as soon as Redis
pub/sub carries the entry, and nginx once its cached allow (`edge_cache.max_age_seconds`) runs out.

Run twice: with access tokens that carry `sid` (as Keycloak's do: only the logged-out session is
refused, the user's other session lives on) and without (the provider's own JWT access tokens: every
token of the user issued before the logout is refused, since none says its session).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from gateways import EchoUpstream, GatewayProcess, HttpResult, http_request, start_nginx, verifier_unusable_reason
from op_harness import WEB_CLIENT_ID, OpenIDProvider
from redis_harness import start_redis
from replicas import forward_auth, start_replicas

pytestmark = pytest.mark.integration

EDGE_MAX_AGE_SECONDS = 2  # how long nginx may reuse the verifier's allow
PROPAGATION_SECONDS = 3.0  # replica B hears of the entry through Redis pub/sub well within this


def _rig(stack: contextlib.ExitStack, tmp_path: Path, access_token_sid: bool) -> tuple[
    OpenIDProvider, list[GatewayProcess], GatewayProcess, EchoUpstream
]:
    """The provider, two replicas sharing a real Redis, and the shipped nginx in front of replica B."""
    reason = verifier_unusable_reason()
    if reason:
        pytest.skip(reason)
    redis_server = stack.enter_context(start_redis(tmp_path))
    upstream = EchoUpstream()
    stack.callback(upstream.stop)
    op = stack.enter_context(OpenIDProvider(tmp_path / "op", access_token_sid=access_token_sid))
    issuer = {
        "issuer": op.issuer,
        "audiences": ["https://api.example.test"],
        "algorithms": ["ES256", "RS256", "EdDSA"],  # RS256: the provider signs ID and logout tokens with it
        "allow_insecure_http": True,
        "backchannel_logout": {"audiences": [WEB_CLIENT_ID]},
    }
    config = {
        "issuers": [issuer],
        "state": {"redis_url": redis_server.url, "key_prefix": "logout:", "timeout_seconds": 0.5},
        "edge_cache": {"max_age_seconds": EDGE_MAX_AGE_SECONDS},
    }
    replicas = start_replicas(tmp_path, issuer=op.issuer, count=2, extra_config=config)
    for replica in replicas:
        stack.callback(replica.stop)
    nginx = start_nginx(tmp_path, replicas[1].extra["http_port"], upstream.port)
    stack.callback(nginx.stop)
    op.set_backchannel_logout_uri(f"{replicas[0].url}/v1/backchannel-logout")
    return op, replicas, nginx, upstream


def _through_nginx(nginx: GatewayProcess, token: str) -> HttpResult:
    return http_request(f"{nginx.url}/orders", headers={"Authorization": f"Bearer {token}"}, timeout=5.0)


def _until_refused(ask: Callable[[], HttpResult], within: float) -> tuple[HttpResult, float]:
    """Asks until the answer is 401, or a request sent past `within` seconds is not; the last answer and when
    the last request not refused was sent (-1.0 if none). A request counts by when it was sent: a loaded machine
    may take long to answer one judged in time, or stall this loop past `within` between two requests, and
    neither is the product's delay."""
    start = time.monotonic()
    last_not_refused = -1.0
    while True:
        sent = time.monotonic() - start
        answer = ask()
        if answer.status == 401:
            return answer, last_not_refused
        last_not_refused = sent
        if sent > within:
            return answer, last_not_refused
        time.sleep(0.05)


@pytest.mark.parametrize("access_token_sid", [True, False], ids=["tokens-with-sid", "tokens-without-sid"])
def test_a_logout_at_the_provider_stops_the_session_at_every_replica_and_gateway(
    tmp_path: Path, access_token_sid: bool
) -> None:
    with contextlib.ExitStack() as stack:
        op, replicas, nginx, upstream = _rig(stack, tmp_path, access_token_sid)
        laptop: dict[str, str] = {}
        token = str(op.user_token_response("alice", cookies=laptop)["access_token"])
        phone = str(op.user_token_response("alice", cookies={})["access_token"])  # another session
        bob = str(op.user_token_response("bob", cookies={})["access_token"])
        for bearer in (token, phone, bob):
            assert _through_nginx(nginx, bearer).status == 200  # nginx now holds the allow
            for replica in replicas:
                assert forward_auth(replica, authorization=f"Bearer {bearer}").status == 200

        # Through the gateway the path is the protected API's, never the verifier's endpoint.
        form = {"content-type": "application/x-www-form-urlencoded"}
        sneaked = http_request(f"{nginx.url}/v1/backchannel-logout", method="POST", headers=form,
                               body=b"logout_token=x", timeout=5.0)
        assert sneaked.status == 401 and sneaked.headers["x-verifier-reason"] == "token_missing", sneaked
        upstream.clear()
        passed = http_request(f"{nginx.url}/v1/backchannel-logout", method="POST",
                              headers={**form, "Authorization": f"Bearer {bob}"}, body=b"logout_token=x", timeout=5.0)
        assert passed.status == 200 and [r.path for r in upstream.requests] == ["/v1/backchannel-logout"]

        op.end_session(laptop)  # the provider posts its logout token before it answers
        log = op.log_text()
        assert "BACKCHANNEL_OK" in log, log[-2000:]

        refused = forward_auth(replicas[0], authorization=f"Bearer {token}")
        assert refused.status == 401, refused
        assert refused.headers["x-verifier-reason"] == "session_revoked"
        at_b, b_allowed = _until_refused(
            lambda: forward_auth(replicas[1], authorization=f"Bearer {token}"), PROPAGATION_SECONDS
        )
        assert at_b.status == 401 and at_b.headers["x-verifier-reason"] == "session_revoked", (at_b, b_allowed)
        at_nginx, nginx_allowed = _until_refused(lambda: _through_nginx(nginx, token), EDGE_MAX_AGE_SECONDS + 1.0)
        assert at_nginx.status == 401, (at_nginx, nginx_allowed)
        assert nginx_allowed <= EDGE_MAX_AGE_SECONDS + 1.0

        # The user's other session: alive when its tokens say which session they are (sid); refused when
        # they do not, since it could be the session that ended (fail closed).
        expected_phone = 200 if access_token_sid else 401
        for replica in replicas:
            assert forward_auth(replica, authorization=f"Bearer {phone}").status == expected_phone
        assert forward_auth(replicas[1], authorization=f"Bearer {bob}").status == 200  # another user: untouched

        time.sleep(1.1)  # iat is in whole seconds: a login in the logout's second would count as before it
        fresh = str(op.user_token_response("alice", cookies={})["access_token"])
        for replica in replicas:
            assert forward_auth(replica, authorization=f"Bearer {fresh}").status == 200
        assert _through_nginx(nginx, fresh).status == 200

        metrics = http_request(f"http://127.0.0.1:{replicas[0].extra['metrics_port']}/metrics").body.decode()
        assert f'verifier_backchannel_logouts_total{{issuer="{op.issuer}",result="accepted"}} 1.0' in metrics
