"""The `tracing` section: OpenTelemetry spans exported over OTLP/HTTP (protobuf); off by default.

```yaml
tracing:
  otlp_endpoint: "http://127.0.0.1:4318"   # the collector; spans go to {otlp_endpoint}/v1/traces
  service_name: edge-verifier              # resource attribute service.name
  sample_ratio: 1.0                        # of decisions kept (a parent's sampled flag is not followed unless:)
  honour_parent_sampled: false             # follow the incoming traceparent's sampled flag (a tracing gateway's)
  export_timeout_seconds: 10               # per OTLP export call
  max_queue: 2048                          # spans waiting for export; past it spans are dropped, never waited for
```

The standard OpenTelemetry environment variables work too (read here, at start-up, never per request):
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the full URL, used as is) or `OTEL_EXPORTER_OTLP_ENDPOINT` (a base
URL, `/v1/traces` appended) turn tracing on when the file names no `otlp_endpoint`; `OTEL_SERVICE_NAME`,
`OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` apply when the file does not set `service_name` or
`sample_ratio`. What the file says wins. `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn
tracing off whatever the file says. Only OTLP over HTTP with protobuf is spoken: another
`OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` or `OTEL_TRACES_EXPORTER` is refused at start-up rather than
silently sending nowhere. The exporter itself still reads `OTEL_EXPORTER_OTLP_HEADERS`,
`..._CERTIFICATE` and `..._COMPRESSION`.

`honour_parent_sampled` (W3C Trace Context section 8.3, denial of service): by default the sampled flag of
the `traceparent` a decision arrives with is not followed, either way. A client at the edge writes that
header, and the shipped gateway configurations pass it as sent: following `-01` would let any client have
every one of its requests recorded and exported whatever `sample_ratio` says (exporter cost, the verifier's
CPU), and following `-00` would let it keep its requests out of the traces. The verifier's own ratio
decides instead, by a random draw per decision (not from the trace id, which the client also chooses). The
trace id is still continued, for correlation only. Turn it on only when the gateway in front replaces the
client's `traceparent` with its own span (Envoy's OpenTelemetry tracer, nginx's otel module, Kong's
opentelemetry plugin); it then needs a parent-based sampler (not `OTEL_TRACES_SAMPLER=always_on`,
`always_off` or `traceidratio`, refused at start-up).

The endpoint gets the outbound URL rule of every other URL here (https, or plain http on loopback: the
collector sidecar). Spans carry no token and no subject, only the door, outcome, reason code, issuer and
whether a cache answered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from verifier.config.base import Reader, read_fields, record, setting, url_problem

DEFAULT_SERVICE_NAME = "edge-verifier"
DEFAULT_SAMPLE_RATIO = 1.0  # of decisions kept; a parent's sampled flag decides only with honour_parent_sampled
# A client's traceparent reaches the verifier as sent through the shipped gateways: its sampled flag is not
# followed unless the operator says a gateway in front sets it (W3C Trace Context section 8.3).
DEFAULT_HONOUR_PARENT_SAMPLED = False
# Seconds per OTLP export call; the OpenTelemetry SDK's own default. Export runs on the SDK's
# background thread: a slow collector never delays a decision, its spans wait in the queue.
DEFAULT_EXPORT_TIMEOUT_SECONDS = 10.0
DEFAULT_MAX_QUEUE = 2048  # spans waiting for export (the SDK's default); a full queue drops, never blocks
TRACES_PATH = "/v1/traces"  # OTLP/HTTP specification: the traces signal's path under a base URL

ENV_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
ENV_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENV_SERVICE_NAME = "OTEL_SERVICE_NAME"
ENV_SAMPLER = "OTEL_TRACES_SAMPLER"
ENV_SAMPLER_ARG = "OTEL_TRACES_SAMPLER_ARG"
ENV_SDK_DISABLED = "OTEL_SDK_DISABLED"
ENV_EXPORTER = "OTEL_TRACES_EXPORTER"
ENV_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
PROTOCOL = "http/protobuf"

# OTEL_TRACES_SAMPLER values we honour: name -> (parent-based, fixed ratio or None: read the argument).
_SAMPLERS: dict[str, tuple[bool, float | None]] = {
    "always_on": (False, 1.0),
    "always_off": (False, 0.0),
    "traceidratio": (False, None),
    "parentbased_always_on": (True, 1.0),
    "parentbased_always_off": (True, 0.0),
    "parentbased_traceidratio": (True, None),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TracingConfig:
    """Where spans go and how many are kept (present only when tracing is on)."""

    otlp_endpoint: str | None = setting(
        None, doc="OTLP/HTTP collector base URL, spans to {url}/v1/traces; unset: OTEL_EXPORTER_OTLP_*, else off"
    )
    service_name: str = setting(DEFAULT_SERVICE_NAME, doc="the resource's service.name (else OTEL_SERVICE_NAME)")
    sample_ratio: float = setting(
        DEFAULT_SAMPLE_RATIO, minimum=0, maximum=1, doc="decisions kept (random draw); see honour_parent_sampled"
    )
    honour_parent_sampled: bool = setting(
        DEFAULT_HONOUR_PARENT_SAMPLED,
        doc="follow the incoming traceparent's sampled flag: only behind a gateway that sets its own span there",
    )
    export_timeout_seconds: float = setting(
        DEFAULT_EXPORT_TIMEOUT_SECONDS, minimum=0.1, maximum=120, unit="seconds", doc="per OTLP export call"
    )
    max_queue: int = setting(
        DEFAULT_MAX_QUEUE, minimum=1, maximum=1_000_000, unit="spans", doc="waiting for export; past it spans drop"
    )
    traces_url: str = ""  # where the exporter POSTs: the endpoint with /v1/traces, or the traces variable as is
    parent_based: bool = True  # False only from OTEL_TRACES_SAMPLER=always_on|always_off|traceidratio


def parse_tracing_config(data: Any, environ: Mapping[str, str], path: str = "tracing") -> TracingConfig | None:
    """The effective tracing settings from the `tracing` mapping (None: absent) and the OTEL_* variables;
    None when tracing is off. Problems are named by key or by variable (`verifier.config.base`)."""
    reader = Reader(data if data is not None else {}, path)
    values = read_fields(reader, TracingConfig)
    reader.done()
    if environ.get(ENV_SDK_DISABLED, "").strip().lower() == "true":
        return None
    exporter = environ.get(ENV_EXPORTER, "").strip().lower()
    if exporter == "none":
        return None
    endpoint = values["otlp_endpoint"]
    if endpoint is not None:
        _check_endpoint(endpoint, f"{path}.otlp_endpoint")
        traces_url = endpoint.rstrip("/") + TRACES_PATH
    elif environ.get(ENV_TRACES_ENDPOINT):
        traces_url = environ[ENV_TRACES_ENDPOINT]
        _check_endpoint(traces_url, ENV_TRACES_ENDPOINT)
    elif environ.get(ENV_ENDPOINT):
        _check_endpoint(environ[ENV_ENDPOINT], ENV_ENDPOINT)
        traces_url = environ[ENV_ENDPOINT].rstrip("/") + TRACES_PATH
    else:
        if data is not None:
            record(f"{path}.otlp_endpoint: required (or set {ENV_TRACES_ENDPOINT} / {ENV_ENDPOINT})")
        return None
    if exporter and exporter != "otlp":
        record(f"{ENV_EXPORTER}: only otlp (or none) is supported, got {exporter!r}")
    for name in ENV_PROTOCOLS:
        protocol = environ.get(name, "").strip()
        if protocol and protocol != PROTOCOL:
            record(f"{name}: only {PROTOCOL} is spoken, got {protocol!r}")
    if not reader.has("service_name") and environ.get(ENV_SERVICE_NAME):
        values["service_name"] = environ[ENV_SERVICE_NAME]
    if not reader.has("sample_ratio") and environ.get(ENV_SAMPLER):
        values["parent_based"], values["sample_ratio"] = _sampler(environ)
        if values["honour_parent_sampled"] and not values["parent_based"]:
            record(
                f"{path}.honour_parent_sampled: true follows the parent's sampled flag, but "
                f"{ENV_SAMPLER}={environ[ENV_SAMPLER].strip()} ignores it (use a parentbased_ sampler)"
            )
    return TracingConfig(**values, traces_url=traces_url)


def _check_endpoint(url: str, key: str) -> None:
    problem = url_problem(url, "OTLP endpoint")
    if problem:
        record(f"{key}: {problem}")
    elif "?" in url or "#" in url:
        record(f"{key}: no query or fragment expected ({url!r})")


def _sampler(environ: Mapping[str, str]) -> tuple[bool, float]:
    """(parent-based, ratio) from OTEL_TRACES_SAMPLER and its argument."""
    name = environ[ENV_SAMPLER].strip().lower()
    known = _SAMPLERS.get(name)
    if known is None:
        record(f"{ENV_SAMPLER}: expected one of {', '.join(_SAMPLERS)}, got {name!r}")
        return True, DEFAULT_SAMPLE_RATIO
    parent_based, ratio = known
    if ratio is not None:
        return parent_based, ratio
    arg = environ.get(ENV_SAMPLER_ARG, "1.0")
    try:
        ratio = float(arg)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        record(f"{ENV_SAMPLER_ARG}: expected a number in [0, 1], got {arg!r}")
        return parent_based, DEFAULT_SAMPLE_RATIO
    return parent_based, ratio
