"""Route policies, role mapping and assurance: matching, evaluation order and the answers they give."""

from __future__ import annotations

import pytest
from hostile_numbers import HOSTILE_IDS, HOSTILE_NUMBERS

from verifier.doors.refusals import refuse
from verifier.errors import Forbidden, SenderConstraintFailed
from verifier.policy.roles import RoleMapper
from verifier.policy.rules import AMBIGUOUS, PolicySet, StepUpRequired, auth_time_left, evaluate, normalize_path
from verifier.principal import Principal, roles_of, scopes_of
from verifier.request import RequestAttributes, host_name, normalize_host
from verifier.settings import PolicySettings, Requirements, RoleRule, RouteMatch

NOW = 1_700_000_000.0


def _principal(**claims: object) -> Principal:
    scope = claims.get("scope", "read")
    return Principal(
        issuer="https://idp",
        subject="alice",
        client_id=None,
        scopes=tuple(str(scope).split()),
        roles=frozenset(claims.pop("roles", ())),  # type: ignore[arg-type]
        expires_at=NOW + 300,
        claims=claims,
    )


def _attrs(method: str, path: str, host: str = "api.example.test") -> RequestAttributes:
    # As every door builds them: the host normalized once.
    return RequestAttributes(method=method, scheme="https", host=normalize_host(host), path=path, headers={})


ADMIN = PolicySettings(
    name="admin",
    match=RouteMatch(path_prefix="/admin", methods=("POST", "PUT", "DELETE")),
    require=Requirements(
        roles_any=("admin",),
        scopes_all=("write",),
        amr_any=("hwk",),
        acr_any=("phr", "phrh"),
        max_auth_age_seconds=900,
        sender_constraint="dpop",
    ),
)
PUBLIC = PolicySettings(name="health", match=RouteMatch(path="/health"), require=Requirements(authenticated=False))
REST = PolicySettings(name="rest", match=RouteMatch(path_prefix="/"), require=Requirements())


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/admin", "/admin"),
        ("//admin", "/admin"),
        ("/./admin", "/admin"),
        ("/x/../admin", "/admin"),
        ("/%61dmin", "/admin"),
        ("/admin?x=/y", "/admin"),
        ("\\admin", "/admin"),
        ("/a/", "/a/"),
        ("", "/"),
    ],
)
def test_paths_are_normalized_before_matching(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal


def test_an_exact_path_covers_the_same_path_with_or_without_a_trailing_slash() -> None:
    """Express (non-strict routing, its default) and Spring MVC before 6 give `/stats/` to the `/stats` handler:
    an exact path that missed it would leave it to a laxer policy (here: a read-only token on the admin stats)."""
    stats = PolicySettings(name="stats", match=RouteMatch(path="/admin/stats"), require=Requirements(roles_any=("a",)))
    slashed = PolicySettings(name="slashed", match=RouteMatch(path="/reports/"), require=Requirements(roles_any=("a",)))
    policies = PolicySet((stats, slashed, REST))
    for path, name in (
        ("/admin/stats", "stats"),
        ("/admin/stats/", "stats"),
        ("/reports", "slashed"),
        ("/reports/", "slashed"),
        ("/admin/stats/x", "rest"),
        ("/admin/statsx", "rest"),
        ("/", "rest"),
    ):
        assert policies.match(_attrs("GET", path)).name == name, path  # type: ignore[union-attr]


@pytest.mark.parametrize("path", ["/adm%C4%B1n/users", "/%C5%BFtaff", "/\u017ftaff/x", "/ADM%C4%B0N/users"])
def test_a_path_a_case_blind_router_folds_onto_another_policy_is_ambiguous(path: str) -> None:
    """ASP.NET Core compares routes with `OrdinalIgnoreCase` (Java's `equalsIgnoreCase` alike): each character's
    simple upper case, so `/adm\u0131n` (dotless i) and `/\u017ftaff` (long s) reach the /admin and /staff
    handlers there. `str.lower` leaves both as sent, so they met the catch-all and a read-only token reached those
    handlers. Refused as ambiguous now; a Unicode path no fold moves stays the catch-all's."""
    staff = PolicySettings(name="staff", match=RouteMatch(path_prefix="/staff"), require=Requirements(roles_any=("s",)))
    admin = PolicySettings(name="adm", match=RouteMatch(path_prefix="/admin"), require=Requirements(roles_any=("a",)))
    policies = PolicySet((admin, staff, REST))
    assert policies.match(_attrs("GET", path)) is AMBIGUOUS
    assert policies.match(_attrs("GET", "/caf%C3%A9/menu")).name == "rest"  # type: ignore[union-attr]
    assert policies.match(_attrs("GET", "/%C3%85dmin")).name == "rest"  # type: ignore[union-attr]


@pytest.mark.parametrize("path", ["/adm\xc4\xb1n/users", "/\xc5\xbftaff", "/ADM\xc4\xb0N/x", "/adm%C4\xb1n/x"])
def test_raw_utf8_bytes_a_case_blind_router_folds_onto_another_policy_are_ambiguous(path: str) -> None:
    """nginx passes raw bytes beyond ASCII in the target, and the forward-auth door reads them as latin-1 (one
    character a byte): `/adm\xc4\xb1n` was two characters to the verifier, met the catch-all, and a read-only token
    reached ASP.NET Core's /admin handler, which decodes the bytes as UTF-8 (the dotless i) and folds it. Refused as
    ambiguous now; raw UTF-8 no fold moves stays the catch-all's, and so does a gRPC door's Unicode string."""
    staff = PolicySettings(name="staff", match=RouteMatch(path_prefix="/staff"), require=Requirements(roles_any=("s",)))
    admin = PolicySettings(name="adm", match=RouteMatch(path_prefix="/admin"), require=Requirements(roles_any=("a",)))
    policies = PolicySet((admin, staff, REST))
    assert policies.match(_attrs("GET", path)) is AMBIGUOUS
    for other in ("/caf\xc3\xa9/menu", "/caf\u00e9/menu", "/\u00c5dmin", "/\xc3\x85dmin"):
        assert policies.match(_attrs("GET", other)).name == "rest", other  # type: ignore[union-attr]


@pytest.mark.parametrize("path", ["/staff/users%2500", "/staff/users%00", "/staff/users%2500.json", "/ops%2500"])
def test_a_path_a_c_string_cuts_at_a_nul_onto_another_policy_is_ambiguous(path: str) -> None:
    """An upstream that reads the path as a C string stops at a NUL: `/staff/users%2500`, decoded twice, is the
    /staff/users handler to one that also decodes what its framework decoded (nginx and Envoy refuse a `%00`, not a
    `%2500`). It met the catch-all, and through every shipped gateway a read-only token reached that handler there.
    Refused as ambiguous now; a NUL that cuts nothing onto another policy stays the catch-all's."""
    staff = PolicySettings(name="staff", match=RouteMatch(path="/staff/users"), require=Requirements(roles_any=("s",)))
    ops = PolicySettings(name="ops", match=RouteMatch(path_prefix="/ops/"), require=Requirements(roles_any=("o",)))
    policies = PolicySet((staff, ops, REST))
    assert policies.match(_attrs("GET", path)) is AMBIGUOUS
    assert policies.match(_attrs("GET", "/orders%2500")).name == "rest"  # type: ignore[union-attr]


def test_a_path_a_prefix_with_its_slash_covers_once_a_slash_is_added_is_ambiguous() -> None:
    """Express (non-strict routing, its default) gives `/ops` to the root handler of a router mounted at `/ops/`: a
    `path_prefix: /ops/` does not cover `/ops`, which fell to the catch-all, and a read-only token reached the ops
    router. Refused as ambiguous; `/ops/`, `/ops/x` stay the prefix's and `/opsx` the catch-all's."""
    ops = PolicySettings(name="ops", match=RouteMatch(path_prefix="/ops/"), require=Requirements(roles_any=("ops",)))
    policies = PolicySet((ops, PUBLIC, REST))
    assert policies.match(_attrs("GET", "/ops")) is AMBIGUOUS
    assert policies.match(_attrs("GET", "/./ops")) is AMBIGUOUS
    # The slash added to every other reading too: case-folded, white space trimmed, `;parameters` dropped.
    for path in ("/OPS", "/ops%20", "/ops;x", "/Ops%09"):
        assert policies.match(_attrs("GET", path)) is AMBIGUOUS, path
    # Rails routes a scope `/ops/` as `/ops(.:format)`: `/ops.json` is the router's root there.
    assert policies.match(_attrs("GET", "/ops.json")) is AMBIGUOUS
    for path, name in (("/ops/x.json", "ops"), ("/opsx.json", "rest"), ("/x.json", "rest")):
        assert policies.match(_attrs("GET", path)).name == name, path  # type: ignore[union-attr]
    for path, name in (("/ops/", "ops"), ("/ops/x", "ops"), ("/opsx", "rest"), ("/health", "health"),
                       ("/health/", "health"), ("/", "rest"), ("/orders", "rest")):
        assert policies.match(_attrs("GET", path)).name == name, path  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "path", ["/health#/../admin", "/x/..;/admin", "/.;/admin/x", "/health;x", "/ADMIN", "/%41dmin", "/%2561dmin"]
)
def test_a_path_upstreams_read_as_different_routes_is_ambiguous(path: str) -> None:
    """`#` (kept or dropped by the upstream) and `;parameters` (dropped by servlet containers) change the route."""
    assert PolicySet((ADMIN, PUBLIC, REST)).match(_attrs("DELETE", path)) is AMBIGUOUS


