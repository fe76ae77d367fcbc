"""The SSF push endpoint (RFC 8935): `POST /v1/ssf/events`, a SET in, 202 or an RFC 8935 error out.

RFC 8935 section 2.3 answers a refused SET with 400 and `{"err": ..., "description": ...}` (its own
error registry, not `X-Verifier-Reason` codes); a store or transmitter keys we cannot reach is 503 with
`Retry-After`, as every unavailable answer of ours: the transmitter retries a 5xx, while a 400 would lose
the event.
"""

from __future__ import annotations

from collections.abc import Mapping

from verifier.config.revocation import PUSH
from verifier.doors.refusals import STATUS_BY_OUTCOME, retry_after
from verifier.doors.routes import HttpAnswer, HttpRequest, Router
from verifier.errors import Outcome, ProviderUnavailable, StateUnavailable
from verifier.revocation.service import RevocationService
from verifier.revocation.ssf import INVALID_REQUEST, MAX_SET_BYTES, SET_TYP, SetRefused

EVENTS_PATH = "/v1/ssf/events"


def add_ssf_routes(router: Router, service: RevocationService) -> None:
    """Adds `POST /v1/ssf/events` when a transmitter pushes."""
    if not service.push_enabled:
        return

    async def push(request: HttpRequest, _: Mapping[str, str]) -> HttpAnswer:
        """RFC 8935 section 2: 202 when accepted, 400 with `err`/`description` when refused."""
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/" + SET_TYP:
            return _set_error(INVALID_REQUEST, "Content-Type must be application/secevent+jwt")
        if len(request.body) > MAX_SET_BYTES:
            return _set_error(INVALID_REQUEST, "SET too large")
        try:
            token = request.body.decode("ascii").strip()
        except UnicodeDecodeError:
            return _set_error(INVALID_REQUEST, "SET is not ASCII")
        try:
            await service.receive(token, delivery=PUSH, authorization=request.headers.get("authorization"))
        except SetRefused as exc:
            return _set_error(exc.err, exc.description)
        except (StateUnavailable, ProviderUnavailable) as exc:  # the store, or the transmitter's keys: retry
            return HttpAnswer.json(
                STATUS_BY_OUTCOME[Outcome.UNAVAILABLE],
                {"err": "temporarily_unavailable"},
                (("retry-after", retry_after(exc)),),
            )
        return HttpAnswer(202, (("cache-control", "no-store"),))

    router.add("POST", EVENTS_PATH, push)


def _set_error(err: str, description: str) -> HttpAnswer:
    """RFC 8935 section 2.3: a JSON object with `err` and `description`."""
    return HttpAnswer.json(400, {"err": err, "description": description})
