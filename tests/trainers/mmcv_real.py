"""A real, tiny mmcv 1.7 ``EpochBasedRunner`` run on CPU, for the mmcv layout's tests.

Everything that touches the work_dir is mmcv's own code: ``EpochBasedRunner`` (with the model
in ``MMDataParallel``), ``CheckpointHook(max_keep_ckpts=-1)`` writing ``epoch_N.pth`` and the
``latest.pth`` symlink, ``TextLoggerHook`` writing ``<timestamp>.log.json``, and ``EvalHook``
(``save_best``) writing ``best_<key>_epoch_N.pth``. Hooks are registered as MMDetection 2.x's
``train_detector`` does: ``register_training_hooks`` (CheckpointHook at priority NORMAL,
TextLoggerHook at VERY_LOW), then ``EvalHook`` at priority LOW. Only the model, the data and
the metric values are ours: the dataset's ``evaluate()`` returns values from lookup tables
indexed by the epoch, so metric sequences are controlled (and repeat identically when a
resumed run re-trains an epoch).

mmcv 1.7 next to torch 2.13: ``pip install --no-build-isolation mmcv==1.7.2`` with
``MMCV_WITH_OPS=0`` (the Makefile's install target does it). ``mmcv.runner.checkpoint``
imports torchvision at module level but needs it only to resolve ``torchvision://`` model
URLs; PyPI's torchvision does not import beside this torch, so this harness puts an empty
``torchvision`` module in ``sys.modules`` before importing mmcv. It also replaces the
``time.sleep(2)`` that ``EpochBasedRunner.train``/``val`` do at every epoch ("prevent possible
deadlock during epoch transition", a DataLoader-worker concern; the loaders here have none)
with a no-op, so a run takes a second instead of half a minute.

Facts measured with this harness (the tests check them):

- Per epoch, ``CheckpointHook.after_train_epoch`` (NORMAL) saves ``epoch_N.pth`` *before*
  ``EvalHook.after_train_epoch`` (LOW) evaluates epoch N, so ``meta.hook_msgs`` in
  ``epoch_N.pth`` accounts for evaluations up to epoch N-1 only; ``best_<key>_epoch_N.pth`` is
  saved after its own evaluation and its ``hook_msgs`` include it.
- With ``workflow=[('train', 1), ('val', 1)]`` every epoch has two ``"mode": "val"`` lines with
  the same ``epoch``: first EvalHook's metrics (``mode, epoch, iter`` = val loader length,
  ``lr``, the metrics), then the val workflow's losses (``mode, epoch, iter``, ``lr``, the
  model's ``log_vars``, plus ``time`` and ``data_time`` from ``IterTimerHook``). EvalHook's
  line never has ``time``: that is how ``LoggerHook.get_mode`` calls it "val" in train mode.
- ``TextLoggerHook`` rounds every float to 5 decimals (``round(v, 5)``) and writes NaN as
  ``NaN``; EvalHook compares the raw values (``>``/``<``, so NaN never becomes best) and skips
  a falsy score (``if self.save_best and key_score``): 0.0 never becomes best.
- Resuming from ``epoch_K.pth`` restores ``hook_msgs`` as of evaluation K-1 and continues with
  epoch K+1: evaluation K is never re-run, so the resumed EvalHook never ranks it, and a best
  file written by it (or by later epochs of the first launch) stays behind, not removed.

Run it as a separate process (the tests do); ``--batch FILE`` runs several launches (a JSON
list of argument lists) in one process, which saves the import time per launch::

    python tests/trainers/mmcv_real.py WORK_DIR --epochs 6 --save-best auto --result R.json
    python tests/trainers/mmcv_real.py WORK_DIR --epochs 8 --resume-from epoch_5.pth ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Strict maximum of bbox_mAP at epoch 4 (index 3) and of loss minimum at epoch 4; no ties.
DEFAULT_MAP = (0.3, 0.45, 0.4, 0.5, 0.48, 0.47, 0.52, 0.49, 0.51, 0.5)
DEFAULT_LOSS = (0.9, 0.7, 0.75, 0.6, 0.62, 0.65, 0.58, 0.61, 0.6, 0.59)
CLASSES = ("person", "bicycle", "car")
TRAIN_SIZE = 16
VAL_SIZE = 8
BATCH = 4


def _import_mmcv() -> Any:
    sys.modules.setdefault("torchvision", types.ModuleType("torchvision"))
    import warnings

    warnings.filterwarnings("ignore", message="On January 1, 2023, MMCV")
    import mmcv
    import mmcv.runner.epoch_based_runner as runner_module

    # A module-like object whose sleep does nothing; everything else is the real `time`.
    no_sleep = {**vars(time), "sleep": lambda _seconds: None}
    runner_module.time = types.SimpleNamespace(**no_sleep)  # type: ignore[attr-defined]
    return mmcv


def _build(args: argparse.Namespace) -> tuple[Any, list[Any], list[tuple[str, int]]]:
    import logging

    import torch
    import torch.nn.functional as F
    from mmcv.parallel import MMDataParallel
    from mmcv.runner import EpochBasedRunner, EvalHook
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    tables: dict[str, list[float]] = json.loads(args.tables)

    class Data(Dataset):
        CLASSES = CLASSES

        def __init__(self, size: int, seed: int) -> None:
            g = torch.Generator().manual_seed(seed)
            self.x = torch.randn(size, 8, generator=g)
            self.y = (self.x[:, 0] > 0).long()
            self.runner: Any = None

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"img": self.x[i], "gt_label": self.y[i]}

        def evaluate(self, results: list, logger: Any = None, **_: Any) -> dict[str, float]:
            # After train epoch N the runner's 0-based epoch is still N-1.
            epoch = self.runner.epoch
            return {key: values[epoch % len(values)] for key, values in tables.items()}

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
            self.head = nn.Linear(16, len(CLASSES))

        def forward(self, img: Any, gt_label: Any = None, return_loss: bool = True) -> Any:
            logits = self.head(self.backbone(img))
            if return_loss:
                return {"loss_cls": F.cross_entropy(logits, gt_label)}
            return list(logits.argmax(1).tolist())

        def _step(self, data: dict[str, Any]) -> dict[str, Any]:
            losses = self(**data)
            loss = sum(losses.values())
            log_vars = {"loss_cls": losses["loss_cls"].item(), "loss": loss.item()}
            return {"loss": loss, "log_vars": log_vars, "num_samples": len(data["img"])}

        def train_step(self, data: dict[str, Any], optimizer: Any) -> dict[str, Any]:
            return self._step(data)

        def val_step(self, data: dict[str, Any], optimizer: Any = None) -> dict[str, Any]:
            return self._step(data)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a tiny model: threads only contend on a shared machine
    model = MMDataParallel(Toy())  # no device_ids: CPU, as mmdet's build_dp(model, 'cpu')
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    logger = logging.getLogger(f"ckptd-mmcv-{os.getpid()}-{args.work_dir}")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    meta = {"exp_name": "ckptd_toy.py", "seed": args.seed, "config": "model = dict(type='Toy')"}
    runner = EpochBasedRunner(
        model,
        optimizer=optimizer,
        work_dir=str(Path(args.work_dir).resolve()),
        logger=logger,
        meta=meta,
        max_epochs=args.epochs,
    )
    runner.timestamp = args.timestamp or time.strftime("%Y%m%d_%H%M%S", time.localtime())
    runner.register_training_hooks(
        lr_config={"policy": "step", "step": [4]},
        optimizer_config={"grad_clip": None},
        checkpoint_config={"interval": args.checkpoint_interval, "max_keep_ckpts": -1},
        log_config={"interval": 2, "hooks": [{"type": "TextLoggerHook"}]},
    )
    train_data = Data(TRAIN_SIZE, 1)
    val_data = Data(VAL_SIZE, 2)
    val_data.runner = runner
    loader = DataLoader(train_data, batch_size=BATCH, shuffle=False)
    val_loader = DataLoader(val_data, batch_size=BATCH, shuffle=False)
    eval_cfg: dict[str, Any] = {"interval": args.eval_interval}
    if args.save_best:
        eval_cfg["save_best"] = args.save_best
        if args.rule:
            eval_cfg["rule"] = args.rule
    runner.register_hook(EvalHook(val_loader, **eval_cfg), priority="LOW")
    if args.resume_from:
        runner.resume(str(Path(args.work_dir) / args.resume_from), map_location="cpu")
    workflow = [("train", 1), ("val", 1)] if args.val_workflow else [("train", 1)]
    loaders = [loader, val_loader] if args.val_workflow else [loader]
    return runner, loaders, workflow


def train(args: argparse.Namespace) -> dict[str, Any]:
    """One launch; the result the tests compare ckptd with."""
    _import_mmcv()
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    runner, loaders, workflow = _build(args)
    t0 = time.perf_counter()
    runner.run(loaders, workflow)
    hook_msgs = dict((runner.meta or {}).get("hook_msgs", {}))
    best_ckpt = hook_msgs.get("best_ckpt")
    work_dir = Path(args.work_dir)
    return {
        "work_dir": str(work_dir),
        "best_ckpt": os.path.basename(best_ckpt) if best_ckpt else None,
        "best_score": hook_msgs.get("best_score"),
        "files": sorted(p.name for p in work_dir.iterdir()),
        "latest": os.readlink(work_dir / "latest.pth"),
        "wall_seconds": time.perf_counter() - t0,
    }


def _tables(s: str) -> str:
    """'bbox_mAP=0.3,0.4;loss=0.9,nan' -> the JSON the dataset reads (key order kept)."""
    tables: dict[str, list[float]] = {}
    for part in s.split(";"):
        key, _, values = part.partition("=")
        tables[key] = [math.nan if v.lower() == "nan" else float(v) for v in values.split(",")]
    return json.dumps(tables)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("work_dir")
    p.add_argument("--result", default=None, help="write the result JSON here")
    p.add_argument("--epochs", type=int, default=6, help="total epochs (also when resumed)")
    p.add_argument("--tables", type=_tables, default=f"bbox_mAP={_join(DEFAULT_MAP)}")
    p.add_argument("--save-best", default="auto", help="EvalHook(save_best=...); '' for none")
    p.add_argument("--rule", default=None)
    p.add_argument("--eval-interval", type=int, default=1)
    p.add_argument("--checkpoint-interval", type=int, default=1)
    p.add_argument("--val-workflow", action="store_true", help="workflow train,1 + val,1")
    p.add_argument("--resume-from", default=None, help="a checkpoint name in WORK_DIR")
    p.add_argument("--timestamp", default=None, help="the .log.json name (default: now)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _join(values: Sequence[float]) -> str:
    return ",".join(str(v) for v in values)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    batch = argv[:1] == ["--batch"]
    launches = json.loads(Path(argv[1]).read_text()) if batch else [argv]
    for launch in launches:
        args = parser().parse_args(launch)
        result = train(args)
        if args.result:
            Path(args.result).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
