"""The `tracing` section and the standard OTEL_* variables (verifier.config.tracing)."""

from __future__ import annotations

import pytest

from verifier.config.base import ConfigError, collecting
from verifier.config.tracing import TracingConfig, parse_tracing_config


def parse(data: object, environ: dict[str, str] | None = None) -> TracingConfig | None:
    return collecting(lambda d: parse_tracing_config(d, environ or {}), data)


def test_off_by_default() -> None:
    assert parse(None) is None


def test_the_endpoint_turns_it_on_with_the_traces_path() -> None:
    config = parse({"otlp_endpoint": "http://127.0.0.1:4318/"})
    assert config is not None
    assert config.traces_url == "http://127.0.0.1:4318/v1/traces"
    assert (config.service_name, config.sample_ratio, config.parent_based) == ("edge-verifier", 1.0, True)
    assert config.honour_parent_sampled is False  # a client's traceparent does not choose what is recorded


def test_honour_parent_sampled_is_an_opt_in_that_needs_a_parent_based_sampler() -> None:
    config = parse({"otlp_endpoint": "http://127.0.0.1:4318", "honour_parent_sampled": True})
    assert config is not None and config.honour_parent_sampled is True
    environ = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    based = parse({"otlp_endpoint": "http://127.0.0.1:4318", "honour_parent_sampled": True}, environ)
    assert based is not None and (based.honour_parent_sampled, based.parent_based, based.sample_ratio) == (
        True,
        True,
        0.1,
    )


def test_the_standard_variables_turn_it_on_alone() -> None:
    config = parse(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector.example.test:4318"})
    assert config is not None and config.traces_url == "https://collector.example.test:4318/v1/traces"
    traces = parse(None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://c.example.test/otlp/traces"})
    assert traces is not None and traces.traces_url == "https://c.example.test/otlp/traces"  # used as is


def test_what_the_file_says_wins_and_the_variables_fill_the_rest() -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://elsewhere.example.test",
        "OTEL_SERVICE_NAME": "from-env",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
    }
    config = parse({"otlp_endpoint": "http://localhost:4318"}, environ)
    assert config is not None
    assert config.traces_url == "http://localhost:4318/v1/traces"
    assert (config.service_name, config.sample_ratio, config.parent_based) == ("from-env", 0.25, True)
    pinned = parse({"otlp_endpoint": "http://localhost:4318", "service_name": "edge", "sample_ratio": 0.5}, environ)
    assert pinned is not None and (pinned.service_name, pinned.sample_ratio) == ("edge", 0.5)
    plain = parse(None, {**environ, "OTEL_TRACES_SAMPLER": "always_on"})
    assert plain is not None and (plain.sample_ratio, plain.parent_based) == (1.0, False)


@pytest.mark.parametrize(
    "environ",
    [{"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}],
)
def test_the_standard_off_switches_win_over_the_file(environ: dict[str, str]) -> None:
    assert parse({"otlp_endpoint": "http://127.0.0.1:4318"}, environ) is None


@pytest.mark.parametrize(
    ("data", "environ", "problem"),
    [
        ({"otlp_endpoint": "http://10.0.0.5:4318"}, {}, "tracing.otlp_endpoint: https is required"),
        ({"otlp_endpoint": "ftp://127.0.0.1"}, {}, "tracing.otlp_endpoint: expected an http(s) URL"),
        ({"otlp_endpoint": "https://c.test/?k=secret"}, {}, "tracing.otlp_endpoint: no query"),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT: https is"),
        ({"service_name": "x"}, {}, "tracing.otlp_endpoint: required"),
        ({"otlp_endpoint": "https://c.test", "sample_ratio": 1.5}, {}, "tracing.sample_ratio: 1.5 is outside"),
        ({"otlp_endpoint": "https://c.test", "max_queue": 0}, {}, "tracing.max_queue: 0 is outside"),
        ({"otlp_endpoint": "https://c.test", "sample": 1}, {}, "tracing.sample: unknown key (did you mean"),
        (
            {"otlp_endpoint": "https://c.test", "honour_parent_sampled": "yes"},
            {},
            "tracing.honour_parent_sampled: expected true or false",
        ),
        (
            {"otlp_endpoint": "https://c.test", "honour_parent_sampled": True},
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
            "tracing.honour_parent_sampled: true follows the parent's sampled flag, but "
            "OTEL_TRACES_SAMPLER=traceidratio ignores it",
        ),
        (
            {"otlp_endpoint": "https://c.test"},
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL: only http/protobuf",
        ),
        ({"otlp_endpoint": "https://c.test"}, {"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER: only otlp"),
        ({"otlp_endpoint": "https://c.test"}, {"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER: expected"),
        (
            {"otlp_endpoint": "https://c.test"},
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "lots"},
            "OTEL_TRACES_SAMPLER_ARG: expected a number",
        ),
    ],
)
def test_a_bad_setting_is_named(data: object, environ: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse(data, environ)
    assert problem in str(raised.value)
