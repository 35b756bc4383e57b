"""deploy/prometheus/ckptd-alerts.yml: valid for promtool, every alert documented, and its
unit tests (ckptd-alerts.test.yml, hand-written series) passing under ``promtool test rules``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import REPO

RULES = REPO / "deploy" / "prometheus" / "ckptd-alerts.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "ckptd-alerts.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "ckptd.json"
RUNBOOKS = REPO / "deploy" / "README.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)"
)


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_every_alert_has_summary_description_and_runbook() -> None:
    runbooks = RUNBOOKS.read_text()
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)) >= 10
    for rule in alert_rules():
        name, notes = rule["alert"], rule.get("annotations", {})
        assert notes.get("summary"), name
        assert len(notes.get("description", "")) > 80, name
        assert f"deploy/README.md#{name.lower()}" in notes["description"], name
        assert re.search(rf"^#### {name}$", runbooks, re.M), f"no runbook section for {name}"
        assert rule["labels"]["severity"] in ("page", "warning"), name


@needs_promtool
def test_promtool_check_rules() -> None:
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_rules(tmp_path: Path) -> None:
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)  # checked above; the unit tests compare labels
    (tmp_path / RULES.name).write_text(yaml.safe_dump(doc))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in alert_rules()}, "every alert needs a unit test"
    result = subprocess.run(
        [PROMTOOL, "test", "rules", RULE_TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_dashboard_is_grafana_json_templated_on_the_datasource() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "ckptd" and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "work_dir"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["datasource"]["uid"] == "${datasource}", name
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["description"] and panel["targets"], panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            assert target["expr"] and target["refId"], panel["title"]
            if "work_dir" not in panel["title"].lower() and "job=~" in target["expr"]:
                assert 'instance=~"$instance"' in target["expr"], panel["title"]
    slims = [a for a in dash["annotations"]["list"] if "ckptd_slims_total" in a.get("expr", "")]
    assert slims and slims[0]["datasource"]["uid"] == "${datasource}"
