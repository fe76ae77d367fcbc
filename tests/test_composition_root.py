"""The composition root's rules, kept by scanning the package (issue #19, part 4).

- Every Prometheus metric is defined in `verifier/observe/metrics.py`; services receive the registry
  and build their metric set from that module.
- No service reads the environment: the root (`app.py`), the command line (`cli.py`) and settings read
  it and pass values in.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "verifier"
METRIC_TYPES = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
METRICS_MODULE = "observe/metrics.py"
# Reading the environment is for whoever assembles the values, not for the services that use them.
ENVIRONMENT_READERS = {"app.py", "cli.py", "settings.py"}
# Section parsers still read their `*_env` keys themselves; they move into the config package in the
# schema branch (issue #19 part 2), which reads every `*_env` key in one place.
# The config sections (verifier/config/) belong to the settings layer: they read the `*_env` variables
# the file names, once, at start-up.
SECTION_PARSERS = {
    "config/dpop.py",
    "config/introspection.py",
    "config/revocation.py",
    "config/state.py",
    "config/upstream.py",
    "config/webauthn.py",
}


def _sources() -> dict[str, ast.Module]:
    return {str(path.relative_to(ROOT)): ast.parse(path.read_text(), str(path)) for path in ROOT.rglob("*.py")}


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
