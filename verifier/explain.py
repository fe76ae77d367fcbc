"""`verifier explain`: one decision made by the service's own pipeline, and why.

It builds the real `App` from a config file, fetches each issuer's keys through discovery as the
service does, runs one request through `Pipeline.decide` and listens to the pipeline's trace hook.
Nothing here decides anything: the report describes the steps the pipeline reported and the answer it
gave (status, reason code, WWW-Authenticate, reuse lifetime) and the headers of the forward-auth answer
as the door writes them (`Decision.http_head`, read back: no second writer of answer headers), each with
whom it is for. The token is never printed: only its fingerprint (verifier.observe.audit) and the claims
the checks looked at; nor is an identity assertion for the upstream (a bearer credential too).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
from collections.abc import Mapping
from typing import Any

from verifier.app import App
from verifier.decision import Decision
from verifier.doors.forward_auth import X_FORWARDED, attributes_from_http
from verifier.errors import ClaimInvalid, VerifierError
from verifier.observe.audit import fingerprint, token_hash
from verifier.policy.rules import AMBIGUOUS, CompiledPolicy
from verifier.principal import Principal
from verifier.request import Undescribed
from verifier.settings import IssuerSettings, Settings
from verifier.tokens import jws

KEYS_GRACE_SECONDS = 2.0  # beyond the slowest issuer's fetch timeout, before reporting keys missing

# The token checks in the order verifier/tokens/jwt.py runs them (its docstring), each with the codes
# its refusal carries. The pipeline stops at the first failure: the ones before it passed.
TOKEN_CHECKS: tuple[tuple[str, frozenset[str]], ...] = (
    ("syntax", frozenset({"token_malformed", "invalid_token", "token_missing", "invalid_request"})),
    ("issuer", frozenset({"issuer_unknown", "tenant_not_allowed"})),
    ("algorithm", frozenset({"algorithm_refused"})),
    ("key", frozenset({"key_unknown", "provider_unavailable"})),
    ("signature", frozenset({"signature_invalid"})),
    ("typ", frozenset({"token_type_invalid"})),
    ("exp", frozenset({"token_expired"})),
    ("nbf/iat", frozenset({"token_not_yet_valid"})),
    ("sub", frozenset()),
    ("aud", frozenset({"audience_mismatch"})),
)
# The claims jwt.check_claims reads beside each step: `auth_time` with the times, the session and client claims
# with `sub` (who the token names). A claim the issuer's `tenant_claim` names is the issuer step's.
_CLAIM_CHECK = {
    "exp": "exp", "nbf": "nbf/iat", "iat": "nbf/iat", "auth_time": "nbf/iat",
    "sub": "sub", "sid": "sub", "client_id": "sub", "azp": "sub", "aud": "aud",
}


def _after_token_step(code: str) -> str:
    """Which step after the token check a refusal code comes from (pipeline order: `Pipeline._decide`)."""
    if code in ("issuer_not_trusted", "audience_not_trusted", "client_not_allowed"):
        return "route trust"
    if "revoked" in code:
        return "revocation"
    if code.startswith(("dpop_", "certificate_")) or code in ("sender_constraint_failed", "token_not_dpop_bound"):
        return "sender constraint"
    if code in ("role_missing", "scope_missing", "insufficient_user_authentication", "route_not_allowed", "forbidden"):
        return "policy"
    if code.startswith("webauthn_"):
        return "step-up"
    if code == "rate_limited":
        return "rate limit"
    return "decision"


@dataclasses.dataclass(frozen=True)
class Check:
    """One check: passed, failed or not run, with what it looked at."""

    step: str
    result: str  # passed | failed | not run
    detail: str = ""


@dataclasses.dataclass
class Report:
    """What `verifier explain` prints."""

    request: dict[str, str]
    token: dict[str, Any]
    checks: list[Check]
    route: dict[str, Any]
    principal: dict[str, Any] | None
    answer: dict[str, Any]
    notes: list[str]

    def as_json(self) -> dict[str, Any]:
        """The report for scripts."""
        return {
            "request": self.request,
            "token": self.token,
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "route": self.route,
            "principal": self.principal,
            "answer": self.answer,
            "notes": self.notes,
        }

    def as_text(self) -> str:
        """The report for people."""
        r = self.request
        lines = [f"request   {r['method']} {r['host']}{r['path']}"]
        t = self.token
        lines.append(f"token     fingerprint {t['fingerprint']}, {t['bytes']} bytes, {t['kind']}")
        if t.get("issuer"):
            lines.append(f"issuer    {t['issuer']}")
        if t.get("alg") or t.get("kid"):
            lines.append(
                f"key       kid {t.get('kid')!s}, alg {t.get('alg')}"
                + (f", from {t['jwks_uri']}" if t.get("jwks_uri") else "")
            )
        lines.append(f"route     {self.route['summary']}")
        lines.append("checks")
        lines.extend(f"  {c.result:<8}  {c.step:<17} {c.detail}".rstrip() for c in self.checks)
        if self.principal is not None:
            p = self.principal
            roles, scopes = ", ".join(p["roles"]), ", ".join(p["scopes"])
            lines.append(f"identity  subject {p['subject']!r}, roles [{roles}], scopes [{scopes}]")
        a = self.answer
        lines.append(f"answer    {a['status']} {a['reason']}" + (" (allowed)" if a["allowed"] else " (refused)"))
        if a.get("www_authenticate"):
            lines.append(f"          WWW-Authenticate: {a['www_authenticate']}")
        if a["allowed"]:  # what the gateway is told, as the forward-auth door writes it
            lines.append("headers   of the answer, to the upstream unless said")
            lines.extend(f"          {h['name']}: {h['value']}{_FOR[h['for']]}" for h in a["headers"])
        lines.append(
            f"reuse     max-age={a['max_age']} (a gateway may reuse this answer for {a['max_age']} s)"
            if a["max_age"] > 0
            else "reuse     no-store (a gateway must ask again every time)"
        )
        lines.extend(f"note      {n}" for n in self.notes)
        return "\n".join(lines)


def _when(value: Any, now: float) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return repr(value)
    stamp = datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    delta = int(value - now)
    return f"{stamp} ({'in ' + str(delta) + ' s' if delta >= 0 else str(-delta) + ' s ago'})"


def _token_details(
    parsed: jws.CompactJWS | None, issuer: IssuerSettings | None, app: App, now: float
) -> dict[str, str]:
    """What each token check looked at, from the parsed token and the configuration."""
    if parsed is None:
        return {"syntax": "not a valid compact JWS"}
    claims, header = parsed.payload, parsed.header
    iss = claims.get("iss")
    details = {
        "syntax": "compact JWS",
        "issuer": f"{iss!r}" + (" is configured" if issuer else " is not a configured issuer"),
        "typ": f"typ {header.get('typ')!r}",
        "exp": f"exp {_when(claims.get('exp'), now)}",
        "nbf/iat": f"nbf {_when(claims.get('nbf'), now)}, iat {_when(claims.get('iat'), now)}"
        if "nbf" in claims
        else f"iat {_when(claims.get('iat'), now)}",
        "sub": ", ".join(f"{name} {claims.get(name)!r}" for name in ("sub", "sid", "client_id", "azp")
                         if name == "sub" or name in claims),
        "aud": f"aud {claims.get('aud')!r}",
    }
    if issuer is not None:
        keys = app.keys.get(iss) if isinstance(iss, str) else None  # a template's tenant: its own keys
        held = ", ".join(str(k) for k in keys.kids) if keys is not None else ""
        details["algorithm"] = f"{parsed.alg}; allowed: {', '.join(issuer.algorithms)}"
        details["key"] = f"kid {parsed.kid!r}; held: {held or 'none'}"
        details["signature"] = parsed.alg
        details["exp"] += f"; leeway {issuer.leeway_seconds} s"
        details["aud"] += f"; accepted: {', '.join(issuer.audiences)}"
    return details


def _token_checks(error: VerifierError | None, details: Mapping[str, str], tenant_claim: str = "") -> list[Check]:
    failed = ""
    if error is not None:
        failed = next((name for name, codes in TOKEN_CHECKS if error.code in codes), "")
        if isinstance(error, ClaimInvalid):
            failed = "issuer" if tenant_claim and error.claim == tenant_claim else _CLAIM_CHECK.get(error.claim, failed)
        failed = failed or "syntax"
    checks, reached = [], True
    for name, _ in TOKEN_CHECKS:
        if name == failed:
            assert error is not None
            checks.append(Check(name, "failed", f"{details.get(name, '')}: {error.code} ({error.description})"))
            reached = False
        else:
            checks.append(Check(name, "passed" if reached else "not run", details.get(name, "")))
    return checks


def _introspection_check(principal: Principal | None, error: VerifierError | None) -> Check:
    if principal is not None:
        return Check("introspection", "passed", f"active, issuer {principal.issuer}")
    if error is not None:
        return Check("introspection", "failed", f"{error.code} ({error.description})")
    return Check("introspection", "not run")


def _policy_summary(policy: CompiledPolicy) -> str:
    match = {
        "methods": sorted(policy.methods),
        "hosts": sorted(policy.hosts),
        "path": policy.path,
        "path_prefix": policy.path_prefix,
    }
    shown = ", ".join(f"{k} {v}" for k, v in match.items() if v)
    require = [
        f"{k} [{', '.join(v)}]" if isinstance(v, tuple) else f"{k} {v}"
        for k, v in dataclasses.asdict(policy.require).items()
        if v not in ((), "", None) and k != "authenticated"
    ]
    if not policy.require.authenticated:
        require.insert(0, "no token (anonymous allowed)")
    return f"policy {policy.name!r} ({shown or 'every request'}) requires {'; '.join(require) or 'a valid token'}"


def _assertion_header(settings: Settings) -> str:
    identity = settings.upstream.identity_token if settings.upstream is not None else None
    return identity.header if identity is not None else ""


# Whom a header of the forward-auth answer is for (`Decision`'s fields); the rest is for the gateway itself.
UPSTREAM, KONG, CLIENT, GATEWAY = "upstream", "kong", "client", "gateway"


def _assertion(value: str) -> str:
    """An identity assertion as shown: a bearer credential for the upstream, never printed (like the token)."""
    return f"<identity assertion, {len(value)} bytes, {fingerprint(token_hash(value))}>"


def _answer_headers(decision: Decision, assertion_header: str) -> list[dict[str, str]]:
    """The forward-auth door's answer headers for `decision`, read back from the head it writes, each with
    whom it is for; the identity assertion's value replaced by its fingerprint."""
    lines = decision.http_head.decode("utf-8").split("\r\n")[1:]  # after the status line
    if decision.allowed:
        destinations = [(decision.upstream_headers, UPSTREAM), (decision.answer_headers, KONG),
                        (decision.client_headers, CLIENT)]
    else:
        destinations = [(decision.response_headers, CLIENT)]
    whose = {name.lower(): who for headers, who in destinations for name, _ in headers}
    shown = []
    for line in lines:
        if not line:
            continue
        name, _, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if decision.allowed and assertion_header and name.lower() == assertion_header.lower():
            value = _assertion(value)
        shown.append({"name": name, "value": value, "for": whose.get(name.lower(), GATEWAY)})
    return shown


