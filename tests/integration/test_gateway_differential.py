"""A differential audit of the shipped gateway configurations: what the verifier judged against what the upstream got.

An attacker wins when the gateway routes, or the upstream reads, another request than the one the verifier judged:
another path (an encoded slash or dot, a `;` parameter, a doubled slash, a backslash, an encoded `?` or `#`, a
format suffix, white space at a segment's end), another host (an absolute-form target, a Host that disagrees with
it, obs-fold, HTTP/2's `host` beside `:authority`), another method, or a second request smuggled in the body
(`Transfer-Encoding` with `Content-Length`). Each request of the corpus goes byte for byte through every shipped
configuration (real nginx, nginx with the Lua reuse plugin, real Envoy with ext_authz gRPC, HTTP and the reusing Lua
filter) to the real verifier; what the echo upstream received is read as the upstreams it stands for would read it
(`readings`: percent-decoded once and twice, `;parameters` and a `#...` dropped or kept, a backslash as `/`, case
folded, dot segments resolved, white space at a segment's ends trimmed, a format suffix dropped) and must fall under
the policy the token could pass: a read-only token never reaches an `/admin` path, the `/staff/users` handler or the
admin host, nor writes; no token reaches nothing but /health.

The corpus is a regression guard: every case but the format suffix (`test_a_format_suffix_...`), white space at a
segment's end (`test_white_space_...`: `/staff/users%20`, `/%20staff/users`, `/%09admin/x`), IIS's `%uNNNN` escapes
(`/%u0061dmin/x`, through Envoy) and a format suffix decoded twice (`/staff/users%252ejson`), which reached the
upstream's /staff/users or /admin handler with a read-only token, already ended in a refusal, a redirect or the
upstream acting on what was judged.
"""

from __future__ import annotations

import posixpath
import re
import shutil
import socket
import subprocess
import urllib.parse
from collections.abc import Callable

import pytest
from gateways import LOOPBACK, EchoUpstream, LocalIssuer, SeenRequest
from rigs import fresh_upstream_log, gateway_fixture, verifier_fixture  # noqa: F401 - autouse: each test sees only its own requests
from test_trust_boundary import Edge

pytestmark = pytest.mark.integration

API_HOST = "api.example.test"
ADMIN_HOST = "admin.example.test"
POLICIES = [
    {"name": "health", "match": {"path": "/health"}, "require": {"authenticated": False}},
    {"name": "admin-host", "match": {"hosts": [ADMIN_HOST]}, "require": {"roles_any": ["admin"]}},
    {"name": "admin", "match": {"path_prefix": "/admin"}, "require": {"roles_any": ["admin"]}},
    # An exact path: the handler of one route (Rails `get "/staff/users"`, a Spring `@GetMapping`).
    {"name": "staff-users", "match": {"path": "/staff/users"}, "require": {"roles_any": ["admin"]}},
    # A prefix with its slash: the routes of a router mounted at /ops/ (Express), whose root handler `/ops` reaches.
    {"name": "ops", "match": {"path_prefix": "/ops/"}, "require": {"roles_any": ["admin"]}},
    # Deleting an order takes more than writing one: a POST the application takes for a DELETE must meet this.
    {
        "name": "order-deletes",
        "match": {"path_prefix": "/orders", "methods": ["DELETE"]},
        "require": {"roles_any": ["admin"]},
    },
    {"name": "writes", "match": {"methods": ["POST", "PUT", "PATCH", "DELETE"]}, "require": {"scopes_all": ["write"]}},
    {"name": "rest", "match": {"path_prefix": "/"}, "require": {"authenticated": True}},
]
WRITES = ("POST", "PUT", "PATCH", "DELETE")


verifier = verifier_fixture(policies=POLICIES)
edge = gateway_fixture("edge", wrap=lambda kind, url: Edge(name=kind, url=url))


@pytest.fixture(scope="module")
def read_token(issuer: LocalIssuer) -> str:
    """A valid token with no role and the `read` scope: the catch-all's, nothing more."""
    return issuer.mint(sub="alice", scope="read")


@pytest.fixture(scope="module")
def write_token(issuer: LocalIssuer) -> str:
    """A valid token with the `write` scope and no role: it may POST an order, never delete one."""
    return issuer.mint(sub="bob", scope="read write")


