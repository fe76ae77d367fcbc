"""verifier.decision: refusals become RFC 6750 answers in one place; allow headers cannot be injected."""

from __future__ import annotations

import json

import pytest

from verifier.decision import Decision, allow
from verifier.doors.refusals import challenge, refuse
from verifier.errors import (
    AudienceMismatch,
    BadSignature,
    Forbidden,
    InternalError,
    InvalidToken,
    MalformedRequest,
    MissingToken,
    Overloaded,
    ProviderUnavailable,
    Scheme,
    TokenExpired,
    VerifierError,
)
from verifier.principal import Principal

REALM = "api"


def _header(decision: Decision, name: str) -> str | None:
    values = [v for k, v in decision.response_headers if k == name]
    assert len(values) <= 1
    return values[0] if values else None


def _principal(**overrides: object) -> Principal:
    values: dict[str, object] = {
        "issuer": "https://issuer.example.test",
        "subject": "user-1",
        "client_id": "client-1",
        "scopes": ("read", "write"),
        "roles": frozenset({"b", "a"}),
        "expires_at": 1_700_000_300.0,
        "claims": {},
    }
    values.update(overrides)
    return Principal(**values)  # type: ignore[arg-type]


def test_a_missing_token_gets_a_bare_bearer_challenge() -> None:
    decision = refuse(MissingToken("no access token"), realm=REALM)
    assert (decision.allowed, decision.status, decision.reason) == (False, 401, "token_missing")
    assert _header(decision, "www-authenticate") == 'Bearer realm="api"'
    assert decision.body == b""
    assert decision.cache_max_age == 0


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidToken("bad"), "invalid_token"),
        (BadSignature("bad"), "signature_invalid"),
        (TokenExpired("bad"), "token_expired"),
    ],
)
def test_an_invalid_token_gets_error_and_description(error: VerifierError, code: str) -> None:
    decision = refuse(error, realm=REALM)
    assert (decision.status, decision.reason) == (401, code)
    assert _header(decision, "www-authenticate") == 'Bearer realm="api", error="invalid_token", error_description="bad"'
    assert json.loads(decision.body) == {"error": "invalid_token", "error_description": "bad"}


def test_a_dpop_refusal_names_the_dpop_scheme() -> None:
    decision = refuse(InvalidToken("bad"), realm=REALM, scheme=Scheme.DPOP)
    assert (_header(decision, "www-authenticate") or "").startswith('DPoP realm="api", error="invalid_token"')


@pytest.mark.parametrize("error", [AudienceMismatch("wrong audience"), Forbidden("no")])
def test_audience_and_policy_refusals_are_403_insufficient_scope(error: VerifierError) -> None:
    decision = refuse(error, realm=REALM)
    assert decision.status == 403
    assert 'error="insufficient_scope"' in (_header(decision, "www-authenticate") or "")
    assert json.loads(decision.body)["error"] == "insufficient_scope"
    assert decision.outcome == "deny"


def test_a_malformed_request_is_400_invalid_request() -> None:
    decision = refuse(MalformedRequest("two schemes"), realm=REALM)
    assert decision.status == 400
    assert 'error="invalid_request"' in (_header(decision, "www-authenticate") or "")


@pytest.mark.parametrize("error", [ProviderUnavailable("down"), Overloaded("busy"), InternalError("bug")])
def test_unavailable_is_503_with_retry_after_and_no_challenge(error: VerifierError) -> None:
    decision = refuse(error, realm=REALM)
    assert decision.status == 503
    assert _header(decision, "retry-after") == "1"
    assert _header(decision, "www-authenticate") is None
    assert json.loads(decision.body)["error"] == "temporarily_unavailable"
    assert decision.outcome == "error"
    assert decision.cache_max_age == 0


def test_only_reusable_refusals_may_be_cached() -> None:
    assert refuse(BadSignature("x"), realm=REALM, reusable_for=10).cache_max_age == 10
    assert refuse(TokenExpired("x"), realm=REALM, reusable_for=10).cache_max_age == 0
    assert refuse(MissingToken("x"), realm=REALM, reusable_for=10).cache_max_age == 0


HOSTILE_DESCRIPTIONS = [
    'bad" , error="none',
    "line\r\nSet-Cookie: pwned=1",
    "back\\slash",
    "nul\x00byte",
    "tab\there",
    "unicode \u2028 sep \u00e9",
    "x" * 1000,
]