_FOR = {
    UPSTREAM: "",
    KONG: " (for the Kong plugin, not the upstream)",
    CLIENT: " (for the client's answer)",
    GATEWAY: " (for the gateway)",
}


def _answer(decision: Decision, assertion_header: str = "") -> dict[str, Any]:
    headers = dict(decision.response_headers)
    upstream = dict(decision.upstream_headers) if decision.allowed else {}
    if assertion_header in upstream:  # a bearer credential for the upstream: never printed, like the token
        upstream[assertion_header] = _assertion(upstream[assertion_header])
    return {
        "allowed": decision.allowed,
        "status": decision.status,
        "reason": decision.reason,
        "www_authenticate": headers.get("www-authenticate", ""),
        "response_headers": headers,
        "upstream_headers": upstream,
        "answer_headers": dict(decision.answer_headers) if decision.allowed else {},  # for the Kong plugin
        "max_age": decision.cache_max_age,
        # the forward-auth answer's header fields, in order; the gRPC answers carry the upstream, Kong and client
        # ones as fields (`cache_max_age_seconds` for reuse), Envoy's the upstream and client ones
        "headers": _answer_headers(decision, assertion_header),
    }


async def explain(
    settings: Settings,
    authorization: str,
    *,
    method: str = "GET",
    host: str = "",
    path: str = "/",
    scheme: str = "http",
    dpop: str = "",
) -> Report:
    """Runs one decision through the service's pipeline and reports each step; `dpop`: the request's DPoP
    proof (RFC 9449), never printed either."""
    app = App(settings)
    steps: list[tuple[str, Mapping[str, Any]]] = []
    app.pipeline.trace = lambda step, details: steps.append((step, details))
    notes: list[str] = []
    headers = {
        "authorization": authorization,
        "x-forwarded-uri": path,
        "x-forwarded-method": method,
        "x-forwarded-proto": scheme,
    }
    if host:
        headers[X_FORWARDED.host] = host
    if dpop:
        headers["dpop"] = dpop
    token = authorization.split(" ", 1)[1] if " " in authorization else authorization
    try:  # as the forward-auth door reads a check, refusing one that tells no host when policies name hosts
        attrs = attributes_from_http(
            method, b"/v1/forward-auth", headers, "127.0.0.1", hosts_named=app.forward_auth.hosts_named
        )
    except Undescribed as untold:  # the doors' refusal, before any check: no keys to fetch for it
        try:
            return _untold(app, settings, method.upper(), path, token, app.pipeline.undescribed(untold.missing))
        finally:
            await app.stop(grace=0)
    app.keys.start()
    try:
        wait = max((i.fetch_timeout_seconds for i in settings.issuers), default=5.0) + KEYS_GRACE_SECONDS
        try:
            await asyncio.wait_for(app.keys.wait_ready(), wait)
        except TimeoutError:
            missing = [i for i, k in app.keys.issuers.items() if not k.ready.is_set()]
            notes.append(f"keys not loaded for {', '.join(missing)}: the service would report NOT_SERVING")
        if app.revocation is not None:
            try:
                await asyncio.wait_for(app.revocation.start(), wait)
            except Exception as exc:  # reported, not raised: the decision is still worth seeing
                reason = type(exc).__name__
                notes.append(f"revocation entries not loaded ({reason}): the service answers 503 until they are")
        decision = await app.pipeline.decide(attrs, "explain")
        if any(name == "ratelimit" for name, _ in decision.client_headers + decision.response_headers):
            shared = settings.state is not None and settings.state.redis_url
            notes.append("RateLimit counts this request: explain took one from the identity's budget "
                         + ("(the service's, in Redis)" if shared else "(its own, in memory)"))
        now = app.clock.now()
        report = _report(app, settings, attrs.method, attrs.host, attrs.path, token, decision, steps, now)
    finally:
        await app.stop(grace=0)
    report.notes.extend(notes)
    return report


