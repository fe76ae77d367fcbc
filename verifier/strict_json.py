"""JSON that reads one way only (RFC 8259; I-JSON, RFC 7493 section 2), for objects a client makes or sends.

Python's `json.loads` is lenient where readers disagree: on bytes it also takes UTF-16 and UTF-32 and a
UTF-8 byte order mark (RFC 8259 section 8.1: JSON exchanged between systems MUST be UTF-8, with no BOM);
an object naming a member twice keeps the last (section 4: names SHOULD be unique, and which value a reader
takes is then up to the reader: a WAF, an upstream or a log pipeline may take the first); and it takes
`NaN`, `Infinity` and `-Infinity`, which are not JSON at all (section 6); and a string escaping a lone
surrogate (`"\\ud800"`), which is no Unicode text (section 8.2: readers behave unpredictably; I-JSON, RFC 7493
section 2.1, forbids it): UTF-8 cannot carry it, and readers replace it, refuse it, or pass it on. A document a
client signed or sent (a DPoP proof, a WebAuthn assertion and its clientDataJSON, the small endpoints' request
bodies) is read here, and refused whenever another reader could see something else in it.

Provider-made documents (access-token JWTs, logout tokens, SETs, introspection answers) are not read here:
see `verifier.tokens.jws` for why, and the hot path that keeps them off it.
"""

from __future__ import annotations

import json
import re
from typing import Any


def loads(data: bytes) -> Any:
    """`data` as JSON, read one way; raises `ValueError` when it is not UTF-8 (a BOM included: `json.loads`
    refuses one in text), names a member of an object twice, holds NaN/Infinity, or a string (a member name
    too) holding a lone surrogate. `RecursionError` for a document nested past the interpreter's limit, as
    `json.loads` raises it."""
    text = data.decode("utf-8")  # a UnicodeDecodeError is a ValueError (and UTF-8 carries no surrogate)
    document = _DECODER.decode(text)
    # Only a `\u` escape makes a surrogate (a pair is decoded to one character): the common document has none,
    # and costs one scan. Otherwise its decoded strings, keys with them, are written out once and looked at.
    if "\\u" in text and _SURROGATE.search(json.dumps(document, ensure_ascii=False)) is not None:
        raise ValueError("a string holds a lone surrogate (not Unicode text)")
    return document


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """One JSON object, refused (ValueError) when it names a member twice."""
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("a member name is repeated")
    return document


def _not_json(constant: str) -> Any:
    """`NaN`, `Infinity`, `-Infinity`: Python's extension, not JSON (RFC 8259 section 6)."""
    raise ValueError(f"{constant} is not JSON")


_SURROGATE = re.compile("[\ud800-\udfff]")  # left in a decoded string: an escape that was not half of a pair

# Built once: `json.loads` with hooks builds a decoder (and its scanner) on every call.
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_members, parse_constant=_not_json)
