"""The composition root's rules, kept by scanning the package (issue #19, part 4).

- Every Prometheus metric is defined in `verifier/observe/metrics.py`; services receive the registry
  and build their metric set from that module.
- No service reads the environment: the root (`app.py`), the command line (`cli.py`) and settings read
  it and pass values in.
- Only the root builds clients of the outside world (Redis connection pools, HTTP sessions, gRPC
  channels): services take them, or a provider of them, through their constructors, so a test can hand
  in its own and nothing opens a connection the root cannot close.
- Only the root builds circuit breakers and the metric sets that register collectors (the classes of
  `observe/metrics.py` that create a Counter/Gauge/Histogram or a registry): services receive theirs.
"""

from __future__ import annotations

import ast
from pathlib import Path

from sourcetree import parse

ROOT = Path(__file__).resolve().parent.parent / "verifier"
METRIC_TYPES = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
METRICS_MODULE = "observe/metrics.py"
# Reading the environment is for whoever assembles the values, not for the services that use them:
# the root (the admin token), the command line, and the settings layer at start-up. Within the settings
# layer the line is drawn at the section parsers below: each reads only the `*_env` variables its own
# section names, once, while the file is parsed, and hands the values on in its frozen section. Any
# other module (a service, a door, a store) that reads the environment fails this test.
ENVIRONMENT_READERS = {"app.py", "cli.py", "settings.py"}
SECTION_PARSERS = {
    "config/dpop.py",
    "config/introspection.py",
    "config/revocation.py",
    "config/state.py",
    "config/upstream.py",
    "config/webauthn.py",
}


# The composition root and the process entry points may build clients; nothing else in verifier/ may.
COMPOSITION_ROOT = {"app.py", "cli.py", "workers.py"}
# Constructors (called as `X(...)` or `module.X(...)`) of a Redis pool, an HTTP session or connection, a
# gRPC channel.
CLIENT_CONSTRUCTORS = {
    "Redis",
    "StrictRedis",
    "RedisCluster",
    "from_url",
    "ClientSession",
    "TCPConnector",
    "IntrospectionHttpClient",
    "urlopen",
    "HTTPConnection",
    "HTTPSConnection",
    "AsyncClient",
    "insecure_channel",
    "secure_channel",
}


def _sources() -> dict[str, ast.Module]:
    return {str(path.relative_to(ROOT)): parse(path) for path in ROOT.rglob("*.py")}


def _metric_constructors(tree: ast.Module) -> list[int]:
    """Lines that import a metric type from prometheus_client or call one."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prometheus_client"):
            lines += [node.lineno for alias in node.names if alias.name in METRIC_TYPES]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in METRIC_TYPES
            and isinstance(node.value, ast.Name)
            and node.value.id in {"prometheus_client", "prom"}
        ):
            lines.append(node.lineno)
    return lines


def _environment_reads(tree: ast.Module) -> list[int]:
    """Lines that touch `os.environ` or call `getenv` / `os.getenv`."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in {"environ", "getenv", "environb"}:
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            lines += [node.lineno for alias in node.names if alias.name in {"environ", "getenv", "environb"}]
    return lines


def test_every_metric_is_defined_in_the_metrics_module() -> None:
    """A Counter/Gauge/Histogram created anywhere else would escape the one list of metrics."""
    offenders = {
        name: lines
        for name, tree in _sources().items()
        if name != METRICS_MODULE and (lines := _metric_constructors(tree))
    }
    assert not offenders, f"metrics defined outside verifier/{METRICS_MODULE}: {offenders}"


def test_the_metrics_module_defines_the_service_metrics() -> None:
    """The scan above can fail: the metrics module itself is seen to create metrics."""
    assert _metric_constructors(_sources()[METRICS_MODULE])


def test_no_service_reads_the_environment() -> None:
    """Services take values through their constructors; only the root, the CLI and settings read env."""
    allowed = ENVIRONMENT_READERS | SECTION_PARSERS
    offenders = {
        name: lines for name, tree in _sources().items() if name not in allowed and (lines := _environment_reads(tree))
    }
    assert not offenders, f"environment read outside {sorted(allowed)}: {offenders}"


def test_the_environment_scan_sees_a_read() -> None:
    """The scan can fail: settings.py is seen to read the environment."""
    assert _environment_reads(_sources()["settings.py"])


def _called(node: ast.Call) -> str | None:
    """The name a call invokes: `X` for `X(...)` and `a.b.X(...)`."""
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _constructions(tree: ast.Module, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every call to one of `names`."""
    return [
        (node.lineno, name)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and (name := _called(node)) in names
    ]


def test_only_the_root_builds_clients() -> None:
    """A Redis pool or HTTP session built inside a service would escape the root's wiring and shutdown."""
    offenders = {
        name: found
        for name, tree in _sources().items()
        if name not in COMPOSITION_ROOT and (found := _constructions(tree, CLIENT_CONSTRUCTORS))
    }
    assert not offenders, f"clients built outside {sorted(COMPOSITION_ROOT)}: {offenders}"


def test_the_client_scan_sees_the_root_build_them() -> None:
    """The scan can fail: the root is seen to build the Redis pools and the HTTP sessions."""
    found = {name for _, name in _constructions(_sources()["app.py"], CLIENT_CONSTRUCTORS)}
    assert {"from_url", "ClientSession"} <= found


# Stateful parts with a lifetime of their own: one per provider, built where the wiring is visible.
BREAKERS = {"CircuitBreaker"}


def _registering_metric_sets() -> set[str]:
    """Classes of the metrics module that create collectors (or a registry) when built, and `for_registry`."""
    tree = _sources()[METRICS_MODULE]
    found = {"for_registry"}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            isinstance(call, ast.Call) and _called(call) in METRIC_TYPES | {"CollectorRegistry"}
            for call in ast.walk(node)
        ):
            found.add(node.name)
    return found


def test_the_metric_sets_are_known() -> None:
    """The scan below can fail: it knows the sets every service used to build for itself."""
    assert {"Metrics", "RevocationMetrics", "IntrospectionMetrics", "WebAuthnMetrics"} <= _registering_metric_sets()


def test_only_the_root_builds_breakers_and_metric_sets() -> None:
    """A service building its own breaker or metric set hides it from the root (and from a test's fake)."""
    names = BREAKERS | _registering_metric_sets()
    offenders = {
        name: found
        for name, tree in _sources().items()
        if name not in COMPOSITION_ROOT | {METRICS_MODULE} and (found := _constructions(tree, names))
    }
    assert not offenders, f"breakers or metric sets built outside {sorted(COMPOSITION_ROOT)}: {offenders}"
