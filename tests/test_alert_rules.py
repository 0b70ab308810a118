"""The alert rules: valid for Prometheus, every alert unit-tested by ``promtool test rules``
both firing and quiet, every metric they read one the code registers, every runbook documented."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from catalogue import ROOT, metric_names, series_names
from cleave.router.metrics import RouterMetrics

RULES_DIR = ROOT / "infra" / "prometheus" / "rules"
RULES = RULES_DIR / "cleave.yml"
RULE_TESTS = RULES_DIR / "cleave_test.yml"
METRICS_DOC = ROOT / "docs" / "metrics.md"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: run make install-test")
    return path


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def alerts() -> list[dict]:
    return [rule for rule in rules() if "alert" in rule]


def run(*args: str) -> None:
    result = subprocess.run([promtool(), *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


def test_promtool_check_rules() -> None:
    run("check", "rules", RULES.name)


def test_promtool_test_rules() -> None:
    run("test", "rules", RULE_TESTS.name)


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
def test_alert_has_severity_and_annotations(rule: dict) -> None:
    assert rule["labels"]["severity"] in ("critical", "warning", "info")
    assert {"summary", "description", "runbook"} <= set(rule["annotations"])
    anchor = rule["annotations"]["runbook"].partition("#")[2]
    headings = re.findall(r"^#+ (.+)$", METRICS_DOC.read_text(), re.M)
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
    assert anchor in anchors, f"runbook anchor #{anchor} is no heading of docs/metrics.md"


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
def test_every_alert_is_tested_firing_and_quiet(rule: dict) -> None:
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", []) if case["alertname"] == rule["alert"]]
    assert any(case["exp_alerts"] for case in cases), f"no test expects {rule['alert']} to fire"
    assert any(not case["exp_alerts"] for case in cases), f"no test expects {rule['alert']} to stay quiet"


def test_rules_read_only_registered_metrics() -> None:
    known = series_names() | {rule["record"] for rule in rules() if "record" in rule}
    for rule in rules():
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('alert') or rule.get('record')} reads unregistered metrics {sorted(unknown)}"


def test_slo_targets_are_bucket_boundaries() -> None:
    registry = RouterMetrics().registry
    targets = {match for rule in rules() for match in re.findall(r'(\w+_bucket)\{le="([^"]+)"\}', rule["expr"])}
    assert targets, "the SLO rules read no histogram bucket"
    for bucket, le in targets:
        assert registry.get_sample_value(bucket, {"le": le}) is not None, f'{bucket}{{le="{le}"}} is no bucket boundary'
