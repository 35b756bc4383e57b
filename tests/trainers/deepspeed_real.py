"""Real DeepSpeed engines on CPU (``DS_ACCELERATOR=cpu``, gloo) saving ZeRO checkpoints.

Run under ``torchrun --nproc-per-node 2`` (the tests do)::

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 tests/trainers/deepspeed_real.py OUT \
        --stages 1,2,3 [--hidden 16] [--steps 2] [--save-dir-per-stage]

For each ZeRO stage, ``deepspeed.initialize`` a tiny model that has what
``zero_to_fp32`` treats apart: buffers (a float one, 16-bit under bf16, and an int64 one), a
frozen Linear and a weight tied to another (``shared_params``); train a few steps in bf16 and
``engine.save_checkpoint(OUT/zero<stage>)``, DeepSpeed's own code writing ``global_stepN/``,
``latest`` and ``zero_to_fp32.py``. Every file under OUT is DeepSpeed's.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import deepspeed
import torch


class Tiny(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(hidden, hidden)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, hidden))  # bf16 once wrapped
        self.register_buffer("seen", torch.tensor(3))  # int64: kept as is
        self.frozen = torch.nn.Linear(hidden, hidden)
        self.frozen.requires_grad_(False)
        self.middle = torch.nn.Linear(hidden, 7)
        self.head = torch.nn.Linear(hidden, hidden, bias=False)
        self.head.weight = self.embed.weight  # tied: saved as a shared parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(self.frozen(self.embed(x) * self.scale.to(x.dtype)))
        return self.middle(h)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--saves", type=int, default=1, help="checkpoints per stage")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for stage in (int(s) for s in args.stages.split(",")):
        torch.manual_seed(stage)
        model = Tiny(args.hidden)
        config = {
            "train_batch_size": 4 * world,
            "train_micro_batch_size_per_gpu": 4,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": True},
        }
        params = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
        for _ in range(args.saves):
            for _ in range(args.steps):
                x = torch.randn(4, args.hidden, dtype=torch.bfloat16)
                loss = engine(x).float().pow(2).mean()
                engine.backward(loss)
                engine.step()
            engine.save_checkpoint(str(args.out / f"zero{stage}"), client_state={"epoch": 1})
        engine.destroy()


if __name__ == "__main__":
    main()
