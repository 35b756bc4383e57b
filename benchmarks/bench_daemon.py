"""The daemon at scale: start-up reconcile, idle cost, a long scalars.json, 20 trainers at once.

    .venv/bin/python benchmarks/bench_daemon.py            # all four parts (~6 min)
    .venv/bin/python benchmarks/bench_daemon.py --startup  # 200 x 50 checkpoints: start-up pass
    .venv/bin/python benchmarks/bench_daemon.py --idle     # ... then 60 s of nothing: CPU, RSS
    .venv/bin/python benchmarks/bench_daemon.py --scalars  # a 1,000,000-line scalars.json
    .venv/bin/python benchmarks/bench_daemon.py --load     # 20 trainers, 1 epoch/s, 2 minutes
    .venv/bin/python benchmarks/bench_daemon.py --quick    # smoke run of all four, small sizes
    .venv/bin/python benchmarks/bench_daemon.py --scales 200,2000  # start-up + idle at both

``ckptd`` runs as a child process with a config written here (JSON is YAML); CPU and RSS are
read from ``/proc/<pid>``. Work_dirs are made by the simulated MMEngine trainer
(``benchmarks/sim_driver.py``, a child process): one work_dir with N epochs, copied to the
others. Everything lives in a temp folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BENCH,
    PYTHON,
    DaemonProc,
    Verdict,
    ckptd_cmd,
    fmt_bytes,
    fmt_s,
    header,
    median,
    print_verdicts,
    proc_cpu_seconds,
    proc_status,
    proc_wakeups,
    run,
    scratch_dir,
    write_config,
)

from ckptd.core.timings import TIMINGS

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ScaleTargets:
    """The issue's targets at a number of work_dirs (idle 60 s, 50 checkpoints each)."""

    startup_s: float
    idle_cpu: float  # share of one core
    rss_mib: float
    threads: int


def targets_at(work_dirs: int) -> ScaleTargets:
    if work_dirs <= 200:
        return ScaleTargets(startup_s=2.0, idle_cpu=0.005, rss_mib=60, threads=8)
    return ScaleTargets(startup_s=5.0, idle_cpu=0.01, rss_mib=100, threads=8)


@dataclass(frozen=True, slots=True)
class Sizes:
    work_dirs: int = 200
    checkpoints: int = 50
    idle_seconds: float = 60.0
    scalar_lines: int = 1_000_000
    trainers: int = 20
    load_seconds: int = 120
    repeats: int = 5  # of the start-up measurements


QUICK = Sizes(
    work_dirs=10,
    checkpoints=6,
    idle_seconds=2.0,
    scalar_lines=20_000,
    trainers=3,
    load_seconds=3,
    repeats=1,
)


# --- the 200 x 50 tree ---------------------------------------------------------------------


def make_tree(root: Path, sizes: Sizes) -> Path:
    """``root/work_dirs/run-NNN``, each an MMEngine work_dir with ``checkpoints`` epochs."""
    template = root / "template"
    run(
        [
            PYTHON,
            str(BENCH / "sim_driver.py"),
            str(template),
            "--epochs",
            str(sizes.checkpoints),
            "--period",
            "0",
            "--param-count",
            "2000",
            "--pattern",
            "sawtooth",
        ]
    ).check()
    source = template / "run-0"
    work_dirs = root / "work_dirs"
    work_dirs.mkdir()
    old = time.time() - 3600  # a run that finished an hour ago: every file has settled
    for i in range(sizes.work_dirs):
        dest = work_dirs / f"run-{i:03d}"
        shutil.copytree(source, dest, symlinks=True)
        pointer = dest / "last_checkpoint"
        pointer.write_text(str(dest / Path(pointer.read_text()).name))
        for folder, _, files in os.walk(dest):
            for name in files:
                path = os.path.join(folder, name)
                epoch = name[6:-4] if name.startswith("epoch_") else ""
                stamp = old + (int(epoch) if epoch.isdigit() else sizes.checkpoints + 1)
                os.utime(path, (stamp, stamp))
    shutil.rmtree(template)
    return work_dirs


def tree_config(root: Path, work_dirs: Path, keep: int) -> Path:
    # keep_last = every checkpoint: a steady state in which nothing is left to delete.
    return write_config(root, str(work_dirs / "*"), retention={"keep_last": keep})


