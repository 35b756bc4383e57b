"""A real, tiny MMEngine 0.10.7 training run on CPU, for conformance tests.

Everything that touches the work_dir is MMEngine's own code (``Runner``, ``CheckpointHook``,
``LoggerHook``, ``LocalVisBackend``, ``EMAHook``); only the model, the data set and the metric
are ours. The metric is computed through the real evaluator path, but its *value* is read from
a lookup table indexed by the epoch (or by the validation ordinal when iteration-based), so that
the metric stream rises and falls deterministically and survives a resume.

Run it as a separate process (the tests do): MMEngine keeps global state per process
(registries, ``MessageHub``/``MMLogger`` instances named after the launch timestamp, torch's
deterministic-algorithms flag), and two launches in one process within the same second share
those instances.

    python tests/trainers/mmengine_real.py WORK_DIR --epochs 6 --save-best auto
    python tests/trainers/mmengine_real.py WORK_DIR --iter-based --max-iters 48 --val-interval 8
    python tests/trainers/mmengine_real.py WORK_DIR --epochs 8 --resume

Resume under torch >= 2.6
-------------------------
``Runner.resume`` -> ``mmengine.runner.checkpoint.load_from_local`` calls
``torch.load(filename, map_location=...)`` without ``weights_only``. Since torch 2.6 that
means ``weights_only=True``, and every MMEngine training checkpoint holds
``mmengine.logging.history_buffer.HistoryBuffer`` objects and numpy arrays in ``message_hub``,
so resume fails with ``_pickle.UnpicklingError: Weights only load failed``. The fix applied here
(``weights_only_fix='safe_globals'``, the default) allowlists exactly the globals these
checkpoints need with ``torch.serialization.add_safe_globals`` in the trainer process, which
keeps the weights-only unpickler. The blunt alternative is ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``
in the trainer's environment (``weights_only_fix='env'``), which turns the restriction off.
``weights_only_fix='none'`` reproduces the failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

# Values of the first metric key per epoch (by-epoch) or per validation (iter-based); the table
# wraps around. Rises and falls, has a strict maximum at index 3 (epoch 4), and no ties before
# it, so MMEngine's strict `>` picks epoch 4.
DEFAULT_VALUES: tuple[float, ...] = (0.3, 0.45, 0.4, 0.5, 0.48, 0.47, 0.52, 0.49, 0.51, 0.5)
# `loss` variant: less is better; the minimum is also at index 3.
DEFAULT_LOSS_VALUES: tuple[float, ...] = (0.9, 0.7, 0.75, 0.6, 0.62, 0.65, 0.58, 0.61, 0.6, 0.59)

CLASSES = ("cat", "dog", "bird")
TRAIN_SIZE = 32  # 8 iterations per epoch at batch 4, like the reference run
VAL_SIZE = 8
BATCH = 4
LOG_INTERVAL = 4  # two train lines per epoch, like reference/mmengine/scalars.json


@dataclass(frozen=True)
class RealRunResult:
    work_dir: Path
    log_dir: Path  # <work_dir>/<timestamp>/
    scalars: Path  # <log_dir>/vis_data/scalars.json
    wall_seconds: float


def _register() -> None:
    """Register the toy model/data/metric in MMEngine's root registries (idempotent)."""
    import torch
    import torch.nn.functional as F
    from mmengine.evaluator import BaseMetric
    from mmengine.logging import MessageHub
    from mmengine.model import BaseModel
    from mmengine.registry import DATASETS, METRICS, MODELS
    from torch import nn
    from torch.utils.data import Dataset

    class CkptdToyDataset(Dataset):
        def __init__(self, size: int, seed: int = 1234) -> None:
            g = torch.Generator().manual_seed(seed)
            self.x = torch.randn(size, 16, generator=g)
            self.y = torch.randint(0, len(CLASSES), (size,), generator=g)
            # `hasattr(dataset, 'metainfo')` is how Runner fills meta['dataset_meta'].
            self.metainfo = {"classes": CLASSES, "palette": [(220, 20, 60)] * len(CLASSES)}

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"inputs": self.x[i], "labels": self.y[i]}

    class CkptdToyModel(BaseModel):
        def __init__(self, hidden: int = 32) -> None:
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(16, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
            self.head = nn.Linear(hidden, len(CLASSES))

        def forward(self, inputs: Any, labels: Any = None, mode: str = "tensor") -> Any:
            logits = self.head(self.backbone(inputs))
            if mode == "loss":
                # Key contains 'loss' -> MMEngine logs it and the summed 'loss'.
                return {"loss_cls": F.cross_entropy(logits, labels)}
            if mode == "predict":
                return [
                    {"pred": int(p), "label": int(t)}
                    for p, t in zip(logits.argmax(1), labels, strict=True)
                ]
            return logits

    class CkptdTableMetric(BaseMetric):
        """Runs through Evaluator like any metric; the value comes from a table."""

        def __init__(
            self,
            kind: str = "coco",
            values: Sequence[float] | None = None,
            val_interval: int = 1,
            by_epoch: bool = True,
            **kwargs: Any,
        ) -> None:
            super().__init__(prefix="coco" if kind == "coco" else "val", **kwargs)
            self.kind = kind
            default = DEFAULT_VALUES if kind == "coco" else DEFAULT_LOSS_VALUES
            self.values = [float(v) for v in (values or default)]
            self.val_interval = val_interval
            self.by_epoch = by_epoch

        def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
            self.results.extend(int(s["pred"] == s["label"]) for s in data_samples)

        def _index(self) -> int:
            # The runner's MessageHub is restored on resume, so the index continues too.
            # 'epoch' is updated before each train epoch (0-based) and 'iter' before each
            # train iteration (0-based); during validation both still hold those values.
            hub = MessageHub.get_current_instance()
            if self.by_epoch:
                return int(hub.get_info("epoch", 0))
            return (int(hub.get_info("iter", 0)) + 1) // self.val_interval - 1

        def compute_metrics(self, results: list) -> dict[str, float]:
            v = self.values[self._index() % len(self.values)]
            acc = sum(results) / max(len(results), 1)
            if self.kind == "coco":
                # Key order matters: save_best='auto' takes the first key.
                return {
                    "bbox_mAP": v,
                    "bbox_mAP_50": round(v + 0.2, 3),
                    "bbox_mAP_75": round(v - 0.05, 3),
                    "bbox_mAP_s": 0.1,
                    "bbox_mAP_m": 0.2,
                    "bbox_mAP_l": round(acc, 3),
                }
            return {"loss": v, "acc": round(acc, 3)}

    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS

    class CkptdSlowdownHook(Hook):
        """Makes each epoch last ``seconds`` so a watcher sees training live."""

        def __init__(self, seconds: float) -> None:
            self.seconds = seconds

        def before_train_epoch(self, runner: Any) -> None:
            time.sleep(self.seconds)

    for reg, cls in (
        (DATASETS, CkptdToyDataset),
        (MODELS, CkptdToyModel),
        (METRICS, CkptdTableMetric),
        (HOOKS, CkptdSlowdownHook),
    ):
        reg.register_module(module=cls, force=True)


_SINKS: dict[str, TextIO] = {}  # resolved root -> events file
_PREFIXES: set[str] = set()  # roots as given and resolved, for a cheap reject


def record_fs_events(root: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Append one line per write-side filesystem call under ``root`` to ``out``, in order.

    A Python audit hook (it cannot be removed: meant for a dedicated trainer process) sees
    ``open`` for writing (``w``/``a``/``x``/``+`` modes, or write flags for ``os.open``),
    ``os.remove``, ``os.rename``/``os.replace`` and ``os.mkdir``. Lines are
    ``<op> <path relative to root>``, op in {open-w, open-a, delete, mkdir} (or
    ``rename <dst> <- <src>``): what the simulator's write order is compared against.
    Calling it again for the same root sends that root's later lines to the new file.
    """
    root_s = os.path.realpath(root)
    old = _SINKS.get(root_s)
    install = not _SINKS
    # Opened before it is registered, and outside every root: never recorded itself.
    _SINKS[root_s] = open(out, "a", buffering=1)  # noqa: SIM115
    _PREFIXES.update({root_s + os.sep, os.path.abspath(root) + os.sep})
    if old is not None:
        old.close()
    if install:
        sys.addaudithook(_audit_hook)


def _locate(path: Any) -> tuple[TextIO, str] | None:
    if not isinstance(path, (str, bytes, os.PathLike)):
        return None  # fd-based open
    p = os.fsdecode(path)
    if os.path.isabs(p) and not p.startswith(tuple(_PREFIXES)):
        return None  # cheap reject: imports open thousands of files
    p = os.path.realpath(p)
    for root, sink in _SINKS.items():
        if p.startswith(root + os.sep):
            return sink, os.path.relpath(p, root)
    return None


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    op, target = None, None
    if event == "open":
        path, mode, flags = args
        if isinstance(mode, str):
            op = "open-a" if "a" in mode else "open-w" if set(mode) & set("wx+") else None
        elif (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
            op = "open-w"
        target = path
    elif event in ("os.remove", "os.mkdir"):
        op, target = ("delete" if event == "os.remove" else "mkdir"), args[0]
    elif event == "os.rename" and (dst := _locate(args[1])):
        op, target = f"rename {dst[1]} <-", args[0]
    if op and (hit := _locate(target)):
        hit[0].write(f"{op} {hit[1]}\n")


def allow_mmengine_checkpoints_weights_only() -> None:
    """Allowlist what MMEngine training checkpoints pickle, for torch>=2.6 weights_only loads."""
    import numpy as np
    import torch
    from mmengine.logging.history_buffer import HistoryBuffer

    dtype_classes = [type(np.dtype(t)) for t in ("f8", "f4", "i8", "i4", "u1", "b1")]
    torch.serialization.add_safe_globals(
        [
            HistoryBuffer,
            # HistoryBuffer pickles its `statistics_methods` dict of class functions as
            # `getattr(HistoryBuffer, 'min')` (pickle protocol 2 cannot name nested qualnames).
            getattr,
            np.ndarray,
            np.dtype,
            *dtype_classes,
            np._core.multiarray._reconstruct,  # type: ignore[attr-defined]
            np._core.multiarray.scalar,  # type: ignore[attr-defined]
        ]
    )


def build_cfg(
    work_dir: str | os.PathLike[str],
    *,
    epochs: int = 6,
    by_epoch: bool = True,
    max_iters: int = 48,
    val_interval: int = 1,
    checkpoint_interval: int | None = None,
    max_keep_ckpts: int = -1,
    save_best: str | list[str] | None = None,
    rule: str | list[str] | None = None,
    save_last: bool = True,
    resume: bool = False,
    load_from: str | None = None,
    ema: bool = False,
    seed: int = 0,
    metric: str = "coco",
    values: Sequence[float] | None = None,
    optimizer: str = "SGD",
    iter_log_by_epoch: bool = False,
    epoch_seconds: float = 0.0,
) -> dict[str, Any]:
    """The config dict handed to ``Runner.from_cfg`` (kept close to OpenMMLab configs)."""
    ckpt: dict[str, Any] = {
        "type": "CheckpointHook",
        "interval": checkpoint_interval or (1 if by_epoch else val_interval),
        "by_epoch": by_epoch,
        "max_keep_ckpts": max_keep_ckpts,
        "save_last": save_last,
    }
    if save_best is not None:
        ckpt["save_best"] = save_best
        if rule is not None:
            ckpt["rule"] = rule
    if optimizer == "SGD":
        optim = {"type": "SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}
    else:
        optim = {"type": "AdamW", "lr": 0.01, "weight_decay": 0.05}
    if by_epoch:
        train_cfg = {"by_epoch": True, "max_epochs": epochs, "val_interval": val_interval}
        sampler = {"type": "DefaultSampler", "shuffle": True}
        sched = {"type": "MultiStepLR", "by_epoch": True, "milestones": [4], "gamma": 0.1}
    else:
        train_cfg = {"type": "IterBasedTrainLoop", "max_iters": max_iters}
        train_cfg["val_interval"] = val_interval
        sampler = {"type": "InfiniteSampler", "shuffle": True}
        sched = {
            "type": "MultiStepLR",
            "by_epoch": False,
            "milestones": [max_iters // 2],
            "gamma": 0.1,
        }
    # Iteration-based OpenMMLab configs (mmseg, mmdet *_90k) log by iteration; MMEngine's
    # defaults (iter_log_by_epoch=True) log val lines with step=runner.epoch, i.e. always 0.
    log_by_epoch = by_epoch or iter_log_by_epoch
    logger = {"type": "LoggerHook", "interval": LOG_INTERVAL, "log_metric_by_epoch": log_by_epoch}
    cfg: dict[str, Any] = {
        "work_dir": str(Path(work_dir).resolve()),
        "model": {"type": "CkptdToyModel"},
        "train_dataloader": {
            "batch_size": BATCH,
            "num_workers": 0,
            "dataset": {"type": "CkptdToyDataset", "size": TRAIN_SIZE},
            "sampler": sampler,
            "collate_fn": {"type": "default_collate"},
        },
        "val_dataloader": {
            "batch_size": BATCH,
            "num_workers": 0,
            "dataset": {"type": "CkptdToyDataset", "size": VAL_SIZE, "seed": 99},
            "sampler": {"type": "DefaultSampler", "shuffle": False},
            "collate_fn": {"type": "default_collate"},
        },
        "val_evaluator": {
            "type": "CkptdTableMetric",
            "kind": metric,
            "values": list(values) if values else None,
            "val_interval": val_interval,
            "by_epoch": by_epoch,
        },
        "val_cfg": {},
        "train_cfg": train_cfg,
        "optim_wrapper": {"type": "OptimWrapper", "optimizer": optim},
        "param_scheduler": [sched],
        "default_hooks": {"checkpoint": ckpt, "logger": logger},
        "log_processor": {"by_epoch": log_by_epoch},
        "env_cfg": {
            "cudnn_benchmark": False,
            "mp_cfg": {"mp_start_method": "fork", "opencv_num_threads": 0},
            "dist_cfg": {"backend": "gloo"},
        },
        "randomness": {"seed": seed, "deterministic": True},
        "launcher": "none",
        "resume": resume,
        # With resume=True, the checkpoint to resume from instead of last_checkpoint's.
        "load_from": load_from,
        "default_scope": "mmengine",
    }
    hooks = []
    if ema:
        hooks.append({"type": "EMAHook", "momentum": 0.1, "priority": 49})
    if epoch_seconds:
        hooks.append({"type": "CkptdSlowdownHook", "seconds": epoch_seconds})
    if hooks:
        cfg["custom_hooks"] = hooks
    return cfg


def train(
    work_dir: str | os.PathLike[str],
    *,
    weights_only_fix: str = "safe_globals",
    events: str | os.PathLike[str] | None = None,
    **cfg_options: Any,
) -> RealRunResult:
    """Train the toy model with ``mmengine.runner.Runner`` into ``work_dir`` (in this process).

    ``cfg_options`` are ``build_cfg``'s. ``epochs``/``max_iters`` are the *total* length; with
    ``resume=True`` the run continues
    from ``<work_dir>/last_checkpoint`` in a new ``<timestamp>/`` folder up to that total.
    ``events``: record the write-side filesystem calls to this file (see record_fs_events).
    """
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    if events is not None:
        record_fs_events(work_dir, events)
    if weights_only_fix == "env":
        # Read by torch.load at call time, so setting it here (before resume) is enough.
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    elif weights_only_fix == "safe_globals":
        allow_mmengine_checkpoints_weights_only()
    elif weights_only_fix != "none":
        raise ValueError(f"weights_only_fix must be safe_globals, env or none: {weights_only_fix}")
    from mmengine.config import Config
    from mmengine.runner import Runner

    _register()
    cfg = build_cfg(work_dir, **cfg_options)
    t0 = time.perf_counter()
    runner = Runner.from_cfg(Config(cfg))
    runner.train()
    wall = time.perf_counter() - t0
    log_dir = Path(runner.log_dir)
    return RealRunResult(
        work_dir=Path(cfg["work_dir"]),
        log_dir=log_dir,
        scalars=log_dir / "vis_data" / "scalars.json",
        wall_seconds=wall,
    )


def _floats(s: str) -> list[float]:
    return [math.nan if v.strip().lower() == "nan" else float(v) for v in s.split(",")]


def _save_best(s: str | None) -> str | list[str] | None:
    if s is None or s.lower() == "none":
        return None
    return s.split(",") if "," in s else s


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("work_dir")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--iter-based", action="store_true", help="IterBasedTrainLoop")
    p.add_argument("--max-iters", type=int, default=48)
    p.add_argument("--val-interval", type=int, default=1)
    p.add_argument("--checkpoint-interval", type=int, default=None)
    p.add_argument("--max-keep-ckpts", type=int, default=-1)
    p.add_argument("--save-best", default=None, help="'auto', a key, or keys joined by ','")
    p.add_argument("--rule", default=None, help="greater|less, or one per key joined by ','")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--resume-from", default=None, help="with --resume: this checkpoint")
    p.add_argument("--no-save-last", action="store_true", help="CheckpointHook save_last=False")
    p.add_argument("--result", default=None, help="write a JSON summary here")
    p.add_argument("--ema", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metric", choices=("coco", "loss"), default="coco")
    p.add_argument("--values", type=_floats, default=None, help="comma-separated table")
    p.add_argument("--optimizer", choices=("SGD", "AdamW"), default="SGD")
    p.add_argument(
        "--weights-only-fix", choices=("safe_globals", "env", "none"), default="safe_globals"
    )
    p.add_argument("--iter-log-by-epoch", action="store_true", help="MMEngine default logging")
    p.add_argument("--events", default=None, help="record write-side fs calls to this file")
    p.add_argument("--epoch-seconds", type=float, default=0.0, help="sleep before each epoch")
    a = p.parse_args(argv)
    rule = a.rule.split(",") if a.rule and "," in a.rule else a.rule
    res = train(
        a.work_dir,
        epochs=a.epochs,
        by_epoch=not a.iter_based,
        max_iters=a.max_iters,
        val_interval=a.val_interval,
        checkpoint_interval=a.checkpoint_interval,
        max_keep_ckpts=a.max_keep_ckpts,
        save_best=_save_best(a.save_best),
        rule=rule,
        save_last=not a.no_save_last,
        resume=a.resume,
        load_from=a.resume_from,
        ema=a.ema,
        seed=a.seed,
        metric=a.metric,
        values=a.values,
        optimizer=a.optimizer,
        iter_log_by_epoch=a.iter_log_by_epoch,
        weights_only_fix=a.weights_only_fix,
        events=a.events,
        epoch_seconds=a.epoch_seconds,
    )
    print(f"log_dir={res.log_dir} wall_seconds={res.wall_seconds:.2f}", file=sys.stderr)
    if a.result:
        summary = {"log_dir": str(res.log_dir), "wall_seconds": res.wall_seconds}
        Path(a.result).write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
