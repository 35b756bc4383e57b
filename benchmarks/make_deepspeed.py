"""Write a DeepSpeed ZeRO-3 checkpoint of a given size, in DeepSpeed's format (a child process).

``python benchmarks/make_deepspeed.py SAVE_DIR --params 268435456 --world 2``

A real engine of that size would need several times its memory on a CPU, so this writes the
files ``DeepSpeedEngine.save_checkpoint`` writes under ZeRO 3 with the same keys and objects
(read from real 0.19.8 saves, see tests/trainers/deepspeed_real.py): per rank a
``zero_pp_rank_R_mp_rank_00_model_states.pt`` (``param_shapes``, ``dp_world_size``,
``ds_config``, partitioned parameters as empty tensors) and a
``bf16_zero_pp_rank_R_mp_rank_00_optim_states.pt`` (``zero_stage`` as DeepSpeed's
``ZeroStageEnum``, its ``LossScaler``, ``partition_count``, the fp32 ``fp32_flat_groups`` and
Adam's ``exp_avg``/``exp_avg_sq``), then ``latest``. Parameters are transformer-like matrices
with some odd sizes, so ranks carry padding as in a real partition. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import OrderedDict
from pathlib import Path

import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum


def shapes(total: int, hidden: int) -> OrderedDict[str, torch.Size]:
    out: OrderedDict[str, torch.Size] = OrderedDict()
    out["embed.weight"] = torch.Size([50257, hidden // 4])
    layer, used = 0, out["embed.weight"].numel()
    while used < total:
        for name, shape in (
            ("attn.qkv.weight", (3 * hidden, hidden)),
            ("attn.qkv.bias", (3 * hidden,)),
            ("mlp.fc.weight", (hidden, 4 * hidden - 3)),  # odd: not a multiple of the world
            ("norm.weight", (hidden,)),
        ):
            out[f"layers.{layer}.{name}"] = torch.Size(shape)
            used += math.prod(shape)
        layer += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("save_dir", type=Path)
    parser.add_argument("--params", type=int, default=1 << 28)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--step", type=int, default=100)
    args = parser.parse_args()
    tag = args.save_dir / f"global_step{args.step}"
    tag.mkdir(parents=True, exist_ok=True)
    params = shapes(args.params, args.hidden)
    world = args.world
    per_rank = sum(math.ceil(s.numel() / world) for s in params.values())
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "bf16": {"enabled": True}, "optimizer": {"type": "Adam"}}  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for rank in range(world):
        module = OrderedDict((n, torch.empty(0, dtype=torch.bfloat16)) for n in params)
        torch.save(
            {"module": module, "buffer_names": [], "optimizer": None, "param_shapes": [params],
             "frozen_param_shapes": OrderedDict(), "shared_params": {},
             "frozen_param_fragments": OrderedDict(), "lr_scheduler": None, "data_sampler": None,
             "random_ltd": None, "skipped_steps": 0, "global_steps": args.step,
             "global_samples": args.step * world, "dp_world_size": world, "mp_world_size": 1,
             "ds_config": config, "ds_version": "0.19.8"},
            tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
        )  # fmt: skip
        flat = torch.randn(per_rank, generator=gen)
        adam = {"step": torch.tensor(float(args.step)),
                "exp_avg": torch.randn(per_rank, generator=gen),
                "exp_avg_sq": torch.rand(per_rank, generator=gen)}  # fmt: skip
        inner = {"state": {0: adam}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
        torch.save(
            {"optimizer_state_dict": {"zero_stage": ZeroStageEnum(3),
                                      "loss_scaler": LossScaler(1.0), "dynamic_loss_scale": False,
                                      "overflow": False, "partition_count": world,
                                      "optimizer_state_dict": inner, "fp32_flat_groups": [flat]},
             "ds_config": config, "ds_version": "0.19.8"},
            tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
        )  # fmt: skip
        del flat, adam, inner
    (args.save_dir / "latest").write_text(tag.name)
    size = sum(p.stat().st_size for p in tag.iterdir())
    numel = sum(s.numel() for s in params.values())
    print(json.dumps({"bytes": size, "params": numel, "tensors": len(params), "world": world}))


if __name__ == "__main__":
    main()
