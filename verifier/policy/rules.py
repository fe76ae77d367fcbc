"""Route policies: first match wins; an unmatched route is refused once any policy exists.

Matching normalizes the path first (percent-decoding, `//`, dot segments), so `//admin` and `/%61dmin` meet the
`/admin` policy instead of slipping past it to a laxer one; a path whose other readings (an upstream's that keeps what
normalizing drops: dot segments, `#`, `;parameters`, case; or drops a format suffix, or trims white space from a
segment; `other_readings`; or adds a trailing slash) meet another policy is refused as ambiguous (`/./admin`,
`/admin/x/../../health`, `/admin/users.json`, `/admin/users%20`, `/admin` beside a `path_prefix: /admin/`); so is a
POST whose `_method` query parameter (Symfony, Laravel) names a method under another policy.
Requirements are checked in an order that gives the client the most useful answer: authorization
(roles, scopes: 403) before assurance (amr/acr/auth_time: an RFC 9470 step-up 401) before the
sender constraint (a DPoP/mTLS 401).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import posixpath
import re
import urllib.parse
from collections.abc import Sequence

from verifier.config.base import ConfigError
from verifier.config.policy import PolicySettings, Requirements, RouteMatch
from verifier.config.resource import ProtectedResourceConfig
from verifier.config.upstream import RouteUpstream
from verifier.errors import Forbidden, InsufficientUserAuthentication, Scheme, SenderConstraintFailed
from verifier.numbers import json_number
from verifier.policy.metadata import challenge_params
from verifier.principal import Principal
from verifier.request import RequestAttributes, a_label, host_name, normalize_host


def normalize_path(path: str, *, backslash_is_slash: bool = True) -> str:
    """The path (no query) as the upstream will most likely resolve it, for matching only (a backslash a
    separator, as IIS reads it, unless `backslash_is_slash` is false)."""
    raw = path.split("?", 1)[0].split("#", 1)[0]
    decoded = urllib.parse.unquote(raw)
    if backslash_is_slash:
        decoded = decoded.replace("\\", "/")
    return _resolved(decoded)


def _resolved(decoded: str) -> str:
    """`decoded` (a decoded path) with its dot segments resolved and its `//` collapsed, its trailing slash kept."""
    if not decoded.startswith("/"):
        decoded = "/" + decoded
    normal = posixpath.normpath(decoded)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    if decoded.endswith("/") and not normal.endswith("/"):
        normal += "/"
    return normal


def other_readings(path: str, normal: str) -> set[str]:
    """The other ways an upstream may read `path` (no query; `normal`: `normalize_path(path)`), normalized
    as `normalize_path` (but the dot segments some keep); empty for a lower-case path without `#`, `;`, `%25`, a
    backslash or a dot segment, which every upstream reads one way.

    - A `#` never belongs in a request-target (RFC 9112 section 3.2), yet nginx passes it on: one upstream
      drops what follows as a fragment (`normalize_path` does), another keeps it in the path and resolves
      the dot segments after it (Go's `path.Clean` of `URL.Path`): `/health#/../admin` is /admin to it.
    - Servlet containers (Tomcat, Jetty, Spring) drop a segment's `;parameters` before resolving dot
      segments: `/x/..;/admin` is /admin to them, a segment named `..;` to everyone else.
    - Express, ASP.NET Core and IIS route case-blind: `/ADMIN` is /admin to them, and to ASP.NET Core `/adm\u0131n`
      (dotless i) and `/\u017ftaff` (long s) are /admin and /staff (`_case_blind`).
    - An application that decodes the path its framework already decoded reads `/%2561dmin` as /admin.
    - Raw bytes beyond ASCII, which nginx passes on and the forward-auth door reads as latin-1, are UTF-8 to ASP.NET
      Core, servlet containers and Go (`_bytes_as_utf8`): `/adm\xc4\xb1n` is their /adm\u0131n, folded to /admin.
    - IIS (http.sys, `PercentUAllowed` on by default) and ASP.NET's `HttpUtility.UrlDecode` decode `%uNNNN`:
      `/%u0061dmin` is /admin to them, a segment of its own to everyone else (nginx and Kong refuse it, Envoy passes
      it on as sent).
    - IIS reads a backslash (`\\` or `%5C`) as `/` (`normalize_path` does); every other server takes it as a
      byte of its segment: `/admin/x\\..\\..\\health` is /health to IIS, under /admin to Go's ServeMux or an
      Express mount.
    - Servers and gateways resolve dot segments (`..`, `%2e%2e`; RFC 3986 section 5.2.4, `normalize_path` does), but
      Express mounts and Flask (Werkzeug) routes match the target as it came, and nginx and Kong pass it on as it
      came: `/admin/x/../../health` is /health to the first, under /admin to the others.
    (A format suffix some drop, `/admin/users.json`, is `_formats_dropped`'s; white space some trim from a segment,
    `/admin/users%20`, `_white_space_trimmed`'s.)
    """
    readings: set[str] = set()
    variants = {path}
    if "#" in path or ";" in path or "%25" in path or "%u" in path or "%U" in path:
        variants = {path, path.replace("#", "%23")}  # the fragment dropped (normalize_path), or kept as data
        variants |= {_PATH_PARAMETERS.sub("", v) for v in variants}
        if "%25" in path:
            variants |= {urllib.parse.unquote(v.split("?", 1)[0]) for v in variants}  # decoded twice
        if any("%u" in v or "%U" in v for v in variants):
            variants |= {_PERCENT_U.sub(_percent_u_decoded, v) for v in variants}  # IIS's %uNNNN decoded
        readings = {normalize_path(v) for v in variants}
    if "\\" in path or "%5C" in path or "%5c" in path:
        readings |= {normalize_path(v, backslash_is_slash=False) for v in variants}
    if "." in path or "%2e" in path or "%2E" in path:
        unresolved = _dot_segments_kept(path)
        if unresolved is not None:
            readings.add(unresolved)
    if not path.isascii():
        utf8 = _bytes_as_utf8(path)
        if utf8 is not None:
            readings.add(utf8)
    if normal != _case_blind(normal) or any(r != _case_blind(r) for r in readings):
        readings |= {_case_blind(r) for r in readings} | {_case_blind(normal)}
    readings.discard(normal)
    return readings


def _case_blind(path: str) -> str:
    """`path` as a case-blind router compares it. ASCII: lower-cased. Beyond it, each character's simple upper case
    lower-cased, as .NET's `OrdinalIgnoreCase` (ASP.NET Core's routes) and Java's `equalsIgnoreCase` fold them:
    `/adm\u0131n` (dotless i) and `/\u017ftaff` (long s) are /admin and /staff there; `str.lower` leaves both."""
    if path.isascii():
        return path.lower()
    return "".join(_simple_fold(c) for c in path)


def _simple_fold(c: str) -> str:
    """One character's simple (one-character) upper case, then its simple lower case: Java's `equalsIgnoreCase` takes
    `\u0130` (I with a dot) for `i` too; `str.lower` gives it two characters (`i` and a combining dot)."""
    upper = c.upper()
    lower = (upper if len(upper) == 1 else c).lower()
    return lower[0] if len(lower) > 1 else lower


def _percent_u_decoded(escape: re.Match[str]) -> str:
    """One `%uNNNN` escape (`_PERCENT_U`) as the UTF-8 percent-encoding `normalize_path` decodes (`%u002f`: `%2F`); a
    lone surrogate (`%ud800`) as bytes that decode to U+FFFD."""
    return urllib.parse.quote(chr(int(escape[1], 16)), safe="", errors="surrogatepass")


def _method_overrides(query: str) -> set[str]:
    """The methods a POST's query tells the application to take it for instead, upper-cased as they do: Symfony and
    Laravel read `_method` from the query (when no X-HTTP-Method-Override header says one; every shipped gateway
    removes it), Express's method-override with a query getter (`methodOverride("_method")`) too. PHP names a query
    key as `_method` with its leading spaces dropped and a `.` or space within it made `_` (`.method`, `+_method`)."""
    overrides: set[str] = set()
    for key, value in urllib.parse.parse_qsl(query):  # an empty value overrides nothing
        if key.lstrip(" ").replace(".", "_").replace(" ", "_") == "_method":
            overrides.add(value.upper())
    return overrides


def _bytes_as_utf8(path: str) -> str | None:
    """`path` (no query) read as a server that decodes the target's bytes as UTF-8 reads it (ASP.NET Core, servlet
    containers, Go), normalized; None for a path that is not bytes. nginx passes raw bytes beyond ASCII on, and the
    forward-auth door reads them as latin-1 (one character a byte): `/adm\xc4\xb1n` stays two characters there,
    while those servers read the dotless i, as for `%C4%B1`, and fold it onto /admin. A path from a gRPC door is
    already characters (a protobuf string): a character beyond U+00FF says so."""
    try:
        raw = path.split("?", 1)[0].split("#", 1)[0].encode("latin-1")
    except UnicodeEncodeError:
        return None
    return _resolved(urllib.parse.unquote_to_bytes(raw).decode("utf-8", "replace").replace("\\", "/"))


def _dot_segments_kept(path: str) -> str | None:
    """`path` (decoded, no query) as an upstream that leaves its dot segments alone reads it; None when it has none.
    Express mounts and Flask routes match the target as sent: `/admin/x/../../health` is under /admin to them."""
    decoded = urllib.parse.unquote(path.split("?", 1)[0].split("#", 1)[0])
    if not any(segment in (".", "..") for segment in decoded.split("/")):
        return None
    return decoded if decoded.startswith("/") else "/" + decoded


def _formats_dropped(paths: set[str]) -> set[str]:
    """`paths` (normalized) without the format suffix of their last segment, for those that have one: Rails routes
    every path with an optional format (`/admin/users(.:format)`: from the last `.`, `/a/x.tar.gz` is /a/x.tar) and
    Spring MVC before 5.3 matched `/a/x.*` to an `/a/x` mapping (from the first `.`: /a/x). `/admin/users.json` is
    /admin/users to them, and an exact-path policy for /admin/users missed it: it fell to a laxer one. A `.` at the
    start of the segment is its name (`/.well-known`), not a format."""
    dropped: set[str] = set()
    for path in paths:
        head, _, last = path.rstrip("/").rpartition("/")  # Rails drops a trailing slash first
        first = last.find(".", 1)
        if first > 0:
            dropped |= {f"{head}/{last[:first]}", f"{head}/{last[: last.rindex('.')]}"}
    return dropped


def _white_space_trimmed(paths: set[str]) -> set[str]:
    """`paths` (normalized) with the white space at the start and end of each segment trimmed (what `str.strip`
    removes: space, tab, and the other Unicode white space), for those that have any, normalized again: Spring's
    AntPathMatcher with trimTokens (before 4.3) and others trim path segments, so `/admin/users%20` and `/%09admin`
    are /admin/users and /admin to them, while a policy for /admin/users missed the first and /admin the second."""
    trimmed: set[str] = set()
    for path in paths:
        segments = path.split("/")
        stripped = [segment.strip() for segment in segments]
        if stripped != segments:
            trimmed.add(_resolved("/".join(stripped)))
    return trimmed


_WHITE_SPACE = re.compile(r"\s")  # what `str.strip` removes (Unicode white space)
_PATH_PARAMETERS = re.compile(r";[^/]*")
_PERCENT_U = re.compile(r"%[uU]([0-9a-fA-F]{4})")  # IIS's escape of one UTF-16 code unit
MAX_ROUTE_MEMO = 4096  # (method, host, path) -> policy decisions remembered by `PolicySet.match`
_UNSEEN = object()


class StepUpRequired(InsufficientUserAuthentication):
    """RFC 9470 section 3: carries the acr_values / max_age the client must come back with."""

    def __init__(
        self,
        description: str,
        *,
        acr_values: Sequence[str] = (),
        max_age: int | None = None,
        authorization_endpoint: str = "",
    ) -> None:
        super().__init__(description)
        self.acr_values = tuple(acr_values)
        self.max_age = max_age
        self.authorization_endpoint = authorization_endpoint

    def challenge_params(self) -> dict[str, str | int]:
        """RFC 9470 section 3: acr_values and max_age tell the client what to ask the provider for."""
        params: dict[str, str | int] = {}
        if self.acr_values:
            params["acr_values"] = " ".join(self.acr_values)
        if self.max_age is not None:
            params["max_age"] = self.max_age
        return params

    def extra_body(self) -> dict[str, object]:
        """Where to step up, for clients that read the JSON body."""
        body: dict[str, object] = dict(self.challenge_params())
        if self.authorization_endpoint:
            body["authorization_endpoint"] = self.authorization_endpoint
        return body


class WebAuthnStepUpRequired(InsufficientUserAuthentication):
    """The route needs a request-bound WebAuthn assertion (handled by the WebAuthn step-up)."""

    code = "webauthn_assertion_required"


@dataclasses.dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """A policy with its match precomputed."""

    name: str
    hosts: frozenset[str]
    methods: frozenset[str]
    path_prefix: str
    path: str
    require: Requirements
    # Per-route trust, empty: the global rule (any configured issuer, its audiences, any client).
    issuers: frozenset[str] = frozenset()
    audiences: frozenset[str] = frozenset()  # `audiences_any` and the route's `resource` (RFC 8707)
    clients: frozenset[str] = frozenset()
    challenge: tuple[tuple[str, str], ...] = ()  # RFC 9728 `resource_metadata` and `scope` of its challenges
    upstream: RouteUpstream | None = None  # what this route's upstream receives, beyond `upstream`

    @property
    def trusts(self) -> bool:
        """Whether the route narrows whose tokens it takes (issuer, audience or client)."""
        return bool(self.issuers or self.audiences or self.clients)

    def matches(self, method: str, host: str, path: str) -> bool:
        """Whether this policy covers the (normalized) request; `host` is the name without its port."""
        if self.methods and method not in self.methods:
            return False
        if self.hosts and host not in self.hosts:
            return False
        if self.path and path != self.path and not _but_a_trailing_slash(path, self.path):
            return False
        return path.startswith(self.path_prefix)


def host_reading(host: str) -> str | None:
    """The name a policy is matched on for one host as a door reported it (`normalize_authority`: `name[:port]`),
    or None when it is not one: an upstream may read it as another host than the one judged.

    - A userinfo (`api.example.test:1@admin.example.test`; RFC 9110 section 4.2.4: http(s) has none) or any port
      but digits: the gateway (Envoy's `api.example.test:*`, a prefix) and the name before the first `:` say API
      host, an upstream reading the Host as a URL's authority (Python's urlsplit, WHATWG URL) the admin host.
    - Anything but a DNS name's characters or an IP literal (`%61dmin.example.test`, which a WHATWG URL decodes).
    - A name not ASCII is matched in its A-label (`a_label`, the form policies also hold): IDNA maps full-width
      and ideographic dots (U+FF0E, U+3002), full-width letters and Unicode case (`admin\u3002example\u3002test`) to
      the name a URL parser reads; one without an A-label is None.
    """
    host = normalize_host(host.strip())
    name = host_name(host)
    port = host[len(name) :]
    if port and not _PORT.fullmatch(port):
        return None
    if not name.isascii():
        name = a_label(name)
        if not name:
            return None
        name = name[:-1] if name.endswith(".") else name
    return ip_name(name) if _HOST_NAME.fullmatch(name) else None


def ip_name(name: str) -> str | None:
    """`name` (lower-case, a DNS name or an IP literal) with an address in one spelling; None for a number that is
    not a dotted quad. An IPv6 literal compressed (`[0:0::1]` is `[::1]`, RFC 5952). A name whose last label is a
    number (WHATWG URL's "ends in a number") is an IPv4 address to a URL parser, in any of inet_aton's spellings
    (`127.1`, `0x7f.1`, `2130706433`, `010.0.0.1` octal): only a dotted quad without leading zeros is one spelling."""
    if name.startswith("["):
        try:
            return f"[{ipaddress.IPv6Address(name[1:-1]).compressed}]"
        except ValueError:
            return None
    if not _NUMBER.fullmatch(name.rpartition(".")[2]):
        return name
    try:
        return str(ipaddress.IPv4Address(name))
    except ValueError:
        return None


_NUMBER = re.compile(r"[0-9]+|0x[0-9a-f]*")
_PORT = re.compile(r":[0-9]*")
_HOST_NAME = re.compile(r"[a-z0-9._~-]*|\[[0-9a-f:.]+\]")  # a DNS name (lower-cased) or an IP literal; "": no Host


def _but_a_trailing_slash(path: str, exact: str) -> bool:
    """`/admin/` for `/admin` and the reverse: Express (non-strict routing, its default) and Spring MVC before 6
    route both to the same handler, so an exact path that missed one would leave it to a laxer policy."""
    return len(path) > 1 and len(exact) > 1 and (path + "/" == exact or path == exact + "/")


def _hosts(hosts: Sequence[str]) -> frozenset[str]:
    """The host names a policy covers, an internationalized one also in the A-label form clients send (`bücher.example`
    written, `xn--bcher-kva.example` in `Host`): written as people write it, it met no request, and every request for
    it fell to a laxer policy."""
    names = {normalize_host(h) for h in hosts}
    names |= {a_label(n) for n in names}
    return frozenset({ip_name(n) or n for n in names} - {""})


def _methods(methods: Sequence[str]) -> frozenset[str]:
    """The methods a policy covers: GET's include HEAD. RFC 9110 section 9.3.2: HEAD is GET without the content, and
    Go's ServeMux, Express, Flask and Spring run the GET handler for it; a GET policy that HEAD missed would leave
    that handler (its status and headers) to a laxer policy."""
    return frozenset(methods) | {"HEAD"} if "GET" in methods else frozenset(methods)


#: What `PolicySet.match` returns for a path that upstreams may read as different routes (a 400).
AMBIGUOUS = CompiledPolicy(
    name="", hosts=frozenset(), methods=frozenset(), path_prefix="", path="", require=Requirements()
)


class PolicySet:
    """The configured policies, compiled once."""

    def __init__(
        self, policies: tuple[PolicySettings, ...] | None, default: ProtectedResourceConfig | None = None
    ) -> None:
        self.enabled = policies is not None
        default_resource = default.resource if default is not None else ""
        # Challenges with no route of their own (no policies, or a refusal before the route is known).
        self.default_challenge = challenge_params(default_resource, default.scopes_supported if default else ())
        self._policies = tuple(
            CompiledPolicy(
                name=p.name,
                hosts=_hosts(p.match.hosts),
                methods=_methods(p.match.methods),
                # Compared with normalized request paths, so normalized the same way: written with percent-encoding,
                # `//` or dot segments, a policy would meet no request and its requests would fall to a laxer one.
                path_prefix=normalize_path(p.match.path_prefix) if p.match.path_prefix else "",
                path=normalize_path(p.match.path) if p.match.path else "",
                require=p.require,
                issuers=frozenset(p.require.issuers_any),
                audiences=frozenset(p.require.audiences_any + ((p.resource,) if p.resource else ())),
                clients=frozenset(p.require.clients_any),
                challenge=challenge_params(p.resource or default_resource, p.scopes),
                upstream=p.upstream,
            )
            for p in policies or ()
        )
        self._memo: dict[tuple[str, str, str], CompiledPolicy | None] = {}

    def match(self, attrs: RequestAttributes) -> CompiledPolicy | None:
        """The first policy that covers the request (None: no policy matched; `AMBIGUOUS`: the readings of
        its host or path fall under different policies, so the request is refused).

        The doors normalized the host (`normalize_host`); a policy names hosts, not ports, so
        `admin.example.test:443` and `:8443` meet the policy for `admin.example.test`. A POST whose query names
        another method (`_method_overrides`) under another policy is `AMBIGUOUS` too.
        """
        method, host = attrs.method, attrs.host
        path, _, query = attrs.path.partition("?")
        policy = self._memo.get((method, host, path), _UNSEEN)
        if policy is _UNSEEN:
            policy = self._route(method, host, path)
        if query and "POST" in method and ("method" in query or "%" in query):  # `POST, POST` too (`_route`)
            for override in _method_overrides(query):
                if self._route(override, host, path) is not policy:
                    return AMBIGUOUS
        return policy  # type: ignore[return-value]

    def _route(self, method: str, host: str, path: str) -> CompiledPolicy | None:
        """`match` of (method, host, path before the query): remembered in a bounded memo, so a gateway's repeated
        routes skip the normalization and the scan."""
        key = (method, host, path)
        memo = self._memo
        found = memo.get(key, _UNSEEN)
        if found is not _UNSEEN:
            return found  # type: ignore[return-value]
        if "," in method or method != method.strip(" \t"):
            # A method told twice in one line (`GET, DELETE`: a gateway that appended its X-Forwarded-Method to the
            # client's, as RFC 9110 section 5.3 joins two lines, which forward-auth refuses) or with white space a
            # reader trims (` DELETE` from a caller of a gRPC door): each reading, as each Host reading. It met no
            # policy naming methods, and fell to a laxer one while the upstream served the DELETE. Readings under
            # different policies (or an empty one) are ambiguous.
            methods = {m.strip(" \t") for m in method.split(",")}
            routes = [self._route(m, host, path) for m in sorted(methods) if m]
            route = routes[0] if "" not in methods and all(r is routes[0] for r in routes) else AMBIGUOUS
            if len(memo) >= MAX_ROUTE_MEMO:
                memo.clear()
            memo[key] = route
            return route
        normal = normalize_path(path)
        # Each Host line (two that Envoy joined: `api.example.test,admin.example.test`, which an upstream may read as
        # either) as the name a policy names; None for one that is not `name[:port]` (`host_reading`).
        readings = [host_reading(part) for part in host.split(",")] if "," in host else [host_reading(host)]
        names = {n for n in readings if n is not None}
        policy: CompiledPolicy | None = AMBIGUOUS
        if len(names) == len(set(readings)):  # no None among them
            policy = self._match(method, min(names), normal)
            # Another reading of the host or of the path (`other_readings`) under another policy: an upstream could
            # get another policy's route than the one judged. Refused.
            paths = other_readings(path, normal)
            if "." in normal or any("." in p for p in paths):
                # A format suffix dropped (`_formats_dropped`) counts where it names an exact path of a policy: one
                # written for the file itself (`/openapi.json`) has no other route than its own name. A dot only
                # another reading has (`/admin/users%252ejson` decoded twice) counts as well.
                paths |= {p for p in _formats_dropped(paths | {normal}) if self._exact(method, names, p)}
            if _WHITE_SPACE.search(normal) or any(_WHITE_SPACE.search(p) for p in paths):
                # White space trimmed from a segment (`_white_space_trimmed`): `/admin/users%20` meets the policy of
                # /admin/users there; and a format suffix before it (`/admin/users.json%20`) dropped too.
                trimmed = _white_space_trimmed(paths | {normal})
                paths |= trimmed | {p for p in _formats_dropped(trimmed) if self._exact(method, names, p)}
            if "\x00" in normal or any("\x00" in p for p in paths):
                # A NUL (decoded twice: `%2500`; nginx and Envoy refuse a `%00`): a C string ends there.
                paths |= {_resolved(p.partition("\x00")[0]) for p in (*paths, normal) if "\x00" in p}
            # Express (non-strict routing, its default) gives `/ops` to the root of a router mounted at `/ops/`: a
            # prefix written with its slash that missed it left it to a laxer policy. Every reading (`/OPS` folded,
            # `/ops%20` trimmed), not only the normal one.
            paths |= {p + "/" for p in (*paths, normal) if not p.endswith("/")}
            if len(names) > 1 or paths:
                paths.add(normal)
                if any(self._match(method, n, p) is not policy for n in names for p in paths):
                    policy = AMBIGUOUS
        if len(memo) >= MAX_ROUTE_MEMO:
            memo.clear()  # attacker-chosen paths: bounded, and a clear is cheaper than an LRU on every hit
        memo[key] = policy
        return policy

    def _exact(self, method: str, names: set[str], path: str) -> bool:
        """Whether `path` names, on one of the hosts `names`, a policy's own handler: the policy's exact `path`, or the
        root of a `path_prefix` written with its slash (Rails routes a scope `/ops/` as `/ops(.:format)`, so
        `/ops.json` is that router's root there)."""
        for n in names:
            policy = self._match(method, n, path)
            if policy is not None and policy.path != "":
                return True
            rooted = self._match(method, n, path + "/")
            if rooted is not None and rooted.path_prefix == path + "/" and not rooted.path:
                return True
        return False

    def _match(self, method: str, host: str, path: str) -> CompiledPolicy | None:
        for policy in self._policies:
            if policy.matches(method, host, path):
                return policy
        return None


def _paths(match: RouteMatch) -> tuple[str, bool]:
    """What a match covers of the path, normalized as `verifier.policy.rules` compares it: (the path, exact?)."""
    if match.path:
        return normalize_path(match.path), True
    return (normalize_path(match.path_prefix) if match.path_prefix else ""), False


def _covers(first: RouteMatch, later: RouteMatch) -> bool:
    """Whether every request `later` covers is covered by `first` (so `later`, after it, is never reached). Only
    the plain cases: a pair it cannot tell is taken as not covered."""
    methods, later_methods = set(first.methods), set(later.methods)
    if "GET" in methods:
        methods.add("HEAD")  # `_methods`: GET's include HEAD
    if "GET" in later_methods:
        later_methods.add("HEAD")
    if methods and not (later_methods and later_methods <= methods):
        return False
    hosts, later_hosts = {a_label(h) for h in first.hosts}, {a_label(h) for h in later.hosts}
    if hosts and not (later_hosts and later_hosts <= hosts):
        return False
    if first.path and first.path_prefix:
        return False
    path, exact = _paths(first)
    later_path, later_exact = _paths(later)
    if later.path and later.path_prefix:
        later_exact = True  # the exact path, when it also has the prefix
    if exact:
        return later_exact and later_path == path
    if later_exact:  # an exact path also covers itself give or take a trailing slash (`_but_a_trailing_slash`)
        return all(v.startswith(path) for v in (later_path, later_path.rstrip("/"), later_path.rstrip("/") + "/") if v)
    return later_path.startswith(path)


def check_reached(policies: tuple[PolicySettings, ...]) -> None:
    """Every policy is reached: one after another that covers every request it covers (first match wins) would never
    apply, and the requests it was written for would get the earlier, maybe laxer, policy (an `/admin` policy below a
    catch-all `/`)."""
    for j, later in enumerate(policies):
        for i, first in enumerate(policies[:j]):
            if _covers(first.match, later.match):
                raise ConfigError(
                    f"policies[{j}] ({later.name}): never applies, policies[{i}] ({first.name}) covers every "
                    "request it covers (first match wins): put the narrower policy first"
                )


def auth_time_left(principal: Principal, require: Requirements, now: float) -> float | None:
    """Seconds until `max_auth_age_seconds` would refuse this principal (None: no such bound).

    The login is aged from `auth_time`, but never from later than the token's `iat`: a user authenticates before the
    token is issued (OIDC Core section 2), so an `auth_time` after it (a provider copying a client's or an upstream's
    claim, a clock running ahead) is not taken to make the login younger than its token. (An `auth_time` ahead of our
    clock beyond the leeway is refused when the token is admitted.)"""
    if require.max_auth_age_seconds is None:
        return None
    claims = principal.claims
    auth_time = json_number(claims.get("auth_time"))
    if auth_time is None:  # missing, NaN (which passed every comparison), inf, 10**400: re-authenticate
        return 0.0
    iat = json_number(claims.get("iat"))
    if iat is not None and iat < auth_time:
        auth_time = iat
    return auth_time + require.max_auth_age_seconds - now


def _strings(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def evaluate(require: Requirements, principal: Principal, now: float, *, authorization_endpoint: str = "") -> None:
    """Raises the refusal for the first unmet requirement; returns when all are met."""
    if require.roles_any and not principal.roles.intersection(require.roles_any):
        raise Forbidden("a required role is missing", code="role_missing")
    if require.roles_all and not principal.roles.issuperset(require.roles_all):
        raise Forbidden("a required role is missing", code="role_missing")
    scopes = principal.scopes
    if require.scopes_all and not all(s in scopes for s in require.scopes_all):
        raise Forbidden("a required scope is missing", code="scope_missing")
    if require.scopes_any and not any(s in scopes for s in require.scopes_any):
        raise Forbidden("a required scope is missing", code="scope_missing")
    claims = principal.claims
    if require.acr_any and not set(_strings(claims.get("acr"))).intersection(require.acr_any):
        raise StepUpRequired(
            "a stronger authentication is required",
            acr_values=require.acr_any,
            max_age=require.max_auth_age_seconds,
            authorization_endpoint=authorization_endpoint,
        )
    if require.amr_any and not set(_strings(claims.get("amr"))).intersection(require.amr_any):
        raise StepUpRequired(
            "a phishing-resistant authentication is required",
            acr_values=require.acr_any,
            max_age=require.max_auth_age_seconds,
            authorization_endpoint=authorization_endpoint,
        )
    left = auth_time_left(principal, require, now)
    if left is not None and left <= 0:
        raise StepUpRequired(
            "a more recent authentication is required",
            acr_values=require.acr_any,
            max_age=require.max_auth_age_seconds,
            authorization_endpoint=authorization_endpoint,
        )
    constraint = require.sender_constraint
    if constraint:
        cnf = claims.get("cnf")
        cnf = cnf if isinstance(cnf, dict) else {}
        dpop_bound = isinstance(cnf.get("jkt"), str)
        mtls_bound = isinstance(cnf.get("x5t#S256"), str)
        if (
            (constraint == "dpop" and not dpop_bound)
            or (constraint == "mtls" and not mtls_bound)
            or (constraint == "any" and not (dpop_bound or mtls_bound))
        ):
            raise SenderConstraintFailed(
                f"a {constraint if constraint != 'any' else 'sender'}-constrained token is required",
                scheme=Scheme.DPOP if constraint == "dpop" else None,
            )