def send(edge: Edge, request: bytes, timeout: float = 5.0) -> int:
    """Sends `request` byte for byte on a new connection and returns the first answer's status (0: none)."""
    with socket.create_connection((LOOPBACK, edge.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        try:
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
    fields = data.split(b"\r\n", 1)[0].split()
    return int(fields[1]) if len(fields) >= 2 and fields[1].isdigit() else 0


def request(line: str, *, host: str | None = API_HOST, token: str = "", extra: str = "", body: str = "") -> bytes:
    """`line`, a Host (None: none), the token's Authorization, `extra` header lines (each ending CRLF), `body`."""
    head = f"{line}\r\n" + (f"Host: {host}\r\n" if host is not None else "")
    head += f"Authorization: Bearer {token}\r\n" if token else ""
    return f"{head}{extra}Connection: close\r\n\r\n{body}".encode("latin-1")


def readings(path: str) -> set[str]:
    """Every route an upstream may take `path` (the target it received) for, lower-cased: decoded once or twice or with
    IIS's `%uNNNN` escapes decoded too, `;parameters` and what follows a `#` dropped or kept, a backslash read as `/`
    or not, white space at a segment's ends trimmed or not, a format suffix dropped or not, dot segments resolved or
    not, cut at a NUL or not (a C string), a slash added at the end or not (Express's non-strict routing), and each
    case-folded as Python lower-cases and as Java's `equalsIgnoreCase` and .NET's `OrdinalIgnoreCase` fold (written
    independently of the verifier's own reading)."""
    routes: set[str] = set()
    target = path.split("?", 1)[0]
    for fragment in {target, target.split("#", 1)[0]}:
        for parameters in {fragment, re.sub(r";[^/]*", "", fragment)}:
            once = urllib.parse.unquote(parameters)
            iis = urllib.parse.unquote(re.sub(r"%[uU]([0-9a-fA-F]{4})", lambda m: chr(int(m[1], 16)), parameters))
            # The target's bytes (raw ones arrive here as latin-1 characters) decoded once, as UTF-8: what ASP.NET Core
            # and a servlet container route on for a raw `\xc4\xb1` (the dotless i) as for `%C4%B1`.
            as_utf8 = urllib.parse.unquote_to_bytes(parameters.encode("latin-1", "replace")).decode("utf-8", "replace")
            for decoded in {parameters, once, urllib.parse.unquote(once), iis, as_utf8}:
                for slashed in {decoded, decoded.replace("\\", "/")}:
                    trimmed = "/".join(segment.strip() for segment in slashed.split("/"))
                    for resolved in {
                        r for t in {slashed, trimmed} for r in (t, posixpath.normpath("/" + t.lstrip("/")))
                    }:
                        stem, dot, _ = resolved.rpartition(".")
                        cut = resolved.split("\x00", 1)[0]  # what a C string reads: up to the first NUL
                        for route in {resolved, cut} | ({stem} if dot and "/" not in _ else set()):
                            route_slashed = {route, route + "/"}
                            routes |= {r.lower() for r in route_slashed} | {_ignore_case(r) for r in route_slashed}
    return routes


def _ignore_case(route: str) -> str:
    """`route` as Java's `equalsIgnoreCase` compares it, character by character: `Character.toUpperCase` (one
    character to one: the dotless i and the long s become I and S), then `Character.toLowerCase` (the I with a dot
    becomes i)."""
    folded = []
    for c in route:
        upper = c.upper() if len(c.upper()) == 1 else c
        lower = upper.lower()
        folded.append(lower if len(lower) == 1 else lower[0])
    return "".join(folded)


def _read_token_may_act_on(seen: SeenRequest) -> bool:
    """Whether a read-only token may have this done: no admin host, no /admin, /ops/ or /staff/users route, no
    write."""
    host = seen.headers.get("host", "").lower()
    protected = any(
        r.startswith(("/admin", "/ops/")) or r.rstrip("/") == "/staff/users" for r in readings(seen.path)
    )
    return ADMIN_HOST not in host and not protected and seen.method.upper() not in WRITES


def _anyone_may_act_on(seen: SeenRequest) -> bool:
    """Whether a request without a token may have this done: GET (or HEAD) /health on the API host, nothing else."""
    host = seen.headers.get("host", "").lower()
    public = readings(seen.path) <= {"/health", "/health/"}
    return ADMIN_HOST not in host and public and seen.method.upper() in ("GET", "HEAD")


# ------------------------------------------------------------------------------------------------ the finding


@pytest.mark.parametrize(
    "target", ["/staff/users.json", "/staff/users.xml", "/staff/users%2Ejson", "/staff/users.json/"]
)
def test_a_format_suffix_does_not_take_an_exact_paths_handler_to_a_laxer_policy(
    edge: Edge, upstream: EchoUpstream, read_token: str, target: str
) -> None:
    """Rails routes `get "/staff/users"` as `/staff/users(.:format)` and Spring MVC before 5.3 matched
    `/staff/users.*` to it: `/staff/users.json` is that handler with a JSON answer. The verifier judged it by its
    own name, which met no exact policy: the catch-all passed a read-only token (200, the target at the upstream)
    through every gateway, none of which changes the suffix. Now it is refused as ambiguous (400)."""
    status = send(edge, request(f"GET {target} HTTP/1.1", token=read_token))

    assert status == 400, (edge.name, target, status)
    assert upstream.requests == [], (edge.name, target)


@pytest.mark.parametrize("target", ["/staff/users%20", "/staff/users%09", "/staff/users%C2%A0", "/%20staff/users"])
def test_white_space_at_a_segments_end_does_not_take_an_exact_paths_handler_to_a_laxer_policy(
    edge: Edge, upstream: EchoUpstream, read_token: str, target: str
) -> None:
    """Spring's AntPathMatcher with trimTokens (before 4.3) and others trim the white space of a path segment:
    `/staff/users%20` is the /staff/users handler to them. The verifier judged it by its own name (`/staff/users `),
    which met no exact policy: the catch-all passed a read-only token (200, the target at the upstream) through every
    gateway, none of which trims it. Now it is refused as ambiguous (400)."""
    status = send(edge, request(f"GET {target} HTTP/1.1", token=read_token))

    assert status == 400, (edge.name, target, status)
    assert upstream.requests == [], (edge.name, target)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/ops", 400),  # Express gives it to the root handler of the router mounted at /ops/
        ("/ops/", 403),
        ("/ops/x", 403),
        ("/opsx", 200),
        ("/adm%C4%B1n/x", 400),  # the dotless i: /admin/x to ASP.NET Core's and Java's case-blind routes
        ("/%C5%BFtaff/users", 400),  # the long s: /staff/users to them
        ("/caf%C3%A9/menu", 200),  # Unicode no fold moves: the catch-all's
    ],
)
def test_a_slash_added_or_a_unicode_case_fold_does_not_take_a_path_to_a_laxer_policy(
    edge: Edge, upstream: EchoUpstream, read_token: str, target: str, expected: int
) -> None:
    """Two readings of a path that only an upstream makes: Express (non-strict routing, its default) routes `/ops` to
    the router mounted at `/ops/`, which a `path_prefix: /ops/` does not cover; ASP.NET Core (`OrdinalIgnoreCase`) and
    Java's `equalsIgnoreCase` fold `\u0131` and `\u017f` onto i and s, which `str.lower` does not. Each passed a
    read-only token to a protected handler through every shipped gateway (none changes either); now refused as
    ambiguous (400), while the prefix's own paths stay its (403) and the paths no reading moves the catch-all's."""
    status = send(edge, request(f"GET {target} HTTP/1.1", token=read_token))

    assert status == expected, (edge.name, target, status)
    assert [r.path for r in upstream.requests] == ([target] if expected == 200 else []), edge.name


