"""A real browser and an in-process verifier for the WebAuthn browser tests.

- `WebAuthnSite`: a `DevIdentityProvider` for tokens and the real verifier (`verifier.app.App`) with
  WebAuthn configured, its HTTP listener on `http://localhost:<port>` (an origin browsers treat as secure).
- `launch_chromium`: Debian's `/usr/bin/chromium` driven by the pip `playwright` package over the
  DevTools protocol (never `playwright install`), with a CTAP2 virtual authenticator.

Both skip the test (pytest.skip) when Chromium or playwright is missing
(`.ci/setup.d/50-chromium.sh` installs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support import free_port

from verifier.app import App
from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider
from verifier.settings import IssuerSettings, Listen, Settings
from verifier.webauthn import WebAuthnConfig

CHROMIUM = "/usr/bin/chromium"
SETUP_SCRIPT = ".ci/setup.d/50-chromium.sh"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# CDP WebAuthn.addVirtualAuthenticator: a USB security key with a PIN (UV) and resident keys.
VIRTUAL_AUTHENTICATOR = {
    "protocol": "ctap2",
    "transport": "usb",
    "hasResidentKey": True,
    "hasUserVerification": True,
    "isUserVerified": True,
}


def require_browser() -> None:
    """Skips the test when the browser or its driver is not installed."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} not installed (run {SETUP_SCRIPT})")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip(f"pip package playwright not installed (run {SETUP_SCRIPT})")


class WebAuthnSite:
    """The real verifier (App) with WebAuthn configured, on http://localhost:<port>, tokens from a dev provider."""

    def __init__(self, tmp_path: Any) -> None:
        self.port = free_port()
        self.origin = f"http://localhost:{self.port}"
        self.idp = DevIdentityProvider(port=free_port())
        self.config = WebAuthnConfig(
            rp_id="localhost",
            rp_name="edge-verifier browser test",
            origins=(self.origin,),
            secret=os.urandom(32),
            sqlite_path=str(tmp_path / "webauthn.sqlite3"),
            demo=True,  # the page the browser loads (off by default)
        )
        self.settings = Settings(
            grpc=None,
            # `localhost` binds every loopback address it resolves to, so Chromium reaches us on v4 or v6.
            http=Listen(host="localhost", port=self.port),
            metrics=None,
            issuers=(IssuerSettings(issuer=self.idp.issuer, audiences=(DEV_AUDIENCE,), algorithms=("ES256",)),),
            webauthn=self.config,
        )
        self.app = App(self.settings)
        assert self.app.webauthn is not None
        self.service = self.app.webauthn
        self.registry = self.app.metrics.registry

    def token(self, sub: str = "alice") -> str:
        """A fresh access token for `sub` from the dev provider."""
        return self.idp.mint(sub=sub)

    async def start(self) -> None:
        """Starts the provider and the verifier."""
        await self.idp.start()
        await self.app.start()
        await asyncio.wait_for(self.app.keys.wait_ready(), 10)

    async def stop(self) -> None:
        """Stops everything."""
        await self.app.stop(grace=0.2)
        await self.idp.stop()


@contextlib.asynccontextmanager
async def launch_chromium() -> AsyncIterator[Any]:
    """A headless Chromium (Debian's) under playwright; yields the browser."""
    require_browser()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def add_virtual_authenticator(page: Any) -> tuple[Any, str]:
    """Enables CDP WebAuthn on `page` and adds a virtual authenticator: (cdp session, authenticator id)."""
    cdp = await page.context.new_cdp_session(page)
    await cdp.send("WebAuthn.enable", {"enableUI": False})
    added = await cdp.send("WebAuthn.addVirtualAuthenticator", {"options": VIRTUAL_AUTHENTICATOR})
    return cdp, added["authenticatorId"]