def _report(
    app: App,
    settings: Settings,
    method: str,
    host: str,
    path: str,
    token: str,
    decision: Decision,
    steps: list[tuple[str, Mapping[str, Any]]],
    now: float,
) -> Report:
    token_event = next((d for s, d in steps if s == "token"), None)
    route_event = next((d for s, d in steps if s == "route"), None)
    refusals = [d["error"] for s, d in steps if s == "refused"]
    token_info, parsed, issuer = _token_info(app, settings, token)
    principal: Principal | None = token_event.get("principal") if token_event else None
    token_error: VerifierError | None = token_event.get("error") if token_event else None
    if token_event is None and refusals:
        token_error = refusals[0]  # refused before any verification: no token, or not a token at all
    if token_info["kind"] == "opaque":  # RFC 7662: the provider's answer is the whole token check
        checks = [_introspection_check(principal, token_error)]
    else:
        tenant_claim = issuer.tenant_claim if issuer is not None else ""
        checks = _token_checks(token_error, _token_details(parsed, issuer, app, now), tenant_claim)
    policy = route_event["policy"] if route_event else None
    if settings.policies is None:
        summary = "no route policies configured: any valid token is allowed"
    elif policy is None:
        summary = "no policy matches this request: refused (route_not_allowed)"
    elif policy is AMBIGUOUS:
        summary = "the path, host or method reads as routes of different policies: refused (invalid_request)"
        policy = None
    else:
        summary = _policy_summary(policy)
    if principal is not None:
        checks.extend(_after_token_checks(settings, principal, policy, decision, refusals))
    return Report(
        request={"method": method, "host": host, "path": path},
        token=token_info,
        checks=checks,
        route={"policy": policy.name if policy else None, "summary": summary},
        principal={
            "issuer": principal.issuer,
            "subject": principal.subject,
            "client_id": principal.client_id,
            "roles": sorted(principal.roles),
            "scopes": list(principal.scopes),
            "expires_at": principal.expires_at,
        }
        if principal is not None
        else None,
        answer=_answer(decision, _assertion_header(settings)),
        notes=[],
    )


