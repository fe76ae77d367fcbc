"""The `dpop` section: how DPoP proofs (RFC 9449) are checked."""

from __future__ import annotations

import dataclasses
import os
from typing import Any
from urllib.parse import urlsplit

from verifier.config.base import Reader, is_loopback_host, read_fields, setting
from verifier.request import DEFAULT_PORTS, a_label
from verifier.tokens.keys import ALG_KEY_TYPES

# Asymmetric only (RFC 9449 section 4.3 step 5: no `none`, no MAC). ES256 first: it is what most
# clients use; RS256/PS256 for platforms without EC; EdDSA for the rest.
DEFAULT_ALGORITHMS: tuple[str, ...] = ("ES256", "ES384", "EdDSA", "RS256", "PS256")
# Seconds a proof stays acceptable after its `iat`. A proof is made just before its request, so one
# minute covers slow networks and queueing; it is also how long each `jti` is remembered.
DEFAULT_IAT_PAST_SECONDS = 60.0
# Seconds a proof's `iat` may lie ahead of our clock: client clocks run ahead a little. Clients with
# worse clocks are what server nonces (`require_nonce`) are for (RFC 9449 section 11.1).
DEFAULT_IAT_FUTURE_SECONDS = 5.0
# Seconds a server nonce stays acceptable after we issue it.
DEFAULT_NONCE_LIFETIME_SECONDS = 300.0
# Bytes; a proof with an RSA-4096 key is about 2.5 KiB, anything much larger is not a proof.
DEFAULT_MAX_PROOF_BYTES = 8192
# Seconds a `jti` is remembered past the last instant any replica accepts its proof (`DpopConfig.jti_ttl`): the
# stores' rounding, and a proof still passing at the window's last instant (`iat + iat_past_seconds`).
JTI_TTL_MARGIN_SECONDS = 1.0
MIN_NONCE_SECRET_BYTES = 32  # an HMAC-SHA256 key shorter than its output is weaker than it looks