@pytest.mark.parametrize("description", HOSTILE_DESCRIPTIONS)
def test_error_description_cannot_inject_quotes_or_crlf(description: str) -> None:
    decision = refuse(InvalidToken(description), realm='re"alm\r\n')
    value = _header(decision, "www-authenticate") or ""
    assert "\r" not in value and "\n" not in value and "\\" not in value and "\x00" not in value
    assert value.count('"') == 6  # realm, error, error_description: three quoted strings
    assert all(0x20 <= ord(c) < 0x7F for c in value)
    body = json.loads(decision.body)
    assert '"' not in body["error_description"] and "\n" not in body["error_description"]
    assert len(body["error_description"]) <= 200
    head = decision.http_head
    assert head.count(b"\r\n") == len(decision.response_headers) + 6  # status + headers + 5 fixed lines


def test_challenge_quotes_every_parameter() -> None:
    assert challenge(Scheme.BEARER, "r", {"error": "invalid_token", "scope": "a b"}) == (
        'Bearer realm="r", error="invalid_token", scope="a b"'
    )


def test_allow_sets_identity_headers_for_the_upstream() -> None:
    decision = allow(_principal(), cache_max_age=30)
    assert (decision.allowed, decision.status, decision.reason, decision.outcome) == (True, 200, "ok", "allow")
    assert dict(decision.upstream_headers) == {
        "x-authenticated-userid": "user-1",
        "x-authenticated-scope": "read write",
        "x-authenticated-issuer": "https://issuer.example.test",
        "x-authenticated-roles": "a,b",
    }
    assert decision.roles == ("a", "b")
    assert decision.response_headers == ()


def test_allow_without_roles_sends_no_roles_header() -> None:
    assert "x-authenticated-roles" not in dict(allow(_principal(roles=frozenset())).upstream_headers)


@pytest.mark.parametrize(
    "hostile",
    ["evil\r\nx-authenticated-userid: admin", "a\nb", "a\rb", "nul\x00", "del\x7f", "tab\tsep", "\x1b[31m"],
)
def test_allow_headers_replace_cr_lf_and_controls_in_claims(hostile: str) -> None:
    decision = allow(_principal(subject=hostile, scopes=(hostile,), roles=frozenset({hostile})))
    for _name, value in decision.upstream_headers:
        assert all(c >= " " and c != "\x7f" for c in value), repr(value)
        if _name != "x-authenticated-issuer":  # the principal's issuer is not the hostile value
            assert "\ufffd" in value, repr(value)  # replaced, not taken out: `nul<NUL>` never reads as `nul`
    head = decision.http_head
    assert head.count(b"\r\n") == len(decision.upstream_headers) + 5
    lines = head.split(b"\r\n")
    assert sum(line.startswith(b"x-authenticated-userid:") for line in lines) == 1


@pytest.mark.parametrize(
    ("subject", "header"),
    [
        ("alice", "alice"),
        ("user 1", "user 1"),
        (" root", '" root"'),
        ("root\u00a0", '"root\u00a0"'),
        ('"root"', '"\\"root\\""'),
        ("ro\x00ot", "ro\ufffdot"),
    ],
    ids=["plain", "inner-space", "edge-space", "edge-nbsp", "quoted", "control"],
)
def test_a_subject_that_would_read_as_another_is_a_quoted_string(subject: str, header: str) -> None:
    """` root` bare is `root` once a gateway drops the space: X-Authenticated-Userid names another user."""
    assert dict(allow(_principal(subject=subject)).upstream_headers)["x-authenticated-userid"] == header


@pytest.mark.parametrize(
    ("roles", "header"),
    [
        ({"user,admin"}, '"user,admin"'),
        ({" admin", "user"}, '" admin",user'),
        ({'"admin"'}, '"\\"admin\\""'),
        ({"a\\b", "c"}, '"a\\\\b",c'),
        ({"x\x00, admin", "y"}, '"x\ufffd, admin",y'),
        ({"reader", "writer"}, "reader,writer"),
    ],
    ids=["comma", "edge-space", "quoted", "backslash", "control-then-comma", "plain"],
)
def test_a_role_is_one_element_of_the_roles_header_whatever_it_holds(roles: set[str], header: str) -> None:
    """`user,admin` sent bare is the roles `user` and `admin` upstream: an element that would not read as itself
    is an RFC 9110 quoted-string; the common case stays as it was."""
    assert dict(allow(_principal(roles=frozenset(roles))).upstream_headers)["x-authenticated-roles"] == header