@pytest.mark.parametrize(("target", "expected"), [("/staff/users", 403), ("/staff/users/x.json", 200)])
def test_the_exact_path_itself_and_a_file_below_it_keep_their_policies(
    edge: Edge, upstream: EchoUpstream, read_token: str, target: str, expected: int
) -> None:
    """The control: the exact path is the admin role's; a file below it, which no exact policy names, the rest's."""
    status = send(edge, request(f"GET {target} HTTP/1.1", token=read_token))

    assert status == expected, (edge.name, target, status)
    assert [r.path for r in upstream.requests] == ([target] if expected == 200 else []), edge.name


# ------------------------------------------------------------------------------------------------ the corpus

# Targets aimed at a protected route or host, sent with a read-only token.
PATH_CORPUS = [
    "/admin%2Fsecret",
    "/%61dmin/secret",
    "/%2561dmin/secret",
    "/admin%252Fx",
    "/admin;/x",
    "/public;/../admin/x",
    "/health;/../admin/x",
    "//admin/secret",
    "///admin/secret",
    "/health//../admin",
    "/\\admin/x",
    "/health\\..\\admin/x",
    "/health%5C..%5Cadmin/x",
    "/admin%3Fx",
    "/health%3F/../admin/x",
    "/health%23/../admin/x",
    "/health?#/../admin/x",
    "/health%00/../admin/x",
    "/health/..%00/admin",
    "/health%2F..%2Fadmin/x",
    "/health%2f%2e%2e%2fadmin/x",
    "/health/%2E%2E/%2E%2E/admin",
    "/health/..;/admin/x",
    "/ADMIN/x",
    "/Staff/Users",
    "/staff/users;.json",
    "/staff//users",
    "/staff/./users",
    "/staff/users/.",
    "/staff/x/../users",
    "/staff/users%2F",
    "/staff/users%20",
    "/staff/users%09",
    "/staff/users%0B",
    "/staff/users%C2%A0",
    "/staff/%20users",
    "/staff%20/users",
    "/%09admin/x",
    "/staff/users.json%20",
    "/staff/users%23.json",
    "/staff/users%3F.json",
    "/%u0061dmin/x",
    "/%U0041DMIN/x",
    "/staff/user%u0073",
    "/staff/users%252ejson",
    "/staff/users%u002ejson",
    "/health/%u002e%u002e/admin/x",
    "*",
    "admin/x",
    f"http://{API_HOST}/admin/x",
    f"http://{ADMIN_HOST}/orders",
    f"https://{ADMIN_HOST}/orders",
    f"http://{API_HOST}:80/health/../admin",
    f"http://{API_HOST}@{ADMIN_HOST}/orders",
    f"http://{API_HOST}/staff/users.json",
    "/ops",
    "/OPS",
    "/ops;x",
    "/ops.json",
    "/ops%20",
    "/x/../ops",
    "/adm%C4%B1n/x",
    "/ADM%C4%B0N/x",
    "/%C5%BFtaff/users",
    "/staff/u%C5%BFers",
    "/adm%25C4%25B1n/x",
    "/adm\xc4\xb1n/x",  # the dotless i as raw UTF-8 bytes (latin-1 here: one byte each)
    "/\xc5\xbftaff/users",
    "/ADM\xc4\xb0N/x",
    "/staff/users%00",
    "/staff/users%00.json",
    "/staff/users%2500",
    "/ops%00",
]


