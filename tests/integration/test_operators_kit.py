"""The operators' kit against the real server: a real Prometheus scrapes a real ``ckptd run``
that manages a live simulated training, a work_dir with a malformed metric line (input
errors, deletions held back) and a work_dir whose ``artifact.publish`` fails. Every panel query
of deploy/grafana/ckptd.json must return data, the alerts of deploy/prometheus/ckptd-alerts.yml
that the scenario calls for must fire and the others must not, and every metric and label a
query or rule names must be one ckptd exports (checked against a scrape of its /metrics).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon_proc import DaemonProcess
from tests.helpers import REPO, simulate
from tests.integration.s3 import free_port

RULES = REPO / "deploy" / "prometheus" / "ckptd-alerts.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "ckptd.json"
PROMETHEUS = shutil.which("prometheus")
SIMULATE = [sys.executable, "-m", "ckptd.demo.simulate"]

# Metrics a rule may name before the feature that exports them is merged: the alert is left
# out of this test while ckptd does not export the metric (deploy/README.md says so).
FROM_OTHER_FEATURES = {"ckptd_disk_watermark_blocked": "the disk.min_free watermark"}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None, reason="prometheus not installed (Debian: apt-get install prometheus)"
    ),
]


def get_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class Prometheus:
    """``prometheus`` on 127.0.0.1 with its own storage, scraping ``target`` every second and
    evaluating ``rules`` every second."""

    def __init__(self, root: Path, target: str, rules: Path) -> None:
        self.port = free_port()
        self.root = root
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "ckptd", "static_configs": [{"targets": [target]}]}],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (root / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=self.log,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("prometheus did not start:\n" + self.text())
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return (self.root / "prometheus.log").read_text(errors="replace")[-4000:]

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            body = get_json(url)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{expr}: {exc.read().decode()}") from exc
        assert body["status"] == "success", (expr, body)
        return list(body["data"]["result"])

    def firing(self) -> set[tuple[str, str]]:
        """(alertname, work_dir or mountpoint) of every firing alert."""
        alerts = get_json(f"{self.url}/api/v1/alerts")["data"]["alerts"]
        return {
            (
                a["labels"]["alertname"],
                a["labels"].get("work_dir", a["labels"].get("mountpoint", "")),
            )
            for a in alerts
            if a["state"] == "firing"
        }

    def rules(self) -> list[dict[str, Any]]:
        groups = get_json(f"{self.url}/api/v1/rules")["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --- what the kit names ------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every panel target, and the annotation queries."""
    dash = json.loads(DASHBOARD.read_text())
    found = [
        (panel["title"], target["refId"], target["expr"])
        for panel in dash["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]
    found += [
        (f"annotation {a['name']}", "-", a["expr"])
        for a in dash["annotations"]["list"]
        if a.get("expr")
    ]
    return found


def substitute(expr: str, instance: str) -> str:
    """The dashboard's variables as Grafana would fill them: one job and instance, every
    work_dir, and an interval that covers the whole scenario."""
    values = {
        "$__rate_interval": "5m",
        "$__interval": "5m",
        "$job": "ckptd",
        "$instance": instance,  # its dots match themselves too
        "$work_dir": ".*",
    }
    for name, value in values.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a template variable is left in {expr}"
    return expr


def exported(metrics_text: str) -> dict[str, set[str]]:
    """Every series name a scrape of /metrics can give Prometheus -> its label names. Families
    without samples yet count (a labelled gauge before its first value)."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics_text):
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
            "info": ["_info"],
        }.get(family.type, [""])
        for suffix in suffixes:
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    names["up"] = set()  # Prometheus' own, per target
    return names


def named_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\b(up|ckptd_[a-z0-9_]+|process_[a-z0-9_]+)\b", expr))


def check_names(expr: str, metrics: dict[str, set[str]], where: str) -> list[str]:
    """What ``expr`` names that ckptd does not export: metric names, and label names in its
    selectors and in by/on/without/ignoring clauses."""
    problems = []
    used = named_metrics(expr)
    for name in sorted(used - set(metrics)):
        problems.append(f"{where}: metric {name} is not exported by ckptd")
    known = TARGET_LABELS | {"le"}
    for name in used & set(metrics):
        known |= metrics[name]
    for name, inside in re.findall(r"\b([a-z_:][a-z0-9_:]*)\{([^}]*)\}", expr):
        for label in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", inside):
            if name in metrics and label not in metrics[name] | TARGET_LABELS:
                problems.append(f"{where}: {name} has no label {label}")
    for clause in re.findall(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", expr):
        for label in re.findall(r"\w+", clause):
            if label not in known:
                problems.append(f"{where}: label {label} is not on any series it names")
    return problems


# --- the scenario --------------------------------------------------------------------------


def write_scenario(root: Path) -> tuple[Path, Path, Path]:
    live, bad, pub = root / "train" / "live", root / "train" / "bad", root / "pub" / "run"
    simulate(bad, epochs=5)  # 3 checkpoints over keep_last: deletions to hold back
    scalars = next(bad.glob("*/vis_data/scalars.json"))
    with scalars.open("a") as f:
        f.write('{"coco/bbox_mAP": 0.9, "step": \n')  # a complete line, not a JSON record
    simulate(pub, epochs=2)
    blocker = root / "not-a-folder"
    blocker.write_text("a file where the publish URL needs a folder\n")
    config = {
        "projects": [
            {"name": "train", "work_dirs": ["./train/*"], "retention": {"keep_last": 2}},
            {
                "name": "pub",
                "work_dirs": ["./pub/*"],
                "artifact": {"publish": {"url": f"file://{blocker}/{{run}}/", "timeout": "20s"}},
            },
        ],
        "watch": {"settle": "0s"},
    }
    (root / "ckptd.yaml").write_text(yaml.safe_dump(config))
    return live, bad, pub


@dataclass
class Scenario:
    daemon: DaemonProcess
    prom: Prometheus
    instance: str  # ckptd's metrics address, the instance label
    live: Path
    bad: Path
    pub: Path


@pytest.fixture
def scenario(tmp_path: Path) -> Iterator[Scenario]:
    live, bad, pub = write_scenario(tmp_path)
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"  # the scenario lasts seconds, the rules' for: minutes
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(doc))
    port = free_port()
    daemon = DaemonProcess(tmp_path / "ckptd.yaml", "--metrics-addr", f"127.0.0.1:{port}")
    daemon.start()
    prom = None
    try:
        prom = Prometheus(tmp_path, f"127.0.0.1:{port}", rules)
        yield Scenario(daemon, prom, f"127.0.0.1:{port}", live, bad, pub)
    finally:
        if prom is not None:
            prom.stop()
        daemon.stop()


def test_dashboard_and_alerts_against_a_live_daemon(scenario: Scenario) -> None:
    daemon, prom, instance = scenario.daemon, scenario.prom, scenario.instance
    live, bad, pub = scenario.live, scenario.bad, scenario.pub
    daemon.wait_ready()
    trainer = subprocess.run(  # new bests and deletions while Prometheus scrapes
        [*SIMULATE, str(live), "--epochs", "6", "--delay", "0.8"],
        capture_output=True,
        timeout=60,
    )
    assert trainer.returncode == 0, trainer.stderr.decode()[-2000:]

    expected = {
        ("CkptdErrors", str(bad)),  # kind="input", the malformed line
        ("CkptdDeletionsHeldBack", str(bad)),
        ("CkptdPublishFailing", str(pub)),
    }
    deadline = time.monotonic() + 40
    while prom.firing() != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    firing = prom.firing()
    text = urllib.request.urlopen(f"http://{instance}/metrics", timeout=5).read().decode()
    metrics = exported(text)

    # every rule is loaded and evaluates without error
    rules = {r["name"]: r for r in prom.rules()}
    assert set(rules) == {r["alert"] for r in alert_rules()}
    for name, rule in rules.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"), prom.text())

    # every metric and label named exists in a real scrape
    problems: list[str] = []
    left_out: dict[str, str] = {}
    for rule in alert_rules():
        missing = named_metrics(rule["expr"]) - set(metrics)
        if missing and missing <= set(FROM_OTHER_FEATURES):
            left_out[rule["alert"]] = ", ".join(FROM_OTHER_FEATURES[m] for m in missing)
            continue
        problems += check_names(rule["expr"], metrics, f"alert {rule['alert']}")
    for title, ref, expr in dashboard_queries():
        problems += check_names(expr, metrics, f"panel {title!r} {ref}")
    assert not problems, "\n".join(problems)
    assert set(left_out) <= {"CkptdDiskWatermarkBlocked"}, left_out

    # the alerts the scenario calls for fire, the others do not (left_out: not exported yet)
    assert firing == expected, (firing, daemon.text())
    for rule in alert_rules():
        if rule["alert"] in left_out:
            continue
        result = prom.query(rule["expr"])
        fires = {(name, where) for name, where in expected if name == rule["alert"]}
        got = {(rule["alert"], s["metric"].get("work_dir", "")) for s in result}
        assert got == fires, (rule["alert"], result)
    # CkptdFilesystemFillingUp needs an hour of history: its prediction alone has data
    assert prom.query(
        f'predict_linear(ckptd_filesystem_free_bytes{{instance="{instance}"}}[1h], 3600)'
    )

    # every panel query returns data
    empty = []
    for title, ref, expr in dashboard_queries():
        result = prom.query(substitute(expr, instance))
        if not result:
            empty.append(f"{title} {ref}: {expr}")
        if title == "Slim duration":  # slims happened within the window: real quantiles
            assert any(math.isfinite(float(s["value"][1])) for s in result), (title, result)
    assert not empty, "panel queries without data:\n" + "\n".join(empty)

    # the scenario did what it says: new bests slimmed, deletions in the live run only
    assert prom.query(f'ckptd_slims_total{{work_dir="{live}"}} >= 2')
    assert prom.query(f'ckptd_deletions_total{{work_dir="{live}"}} > 0')
    assert prom.query(f'ckptd_deletions_total{{work_dir="{bad}"}} == 0')
    assert prom.query(f'ckptd_publish_failures_total{{work_dir="{pub}"}} >= 2')


def test_a_misnamed_metric_or_label_is_caught() -> None:
    """The name check itself: it must fail on what ckptd does not export."""
    metrics = exported(
        "# TYPE ckptd_errors counter\n"
        'ckptd_errors_total{work_dir="/a",project="p",kind="input"} 1\n'
        "# TYPE ckptd_ready gauge\nckptd_ready 1\n"
    )
    ok = 'sum by (instance, kind) (increase(ckptd_errors_total{job="x", kind!="slim"}[5m]))'
    assert check_names(ok, metrics, "ok") == []
    assert check_names("ckptd_error_total > 0", metrics, "x") == [
        "x: metric ckptd_error_total is not exported by ckptd"
    ]
    assert check_names('ckptd_ready{work_dir="/a"} == 0', metrics, "x") == [
        "x: ckptd_ready has no label work_dir"
    ]
    assert check_names("sum by (mountpoint) (ckptd_errors_total)", metrics, "x") == [
        "x: label mountpoint is not on any series it names"
    ]
