"""Numbers no time claim may hold (#18 F11): each must be a clean refusal, never a crash or a pass.

Python's `json` reads `1e400` as `inf`, accepts the non-JSON literals `NaN` / `Infinity` / `-Infinity`,
and turns `1` followed by 400 zeros into an int that no float can hold (`float()` and
`math.isfinite()` raise OverflowError on it). pyjwt's encoder writes all of these back out, so a test
token can carry each of them exactly as an attacker would send it.
"""

from __future__ import annotations

from typing import Any

HOSTILE_NUMBERS: list[Any] = [
    10**400,
    -(10**400),
    float("inf"),  # what `1e400` and `Infinity` parse to
    float("-inf"),
    float("nan"),  # `NaN`
    True,
    "1700000000",
    2**53 + 1,  # past any time a float holds exactly
]
HOSTILE_IDS = ["10**400", "-10**400", "1e400", "-Infinity", "NaN", "true", "string", "2**53+1"]
