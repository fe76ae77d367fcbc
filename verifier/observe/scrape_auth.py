"""Who may read `/metrics`: the bearer of the metrics token (RFC 6750 section 2.1, `Authorization: Bearer`).

Prometheus sends it with `authorization: {type: Bearer, credentials_file: ...}` in its scrape config. A request
without it, with another scheme, with two `Authorization` headers or with a wrong token gets one and the same
answer (`UNAUTHORIZED`): nothing says which, so the answer tells a prober nothing about the token. The token is
compared with `hmac.compare_digest`, as the admin token is (`verifier.revocation.admin`), and before the page is
rendered, so a refused request costs the event loop no rendering. Neither the token nor what a client sent is
ever logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

# The challenge of a refused scrape (RFC 6750 section 3): no `error`, so a missing and a wrong token read alike.
CHALLENGE = 'Bearer realm="metrics"'
UNAUTHORIZED_HEADERS = {"WWW-Authenticate": CHALLENGE, "Cache-Control": "no-store"}
# The page itself: no browser or proxy in front of the listener keeps a copy to hand to whoever asks next without the
# token (RFC 9111 section 5.2.2.5); Prometheus does not cache.
PAGE_HEADERS = {"Cache-Control": "no-store"}


def scrape_authorized(authorization: Sequence[str], token: bytes) -> bool:
    """Whether the request's `Authorization` header values carry `token` as one Bearer credential."""
    if len(authorization) != 1:  # none, or several: which one would the client mean?
        return False
    scheme, _, presented = authorization[0].strip().partition(" ")
    # Compared whatever the scheme, so a wrong scheme and a wrong token take the same time too. A header value that
    # is not ASCII cannot be a token (RFC 6750 b64token): "replace" keeps it a non-match rather than an error.
    matches = hmac.compare_digest(presented.strip().encode("utf-8", "replace"), token)
    return scheme.lower() == "bearer" and matches
