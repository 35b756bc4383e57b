"""Drive simulated MMEngine trainers on a clock (run as a child process; imports torch).

``python benchmarks/sim_driver.py ROOT --trainers 20 --period 1 --epochs 120``: trainer i writes
``ROOT/run-i`` with ``ckptd.demo.simulate.SimulatedTrainer``, one epoch (train lines, checkpoint,
``last_checkpoint``, val line) every ``period`` seconds; all trainers share this one process
(one torch import instead of twenty). Prints one JSON line per val record as it lands
(``{"event": "val", "run": i, "epoch": N, "t": unix time}``) and a summary at the end with how
late the rounds ran. A late round (the machine stalled) delays the following rounds instead of
making them up in a burst: each trainer keeps at most one epoch per period.

``--pattern rising``: every epoch is a new best (every epoch gets slimmed); ``sawtooth``: a new
best every third epoch, the best sitting behind the newest checkpoints like in a real run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from ckptd.demo.simulate import SimConfig, SimulatedTrainer


def metric_values(pattern: str, epochs: int) -> list[float]:
    if pattern == "rising":
        return [round(0.01 + 0.001 * i, 6) for i in range(epochs)]
    return [round(0.2 + 0.001 * (i // 3) - 0.01 * (i % 3), 6) for i in range(epochs)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--trainers", type=int, default=1)
    parser.add_argument("--period", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--param-count", type=int, default=50_000)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--pattern", choices=("rising", "sawtooth"), default="rising")
    parser.add_argument("--iters-per-epoch", type=int, default=4)
    parser.add_argument(
        "--jitter", type=float, default=0.0, help="start each round up to this much late, at random"
    )
    args = parser.parse_args()
    # Tiny models: one intra-op thread. Two OpenMP threads spin-wait for each other on a busy
    # machine, turning a 10 ms epoch into seconds of CPU and the driver's cadence into bursts.
    torch.set_num_threads(1)
    values = metric_values(args.pattern, args.epochs)
    trainers = [
        SimulatedTrainer(
            args.root / f"run-{i}",
            SimConfig(
                epochs=args.epochs,
                param_count=args.param_count,
                optimizer=args.optimizer,
                metric_values=values,
                iters_per_epoch=args.iters_per_epoch,
                log_interval=args.iters_per_epoch,
                seed=i,
            ),
        )
        for i in range(args.trainers)
    ]
    rng = random.Random(0)  # the phase against a polling observer varies, reproducibly
    late: list[float] = []
    busy: list[float] = []
    slot = time.monotonic()
    for epoch in range(1, args.epochs + 1):
        due = slot + rng.uniform(0, args.jitter)
        now = time.monotonic()
        if now < due:
            time.sleep(due - now)
        late.append(max(0.0, time.monotonic() - due))
        if late[-1] > 0.5:
            print(json.dumps({"event": "late", "round": epoch, "late": late[-1]}), flush=True)
        began = time.monotonic()
        # A round that starts late pushes the next ones back: never a burst to catch up.
        slot = max(slot, began) + args.period
        for i, trainer in enumerate(trainers):
            for event in trainer.run_epoch():
                if event.kind == "val_log":
                    print(
                        json.dumps(
                            {"event": "val", "run": i, "epoch": event.epoch, "t": time.time()}
                        ),
                        flush=True,
                    )
        busy.append(time.monotonic() - began)
    late.sort()
    busy.sort()
    print(
        json.dumps(
            {
                "event": "done",
                "rounds": len(late),
                "late_p50": late[len(late) // 2],
                "late_max": late[-1],
                "busy_p50": busy[len(busy) // 2],
                "busy_max": busy[-1],
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