@pytest.mark.parametrize(
    "path",
    [
        "/%u0061dmin/x",
        "/%U0061DMIN/x",
        "/admi%u006E",
        "/health/%u002e%u002e/admin",
        "/health%u002f..%u002fadmin/x",
        "/health%u005c..%u005cadmin/x",
        "/%25u0061dmin/x",
    ],
)
def test_a_path_iis_reads_with_its_percent_u_escapes_decoded_is_ambiguous(path: str) -> None:
    """IIS (http.sys, `PercentUAllowed` on by default) and ASP.NET's `HttpUtility.UrlDecode` decode `%uNNNN`:
    `/%u0061dmin/x` is /admin/x to them, a segment named `%u0061dmin` to everyone else. nginx and Kong refuse the
    escape (400), Envoy passes it on as sent: judged as that segment, it met the catch-all and reached IIS's /admin
    handler with a read-only token. Now refused."""
    assert PolicySet((ADMIN, PUBLIC, REST)).match(_attrs("DELETE", path)) is AMBIGUOUS


@pytest.mark.parametrize("path", ["/orders/%u0041", "/%u00", "/%u", "/x%ud800", "/%uD83D%uDE00", "/%u0000"])
def test_a_percent_u_escape_within_one_policy_is_not_ambiguous(path: str) -> None:
    policy = PolicySet((ADMIN, PUBLIC, REST)).match(_attrs("DELETE", path))
    assert policy is not None and policy is not AMBIGUOUS and policy.name == "rest"


