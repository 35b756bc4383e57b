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
"""

from __future__ import annotations

import argparse
import json
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
            epoch = self.current_epoch % len(VAL_ACC)
            self.log("val_acc", VAL_ACC[epoch] + 0.0 * real.item())
            self.log("val_loss", VAL_LOSS[epoch])
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
    managed = ModelCheckpoint(
        dirpath=args.dirpath,
        monitor=args.monitor,
        mode=args.mode,
        save_top_k=-1,
        save_last=save_last,
    )

    # Lightning refuses two ModelCheckpoint instances with the same state_key (monitor, mode,
    # intervals); a subclass only changes the key's class name, not what the callback does.
    class TopOneCheckpoint(ModelCheckpoint):
        pass

    top1 = TopOneCheckpoint(
        dirpath=args.top1_dir, monitor=args.monitor, mode=args.mode, save_top_k=1
    )
    trainer = L.Trainer(
        default_root_dir=args.root,
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(args.root),
        callbacks=[managed, top1],
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    return trainer, Toy(), train, val, managed, top1


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    started = time.monotonic()
    trainer, module, train, val, managed, top1 = build(args)
    trainer.fit(module, train, val, ckpt_path=args.resume)
    result = {
        "best_model_path": managed.best_model_path,
        "best_model_score": float(managed.best_model_score),
        "top1_best_model_path": top1.best_model_path,
        "top1_best_model_score": float(top1.best_model_score),
        "last_model_path": managed.last_model_path,
        "log_dir": trainer.log_dir,
        "global_step": trainer.global_step,
        "seconds": time.monotonic() - started,
    }
    Path(args.result).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
