"""Baseline (c): the physical floor of a first-seen token, measured in-process.

Per algorithm, timeit-style loops over distinct tokens: ``verify`` is one ``cryptography`` signature
check (RFC 7518 section 3: ES256 takes raw r||s, converted to DER here); ``parse`` adds splitting
the compact JWS, base64url-decoding its three parts and parsing header and claims as JSON (RFC 7515
section 7.1). ``pyjwt`` is ``jwt.decode`` with a pre-loaded key, for reference.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

from bench import wire


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _verifier(alg: str, public: Any) -> Any:
    if alg == "ES256":

        def verify(sig: bytes, data: bytes) -> None:
            der = utils.encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
            public.verify(der, data, ec.ECDSA(hashes.SHA256()))

    elif alg == "RS256":

        def verify(sig: bytes, data: bytes) -> None:
            public.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())

    else:

        def verify(sig: bytes, data: bytes) -> None:
            public.verify(sig, data)

    return verify


def _per_op(fn: Any, items: list[Any], min_time_s: float) -> float:
    """Seconds per call, best of 3 rounds of at least ``min_time_s`` each."""
    best = float("inf")
    for _ in range(3):
        n = 0
        t0 = time.perf_counter()
        while True:
            for item in items:
                fn(item)
            n += len(items)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time_s:
                break
        best = min(best, elapsed / n)
    return best


def parse_and_verify(alg: str, public: Any, *, verify_signature: bool = True) -> Any:
    """The raw parse + verify of one token (the floor a first-seen check is compared with); without
    `verify_signature`, the same parse and signing input with the signature left unchecked (what the
    floor's parse alone costs: `bench.inproc --no-verify`)."""
    verify = _verifier(alg, public) if verify_signature else _unverified

    def check(token: str) -> None:
        head, payload, sig = token.split(".")
        json.loads(_b64(head))
        json.loads(_b64(payload))
        verify(_b64(sig), f"{head}.{payload}".encode())

    return check


def _unverified(sig: bytes, data: bytes) -> None: ...


def measure(alg: str, private_key: Any, tokens: list[str], issuer: str, *, min_time_s: float = 0.3) -> dict[str, float]:
    """Microseconds per operation for ``alg``: verify, parse+verify, pyjwt.decode."""
    public = private_key.public_key()
    verify = _verifier(alg, public)
    prepared = []
    for t in tokens:
        head, payload, sig = t.split(".")
        prepared.append((_b64(sig), f"{head}.{payload}".encode()))

    def verify_only(item: tuple[bytes, bytes]) -> None:
        verify(*item)

    parse_and_verify_ = parse_and_verify(alg, public)

    def pyjwt_decode(token: str) -> None:
        jwt.decode(token, public, algorithms=[alg], audience=wire.AUDIENCE, issuer=issuer)

    return {
        "verify_us": _per_op(verify_only, prepared, min_time_s) * 1e6,
        "parse_verify_us": _per_op(parse_and_verify_, tokens, min_time_s) * 1e6,
        "pyjwt_decode_us": _per_op(pyjwt_decode, tokens, min_time_s) * 1e6,
    }
