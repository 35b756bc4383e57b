"""A simulated MMEngine 0.10.7 trainer: writes a work_dir in MMEngine's layout and order.

Used by ``ckptd demo``, the integration/crash tests and the benchmarks, where a real MMEngine
run is too slow or too rigid. What it reproduces (checked against a real run by
``tests/integration/test_simulate.py`` and the recorded run in ``tests/data/reference/mmengine``;
see docs/DESIGN.md):

* per launch: ``<ts>/<ts>.log``, ``<ts>/vis_data/{config.py,<ts>.json,scalars.json}`` and a
  ``<ts>.py`` config dump in the work_dir root; JSON lines appended with ``open('a+')``, to
  ``<ts>.json`` first, then ``scalars.json``;
* per checkpoint: (trainer-side ``max_keep_ckpts`` delete) -> ``epoch_N.pth`` written at its
  final name with ``'wb'``, not atomically -> ``last_checkpoint`` (absolute path, no newline)
  -> val line -> on a new best: delete the old best, write ``best_<key>_epoch_N.pth`` (no
  optimizer/schedulers), rewrite ``epoch_N.pth`` in place, rewrite ``last_checkpoint``;
* the last epoch (iteration) is always saved and evaluated, whatever the intervals;
* checkpoints that ``torch.load(weights_only=True)`` refuses, because ``message_hub`` holds
  numpy arrays and ``HistoryBuffer`` objects (a look-alike class defined here).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TextIO

import numpy as np
import torch
from torch import nn

COCO_KEYS = ("coco/bbox_mAP", "coco/bbox_mAP_50", "coco/bbox_mAP_75")
COCO_KEYS += ("coco/bbox_mAP_s", "coco/bbox_mAP_m", "coco/bbox_mAP_l")
# Same table as tests/trainers/mmengine_real.py, so both trainers emit the same stream.
DEFAULT_VALUES = (0.3, 0.45, 0.4, 0.5, 0.48, 0.47, 0.52, 0.49, 0.51, 0.5)
# CheckpointHook's rule-inference tables (MMEngine 0.10.7).
GREATER_KEYS = ("acc", "top", "AR@", "auc", "precision", "mAP", "mDice", "mIoU", "mAcc", "aAcc")
LESS_KEYS = ("loss",)
# LogProcessor(window_size=10, mean_pattern=...): matching keys are logged as the mean of
# their last 10 values, also val metrics (over the last 10 evaluations), whereas
# CheckpointHook compares the raw value. So scalars.json is smoothed for e.g. 'val/loss'.
MEAN_PATTERN, WINDOW = re.compile(r".*(loss|time|data_time|grad_norm).*"), 10
CLASSES = ("cat", "dog", "bird")
IN_DIM, BATCH, LR = 16, 4, 0.01


class HistoryBuffer:
    """Pickles like ``mmengine.logging.history_buffer.HistoryBuffer``.

    Its ``__getstate__`` adds the class's statistics methods, which pickle protocol 2 stores
    as ``getattr(HistoryBuffer, 'min')`` REDUCEs: this is what makes real checkpoints fail
    under ``weights_only=True``, and what a restricted unpickler must stub out.
    """

    _statistics_methods: ClassVar[dict[str, Callable[..., Any]]] = {}

    def __init__(self, max_length: int = 1_000_000) -> None:
        self.max_length = max_length
        for name in ("min", "max", "current", "mean"):
            self._statistics_methods.setdefault(name, getattr(HistoryBuffer, name))
        self._log_history = np.array([], dtype=np.float64)
        self._count_history = np.array([], dtype=np.int64)

    def update(self, value: float, count: int = 1) -> None:
        self._log_history = np.append(self._log_history, value)[-self.max_length :]
        self._count_history = np.append(self._count_history, count)[-self.max_length :]

    def min(self) -> float:
        return float(self._log_history.min())

    def max(self) -> float:
        return float(self._log_history.max())

    def current(self) -> float:
        return float(self._log_history[-1])

    def mean(self, window_size: int) -> float:
        logs, counts = self._log_history[-window_size:], self._count_history[-window_size:]
        return float(logs.sum() / counts.sum())

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "statistics_methods": self._statistics_methods}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self._statistics_methods.update(state.pop("statistics_methods", {}))
        self.__dict__.update(state)


def infer_rule(key: str) -> str:
    """CheckpointHook's order: exact greater, exact less, substring greater, substring less."""
    k = key.lower()
    greater, less = {g.lower() for g in GREATER_KEYS}, {s.lower() for s in LESS_KEYS}
    for rule, hit in (("greater", k in greater), ("less", k in less)):
        if hit:
            return rule
    for rule, keys in (("greater", greater), ("less", less)):
        if any(x in k for x in keys):
            return rule
    raise ValueError(
        f"Cannot infer the rule for key {key}, thus a specific rule must be specified."
    )


