"""The forward-auth door under a flood: requests that waited in their sockets past `http.shed_after_seconds` and
need a signature check get 503 + Retry-After unchecked (never an allow); cached answers are still served; the
door is healthy again as soon as the loop comes round. Not timed: the loop is held busy on purpose."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from doorkit import http_exchange, running_verifier, until_accepted, until_pending
from support import FrozenClock
from tokenkit import DISCOVERY_URL, JWKS_URL, KIDS, NOW, FakeFetcher, claims, discovery_document, issuer_settings

from verifier.app import App
from verifier.doors import forward_auth
from verifier.settings import DEFAULT_SHED_AFTER_SECONDS, ForwardAuthSettings, Listen, Settings

# The product's shedding threshold (doorkit's verifier sheds only past 5 s, for the tests not about shedding).
PRODUCT_SHEDDING = {"forward_auth": ForwardAuthSettings(shed_after_seconds=DEFAULT_SHED_AFTER_SECONDS)}


def _request(token: str, sub_path: str = "/") -> bytes:
    return f"GET /v1/forward-auth{sub_path} HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n".encode()


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if int(headers.get("content-length", "0")):
        await reader.readexactly(int(headers["content-length"]))
    return int(lines[0].split(" ", 2)[1]), headers


async def _held_flood(app: App, requests: list[bytes], hold: float) -> list[tuple[int, dict[str, str]]]:
    """Sends each request on its own connection while the loop is held busy for `hold` seconds (as it is
    when a flood of ready connections is being read), then reads every answer."""
    conns = [await asyncio.open_connection("127.0.0.1", app.ports.http) for _ in requests]
    # Every connection accepted first: one the door accepts only after the hold is read in a later loop turn.
    await until_accepted(app, [writer.get_extra_info("sockname")[1] for _, writer in conns])
    for (_, writer), raw in zip(conns, requests, strict=True):
        writer.write(raw)  # into the sockets now; the server reads them only after the hold
    time.sleep(hold)  # the point: the loop is busy, the requests wait in their sockets
    try:
        return [await _answer(reader) for reader, _ in conns]
    finally:
        for _, writer in conns:
            writer.close()


async def test_unknown_tokens_that_waited_too_long_get_503_retry_after_and_cached_ones_are_served() -> None:
    async with running_verifier(PRODUCT_SHEDDING) as (app, idp):
        port = app.ports.http
        known = idp.mint(sub="known")
        assert b" 200 " in await http_exchange(port, _request(known))
        fresh = [idp.mint(sub=f"fresh-{i}") for i in range(6)]

        answers = await _held_flood(
            app, [_request(t) for t in fresh] + [_request(known)], hold=DEFAULT_SHED_AFTER_SECONDS + 0.2
        )

        for status, headers in answers[:-1]:
            assert status == 503  # never a pass, never a check
            assert headers["retry-after"] == "1"
            assert headers["x-verifier-reason"] == "overloaded"
            assert "x-authenticated-userid" not in headers
        assert answers[-1][0] == 200 and answers[-1][1]["x-authenticated-userid"] == "known"
        # Healthy right after: the same unknown tokens are checked (and allowed) once the loop comes round (a
        # loaded machine's stall past the threshold may shed one again: Retry-After, as a client would).
        for token in fresh:
            assert await _allowed_within_tries(port, token)
        assert b" 200 " in await http_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: v\r\n\r\n")


async def test_below_the_threshold_nothing_is_shed() -> None:
    # doorkit's threshold (5 s), not the product's 0.25 s: a loaded machine's stall may reach the latter
    async with running_verifier() as (app, idp):
        fresh = [idp.mint(sub=f"fresh-{i}") for i in range(3)]

        answers = await _held_flood(app, [_request(t) for t in fresh], hold=0.0)

        assert [status for status, _ in answers] == [200, 200, 200]


async def test_a_garbage_or_missing_token_is_still_refused_not_shed() -> None:
    async with running_verifier(PRODUCT_SHEDDING) as (app, _):
        requests = [_request("not-a-jwt"), b"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\n\r\n"]

        answers = await _held_flood(app, requests, hold=DEFAULT_SHED_AFTER_SECONDS + 0.2)

        assert answers[0][0] in (503, 401)  # unknown to every cache: shed, or refused; never allowed
        assert answers[1][0] == 401  # nothing to check: answered at once


async def test_one_connection_never_has_more_than_max_pipelined_answers_owed() -> None:
    async with running_verifier(PRODUCT_SHEDDING) as (app, idp):
        tokens = [idp.mint(sub=f"p-{i}") for i in range(3 * forward_auth.MAX_PIPELINED)]
        reader, writer = await asyncio.open_connection("127.0.0.1", app.ports.http)
        owed: list[int] = []
        door = app.forward_auth

        async def count() -> None:
            while True:
                owed.append(max((len(c._pending) for c in door.connections), default=0))
                await asyncio.sleep(0)

        counter = asyncio.ensure_future(count())
        try:
            writer.write(b"".join(_request(t) for t in tokens))
            statuses = [(await _answer(reader))[0] for _ in tokens]
        finally:
            counter.cancel()
            writer.close()
        assert set(statuses) <= {200, 503} and statuses.count(200) > 0
        assert max(owed) <= forward_auth.MAX_PIPELINED


async def test_a_full_pending_queue_answers_503_retry_after_at_once_and_recovers(mint, jwks_document) -> None:  # type: ignore[no-untyped-def]
    fetcher = FakeFetcher()
    fetcher.serve(DISCOVERY_URL, discovery_document())
    fetcher.serve(JWKS_URL, jwks_document)
    settings = Settings(
        grpc=None,
        http=Listen(host="127.0.0.1", port=0),
        metrics=None,
        issuers=(issuer_settings(jwks_cooldown_seconds=0.0, fetch_timeout_seconds=5.0),),
        max_pending_checks=2,
        deadline_seconds=20.0,  # the two in flight keep waiting, however slow the machine
    )
    app = App(settings, clock=FrozenClock(NOW), fetcher=fetcher)
    await app.start()
    try:
        await asyncio.wait_for(app.keys.wait_ready(), 5)
        port = app.ports.http
        fetcher.delay = 30.0  # every key refresh hangs: tokens with unknown kids wait for it
        waiting = [
            asyncio.ensure_future(http_exchange(port, _request(mint(claims(), "ES256", kid=f"rotated-{i}"))))
            for i in range(2)
        ]
        await until_pending(app, 2)
        shed = await http_exchange(port, _request(mint(claims(), "ES256", kid="rotated-x")))
        assert shed.startswith(b"HTTP/1.1 503"), shed[:100]
        assert b"retry-after: 1" in shed.lower() and b"x-verifier-reason: overloaded" in shed.lower()
        assert b"x-authenticated-" not in shed.lower()
        assert not any(w.done() for w in waiting)  # the two in flight are still waiting: the queue was full
        # A cached token is answered while the queue is full; the door is healthy.
        assert b" 200 " in await http_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: v\r\n\r\n")
        fetcher.delay = 0.0
        for w in waiting:
            w.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        ok = await http_exchange(port, _request(mint(claims(), "ES256", kid=KIDS["ES256"])))
        assert ok.startswith(b"HTTP/1.1 200"), ok[:100]
    finally:
        await app.stop(grace=0.1)


ONE_TURN = 300  # first-seen requests read in one loop turn (each on its own connection)
SHORT_SHED = 0.03  # http.shed_after_seconds in these tests: 300 checks take far longer than this


def _blocking_answer(sock: socket.socket) -> tuple[int, dict[str, str]]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before an answer"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    while len(body) < int(headers.get("content-length", "0")):
        body += sock.recv(65536)
    return int(lines[0].split(" ", 2)[1]), headers


async def _one_turn(app: App, requests: list[bytes]) -> list[tuple[int, dict[str, str]]]:
    """Every request on its own connection, all sent by another thread while the server's loop waits (for less
    than the shed threshold), so that one loop turn reads them all; then every answer. A client apart from the
    loop: only the server's own work keeps it busy."""
    port = app.ports.http
    socks = await asyncio.to_thread(lambda: [socket.create_connection(("127.0.0.1", port), 30) for _ in requests])
    try:
        await until_accepted(app, [sock.getsockname()[1] for sock in socks])  # read in one turn, not as accepted
        sender = threading.Thread(target=lambda: [s.sendall(r) for s, r in zip(socks, requests, strict=True)])
        sender.start()
        sender.join()  # the loop does not run meanwhile: the requests wait in their sockets
        return await asyncio.to_thread(lambda: [_blocking_answer(sock) for sock in socks])
    finally:
        for sock in socks:
            sock.close()


