"""Per-issuer settings for OpenID Connect Back-Channel Logout 1.0: `issuers[].backchannel_logout`.

```yaml
issuers:
  - issuer: "https://idp.example.test"
    # ... the access-token settings; logout tokens are checked with the same JWKS and algorithms
    backchannel_logout:
      audiences: ["my-gateway-client"]   # the client ids the provider puts in a logout token's `aud`
      max_age_seconds: 300               # a logout token whose `iat` is older is refused
      require_exp: false                 # true: a logout token without `exp` is refused (errata set 1)
```
"""

from __future__ import annotations

import dataclasses
from typing import Any

from verifier.config.base import Reader, read_fields, setting

# Seconds a logout token may take from signing to us. Providers send it at once (oidc-provider sets
# `exp` two minutes out) and retry briefly; a replayed old token is refused, and its jti forgotten after.
DEFAULT_LOGOUT_MAX_AGE_SECONDS = 300


@dataclasses.dataclass(frozen=True, kw_only=True)
class BackchannelLogoutConfig:
    """Which logout tokens of one issuer `POST /v1/backchannel-logout` accepts."""

    audiences: tuple[str, ...] = setting(doc="client ids the provider puts in a logout token's `aud` (one must)")
    max_age_seconds: int = setting(
        DEFAULT_LOGOUT_MAX_AGE_SECONDS,
        minimum=1,
        maximum=3600,
        unit="seconds",
        doc="a logout token whose `iat` is older is refused",
    )
    # Back-Channel Logout 1.0 errata set 1 (December 2023) makes `exp` REQUIRED in a logout token; the first
    # edition did not, and a provider following it may leave `exp` out. Without it a token is still bounded by
    # `max_age_seconds` and its `jti`; true refuses it (oidc-provider sends `exp`, 120 s out).
    require_exp: bool = setting(
        False, doc="true: a logout token without `exp` is refused (REQUIRED by errata set 1, December 2023)"
    )


def parse_backchannel_logout(data: Any, path: str) -> BackchannelLogoutConfig:
    """Validates one issuer's `backchannel_logout:` mapping; problems are named by key."""
    reader = Reader(data, path)
    config = BackchannelLogoutConfig(**read_fields(reader, BackchannelLogoutConfig))
    reader.done()
    return config
