"""W3C Trace Context parsing: strict, bounded, never raising (verifier.observe.traceparent)."""

from __future__ import annotations

import pytest

from verifier.observe import traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{SPAN}-01"


def test_parses_the_specification_example() -> None:
    parsed = traceparent.parse(VALID)
    assert parsed == traceparent.TraceParent(TRACE, SPAN, 1)
    assert parsed is not None and parsed.sampled


def test_a_later_version_is_read_for_its_first_four_fields() -> None:
    assert traceparent.parse(f"01-{TRACE}-{SPAN}-00-what-comes-next") == traceparent.TraceParent(TRACE, SPAN, 0)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        VALID + "-extra",  # version 00 has exactly four fields
        VALID + "x",
        f"ff-{TRACE}-{SPAN}-01",  # version ff is forbidden
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE.upper()}-{SPAN}-01",  # upper-case hex
        f"00-{TRACE[:-1]}g-{SPAN}-01",  # not hex
        f"00-{TRACE}-{SPAN}",  # no flags
        f"00-{TRACE[:-2]}-{SPAN}-01",  # short trace id
        f"01-{TRACE}-{SPAN}-01x",  # a later version glued on without a dash
        f"01-{TRACE}-{SPAN}-01-" + "a" * 600,  # too long to look at
        " " + VALID,
        "\x00" * 55,
        "00-" + "é" * 32 + f"-{SPAN}-01",
    ],
)
def test_a_malformed_traceparent_is_ignored_never_raised(value: str | None) -> None:
    assert traceparent.parse(value) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("congo=t61rcWkgMzE", "congo=t61rcWkgMzE"),
        ("rojo=00f067aa0ba902b7, congo=t61rcWkgMzE", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        ("tenant@vendor=x,,", "tenant@vendor=x"),  # empty members are ignored
        ("Rojo=1", ""),  # upper case key
        ("rojo=1,rojo=2", ""),  # a key twice
        ("rojo=a,b", ""),  # a member without '='
        ("rojo=a=b", ""),  # '=' in a value
        (",".join(f"k{i}=v" for i in range(33)), ""),  # more than 32 members
        ("k=" + "v" * 600, ""),  # longer than we keep
        (None, ""),
    ],
)
def test_tracestate_is_kept_whole_or_dropped_whole(value: str | None, expected: str) -> None:
    assert traceparent.tracestate(value) == expected


def test_trace_id_of_headers() -> None:
    assert traceparent.trace_id({"traceparent": VALID}) == TRACE
    assert traceparent.trace_id({"traceparent": "garbage"}) == ""
    assert traceparent.trace_id({}) == ""
