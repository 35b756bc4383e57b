"""DCP consolidation: ``ckptd slim FOLDER`` vs torch's own ``dcp_to_torch_save``, side by side.

    .venv/bin/python benchmarks/bench_dcp.py            # 2.2 GB checkpoints, 2 and 4 ranks
    .venv/bin/python benchmarks/bench_dcp.py --quick    # smoke run: 80 MB, 2 ranks, 1 round

Each checkpoint is written by ``benchmarks/make_dcp.py`` under ``torchrun`` (gloo, CPU): float32
weights sharded along dim 0 (FSDP2's layout) and, one in eight, along dim 1 (re-laid row by
row), a bf16 embedding and a step count. Both ways consolidate *every* key (``--keep-keys
all``: the same content ``dcp_to_torch_save`` writes) as whole processes (interpreter start
included), interleaved round by round so that load from other processes hits them alike;
figures are medians, peak RSS is the child's ``ru_maxrss`` (this harness imports neither torch
nor numpy). The outputs are then loaded by torch in a child and compared tensor for tensor.
The page cache is warm for both ways; ``sync`` runs before each timed run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BENCH,
    PYTHON,
    Run,
    Verdict,
    ckptd_cmd,
    drop_dirty,
    fmt_bytes,
    fmt_s,
    header,
    median,
    own_rss_mib,
    print_table,
    print_verdicts,
    run,
    scratch_dir,
)

RSS_LIMIT_MIB = 64
SPEEDUP, MEMORY = 3.0, 10.0
TORCH_WAY = (
    "import sys; from torch.distributed.checkpoint.format_utils import dcp_to_torch_save; "
    "dcp_to_torch_save(sys.argv[1], sys.argv[2])"
)
VERIFY = """
import sys, torch
a = torch.load(sys.argv[1], weights_only=True, mmap=True)
b = torch.load(sys.argv[2], weights_only=False, mmap=True)
def same(x, y):
    if isinstance(y, torch.Tensor):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        return 1
    if isinstance(y, dict):
        assert list(x) == list(y)
        return sum(same(x[k], y[k]) for k in y)
    assert x == y, (x, y)
    return 0
print(same(a, b))
"""


def tree_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


def bench_case(scratch: Path, ranks: int, mib: int, rounds: int) -> tuple[list, list[Verdict]]:
    src = scratch / f"dcp-{ranks}ranks"
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--standalone"]
    made = run([*torchrun, "--nproc-per-node", str(ranks), str(BENCH / "make_dcp.py"), str(src),
                "--mib", str(mib)]).check()  # fmt: skip
    print(made.stdout.strip().splitlines()[-1])
    out_ckptd, out_torch = scratch / "ckptd.pth", scratch / "torch.pth"
    ways = {
        "ckptd slim": [*ckptd_cmd(), "slim", str(src), "--keep-keys", "all", "-o", str(out_ckptd)],
        "dcp_to_torch_save": [PYTHON, "-c", TORCH_WAY, str(src), str(out_torch)],
    }
    runs: dict[str, list[Run]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, cmd in ways.items():
            drop_dirty()
            runs[name].append(run(cmd).check())
    equal = run([PYTHON, "-c", VERIFY, str(out_ckptd), str(out_torch)])
    tensors = equal.stdout.strip() if equal.returncode == 0 else f"differ: {equal.stderr[-300:]}"
    size = tree_size(src)
    wall = {n: median([r.wall for r in rs]) for n, rs in runs.items()}
    rss = {n: median([r.maxrss_mib for r in rs]) for n, rs in runs.items()}
    rows = [
        (f"{fmt_bytes(size)}, {ranks} ranks", n, fmt_s(wall[n]), f"{rss[n]:.0f} MiB",
         f"{size / wall[n] / 2**20:.0f} MiB/s")
        for n in ways
    ]  # fmt: skip
    speed = wall["dcp_to_torch_save"] / wall["ckptd slim"]
    memory = rss["dcp_to_torch_save"] / rss["ckptd slim"]
    case = f"{ranks} ranks"
    verdicts = [
        Verdict(f"{case}: speed-up over dcp_to_torch_save", f"{speed:.1f}x", f">= {SPEEDUP:g}x",
                speed >= SPEEDUP),
        Verdict(f"{case}: less peak RSS than dcp_to_torch_save", f"{memory:.1f}x",
                f">= {MEMORY:g}x", memory >= MEMORY),
        Verdict(f"{case}: ckptd peak RSS", f"{rss['ckptd slim']:.0f} MiB",
                f"<= {RSS_LIMIT_MIB} MiB", rss["ckptd slim"] <= RSS_LIMIT_MIB),
        Verdict(f"{case}: outputs equal tensor for tensor", tensors, "all equal",
                equal.returncode == 0),
    ]  # fmt: skip
    for path in (out_ckptd, out_torch):
        path.unlink(missing_ok=True)
    return rows, verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="80 MB, 2 ranks, 1 round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mib", type=int, default=2200, help="checkpoint size (MiB)")
    parser.add_argument("--ranks", default="2,4", help="comma-separated rank counts")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    mib, rounds, cases = (80, 1, [2]) if args.quick else (args.mib, args.rounds, ranks)
    header("DCP consolidation: ckptd slim vs dcp_to_torch_save", sys.argv)
    print(f"harness peak RSS {own_rss_mib():.0f} MiB (a floor for every child's ru_maxrss)")
    rows, verdicts = [], []
    with scratch_dir("ckptd-bench-dcp-", need_bytes=3 * mib * 2**20) as scratch:
        for ranks in cases:
            case_rows, case_verdicts = bench_case(scratch, ranks, mib, rounds)
            rows += case_rows
            verdicts += case_verdicts
            for folder in scratch.glob("dcp-*"):
                for f in folder.iterdir():
                    f.unlink()
                folder.rmdir()
    print()
    print_table(("checkpoint", "way", "wall (median)", "peak RSS", "throughput"), rows)
    print()
    ok = print_verdicts(verdicts)
    from common import loadavg

    print(f"\nload average after the runs: {loadavg()}")
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
