"""WebAuthn with a real browser: Debian's Chromium, headless, with a CDP virtual authenticator.

The browser loads the verifier's own demo page (`/v1/webauthn/demo`, the relying party's origin) and
runs every ceremony through `navigator.credentials.create/get`: register, list, a step-up assertion
accepted on the path it was bound to, then the same assertion replayed, a challenge moved to another
path, and the credential deleted. Nothing here signs on the browser's behalf.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest
from browser import WebAuthnSite, add_virtual_authenticator, launch_chromium, require_browser
from support import b64url

pytestmark = pytest.mark.integration

PROTECTED = "/v1/webauthn/demo/protected/transfer"
OTHER = "/v1/webauthn/demo/protected/delete-account"


@pytest.fixture
async def site(tmp_path: Any) -> AsyncIterator[WebAuthnSite]:
    require_browser()
    s = WebAuthnSite(tmp_path)
    await s.start()
    yield s
    await s.stop()


def _b64u(std_b64: str) -> str:
    """CDP reports credential ids in standard base64; the verifier speaks base64url."""
    return b64url(base64.b64decode(std_b64))


async def test_register_step_up_replay_wrong_path_and_delete_in_chromium(site: WebAuthnSite) -> None:
    token = site.token("alice")
    async with launch_chromium() as browser:
        page = await browser.new_page()
        cdp, authenticator_id = await add_virtual_authenticator(page)
        await page.goto(site.origin + "/v1/webauthn/demo")
        assert await page.evaluate("typeof window.webauthnDemo") == "object"  # the CSP let the script run

        # Register through navigator.credentials.create().
        registered = await page.evaluate("([t]) => webauthnDemo.register(t, 'virtual key')", [token])
        assert registered["step"] == "complete" and registered["status"] == 201, registered
        credential_id = registered["json"]["id"]
        held = (await cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator_id}))["credentials"]
        assert [_b64u(c["credentialId"]) for c in held] == [credential_id]
        assert registered["json"]["user_verified"] is True and registered["json"]["name"] == "virtual key"

        listed = await page.evaluate("([t]) => webauthnDemo.list(t)", [token])
        assert listed["status"] == 200 and [c["id"] for c in listed["json"]["credentials"]] == [credential_id]

        # Step-up: 401 with a WebAuthn challenge, signed by navigator.credentials.get(), retried: 200.
        stepped = await page.evaluate("([t, p]) => webauthnDemo.stepUp(t, p)", [token, PROTECTED])
        first, final = stepped["first"], stepped["final"]
        assert first["status"] == 401 and first["reason"] == "webauthn_assertion_required"
        assert first["wwwAuthenticate"].startswith('WebAuthn realm="verifier"')
        assert 'rp_id="localhost"' in first["wwwAuthenticate"]
        assert [c["id"] for c in first["json"]["publicKey"]["allowCredentials"]] == [credential_id]
        assert final["status"] == 200 and final["json"] == {"ok": True, "subject": "alice", "name": "transfer"}
        counter = (await cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator_id}))[
            "credentials"
        ][0]["signCount"]
        listed = await page.evaluate("([t]) => webauthnDemo.list(t)", [token])
        assert listed["json"]["credentials"][0]["sign_count"] == counter

        # The same assertion again: refused, with a fresh challenge.
        replayed = await page.evaluate(
            "([t, p, a]) => webauthnDemo.withAssertion(t, p, a)", [token, PROTECTED, stepped["assertion"]]
        )
        assert replayed["status"] == 401 and replayed["reason"] == "webauthn_challenge_replayed"
        assert replayed["json"]["publicKey"]["challenge"] != first["json"]["publicKey"]["challenge"]

        # A challenge issued for one path, signed, presented on another: refused.
        moved = await page.evaluate(
            """async ([t, p, q]) => {
                 const first = await webauthnDemo.call("POST", p, t);
                 const assertion = await webauthnDemo.sign(first.json.publicKey);
                 return webauthnDemo.withAssertion(t, q, assertion);
               }""",
            [token, PROTECTED, OTHER],
        )
        assert moved["status"] == 401 and moved["reason"] == "webauthn_challenge_mismatch"

        # Another user's token cannot list or use alice's credential.
        bob = site.token("bob")
        bobs = await page.evaluate("([t]) => webauthnDemo.list(t)", [bob])
        assert bobs["json"] == {"credentials": []}

        # Delete the credential (the demo passes the step-up an enrolled user needs for that): gone from
        # the list, no longer offered.
        deleted = await page.evaluate("([t, id]) => webauthnDemo.remove(t, id)", [token, credential_id])
        assert deleted["status"] == 204
        listed = await page.evaluate("([t]) => webauthnDemo.list(t)", [token])
        assert listed["json"] == {"credentials": []}
        after = await page.evaluate("([t, p]) => webauthnDemo.call('POST', p, t)", [token, PROTECTED])
        assert after["status"] == 401 and after["json"]["publicKey"]["allowCredentials"] == []

    ok = site.registry.get_sample_value("verifier_webauthn_assertions_total", {"result": "ok"})
    assert ok == 2  # the protected path, and the delete


async def test_a_bad_token_gets_the_bearer_challenge_in_the_browser(site: WebAuthnSite) -> None:
    async with launch_chromium() as browser:
        page = await browser.new_page()
        await page.goto(site.origin + "/v1/webauthn/demo")
        answer = await page.evaluate("() => webauthnDemo.call('POST', '/v1/webauthn/register/begin', 'nope', {})")
        assert answer["status"] == 401 and answer["reason"] == "token_malformed"
        assert answer["wwwAuthenticate"].startswith('Bearer realm="verifier"')
