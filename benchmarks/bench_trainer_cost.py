"""Does ckptd slow my training? A simulated trainer alone and beside ``ckptd run``, interleaved.

    .venv/bin/python benchmarks/bench_trainer_cost.py           # 5 rounds x 2 ways (~6 min)
    .venv/bin/python benchmarks/bench_trainer_cost.py --rounds 9 --checkpoints 8
    .venv/bin/python benchmarks/bench_trainer_cost.py --quick   # smoke run, tiny sizes

The trainer (a child process: this file with ``--trainer``) is ``ckptd.demo.simulate``'s
MMEngine trainer with a 37.5M-parameter model (SGD with momentum: a 300 MB checkpoint): real
torch forward/backward/step on one core (``torch.set_num_threads(1)``, pinned with
``sched_setaffinity``), a read of ``--data-per-step`` from a dataset file in the page cache
every step, and every ``--steps`` steps an ``epoch_N.pth``, ``last_checkpoint`` and a val line
in ``scalars.json``. Every epoch is a new best (``rising``): ckptd slims each checkpoint and,
with ``keep_last: 2``, deletes an old epoch each time: its most expensive steady state.

Round by round (the order alternating) the trainer runs alone, then beside a ``ckptd run``
that was started and READY first; ckptd sets its own priority (nice 10, idle I/O class) as it
does by default. Per way: the trainer's steps per second over its whole run (checkpoint
saves included), the p50/p99 of training-step times (the steps that save a checkpoint are
reported on their own: the save is the trainer's own cost either way), and ckptd's CPU
seconds and bytes read/written (``/proc/<pid>/stat``, ``/proc/<pid>/io``) from READY until it
is idle after the trainer's last checkpoint, per checkpoint. Figures: medians over rounds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PYTHON,
    DaemonProc,
    Verdict,
    fmt_bytes,
    fmt_s,
    header,
    loadavg,
    median,
    percentile,
    print_table,
    print_verdicts,
    proc_cpu_seconds,
    scratch_dir,
    write_config,
)

MiB = 1024 * 1024
WAYS = ("alone", "with ckptd")
SAVE_EVENTS = frozenset({"launch", "checkpoint", "last_checkpoint", "val_log", "best", "rewrite"})


@dataclass(frozen=True, slots=True)
class Sizes:
    params: int = 37_500_000
    steps: int = 40  # training steps per checkpoint
    checkpoints: int = 5
    rounds: int = 5
    dataset_mib: int = 256
    data_per_step_mib: float = 4.0


QUICK = Sizes(params=200_000, steps=6, checkpoints=3, rounds=1, dataset_mib=4, data_per_step_mib=1)


# --- the trainer (child process, imports torch) --------------------------------------------


def trainer_main(work_dir: Path, dataset: Path, sizes: Sizes, cpu: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    import torch

    from ckptd.demo.simulate import SimConfig, SimulatedTrainer

    torch.set_num_threads(1)
    values = [round(0.1 + 0.01 * i, 4) for i in range(sizes.checkpoints)]  # every epoch a best
    trainer = SimulatedTrainer(
        work_dir,
        SimConfig(
            epochs=sizes.checkpoints,
            param_count=sizes.params,
            iters_per_epoch=sizes.steps,
            log_interval=min(10, sizes.steps),
            metric_values=values,
        ),
    )
    chunk = bytearray(int(sizes.data_per_step_mib * MiB))
    data = dataset.open("rb", buffering=0)
    stamps: list[tuple[float, bool]] = []  # (step done, a save happened since the step before)
    saved = [True]
    optimizer_step = trainer.optim.step

    def step(*args: object, **kwargs: object) -> object:
        if data.readinto(chunk) < len(chunk):  # the next batch; wrap around at the end
            data.seek(0)
            data.readinto(chunk)
        out = optimizer_step(*args, **kwargs)
        stamps.append((time.perf_counter(), saved[0]))
        saved[0] = False
        return out

    trainer.optim.step = step  # type: ignore[method-assign]
    for event in trainer.events():
        if event.kind in SAVE_EVENTS:
            saved[0] = True
    intervals = [(b - a, save) for (a, _), (b, save) in itertools.pairwise(stamps)]
    print(
        json.dumps(
            {
                "steps": len(stamps) - 1,
                "wall": stamps[-1][0] - stamps[0][0],
                "step_times": [dt for dt, save in intervals if not save],
                "save_times": [dt for dt, save in intervals if save],
                "checkpoint_bytes": trainer.work_dir.joinpath(trainer.last_ckpt or "")
                .stat()
                .st_size,
            }
        )
    )


# --- the harness ---------------------------------------------------------------------------


def proc_io(pid: int) -> dict[str, int]:
    """rchar/wchar (every read/write call) and read_bytes/write_bytes (the storage layer)."""
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = int(value)
    return out


def make_dataset(path: Path, mib: int) -> None:
    block = os.urandom(MiB)
    with path.open("wb") as f:
        for i in range(mib):
            f.write(block[i % 251 :] + block[: i % 251])  # distinct pages, cheap to make
    with path.open("rb") as f:  # into the page cache: every step reads from memory
        while f.read(16 * MiB):
            pass


def wait_idle(pid: int, quiet: float, timeout: float) -> float:
    """Wait until the process used no CPU for ``quiet`` seconds; returns the wait."""
    start = time.monotonic()
    last, since = proc_cpu_seconds(pid), time.monotonic()
    while time.monotonic() - start < timeout:
        time.sleep(0.25)
        now = proc_cpu_seconds(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return time.monotonic() - start


def one_run(root: Path, way: str, index: int, dataset: Path, sizes: Sizes, cpu: int) -> dict:
    runs = root / "runs"
    work_dir = runs / f"run-{index}"
    config = write_config(root, str(runs / "*"), retention={"keep_last": 2})
    load_before = loadavg()
    daemon = None
    if way == "with ckptd":
        daemon = DaemonProc(config, root / f"ckptd-{index}.log").start()
        daemon.wait_for("ready", timeout=120)
        cpu0, io0 = proc_cpu_seconds(daemon.pid), proc_io(daemon.pid)
    os.sync()  # the previous run's writeback is not this run's cost
    argv = [PYTHON, __file__, "--trainer", str(work_dir), str(dataset), "--cpu", str(cpu)]
    argv += ["--params", str(sizes.params), "--steps", str(sizes.steps)]
    argv += ["--checkpoints", str(sizes.checkpoints)]
    argv += ["--data-per-step-mib", str(sizes.data_per_step_mib)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"trainer failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result |= {"way": way, "load": f"{load_before} -> {loadavg()}"}
    if daemon is not None:
        result["drain_s"] = wait_idle(daemon.pid, quiet=3.0, timeout=120)
        cpu1, io1 = proc_cpu_seconds(daemon.pid), proc_io(daemon.pid)
        result["ckptd_cpu"] = cpu1 - cpu0
        result["ckptd_io"] = {k: io1[k] - io0[k] for k in io1 if k in io0}
        result["errors"] = len(daemon.errors())
        daemon.stop()
        result["left"] = sorted(p.name for p in work_dir.glob("epoch_*.pth"))
        result["artifacts"] = sorted(p.name for p in (work_dir / "best").glob("*.pth"))
    shutil.rmtree(work_dir)
    return result


def summarize(results: dict[str, list[dict]], sizes: Sizes) -> list[Verdict]:
    def per_way(way: str, key: str) -> float:
        return median([r[key] for r in results[way]])

    rows, stats = [], {}
    for way in WAYS:
        runs = results[way]
        sps = median([r["steps"] / r["wall"] for r in runs])
        p50 = median([percentile(r["step_times"], 50) for r in runs])
        p99 = median([percentile(r["step_times"], 99) for r in runs])
        save = median([median(r["save_times"]) for r in runs])
        stats[way] = (sps, p99)
        rows.append((way, f"{sps:.2f}", fmt_s(p50), fmt_s(p99), fmt_s(save), str(len(runs))))
    print_table(("trainer", "steps/s", "step p50", "step p99", "save step", "runs"), rows)
    with_runs = results["with ckptd"]
    n = sizes.checkpoints
    cpu = per_way("with ckptd", "ckptd_cpu") / n
    io = {k: median([r["ckptd_io"][k] for r in with_runs]) / n for k in with_runs[0]["ckptd_io"]}
    size = median([r["checkpoint_bytes"] for r in with_runs])
    print()
    print(
        f"ckptd per checkpoint ({fmt_bytes(size)}): CPU {fmt_s(cpu)}; read "
        f"{fmt_bytes(io['rchar'])} ({fmt_bytes(io['read_bytes'])} from storage), wrote "
        f"{fmt_bytes(io['wchar'])} ({fmt_bytes(io['write_bytes'])} to storage); idle "
        f"{fmt_s(per_way('with ckptd', 'drain_s'))} after the last checkpoint (incl. 3 s quiet); "
        f"left {with_runs[-1]['left']}, artifacts {len(with_runs[-1]['artifacts'])}; "
        f"{sum(r['errors'] for r in with_runs)} error lines"
    )
    for way in WAYS:
        print(f"load average during '{way}' runs: " + "; ".join(r["load"] for r in results[way]))
    (alone_sps, alone_p99), (with_sps, with_p99) = stats["alone"], stats["with ckptd"]
    loss = 1 - with_sps / alone_sps
    slower = with_p99 / alone_p99 - 1
    return [
        Verdict(
            "1a trainer throughput loss beside ckptd (steps/s, saves included)",
            f"{loss * 100:+.2f}% ({with_sps:.2f} vs {alone_sps:.2f} steps/s)",
            "<= 1%",
            loss <= 0.01,
        ),
        Verdict(
            "1b trainer step-time p99 increase",
            f"{slower * 100:+.2f}% ({fmt_s(with_p99)} vs {fmt_s(alone_p99)})",
            "<= 5%",
            slower <= 0.05,
        ),
        Verdict(
            "1c ckptd CPU per checkpoint (slim + delete + passes)",
            f"{fmt_s(cpu)}",
            "",
            None,
        ),
        Verdict(
            "1d ckptd bytes per checkpoint, read / written",
            f"{fmt_bytes(io['rchar'])} / {fmt_bytes(io['wchar'])}",
            "",
            None,
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes")
    parser.add_argument("--trainer", nargs=2, type=Path, metavar=("WORK_DIR", "DATASET"))
    parser.add_argument("--cpu", type=int, default=0, help="the core the trainer is pinned to")
    for field, default in asdict(Sizes()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default))
    args = parser.parse_args()
    base = QUICK if args.quick else Sizes()
    sizes = Sizes(
        **{k: v if (v := getattr(args, k)) is not None else d for k, d in asdict(base).items()}
    )
    if args.trainer:
        trainer_main(args.trainer[0], args.trainer[1], sizes, args.cpu)
        return 0
    header("ckptd cost to a training job", [Path(PYTHON).name, *sys.argv])
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    print(
        f"trainer pinned to core {args.cpu} of {cores}; {sizes.params:,} params, "
        f"{sizes.steps} steps per checkpoint, {sizes.checkpoints} checkpoints per run, "
        f"{sizes.rounds} rounds, {sizes.data_per_step_mib:g} MiB read per step from a "
        f"{sizes.dataset_mib} MiB dataset file",
        flush=True,
    )
    need = sizes.params * 8 * (sizes.checkpoints + 2) + sizes.dataset_mib * MiB
    results: dict[str, list[dict]] = {way: [] for way in WAYS}
    with scratch_dir("ckptd-bench-trainer-", need) as root:
        dataset = root / "dataset.bin"
        make_dataset(dataset, sizes.dataset_mib)
        index = 0
        for r in range(sizes.rounds):
            for way in WAYS if r % 2 == 0 else WAYS[::-1]:
                res = one_run(root, way, index, dataset, sizes, args.cpu)
                index += 1
                results[way].append(res)
                print(
                    f"round {r + 1} {way}: {res['steps'] / res['wall']:.2f} steps/s, p99 "
                    f"{fmt_s(percentile(res['step_times'], 99))}"
                    + (f", ckptd CPU {fmt_s(res['ckptd_cpu'])}" if "ckptd_cpu" in res else "")
                    + f" (load {res['load']})",
                    flush=True,
                )
        print()
        verdicts = summarize(results, sizes)
    print()
    ok = print_verdicts(verdicts)
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    raise SystemExit(main())
