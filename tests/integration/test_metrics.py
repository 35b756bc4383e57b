"""ckptd's Prometheus endpoint, scraped over real HTTP and parsed like Prometheus would."""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from ckptd import __version__
from ckptd.fs.space import mountpoint_of
from ckptd.service.http import MetricsServer, parse_address
from ckptd.service.metrics import SLIM_BUCKETS, DaemonMetrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

WD_A = "/data/work_dirs/det_a"
WD_B = "/data/work_dirs/det_b"


def get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def scrape(server: MetricsServer) -> tuple[Samples, dict[str, str]]:
    status, content_type, text = get(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


def a_pass(metrics: DaemonMetrics, work_dir: str = WD_A, **overrides: object) -> None:
    fields: dict[str, object] = {
        "work_dir": work_dir,
        "project": "detection",
        "seconds": 0.2,
        "ok": True,
        "checkpoints_kept": 3,
        "bytes_held": 3 * 500_000_000,
        "reclaimed_bytes": 1_000_000_000,
        "slims": [("coco/bbox_mAP", 0.17, 167_000_000)],
        "deletions": 2,
        "errors": [],
        "best": {"coco/bbox_mAP": 0.412},
    }
    fields.update(overrides)
    metrics.record_pass(**fields)  # type: ignore[arg-type]


@pytest.fixture
def healthy() -> list[tuple[bool, str]]:
    return [(True, "ok: watching 2 work_dir(s)")]


@pytest.fixture
def metrics() -> DaemonMetrics:
    return DaemonMetrics()


@pytest.fixture
def server(metrics: DaemonMetrics, healthy: list[tuple[bool, str]]) -> Iterator[MetricsServer]:
    srv = metrics.start_server("127.0.0.1:0", lambda: healthy[0])
    yield srv
    srv.stop()


def test_own_registry_by_default_and_build_info(server: MetricsServer) -> None:
    assert server.port > 0
    samples, _ = scrape(server)
    assert value(samples, "ckptd_work_dirs_watched") == 0
    info = series(samples, "ckptd_build_info")
    assert len(info) == 1 and info[0]["version"] == __version__
    assert value(samples, "ckptd_build_info", **info[0]) == 1
    assert "process_resident_memory_bytes" in {name for name, _ in samples}
    # Two instances do not collide: neither touches the global registry.
    DaemonMetrics()
    DaemonMetrics()


def test_record_pass_values(metrics: DaemonMetrics, server: MetricsServer) -> None:
    metrics.set_watched(2)
    a_pass(metrics)
    a_pass(
        metrics,
        reclaimed_bytes=500_000_000,
        deletions=1,
        checkpoints_kept=2,
        bytes_held=1_000_000_000,
        slims=[("coco/bbox_mAP", 3.0, 168_000_000)],
        best={"coco/bbox_mAP": 0.433},
    )
    a_pass(metrics, ok=False, slims=[], deletions=0, reclaimed_bytes=0, errors=["slim", "slim"])
    samples, types = scrape(server)
    wd = {"work_dir": WD_A, "project": "detection"}

    assert value(samples, "ckptd_work_dirs_watched") == 2
    assert types["ckptd_work_dirs_watched"] == "gauge"
    assert value(samples, "ckptd_checkpoints_kept", **wd) == 3  # the last pass's value
    assert value(samples, "ckptd_checkpoints_held_bytes", **wd) == 1_500_000_000
    assert value(samples, "ckptd_reclaimed_bytes_total", **wd) == 1_500_000_000
    assert types["ckptd_reclaimed_bytes"] == "counter"
    assert value(samples, "ckptd_deletions_total", **wd) == 3
    assert value(samples, "ckptd_slims_total", **wd) == 2
    assert value(samples, "ckptd_errors_total", **wd, kind="slim") == 2
    for kind in (
        "config",
        "delete",
        "input",
        "io",
        "publish",
    ):  # pre-set so increase() sees the first
        assert value(samples, "ckptd_errors_total", **wd, kind=kind) == 0
    assert value(samples, "ckptd_reconcile_passes_total", **wd, result="ok") == 2
    assert value(samples, "ckptd_reconcile_passes_total", **wd, result="error") == 1
    assert value(samples, "ckptd_best_metric_value", **wd, metric="coco/bbox_mAP") == 0.412
    assert value(samples, "ckptd_artifact_bytes", **wd, metric="coco/bbox_mAP") == 168_000_000

    assert types["ckptd_slim_duration_seconds"] == "histogram"
    assert value(samples, "ckptd_slim_duration_seconds_count") == 2
    assert value(samples, "ckptd_slim_duration_seconds_sum") == pytest.approx(3.17)
    assert value(samples, "ckptd_slim_duration_seconds_bucket", le="0.25") == 1
    assert value(samples, "ckptd_slim_duration_seconds_bucket", le="5.0") == 2
    les = {labels["le"] for labels in series(samples, "ckptd_slim_duration_seconds_bucket")}
    assert float(min(les - {"+Inf"}, key=float)) == SLIM_BUCKETS[0] == 0.05
    assert float(max(les - {"+Inf"}, key=float)) == SLIM_BUCKETS[-1] == 120.0
    assert value(samples, "ckptd_reconcile_duration_seconds_count") == 3


def test_seconds_since_last_success_is_computed_at_scrape_time(
    metrics: DaemonMetrics, server: MetricsServer
) -> None:
    a_pass(metrics)
    a_pass(metrics, work_dir=WD_B, ok=False, errors=["input"])
    first, _ = scrape(server)
    time.sleep(0.3)
    a_pass(metrics, ok=False, errors=["delete"])  # a failure does not reset the age
    second, _ = scrape(server)
    name = "ckptd_last_successful_reconcile_age_seconds"
    wd_a = {"work_dir": WD_A, "project": "detection"}
    wd_b = {"work_dir": WD_B, "project": "detection"}
    assert 0 <= value(first, name, **wd_a) < 5
    assert value(second, name, **wd_a) >= value(first, name, **wd_a) + 0.25
    # Never succeeded: aged from when ckptd first saw it; no timestamp series yet.
    assert value(second, name, **wd_b) >= 0.25
    stamp = "ckptd_last_successful_reconcile_timestamp_seconds"
    assert abs(value(second, stamp, **wd_a) - time.time()) < 60
    assert series(second, stamp) == [wd_a]


def test_forget_drops_every_series_of_the_work_dir(
    metrics: DaemonMetrics, server: MetricsServer
) -> None:
    a_pass(metrics)
    a_pass(metrics, work_dir=WD_B, errors=["io"])
    before, _ = scrape(server)
    assert any(labels.get("work_dir") == WD_A for _, labels in map(_dict, before))
    metrics.forget(WD_A)
    metrics.forget("/never/seen")  # harmless
    after, _ = scrape(server)
    assert not any(labels.get("work_dir") == WD_A for _, labels in map(_dict, after))
    assert value(after, "ckptd_errors_total", work_dir=WD_B, project="detection", kind="io") == 1
    # Seen again later: counters start over (a reset Prometheus handles).
    a_pass(metrics, reclaimed_bytes=7)
    again, _ = scrape(server)
    assert value(again, "ckptd_reclaimed_bytes_total", work_dir=WD_A, project="detection") == 7


def test_project_change_replaces_the_series(metrics: DaemonMetrics, server: MetricsServer) -> None:
    a_pass(metrics)
    a_pass(metrics, project="segmentation")
    samples, _ = scrape(server)
    projects = {labels["project"] for labels in series(samples, "ckptd_checkpoints_kept")}
    assert projects == {"segmentation"}


def test_best_values_replace_old_metric_keys(metrics: DaemonMetrics, server: MetricsServer) -> None:
    a_pass(metrics, best={"coco/bbox_mAP": 0.4, "loss": 0.9})
    a_pass(metrics, best={"coco/bbox_mAP": 0.5})
    samples, _ = scrape(server)
    assert [b["metric"] for b in series(samples, "ckptd_best_metric_value")] == ["coco/bbox_mAP"]


def test_healthz_200_and_503(server: MetricsServer, healthy: list[tuple[bool, str]]) -> None:
    base = f"http://127.0.0.1:{server.port}"
    status, content_type, body = get(base + "/healthz")
    assert (status, body) == (200, "ok: watching 2 work_dir(s)\n")
    assert content_type.startswith("text/plain")
    healthy[0] = (False, "main loop stalled for 95 s")
    status, _, body = get(base + "/healthz")
    assert (status, body) == (503, "main loop stalled for 95 s\n")


def test_healthz_503_when_the_check_raises(metrics: DaemonMetrics) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    with metrics.start_server("127.0.0.1:0", broken) as srv:
        status, _, body = get(f"http://127.0.0.1:{srv.port}/healthz")
    assert status == 503 and "boom" in body


def test_other_paths_are_404(server: MetricsServer) -> None:
    for path in ("/", "/metricsx", "/healthz/x", "/favicon.ico"):
        status, _, _ = get(f"http://127.0.0.1:{server.port}{path}")
        assert status == 404, path
    status, _, _ = get(f"http://127.0.0.1:{server.port}/metrics?name[]=x")
    assert status == 200


def test_openmetrics_when_asked(metrics: DaemonMetrics, server: MetricsServer) -> None:
    a_pass(metrics)
    status, content_type, text = get(
        f"http://127.0.0.1:{server.port}/metrics", accept="application/openmetrics-text"
    )
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")


def test_requests_are_not_logged(server: MetricsServer, capfd: pytest.CaptureFixture[str]) -> None:
    get(f"http://127.0.0.1:{server.port}/metrics")
    get(f"http://127.0.0.1:{server.port}/nope")
    out, err = capfd.readouterr()
    assert "GET" not in err and "GET" not in out


def test_concurrent_scrapes_and_passes(metrics: DaemonMetrics, server: MetricsServer) -> None:
    def writer(n: int) -> None:
        for i in range(200):
            a_pass(metrics, work_dir=f"/wd/{n}", reclaimed_bytes=1, deletions=1, slims=[])
            if i % 50 == 0:
                metrics.forget(f"/wd/{n}-other")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for _ in range(5):
        scrape(server)
    for t in threads:
        t.join()
    samples, _ = scrape(server)
    for n in range(4):
        assert (
            value(samples, "ckptd_deletions_total", work_dir=f"/wd/{n}", project="detection") == 200
        )


def test_listen_addresses() -> None:
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    assert parse_address(":9464") == ("", 9464)
    assert parse_address("0.0.0.0:0") == ("0.0.0.0", 0)
    for bad in ("9464", "::1:9464", "host:http", "[::1:9464", "h:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_address(bad)
    metrics = DaemonMetrics(CollectorRegistry())
    with metrics.start_server(":0", lambda: (True, "ok")) as srv:  # every interface
        assert get(f"http://127.0.0.1:{srv.port}/healthz")[0] == 200
    try:
        srv6 = metrics.start_server("[::1]:0", lambda: (True, "ok"))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with srv6:
        assert get(f"http://[::1]:{srv6.port}/healthz")[0] == 200


def test_stop_frees_the_port(metrics: DaemonMetrics) -> None:
    srv = metrics.start_server("127.0.0.1:0", lambda: (True, "ok"))
    port = srv.port
    srv.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    again = metrics.start_server(f"127.0.0.1:{port}", lambda: (True, "ok"))
    again.stop()


def _dict(key: tuple[str, frozenset[tuple[str, str]]]) -> tuple[str, dict[str, str]]:
    return key[0], dict(key[1])


def test_held_back_deletions_and_over_budget(metrics: DaemonMetrics, server: MetricsServer) -> None:
    a_pass(metrics, ok=False, errors=["input"], deletions=0, deletions_held=4, over_budget=True)
    a_pass(metrics, WD_B)
    samples, types = scrape(server)
    assert types["ckptd_deletions_held"] == types["ckptd_over_budget"] == "gauge"
    assert value(samples, "ckptd_deletions_held", work_dir=WD_A, project="detection") == 4
    assert value(samples, "ckptd_over_budget", work_dir=WD_A, project="detection") == 1
    assert value(samples, "ckptd_deletions_held", work_dir=WD_B, project="detection") == 0
    assert value(samples, "ckptd_over_budget", work_dir=WD_B, project="detection") == 0
    a_pass(metrics)  # the next pass found nothing wrong
    samples, _ = scrape(server)
    assert value(samples, "ckptd_deletions_held", work_dir=WD_A, project="detection") == 0
    assert value(samples, "ckptd_over_budget", work_dir=WD_A, project="detection") == 0


def test_filesystems_of_managed_work_dirs(
    metrics: DaemonMetrics, server: MetricsServer, tmp_path: Path
) -> None:
    for name in ("a", "b"):  # two work_dirs on one filesystem: one series per filesystem
        (tmp_path / name).mkdir()
        a_pass(metrics, str(tmp_path / name))
    a_pass(metrics, "/no/such/work_dir")  # cannot be stat'ed: left out
    samples, types = scrape(server)
    assert types["ckptd_filesystem_free_bytes"] == "gauge"
    mountpoint = str(mountpoint_of(tmp_path))
    assert series(samples, "ckptd_filesystem_free_bytes") == [{"mountpoint": mountpoint}]
    assert series(samples, "ckptd_filesystem_size_bytes") == [{"mountpoint": mountpoint}]
    st = os.statvfs(tmp_path)
    size = value(samples, "ckptd_filesystem_size_bytes", mountpoint=mountpoint)
    free = value(samples, "ckptd_filesystem_free_bytes", mountpoint=mountpoint)
    assert size == st.f_blocks * st.f_frsize
    assert 0 < free <= size and abs(free - st.f_bavail * st.f_frsize) < 64 * 2**20
    metrics.forget(str(tmp_path / "a"))
    metrics.forget(str(tmp_path / "b"))
    assert series(scrape(server)[0], "ckptd_filesystem_free_bytes") == []


def test_ready_follows_healthz(server: MetricsServer, healthy: list[tuple[bool, str]]) -> None:
    assert value(scrape(server)[0], "ckptd_ready") == 1
    healthy[0] = (False, "starting: first reconcile in progress")
    assert value(scrape(server)[0], "ckptd_ready") == 0


def test_ready_is_0_when_the_check_raises(metrics: DaemonMetrics) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    with metrics.start_server("127.0.0.1:0", broken) as srv:
        assert value(scrape(srv)[0], "ckptd_ready") == 0


def test_best_artifact_failed_per_metric(metrics: DaemonMetrics, server: MetricsServer) -> None:
    a_pass(metrics, ok=False, errors=["slim"], artifact_failed={"coco/bbox_mAP": True})
    samples, types = scrape(server)
    assert types["ckptd_best_artifact_failed"] == "gauge"
    labels = {"work_dir": WD_A, "project": "detection", "metric": "coco/bbox_mAP"}
    assert value(samples, "ckptd_best_artifact_failed", **labels) == 1
    a_pass(metrics, artifact_failed={"coco/bbox_mAP": False})  # written at the retry
    assert value(scrape(server)[0], "ckptd_best_artifact_failed", **labels) == 0