@pytest.mark.parametrize("target", PATH_CORPUS)
def test_no_spelling_of_a_protected_target_gets_a_read_only_token_to_it(
    edge: Edge, upstream: EchoUpstream, read_token: str, target: str
) -> None:
    """Whatever the gateway does with the target (refuses it, redirects to its normal form, passes it as sent or
    normalized), the upstream never gets a route or host the read-only token could not pass on."""
    status = send(edge, request(f"GET {target} HTTP/1.1", token=read_token))

    acted = [(r.method, r.path, r.headers.get("host")) for r in upstream.requests if not _read_token_may_act_on(r)]
    assert not acted, (edge.name, target, status, acted)


# Targets aimed at anything but the public /health, sent with no token.
PUBLIC_CORPUS = [
    "/health%2F..%2Fadmin",
    "/health/%2e%2e/orders",
    "/health;/../orders",
    "/health/../orders",
    "/health/..",
    "/health%3F/../orders",
    "/health%23/../orders",
    "/health#/../orders",
    "/health\\..\\orders",
    "/health.json",
    "/health;.json",
    "/heal%74h/../orders",
    "/HEALTH/../orders",
    "/health?/../orders",
    "/health%20",
    "/health%09",
    "/%20health/../orders",
    "/health%00",
    f"http://{ADMIN_HOST}/orders",
    f"http://{API_HOST}/health/../orders",
]


@pytest.mark.parametrize("target", PUBLIC_CORPUS)
def test_no_spelling_of_the_public_path_opens_another_route_without_a_token(
    edge: Edge, upstream: EchoUpstream, target: str
) -> None:
    """The public /health in every disguise: the upstream gets /health (as sent or normalized) or nothing."""
    status = send(edge, request(f"GET {target} HTTP/1.1"))

    acted = [(r.method, r.path, r.headers.get("host")) for r in upstream.requests if not _anyone_may_act_on(r)]
    assert not acted, (edge.name, target, status, acted)


