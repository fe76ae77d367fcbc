"""RFC 8936 Poll-Based SET delivery: ask the transmitter for SETs, acknowledge what we took.

Each request carries the previous response's acknowledgements (`ack`) and refusals (`setErrs`,
RFC 8936 section 2.4.3) and asks to return immediately (`returnImmediately`, section 2.4.1): a
long-held request would tie a connection to a transmitter that may never answer. A replayed SET
(already acted on, e.g. because our last acknowledgement was lost) is acknowledged again.

The poll endpoint is `poll_endpoint_url` from the settings, else the transmitter metadata's poll
delivery (`{"delivery": {"method": "urn:ietf:rfc:8936", "endpoint_url": ...}}`, as the stream
configuration of SSF 1.0 section 8.1.1 spells it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from verifier.config.revocation import DELIVERY_POLL_URN, TransmitterConfig
from verifier.errors import ProviderUnavailable
from verifier.observe.tracing import NO_TRACING, Tracing
from verifier.tokens.fetch import check_learned_url, read_body
from verifier.tokens.jwks import IssuerKeys

log = logging.getLogger("verifier.revocation")

MAX_POLL_RESPONSE_BYTES = 4 << 20  # bytes; maxEvents SETs of at most 64 KiB each, with room
RETRY_MIN_SECONDS = 1.0  # after a failed poll; doubles up to RETRY_MAX_SECONDS (or the poll interval)
RETRY_MAX_SECONDS = 60.0  # a transmitter that keeps failing is still asked at least once a minute
MIN_POLL_PAUSE_SECONDS = 0.05  # between polls even while SETs keep coming: at most 20 polls a second
SETS_MEDIA = "application/json"


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one polled SET: acknowledged, or refused with an RFC 8935 error."""

    ack: bool
    err: str = ""
    description: str = ""


Receive = Callable[[str], Awaitable[Outcome | None]]  # None: could not decide now; neither ack nor err


def poll_endpoint(transmitter: TransmitterConfig, metadata: Any) -> str:
    """The poll URL: configured, else from the metadata; empty when neither says."""
    if transmitter.poll_endpoint_url:
        return transmitter.poll_endpoint_url
    if not isinstance(metadata, dict):
        return ""
    delivery = metadata.get("delivery")
    candidates = delivery if isinstance(delivery, list) else [delivery]
    for item in candidates:
        if isinstance(item, dict) and item.get("method") == DELIVERY_POLL_URN:
            # the poll bearer goes there: the outbound URL rule, never a downgrade to plain http
            with contextlib.suppress(ProviderUnavailable):
                return check_learned_url(item.get("endpoint_url"), issuer=transmitter.issuer, what="poll endpoint")
    return ""