def _token_info(
    app: App, settings: Settings, token: str
) -> tuple[dict[str, Any], jws.CompactJWS | None, IssuerSettings | None]:
    """What the report says of the token (never the token itself): its fingerprint, kind, issuer and key; the
    parsed token and its configured issuer, for the checks' details."""
    parsed = None
    if jws.looks_like_jws(token):
        try:
            parsed = app.jwt.parse(token)
        except VerifierError:
            parsed = None
    iss = parsed.payload.get("iss") if parsed is not None else None
    configured = app.keys.configured(iss) if isinstance(iss, str) else ""  # a tenant's: its template
    issuer = next((i for i in settings.issuers if i.issuer == (configured or iss)), None)
    keys = app.keys.get(iss) if issuer is not None and isinstance(iss, str) else None
    token_info: dict[str, Any] = {
        "fingerprint": fingerprint(token_hash(token)),
        "bytes": len(token.encode()),
        "kind": "JWT" if parsed is not None else ("opaque" if app.introspectors else "unparseable"),
        "issuer": iss if isinstance(iss, str) else "",
        "kid": parsed.kid if parsed is not None else None,
        "alg": parsed.alg if parsed is not None else "",
        "jwks_uri": (keys.metadata.get("jwks_uri") or issuer.jwks_uri) if keys is not None and issuer else "",
    }
    return token_info, parsed, issuer


