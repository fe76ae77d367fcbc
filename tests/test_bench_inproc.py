"""bench.inproc's collector clock: the GC CPU it reports is the timed rounds' only."""

from __future__ import annotations

import gc

from bench.inproc import _GcClock


def test_the_gc_clock_counts_the_collections_made_while_it_is_on_only() -> None:
    """Fails if the callback times collections while `on` is False (the raw loop's, start-up's)."""
    clock = _GcClock()
    try:
        gc.collect(0)
        assert clock.count == [0, 0, 0] and clock.spent == [0.0, 0.0, 0.0]
        clock.on = True
        gc.collect(1)
        clock.on = False
        gc.collect(1)
        assert clock.count == [0, 1, 0] and clock.spent[1] >= 0.0
        assert clock.report(1).startswith("GC ") and "gen1: 1 collections" in clock.report(1)
        assert "gen0" not in clock.report(1)
    finally:
        gc.callbacks.remove(clock._callback)


def test_no_verify_leaves_the_signature_unchecked_in_both_loops_and_only_there() -> None:
    """`--no-verify`: the raw loop skips the verify only when asked, and the checks' ES256 verify becomes its
    length check in this process (restored after). Fails if either loop still verifies, or the default stops."""
    import pytest
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec

    from bench import floor, inproc
    from verifier.tokens import keys

    key = ec.generate_private_key(ec.SECP256R1())
    forged = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0." + "A" * 86  # 64 zero bytes: never a valid signature
    with pytest.raises(InvalidSignature):
        floor.parse_and_verify("ES256", key.public_key())(forged)
    floor.parse_and_verify("ES256", key.public_key(), verify_signature=False)(forged)
    ecdsa = keys._VERIFIERS["ES256"]
    assert not ecdsa.verify(b"x", key.public_key(), bytes(64))
    original = keys._Ecdsa.verify
    try:
        inproc._without_signature_verify()
        assert ecdsa.verify(b"x", key.public_key(), bytes(64)) and inproc.SIGNATURES_UNCHECKED
        assert not ecdsa.verify(b"x", key.public_key(), bytes(63))
    finally:
        keys._Ecdsa.verify = original  # type: ignore[method-assign]
        inproc.SIGNATURES_UNCHECKED = False
