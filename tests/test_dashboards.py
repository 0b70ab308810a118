"""The Grafana dashboards of the chart, checked structurally: valid JSON, unique panel ids,
a ``${datasource}`` on every panel and target, every query valid PromQL (parsed by
``promtool check rules``) that reads only metrics the code registers or the rules record."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from catalogue import ROOT, metric_names, series_names

DASHBOARDS = sorted((ROOT / "charts" / "cleave" / "dashboards").glob("*.json"))
RULES = ROOT / "infra" / "prometheus" / "rules" / "cleave.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's own variables, and what they stand for when the query is checked.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, Grafana's variables replaced."""
    out = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_there_are_dashboards() -> None:
    assert {p.name for p in DASHBOARDS} >= {"cleave-overview.json", "cleave-workers.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    dashboard = load(path)
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel.get("datasource") == DATASOURCE, f"{panel['title']}: datasource must be ${{datasource}}"
        assert panel.get("targets"), f"{panel['title']}: no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"{panel['title']}: duplicate refIds"
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE
            assert target["expr"].strip(), f"{panel['title']}: empty query"
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, f"{panel['title']}: wider than the grid"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_queries_read_registered_metrics(path: Path) -> None:
    recorded = {rule["record"] for group in yaml.safe_load(RULES.read_text())["groups"]
                for rule in group["rules"] if "record" in rule}
    known = series_names() | recorded
    for title, expr in queries(load(path)):
        unknown = metric_names(expr) - known
        assert not unknown, f"{path.name}, {title}: {expr} reads unregistered metrics {sorted(unknown)}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_queries_parse(path: Path, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: run make install-test")
    checked = [(title, expr) for title, expr in queries(load(path))]
    for title, expr in checked:
        assert not re.search(r"\$\{?\w", expr), f"{title}: unknown template variable in {expr}"
    # Every query as a recording rule: promtool parses each and names the one that fails.
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(checked)]
    rule_file = tmp_path / "queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": path.stem, "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{path.name}: a query does not parse:\n{result.stdout}\n{result.stderr}"
