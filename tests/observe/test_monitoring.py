"""deploy/prometheus/rules.yml and deploy/grafana/verifier-dashboard.json: checked by promtool, and every
metric they name is one the verifier exports.

The scrape of a running `verifier serve` by a real Prometheus is in tests/integration/test_prometheus_scrape.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from binaries import require

from verifier.observe.metrics import IntrospectionMetrics, Metrics, RevocationMetrics

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
README = REPO / "README.md"
RULE_TESTS = REPO / "deploy" / "prometheus" / "rules.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "verifier-dashboard.json"
PROMETHEUS_OWN = {"up"}  # series Prometheus itself writes for every target

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def promtool() -> str:
    return require("promtool", "Debian's prometheus package, .ci/setup.d/60-prometheus.sh")


def exported_names() -> set[str]:
    """Every sample name the verifier's registries can export (counters as *_total, histograms as parts)."""
    metrics = Metrics()
    RevocationMetrics(metrics.registry)
    IntrospectionMetrics(metrics.registry)
    names = set()
    for family in metrics.registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (labels, functions, keywords and Grafana variables left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    text = re.sub(r"\b\d+(\.\d+)?(ms|[smhdwy])?\b", " ", text)  # numbers and durations (offset 10m)
    names = set()
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]


def test_the_name_extraction_sees_metrics_and_skips_the_rest() -> None:
    expr = (
        'sum by (job, reason) (rate(verifier_decisions_total{outcome="deny",job="$job"}[5m] offset 10m)) '
        "> 3 * (verifier_x or up) and histogram_quantile(0.99, sum by (le) (rate(a_bucket[$__rate_interval])))"
    )
    assert metric_names(expr) == {"verifier_decisions_total", "verifier_x", "up", "a_bucket"}


def test_promtool_checks_the_rules_and_their_unit_tests_pass() -> None:
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = subprocess.run(
        [tool, "test", "rules", RULE_TESTS.name], capture_output=True, text=True, timeout=120, cwd=RULE_TESTS.parent
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "SUCCESS" in tests.stdout


def test_every_alert_has_a_unit_test() -> None:
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert alerts == tested
    wanted = {  # what an operator must hear about
        "VerifierJwksFetchFailing",
        "VerifierKeysStale",
        "VerifierRefusalSpike",
        "VerifierShedding",
        "VerifierSsfSetsRefused",
        "VerifierSsfPollFailing",
        "VerifierRedisDown",
    }
    assert wanted <= alerts


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_named_is_exported_by_the_verifier(source: str) -> None:
    exprs = rule_exprs() if source == "rules" else dashboard_exprs()
    assert exprs
    known = exported_names() | PROMETHEUS_OWN
    named = set().union(*(metric_names(e) for e in exprs))
    assert named, exprs
    assert named <= known, f"not exported by the verifier: {sorted(named - known)}"


def test_the_dashboard_is_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"])


def _readme_section(start: str, end: str) -> str:
    text = README.read_text()
    return text[text.index(start) : text.index(end, text.index(start))]


def test_the_readmes_metric_list_names_every_exported_metric_and_no_other() -> None:
    """The list under "## Metrics" is hand-written: a new metric (or a renamed one) must be named there, by its own
    name or by a `prefix_*` the paragraph gives."""
    section = _readme_section("## Metrics", "**Who may scrape.**")
    named = set(re.findall(r"`(verifier_[a-z0-9_]*\*?)", section))
    exported = exported_names()
    families = {re.sub(r"_(bucket|sum|count)$", "", n) if n + "_total" not in exported else n for n in exported}
    unnamed = {
        name
        for name in families
        if name not in named and not any(p.endswith("*") and name.startswith(p[:-1]) for p in named)
    }
    assert not unnamed, f"README's metric list lacks {sorted(unnamed)}"
    unknown = {p for p in named if not any(n.startswith(p[:-1]) if p.endswith("*") else n == p for n in families)}
    assert not unknown, f"README names metrics the verifier does not export: {sorted(unknown)}"


def test_the_readmes_alert_list_names_every_alert() -> None:
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    section = _readme_section("`deploy/prometheus/` has a scrape config", "## Tracing")
    named = set(re.findall(r"`(Verifier[A-Za-z]+)`", section))
    assert named == alerts, f"README's alert list: missing {sorted(alerts - named)}, unknown {sorted(named - alerts)}"
