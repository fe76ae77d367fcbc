"""JSON numbers read as times or counts: finite, bounded floats, or None; never an exception.

Python's `json` gives `inf` for `1e400`, accepts the non-JSON literals `NaN` / `Infinity`, and turns
`1` followed by 400 zeros into an int that `float()` and `math.isfinite()` cannot convert
(OverflowError). NaN compares false with everything, so a NaN `exp` or `auth_time` would pass every
check. Every claim read as a number (JWT `exp`/`nbf`/`iat`/`auth_time`, a DPoP proof's `iat`, a
SET's `iat`/`exp`/`event_timestamp`, an introspection answer's members) goes through `json_number`,
and the caller turns None into its own refusal (401, or for a SET 400 / "ignored").
"""

from __future__ import annotations

import math
from typing import Any

# 2**53 seconds (~285 million years): the largest magnitude a float holds exactly; no time claim is larger.
MAX_JSON_NUMBER = 2**53


def json_number(value: Any) -> float | None:
    """`value` as a float when it is a JSON number (not a bool) of magnitude at most `MAX_JSON_NUMBER`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    # An int compares with the bound exactly, however large; a float is checked for NaN/inf first.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if not -MAX_JSON_NUMBER <= value <= MAX_JSON_NUMBER:
        return None
    return float(value)
