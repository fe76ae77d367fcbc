"""verifier.credentials: the token is read from the Authorization header only (RFC 6750 2.1, RFC 9449 7.1)."""

from __future__ import annotations

import pytest

from verifier.credentials import Credential, TokenScheme, extract
from verifier.errors import MalformedRequest, MissingToken
from verifier.request import RequestAttributes

TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"


def _attrs(headers: dict[str, str], path: str = "/api") -> RequestAttributes:
    return RequestAttributes(method="GET", scheme="https", host="api.example.test", path=path, headers=headers)


@pytest.mark.parametrize(
    ("value", "scheme", "token"),
    [
        (f"Bearer {TOKEN}", TokenScheme.BEARER, TOKEN),
        (f"bearer {TOKEN}", TokenScheme.BEARER, TOKEN),
        (f"BEARER {TOKEN}", TokenScheme.BEARER, TOKEN),
        (f"Bearer   {TOKEN}  ", TokenScheme.BEARER, TOKEN),
        (f"  Bearer {TOKEN}", TokenScheme.BEARER, TOKEN),
        (f"DPoP {TOKEN}", TokenScheme.DPOP, TOKEN),
        (f"dpop {TOKEN}", TokenScheme.DPOP, TOKEN),
        ("Bearer mF_9.B5f-4.1JqM", TokenScheme.BEARER, "mF_9.B5f-4.1JqM"),  # RFC 6750 section 2.1 example
        ("Bearer abc~+/==", TokenScheme.BEARER, "abc~+/=="),
        ("Bearer opaque-token_123", TokenScheme.BEARER, "opaque-token_123"),
    ],
)
def test_extracts_the_token_and_its_scheme(value: str, scheme: TokenScheme, token: str) -> None:
    assert extract(_attrs({"authorization": value})) == Credential(scheme, token)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": ""},
        {"authorization": "Bearer"},
        {"authorization": "Bearer    "},
        {"authorization": "Basic dXNlcjpwYXNz"},
        {"authorization": "Negotiate YIIC"},
        {"authorization": f"Token {TOKEN}"},
        {"authorization": f"Bearer{TOKEN}"},
        {"x-access-token": TOKEN},
        {"cookie": f"access_token={TOKEN}"},
    ],
    ids=["no-header", "empty", "scheme-only", "scheme-and-spaces", "basic", "negotiate", "other-scheme",
         "no-space", "custom-header", "cookie"],
)
def test_no_bearer_or_dpop_token_is_a_missing_token(headers: dict[str, str]) -> None:
    with pytest.raises(MissingToken) as caught:
        extract(_attrs(headers))
    assert caught.value.code == "token_missing"
    assert caught.value.oauth_error is None


def test_a_token_in_the_query_string_is_ignored() -> None:
    with pytest.raises(MissingToken):
        extract(_attrs({}, path=f"/api?access_token={TOKEN}"))


@pytest.mark.parametrize(
    "token",
    [
        *("a b", "tok\"en", "tok,en", "===", "=abc", "tok=en", "tók", "tok\ten", "a;b", "<script>", "tok\r\nX-A: b"),
        *("tok\x00", "tok=\x00", "\u0663\u0664", "\uff21\uff22", "tok==a=", "a\u00a0b", "tok\x7f"),
    ],
)
def test_a_token_outside_the_b64token_syntax_is_a_malformed_request(token: str) -> None:
    with pytest.raises(MalformedRequest) as caught:
        extract(_attrs({"authorization": f"Bearer {token}"}))
    assert caught.value.code == "invalid_request"
    assert caught.value.oauth_error == "invalid_request"
