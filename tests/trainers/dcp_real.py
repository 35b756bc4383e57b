"""Real torch distributed checkpoints, written by torch's (and Lightning's) own save code on CPU.

Run under ``torchrun --nproc-per-node N`` with the gloo backend (``plain`` runs alone, without
a process group)::

    torchrun --nproc-per-node 2 tests/trainers/dcp_real.py MODE OUT [--delay-rank1 S]

Modes (each writes one checkpoint folder ``OUT``, or ``OUT/<name>.ckpt`` folders; ``all``
writes each into ``OUT/<mode>`` in one launch):

- ``fsdp2``: a small MLP under FSDP2 ``fully_shard`` on a CPU device mesh, one Adam step, and
  ``dcp.save({"model": ..., "optim": ..., "epoch": 3})`` (dim-0 shards, uneven at the end).
- ``dtensor``: DTensors sharded along dim 1 (row by row in the output), a 3-d one along dim 0,
  bf16 and int64 ones, a replicated 0-d one and a plain tensor, saved with ``dcp.save``.
- ``plain``: ``dcp.save`` of a plain state dict with ``no_dist=True`` (one ``__0_0.distcp``).
- ``lightning``: Lightning's own ``FSDPStrategy.save_checkpoint`` (``state_dict_type=
  "sharded"``) called on an FSDP-wrapped module: the ``epoch=E-step=S.ckpt/`` folder with
  ``.metadata``, the shards and ``meta.pt``. The real ``Trainer`` refuses FSDP without a GPU
  ("The strategy `fsdp` requires a GPU accelerator"), so this is Lightning's save code driven
  by hand, not a ``Trainer.fit``.

``--then-wait-for FILE`` keeps the ranks alive after the other modes (``OUT/.static-done``
says they are done) until FILE names a folder path, then writes that Lightning folder with
rank 1 delayed: a test gets a rank still writing without paying for another launch.

``--delay-rank1 S`` makes rank 1 wait S seconds before writing its shard (``FileSystemWriter.
write_data`` wrapped), so a test can watch the folder while one rank is done and one is not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _slow_rank1(delay: float) -> None:
    """Rank 1 waits ``delay`` seconds before writing its shard, whoever calls dcp.save (also
    Lightning's ``_distributed_checkpoint_save``, which passes no writer)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import FileSystemWriter

    original = FileSystemWriter.write_data

    def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
        if dist.get_rank() == 1:
            time.sleep(delay)
        return original(self, plan, planner)

    FileSystemWriter.write_data = write_data  # type: ignore[method-assign]


def fsdp2(out: Path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 5), torch.nn.LayerNorm(5)
    )
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 12)).sum().backward()
    optim.step()
    model_sd, optim_sd = get_state_dict(model, optim)
    state = {"model": model_sd, "optim": optim_sd, "epoch": 3}
    dcp.save(state, checkpoint_id=out)


def dtensor(out: Path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),))
    g = torch.Generator().manual_seed(1)
    cols = torch.randn(7, 9, generator=g)
    cube = torch.randn(5, 3, 4, generator=g)
    half = torch.randn(6, 5, generator=g).to(torch.bfloat16)
    ints = torch.arange(33, dtype=torch.int64).reshape(3, 11)
    state = {
        "model": {
            "cols.weight": distribute_tensor(cols, mesh, [Shard(1)]),
            "cube": distribute_tensor(cube, mesh, [Shard(0)]),
            "half": distribute_tensor(half, mesh, [Shard(1)]),
            "ints": distribute_tensor(ints, mesh, [Shard(1)]),
            "scale": distribute_tensor(torch.tensor(0.5), mesh, [Replicate()]),
            "plain": torch.linspace(0, 1, 10),
        },
        "step": 17,
    }
    dcp.save(state, checkpoint_id=out)


def plain(out: Path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4))
    dcp.save({"model": model.state_dict(), "meta": {"epoch": 2, "note": "plain"}},
             checkpoint_id=out, no_dist=True)  # fmt: skip


def lightning(out: Path, name: str = "epoch=1-step=20.ckpt") -> None:
    import lightning
    import torch
    from lightning.fabric.plugins.environments import TorchElasticEnvironment
    from lightning.fabric.strategies.fsdp import _get_sharded_state_dict_context
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.manual_seed(3)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    model = FSDP(module, device_id=torch.device("cpu"), use_orig_params=True)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 8)).sum().backward()
    optim.step()
    with _get_sharded_state_dict_context(model):
        state_dict = model.state_dict()
        optim_state = FSDP.optim_state_dict(model, optim)
    strategy = FSDPStrategy(
        state_dict_type="sharded", cluster_environment=TorchElasticEnvironment()
    )
    checkpoint = {  # what Trainer's _checkpoint_connector.dump_checkpoint gathers
        "epoch": 1,
        "global_step": 20,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": state_dict,
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 1}}}},
        "callbacks": {},
        "optimizer_states": [optim_state],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"hidden": 16, "lr": 0.01},
    }
    strategy.save_checkpoint(checkpoint, out / name)


def _wait_for(path: Path, timeout: float = 1800) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text().strip() if path.exists() else ""
        if text:
            return text
        time.sleep(0.1)
    return "skip"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("fsdp2", "dtensor", "plain", "lightning", "all"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--name", default="epoch=1-step=20.ckpt", help="lightning's folder")
    parser.add_argument("--delay-rank1", type=float, default=0.0)
    parser.add_argument(
        "--then-wait-for",
        type=Path,
        help="after the other modes, wait for this file to name a folder, then write a "
        "Lightning folder there with rank 1 delayed (--delay-rank1); 'skip' ends the run",
    )
    args = parser.parse_args()
    if args.mode == "plain":
        plain(args.out)
        return
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if args.delay_rank1 and not args.then_wait_for:
        _slow_rank1(args.delay_rank1)
    try:
        if args.mode in ("fsdp2", "all"):
            fsdp2(args.out / "fsdp2" if args.mode == "all" else args.out)
        if args.mode in ("dtensor", "all"):
            dtensor(args.out / "dtensor" if args.mode == "all" else args.out)
        if args.mode in ("lightning", "all"):
            lightning(args.out / "lightning" if args.mode == "all" else args.out, args.name)
        if args.mode == "all" and dist.get_rank() == 0:
            plain(args.out / "plain")
        dist.barrier()
        if args.then_wait_for:
            if dist.get_rank() == 0:
                (args.out / ".static-done").touch()
            target = _wait_for(args.then_wait_for)
            if target != "skip":
                _slow_rank1(args.delay_rank1)
                target_path = Path(target)
                lightning(target_path.parent, target_path.name)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