@pytest.mark.parametrize(
    "path",
    [
        "/admin/x/../../health",
        "/admin/x/%2e%2e/%2E%2E/health",
        "/admin/../health",
        "/admin/x/../../health?q=1",
        "/ADMIN/x/../../health",
        "/./admin",
        "/api/../admin",
        "/health/../admin/x",
    ],
)
def test_a_path_whose_dot_segments_lead_out_of_a_policy_is_ambiguous(path: str) -> None:
    """nginx and Kong pass the target on as it came, and Express mounts and Flask routes match it so:
    `/admin/x/../../health` is under /admin to them, /health to a server that resolves the dot segments. Judged as
    /health alone, it reached an `/admin` handler with no token (the public policy); now it is refused. The other
    way (`/./admin`, judged as /admin, a laxer route to those upstreams) likewise; the answer is remembered."""
    policies = PolicySet((ADMIN, PUBLIC, REST))
    for _ in range(2):
        assert policies.match(_attrs("DELETE", path)) is AMBIGUOUS


USERS = PolicySettings(name="users", match=RouteMatch(path="/admin/users"), require=Requirements(roles_any=("admin",)))
OPENAPI = PolicySettings(
    name="openapi", match=RouteMatch(path="/openapi.json"), require=Requirements(authenticated=False)
)


@pytest.mark.parametrize(
    "path",
    [
        "/admin/users.json",
        "/admin/users.xml",
        "/admin/users.",
        "/Admin/Users.json",
        "/admin/users.tar.gz",
        "/admin/users.json/",
        "/admin/users%2Ejson",
        "/health.json",
        "/admin/users%252ejson",
        "/admin/users%u002ejson",
        "/health%252ejson",
    ],
)
def test_a_format_suffix_on_an_exact_policys_path_is_ambiguous(path: str) -> None:
    """Rails routes `/admin/users(.:format)` and Spring MVC before 5.3 matched `/admin/users.*`: `/admin/users.json`
    is the /admin/users handler to them. Judged by its own name, it met no exact policy and fell to the catch-all (a
    read-only token on the admin users; `/health.json` with no token). So is a dot only another reading has (decoded
    twice, `%252e`; IIS's `%u002e`): the path as judged had none, and its readings' suffixes went unweighed."""
    assert PolicySet((USERS, PUBLIC, OPENAPI, REST)).match(_attrs("GET", path)) is AMBIGUOUS


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/openapi.json", "openapi"),
        ("/admin/users", "users"),
        ("/admin/users/", "users"),
        ("/static/app.js", "rest"),
        ("/admin/users/x.json", "rest"),
        ("/admin/usersx.json", "rest"),
        ("/.well-known/x", "rest"),
        ("/a.b/c", "rest"),
    ],
)
def test_a_dot_that_names_no_other_exact_policy_is_not_ambiguous(path: str, name: str) -> None:
    """A file's own exact policy (`/openapi.json`), and a suffix whose stem no exact policy names, stay as they were."""
    assert PolicySet((USERS, PUBLIC, OPENAPI, REST)).match(_attrs("GET", path)).name == name  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "path",
    [
        "/admin/users%20",
        "/admin/users%09",
        "/admin/users%20/",
        "/admin/%20users",
        "/admin/users%C2%A0",
        "/admin/users%E2%80%83",
        "/%20admin/x",
        "/%09admin/users",
        "/health%20",
        "/admin/users%2520",
    ],
)
def test_white_space_at_a_segments_end_on_another_policys_path_is_ambiguous(path: str) -> None:
    """Spring's AntPathMatcher with trimTokens (before 4.3) and others trim the white space of a path segment:
    `/admin/users%20` is the /admin/users handler to them, `/%20admin/x` under /admin. Judged by its own name, it met
    no such policy and fell to the catch-all (a read-only token on the admin users; `/health%20` with no token)."""
    policies = PolicySet((USERS, ADMIN, PUBLIC, OPENAPI, REST))
    for _ in range(2):
        assert policies.match(_attrs("DELETE", path)) is AMBIGUOUS


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/orders/x%20", "rest"),
        ("/orders/%20x", "rest"),
        ("/admin/x%20", "admin"),
        ("/a%20b/c", "rest"),
        ("/admin/users", "users"),
    ],
)
def test_white_space_that_names_no_other_policy_is_not_ambiguous(path: str, name: str) -> None:
    """White space whose trimmed reading meets the same policy (or none other) stays as it was."""
    policy = PolicySet((USERS, ADMIN, PUBLIC, OPENAPI, REST)).match(_attrs("DELETE", path))
    assert policy is not None and policy is not AMBIGUOUS and policy.name == name


@pytest.mark.parametrize("path", ["/orders/x/../y", "/orders/./y", "/static/app.js", "/a/..b/c", "/.well/x"])
def test_dot_segments_within_one_policy_are_not_ambiguous(path: str) -> None:
    policy = PolicySet((ADMIN, PUBLIC, REST)).match(_attrs("GET", path))
    assert policy is not None and policy is not AMBIGUOUS and policy.name == "rest"