def test_http_head_of_a_refusal_is_exact() -> None:
    decision = refuse(InvalidToken("bad token"), realm=REALM)
    body = b'{"error": "invalid_token", "error_description": "bad token"}'
    assert decision.body == body
    assert decision.http_head == (
        b"HTTP/1.1 401 Unauthorized\r\n"
        b'www-authenticate: Bearer realm="api", error="invalid_token", error_description="bad token"\r\n'
        b"x-verifier-reason: invalid_token\r\n"
        b"x-accel-expires: 0\r\n"
        b"cache-control: no-store\r\n"
        b"content-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
    )


def test_http_head_of_an_allow_is_exact() -> None:
    assert allow(_principal(roles=frozenset()), cache_max_age=15).http_head == (
        b"HTTP/1.1 200 OK\r\n"
        b"x-authenticated-userid: user-1\r\n"
        b"x-authenticated-scope: read write\r\n"
        b"x-authenticated-issuer: https://issuer.example.test\r\n"
        b"x-verifier-reason: ok\r\n"
        b"x-accel-expires: 14\r\n"
        b"cache-control: private, max-age=15\r\n"
        b"content-length: 0\r\n"
    )


def test_http_head_is_stable_and_built_once() -> None:
    decision = refuse(InvalidToken("bad"), realm=REALM)
    first = decision.http_head
    assert decision.http_head is first
    assert refuse(InvalidToken("bad"), realm=REALM).http_head == first
    assert decision.memo["http"] is first


def test_the_memo_does_not_affect_equality() -> None:
    a = refuse(InvalidToken("bad"), realm=REALM)
    b = refuse(InvalidToken("bad"), realm=REALM)
    _ = a.http_head
    assert a == b


@pytest.mark.parametrize("text", ["用户", "rôle-€", "emoji-\U0001f600"])
def test_http_head_survives_claims_outside_latin1(text: str) -> None:
    head = allow(_principal(subject=text, roles=frozenset({text}))).http_head
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")


def test_every_decision_and_every_copy_has_a_memo_of_its_own() -> None:
    """A memo holds an answer's serialized bytes: shared with a copy that answers differently (another max-age,
    the client's headers), one would be answered with the other's bytes."""
    first, second = allow(_principal()), allow(_principal())
    assert first.memo is not second.memo
    first.http_head  # noqa: B018  # built, and kept in its memo
    shorter = first._replace(cache_max_age=5)
    assert shorter.memo is not first.memo and shorter.memo == {}
    assert b"max-age=5" in shorter.http_head and first.memo["http"] != shorter.memo["http"]
    given: dict[str, bytes] = {}
    assert first._replace(body=b"x", memo=given).memo is given


def test_a_decision_is_immutable_and_compared_without_its_memo() -> None:
    decision = allow(_principal())
    with pytest.raises(AttributeError):
        decision.status = 403  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del decision.status
    with pytest.raises(TypeError):
        decision._replace(nonsense=1)
    built = decision.http_head
    again = allow(_principal())
    assert again == decision and hash(again) == hash(decision)  # memo: built vs empty
    assert (again != decision) is False
    assert again != decision._replace(status=201) and decision != decision._compared()
    assert "memo" not in repr(decision) and built.decode("latin-1") not in repr(decision)


def test_a_cached_allow_is_one_object_for_the_garbage_collector() -> None:
    """An allow lives in the verified-token cache as long as its token, and every tracked object there is walked
    by each collection of its generation: the allow itself, no `__dict__` or memo beside it."""
    import gc

    name = "".join(["x-", "t"])  # built here, as a rendered claim is (a constant may sit in a frozen generation)
    decision = allow(_principal(subject="".join(["u", "1"])), headers=((name, name),))
    decision.http_head  # noqa: B018  # its memo holds bytes
    gc.collect()
    gc.collect()  # a tuple of tuples is untracked by the collection after its members' (one may move it first)
    tracked = [o for o in gc.get_referents(decision) if gc.is_tracked(o) and o is not Decision]
    assert tracked == [] and not hasattr(decision, "__dict__")
