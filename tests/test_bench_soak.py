"""The soak's load and verdict (bench/soak.py, #24 goal 6): the issue's mix, and the slope after warm-up."""

from __future__ import annotations

import types

import jwt as pyjwt

from bench import soak
from verifier.devidp import DevIdentityProvider


def test_the_mix_is_cached_first_seen_and_junk_eight_one_one() -> None:
    issuer = types.SimpleNamespace(idp=DevIdentityProvider(port=1))
    mix = soak.Mix(issuer, first_seen_ttl_s=120, lifetime_s=3600)  # type: ignore[arg-type]
    first, second = mix.tokens(100), mix.tokens(100)
    cached = [t for t in first + second if t in mix.cached]
    assert len(cached) == 160 and len(set(cached)) == soak.CACHED_POOL
    fresh = [t for t in first + second if t not in mix.cached and t.count(".") == 2 and "nope" not in t]
    fresh = [t for t in fresh if pyjwt.get_unverified_header(t).get("kid") != "nope"]
    assert len(fresh) == len(set(fresh)) == 20 == mix.minted  # first-seen: each sent once
    claims = pyjwt.decode(fresh[0], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 120
    junk = [t for t in first + second if t not in mix.cached and t not in fresh]
    assert len(junk) == len(set(junk)) == 20


def _samples(rss_mib: list[float]) -> list[dict[str, object]]:
    return [
        dict(t_s=10.0 * i, pss_kib=r * 1024, worker_rss_kib=r * 1024, fds=25, allowed=90, refused=10, errors=0)
        for i, r in enumerate(rss_mib)
    ]


def test_the_verdict_fits_the_last_two_thirds_against_a_tenth_of_a_mib_per_minute() -> None:
    warm_then_flat = soak.summary(_samples([60, 70, 80, 90, 90, 90, 90, 90, 90]))
    assert warm_then_flat["slope"]["worker_rss_kib"] == 0.0 and warm_then_flat["rss_flat"]
    assert warm_then_flat["slope_whole"]["worker_rss_kib"] > 0  # the warm-up is not judged
    assert warm_then_flat["warmup_end_s"] == 30.0 and warm_then_flat["refused"] == 90
    # 0.05 MiB per 10 s sample = 0.3 MiB/min: a slow leak is a MISS
    leaking = soak.summary(_samples([90 + 0.05 * i for i in range(12)]))
    assert abs(leaking["slope"]["worker_rss_kib"] - 0.3) < 1e-9 and not leaking["rss_flat"]
