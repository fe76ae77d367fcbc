"""The metrics listener with a bearer token (`metrics.token_env` / `token_file`; verifier.observe.scrape_auth):
/metrics answers its bearer only, one 401 for every other request, /healthz stays open, the token is compared in
constant time and never logged. A real Prometheus scraping with `credentials_file`:
tests/integration/test_prometheus_scrape.py."""

from __future__ import annotations

import logging

import pytest
from doorkit import http_exchange, running_verifier
from support import compare_digest_calls

from verifier.config.metrics import MetricsAuthSettings
from verifier.observe import scrape_auth
from verifier.observe.audit import JsonFormatter

TOKEN = "m3tr1cs-t0ken-" + "x" * 30
WRONG = "m3tr1cs-t0ken-" + "x" * 29 + "y"  # same length, same prefix: only a comparison of every byte tells


def _with_token(token: str | None = TOKEN) -> dict[str, object]:
    return {"metrics_auth": MetricsAuthSettings(token_env="VERIFIER_METRICS_TOKEN", token=token)}


async def _get(port: int, path: str, *headers: str) -> bytes:
    lines = "".join(f"{h}\r\n" for h in headers)
    return await http_exchange(port, f"GET {path} HTTP/1.1\r\nHost: m\r\n{lines}Connection: close\r\n\r\n".encode(),
                               read_until_close=True)


def _status_headers_body(answer: bytes) -> tuple[bytes, set[bytes], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *headers = head.split(b"\r\n")
    # Date changes from one answer to the next; everything else must be the same for every refusal
    return status, {h.lower() for h in headers if not h.lower().startswith(b"date:")}, body


async def test_metrics_answers_the_bearer_of_the_token() -> None:
    async with running_verifier(_with_token()) as (app, _):
        assert app.ports.metrics is not None
        answer = await _get(app.ports.metrics, "/metrics", f"Authorization: Bearer {TOKEN}")
        assert answer.startswith(b"HTTP/1.1 200") and b"verifier_decisions_total" in answer
        lower = await _get(app.ports.metrics, "/metrics", f"authorization: bearer {TOKEN}")  # RFC 9110: any case
        assert lower.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    "headers",
    [
        (),  # no credentials
        (f"Authorization: Bearer {WRONG}",),
        (f"Authorization: Bearer {TOKEN[:-1]}",),
        (f"Authorization: Bearer {TOKEN}x",),
        ("Authorization: Bearer ",),
        (f"Authorization: Basic {TOKEN}",),  # the right secret under another scheme
        (f"Authorization: {TOKEN}",),
        (f"Authorization: Bearer {WRONG}", f"Authorization: Bearer {TOKEN}"),  # two: which one is meant?
        ("Authorization: Bearer \xe9\xe9",),
    ],
    ids=["missing", "wrong", "prefix", "longer", "empty", "basic", "no-scheme", "two-headers", "not-ascii"],
)
async def test_metrics_refuses_every_other_request_with_one_and_the_same_401(headers: tuple[str, ...]) -> None:
    async with running_verifier(_with_token()) as (app, _):
        assert app.ports.metrics is not None
        reference = _status_headers_body(await _get(app.ports.metrics, "/metrics"))
        answer = _status_headers_body(await _get(app.ports.metrics, "/metrics", *headers))
    status, fields, body = answer
    assert status == b"HTTP/1.1 401 Unauthorized"
    assert b'www-authenticate: bearer realm="metrics"' in fields
    assert b"verifier_" not in body
    assert answer == reference  # nothing says whether the token was missing or wrong


async def test_a_head_request_to_metrics_needs_the_token_too() -> None:
    async with running_verifier(_with_token()) as (app, _):
        assert app.ports.metrics is not None
        raw = b"HEAD /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"
        assert (await http_exchange(app.ports.metrics, raw, read_until_close=True)).startswith(b"HTTP/1.1 401")


