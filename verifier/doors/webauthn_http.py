"""The WebAuthn registry's HTTP endpoints (beside forward-auth): requests in, `WebAuthnService` calls, answers out.

| method and path                         | what                                                  |
|-----------------------------------------|-------------------------------------------------------|
| `POST /v1/webauthn/register/begin`      | creation options and a signed state (Bearer token)     |
| `POST /v1/webauthn/register/complete`   | verifies and stores the credential: 201                |
| `GET /v1/webauthn/credentials`          | the caller's credentials                               |
| `DELETE /v1/webauthn/credentials/{id}`  | removes one (id base64url): 204                        |
| `GET /v1/webauthn/demo`                 | a same-origin demo page (when `demo: true`)            |
| `POST /v1/webauthn/demo/protected/{n}`  | a step-up-protected echo the demo page calls           |

The two `register` endpoints take `application/json` only (RFC 8259 section 11), else 415, as the admin door's
POST: a browser sends a cross-site form (`text/plain`, `application/x-www-form-urlencoded`, `multipart/form-data`)
without a preflight, and one whose body is JSON must not reach the registry.

Every caller is authenticated first (`authenticate`: the forward-auth checks) and must be a user; the
service's refusals are answered by `verifier.doors.refusals.endpoint_answer`, as the gateway's are.

The request a DPoP proof and a step-up are judged against is built once (`attributes`): its own method and
target, on the declared public origin its `Host` names (`dpop.origins`, `verifier.doors.public_origin`: behind
a TLS-terminating gateway, `https://<public host>`), else on the caller's own `http://<Host>`.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from verifier.doors.public_origin import PublicOrigins
from verifier.doors.refusals import endpoint_answer, not_json
from verifier.doors.routes import HttpAnswer, HttpRequest, Router
from verifier.errors import MalformedRequest, VerifierError
from verifier.principal import Principal
from verifier.request import RequestAttributes, normalize_host
from verifier.webauthn.service import WebAuthnService, describe, require_user

Authenticate = Callable[[HttpRequest, RequestAttributes], Awaitable[Principal]]
Guarded = Callable[[HttpRequest, Mapping[str, str], Principal, RequestAttributes], Awaitable[HttpAnswer]]
MAX_BODY_BYTES = 65536  # a registration response with an attestation chain is a few KiB


def add_webauthn_routes(
    router: Router, service: WebAuthnService, authenticate: Authenticate, origins: PublicOrigins | None = None
) -> None:
    """Adds the registry's endpoints (and the demo page when configured) to `router`; `origins`: the declared
    public origins the requests are on (none: the caller's `http://<Host>`)."""
    endpoints = _Endpoints(service)
    declared = origins or PublicOrigins()

    def guarded(handler: Guarded) -> Callable[[HttpRequest, Mapping[str, str]], Awaitable[HttpAnswer]]:
        async def run(request: HttpRequest, params: Mapping[str, str]) -> HttpAnswer:
            try:
                attrs = attributes(request, declared)  # one request for the DPoP proof and the step-up alike
                principal = await authenticate(request, attrs)
                require_user(principal)
                return await handler(request, params, principal, attrs)
            except VerifierError as exc:
                return endpoint_answer(exc, realm=service.realm)

        return run

    router.add("POST", "/v1/webauthn/register/begin", guarded(endpoints.register_begin))
    router.add("POST", "/v1/webauthn/register/complete", guarded(endpoints.register_complete))
    router.add("GET", "/v1/webauthn/credentials", guarded(endpoints.list))
    router.add("DELETE", "/v1/webauthn/credentials/{id}", guarded(endpoints.delete))
    if service.demo:
        router.add("GET", "/v1/webauthn/demo", endpoints.demo_page)
        router.add("POST", "/v1/webauthn/demo/protected/{name}", guarded(endpoints.demo_protected))


class _Endpoints:
    """One handler per route; each translates and calls the service."""

    def __init__(self, service: WebAuthnService) -> None:
        self._service = service
        self._demo: HttpAnswer | None = None

    async def register_begin(
        self, request: HttpRequest, _: Mapping[str, str], principal: Principal, attrs: RequestAttributes
    ) -> HttpAnswer:
        if (refused := not_json(request.headers, realm=self._service.realm)) is not None:
            return refused
        options = await self._service.begin_registration(principal, _body(request), attrs)
        return HttpAnswer.json(200, options)

    async def register_complete(
        self, request: HttpRequest, _: Mapping[str, str], principal: Principal, __: RequestAttributes
    ) -> HttpAnswer:
        if (refused := not_json(request.headers, realm=self._service.realm)) is not None:
            return refused
        stored = await self._service.complete_registration(principal, _body(request))
        document = describe(stored)
        return HttpAnswer.json(201, document, (("location", f"/v1/webauthn/credentials/{document['id']}"),))

    async def list(
        self, _: HttpRequest, __: Mapping[str, str], principal: Principal, ___: RequestAttributes
    ) -> HttpAnswer:
        credentials = await self._service.credentials(principal)
        return HttpAnswer.json(200, {"credentials": [describe(c) for c in credentials]})

    async def delete(
        self, _: HttpRequest, params: Mapping[str, str], principal: Principal, attrs: RequestAttributes
    ) -> HttpAnswer:
        await self._service.delete_credential(principal, params["id"], attrs)
        return HttpAnswer(204, (("cache-control", "no-store"),))

    async def demo_page(self, _: HttpRequest, __: Mapping[str, str]) -> HttpAnswer:
        if self._demo is None:
            self._demo = _demo_answer()
        return self._demo

    async def demo_protected(
        self, _: HttpRequest, params: Mapping[str, str], principal: Principal, attrs: RequestAttributes
    ) -> HttpAnswer:
        await self._service.check_step_up(principal, attrs)
        return HttpAnswer.json(200, {"ok": True, "subject": principal.subject, "name": params["name"]})


def _body(request: HttpRequest) -> Any:
    if len(request.body) > MAX_BODY_BYTES:
        raise MalformedRequest("the request body is too large")
    try:
        return request.json()
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedRequest("the request body is not JSON") from exc


def attributes(request: HttpRequest, origins: PublicOrigins) -> RequestAttributes:
    """One of our own endpoints' requests as the attributes its DPoP proof and step-up are bound to: its own
    method and target, on the declared origin its `Host` names, else on `http://<Host>` (the caller's word, which
    a declared `dpop.origins` refuses). Never a caller's X-Forwarded-*: no gateway overwrites them here."""
    path = request.path + (f"?{request.query}" if request.query else "")
    host = normalize_host(request.headers.get("host", ""))
    scheme, host = origins.on(host) or ("http", host)
    return RequestAttributes(
        method=request.method.upper(),
        scheme=scheme,
        host=host,
        path=path,
        headers=request.headers,
        client_address=request.peer,
    )


def _demo_answer() -> HttpAnswer:
    """The demo page, with a CSP that allows exactly its one inline script (by hash) and nothing else."""
    page = importlib.resources.files("verifier.webauthn").joinpath("static/demo.html").read_bytes()
    script = page.split(b"<script>", 1)[1].split(b"</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
    csp = (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; connect-src 'self'; "
        "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    )
    return HttpAnswer(
        200,
        (
            ("content-type", "text/html; charset=utf-8"),
            ("cache-control", "no-store"),
            ("content-security-policy", csp),
            ("x-content-type-options", "nosniff"),
            ("referrer-policy", "no-referrer"),
        ),
        page,
    )
