"""How a catalogued refusal is answered: the one mapping to HTTP and the one mapping to gRPC.

HTTP: `refuse()` builds the gateway's answer (status, challenge, JSON body) for every door: RFC 6750
section 3 for Bearer, RFC 9449 section 7.1 for DPoP, RFC 9470 for step-up; `endpoint_answer()` is the
same answer from one of our own endpoints (WebAuthn, the admin API). No handler builds a refusal of
its own.

gRPC: `grpc_code()` is the status of Envoy's `CheckResponse` for a refusal (Envoy allows on OK only and
answers the client with `denied_response`, which carries the HTTP answer); our own proto carries
the HTTP status in `http_status`. A refusal whose outcome is `OVERLOADED` is not answered at all: the
call fails with RESOURCE_EXHAUSTED (`sheds()`), so a client backs off.

`python -m verifier.doors.refusals` prints the README's answer table (`answer_table()`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

from verifier.decision import Decision
from verifier.doors.routes import HttpAnswer
from verifier.errors import BucketStoreFull, MalformedRequest, ReplayStoreFull, VerifierError
from verifier.reasons import ALLOW, CATALOGUE, Outcome, Reason, Scheme

STATUS_BY_OUTCOME = {
    Outcome.UNAUTHENTICATED: 401,
    Outcome.FORBIDDEN: 403,
    Outcome.RATE_LIMITED: 429,
    Outcome.UNAVAILABLE: 503,
    Outcome.OVERLOADED: 503,
    Outcome.BAD_REQUEST: 400,
    Outcome.NOT_FOUND: 404,
    Outcome.CONFLICT: 409,
}
# google.rpc.Code numbers (the standard gRPC status codes).
GRPC_OK = 0
GRPC_CODE_BY_OUTCOME = {
    Outcome.UNAUTHENTICATED: 16,  # UNAUTHENTICATED
    Outcome.FORBIDDEN: 7,  # PERMISSION_DENIED
    Outcome.RATE_LIMITED: 8,  # RESOURCE_EXHAUSTED
    Outcome.UNAVAILABLE: 14,  # UNAVAILABLE
    Outcome.OVERLOADED: 8,  # RESOURCE_EXHAUSTED (the call itself fails: see sheds())
    Outcome.BAD_REQUEST: 3,  # INVALID_ARGUMENT
    Outcome.NOT_FOUND: 5,  # NOT_FOUND
    Outcome.CONFLICT: 6,  # ALREADY_EXISTS
}
GRPC_NAMES = {0: "OK", 3: "INVALID_ARGUMENT", 5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED",
              8: "RESOURCE_EXHAUSTED", 14: "UNAVAILABLE", 16: "UNAUTHENTICATED"}  # fmt: skip
RETRY_AFTER_UNAVAILABLE = "1"  # seconds; providers usually come back quickly or not at all
_FAIL_CLOSED = frozenset({Outcome.UNAVAILABLE, Outcome.OVERLOADED})
# About a body or a resource of our own endpoints, not the credential: no challenge unless the code is
# an RFC 6750 error (then it is about the Authorization header).
_DOCUMENT = frozenset({Outcome.BAD_REQUEST, Outcome.NOT_FOUND, Outcome.CONFLICT})


def _quoted(text: str, limit: int = 200) -> str:
    """Keeps only the characters RFC 6750 section 3 allows inside a quoted value (error_description: 200)."""
    return "".join(c for c in text if c in _SAFE)[:limit]


_SAFE = frozenset(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\')


def challenge(scheme: Scheme, realm: str, params: dict[str, str | int]) -> str:
    """A `WWW-Authenticate` value: `Scheme realm="...", key="value", n=5`."""
    parts = [f'realm="{_quoted(realm)}"']
    # Only the description is cut short: a URL or a scope list cut short would send the client astray.
    parts += [
        f"{k}={v}" if isinstance(v, int) else f'{k}="{_quoted(v, 200 if k == "error_description" else 2048)}"'
        for k, v in params.items()
    ]
    return f"{scheme.value} " + ", ".join(parts)


def retry_after(error: Exception) -> str:
    """The `Retry-After` of an unavailable answer: a full replay store knows when its purpose has room again, and
    Redis's buckets at their bound when their oldest counted ones expire; anything else,
    `RETRY_AFTER_UNAVAILABLE`. Every answer that fails closed (the gateway's, the SSF and logout endpoints')
    asks here."""
    if isinstance(error, ReplayStoreFull | BucketStoreFull):
        return str(error.retry_after)
    return RETRY_AFTER_UNAVAILABLE


def refuse(
    error: VerifierError,
    *,
    realm: str,
    scheme: Scheme | None = None,
    dpop_algs: str = "",
    reusable_for: int = 0,
    route_params: tuple[tuple[str, str], ...] = (),
) -> Decision:
    """Maps a refusal to its answer: the only place that does.

    `scheme` overrides the error's own when it is Bearer (a request that came with DPoP is answered
    with a DPoP challenge, RFC 9449 section 7.1); `dpop_algs` lists the proof algorithms we accept;
    `route_params` are the route's `resource_metadata` (RFC 9728 section 5.1) and `scope` (RFC 6750
    section 3), added to every Bearer and DPoP challenge (step-up included), never to WebAuthn's.
    """
    outcome = error.outcome
    headers: list[tuple[str, str]] = []
    body: dict[str, object] = {}
    if outcome in _FAIL_CLOSED:
        headers.append(("retry-after", retry_after(error)))
        body = {"error": "temporarily_unavailable", "error_description": _quoted(error.description)}
    elif outcome is Outcome.RATE_LIMITED:
        body = {"error": "rate_limited", "error_description": _quoted(error.description)}
    elif outcome in _DOCUMENT and error.oauth_error is None:
        body = {"error": error.code, "error_description": _quoted(error.description)}
    else:
        used = error.scheme if error.scheme is not Scheme.BEARER else (scheme or Scheme.BEARER)
        params: dict[str, str | int] = {}
        if error.oauth_error is not None:
            params = {"error": error.oauth_error, "error_description": error.description}
            # A 400 names its own code (the same as its RFC 6750 error for a bad Authorization header).
            code = error.code if outcome in _DOCUMENT else error.oauth_error
            body = {"error": code, "error_description": _quoted(error.description)}
        params.update(error.challenge_params())
        if used is not Scheme.WEBAUTHN:
            params.update(route_params)
        if used is Scheme.DPOP and dpop_algs:
            params["algs"] = dpop_algs
        headers.append(("www-authenticate", challenge(used, realm, params)))
    headers.extend(error.extra_headers())
    body.update(error.extra_body())
    return Decision(
        allowed=False,
        status=STATUS_BY_OUTCOME[outcome],
        reason=error.code,
        response_headers=tuple(headers),
        body=json.dumps(body).encode() if body else b"",
        cache_max_age=reusable_for if error.reusable else 0,
    )


def endpoint_answer(error: VerifierError, *, realm: str) -> HttpAnswer:
    """The answer one of our own endpoints gives: the gateway's answer, never stored, with its reason."""
    decision = refuse(error, realm=realm)
    headers = list(decision.response_headers)
    if decision.body:
        headers.append(("content-type", "application/json"))
    headers += [("cache-control", "no-store"), ("x-verifier-reason", decision.reason)]
    return HttpAnswer(decision.status, tuple(headers), decision.body)


