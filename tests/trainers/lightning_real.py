"""A real, tiny PyTorch Lightning run on CPU, for conformance tests.

Everything that touches the work_dir is Lightning's own code (``Trainer``, ``ModelCheckpoint``,
``CSVLogger``); only the model, the data and the metric values are ours. The model really
trains, but the logged validation metrics are read from lookup tables indexed by the epoch, so
that they rise and fall deterministically (and ties are impossible) whatever the weights do.

Two ``ModelCheckpoint`` callbacks watch the same metric: the one ckptd manages writes every
epoch into the default ``lightning_logs/version_N/checkpoints`` (``save_top_k=-1``, optionally
``save_last``), and a second one with ``save_top_k=1`` writes into a folder *outside* the
work_dir, so the test can compare ckptd's choice with the trainer's own ``best_model_path``.
From the third epoch on, one more validation column appears, so CSVLogger rewrites
``metrics.csv`` from scratch mid-run.

Run it as a separate process (the tests do)::

    python tests/trainers/lightning_real.py ROOT --epochs 6 --monitor val_acc --mode max \
        --top1-dir TOP1 --result result.json [--save-last link] [--resume CKPT] [--dirpath D]

The differential test also sets the callback's ``every_n_epochs``/``every_n_train_steps``,
``save_top_k``, ``filename`` and ``auto_insert_metric_name``, the trainer's
``check_val_every_n_epoch``, and the monitored values per epoch (``--values``, JSON; null is
NaN), so that ties, plateaus and NaN happen where it wants them. ``--batch FILE`` runs
several fits (a JSON list of argument lists) in one process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# Strict maximum of val_acc at epoch index 3, strict minimum of val_loss at index 4; no ties.
VAL_ACC = (0.50, 0.61, 0.58, 0.72, 0.66, 0.70, 0.64, 0.69, 0.60, 0.71)
VAL_LOSS = (0.90, 0.71, 0.75, 0.62, 0.55, 0.63, 0.58, 0.60, 0.66, 0.57)
TRAIN_SIZE = 40
BATCH = 4  # 10 optimizer steps per epoch


def build(args: argparse.Namespace):  # -> (trainer, module, data, callbacks)
    values: list[float | None] | None = args.values
    import lightning as L
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    L.seed_everything(7, verbose=False)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(TRAIN_SIZE, 8, generator=g)
    y = (x[:, 0] > 0).long()

    class Toy(L.LightningModule):
        def __init__(self, hidden: int = 16, lr: float = 0.05) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 2))

        def training_step(self, batch, _):
            inputs, labels = batch
            loss = F.cross_entropy(self.net(inputs), labels)
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            return loss

        def validation_step(self, batch, _):
            inputs, labels = batch
            real = F.cross_entropy(self.net(inputs), labels)  # the real forward pass runs
            epoch = self.current_epoch
            acc, loss = VAL_ACC[epoch % len(VAL_ACC)], VAL_LOSS[epoch % len(VAL_LOSS)]
            if values:  # the monitored metric follows the given sequence
                chosen = values[epoch % len(values)]
                chosen = math.nan if chosen is None else chosen
                acc, loss = (chosen, loss) if args.monitor == "val_acc" else (acc, chosen)
            self.log("val_acc", acc + 0.0 * real.item())
            self.log("val_loss", loss)
            if self.current_epoch >= 2:  # a column that appears later: metrics.csv is rewritten
                self.log("val_extra", float(self.current_epoch))

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
            return {"optimizer": optimizer, "lr_scheduler": scheduler}

    data = TensorDataset(x, y)
    train = DataLoader(data, batch_size=BATCH, shuffle=False)
    val = DataLoader(data, batch_size=TRAIN_SIZE)
    save_last: bool | str | None = {"none": None, "true": True, "link": "link"}[args.save_last]
    # Both callbacks rank the same evaluations: same monitor, mode and saving interval.
    interval = {"every_n_epochs": args.every_n_epochs, "every_n_train_steps": args.every_n_steps}
    managed = ModelCheckpoint(
        dirpath=args.dirpath,
        filename=args.filename,
        auto_insert_metric_name=not args.no_metric_name,
        monitor=args.monitor,
        mode=args.mode,
        save_top_k=args.save_top_k,
        save_last=save_last,
        **interval,
    )

    # Lightning refuses two ModelCheckpoint instances with the same state_key (monitor, mode,
    # intervals); a subclass only changes the key's class name, not what the callback does.
    class TopOneCheckpoint(ModelCheckpoint):
        pass

    top1 = TopOneCheckpoint(
        dirpath=args.top1_dir, monitor=args.monitor, mode=args.mode, save_top_k=1, **interval
    )
    trainer = L.Trainer(
        default_root_dir=args.root,
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(args.root),
        # The twin runs first: the state it stores in the managed files then includes the
        # evaluation those files were saved after, so a resumed fit restores it complete.
        callbacks=[top1, managed],
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=args.check_val_every,
        deterministic=True,
    )
    return trainer, Toy(), train, val, managed, top1


def _score(score: object) -> float | None:
    return None if score is None else float(score)  # type: ignore[arg-type]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="default_root_dir: the work_dir ckptd manages")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--monitor", default="val_acc")
    parser.add_argument("--mode", choices=("min", "max"), default="max")
    parser.add_argument("--save-last", choices=("none", "true", "link"), default="none")
    parser.add_argument("--dirpath", default=None, help="custom ModelCheckpoint dirpath")
    parser.add_argument("--top1-dir", required=True, help="save_top_k=1 twin, outside root")
    parser.add_argument("--resume", default=None, help="ckpt_path for trainer.fit")
    parser.add_argument("--result", required=True, help="JSON summary written here")
    parser.add_argument("--save-top-k", type=int, default=-1)
    parser.add_argument("--every-n-epochs", type=int, default=None)
    parser.add_argument("--every-n-steps", type=int, default=None, help="every_n_train_steps")
    parser.add_argument("--check-val-every", type=int, default=1, help="check_val_every_n_epoch")
    parser.add_argument("--filename", default=None, help="ModelCheckpoint(filename=...)")
    parser.add_argument("--no-metric-name", action="store_true", help="auto_insert_metric_name off")
    parser.add_argument("--values", type=json.loads, default=None, help="monitored value per epoch")
    return parser.parse_args(argv)


def fit(args: argparse.Namespace) -> None:
    started = time.monotonic()
    trainer, module, train, val, managed, top1 = build(args)
    trainer.fit(module, train, val, ckpt_path=args.resume)
    result = {
        "best_model_path": managed.best_model_path,
        "best_model_score": _score(managed.best_model_score),
        "top1_best_model_path": top1.best_model_path,
        "top1_best_model_score": _score(top1.best_model_score),
        "last_model_path": managed.last_model_path,
        "log_dir": trainer.log_dir,
        "global_step": trainer.global_step,
        "seconds": time.monotonic() - started,
    }
    Path(args.result).write_text(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> int:
    """One fit, or with ``--batch FILE`` (a JSON list of argument lists) several in a row in
    this process, which saves importing torch and Lightning once per fit."""
    argv = sys.argv[1:] if argv is None else argv
    import torch

    torch.set_num_threads(1)
    if argv[:1] == ["--batch"]:
        for run in json.loads(Path(argv[1]).read_text()):
            fit(parse(run))
    else:
        fit(parse(argv))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