@pytest.mark.parametrize("host", ["public.example.test,admin.example.test", "ADMIN.example.test.,public.example.test"])
def test_a_host_upstreams_read_as_different_hosts_is_ambiguous(host: str) -> None:
    """Two Host lines, joined by Envoy: an upstream may take either."""
    assert PolicySet((ADMIN_HOST, OPEN)).match(_attrs("GET", "/", host=host)) is AMBIGUOUS
    assert PolicySet((ADMIN_HOST, OPEN)).match(_attrs("GET", "/", host="a.test,a.test")).name == "open"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "host",
    [
        "public.example.test:1@admin.example.test",  # userinfo: an upstream parsing a URL authority reads admin
        "public.example.test:@admin.example.test",
        "public.example.test@admin.example.test",
        "public.example.test:443@admin.example.test:443",
        "public.example.test:x",  # a port that is not digits
        "[::1]x",
        "%61dmin.example.test",  # percent-encoded: a WHATWG URL decodes it
        "public.example.test,admin.example.test:1@x",
        "public example.test",
    ],
)
def test_a_host_that_is_not_a_name_and_a_port_is_ambiguous(host: str) -> None:
    """RFC 9110 section 4.2.4 (no userinfo), RFC 3986 section 3.2.3 (a port is digits): the gateway and the verifier
    read the name before the first `:`, an upstream parsing the Host as a URL's authority the one after `@`."""
    assert PolicySet((ADMIN_HOST, OPEN)).match(_attrs("GET", "/", host=host)) is AMBIGUOUS


@pytest.mark.parametrize("method", ["GET, DELETE", "DELETE,GET", "GET,", " DELETE", "DELETE\t", "GET, GET, DELETE"])
def test_a_method_told_twice_or_with_white_space_is_read_as_each_method_it_holds(method: str) -> None:
    """`GET, DELETE` (a gateway that appended its X-Forwarded-Method to the client's in one line, which forward-auth
    refuses on two) or ` DELETE` (a caller of a gRPC door; forward-auth's parser trims it) met no policy naming
    methods and fell to the catch-all: a read token passed where DELETE needs write. Each reading (and an empty one)
    as for two Host lines: under different policies, ambiguous; one policy for all, that one."""
    policies = PolicySet((ADMIN, PUBLIC, REST))
    expected = policies.match(_attrs("DELETE", "/admin/x")) if method.strip() == "DELETE" else AMBIGUOUS
    assert policies.match(_attrs(method, "/admin/x")) is expected
    assert policies.match(_attrs(method, "/api/x")) is (
        AMBIGUOUS if method == "GET," else policies.match(_attrs("GET", "/api/x"))
    )


@pytest.mark.parametrize("host", ["127.1", "0x7f.0.0.1", "2130706433", "0177.0.0.1", "127.0.0.01", "[::1", "[1::1::1]"])
def test_an_address_in_a_spelling_a_url_parser_reads_as_another_is_ambiguous(host: str) -> None:
    """WHATWG URL reads a host ending in a number as an IPv4 address in inet_aton's spellings (`127.1` is 127.0.0.1):
    a policy for 127.0.0.1 missed them all, and they fell to a laxer one."""
    ip_host = PolicySettings(name="ip-host", match=RouteMatch(hosts=("127.0.0.1",)), require=Requirements())
    assert PolicySet((ip_host, OPEN)).match(_attrs("GET", "/", host=host)) is AMBIGUOUS
    assert PolicySet((ip_host, OPEN)).match(_attrs("GET", "/", host="127.0.0.1:8443")).name == "ip-host"  # type: ignore[union-attr]


@pytest.mark.parametrize("host", ["[::1]", "[0:0::1]:8443", "[0000:0000:0000:0000:0000:0000:0000:0001]", "[0::1]"])
def test_every_spelling_of_an_ipv6_literal_gets_its_policy(host: str) -> None:
    ip_host = PolicySettings(name="ip-host", match=RouteMatch(hosts=("[0:0::1]",)), require=Requirements())
    assert PolicySet((ip_host, OPEN)).match(_attrs("GET", "/", host=host)).name == "ip-host"  # type: ignore[union-attr]
    assert PolicySet((ip_host, OPEN)).match(_attrs("GET", "/", host="[::2]")).name == "open"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "host",
    [
        "\uff21\uff24\uff2d\uff29\uff2e.example.test",  # full-width ADMIN
        "admin\u3002example\u3002test",  # ideographic full stops
        "admin\uff0eexample\uff0etest.",  # full-width full stops, and the trailing one
        "Admin\u3002Example\u3002Test:8443",
    ],
)
def test_a_unicode_spelling_of_a_host_gets_that_hosts_policy(host: str) -> None:
    """IDNA (what a URL parser applies) maps full-width letters, U+3002 / U+FF0E dots and Unicode case to the host's
    ASCII name: matched as the raw string, the spelling met no host policy and fell to a laxer one."""
    assert PolicySet((ADMIN_HOST, OPEN)).match(_attrs("GET", "/", host=host)).name == "admin-host"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "host", ["[::1]:8443", "[::1]", "127.0.0.1:80", "public.example.test:", "", "a_b.example.test"]
)
def test_a_host_that_is_a_name_and_a_port_is_not_ambiguous(host: str) -> None:
    assert PolicySet((ADMIN_HOST, OPEN)).match(_attrs("GET", "/", host=host)).name == "open"  # type: ignore[union-attr]


DELETES = PolicySettings(
    name="deletes", match=RouteMatch(methods=("DELETE",)), require=Requirements(roles_any=("admin",))
)


@pytest.mark.parametrize(
    "path",
    [
        "/orders/1?_method=DELETE",
        "/orders/1?_method=delete",
        "/orders/1?x=1&_method=DELETE",
        "/orders/1?%5Fmethod=DELETE",
        "/orders/1?_%6Dethod=DELETE",
        "/orders/1?.method=DELETE",
        "/orders/1?+_method=DELETE",
        "/orders/1?_method=GET&_method=DELETE",
    ],
)
def test_a_post_whose_query_overrides_its_method_into_another_policy_is_ambiguous(path: str) -> None:
    """Symfony and Laravel take a POST for the method its `_method` query parameter names (with no
    X-HTTP-Method-Override header, which every shipped gateway removes), Express's method-override with a query
    getter too, and PHP reads `.method` and ` _method` as `_method`: judged as the POST it came as, `?_method=DELETE`
    met a laxer policy than the DELETE the application carried out. Refused when the two meet different policies."""
    policies = PolicySet((DELETES, REST))
    for _ in range(2):  # the route is remembered without its query: the override is weighed every time
        assert policies.match(_attrs("POST", path)) is AMBIGUOUS
        # a POST told twice in one line, or with a blank (each reading a POST: `_route`), is overridden alike
        assert policies.match(_attrs("POST, POST", path)) is AMBIGUOUS
        assert policies.match(_attrs(" POST", path)) is AMBIGUOUS