async def test_the_page_a_token_opens_is_never_stored_by_a_cache() -> None:
    """The page behind the token says `Cache-Control: no-store` (RFC 9111 section 5.2.2.5), as the 401 does: a
    browser or a proxy in front of the listener keeps no copy to hand to whoever asks next without the token."""
    async with running_verifier(_with_token()) as (app, _):
        assert app.ports.metrics is not None
        for method in ("GET", "HEAD"):
            raw = f"{method} /metrics HTTP/1.1\r\nHost: m\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
            answer = await http_exchange(app.ports.metrics, raw.encode(), read_until_close=True)
            status, fields, _ = _status_headers_body(answer)
            assert status == b"HTTP/1.1 200 OK" and b"cache-control: no-store" in fields, (method, fields)


async def test_healthz_stays_open_for_probes_that_send_no_credentials() -> None:
    async with running_verifier(_with_token()) as (app, _):
        assert app.ports.metrics is not None
        answer = await _get(app.ports.metrics, "/healthz")
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"SERVING\n")


async def test_without_a_token_metrics_stays_open_as_before() -> None:
    async with running_verifier(_with_token(None)) as (app, _):
        assert app.ports.metrics is not None
        assert (await _get(app.ports.metrics, "/metrics")).startswith(b"HTTP/1.1 200")


async def test_the_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = compare_digest_calls(monkeypatch)
    async with running_verifier(_with_token()) as (app, _):
        assert app.ports.metrics is not None
        assert (await _get(app.ports.metrics, "/metrics", f"Authorization: Bearer {WRONG}")).startswith(b"HTTP/1.1 401")
        assert (await _get(app.ports.metrics, "/metrics", f"Authorization: Bearer {TOKEN}")).startswith(b"HTTP/1.1 200")
        assert (await _get(app.ports.metrics, "/metrics", f"Authorization: Basic {WRONG}")).startswith(b"HTTP/1.1 401")
    wrong, right = WRONG.encode(), TOKEN.encode()
    assert calls == [(wrong, right), (right, right), (wrong, right)]  # every request, whatever its scheme


def test_the_authorization_check_alone() -> None:
    token = TOKEN.encode()
    assert scrape_auth.scrape_authorized([f"Bearer {TOKEN}"], token)
    assert scrape_auth.scrape_authorized([f"  Bearer   {TOKEN}  "], token)
    for values in ([], [f"Bearer {WRONG}"], [f"Bearer {TOKEN}", f"Bearer {TOKEN}"], [f"Token {TOKEN}"], ["Bearer"],
                   ["Bearer \udcff"]):
        assert not scrape_auth.scrape_authorized(values, token), values


async def test_neither_the_token_nor_a_wrong_one_reaches_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_verifier(_with_token()) as (app, _):
        assert app.ports.metrics is not None
        bodies = b""
        for headers in ((f"Authorization: Bearer {TOKEN}",), (f"Authorization: Bearer {WRONG}",), ()):
            bodies += await _get(app.ports.metrics, "/metrics", *headers)
        bodies += await _get(app.ports.metrics, "/healthz", f"Authorization: Bearer {TOKEN}")
        metrics_page = app.metrics.render().decode()
    text = "\n".join([JsonFormatter().format(r) for r in caplog.records] + [r.getMessage() for r in caplog.records])
    assert caplog.records, "start-up logs something: the check looks at real lines"
    for secret in (TOKEN, WRONG):
        assert secret not in text
        assert secret.encode() not in bodies
        assert secret not in metrics_page


async def test_a_refused_scrape_renders_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The token is checked before the page is rendered: a stranger's scrapes cost the event loop no rendering."""
    async with running_verifier(_with_token()) as (app, _):
        assert app.ports.metrics is not None
        rendered: list[None] = []
        render = app.metrics.render

        def counted() -> bytes:
            rendered.append(None)
            return render()

        monkeypatch.setattr(app.metrics, "render", counted)
        for _ in range(3):
            assert (await _get(app.ports.metrics, "/metrics", f"Authorization: Bearer {WRONG}")).startswith(
                b"HTTP/1.1 401"
            )
        assert rendered == []
        assert (await _get(app.ports.metrics, "/metrics", f"Authorization: Bearer {TOKEN}")).startswith(b"HTTP/1.1 200")
        assert len(rendered) == 1
