"""What the refused-token cache keeps per entry: the refusal, never the frames that raised it.

A cached refusal used to hold the exception as raised, so its traceback (and a chained cause's) kept
every frame of the failed check alive, with their locals (the request's attributes, headers, the
pipeline's working state): several KiB per junk token, for the refusal's whole lifetime, up to the
cache's bound (100,000 by default). Found by the soak (#24 goal 6; bench/soak.py ``--memdebug``: frames
and tracebacks grew with the refused-token cache).
"""

from __future__ import annotations

import base64
import gc
import secrets
import types

from doorkit import http_exchange, running_verifier


def _request(token: str) -> bytes:
    return (
        "GET /v1/forward-auth HTTP/1.1\r\nHost: verifier\r\nX-Forwarded-Method: GET\r\nX-Forwarded-Proto: https\r\n"
        f"X-Forwarded-Host: api.example.test\r\nX-Forwarded-Uri: /x\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()


def _junk() -> list[str]:
    """Junk of each kind a flood sends: not a JWS, a header that is not JSON, bad base64, an unknown key."""
    head = base64.urlsafe_b64encode(b'{"alg":"ES256","kid":"nope"}').rstrip(b"=").decode()
    return [
        secrets.token_urlsafe(40),
        f"{secrets.token_urlsafe(12)}.{secrets.token_urlsafe(12)}.{secrets.token_urlsafe(12)}",
        f"e30.A{secrets.token_hex(4)}.{secrets.token_urlsafe(12)}",  # payload: 9 characters, not base64url
        f"{head}.{secrets.token_urlsafe(64)}.{secrets.token_urlsafe(64)}",
    ]


def _frames_reachable(root: object) -> int:
    """Frames and tracebacks reachable from ``root`` (through every reference the collector sees)."""
    seen, todo, found = {id(root)}, [root], 0
    while todo:
        obj = todo.pop()
        if isinstance(obj, (types.FrameType, types.TracebackType)):
            found += 1
            continue
        for ref in gc.get_referents(obj):
            if id(ref) not in seen and not isinstance(ref, (type, types.ModuleType)):
                seen.add(id(ref))
                todo.append(ref)
    return found


async def test_a_cached_refusal_keeps_no_frames() -> None:
    async with running_verifier() as (app, _idp):
        for token in _junk():
            answer = await http_exchange(app.ports.http, _request(token))
            assert answer.startswith(b"HTTP/1.1 401"), answer[:80]
        entries = [refused for _key, refused, _expires in app.negative.entries()]
        assert len(entries) >= 3  # each refused token is remembered (an unknown kid may wait for a refresh)
        for refused in entries:
            assert _frames_reachable(refused) == 0, f"{refused.error!r} keeps frames alive"
            assert refused.error.code and str(refused.error)  # what was wrong is still said


async def test_the_caches_sizes_are_exported() -> None:
    """`verifier_token_cache_entries{cache}`: what the soak watches, and what an operator sizing `cache:` reads."""
    async with running_verifier() as (app, idp):
        answer = await http_exchange(app.ports.http, _request(idp.mint()))
        assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
        for token in _junk()[:2]:
            await http_exchange(app.ports.http, _request(token))
        value = app.metrics.registry.get_sample_value
        assert value("verifier_token_cache_entries", {"cache": "positive"}) == 1
        assert value("verifier_token_cache_entries", {"cache": "negative"}) == 2


def _strings_reachable(root: object) -> list[str]:
    """Every string held in ``root``'s own data: through tuples (records), dicts, lists, sets and exceptions (the
    checks a record names are the service's own objects, which reach everything: not followed)."""
    seen, todo, found = {id(root)}, [root], []
    while todo:
        obj = todo.pop()
        if isinstance(obj, str):
            found.append(obj)
            continue
        if not isinstance(obj, (tuple, list, dict, set, frozenset, BaseException)) and obj is not root:
            continue
        for ref in gc.get_referents(obj):
            if id(ref) not in seen and not isinstance(ref, (type, types.ModuleType, types.FunctionType)):
                seen.add(id(ref))
                todo.append(ref)
    return found


async def test_the_caches_do_not_keep_the_tokens_themselves() -> None:
    """A cached token's record and a cached refusal are found by the token's hash, and a request that finds one
    carries the token itself: held in the entry as well, each token (0.5-1.5 KB) would stay in memory as long as
    its entry, up to 100,000 of each per worker."""
    async with running_verifier() as (app, idp):
        token = idp.mint()
        answer = await http_exchange(app.ports.http, _request(token))
        assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
        junk = _junk()
        for bad in junk:
            assert (await http_exchange(app.ports.http, _request(bad))).startswith(b"HTTP/1.1 401")
        positive = [record for _key, record, _expires in app.positive.entries()]
        negative = [refused for _key, refused, _expires in app.negative.entries()]
        assert positive and len(negative) >= 3
        for entry in positive + negative:
            held = _strings_reachable(entry)
            assert held and not any(t in s for s in held for t in [token, *junk]), type(entry).__name__
        again = await http_exchange(app.ports.http, _request(token))  # answered from the record, as before
        assert again.startswith(b"HTTP/1.1 200"), again[:80]