async def _allowed_within_tries(port: int, token: str, tries: int = 20) -> bool:
    for _ in range(tries):
        answer = await http_exchange(port, _request(token))
        if b" 200 " in answer:
            return True
        assert answer.startswith(b"HTTP/1.1 503"), answer[:100]  # shed again, never anything else
        await asyncio.sleep(0.05)
    return False


async def test_a_burst_of_first_seen_tokens_is_checked_only_while_the_loop_keeps_up_and_none_is_starved() -> None:
    # A first-seen check runs as its request is read: once the loop has been at it for `shed_after_seconds`,
    # the rest of the burst is refused at once (503 + Retry-After), never allowed, and each refused token is
    # checked and allowed when it comes back with room in the loop. The client is another thread, so only
    # the server's own work keeps its loop busy.
    async with running_verifier({"forward_auth": ForwardAuthSettings(shed_after_seconds=SHORT_SHED)}) as (app, idp):
        port = app.ports.http
        for i in range(5):  # the door learns what a check costs
            assert b" 200 " in await http_exchange(port, _request(idp.mint(sub=f"warm-{i}")))
        fresh = [idp.mint(sub=f"turn-{i}") for i in range(ONE_TURN)]

        answers = await _one_turn(app, [_request(t) for t in fresh])

        statuses = [status for status, _ in answers]
        assert set(statuses) <= {200, 503}
        assert statuses.count(503) > 0 and statuses.count(200) <= ONE_TURN * 0.6, statuses.count(200)
        for status, headers in answers:
            if status == 503:
                assert headers["retry-after"] == "1" and "x-authenticated-userid" not in headers
        # Not starved: every shed token, sent again as Retry-After asks (sooner here), is checked and allowed once
        # the loop has room (a slow machine may still be behind on the first try).
        for token, status in zip(fresh, statuses, strict=True):
            if status == 503:
                assert await _allowed_within_tries(port, token)


async def test_a_flood_of_forged_tokens_never_gets_an_allow_and_a_legit_token_gets_through() -> None:
    async with running_verifier({"forward_auth": ForwardAuthSettings(shed_after_seconds=SHORT_SHED)}) as (app, idp):
        port = app.ports.http
        legit = idp.mint(sub="legit")
        head, _, _ = legit.rpartition(".")
        forged = [idp.mint(sub=f"forged-{i}").rpartition(".")[0] + "." + legit.rpartition(".")[2] for i in range(150)]
        forged += [f"{head}.{'A' * 86}", "not-a-jwt", "e30.e30.", "Bearer"] * 10

        for _ in range(2):  # twice: the second time the refusals are remembered (the negative cache)
            answers = await _one_turn(app, [_request(t) for t in [*forged, legit]])

            for status, headers in answers[:-1]:
                assert status in (401, 503), status  # refused or shed; never an allow
                assert "x-authenticated-userid" not in headers
        assert await _allowed_within_tries(port, legit)  # the legit caller retries (Retry-After) and gets through
