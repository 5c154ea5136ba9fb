"""deploy/: promtool checks and unit-tests the rules, and every metric name that a dashboard or a
rule reads is one a running agent really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bpf"))

from agentlib import running_agent, wait_for

from support.otlp_receiver import otlp_receiver
from support.servers import nginx, python_upstream

pytestmark = pytest.mark.e2e

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
RULE_FILES = [PROMETHEUS / "probewire.rules.yml", PROMETHEUS / "probewire.alerts.yml"]
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
# Series Prometheus itself adds to every target, not the agent.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, labels, keywords and numbers left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?!\w)(\s*\()?", text):
        if m.group(2) or m.group(1).lower() in KEYWORDS:
            continue
        names.add(m.group(1))
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((f"{path.name}: {panel['title']}", target["expr"]))
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
                m = re.match(r"label_values\((\w+),", query)
                assert m, f"{path.name}: variable {var['name']} query {query!r} not understood"
                out.append((f"{path.name}: variable {var['name']}", m.group(1)))
    return out


def rule_exprs() -> tuple[list[tuple[str, str]], set[str]]:
    exprs, recorded = [], set()
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                name = rule.get("record") or rule.get("alert")
                exprs.append((f"{path.name}: {name}", rule["expr"]))
                if "record" in rule:
                    recorded.add(rule["record"])
    return exprs, recorded


def exported_names(text: str) -> set[str]:
    """Every sample name /metrics can carry, from its # TYPE lines (families without samples
    yet count too)."""
    names = set()
    for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M):
        name, kind = m.groups()
        if kind == "counter":
            names |= {name, f"{name}_total"} if not name.endswith("_total") else {name}
        elif kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def test_metric_name_extraction_skips_functions_labels_and_numbers() -> None:
    expr = ('histogram_quantile(0.99, sum by (service_name, le) (rate(x_bucket{a="b(c)"}'
            '[$__rate_interval]))) / on (le) y_total * 1e9 > 0 and z:rec:rate5m')
    assert metric_names(expr) == {"x_bucket", "y_total", "z:rec:rate5m"}


def test_promtool_checks_config_and_rules() -> None:
    res = promtool("check", "rules", *map(str, RULE_FILES))
    assert res.returncode == 0, res.stdout + res.stderr
    res = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_unit_tests_cover_every_alert_firing_and_silent() -> None:
    tests = sorted((PROMETHEUS / "tests").glob("*.test.yml"))
    assert tests
    res = promtool("test", "rules", *map(str, tests))
    assert res.returncode == 0, res.stdout + res.stderr
    # Each alert has a case where it fires and one where it stays silent.
    alerts = {r["alert"] for g in yaml.safe_load(RULE_FILES[1].read_text())["groups"]
              for r in g["rules"]}
    fired: set[str] = set()
    silent: set[str] = set()
    for path in tests:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                (fired if t["exp_alerts"] else silent).add(t["alertname"])
    assert alerts == fired == silent


def test_dashboards_and_rules_read_only_metrics_the_agent_exports() -> None:
    with otlp_receiver("grpc") as rx, python_upstream() as up, \
            nginx(upstream_port=up.port) as ng, \
            running_agent({"export": {"otlp": {"enabled": True, "endpoint": rx.endpoint,
                                               "interval_s": 3600}}}) as (_agent, listen):
        for path in ("/api/a", "/static/index.html"):
            with urllib.request.urlopen(ng.url + path, timeout=10) as resp:
                resp.read()
        assert wait_for(lambda: bool(rx.spans()))
        with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
            exported = exported_names(resp.read().decode())
    rules, recorded = rule_exprs()
    exprs = dashboard_exprs() + rules
    assert len(DASHBOARDS) == 7 and exprs
    missing = {
        (where, name)
        for where, expr in exprs
        for name in metric_names(expr)
        if name not in exported and name not in recorded and name not in SCRAPE_SERIES
    }
    assert not missing, f"not exported by the agent: {sorted(missing)}"
