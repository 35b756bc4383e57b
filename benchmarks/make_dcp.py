"""Write a large torch distributed checkpoint for ``bench_dcp.py``; run under torchrun (gloo).

    torchrun --nproc-per-node N benchmarks/make_dcp.py OUT --mib 2200

Each rank builds only its own shards (``DTensor.from_local``), so no process holds the model:
float32 weights sharded along dim 0 (FSDP2's layout, the bulk) and, for one tensor in eight,
along dim 1 (tensor parallel's column layout, which a consolidation must re-lay row by row),
plus a bf16 embedding and the step count. ``dcp.save`` writes the folder.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

ROWS, COLS = 4096, 4096  # one weight: 64 MiB of float32


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--mib", type=int, default=2200)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    per = ROWS * COLS * 4 // (1 << 20)
    g = torch.Generator().manual_seed(1000 + rank)
    model: dict[str, torch.Tensor] = {}
    for i in range(max(1, (args.mib - 64) // per)):
        dim = 1 if i % 8 == 7 else 0
        local_shape = (ROWS // world, COLS) if dim == 0 else (ROWS, COLS // world)
        local = torch.randn(local_shape, generator=g)
        model[f"layers.{i}.weight"] = DTensor.from_local(local, mesh, [Shard(dim)])
    embed = torch.randn(8192 // world, 4096, generator=g).to(torch.bfloat16)
    model["embed.weight"] = DTensor.from_local(embed, mesh, [Shard(0)])
    dcp.save({"model": model, "step": 1000}, checkpoint_id=args.out)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        size = sum(f.stat().st_size for f in args.out.iterdir())
        print(f"wrote {args.out}: {size / 2**30:.2f} GiB, {len(model)} tensors, {world} ranks")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