@pytest.mark.parametrize(
    ("method", "path", "name"),
    [
        ("POST", "/orders/1?_method=PUT", "rest"),  # PUT meets the POST's policy
        ("POST", "/orders/1?method=DELETE", "rest"),  # not the parameter's name
        ("POST", "/orders/1?_METHOD=DELETE", "rest"),  # parameter names are case-sensitive
        ("POST", "/orders/1?x=_method%3DDELETE", "rest"),
        ("GET", "/orders/1?_method=DELETE", "rest"),  # only a POST is overridden
        ("DELETE", "/orders/1?_method=POST", "deletes"),
    ],
)
def test_a_query_that_overrides_no_method_or_into_the_same_policy_is_not_ambiguous(
    method: str, path: str, name: str
) -> None:
    policy = PolicySet((DELETES, REST)).match(_attrs(method, path))
    assert policy is not None and policy is not AMBIGUOUS and policy.name == name


@pytest.mark.parametrize(
    "path",
    ["/admin;jsessionid=1/users", "/orders;v=2", "/orders#top", "/a;b/../c", "/Orders", "/admin/Users", "/100%25"],
)
def test_a_path_every_reading_of_which_meets_one_policy_is_not_ambiguous(path: str) -> None:
    assert PolicySet((ADMIN, PUBLIC, REST)).match(_attrs("DELETE", path)) is not AMBIGUOUS


@pytest.mark.parametrize("path", ["/admin/users", "//admin/users", "/%61dmin/x"])
def test_admin_policy_cannot_be_sidestepped_by_path_tricks(path: str) -> None:
    policy = PolicySet((ADMIN, PUBLIC, REST)).match(_attrs("DELETE", path))
    assert policy is not None and policy.name == "admin"


@pytest.mark.parametrize(
    ("written", "request_path"),
    [
        ("/docs/secret%20plans", "/docs/secret%20plans/q3"),  # as a client spells it
        ("/docs/secret%20plans", "/docs/secret plans/q3"),
        ("/api//admin", "/api//admin/users"),  # "//" is merged in the request
        ("/api/./admin", "/api/admin/users"),
        ("/%61dmin", "/admin/users"),
        ("/api/x/../admin", "/api/admin/users"),
    ],
)
def test_a_policy_path_written_unnormalized_still_meets_its_requests(written: str, request_path: str) -> None:
    """Requests are matched in normalized form, so a policy path that is not (percent-encoding, `//`, dot segments)
    matched no request at all, and its requests fell through to the next, laxer policy."""
    admin = Requirements(roles_any=("admin",))
    by_prefix = PolicySettings(name="strict", match=RouteMatch(path_prefix=written), require=admin)
    policy = PolicySet((by_prefix, REST)).match(_attrs("GET", request_path))
    assert policy is not None and policy.name == "strict"
    exact_path = request_path.rsplit("/", 1)[0]
    exact = PolicySettings(name="strict", match=RouteMatch(path=written), require=admin)
    policy = PolicySet((exact, REST)).match(_attrs("GET", exact_path))
    assert policy is not None and policy.name == "strict"


def test_first_match_wins_and_methods_and_hosts_count() -> None:
    policies = PolicySet(
        (PolicySettings(name="h", match=RouteMatch(hosts=("other.test",)), require=Requirements()), ADMIN, REST)
    )
    assert policies.match(_attrs("GET", "/admin"))
    assert policies.match(_attrs("GET", "/admin")).name == "rest"  # type: ignore[union-attr]
    assert policies.match(_attrs("POST", "/admin")).name == "admin"  # type: ignore[union-attr]
    assert policies.match(_attrs("GET", "/", host="OTHER.test:8443")).name == "h"  # type: ignore[union-attr]


def test_a_get_policy_covers_head_and_no_other_method_gains_it() -> None:
    """RFC 9110 section 9.3.2: upstreams run the GET handler for HEAD."""
    reports = PolicySettings(name="reports", match=RouteMatch(path_prefix="/reports", methods=("GET",)))
    policies = PolicySet((reports, ADMIN, REST))
    assert policies.match(_attrs("HEAD", "/reports/q3")).name == "reports"  # type: ignore[union-attr]
    assert policies.match(_attrs("HEAD", "/admin")).name == "rest"  # type: ignore[union-attr]  # POST, PUT, DELETE


@pytest.mark.parametrize(
    ("raw", "normal", "name"),
    [
        ("admin.example.test", "admin.example.test", "admin.example.test"),
        ("ADMIN.Example.TEST.", "admin.example.test", "admin.example.test"),
        ("admin.example.test:443", "admin.example.test:443", "admin.example.test"),
        ("Admin.Example.Test.:8443", "admin.example.test:8443", "admin.example.test"),
        ("admin.example.test..", "admin.example.test.", "admin.example.test."),
        ("[::1]:8080", "[::1]:8080", "[::1]"),
        ("[::1]", "[::1]", "[::1]"),
        ("", "", ""),
        (".", "", ""),
    ],
)
def test_hosts_are_normalized_once_and_matched_without_their_port(raw: str, normal: str, name: str) -> None:
    assert normalize_host(raw) == normal
    assert host_name(normal) == name


