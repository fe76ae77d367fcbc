"""The `protected_resource` section: the default RFC 9728 protected resource of this deployment.

```yaml
protected_resource:
  resource: "https://api.example.test"     # served at /.well-known/oauth-protected-resource
  resource_name: "Example API"
  scopes_supported: [read, write]
  max_age_seconds: 3600                    # Cache-Control of every metadata document
```

A policy with its own `resource` is served at `/.well-known/oauth-protected-resource/<its path>` and
its challenges point there; every other challenge points at this default (when configured).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from verifier.config.base import Reader, read_fields, setting
from verifier.config.policy import resource_problem

# Seconds a client or shared cache may keep a metadata document: it changes only with the config,
# and a stale one names issuers the client can still ask (an hour, as for the providers' own metadata).
DEFAULT_METADATA_MAX_AGE_SECONDS = 3600


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProtectedResourceConfig:
    """The default protected resource (RFC 9728) and how long its metadata may be cached."""

    resource: str = setting("", doc="the default resource identifier (https URL; RFC 9728 section 1.2)")
    resource_name: str = setting("", doc="RFC 9728 resource_name of the default resource")
    scopes_supported: tuple[str, ...] = setting((), doc="RFC 9728 scopes_supported of the default resource")
    max_age_seconds: int = setting(
        DEFAULT_METADATA_MAX_AGE_SECONDS,
        maximum=86_400,
        unit="seconds",
        doc="Cache-Control: public, max-age of every metadata document",
    )


def parse_protected_resource_config(data: Any, path: str = "protected_resource") -> ProtectedResourceConfig:
    """Validates the `protected_resource` mapping; problems are named by key."""
    reader = Reader(data, path)
    config = ProtectedResourceConfig(**read_fields(reader, ProtectedResourceConfig))
    if config.resource:
        problem = resource_problem(config.resource)
        if problem:
            reader.problem("resource", problem)
    reader.done()
    return config