def startup_and_idle(
    root: Path, sizes: Sizes, idle: bool, verdicts: list[Verdict], baseline: Path | None
) -> None:
    print(f"building {sizes.work_dirs} work_dirs x {sizes.checkpoints} checkpoints ...", flush=True)
    work_dirs = make_tree(root, sizes)
    config = tree_config(root, work_dirs, sizes.checkpoints)
    cold = run([*ckptd_cmd(), "once", "-c", str(config)]).check()
    slimmed = sum(1 for p in work_dirs.glob("*/best/*.pth"))
    print(
        f"first-ever pass (`ckptd once`, no state yet, {slimmed} artifacts written): "
        f"{fmt_s(cold.wall)}, CPU {fmt_s(cold.cpu)}, peak RSS {cold.maxrss_mib:.0f} MiB"
    )
    builds: list[tuple[str, dict[str, str] | None]] = [("", None)]
    if baseline is not None:  # another ckptd/ (e.g. before a change), on the same tree
        builds.append((" (baseline)", {**os.environ, "PYTHONPATH": str(baseline)}))
    for label, env in builds:
        onces = [
            run([*ckptd_cmd(), "once", "-c", str(config)], env=env, cwd=root).check()
            for _ in range(sizes.repeats)
        ]
        readies: list[float] = []
        for i in range(max(1, sizes.repeats - 2)):
            with DaemonProc(config, root / f"startup{label.strip()}-{i}.log", env=env) as daemon:
                readies.append(daemon.wait_for("ready", timeout=300))
                daemon.stop()
        once_wall = median([r.wall for r in onces])
        ready = median(readies)
        print(
            f"warm start-up pass{label}, nothing to slim or delete: `ckptd once` "
            f"{fmt_s(once_wall)} (CPU {fmt_s(median([r.cpu for r in onces]))}, peak RSS "
            f"{max(r.maxrss_mib for r in onces):.0f} MiB); `ckptd run` start to ready "
            f"{fmt_s(ready)} (medians of {len(onces)} and {len(readies)})"
        )
        n = sizes.work_dirs * sizes.checkpoints
        goal = targets_at(sizes.work_dirs).startup_s
        verdicts.append(
            Verdict(
                f"4a start-up reconcile{label}, {sizes.work_dirs} x {sizes.checkpoints} = {n} "
                "checkpoints",
                f"run->ready {fmt_s(ready)}; once {fmt_s(once_wall)}",
                f"<= {goal:g} s",
                max(ready, once_wall) <= goal if not label else None,
            )
        )
        if idle:
            idle_cost(root, config, sizes, verdicts, label, env)