ADMIN_HOST = PolicySettings(
    name="admin-host", match=RouteMatch(hosts=("Admin.Example.Test.",)), require=Requirements(roles_any=("admin",))
)
OPEN = PolicySettings(name="open", match=RouteMatch(path_prefix="/"), require=Requirements(authenticated=False))


@pytest.mark.parametrize(
    "host", ["admin.example.test", "ADMIN.example.test.", "admin.example.test:443", "ADMIN.EXAMPLE.TEST.:8443"]
)
def test_a_host_policy_cannot_be_sidestepped_by_case_a_trailing_dot_or_a_port(host: str) -> None:
    policy = PolicySet((ADMIN_HOST, OPEN)).match(_attrs("GET", "/", host=host))
    assert policy is not None and policy.name == "admin-host"
    assert PolicySet((ADMIN_HOST, OPEN)).match(_attrs("GET", "/", host="public.example.test")).name == "open"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "host", ["xn--bcher-kva.example.test", "XN--BCHER-KVA.Example.Test.:443", "bücher.example.test"]
)
def test_an_internationalized_host_policy_meets_its_a_label(host: str) -> None:
    idn = PolicySettings(name="idn", match=RouteMatch(hosts=("Bücher.example.test",)), require=Requirements())
    policy = PolicySet((idn, OPEN)).match(_attrs("GET", "/", host=host))
    assert policy is not None and policy.name == "idn"


def test_unmatched_route_with_policies_is_none_and_without_policies_nothing_is_enabled() -> None:
    assert PolicySet((ADMIN,)).match(_attrs("GET", "/public")) is None
    assert not PolicySet(None).enabled


def test_roles_missing_is_403_before_any_step_up() -> None:
    with pytest.raises(Forbidden) as info:
        evaluate(ADMIN.require, _principal(scope="write", amr=["pwd"]), NOW)
    assert info.value.code == "role_missing"
    assert refuse(info.value, realm="r").status == 403


def test_scope_missing_is_403() -> None:
    with pytest.raises(Forbidden) as info:
        evaluate(ADMIN.require, _principal(roles={"admin"}, scope="read"), NOW)
    assert info.value.code == "scope_missing"


def _good(**over: object) -> Principal:
    claims: dict[str, object] = {
        "roles": {"admin"},
        "scope": "read write",
        "amr": ["hwk", "pin"],
        "acr": "phr",
        "auth_time": NOW - 60,
        "cnf": {"jkt": "abc"},
    }
    claims.update(over)
    return _principal(**claims)


def test_all_requirements_met_passes() -> None:
    evaluate(ADMIN.require, _good(), NOW)


@pytest.mark.parametrize(
    ("over", "description"),
    [
        ({"acr": "pwd"}, "stronger"),
        ({"amr": ["pwd"]}, "phishing-resistant"),
        ({"auth_time": NOW - 901}, "more recent"),
        ({"auth_time": None}, "more recent"),
    ],
)
def test_weak_or_old_authentication_gets_an_rfc9470_challenge(over: dict[str, object], description: str) -> None:
    with pytest.raises(StepUpRequired) as info:
        evaluate(ADMIN.require, _good(**over), NOW, authorization_endpoint="https://idp/authorize")
    assert description in info.value.description
    decision = refuse(info.value, realm="verifier")
    assert decision.status == 401
    challenge = dict(decision.response_headers)["www-authenticate"]
    assert challenge.startswith('Bearer realm="verifier", error="insufficient_user_authentication"')
    assert 'acr_values="phr phrh"' in challenge and "max_age=900" in challenge
    import json

    body = json.loads(decision.body)
    assert body["error"] == "insufficient_user_authentication"
    assert body["authorization_endpoint"] == "https://idp/authorize"
    assert decision.cache_max_age == 0


@pytest.mark.parametrize(
    "over",
    [
        {"amr": ["HWK"]},
        {"amr": "HWK"},
        {"amr": ["hwk "]},
        {"amr": "hwk pwd"},
        {"amr": "pwd hwk"},
        {"amr": {"hwk": True}},
        {"amr": [["hwk"]]},
        {"amr": None},
        {"amr": []},
        {"acr": "PHR"},
        {"acr": "urn:mace:incommon:iap:phr"},
        {"acr": "phr phrh"},
        {"acr": {"phr": 1}},
        {"acr": [["phr"]]},
        {"acr": None},
        {"acr": 1},
        {"acr": True},
    ],
    ids=repr,
)
def test_a_near_miss_amr_or_acr_is_a_step_up_never_an_allow(over: dict[str, object]) -> None:
    """Methods and classes are compared exactly as configured: no case folding, no splitting of one string (`amr` is
    an array, RFC 8176; `acr` one string, OIDC Core 2), no keys of an object, no nested arrays, no other spelling of
    the class (a URI for `phr`): an operator who means an alias lists it. Each of these near misses is a 401 step-up."""
    with pytest.raises(StepUpRequired):
        evaluate(ADMIN.require, _good(**over), NOW)


@pytest.mark.parametrize("over", [{"amr": "hwk"}, {"acr": ["pwd", "phrh"]}, {"amr": ["pwd", 7, "hwk"]}], ids=repr)
def test_a_single_amr_string_or_an_acr_array_naming_a_required_value_passes(over: dict[str, object]) -> None:
    """The lenient shapes that still name a required value exactly (a provider writing `amr` as one string, `acr` as
    the array an ID token's `acr` request lists) pass: the value itself is what the route requires."""
    evaluate(ADMIN.require, _good(**over), NOW)


