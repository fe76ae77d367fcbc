"""W3C Trace Context (Recommendation, 2021): the `traceparent` and `tracestate` a gateway sends.

Parsed strictly, section 3.2 (`traceparent`) and 3.3 (`tracestate`): a value that does not parse is
ignored (the verifier starts a trace of its own), never an error answered to the gateway. These
headers are correlation hints, never a trust decision: whoever sends them can only choose which
trace a decision's span and audit line belong to. Their sampled flag is followed only when the
operator says a gateway sets it (`tracing.honour_parent_sampled`, `verifier.observe.otel`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# Section 3.2.2: version 00 is exactly 55 characters; a later version may append fields after a
# dash. Past this many characters a value is not looked at (a header costs nothing to make long).
MAX_TRACEPARENT_CHARS = 512
# Section 3.3.1.1 / 3.3.1.5: at most 32 list members; vendors must propagate at least 512 characters.
MAX_TRACESTATE_CHARS = 512
MAX_TRACESTATE_MEMBERS = 32

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
# Section 3.3.1.3: key = simple-key / multi-tenant-key; value = printable ASCII but ',' and '=',
# not ending in a space.
_KEY = r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
_MEMBER = re.compile(_KEY + r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")


class TraceParent(NamedTuple):
    """A parsed `traceparent`: ids as lower-case hex, the flags byte."""

    trace_id: str  # 32 hex digits, not all zero
    span_id: str  # 16 hex digits, the caller's span (our parent), not all zero
    flags: int  # bit 0: the caller sampled this trace

    @property
    def sampled(self) -> bool:
        """Whether the caller recorded its span (section 3.2.2.5.1)."""
        return bool(self.flags & 1)


def parse(value: str | None) -> TraceParent | None:
    """The `traceparent` value parsed by section 3.2, or None when absent or malformed."""
    if not value or len(value) > MAX_TRACEPARENT_CHARS:
        return None
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None  # 3.2.2.1: version ff is invalid; 3.2.2.3/4: all-zero ids are invalid
    rest = value[55:]
    if version == "00" and rest:
        return None  # 3.2.4: version 00 has exactly four fields
    if rest and rest[0] != "-":
        return None  # a later version appends fields after a dash; we read the four we know
    return TraceParent(trace_id, span_id, int(flags, 16))


def tracestate(value: str | None) -> str:
    """The `tracestate` value when every list member is well formed (section 3.3), else "" (dropped whole)."""
    if not value or len(value) > MAX_TRACESTATE_CHARS:
        return ""
    members = [m.strip(" \t") for m in value.split(",")]
    members = [m for m in members if m]  # 3.3.1.1: empty members are allowed and ignored
    if len(members) > MAX_TRACESTATE_MEMBERS:
        return ""
    keys = set()
    for member in members:
        if _MEMBER.fullmatch(member) is None:
            return ""
        key = member.partition("=")[0]
        if key in keys:
            return ""  # 3.3.1.2: a key appears once
        keys.add(key)
    return ",".join(members)


def trace_id(headers: Mapping[str, str]) -> str:
    """The trace id the request's `traceparent` names (lower-case hex), or "" when there is none."""
    parent = parse(headers.get(TRACEPARENT))
    return parent.trace_id if parent is not None else ""