SMUGGLED = "GET /admin/secret HTTP/1.1\r\nHost: api.example.test\r\n\r\n"


def _framing_corpus(token: Callable[[], str]) -> list[tuple[str, bytes]]:
    """Requests whose framing, host or method a gateway and an upstream may read apart."""
    t = token()
    chunked_then_request = "0\r\n\r\n" + SMUGGLED
    return [
        (
            "TE+CL",
            request(
                "POST /health HTTP/1.1",
                extra="Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                body=chunked_then_request,
            ),
        ),
        (
            "CL+CL",
            request(
                "POST /health HTTP/1.1",
                extra=f"Content-Length: 0\r\nContent-Length: {len(SMUGGLED)}\r\n",
                body=SMUGGLED,
            ),
        ),
        (
            "TE chunked,identity",
            request(
                "POST /health HTTP/1.1", extra="Transfer-Encoding: chunked, identity\r\n", body=chunked_then_request
            ),
        ),
        (
            "TE obs-fold",
            request(
                "POST /health HTTP/1.1",
                extra="Transfer-Encoding:\r\n chunked\r\nContent-Length: 4\r\n",
                body=chunked_then_request,
            ),
        ),
        (
            "TE xchunked",
            request(
                "POST /health HTTP/1.1",
                extra="Transfer-Encoding: xchunked\r\nContent-Length: 4\r\n",
                body=chunked_then_request,
            ),
        ),
        (
            "GET with a body",
            request("GET /health HTTP/1.1", extra=f"Content-Length: {len(SMUGGLED)}\r\n", body=SMUGGLED),
        ),
        ("HTTP/1.0 without Host", request("GET /admin/secret HTTP/1.0", host=None, token=t)),
        ("no version", b"GET /admin/secret\r\n\r\n"),
        ("OPTIONS *", request("OPTIONS * HTTP/1.1", token=t)),
        ("CONNECT", request(f"CONNECT {ADMIN_HOST}:80 HTTP/1.1", host=f"{ADMIN_HOST}:80", token=t)),
        ("Host obs-fold", request("GET /orders HTTP/1.1", host=f"{API_HOST}\r\n {ADMIN_HOST}", token=t)),
        ("Host tab obs-fold", request("GET /orders HTTP/1.1", host=f"{API_HOST}\r\n\t{ADMIN_HOST}", token=t)),
        ("Host with NUL", request("GET /orders HTTP/1.1", host=f"{API_HOST}\x00{ADMIN_HOST}", token=t)),
        (
            "Host space before colon",
            request("GET /orders HTTP/1.1", host=None, token=t, extra=f"Host : {ADMIN_HOST}\r\n"),
        ),
        (
            "two Hosts, one with a space",
            request("GET /orders HTTP/1.1", host=API_HOST, token=t, extra=f"Host : {ADMIN_HOST}\r\n"),
        ),
        ("Host tab and trailing space", request("GET /orders HTTP/1.1", host=f"\t{ADMIN_HOST} ", token=t)),
        ("absolute form, Host disagrees", request(f"GET http://{API_HOST}/orders HTTP/1.1", host=ADMIN_HOST, token=t)),
        ("absolute form naming admin", request(f"GET http://{ADMIN_HOST}/orders HTTP/1.1", host=API_HOST, token=t)),
        ("lower-case method", request("delete /orders HTTP/1.1", token=t)),
        ("mixed-case method", request("DELETe /orders HTTP/1.1", token=t)),
        ("Authorization twice", request("GET /admin/x HTTP/1.1", token=t, extra=f"authorization: Bearer {t}\r\n")),
        ("Authorization obs-fold", request("GET /admin/x HTTP/1.1", token=t, extra="\tx\r\n")),
        ("AUTHORIZATION upper-case", request("GET /admin/x HTTP/1.1", extra=f"AUTHORIZATION: Bearer {t}\r\n")),
        ("a NUL in the target", request("GET /health\x00/../admin HTTP/1.1", token=t)),
        ("a tab in the target", request("GET /health\t/../admin HTTP/1.1", token=t)),
        ("a space in the target", request("GET /health /../admin HTTP/1.1", token=t)),
        ("a CTL in the target", request("GET /admin\x01 HTTP/1.1", token=t)),
        (
            "15 KiB header lines past the verifier's 32 KiB",
            request(
                "GET /admin/secret HTTP/1.1", token=t, extra="".join(f"X-Pad-{i}: {'a' * 15000}\r\n" for i in range(3))
            ),
        ),
        ("one 17 KiB header line", request("GET /admin/secret HTTP/1.1", token=t, extra=f"X-Pad: {'a' * 17000}\r\n")),
    ]