def test_auth_time_exactly_at_the_bound_is_refused_and_one_second_inside_passes() -> None:
    evaluate(ADMIN.require, _good(auth_time=NOW - 899), NOW)
    with pytest.raises(StepUpRequired):
        evaluate(ADMIN.require, _good(auth_time=NOW - 900), NOW)


@pytest.mark.parametrize(
    ("constraint", "cnf", "ok"),
    [
        ("dpop", {"jkt": "a"}, True),
        ("dpop", {}, False),
        ("dpop", {"x5t#S256": "a"}, False),
        ("mtls", {"x5t#S256": "a"}, True),
        ("mtls", {"jkt": "a"}, False),
        ("any", {"jkt": "a"}, True),
        ("any", {"x5t#S256": "a"}, True),
        ("any", {}, False),
    ],
)
def test_sender_constraint_requires_a_bound_token(constraint: str, cnf: dict[str, str], ok: bool) -> None:
    require = Requirements(sender_constraint=constraint)
    if ok:
        evaluate(require, _principal(cnf=cnf), NOW)
    else:
        with pytest.raises(SenderConstraintFailed):
            evaluate(require, _principal(cnf=cnf), NOW)


def test_role_mapping_from_groups_scope_and_subjects_adds_to_a_roles_claim() -> None:
    mapper = RoleMapper(
        (
            RoleRule(role="admin", claim="groups", values=("platform-admins",)),
            RoleRule(role="billing-writer", scope="billing:write"),
            RoleRule(role="ops", subjects=("alice",)),
            RoleRule(role="never", claim="groups", values=("nobody",)),
        )
    )
    roles = mapper.roles({"groups": ["platform-admins", "x"]}, "alice", ("billing:write",), frozenset({"viewer"}))
    assert roles == {"viewer", "admin", "billing-writer", "ops"}
    assert mapper.roles({"groups": "platform-admins"}, "bob", (), frozenset()) == {"admin"}
    assert mapper.roles({"groups": [1, None]}, "bob", (), frozenset()) == frozenset()


def test_a_single_valued_claim_is_one_value_and_only_scope_lists_are_split() -> None:
    """A string claim was split on spaces: a user-editable single-valued attribute mapped by a rule
    (`"Not platform-admins"`, a profile field, a Keycloak user attribute) held the word and granted the role.
    `scope` and `scp` are space-separated lists by definition (RFC 6749 section 3.3; Entra's `scp`)."""
    mapper = RoleMapper(
        (
            RoleRule(role="admin", claim="groups", values=("platform-admins",)),
            RoleRule(role="mail-admin", claim="scp", values=("Mail.Admin",)),
            RoleRule(role="writer", claim="scope", values=("docs:write",)),
        )
    )
    assert mapper.roles({"groups": "Not platform-admins"}, "eve", (), frozenset()) == frozenset()
    assert mapper.roles({"groups": "platform-admins x"}, "eve", (), frozenset()) == frozenset()
    assert mapper.roles({"groups": "platform-admins"}, "bob", (), frozenset()) == {"admin"}
    assert mapper.roles({"scp": "User.Read Mail.Admin"}, "bob", (), frozenset()) == {"mail-admin"}
    assert mapper.roles({"scope": "openid docs:write"}, "bob", (), frozenset()) == {"writer"}


def test_an_auth_time_later_than_iat_is_aged_from_iat() -> None:
    """A login cannot happen after the token it got was issued (OIDC Core 2: `auth_time` is when the user
    authenticated). A token issued 901 s ago whose `auth_time` says "in a day" (a provider copying a client's or an
    upstream's claim, a clock running ahead) passed a 900 s `max_auth_age_seconds` route until that day plus 900 s,
    and a gateway was told it could reuse the allow as long: the age is counted from `iat` at the latest."""
    stale = _good(auth_time=NOW + 86_400, iat=NOW - 901)
    with pytest.raises(StepUpRequired, match="more recent"):
        evaluate(ADMIN.require, stale, NOW)
    assert auth_time_left(stale, ADMIN.require, NOW) == -1
    fresh = _good(auth_time=NOW + 86_400, iat=NOW - 60)
    evaluate(ADMIN.require, fresh, NOW)
    assert auth_time_left(fresh, ADMIN.require, NOW) == 840  # iat + 900 - now: reuse ends with it, not a day later


@pytest.mark.parametrize("value", HOSTILE_NUMBERS, ids=HOSTILE_IDS)
def test_a_hostile_auth_time_asks_for_a_fresh_authentication(value: object) -> None:
    """#18 F11: NaN or +inf passed `max_auth_age_seconds`; 10**400 overflowed."""
    with pytest.raises(StepUpRequired, match="more recent"):
        evaluate(ADMIN.require, _good(auth_time=value), NOW)


@pytest.mark.parametrize("path", ["/admin/x", "//admin/x", "/%61dmin/x", "/admin//x?q=1"])
def test_remembered_route_is_the_same_policy_on_every_request(path: str) -> None:
    policies = PolicySet((ADMIN, PUBLIC, REST))
    first = policies.match(_attrs("DELETE", path))
    assert first is not None and first.name == "admin"
    for _ in range(3):  # answered from the memo now; a query changes nothing, the method does
        assert policies.match(_attrs("DELETE", path + "?page=2")) is first
        again = policies.match(_attrs("GET", path))
        assert again is not None and again.name != "admin"