def outcome_of(decision: Decision) -> Outcome | None:
    """The catalogued outcome of a refusal (None for an allow)."""
    if decision.allowed:
        return None
    found = CATALOGUE.get(decision.reason)
    return found.outcome if found is not None else Outcome.UNAVAILABLE  # uncatalogued: fail closed


def grpc_code(decision: Decision) -> int:
    """The gRPC status of Envoy's `CheckResponse` for this decision (OK allows; anything else denies)."""
    outcome = outcome_of(decision)
    return GRPC_OK if outcome is None else GRPC_CODE_BY_OUTCOME[outcome]


def sheds(decision: Decision) -> bool:
    """Whether the gRPC call is refused outright (RESOURCE_EXHAUSTED) instead of answered."""
    return outcome_of(decision) is Outcome.OVERLOADED


def _row(r: Reason) -> str:
    decision = refuse(VerifierError(r.summary, code=r.code), realm="verifier")  # the answer itself
    challenge_header = dict(decision.response_headers).get("www-authenticate", "")
    error = f"`{r.oauth_error}`" if r.oauth_error else ""
    grpc = GRPC_NAMES[GRPC_CODE_BY_OUTCOME[r.outcome]] + (" (the call fails)" if sheds(decision) else "")
    reuse = "yes" if r.reusable else ""
    cells = (f"`{r.code}`", str(decision.status), challenge_header.partition(" ")[0], error, grpc, reuse, r.summary)
    return "| " + " | ".join(cells) + " |"


def answer_table() -> str:
    """The README's answer table, one row per catalogued code (generated: edit verifier/reasons.py)."""
    lines = [
        "| `X-Verifier-Reason` | status | challenge | `error` | Envoy gRPC status | reusable | when |",
        "|---|---|---|---|---|---|---|",
        f"| `{ALLOW}` | 200 | | | OK | | allowed |",
    ]
    lines += [_row(r) for r in CATALOGUE.values()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(answer_table(), end="")


JSON_MEDIA_TYPE = "application/json"  # a JSON POST's Content-Type, parameters (charset) aside


def not_json(headers: Mapping[str, str], *, realm: str) -> HttpAnswer | None:
    """415 (RFC 9110 section 15.5.16) with the catalogue's answer and reason, unless the request declares its body
    `application/json` (RFC 8259 section 11); None when it does. For our endpoints taking a JSON POST (the kill
    switch, WebAuthn registration): a browser sends a cross-site form (`text/plain`, urlencoded, multipart) without
    a preflight, and one whose body is JSON must not reach them."""
    if headers.get("content-type", "").split(";", 1)[0].strip().lower() == JSON_MEDIA_TYPE:
        return None
    answer = endpoint_answer(MalformedRequest(f"Content-Type must be {JSON_MEDIA_TYPE}"), realm=realm)
    return dataclasses.replace(answer, status=415)
