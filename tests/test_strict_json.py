"""`verifier.strict_json`: client-made JSON read one way only (here, the lone-surrogate rule; the other rules are
tested through the DPoP and WebAuthn readers, tests/binding/test_dpop.py and tests/webauthn/test_webauthn.py)."""

from __future__ import annotations

import pytest

from verifier import strict_json


@pytest.mark.parametrize(
    "text",
    [
        rb'"\ud800"',
        rb'{"jti": "a\udfffb"}',
        rb'{"k\udc00": 1}',
        rb'[["ok", "\uD83D"]]',
        rb'"\ude00\ud83d"',  # a pair the wrong way round is two lone halves
        rb'{"a": {"b": ["\\", "\udbff"]}}',
    ],
    ids=["top-level", "value", "member-name", "nested-array", "reversed-pair", "after-an-escaped-backslash"],
)
def test_a_string_holding_a_lone_surrogate_is_refused(text: bytes) -> None:
    """RFC 8259 section 8.2 (readers behave unpredictably), I-JSON RFC 7493 section 2.1 (MUST NOT): the escape is
    valid JSON syntax, and `json.loads` builds a str that UTF-8 cannot carry."""
    with pytest.raises(ValueError, match="lone surrogate"):
        strict_json.loads(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (rb'"\ud83d\ude00"', "\U0001f600"),
        (rb'{"jti": "\u00e9\u0041"}', {"jti": "\u00e9A"}),
        (rb'"\\ud800"', "\\ud800"),  # an escaped backslash, then text: no surrogate
        ('"\U0001f600"'.encode(), "\U0001f600"),
    ],
    ids=["escaped-pair", "other-escapes", "escaped-backslash", "raw-utf8"],
)
def test_escapes_that_make_unicode_text_are_taken(text: bytes, value: object) -> None:
    assert strict_json.loads(text) == value