class Poller:
    """Polls one transmitter until cancelled."""

    def __init__(
        self,
        transmitter: TransmitterConfig,
        keys: IssuerKeys,
        session: Callable[[], aiohttp.ClientSession],
        receive: Receive,
        on_poll: Callable[[str], None] | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._transmitter = transmitter
        self._tracing = tracing  # a CLIENT span around each poll request
        self._on_poll = on_poll or (lambda result: None)  # counts each poll: "ok" or "error"
        self._keys = keys
        self._session = session
        self._receive = receive
        self._acks: list[str] = []
        self._errs: dict[str, dict[str, str]] = {}

    async def _endpoint(self) -> str:
        url = poll_endpoint(self._transmitter, self._keys.metadata)
        if not url and not self._transmitter.poll_endpoint_url:
            with contextlib.suppress(ProviderUnavailable):
                await self._keys.refresh()  # discovery fills the metadata
            url = poll_endpoint(self._transmitter, self._keys.metadata)
        return url

    async def poll_once(self) -> bool:
        """One request; True when polling again soon is worth it: some SETs were taken (acknowledged or refused), so
        acknowledgements are owed and more may follow. `moreAvailable` alone is never a reason to hurry: not on an
        empty answer, nor on one whose SETs could none be judged now (the store or the keys out of reach), which
        would be fetched and verified again 20 times a second for as long as the outage lasts."""
        url = await self._endpoint()
        if not url:
            raise ProviderUnavailable("transmitter metadata names no poll endpoint")
        request: dict[str, Any] = {
            "returnImmediately": True,
            "maxEvents": self._transmitter.max_events,
            "ack": list(self._acks),
        }
        if self._errs:
            request["setErrs"] = dict(self._errs)
        headers = {"Content-Type": SETS_MEDIA, "Accept": SETS_MEDIA}
        if self._transmitter.poll_token:
            headers["Authorization"] = "Bearer " + self._transmitter.poll_token
        timeout = self._transmitter.fetch_timeout_seconds
        try:
            with self._tracing.fetch("ssf.poll", "POST", url):
                async with asyncio.timeout(timeout):
                    async with self._session().post(
                        url, data=json.dumps(request), headers=headers, allow_redirects=False
                    ) as response:
                        if response.status != 200:
                            raise ProviderUnavailable(f"HTTP {response.status} from poll endpoint")
                        body = await read_body(response, MAX_POLL_RESPONSE_BYTES, "poll response")
        except TimeoutError as exc:
            raise ProviderUnavailable("poll timed out") from exc
        except aiohttp.ClientError as exc:
            raise ProviderUnavailable(f"poll failed ({type(exc).__name__})") from exc
        # The transmitter has our acknowledgements now; they are not sent again.
        self._acks, self._errs = [], {}
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ProviderUnavailable("poll response is not JSON") from exc
        sets = document.get("sets") if isinstance(document, dict) else None
        if not isinstance(sets, dict):
            raise ProviderUnavailable("poll response has no sets")
        # RFC 8936 section 2.4: we asked for at most maxEvents; SETs past it are neither acknowledged nor
        # refused, so the transmitter delivers them again later.
        for jti, token in list(sets.items())[: self._transmitter.max_events]:
            if not isinstance(jti, str):
                continue
            outcome = await self._outcome(token)
            if outcome is None:
                continue  # not acknowledged: the transmitter delivers it again
            if outcome.ack:
                self._acks.append(jti)
            else:
                self._errs[jti] = {"err": outcome.err, "description": outcome.description}
        return bool(self._acks) or bool(self._errs)

    async def _outcome(self, token: object) -> Outcome | None:
        """What to answer for one SET; a SET that breaks the receiver is refused, never fatal to the loop."""
        if not isinstance(token, str):
            return Outcome(False, "invalid_request", "SET is not a string")
        try:
            return await self._receive(token)
        except Exception:  # e.g. an iat of 10**400 that no float holds: refuse this SET, keep polling
            log.exception(
                "polled SET could not be processed",
                extra={"event": "ssf_poll", "transmitter": self._transmitter.issuer},
            )
            return Outcome(False, "invalid_request", "SET could not be processed")

    async def run(self) -> None:
        """Polls every `poll_interval_seconds`, soon again while SETs keep coming, backing off on failures.

        Never ends on its own: a failed poll or a bug on a hostile answer is logged and retried later.
        """
        interval = self._transmitter.poll_interval_seconds
        failures = 0
        while True:
            try:
                more = await self.poll_once()
                failures = 0
                self._on_poll("ok")
            except Exception as exc:
                failures += 1
                self._on_poll("error")
                error = exc.description if isinstance(exc, ProviderUnavailable) else type(exc).__name__
                log.warning(
                    "ssf poll failed",
                    extra={"event": "ssf_poll", "transmitter": self._transmitter.issuer, "error": error},
                )
                backoff = RETRY_MIN_SECONDS * 2 ** min(failures - 1, 16)
                await asyncio.sleep(min(backoff, max(interval, RETRY_MAX_SECONDS)))
                continue
            await asyncio.sleep(MIN_POLL_PAUSE_SECONDS if more else interval)
