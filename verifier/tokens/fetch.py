"""Outbound HTTP for discovery and JWKS: the single seam for fault injection (introspection has its own,
`verifier.tokens.introspection_http`).

Every call has a deadline and a size bound. Tests replace `Fetcher` with a faulty one; production
uses one pooled keep-alive `aiohttp` session for all providers, built by the composition root.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import re
import ssl
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from verifier.errors import ProviderUnavailable
from verifier.request import DEFAULT_PORTS
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


def check_learned_url(url: object, *, issuer: str, what: str, origin: str = "") -> str:
    """A URL a provider's metadata names, checked as a configured one would be; else `ProviderUnavailable`.

    Keys are trusted and secrets sent (the introspection client secret, the poll bearer) to whatever
    the metadata says, so it gets the outbound URL rule: https, or plain http on loopback only for an
    issuer that is itself plain http (allowed by the config), never a downgrade from https. With `origin`
    (an issuer template's pinned scheme://host[:port]) the URL must also be on that origin.
    """
    problem = url_problem(url, what, allow_http=issuer.startswith("http://"))
    if problem:
        raise ProviderUnavailable(f"{what} refused: {problem}")
    assert isinstance(url, str)
    if origin and url_origin(url) != origin:
        raise ProviderUnavailable(f"{what} refused: not on the issuer template's host {origin!r} ({url!r})")
    return url


def url_origin(url: str) -> str:
    """scheme://host[:port] of a URL, lower-cased, with the port only when it is not the scheme's default."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # not a port: matches no origin
        return ""
    default = DEFAULT_PORTS.get(parts.scheme.lower())
    host = (parts.hostname or "").lower()
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme.lower()}://{host}" + (f":{port}" if port is not None and port != default else "")


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


PIN_MISMATCH = "the server's key matches no jwks_pin_sha256"


def spki_sha256(der_certificate: bytes) -> bytes:
    """SHA-256 of a certificate's SubjectPublicKeyInfo: the pin of RFC 7469 section 2.4 (HPKP)."""
    public_key = x509.load_der_x509_certificate(der_certificate).public_key()
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def issuer_tls_context(*, ca_file: str = "", pins: frozenset[bytes] = frozenset()) -> ssl.SSLContext:
    """A client TLS context trusting `ca_file` (else the system's CAs) that, with `pins`, also requires the
    server's public key (SPKI SHA-256) to be one of them.

    The pin is checked inside the TLS handshake (`SSLContext.sslobject_class`, which both asyncio and
    uvloop use), after the usual chain and host-name checks and before a byte of HTTP is sent, on every
    new connection. So a CA that issues a certificate for the provider's name is not enough: the server
    must hold a pinned key. Pinning the key, not the certificate, survives a certificate renewal that
    keeps the key.
    """
    context = ssl.create_default_context(cafile=ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if pins:

        class PinnedObject(ssl.SSLObject):
            def do_handshake(self) -> None:
                super().do_handshake()  # raises SSLWantReadError until the handshake is done
                der = self.getpeercert(binary_form=True)
                if not der or not any(hmac.compare_digest(spki_sha256(der), pin) for pin in pins):
                    raise ssl.SSLCertVerificationError(PIN_MISMATCH)

        context.sslobject_class = PinnedObject
    return context


def issuer_tls(*, ca_file: str = "", pins: tuple[str, ...] = ()) -> ssl.SSLContext:
    """`issuer_tls_context` from an issuer's settings: `tls_ca_file` and the base64 `jwks_pin_sha256` entries."""
    return issuer_tls_context(ca_file=ca_file, pins=frozenset(base64.b64decode(pin) for pin in pins))


class TlsFetcher:
    """The shared HTTP fetcher under one issuer's TLS context (its CA bundle, its pinned keys)."""

    def __init__(self, http: HttpFetcher, context: ssl.SSLContext) -> None:
        self._http = http
        self._context = context

    async def get_json(self, url: str, *, timeout: float, max_bytes: int) -> FetchResult:
        """GETs JSON as `HttpFetcher.get_json` does, over this issuer's TLS context."""
        return await self._http.get_json(url, timeout=timeout, max_bytes=max_bytes, tls=self._context)


class HttpFetcher:
    """The production fetcher, on the session `session()` returns (the root's pooled one, built inside the
    event loop on first use; the root closes it)."""

    def __init__(self, session: Callable[[], aiohttp.ClientSession]) -> None:
        self._client = session

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared session (tests hand it to an SSF poller or read from it directly)."""
        return self._client()

    def with_tls(self, *, ca_file: str = "", pins: tuple[str, ...] = ()) -> TlsFetcher:
        """This fetcher trusting only `ca_file` (when given), and only servers holding a pinned key (when given).

        A pinned issuer's URLs must be https: over plain http there is no key to check.
        """
        return TlsFetcher(self, issuer_tls(ca_file=ca_file, pins=pins))

    async def get_json(
        self, url: str, *, timeout: float, max_bytes: int, tls: ssl.SSLContext | None = None
    ) -> FetchResult:
        """GETs JSON with a total deadline and a body bound (over an issuer's own TLS context, if given)."""
        if tls is not None and not url.lower().startswith("https://"):
            raise ProviderUnavailable("an issuer with TLS rules (pins, CA file) is fetched over https only")
        try:
            async with asyncio.timeout(timeout):
                async with self._client().get(url, allow_redirects=False, ssl=tls or True) as response:
                    if response.status != 200:
                        raise ProviderUnavailable(f"HTTP {response.status} from provider")
                    body = await read_body(response, max_bytes, "provider document")
                    max_age = parse_max_age(response.headers.get("Cache-Control"))
        except TimeoutError as exc:
            raise ProviderUnavailable("provider timed out") from exc
        except aiohttp.ClientError as exc:
            if PIN_MISMATCH in str(exc):
                raise ProviderUnavailable(f"provider refused: {PIN_MISMATCH}") from exc
            raise ProviderUnavailable(f"provider unreachable ({type(exc).__name__})") from exc
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ProviderUnavailable("provider sent malformed JSON") from exc
        return FetchResult(document, max_age)
