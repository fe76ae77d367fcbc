"""Our public origins (`dpop.origins`), and which of them a request made to our own endpoints is on.

A request reaching our own endpoints (the WebAuthn registry, `verifier.doors.webauthn_http`) comes straight to
the verifier's listener, or through a gateway that terminates TLS and proxies it in plain http. Its scheme and
`Host` are then not the URL the client used (RFC 9449 section 4.3 step 9 compares a DPoP proof's `htu` with
that URL), and no gateway overwrites a header family for it. The operator's declared origins are the one word
to trust: the request is on the declared origin whose authority its `Host` names (`https://api.example.test`
for `Host: api.example.test` or `api.example.test:443`), and takes that origin's scheme. A `Host` naming none
of them is on no origin of ours: the caller's own `http://<Host>`, which `dpop.origins` then refuses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from urllib.parse import urlsplit

from verifier.request import DEFAULT_PORTS


@dataclasses.dataclass(frozen=True, slots=True)
class PublicOrigins:
    """The declared origins by the `Host` spellings that name them (built once, at start-up)."""

    by_host: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def declared(cls, origins: Iterable[str]) -> PublicOrigins:
        """From normalized origins (`verifier.config.dpop.normalize_origin`): each is named by `host:port`, and
        by `host` alone when on its scheme's default port (a bare `Host` then names https before plain http)."""
        by_host: dict[str, tuple[str, str]] = {}
        for origin in origins:
            parts = urlsplit(origin)
            scheme, authority = parts.scheme, parts.netloc
            port = parts.port or DEFAULT_PORTS[scheme]
            name = authority.rsplit(":", 1)[0] if parts.port is not None else authority
            spellings = [f"{name}:{port}"] + ([name] if port == DEFAULT_PORTS[scheme] else [])
            for host in spellings:
                if host not in by_host or scheme == "https":
                    by_host[host] = (scheme, authority)
        return cls(MappingProxyType(by_host))

    def __bool__(self) -> bool:
        return bool(self.by_host)

    def on(self, host: str) -> tuple[str, str] | None:
        """The scheme and authority (`https`, `api.example.test`) of the declared origin a request's `Host`
        (as `verifier.request.normalize_host` spells it) names; None when it names none."""
        return self.by_host.get(host)