def _untold(app: App, settings: Settings, method: str, path: str, token: str, decision: Decision) -> Report:
    """The report of a request that tells no host when policies name hosts: every door refuses such a check
    (`verifier.request.Undescribed`, 400 `invalid_request`) before the token or any policy is looked at."""
    token_info, parsed, issuer = _token_info(app, settings, token)
    details = _token_details(parsed, issuer, app, app.clock.now())
    why = "no host, and the policies name hosts: the doors refuse a check that tells none (pass --host)"
    return Report(
        request={"method": method, "host": "", "path": path},
        token=token_info,
        checks=[Check("request", "failed", f"{why}: {decision.reason}")]
        + [Check(name, "not run", details.get(name, "")) for name, _ in TOKEN_CHECKS],
        route={"policy": None, "summary": "not matched: the request tells no host (pass --host)"},
        principal=None,
        answer=_answer(decision, _assertion_header(settings)),
        notes=[],
    )


def _after_token_checks(
    settings: Settings,
    principal: Principal,
    policy: CompiledPolicy | None,
    decision: Decision,
    refusals: list[VerifierError],
) -> list[Check]:
    """The checks after the token's own, in the pipeline's order, for the ones that apply."""
    cnf = principal.claims.get("cnf")
    steps = []
    if policy is not None and policy.trusts:  # checks.trust.RouteTrust runs first
        narrowed = (("issuers", policy.issuers), ("audiences", policy.audiences), ("clients", policy.clients))
        trusted = [f"{name} [{', '.join(sorted(values))}]" for name, values in narrowed if values]
        steps.append(("route trust", "; ".join(trusted)))
    if settings.revocation is not None:
        steps.append(("revocation", "no revocation entry for this token or subject"))
    if cnf or (policy is not None and policy.require.sender_constraint):
        steps.append(("sender constraint", f"cnf {sorted(cnf) if isinstance(cnf, dict) else None}"))
    if policy is not None:
        steps.append(("policy", f"roles [{', '.join(sorted(principal.roles))}], scopes [{principal.scope}]"))
        if policy.require.step_up:
            steps.append(("step-up", f"{policy.require.step_up} assertion"))
    if settings.rate_limits is not None:
        steps.append(("rate limit", "per-identity bucket"))
    error = refusals[-1] if refusals and not decision.allowed else None
    failed = _after_token_step(error.code) if error is not None else ""
    if failed and failed not in (name for name, _ in steps):
        steps.append((failed, ""))
    checks, reached = [], True
    for name, detail in steps:
        if name == failed and error is not None:
            checks.append(Check(name, "failed", f"{detail}: {error.code} ({error.description})".lstrip(": ")))
            reached = False
        else:
            checks.append(Check(name, "passed" if reached else "not run", detail))
    return checks


def render(report: Report, *, as_json: bool) -> str:
    """The report as text or JSON."""
    return json.dumps(report.as_json(), indent=2, default=str) if as_json else report.as_text()
