"""The metrics listener's bearer token: keys of the `metrics` section besides `listen` and `tls`.

```yaml
metrics:
  listen: "0.0.0.0:9464"
  token_file: /etc/verifier-metrics/token     # or token_env: VERIFIER_METRICS_TOKEN (never the token itself)
```

With a token, `/metrics` answers only a request carrying `Authorization: Bearer <token>` (RFC 6750 section 2.1),
what Prometheus sends with `authorization: {type: Bearer, credentials_file: ...}` in its scrape config; any other
request gets 401 and `WWW-Authenticate: Bearer`, the same answer for a missing and a wrong token. `/healthz` stays
open (kubelet probes send no credentials). The token is read when the configuration is loaded (start, SIGHUP,
`check-config`), as Prometheus reads `credentials_file`: surrounding whitespace, a trailing newline included, is
not part of it. It is held in memory only, never in a log line or an error message.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from verifier.config.base import Reader, read_fields, setting

# Characters, at least: as the admin token (`MIN_ADMIN_TOKEN_CHARS`), e.g. `openssl rand -hex 16`. Whoever holds it
# reads every issuer, key age and refusal count, and each scrape costs the worker's event loop CPU.
MIN_METRICS_TOKEN_CHARS = 32
MAX_METRICS_TOKEN_BYTES = 4096  # bytes read from token_file at most: a token, not a file someone pointed us at
# RFC 6750 section 2.1 b64token: what a Bearer credential can be sent as. A token with a space or a quote in it could
# not be sent by Prometheus as configured, and every scrape would be refused for a reason nobody is told.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetricsAuthSettings:
    """Who may read `/metrics`: anyone who reaches the listener (no token), or the bearer of the token."""

    token_env: str = setting("", doc="environment variable holding the bearer token /metrics requires (32+ characters)")
    token_file: str = setting(
        "", doc="or: a file holding it (Prometheus' credentials_file; a Kubernetes Secret), read at start and SIGHUP"
    )
    token: str | None = dataclasses.field(default=None, repr=False)  # read from token_env or token_file


def parse_metrics_auth(reader: Reader | None, environ: Mapping[str, str]) -> MetricsAuthSettings:
    """Reads `token_env` / `token_file` from the `metrics` section and the token they name (`token_env` in `environ`,
    which the settings root hands in); a problem is recorded by key, without the token (read before `_listen`,
    which refuses the section's other keys)."""
    if reader is None:
        return MetricsAuthSettings()
    values = read_fields(reader, MetricsAuthSettings)
    settings = MetricsAuthSettings(**values)
    if settings.token_env and settings.token_file:
        reader.problem("token_file", "set token_env or token_file, not both")
        return settings
    if settings.token_env:
        raw = environ.get(settings.token_env, "")
        if not raw.strip():
            reader.problem("token_env", f"environment variable {settings.token_env} is not set")
            return settings
        key = "token_env"
    elif settings.token_file:
        key = "token_file"
        try:
            with open(settings.token_file, "rb") as file:
                data = file.read(MAX_METRICS_TOKEN_BYTES + 1)
        except OSError as exc:
            reader.problem(key, f"cannot read {settings.token_file} ({exc.strerror or exc})")
            return settings
        if len(data) > MAX_METRICS_TOKEN_BYTES:
            reader.problem(key, f"{settings.token_file} is longer than {MAX_METRICS_TOKEN_BYTES} bytes: not a token")
            return settings
        try:
            raw = data.decode("ascii")
        except UnicodeDecodeError:
            reader.problem(key, f"{settings.token_file}: the token must be ASCII (RFC 6750 b64token)")
            return settings
    else:
        return settings
    token = raw.strip()
    problem = token_problem(token)
    if problem:
        reader.problem(key, problem)
        return settings
    return dataclasses.replace(settings, token=token)


def token_problem(token: str) -> str:
    """What is wrong with a metrics token (never quoting it), or "" when it will do."""
    if not token:
        return "the token is empty"
    if _B64TOKEN.fullmatch(token) is None:
        return "the token must be one RFC 6750 b64token (letters, digits, -._~+/ and trailing =; no spaces)"
    if len(token) < MIN_METRICS_TOKEN_CHARS:
        return f"at least {MIN_METRICS_TOKEN_CHARS} characters are required (got {len(token)})"
    return ""
