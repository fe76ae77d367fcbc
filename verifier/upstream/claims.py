"""Claims as header values (found by name or dotted path, `verifier.claimpath`), rendered so no value can forge
a header.

The rules, in the order they apply (README, "What the upstream receives"):
- a claim that is missing, null, an empty string or an object sends no header (an object has no one
  obvious text form; map one of its members by a dotted path instead);
- a string is sent as it is, minus control characters (CR, LF, NUL, DEL, C1 such as NEL, ...: no value can
  start a header of its own); one starting or ending with white space (a space, NBSP, U+3000, U+2028, a BOM:
  any character `str.isprintable` refuses), or starting with a double quote, as an RFC 9110 quoted-string
  (`" boss@example.test"`): a gateway drops an edge space, an upstream may trim the rest, and either would
  read another value (`boss@example.test`);
- a number or a boolean is sent as its JSON text (`42`, `true`; `null` inside an array);
- an array is its elements rendered as above, joined with ", "; an element holding a comma, a quote
  or a backslash, or starting or ending with white space (as above), as an RFC 9110 quoted-string (`"eng, admins"`:
  bare, an upstream would read the two groups `eng` and `admins`); an array holding an array or an
  object sends no header;
- a value longer than `upstream.max_value_bytes` (UTF-8) refuses the request with
  `upstream_claim_too_large` (403): cutting it would hand the upstream a different identity (a
  group list missing its last groups), omitting it would look like "no such claim";
- all of them together, with the fixed four and the assertion, past `upstream.max_total_bytes` refuse it with
  `upstream_identity_too_large` (403), for the same reasons (`verifier.upstream.UpstreamAnswers`).
"""

from __future__ import annotations

import json
from typing import Any

from verifier.decision import header_safe, list_element, quoted_string, trimmed_edge
from verifier.errors import Forbidden


class UpstreamClaimTooLarge(Forbidden):
    """A mapped claim does not fit in one header value: refused, not cut."""

    code = "upstream_claim_too_large"


class UpstreamIdentityTooLarge(UpstreamClaimTooLarge):
    """The identity headers together do not fit in `upstream.max_total_bytes`: refused, not cut."""

    code = "upstream_identity_too_large"


class UpstreamConsumerUnnamable(Forbidden):
    """The claim naming the Kong consumer would not reach the gateway as it is: refused, never another name."""

    code = "upstream_consumer_unnamable"


def consumer_name(value: Any, max_bytes: int, what: str) -> str | None:
    """The Kong consumer's name for `value` (as `header_value`), or None for none. A name the answer header cannot
    carry exactly raises `UpstreamConsumerUnnamable`: with its control characters stripped (`mallory\x00` would name
    `mallory`), or with white space at an end, which HTTP drops (`alice ` reached the forward-auth door's gateway as
    `alice`), another subject's consumer would be named."""
    name = header_value(value, max_bytes, what)
    if name is not None and isinstance(value, str) and (name != value or name != name.strip(" \t")):
        raise UpstreamConsumerUnnamable(f"{what} cannot be sent as it is to name the consumer")
    return name


def _scalar(value: Any) -> str | None:
    if isinstance(value, str):
        return header_safe(value)
    if value is None or isinstance(value, bool | int | float):  # None: a null inside an array
        return json.dumps(value)
    return None  # an object or an array: no one text form


def header_value(value: Any, max_bytes: int, what: str) -> str | None:
    """`value` as a header value, or None for no header; raises `UpstreamClaimTooLarge` past `max_bytes`."""
    if value is None:
        return None
    if isinstance(value, list):
        parts = []
        size = 0
        for item in value:
            text = _scalar(item)
            if text is None:
                return None
            if isinstance(item, str):
                text = list_element(text)
            size += len(text) + 2
            if size > max_bytes + 2:  # before building a huge string: every element costs at least its length
                raise UpstreamClaimTooLarge(f"{what} is longer than {max_bytes} bytes")
            parts.append(text)
        text = ", ".join(parts)
    else:
        rendered = _scalar(value)
        if rendered is None:
            return None
        # A string that would not read as itself: a gateway drops an edge space and an upstream may trim others
        # (` boss@example.test` is then boss@example.test), and a reader that unquotes takes `"x"` as x.
        if isinstance(value, str) and (rendered[:1] == '"' or trimmed_edge(rendered)):
            rendered = quoted_string(rendered)
        text = rendered
    if not text:
        return None
    if len(text) > max_bytes // 4 and len(text.encode("utf-8")) > max_bytes:  # encode only when it may matter
        raise UpstreamClaimTooLarge(f"{what} is longer than {max_bytes} bytes")
    return text
