"""Which declared public origin (`dpop.origins`) a request made to our own endpoints is on, by its `Host`."""

from __future__ import annotations

import pytest

from verifier.config.dpop import normalize_origin
from verifier.doors.public_origin import PublicOrigins
from verifier.request import normalize_host

DECLARED = PublicOrigins.declared(
    normalize_origin(o, allow_http=True)
    for o in ("https://api.example.test", "http://api.example.test", "https://[::1]:8443", "http://intra.test:8080")
)


@pytest.mark.parametrize(
    ("host", "on"),
    [
        ("api.example.test", ("https", "api.example.test")),  # a bare Host names https before plain http
        ("API.Example.Test.", ("https", "api.example.test")),
        ("api.example.test:443", ("https", "api.example.test")),
        ("api.example.test:80", ("http", "api.example.test")),
        ("[::1]:8443", ("https", "[::1]:8443")),
        ("intra.test:8080", ("http", "intra.test:8080")),
        ("intra.test", None),  # the default port is not the declared one
        ("api.example.test:8443", None),
        ("[::1]", None),
        ("evil.example", None),
        ("", None),
    ],
)
def test_a_host_is_on_the_declared_origin_it_names_or_on_none(host: str, on: tuple[str, str] | None) -> None:
    assert DECLARED.on(normalize_host(host)) == on


def test_nothing_declared_is_on_no_origin() -> None:
    assert not PublicOrigins() and not PublicOrigins.declared(()) and DECLARED
    assert PublicOrigins().on("api.example.test") is None