@dataclass
class SimConfig:
    epochs: int = 8  # total epochs to reach (also when resuming)
    iter_based: bool = False  # IterBasedTrainLoop: iter_N.pth, val every val_interval iters
    max_iters: int = 48  # total iterations when iter_based
    iters_per_epoch: int = 8
    val_interval: int = 1  # epochs, or iterations when iter_based
    checkpoint_interval: int | None = None  # default: 1 epoch / val_interval iterations
    log_interval: int = 4
    metric_keys: Sequence[str] = COCO_KEYS  # val-line order; save_best='auto' takes the first
    # First key's value per epoch (iter_based: per validation), wrapping around; NaN allowed.
    # A mapping gives tables per key; keys without one are derived from the first key's.
    metric_values: Sequence[float] | Mapping[str, Sequence[float]] | None = None
    param_count: int = 50_000  # ~200 KB of float32 weights; e.g. 2_000_000 for the demo
    optimizer: str = "sgd"  # "sgd" (momentum_buffer) or "adamw" (exp_avg, exp_avg_sq)
    delay: float = 0.0  # seconds of "training" per epoch (iter_based: per val round)
    eval_delay: float = 0.0  # seconds between a checkpoint and its val line
    slow_write_seconds: float = 0.0  # write each checkpoint in 20 chunks over this long
    rewrite_after_best: bool = False  # in-place rewrite on a new best even without save_best
    save_best: str | Sequence[str] | None = None  # trainer-side: 'auto', a key, or keys
    rule: str | Sequence[str] | None = None  # 'greater'/'less' (one, or one per key)
    max_keep_ckpts: int = -1  # trainer-side deletion, where CheckpointHook does it
    resume: bool = False  # continue from <work_dir>/last_checkpoint in a new launch folder
    seed: int = 0
    iter_log_by_epoch: bool = False  # iter_based with MMEngine's default logger: val step 0
    timestamp: str | None = None  # launch folder name; default now, '%Y%m%d_%H%M%S'


@dataclass(frozen=True)
class Event:
    """One filesystem action of the trainer (or a round boundary), right after it happened."""

    kind: str  # launch|train_log|delete|checkpoint|last_checkpoint|val_log|best|rewrite|round_end
    path: Path | None = None
    epoch: int = 0
    iter: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