def test_route_memo_is_bounded_against_distinct_paths() -> None:
    from verifier.policy import rules

    policies = PolicySet((ADMIN, PUBLIC, REST))
    for i in range(rules.MAX_ROUTE_MEMO * 2 + 7):
        policies.match(_attrs("GET", f"/junk/{i}"))
    assert len(policies._memo) <= rules.MAX_ROUTE_MEMO
    admin = policies.match(_attrs("DELETE", "/admin/x"))
    assert admin is not None and admin.name == "admin"


@pytest.mark.parametrize(
    ("claims", "scopes"),
    [
        ({"scope": "read  write"}, ("read", "write")),
        ({"scope": "read ad\tmin"}, ("read",)),
        ({"scope": "read\u00a0admin write"}, ("write",)),
        ({"scp": ["read", "read admin", "", 7]}, ("read",)),
        ({"scp": "read ad\x00min"}, ("read",)),
        ({"scope": ["admin"]}, ()),
    ],
)
def test_scopes_the_upstream_would_read_otherwise_are_left_out(
    claims: dict[str, object], scopes: tuple[str, ...]
) -> None:
    """X-Authenticated-Scope joins scopes with spaces and loses control characters: `ad<TAB>min` would be `admin`."""
    assert scopes_of(claims) == scopes


def test_roles_the_upstream_would_read_otherwise_are_left_out() -> None:
    """X-Authenticated-Roles joins roles with commas: `viewer,admin` would be admin there."""
    claims = {"roles": ["viewer,admin", "ad\x00min", " admin", "admin ", "ops", "Équipe", "", 3]}
    assert roles_of(claims) == {"ops", "Équipe"}


@pytest.mark.parametrize(
    ("claim", "value", "flag"),
    [("email", "boss@corp.example", "email_verified"), ("phone_number", "+15550100", "phone_number_verified")],
)
def test_an_unverified_email_or_phone_number_grants_no_role(claim: str, value: str, flag: str) -> None:
    """A role rule on `email` granted the role to any token carrying the address: a user who sets their own email
    (or phone number) at the provider to the mapped one, which it does not verify (`email_verified` false or
    absent), got the role. Good enough to refuse on, never to grant on: only `<claim>_verified: true` grants."""
    mapper = RoleMapper((RoleRule(role="admin", claim=claim, values=(value,)),))
    assert mapper.roles({claim: value}, "eve", (), frozenset()) == frozenset()
    assert mapper.roles({claim: value, flag: False}, "eve", (), frozenset()) == frozenset()
    assert mapper.roles({claim: value, flag: "true"}, "eve", (), frozenset()) == frozenset()
    assert mapper.roles({claim: [value], flag: 1}, "eve", (), frozenset()) == frozenset()
    assert mapper.roles({claim: value, flag: True}, "boss", (), frozenset()) == {"admin"}


KEYCLOAK_RULES = (
    RoleRule(role="admin", claim="realm_access.roles", values=("admin",)),
    RoleRule(role="writer", claim="resource_access.orders-api.roles", values=("writer",)),
    RoleRule(role="auth0-admin", claim="https://example.com/roles", values=("admin",)),
)


def test_a_keycloak_realm_or_client_role_at_its_dotted_path_grants_its_role() -> None:
    """A rule on `realm_access.roles` read the flat claim of that name, which Keycloak never sends: it matched no
    token, and a route requiring the role refused everyone with no hint why. A namespaced claim whose name holds dots
    (`https://example.com/roles`, Auth0) is still read by its exact name."""
    mapper = RoleMapper(KEYCLOAK_RULES)
    token = {
        "realm_access": {"roles": ["admin", "offline_access"]},
        "resource_access": {"orders-api": {"roles": ["writer"]}, "account": {"roles": ["admin"]}},
    }
    assert mapper.roles(token, "alice", (), frozenset()) == {"admin", "writer"}
    assert mapper.roles({"https://example.com/roles": ["admin"]}, "bob", (), frozenset()) == {"auth0-admin"}


@pytest.mark.parametrize(
    "claims",
    [
        {"realm_access": {"groups": ["admin"]}},  # the role under a sibling key
        {"realm_access": [{"roles": ["admin"]}]},  # a list at an intermediate
        {"realm_access": '{"roles": ["admin"]}'},  # a string at an intermediate
        {"resource_access": {"account": {"roles": ["writer"]}}},  # another client's role
        {"resource_access": {"orders-api": [{"roles": ["writer"]}]}},
        {"realm_access": {"roles": "not admin"}},  # a string is one value
    ],
    ids=["sibling", "list", "string", "other-client", "list-deeper", "one-value"],
)
def test_a_role_anywhere_but_at_the_path_grants_nothing(claims: dict[str, object]) -> None:
    assert RoleMapper(KEYCLOAK_RULES).roles(claims, "eve", (), frozenset()) == frozenset()


def test_a_nested_email_needs_the_verified_flag_beside_it_not_the_top_level_one() -> None:
    """The top-level `email_verified` vouches for the top-level `email` only: a rule on `contact.email` must not be
    met by a user who typed the boss's address into a nested field while their own address is verified."""
    mapper = RoleMapper((RoleRule(role="admin", claim="contact.email", values=("boss@corp.example",)),))
    typed = {"contact": {"email": "boss@corp.example"}, "email": "eve@corp.example", "email_verified": True}
    assert mapper.roles(typed, "eve", (), frozenset()) == frozenset()
    unverified = {"contact": {"email": "boss@corp.example", "email_verified": False}}
    assert mapper.roles(unverified, "eve", (), frozenset()) == frozenset()
    vouched = {"contact": {"email": "boss@corp.example", "email_verified": True}}
    assert mapper.roles(vouched, "boss", (), frozenset()) == {"admin"}
