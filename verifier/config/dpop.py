"""The `dpop` section: how DPoP proofs (RFC 9449) are checked."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from verifier.config.base import ConfigError
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
MIN_NONCE_SECRET_BYTES = 32  # an HMAC-SHA256 key shorter than its output is weaker than it looks

_CONFIG_KEYS = (
    "algorithms",
    "iat_past_seconds",
    "iat_future_seconds",
    "require_nonce",
    "nonce_secret_env",
    "nonce_lifetime_seconds",
    "max_proof_bytes",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DpopConfig:
    """How DPoP proofs are checked.

    ```yaml
    dpop:
      algorithms: [ES256, ES384, EdDSA, RS256, PS256]  # allow-list for the proof's alg
      iat_past_seconds: 60        # proof age accepted; also how long each jti is remembered
      iat_future_seconds: 5       # client clock ahead of ours accepted
      require_nonce: false        # true: every proof must carry a nonce we issued (section 9)
      nonce_secret_env: VERIFIER_DPOP_NONCE_SECRET  # required with require_nonce; same on every replica
      nonce_lifetime_seconds: 300
      max_proof_bytes: 8192
    ```
    """

    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    iat_past_seconds: float = DEFAULT_IAT_PAST_SECONDS
    iat_future_seconds: float = DEFAULT_IAT_FUTURE_SECONDS
    require_nonce: bool = False
    nonce_secret: bytes = dataclasses.field(default=b"", repr=False)  # from `nonce_secret_env`
    nonce_lifetime_seconds: float = DEFAULT_NONCE_LIFETIME_SECONDS
    max_proof_bytes: int = DEFAULT_MAX_PROOF_BYTES

    def __post_init__(self) -> None:
        for alg in self.algorithms:
            if alg not in ALG_KEY_TYPES:
                raise ValueError(f"algorithm {alg!r} cannot sign a DPoP proof")
        if self.require_nonce and len(self.nonce_secret) < MIN_NONCE_SECRET_BYTES:
            raise ValueError(f"require_nonce needs a nonce secret of at least {MIN_NONCE_SECRET_BYTES} bytes")

    @property
    def jti_ttl_seconds(self) -> float:
        """How long a `jti` must be remembered: the whole span of `iat` values we accept."""
        return self.iat_past_seconds + self.iat_future_seconds


def parse_dpop_config(data: Any, path: str = "dpop") -> DpopConfig:
    """Validates the `dpop` mapping (None means defaults); raises `ConfigError` naming the key."""
    if data is None:
        return DpopConfig()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in _CONFIG_KEYS:
            raise ConfigError(f"{path}.{key}: unknown key")

    def number(key: str, default: float, minimum: float, maximum: float) -> float:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not minimum <= value <= maximum:
            raise ConfigError(f"{path}.{key}: expected a number in [{minimum}, {maximum}]")
        return float(value)

    algorithms = DEFAULT_ALGORITHMS
    if "algorithms" in data:
        value = data["algorithms"]
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{path}.algorithms: expected a non-empty list of strings")
        for i, alg in enumerate(value):
            if not isinstance(alg, str) or alg not in ALG_KEY_TYPES:
                raise ConfigError(
                    f"{path}.algorithms[{i}]: {alg!r} is not an asymmetric signature algorithm "
                    f"({', '.join(sorted(ALG_KEY_TYPES))})"
                )
        algorithms = tuple(value)
    require_nonce = data.get("require_nonce", False)
    if not isinstance(require_nonce, bool):
        raise ConfigError(f"{path}.require_nonce: expected true or false")
    secret = b""
    secret_env = data.get("nonce_secret_env")
    if secret_env is not None:
        if not isinstance(secret_env, str) or not secret_env:
            raise ConfigError(f"{path}.nonce_secret_env: expected the name of an environment variable")
        secret = os.environ.get(secret_env, "").encode()
        if len(secret) < MIN_NONCE_SECRET_BYTES:
            raise ConfigError(
                f"{path}.nonce_secret_env: environment variable {secret_env} must hold at least "
                f"{MIN_NONCE_SECRET_BYTES} bytes"
            )
    elif require_nonce:
        raise ConfigError(f"{path}.nonce_secret_env: required when require_nonce is true (shared by all replicas)")
    max_bytes = number("max_proof_bytes", DEFAULT_MAX_PROOF_BYTES, 512, 65536)
    if not max_bytes.is_integer():
        raise ConfigError(f"{path}.max_proof_bytes: expected an integer")
    return DpopConfig(
        algorithms=algorithms,
        iat_past_seconds=number("iat_past_seconds", DEFAULT_IAT_PAST_SECONDS, 1, 3600),
        iat_future_seconds=number("iat_future_seconds", DEFAULT_IAT_FUTURE_SECONDS, 0, 600),
        require_nonce=require_nonce,
        nonce_secret=secret,
        nonce_lifetime_seconds=number("nonce_lifetime_seconds", DEFAULT_NONCE_LIFETIME_SECONDS, 1, 86400),
        max_proof_bytes=int(max_bytes),
    )
