"""Outbound HTTP for discovery, JWKS and (later) introspection: the single seam for fault injection.

Every call has a deadline and a size bound. Tests replace `Fetcher` with a faulty one; production
uses one pooled keep-alive `aiohttp` session for all providers, built by the composition root.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp

from verifier.errors import ProviderUnavailable
from verifier.settings import url_problem

_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*(\d+)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True, slots=True)
class FetchResult:
    """A decoded JSON document and how long its sender says it stays fresh (None: unsaid)."""

    document: Any
    max_age: float | None


class Fetcher(Protocol):
    """Fetches JSON over HTTP with a deadline."""

    async def get_json(self, url: str, *, timeout: float, max_bytes: int) -> FetchResult:
        """GETs `url`; raises `ProviderUnavailable` on any failure (transport, status, size, JSON)."""
        ...


def check_learned_url(url: object, *, issuer: str, what: str) -> str:
    """A URL a provider's metadata names, checked as a configured one would be; else `ProviderUnavailable`.

    Keys are trusted and secrets sent (the introspection client secret, the poll bearer) to whatever
    the metadata says, so it gets the outbound URL rule: https, or plain http on loopback only for an
    issuer that is itself plain http (allowed by the config), never a downgrade from https.
    """
    problem = url_problem(url, what, allow_http=issuer.startswith("http://"))
    if problem:
        raise ProviderUnavailable(f"{what} refused: {problem}")
    assert isinstance(url, str)
    return url


async def read_body(response: aiohttp.ClientResponse, max_bytes: int, what: str) -> bytes:
    """The whole body, read to its end, or `ProviderUnavailable` as soon as it passes `max_bytes`.

    `StreamReader.read(n)` returns only what is buffered so far: a body that arrives in more than one
    piece (two writes, a TCP segment boundary, chunked encoding) would come back cut off. A declared
    Content-Length over the bound is refused before any of the body is read.
    """
    if (response.content_length or 0) > max_bytes:
        raise ProviderUnavailable(f"{what} too large")
    chunks: list[bytes] = []
    size = 0
    while chunk := await response.content.readany():
        size += len(chunk)
        if size > max_bytes:
            raise ProviderUnavailable(f"{what} too large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_max_age(cache_control: str | None) -> float | None:
    """Reads `max-age` from a Cache-Control header; `no-store`/`no-cache` mean zero."""
    if not cache_control:
        return None
    lowered = cache_control.lower()
    if "no-store" in lowered or "no-cache" in lowered:
        return 0.0
    match = _MAX_AGE.search(cache_control)
    return float(match.group(1)) if match else None


class HttpFetcher:
    """The production fetcher, on the session `session()` returns (the root's pooled one, built inside the
    event loop on first use; the root closes it)."""

    def __init__(self, session: Callable[[], aiohttp.ClientSession]) -> None:
        self._client = session

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared session (introspection posts through it too)."""
        return self._client()

    async def get_json(self, url: str, *, timeout: float, max_bytes: int) -> FetchResult:
        """GETs JSON with a total deadline and a body bound."""
        try:
            async with asyncio.timeout(timeout):
                async with self._client().get(url, allow_redirects=False) as response:
                    if response.status != 200:
                        raise ProviderUnavailable(f"HTTP {response.status} from provider")
                    body = await read_body(response, max_bytes, "provider document")
                    max_age = parse_max_age(response.headers.get("Cache-Control"))
        except TimeoutError as exc:
            raise ProviderUnavailable("provider timed out") from exc
        except aiohttp.ClientError as exc:
            raise ProviderUnavailable(f"provider unreachable ({type(exc).__name__})") from exc
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ProviderUnavailable("provider sent malformed JSON") from exc
        return FetchResult(document, max_age)