FRAMING_NAMES = [name for name, _ in _framing_corpus(lambda: "t")]


@pytest.mark.parametrize("case", FRAMING_NAMES)
def test_no_framing_host_or_method_trick_gets_past_what_was_judged(
    edge: Edge, upstream: EchoUpstream, read_token: str, case: str
) -> None:
    """Smuggling (`Transfer-Encoding` with `Content-Length`, two lengths), obs-fold, NUL and CTL bytes, a Host that
    disagrees with the target or is missing, `OPTIONS *`, CONNECT, method case, header blocks near each gateway's
    and the verifier's limits: refused, or the upstream acts only on a request the read-only token may make, and
    never on a second request taken from the body."""
    data = dict(_framing_corpus(lambda: read_token))[case]
    status = send(edge, data)

    seen = upstream.requests
    acted = [(r.method, r.path, r.headers.get("host")) for r in seen if not _read_token_may_act_on(r)]
    assert not acted, (edge.name, case, status, acted)
    assert not [r for r in seen if "/admin" in r.path], (edge.name, case, status)
    assert len(seen) <= 1, (edge.name, case, status, [r.path for r in seen])


@pytest.mark.parametrize(
    "query", ["_method=DELETE", "_method=delete", "x=1&_method=DELETE", "%5Fmethod=DELETE", ".method=DELETE"]
)
def test_a_post_whose_query_names_another_method_is_not_judged_as_a_post(
    edge: Edge, upstream: EchoUpstream, write_token: str, query: str
) -> None:
    """Symfony and Laravel (and Express's method-override reading the query) carry out `POST /orders/1?_method=DELETE`
    as a DELETE. Every shipped gateway removes the override headers but passes the query on: judged as the POST it came
    as, a token that may only write deleted the order. The same POST without the parameter still passes."""
    status = send(edge, request(f"POST /orders/1?{query} HTTP/1.1", token=write_token, extra="Content-Length: 0\r\n"))
    assert not upstream.requests, (edge.name, query, status, [(r.method, r.path) for r in upstream.requests])

    plain = send(edge, request("POST /orders/1?x=1 HTTP/1.1", token=write_token, extra="Content-Length: 0\r\n"))
    assert plain == 200, (edge.name, plain)


# ------------------------------------------------------------------------------------------------ HTTP/2 (Envoy)

H2_CASES = {
    "host beside :authority": {":authority": API_HOST, "host": ADMIN_HOST},
    ":authority admin, host api": {":authority": ADMIN_HOST, "host": API_HOST},
    ":authority with userinfo": {":authority": f"{API_HOST}@{ADMIN_HOST}"},
    ":path without a slash": {":path": "admin/x"},
    ":path *": {":path": "*"},
    ":path with a fragment": {":path": "/health#/../admin/x"},
    ":path absolute": {":path": f"http://{ADMIN_HOST}/orders"},
    ":path with a format suffix": {":path": "/staff/users.json"},
    "lower-case :method": {":method": "delete"},
}


@pytest.mark.skipif(shutil.which("nghttp") is None, reason="nghttp (nghttp2-client) is missing")
@pytest.mark.parametrize("case", list(H2_CASES))
def test_over_cleartext_http2_no_pseudo_header_trick_gets_past_what_was_judged(
    edge: Edge, upstream: EchoUpstream, read_token: str, case: str
) -> None:
    """Envoy's listeners take cleartext HTTP/2 (codec AUTO; the nginx templates speak HTTP/1.1 only): a `host`
    field beside `:authority`, a `:path` that is not origin-form, a lower-case `:method`. Refused, or the upstream
    acts only on a request the read-only token may make."""
    if not edge.name.startswith("envoy"):
        pytest.skip("only Envoy's listeners speak HTTP/2")
    args = ["nghttp", "-v", f"{edge.url}/orders", "-H", f"authorization: Bearer {read_token}"]
    for name, value in H2_CASES[case].items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=15, check=False).stdout

    acted = [(r.method, r.path, r.headers.get("host")) for r in upstream.requests if not _read_token_may_act_on(r)]
    assert not acted, (edge.name, case, out[-2000:], acted)