def normalize_origin(url: str, *, allow_http: bool = False) -> str:
    """`scheme://host[:port]` as `normalize_htu` spells a URL's start (scheme and host lower-cased, one
    trailing dot dropped, the default port dropped); `ValueError` saying why `url` is not an origin."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc})") from exc
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower().removesuffix(".")
    if scheme not in DEFAULT_PORTS or not host:
        raise ValueError(f"expected an origin such as https://api.example.com, got {url!r}")
    # An internationalized name as clients send it (`bücher.example` -> `xn--bcher-kva.example`): a proof's `htu`
    # and the gateway's host carry the A-label, so the name as people write it would match no proof.
    host = a_label(host)
    if not host:
        raise ValueError(f"the host is not a valid internationalized domain name ({url!r})")
    if parts.username is not None or parts.path not in ("", "/") or "?" in url or "#" in url:
        raise ValueError(f"an origin is scheme://host[:port], without user, path, query or fragment ({url!r})")
    if scheme == "http" and not (allow_http or is_loopback_host(host)):
        raise ValueError(f"plain http needs a loopback host or allow_http_origins: true ({url!r})")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    return f"{scheme}://{netloc}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpopConfig:
    """How DPoP proofs are checked.

    ```yaml
    dpop:
      algorithms: [ES256, ES384, EdDSA, RS256, PS256]  # allow-list for the proof's alg
      iat_past_seconds: 60        # proof age accepted; each jti is remembered until no replica accepts it
      iat_future_seconds: 5       # client clock ahead of ours accepted; the replicas' clocks must agree within it
      require_nonce: false        # true: every proof must carry a nonce we issued (section 9)
      nonce_secret_env: VERIFIER_DPOP_NONCE_SECRET  # required with require_nonce; same on every replica
      nonce_lifetime_seconds: 300
      max_proof_bytes: 8192
      origins: ["https://api.example.com"]  # our public origins: a proof's htu must name one of them
      origins_from_resources: false  # true (origins unset): the origins of the RFC 9728 resources configured
    ```

    `origins` matters when the gateway lets the client choose the host (a Kong route without `hosts`,
    an nginx `default_server`, Envoy `domains: ["*"]`): a proof a client made for another server
    (`htu` https://other.example/orders), replayed with `Host: other.example`, matches the URL the
    gateway reports. With `origins` set, a proof whose `htu` is on no listed origin is refused
    (RFC 9449 section 4.3: the URI of the request to this resource server). Empty: not checked.

    Our own endpoints (the WebAuthn registry, `/v1/webauthn/...`) are reached without a gateway's forward-auth
    headers: with `origins` set, their requests are on the listed origin their `Host` names, with its scheme
    (behind a TLS-terminating gateway, a proof for `https://api.example.test/v1/webauthn/...` matches), and a
    `Host` naming none is refused (`verifier.doors.public_origin`). Empty: the scheme and host the caller sends.

    `origins_from_resources: true` (opt-in, with `origins` unset) takes them from the resource identifiers the
    config already names as our public URLs (`protected_resource.resource`, `policies[].resource`; RFC 9728
    section 1.2): `https://api.example.com/orders` gives `https://api.example.com`.
    """

    algorithms: tuple[str, ...] = setting(DEFAULT_ALGORITHMS, doc="allow-list for the proof's alg (asymmetric only)")
    iat_past_seconds: float = setting(
        DEFAULT_IAT_PAST_SECONDS,
        minimum=1,
        maximum=3600,
        unit="seconds",
        doc="proof age accepted; each jti is remembered until no replica accepts it",
    )
    iat_future_seconds: float = setting(
        DEFAULT_IAT_FUTURE_SECONDS,
        minimum=0,
        maximum=600,
        unit="seconds",
        doc="client clock ahead of ours accepted; the replicas' clocks must agree within it",
    )
    require_nonce: bool = setting(False, doc="every proof must carry a nonce we issued (RFC 9449 section 9)")
    nonce_secret_env: str = setting(
        "", doc=f"environment variable with the nonce key ({MIN_NONCE_SECRET_BYTES}+ bytes, same on every replica)"
    )
    nonce_secret: bytes = dataclasses.field(default=b"", repr=False)  # read from `nonce_secret_env`
    nonce_lifetime_seconds: float = setting(
        DEFAULT_NONCE_LIFETIME_SECONDS,
        minimum=1,
        maximum=86400,
        unit="seconds",
        doc="a server nonce's lifetime; past half of it, an allow hands out the next (`DPoP-Nonce`)",
    )
    max_proof_bytes: int = setting(
        DEFAULT_MAX_PROOF_BYTES, minimum=512, maximum=65536, unit="bytes", doc="larger proofs are refused unparsed"
    )
    origins: tuple[str, ...] = setting(
        (),
        doc="our public origins (https://host[:port]); a proof whose htu is on another is refused; the WebAuthn "
        "registry's requests are on the one their Host names",
    )
    allow_http_origins: bool = setting(False, doc="plain http origins on other hosts than loopback (no TLS in front)")
    origins_from_resources: bool = setting(
        False, doc="origins unset: take them from protected_resource.resource and policies[].resource (RFC 9728)"
    )

    def __post_init__(self) -> None:
        for origin in self.origins:
            if normalize_origin(origin, allow_http=self.allow_http_origins) != origin:
                raise ValueError(f"origin {origin!r} is not normalized")
        for alg in self.algorithms:
            if alg not in ALG_KEY_TYPES:
                raise ValueError(f"algorithm {alg!r} cannot sign a DPoP proof")
        if self.require_nonce and len(self.nonce_secret) < MIN_NONCE_SECRET_BYTES:
            raise ValueError(f"require_nonce needs a nonce secret of at least {MIN_NONCE_SECRET_BYTES} bytes")

    @property
    def jti_ttl_seconds(self) -> float:
        """How long the `jti` of a proof made now (`iat` = now) is remembered: `jti_ttl(now, now)`."""
        return self.iat_past_seconds + self.iat_future_seconds + JTI_TTL_MARGIN_SECONDS

    def jti_ttl(self, iat: float, now: float) -> float:
        """Seconds to remember the `jti` of a proof with this `iat` accepted at `now` (this replica's clock).

        This replica accepts the proof until `iat + iat_past_seconds` on its clock, however early it first saw it
        (`iat` up to `iat_future_seconds` ahead); a replica whose clock lags ours by up to `iat_future_seconds`
        accepts it until that much later (replicas' clocks must agree within `iat_future_seconds`: the same bound
        a server nonce from a replica ahead of ours is given); and a margin. Since the proof was accepted at `now`,
        between `iat_future_seconds` + the margin and `iat_past_seconds` + 2 x `iat_future_seconds` + the margin.
        """
        return iat - now + self.jti_ttl_seconds


def parse_dpop_config(data: Any, path: str = "dpop") -> DpopConfig:
    """Validates the `dpop` mapping (None means defaults); problems are named by key (`verifier.config.base`)."""
    if data is None:
        return DpopConfig()
    reader = Reader(data, path)
    algorithms = DEFAULT_ALGORITHMS
    if reader.raw("algorithms") is not None:
        algorithms = reader.strings("algorithms") or DEFAULT_ALGORITHMS
        for i, alg in enumerate(algorithms):
            if alg not in ALG_KEY_TYPES:
                reader.problem(
                    f"algorithms[{i}]",
                    f"{alg!r} is not an asymmetric signature algorithm ({', '.join(sorted(ALG_KEY_TYPES))})",
                )
                algorithms = DEFAULT_ALGORITHMS
    require_nonce = reader.boolean("require_nonce", False)
    secret = b""
    secret_env = reader.text("nonce_secret_env", "")
    if secret_env:
        secret = os.environ.get(secret_env, "").encode()
        if len(secret) < MIN_NONCE_SECRET_BYTES:
            reader.problem(
                "nonce_secret_env",
                f"environment variable {secret_env} must hold at least {MIN_NONCE_SECRET_BYTES} bytes",
            )
    elif require_nonce:
        reader.problem("nonce_secret_env", "required when require_nonce is true (shared by all replicas)")
    if len(secret) < MIN_NONCE_SECRET_BYTES:
        require_nonce = False  # recorded above; the config is not used
    allow_http = reader.boolean("allow_http_origins", False)
    origins: list[str] = []
    for i, origin in enumerate(reader.strings("origins", required=False)):
        try:
            origins.append(normalize_origin(origin, allow_http=allow_http))
        except ValueError as exc:
            reader.problem(f"origins[{i}]", str(exc))
    if origins and reader.boolean("origins_from_resources", False):
        reader.problem("origins_from_resources", "set origins or origins_from_resources, not both")
    config = DpopConfig(
        **read_fields(
            reader,
            DpopConfig,
            algorithms=algorithms,
            require_nonce=require_nonce,
            nonce_secret_env=secret_env,
            nonce_secret=secret,
            origins=tuple(dict.fromkeys(origins)),
            allow_http_origins=allow_http,
        )
    )
    reader.done()
    return config


def resource_origin(resource: str, *, allow_http: bool = False) -> str:
    """The origin of a resource identifier (`https://api.example.com/orders` -> `https://api.example.com`), as
    `normalize_origin` spells it; `ValueError` saying why it has none we may list."""
    parts = urlsplit(resource)
    return normalize_origin(f"{parts.scheme}://{parts.netloc}", allow_http=allow_http)