class _Model(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            *(nn.Linear(IN_DIM, width), nn.BatchNorm1d(width), nn.ReLU()),
            *(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()),
        )
        self.head = nn.Linear(width, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _width(params: int) -> int:
    b = IN_DIM + len(CLASSES) + 7  # parameters ~= 2 w^2 + b w
    return max(4, int((-b + math.sqrt(b * b + 8 * params)) / 4))


def _pretty(cfg: Mapping[str, Any]) -> str:
    """Python-config text in the spirit of ``Config.pretty_text`` (sorted keys, dict())."""

    def fmt(v: Any) -> str:
        if isinstance(v, Mapping):
            return "dict(" + ", ".join(f"{k}={fmt(v[k])}" for k in sorted(v)) + ")"
        return "[" + ", ".join(map(fmt, v)) + "]" if isinstance(v, list) else repr(v)

    return "".join(f"{k} = {fmt(cfg[k])}\n" for k in sorted(cfg))


class SimulatedTrainer:
    """Drive with ``run()``, ``run_epoch()`` (one epoch; iter_based: up to and including the
    next validation) or ``events()`` (one filesystem action at a time; resumable)."""

    def __init__(self, work_dir: str | os.PathLike[str], config: SimConfig | None = None) -> None:
        self.cfg = c = config or SimConfig()
        self.work_dir = Path(work_dir).resolve()
        self.keys = list(c.metric_keys)
        if isinstance(c.save_best, str):
            self.best_keys = [self.keys[0] if c.save_best == "auto" else c.save_best]
        else:
            self.best_keys = list(c.save_best or ([self.keys[0]] if c.rewrite_after_best else []))
        rules = [c.rule] if c.rule is None or isinstance(c.rule, str) else list(c.rule)
        rules = rules * len(self.best_keys) if len(rules) == 1 else rules  # MMEngine broadcasts
        self.rules = [r or infer_rule(k) for r, k in zip(rules, self.best_keys, strict=True)]
        self._max_iters = c.max_iters if c.iter_based else c.epochs * c.iters_per_epoch
        self.ckpt_interval = c.checkpoint_interval or (c.val_interval if c.iter_based else 1)
        self.epoch = self.iter = 0  # completed epochs / iterations
        self.timestamp = c.timestamp or time.strftime("%Y%m%d_%H%M%S", time.localtime())
        self.log_dir = self.work_dir / self.timestamp
        self.scalars = self.log_dir / "vis_data" / "scalars.json"
        with torch.random.fork_rng():  # seeded init without touching the caller's RNG
            torch.manual_seed(c.seed)
            self.model = _Model(_width(c.param_count))
        if c.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', not {c.optimizer!r}")
        if c.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4
            )
        else:
            opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.05)
        for g in opt.param_groups:
            g["initial_lr"] = LR  # as MMEngine's param schedulers leave it
        self.optim = opt
        self.hub: dict[str, Any] = {"log_scalars": {}, "runtime_info": {}}
        self._shadow: dict[str, Any] = {}  # best scores when only rewrite_after_best is set
        self.keep_ids: deque[int] = deque()
        self.last_ckpt: str | None = None  # per launch, like CheckpointHook.last_ckpt
        self.cfg_text = _pretty(self._mm_cfg())
        self._log: TextIO | None = None
        self._gen = self._main()

    @property
    def done(self) -> bool:
        c = self.cfg
        return self.iter >= c.max_iters if c.iter_based else self.epoch >= c.epochs

    def events(self) -> Iterator[Event]:
        # Not `yield from`: closing this iterator (a `break`) must not close the shared one.
        while (ev := next(self._gen, None)) is not None:
            yield ev

    def run_epoch(self) -> list[Event]:
        out: list[Event] = []
        for ev in self.events():
            out.append(ev)
            if ev.kind == "round_end":
                break
        return out

    def run(self) -> None:
        for _ in self.events():
            pass

    def _mm_cfg(self) -> dict[str, Any]:
        c = self.cfg
        hook = {"type": "CheckpointHook", "interval": self.ckpt_interval}
        hook |= {"by_epoch": not c.iter_based, "max_keep_ckpts": c.max_keep_ckpts}
        if c.save_best is not None:
            hook |= {"save_best": c.save_best, "rule": c.rule}
        loop: dict[str, Any] = {"by_epoch": True, "max_epochs": c.epochs}
        if c.iter_based:
            loop = {"type": "IterBasedTrainLoop", "max_iters": c.max_iters}
        optim = {"type": type(self.optim).__name__, "lr": LR}
        return {
            "default_hooks": {"checkpoint": hook},
            "model": {"type": "SimulatedModel", "param_count": c.param_count},
            "optim_wrapper": {"optimizer": optim},
            "randomness": {"seed": c.seed, "deterministic": True},
            "resume": c.resume,
            "train_cfg": {**loop, "val_interval": c.val_interval},
            "work_dir": str(self.work_dir),
        }

    def _logline(self, msg: str) -> None:
        if self._log is not None:
            self._log.write(f"{time.strftime('%Y/%m/%d %H:%M:%S')} - mmengine - INFO - {msg}\n")
            self._log.flush()

    def _launch(self) -> Iterator[Event]:
        # Runner.__init__ order: log dir + text log, vis_data/config.py, then <ts>.py.
        self.log_dir.mkdir(parents=True, exist_ok=True)  # same second: MMEngine appends too
        self._log = open(self.log_dir / f"{self.timestamp}.log", "a")  # noqa: SIM115
        (self.log_dir / "vis_data").mkdir(exist_ok=True)
        (self.log_dir / "vis_data" / "config.py").write_text(self.cfg_text)
        (self.work_dir / f"{self.timestamp}.py").write_text(self.cfg_text)
        info = self.hub["runtime_info"]
        info |= {"cfg": self.cfg_text, "seed": self.cfg.seed, "experiment_name": self.timestamp}
        info["mmengine_version"] = "0.10.7"
        if self.cfg.resume:
            self._resume()
        yield Event("launch", self.log_dir, self.epoch, self.iter)
        if self.cfg.max_keep_ckpts > 0:  # CheckpointHook.before_train trims a resumed list
            ids = list(self.hub["runtime_info"].get("keep_ckpt_ids", []))
            while len(ids) > self.cfg.max_keep_ckpts:
                yield from self._delete(self.work_dir / self._name(ids.pop(0)))
            self.keep_ids = deque(ids)

    def _resume(self) -> None:
        pointer = self.work_dir / "last_checkpoint"
        if not pointer.is_file():
            self._logline("Did not find last_checkpoint to be resumed.")
            return
        path = pointer.read_text()
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own file
        self.model.load_state_dict(ckpt["state_dict"])
        self.optim.load_state_dict(ckpt["optimizer"])
        self.epoch, self.iter = ckpt["meta"]["epoch"], ckpt["meta"]["iter"]
        self.hub["log_scalars"] = ckpt["message_hub"]["log_scalars"]
        self.hub["runtime_info"] = ckpt["message_hub"]["runtime_info"] | self.hub["runtime_info"]
        self._logline(f"Load checkpoint from {path}")
        self._logline(f"resumed epoch: {self.epoch}, iter: {self.iter}")

    def _scalar(self, name: str, value: float) -> None:
        self.hub["log_scalars"].setdefault(name, HistoryBuffer()).update(value)

    def _append_line(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record) + "\n"  # json's defaults, like MMEngine: NaN stays NaN
        for p in (self.log_dir / "vis_data" / f"{self.timestamp}.json", self.scalars):
            with open(p, "a+") as f:
                f.write(line)

    def _lr(self) -> float:  # MultiStepLR(milestones=[4]) by epoch, [max_iters // 2] by iter
        c = self.cfg
        late = self.iter >= c.max_iters // 2 if c.iter_based else self.epoch >= 4
        return LR * 0.1 if late else LR

    def _train_iter(self, inner: int, per_round: int, window: list[float]) -> Iterator[Event]:
        c = self.cfg
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + self.iter)  # resume-stable data
        x = torch.randn(BATCH, IN_DIM, generator=g)
        y = torch.randint(0, len(CLASSES), (BATCH,), generator=g)
        for group in self.optim.param_groups:
            group["lr"] = self._lr()
        self.model.train()
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.optim.zero_grad()
        loss.backward()
        self.optim.step()
        if c.delay > 0:
            time.sleep(c.delay / per_round)
        self.iter += 1
        dt = time.perf_counter() - t0
        window.append(loss.item())
        scalars = {"lr": self._lr(), "data_time": dt / 10, "loss": window[-1]}
        scalars |= {"loss_cls": window[-1], "time": dt}
        for k, v in scalars.items():
            self._scalar(f"train/{k}", v)
        self.hub["runtime_info"] |= {"iter": self.iter - 1, "eta": np.float64(0.0)}
        # LoggerHook: by inner iteration (and epoch end) by epoch, by global iteration by iter.
        due = inner % c.log_interval == 0 or inner == per_round
        if c.iter_based:
            due = self.iter % c.log_interval == 0
        if not due:
            return
        rec: dict[str, Any] = {**scalars, "loss": sum(window) / len(window)}
        rec["loss_cls"] = rec["loss"]
        if not c.iter_based or c.iter_log_by_epoch:
            rec["epoch"] = self.epoch + 1  # iter_based: runner.epoch stays 0
        rec |= {"iter": self.iter, "step": self.iter}
        window.clear()
        self._append_line(rec)
        self._logline(f"train {rec}")
        yield Event("train_log", self.scalars, self.epoch + (not c.iter_based), self.iter)

    def _name(self, step: int) -> str:
        return f"{'iter' if self.cfg.iter_based else 'epoch'}_{step}.pth"

    def _checkpoint(self, best: bool = False) -> dict[str, Any]:
        c, info = self.cfg, self.hub["runtime_info"]
        meta = {"epoch": self.epoch, "iter": self.iter, "cfg": self.cfg_text, "seed": c.seed}
        meta["experiment_name"] = self.timestamp
        meta["time"] = time.strftime("%Y%m%d_%H%M%S", time.localtime())
        meta["mmengine_version"] = "0.10.7"
        meta["dataset_meta"] = info["dataset_meta"] = {"classes": CLASSES, "palette": [(0, 0, 0)]}
        hub = {"log_scalars": dict(self.hub["log_scalars"]), "runtime_info": dict(info)}
        hub["resumed_keys"] = {k: True for k in [*info, *self.hub["log_scalars"]]}
        ckpt = {"meta": meta, "state_dict": self.model.state_dict(), "message_hub": hub}
        if best:  # CheckpointHook saves best files with save_optimizer/param_scheduler=False
            return ckpt
        n, end = (self.iter, c.max_iters) if c.iter_based else (self.epoch, c.epochs)
        sched = {"milestones": Counter({c.max_iters // 2 if c.iter_based else 4: 1})}
        sched |= {"gamma": 0.1, "param_name": "lr", "begin": 0, "end": end, "verbose": False}
        sched |= {"by_epoch": not c.iter_based, "base_values": [LR], "last_step": n - 1}
        sched |= {"_global_step": n, "_last_value": [self._lr()]}
        return ckpt | {"optimizer": self.optim.state_dict(), "param_schedulers": [sched]}

    def _write(self, path: Path, ckpt: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save(ckpt, buf)  # as MMEngine: serialise, then one open('wb') at the final name
        data, chunks = buf.getbuffer(), 20
        with open(path, "wb") as f:
            if self.cfg.slow_write_seconds <= 0:
                f.write(data)
                return
            size = math.ceil(len(data) / chunks)
            for i in range(chunks):
                f.write(data[i * size : (i + 1) * size])
                f.flush()  # visible to readers; never fsync'd, like MMEngine
                time.sleep(self.cfg.slow_write_seconds / chunks)

    def _delete(self, path: Path) -> Iterator[Event]:
        if path.is_file():
            path.unlink()
            yield Event("delete", path, self.epoch, self.iter)

    def _save(self, step: int, kind: str = "checkpoint") -> Iterator[Event]:
        """CheckpointHook._save_checkpoint_with_step: delete -> write -> last_checkpoint."""
        c, info = self.cfg, self.hub["runtime_info"]
        if c.max_keep_ckpts > 0 and not (self.keep_ids and self.keep_ids[-1] == step):
            if len(self.keep_ids) == c.max_keep_ckpts:
                yield from self._delete(self.work_dir / self._name(self.keep_ids.popleft()))
            self.keep_ids.append(step)
            info["keep_ckpt_ids"] = list(self.keep_ids)
        path = self.work_dir / self._name(step)
        self.last_ckpt = info["last_ckpt"] = str(path)
        self._write(path, self._checkpoint())
        yield Event(kind, path, self.epoch, self.iter)
        (self.work_dir / "last_checkpoint").write_text(str(path))
        yield Event("last_checkpoint", self.work_dir / "last_checkpoint", self.epoch, self.iter)

    def _metrics(self) -> dict[str, float]:
        c, mv = self.cfg, self.cfg.metric_values
        idx = self.iter // c.val_interval - 1 if c.iter_based else self.epoch - 1
        tables = dict(mv) if isinstance(mv, Mapping) else {self.keys[0]: mv or DEFAULT_VALUES}
        tables.setdefault(self.keys[0], DEFAULT_VALUES)
        pick = {k: float(t[idx % len(t)]) for k, t in tables.items()}
        v = pick[self.keys[0]]
        derived = {"coco/bbox_mAP_50": round(v + 0.2, 3), "coco/bbox_mAP_75": round(v - 0.05, 3)}
        derived |= {"coco/bbox_mAP_s": 0.1, "coco/bbox_mAP_m": 0.2, "coco/bbox_mAP_l": 0.375}
        other = {k: derived.get(k, round(v + i / 100, 4)) for i, k in enumerate(self.keys)}
        return {k: pick.get(k, other[k]) for k in self.keys}

    def _validate(self) -> Iterator[Event]:
        c, info = self.cfg, self.hub["runtime_info"]
        t0 = time.perf_counter()
        time.sleep(c.eval_delay)
        metrics, dt = self._metrics(), time.perf_counter() - t0
        for k, v in {"data_time": dt / 10, "time": dt, **metrics}.items():
            self._scalar(f"val/{k}", v)
        # LoggerHook(log_metric_by_epoch=True) logs runner.epoch, which is 0 when iter_based.
        step = (0 if c.iter_log_by_epoch else self.iter) if c.iter_based else self.epoch
        buffers = self.hub["log_scalars"]
        logged = {
            k: buffers[f"val/{k}"].mean(WINDOW) if MEAN_PATTERN.search(k) else v
            for k, v in metrics.items()
        }
        self._append_line({**logged, "data_time": dt / 10, "time": dt, "step": step})
        self._logline(f"val {metrics}")
        yield Event("val_log", self.scalars, self.epoch, self.iter, metrics)
        n = self.iter if c.iter_based else self.epoch
        scores = info if c.save_best is not None else self._shadow
        info["loop_stage"], updated = "val", False
        for key, rule in zip(self.best_keys, self.rules, strict=True):
            sfx = "" if len(self.best_keys) == 1 else f"_{key}"
            score_k, ckpt_k = f"best_score{sfx}", f"best_ckpt{sfx}"
            best = scores.get(score_k, -math.inf if rule == "greater" else math.inf)
            score = metrics[key]
            if not (score > best if rule == "greater" else score < best):  # NaN never wins
                continue
            updated, scores[score_k] = True, score
            if c.save_best is None:
                continue  # rewrite_after_best alone: no best file
            if info.get(ckpt_k):
                yield from self._delete(Path(info[ckpt_k]))  # absolute path from the hub
            path = self.work_dir / f"best_{key}_{self._name(n)}".replace("/", "_")
            info[ckpt_k] = str(path)
            self._write(path, self._checkpoint(best=True))
            yield Event("best", path, self.epoch, self.iter, metrics)
        info["loop_stage"] = "train"
        if updated and self.last_ckpt is not None:  # CheckpointHook "saves checkpoint again"
            yield from self._save(n, kind="rewrite")

    def _main(self) -> Iterator[Event]:
        c = self.cfg
        yield from self._launch()
        while not self.done:
            per_round = c.iters_per_epoch
            if c.iter_based:
                per_round = min(c.val_interval, c.max_iters - self.iter)
            window: list[float] = []
            self.hub["runtime_info"] |= dict(loop_stage="train", epoch=self.epoch, iter=self.iter)
            self.hub["runtime_info"] |= dict(max_epochs=c.epochs, max_iters=self._max_iters)
            for inner in range(1, per_round + 1):
                yield from self._train_iter(inner, per_round, window)
                if c.iter_based and (self.iter % self.ckpt_interval == 0 or self.done):
                    yield from self._save(self.iter)
            if not c.iter_based:
                # MMEngine saves in after_train_epoch, before runner.epoch is incremented, but
                # names the file and sets meta['epoch'] with epoch + 1: one counter does both.
                self.epoch += 1
                if self.epoch % self.ckpt_interval == 0 or self.done:
                    yield from self._save(self.epoch)
            if (self.iter if c.iter_based else self.epoch) % c.val_interval == 0 or self.done:
                yield from self._validate()
            yield Event("round_end", None, self.epoch, self.iter)
        if self._log is not None:
            self._log.close()


def _values(specs: Sequence[str]) -> list[float] | dict[str, list[float]]:
    """``0.3,0.5,nan`` (first key) or ``KEY=0.3,0.5`` (one flag per key)."""
    parsed: dict[str, list[float]] = {}
    for spec in specs:
        key, _, values = spec.rpartition("=")
        parsed[key] = [float(v) for v in values.split(",")]
    return parsed[""] if list(parsed) == [""] else parsed


def _comma(s: str) -> str | list[str]:
    return s.split(",") if "," in s else s


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: one ``--flag-name`` per SimConfig field, e.g. ``--epochs 8 --delay 0.5``."""
    p = argparse.ArgumentParser(
        prog="python -m ckptd.demo.simulate",
        description=__doc__.split("\n")[0]
        + " Flags are the fields of ckptd.demo.simulate.SimConfig.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("work_dir")
    special: dict[str, Callable[[str], Any]] = dict(
        metric_keys=lambda s: tuple(s.split(",")), save_best=_comma, rule=_comma,
        checkpoint_interval=int, timestamp=str,
    )  # fmt: skip
    for f in dataclasses.fields(SimConfig):
        flag, default, help_ = "--" + f.name.replace("_", "-"), f.default, f"SimConfig.{f.name}"
        if f.name == "metric_values":
            p.add_argument(flag, action="append", help="'v1,v2,..' (nan ok) or 'KEY=v1,..'")
        elif isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=help_)
        else:
            kind = special.get(f.name, type(default))
            choices = ("sgd", "adamw") if f.name == "optimizer" else None
            p.add_argument(flag, type=kind, default=default, choices=choices, help=help_)
    ns = vars(p.parse_args(argv))
    work_dir = ns.pop("work_dir")
    ns["metric_values"] = _values(ns["metric_values"]) if ns["metric_values"] else None
    SimulatedTrainer(work_dir, SimConfig(**ns)).run()
    return 0


if __name__ == "__main__":
    # Run the imported module, not __main__: pickles must name ckptd.demo.simulate.HistoryBuffer.
    from ckptd.demo.simulate import main as _main

    raise SystemExit(_main())