def idle_cost(
    root: Path,
    config: Path,
    sizes: Sizes,
    verdicts: list[Verdict],
    label: str = "",
    env: dict[str, str] | None = None,
) -> None:
    with DaemonProc(config, root / f"idle{label.strip()}.log", env=env) as daemon:
        daemon.wait_for("ready", timeout=300)
        time.sleep(min(5.0, sizes.idle_seconds / 3))
        pid = daemon.pid
        print(f"idle: measuring {sizes.idle_seconds:g} s ...", flush=True)
        cpu0, wake0, t0 = proc_cpu_seconds(pid), proc_wakeups(pid), time.monotonic()
        rss: list[int] = []
        while time.monotonic() - t0 < sizes.idle_seconds:
            rss.append(proc_status(pid).get("VmRSS", 0))
            time.sleep(1.0)
        cpu1, wake1, t1 = proc_cpu_seconds(pid), proc_wakeups(pid), time.monotonic()
        status = proc_status(pid)
        # A resync (every watch.resync_interval, default 5 min) is a full pass: SIGHUP forces one.
        os.kill(pid, signal.SIGHUP)
        daemon.wait_for("config reloaded", timeout=60)
        idle_rate = (cpu1 - cpu0) / (t1 - t0)
        resync_started = time.monotonic()
        busy = proc_cpu_seconds(pid)
        while time.monotonic() - resync_started < 120:  # until the resync's passes are done
            time.sleep(1.0)
            now_cpu = proc_cpu_seconds(pid)
            if now_cpu - busy <= max(0.02, 3 * idle_rate):
                break
            busy = now_cpu
        after = time.monotonic() - resync_started
        resync_cpu = proc_cpu_seconds(pid) - cpu1 - after * idle_rate
        errors = daemon.errors()
        daemon.stop()
    share = (cpu1 - cpu0) / (t1 - t0)
    peak_rss = max(rss) / 1024
    threads = status.get("Threads", 0)
    goal = targets_at(sizes.work_dirs)
    # the daemon spaces resyncs out to cost at most TIMINGS.resync_cpu_share of a core
    every = TIMINGS.resync_interval(300.0, max(resync_cpu, 0.0))
    amortized = share + max(resync_cpu, 0.0) / every
    print(
        f"idle{label} over {t1 - t0:.0f} s: CPU {share * 100:.2f}% of a core, "
        f"{(wake1 - wake0) / (t1 - t0):.1f} context switches/s, RSS {peak_rss:.0f} MiB "
        f"(VmHWM {status.get('VmHWM', 0) / 1024:.0f} MiB), {threads} threads; "
        f"a full resync pass costs {fmt_s(max(resync_cpu, 0))} CPU: every {every:.0f} s "
        f"(resync_interval 300 s, spaced to <= {TIMINGS.resync_cpu_share:.1%} of a core) "
        f"that adds {max(resync_cpu, 0) / every * 100:.2f}% -> {amortized * 100:.2f}% "
        "averaged; "
        f"{len(errors)} error lines"
    )
    verdicts.append(
        Verdict(
            f"3a idle CPU{label}, {sizes.work_dirs} work_dirs, over {t1 - t0:.0f} s",
            f"{share * 100:.2f}% of a core ({amortized * 100:.2f}% with resyncs)",
            f"<= {goal.idle_cpu * 100:g}%",
            share <= goal.idle_cpu if not label else None,
        )
    )
    verdicts.append(
        Verdict(
            f"3b idle daemon RSS{label}, {sizes.work_dirs} work_dirs",
            f"{peak_rss:.0f} MiB",
            f"<= {goal.rss_mib:g} MiB",
            peak_rss <= goal.rss_mib if not label else None,
        )
    )
    verdicts.append(
        Verdict(
            f"3c idle daemon threads{label}, {sizes.work_dirs} work_dirs",
            str(threads),
            f"<= {goal.threads}",
            threads <= goal.threads if not label else None,
        )
    )


# --- a long scalars.json -------------------------------------------------------------------

TRAIN_LINE = (
    '{{"base_lr": 0.02, "lr": 0.02, "data_time": 0.0{d:03d}, "grad_norm": 3.{g:03d}, '
    '"loss": 1.{l:03d}, "loss_rpn_cls": 0.0{a:03d}, "loss_rpn_bbox": 0.0{b:03d}, '
    '"loss_cls": 0.3{c:03d}, "acc": 9{e:d}.1, "loss_bbox": 0.2{f:03d}, "time": 0.4{t:03d}, '
    '"iter": {i}, "memory": 3{m:03d}, "step": {i}}}\n'
)
VAL_LINE = (
    '{{"coco/bbox_mAP": 0.{v:03d}, "coco/bbox_mAP_50": 0.5, "coco/bbox_mAP_75": 0.4, '
    '"coco/bbox_mAP_s": 0.2, "coco/bbox_mAP_m": 0.4, "coco/bbox_mAP_l": 0.5, '
    '"data_time": 0.002, "time": 0.08, "step": {i}}}\n'
)
READ_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from ckptd.layouts.mmengine import MMEngineLayout

def rchar():
    return int(next(l for l in open("/proc/self/io") if l.startswith("rchar")).split()[1])

work_dir, scalars, append = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
layout = MMEngineLayout()
t, r = time.perf_counter(), rchar()
first = layout.read_evals(work_dir, {}, "iter")
out = {"first_s": time.perf_counter() - t, "first_bytes": rchar() - r,
       "records": len(first.records), "problems": len(first.problems)}
with open(scalars, "rb") as f:  # the last line is a val line; append train lines
    f.seek(-1000, 2)
    line = f.read().split(b"\n")[-3] + b"\n"
with open(scalars, "ab") as f:
    f.write(line * append)
