"""The kill switch over HTTP: `POST/GET /v1/admin/revocations`, `DELETE /v1/admin/revocations/{id}`.

Without an admin token the routes are not added at all (404 on every method, so the API's presence is not even
disclosed). `POST` takes `application/json` only (RFC 8259 section 11), else 415: a browser sends a cross-site
form (`text/plain`, `application/x-www-form-urlencoded`, `multipart/form-data`) without asking, and one whose
body is JSON must not reach the kill switch should the admin port ever be reachable from one. The `KillSwitch`'s
refusals are answered by `verifier.doors.refusals`. The composition root adds them to the admin listener's
router when `admin.listen` is set (the forward-auth listener then has none: 404), else to the forward-auth
listener's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from verifier.doors.refusals import endpoint_answer, not_json
from verifier.doors.routes import HttpAnswer, HttpRequest, Router
from verifier.errors import MalformedRequest, VerifierError
from verifier.revocation.admin import KillSwitch

COLLECTION = "/v1/admin/revocations"
MAX_BODY_BYTES = 16 * 1024  # bytes; a subject and a reason
REALM = "verifier-admin"

Handler = Callable[[HttpRequest, Mapping[str, str]], Awaitable[HttpAnswer]]


def add_admin_routes(router: Router, kill_switch: KillSwitch) -> None:
    """Adds the three routes when the kill switch is enabled."""
    if not kill_switch.enabled:
        return

    def guarded(handler: Handler) -> Handler:
        async def run(request: HttpRequest, params: Mapping[str, str]) -> HttpAnswer:
            try:
                kill_switch.authorize(request.headers.get("authorization", ""), peer=request.peer)
                return await handler(request, params)
            except VerifierError as exc:
                return endpoint_answer(exc, realm=REALM)

        return run

    async def create(request: HttpRequest, _: Mapping[str, str]) -> HttpAnswer:
        if len(request.body) > MAX_BODY_BYTES:  # the catalogue's answer (and its reason), as 413 (RFC 9110 15.5.14)
            answer = endpoint_answer(MalformedRequest("body too large"), realm=REALM)
            return dataclasses.replace(answer, status=413)
        if (refused := not_json(request.headers, realm=REALM)) is not None:
            return refused
        try:
            document: Any = request.json()
        except (ValueError, RecursionError) as exc:
            raise MalformedRequest("body is not JSON") from exc
        entry = await kill_switch.create(document, peer=request.peer)
        return HttpAnswer.json(201, {"id": entry.id}, (("location", f"{COLLECTION}/{entry.id}"),))

    async def list_entries(_: HttpRequest, __: Mapping[str, str]) -> HttpAnswer:
        return HttpAnswer.json(200, {"entries": [e.public() for e in kill_switch.entries()]})

    async def delete(request: HttpRequest, params: Mapping[str, str]) -> HttpAnswer:
        await kill_switch.lift(params["id"], peer=request.peer)
        return HttpAnswer(204, (("cache-control", "no-store"),))

    router.add("POST", COLLECTION, guarded(create))
    router.add("GET", COLLECTION, guarded(list_entries))
    router.add("DELETE", COLLECTION + "/{id}", guarded(delete))
