"""Real DeepSpeed engines on CPU (``DS_ACCELERATOR=cpu``, gloo) saving ZeRO checkpoints.

Run under ``torchrun --nproc-per-node 2`` (the tests do)::

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 tests/trainers/deepspeed_real.py OUT \
        --stages 1,2,3 [--hidden 16] [--steps 2] [--saves 3] [--layouts plain,mmengine,lightning,hf]

For each ZeRO stage, ``deepspeed.initialize`` a tiny model that has what
``zero_to_fp32`` treats apart: buffers (a float one, 16-bit under bf16, and an int64 one), a
frozen Linear and a weight tied to another (``shared_params``); train a few steps in bf16 and
``engine.save_checkpoint(OUT/zero<stage>)``, DeepSpeed's own code writing ``global_stepN/``,
``latest`` and ``zero_to_fp32.py``.

``--layouts`` other than plain (ZeRO 3 only) call ``save_checkpoint`` with the arguments a
trainer's DeepSpeed integration passes (read from MMEngine 0.10.7's ``DeepSpeedStrategy``,
Lightning 2.6's ``DeepSpeedStrategy``
and transformers' Trainer), into OUT/<layout>: those trainers need a GPU for DeepSpeed, so the
shards are DeepSpeed's own and only the trainer's small files beside them (MMEngine's
``last_checkpoint`` and ``scalars.json``, HF's ``trainer_state.json``) are written here, in their
documented format.
"""

from __future__ import annotations

import argparse
import json
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


class LightningWrapper(torch.nn.Module):
    """Names parameters as Lightning's DeepSpeedStrategy does (``_forward_module.*``)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self._forward_module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_module(x)


# Validation accuracy per save: the best is the first, so keep_last 2 leaves it to the artifact.
ACCURACY = (0.91, 0.62, 0.70, 0.66)


def save(engine: deepspeed.DeepSpeedEngine, out: Path, layout: str, k: int, step: int) -> None:
    """Save number k (1-based) the way ``layout``'s trainer calls DeepSpeed (see the docstring)."""
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if layout == "plain":
        engine.save_checkpoint(str(out), client_state={"epoch": k})
    elif layout == "mmengine":  # mmengine/_strategy/deepspeed.py DeepSpeedStrategy.save_checkpoint
        meta = {"epoch": k, "iter": step, "seed": 0, "mmengine": "0.10.7"}
        engine.save_checkpoint(
            str(out), tag=f"epoch_{k}.pth", client_state={"meta": meta}, save_latest=False
        )
        if rank0:  # CheckpointHook, after save_checkpoint returned on every rank
            (out / "last_checkpoint").write_text(str(out / f"epoch_{k}.pth"))
            vis = out / "20260101_000000" / "vis_data"
            vis.mkdir(parents=True, exist_ok=True)
            with (vis / "scalars.json").open("a") as f:
                f.write(f'{{"accuracy": {ACCURACY[k - 1]}, "data_time": 0.1, "step": {k}}}\n')
    elif layout == "lightning":  # lightning/pytorch/strategies/deepspeed.py save_checkpoint
        folder = out / "checkpoints" / f"epoch={k - 1}-step={step}.ckpt"
        state = {"epoch": k - 1, "global_step": step, "pytorch-lightning_version": "2.6.6",
                 "hyper_parameters": {"hidden": 16}, "loops": {}, "callbacks": {}}  # fmt: skip
        engine.save_checkpoint(str(folder), client_state=state, tag="checkpoint")
    elif layout == "hf":  # transformers Trainer._save_checkpoint with deepspeed (ZeRO 3)
        folder = out / f"checkpoint-{step}"
        engine.save_checkpoint(str(folder), tag=f"global_step{step}")
        if rank0:
            history = [{"eval_accuracy": ACCURACY[i], "step": 2 * (i + 1)} for i in range(k)]
            state = {"global_step": step, "log_history": history, "best_model_checkpoint": None}
            (folder / "config.json").write_text('{"model_type": "tiny"}')
            (folder / "trainer_state.json").write_text(json.dumps(state))
    torch.distributed.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--saves", type=int, default=1, help="checkpoints per stage")
    parser.add_argument("--layouts", default="plain", help="plain,mmengine,lightning,hf")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    stages = [int(s) for s in args.stages.split(",")]
    runs = [
        (layout, stage)
        for layout in args.layouts.split(",")
        for stage in (stages if layout == "plain" else [3])  # the trainers' runs: ZeRO 3
    ]
    for layout, stage in runs:
        torch.manual_seed(stage)
        model: torch.nn.Module = Tiny(args.hidden)
        if layout == "lightning":
            model = LightningWrapper(model)
        config = {
            "train_batch_size": 4 * world,
            "train_micro_batch_size_per_gpu": 4,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": True},
        }
        params = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
        out = args.out / (f"zero{stage}" if layout == "plain" else layout)
        for k in range(1, args.saves + 1):
            for _ in range(args.steps):
                x = torch.randn(4, args.hidden, dtype=torch.bfloat16)
                loss = engine(x).float().pow(2).mean()
                engine.backward(loss)
                engine.step()
            save(engine, out, layout, k, k * args.steps)
        engine.destroy()


if __name__ == "__main__":
    main()
