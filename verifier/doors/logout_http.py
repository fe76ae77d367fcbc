"""The back-channel logout endpoint (OpenID Connect Back-Channel Logout 1.0 sections 2.5 and 2.8).

`POST /v1/backchannel-logout` with an `application/x-www-form-urlencoded` body holding one
`logout_token`. Section 2.8: 200 when the logout took effect; 400 with a JSON `error`
(`invalid_request`) and `error_description` when the request or its token is refused; every answer
`Cache-Control: no-store`. A store we cannot reach (or issuer keys we cannot fetch) is 503 with
`Retry-After`, as every unavailable answer of ours: the logout did not take effect and the provider
may try again.

The provider reaches this endpoint directly on the verifier's HTTP listener, as an SSF transmitter
reaches `POST /v1/ssf/events`; the shipped gateway configurations do not route it.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping

from verifier.doors.refusals import STATUS_BY_OUTCOME, retry_after
from verifier.doors.routes import HttpAnswer, HttpRequest, Router
from verifier.errors import Outcome, ProviderUnavailable, StateUnavailable
from verifier.revocation.logout import MALFORMED, MAX_LOGOUT_TOKEN_BYTES, BackchannelLogout, LogoutRefused

LOGOUT_PATH = "/v1/backchannel-logout"
FORM = "application/x-www-form-urlencoded"
MAX_FORM_BYTES = 3 * MAX_LOGOUT_TOKEN_BYTES + 1024  # bytes: the token percent-encoded at worst, and a little more
MAX_FORM_FIELDS = 16  # parameters in the body; the provider sends one
INVALID_REQUEST = "invalid_request"  # section 2.8, from OAuth 2.0's error registry
NO_STORE = (("cache-control", "no-store"),)


def add_logout_routes(router: Router, logout: BackchannelLogout) -> None:
    """Adds `POST /v1/backchannel-logout` (the root calls it when an issuer has `backchannel_logout`)."""

    async def receive(request: HttpRequest, _: Mapping[str, str]) -> HttpAnswer:
        try:
            token = logout_token(request)
        except LogoutRefused as exc:
            logout.refused(exc)
            return _error(exc.description)
        try:
            await logout.receive(token)
        except LogoutRefused as exc:
            return _error(exc.description)
        except (StateUnavailable, ProviderUnavailable) as exc:  # the store, or the issuer's keys after a failed fetch
            return HttpAnswer.json(
                STATUS_BY_OUTCOME[Outcome.UNAVAILABLE],
                {"error": "temporarily_unavailable"},
                (("retry-after", retry_after(exc)),),
            )
        return HttpAnswer(200, NO_STORE)

    router.add("POST", LOGOUT_PATH, receive)


def logout_token(request: HttpRequest) -> str:
    """The one `logout_token` of a strictly parsed form body; raises `LogoutRefused(malformed)`."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != FORM:
        raise LogoutRefused(MALFORMED, f"Content-Type must be {FORM}")
    if len(request.body) > MAX_FORM_BYTES:
        raise LogoutRefused(MALFORMED, "body too large")
    try:
        text = request.body.decode("ascii")
        fields = urllib.parse.parse_qsl(
            text, keep_blank_values=True, strict_parsing=True, errors="strict", max_num_fields=MAX_FORM_FIELDS
        )
    except (UnicodeDecodeError, ValueError) as exc:  # not ASCII, a pair without '=', bad UTF-8, too many
        raise LogoutRefused(MALFORMED, "body is not a form") from exc
    tokens = [value for name, value in fields if name == "logout_token"]
    if len(tokens) != 1:  # RFC 6749 section 3.1: a parameter sent twice is an error, not a choice
        raise LogoutRefused(MALFORMED, "exactly one logout_token is required")
    if not tokens[0]:
        raise LogoutRefused(MALFORMED, "logout_token is empty")
    return tokens[0]


def _error(description: str) -> HttpAnswer:
    """Section 2.8: 400 with a JSON `error` (and `error_description`); `HttpAnswer.json` adds no-store."""
    return HttpAnswer.json(400, {"error": INVALID_REQUEST, "error_description": description})