out["appended"] = len(line) * append
t, r = time.perf_counter(), rchar()
again = layout.read_evals(work_dir, first.sources, "iter")
out |= {"again_s": time.perf_counter() - t, "again_bytes": rchar() - r,
        "again_records": len(again.records),
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
print(json.dumps(out))
"""


def write_scalars(path: Path, lines: int, val_every: int = 1000) -> int:
    path.parent.mkdir(parents=True)
    with path.open("w") as f:
        batch = []
        for i in range(1, lines + 1):
            if i % val_every == 0:
                batch.append(VAL_LINE.format(v=(i // val_every) % 1000, i=i))
            else:
                k = i % 997
                batch.append(
                    TRAIN_LINE.format(d=k, g=k, l=k, a=k, b=k, c=k, e=k % 10, f=k, t=k, i=i, m=k)
                )
            if len(batch) >= 10_000:
                f.write("".join(batch))
                batch.clear()
        f.write("".join(batch))
    return path.stat().st_size


def scalars(root: Path, sizes: Sizes, verdicts: list[Verdict]) -> None:
    work_dir = root / "work_dirs" / "iter-run"
    path = work_dir / "20240101_000000" / "vis_data" / "scalars.json"
    size = write_scalars(path, sizes.scalar_lines)
    print(f"scalars.json: {sizes.scalar_lines:,} lines, {fmt_bytes(size)}", flush=True)
    res = run([PYTHON, "-c", READ_CHILD, str(work_dir), str(path), "1000"]).check()
    data = json.loads(res.stdout.strip().splitlines()[-1])
    print(
        f"first read: {fmt_s(data['first_s'])}, {fmt_bytes(data['first_bytes'])} read, "
        f"{data['records']} val records, peak RSS {data['maxrss_mib']:.0f} MiB; "
        f"after appending 1000 lines ({fmt_bytes(data['appended'])}): "
        f"{fmt_s(data['again_s'])}, {fmt_bytes(data['again_bytes'])} read"
    )
    config = write_config(root, str(work_dir.parent / "*"))
    once = run([*ckptd_cmd(), "once", "-c", str(config)]).check()
    print(f"`ckptd once` on that work_dir, first time: {fmt_s(once.wall)}")
    verdicts.append(
        Verdict(
            f"4b first read of a {sizes.scalar_lines:,}-line scalars.json",
            f"{fmt_s(data['first_s'])} (whole `ckptd once` {fmt_s(once.wall)})",
            "<= 3 s",
            data["first_s"] <= 3.0,
        )
    )
    extra = data["again_bytes"] - data["appended"]
    verdicts.append(
        Verdict(
            "4c a later append costs only its new bytes",
            f"read {fmt_bytes(data['again_bytes'])} for {fmt_bytes(data['appended'])} appended",
            "new bytes (+ a few KiB)",
            0 <= extra <= 8192 and data["again_records"] == data["records"],
        )
    )


# --- load: 20 trainers ---------------------------------------------------------------------


def load(root: Path, sizes: Sizes, verdicts: list[Verdict]) -> None:
    work_dirs = root / "load"
    work_dirs.mkdir()
    keep_last, protected, slack = 2, 1, 2
    bound = keep_last + protected + slack
    config = write_config(root, str(work_dirs / "*"), retention={"keep_last": keep_last})
    with DaemonProc(config, root / "load.log") as daemon:
        daemon.wait_for("ready")
        pid = daemon.pid
        print(
            f"load: {sizes.trainers} trainers, one checkpoint + val record each per second, "
            f"{sizes.load_seconds} s ...",
            flush=True,
        )
        driver = subprocess.Popen(
            [
                PYTHON,
                str(BENCH / "sim_driver.py"),
                str(work_dirs),
                "--trainers",
                str(sizes.trainers),
                "--period",
                "1",
                "--epochs",
                str(sizes.load_seconds),
                "--pattern",
                "sawtooth",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        summary: dict[str, float] = {}

        def read_driver() -> None:
            assert driver.stdout is not None
            for line in driver.stdout:
                event = json.loads(line)
                if event["event"] == "done":
                    summary.update(event)
                elif event["event"] == "late":
                    summary["late_rounds"] = summary.get("late_rounds", 0) + 1

        reader = threading.Thread(target=read_driver, daemon=True)
        reader.start()
        cpu0, t0 = proc_cpu_seconds(pid), time.monotonic()
        most, most_where = 0, ""
        rss: list[tuple[float, int]] = []
        next_rss = t0
        while driver.poll() is None:
            for entry in os.scandir(work_dirs):
                count = (
                    sum(1 for e in os.scandir(entry.path) if e.name.startswith("epoch_"))
                    if entry.is_dir()
                    else 0
                )
                if count > most:
                    most, most_where = count, entry.name
            now = time.monotonic()
            if now >= next_rss:
                rss.append((now - t0, proc_status(pid).get("VmRSS", 0)))
                next_rss = now + 1.0
            time.sleep(0.1)
        cpu1, t1 = proc_cpu_seconds(pid), time.monotonic()
        reader.join(timeout=5)
        caught_up = float("nan")
        while time.monotonic() - t1 < 60:
            counts = [
                sum(1 for e in os.scandir(d.path) if e.name.startswith("epoch_"))
                for d in os.scandir(work_dirs)
                if d.is_dir()
            ]
            if counts and max(counts) <= keep_last + protected:
                caught_up = time.monotonic() - t1
                break
            time.sleep(0.1)
        errors = daemon.errors()
        daemon.stop()
    n = len(rss)
    early = median([kib for _, kib in rss[n // 4 : n // 2]]) / 1024 if n >= 4 else float("nan")
    late = median([kib for _, kib in rss[3 * n // 4 :]]) / 1024 if n >= 4 else float("nan")
    print(
        f"most checkpoints ever in one work_dir: {most} ({most_where}); daemon CPU "
        f"{(cpu1 - cpu0) / (t1 - t0) * 100:.0f}% of a core; RSS {early:.0f} MiB in the 2nd "
        f"quarter, {late:.0f} MiB in the last (max {max(k for _, k in rss) / 1024:.0f} MiB); "
        f"caught up {fmt_s(caught_up)} after the trainers stopped; trainer rounds late by "
        f"{summary.get('late_p50', float('nan')) * 1000:.0f} ms median, "
        f"{summary.get('late_max', float('nan')) * 1000:.0f} ms max "
        f"({summary.get('late_rounds', 0)} rounds > 0.5 s late); {len(errors)} error lines"
    )
    verdicts.append(
        Verdict(
            f"5a {sizes.trainers} trainers x {sizes.load_seconds} s: most ckpts in a work_dir",
            str(most),
            f"<= keep_last {keep_last} + protected {protected} + {slack} = {bound}",
            most <= bound and not errors,
        )
    )
    verdicts.append(
        Verdict(
            "5b daemon RSS under load stays flat",
            f"{early:.0f} -> {late:.0f} MiB",
            "growth <= 10%",
            late <= early * 1.10,
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for part in ("startup", "idle", "scalars", "load"):
        parser.add_argument(f"--{part}", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes")
    parser.add_argument(
        "--scales",
        help="start-up and idle at each of these numbers of work_dirs, e.g. 200,2000",
    )
    parser.add_argument("--work-dirs", type=int, help="default 200")
    parser.add_argument("--checkpoints", type=int, help="per work_dir, default 50")
    parser.add_argument("--idle-seconds", type=float, help="default 60")
    parser.add_argument("--scalar-lines", type=int, help="default 1,000,000")
    parser.add_argument("--trainers", type=int, help="default 20")
    parser.add_argument("--load-seconds", type=int, help="default 120")
    parser.add_argument("--repeats", type=int, help="start-up measurements, default 5")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also measure start-up and idle with the ckptd/ package in this folder",
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else Sizes()
    overrides = {
        k: v for k, v in vars(args).items() if k in Sizes.__dataclass_fields__ and v is not None
    }
    sizes = dataclasses.replace(sizes, **overrides)
    parts = [p for p in ("startup", "idle", "scalars", "load") if getattr(args, p)]
    parts = parts or ["startup", "idle", "scalars", "load"]
    header("ckptd daemon benchmark", [Path(PYTHON).name, *sys.argv])
    verdicts: list[Verdict] = []
    scales = [int(n) for n in args.scales.split(",")] if args.scales else []
    with scratch_dir("ckptd-bench-daemon-", 2 << 30) as root:
        for n in scales:  # each scale on its own tree, one after the other
            (root / f"scale-{n}").mkdir()
            scaled = dataclasses.replace(sizes, work_dirs=n)
            startup_and_idle(root / f"scale-{n}", scaled, True, verdicts, args.baseline)
        if scales and not any(getattr(args, p) for p in ("startup", "idle", "scalars", "load")):
            parts = []
        if "startup" in parts or "idle" in parts:
            startup_and_idle(root, sizes, "idle" in parts, verdicts, args.baseline)
        if "scalars" in parts:
            scalars(root, sizes, verdicts)
        if "load" in parts:
            load(root, sizes, verdicts)
    print()
    ok = print_verdicts(verdicts)
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    raise SystemExit(main())
