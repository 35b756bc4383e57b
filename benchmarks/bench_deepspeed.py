"""Consolidating a DeepSpeed ZeRO-3 checkpoint: ``ckptd slim FOLDER`` vs DeepSpeed's own
``zero_to_fp32.py``, wall time and peak RSS side by side in one run.

    .venv/bin/python benchmarks/bench_deepspeed.py            # 268M params: 3.0 GiB checkpoint
    .venv/bin/python benchmarks/bench_deepspeed.py --quick    # smoke run: tiny, 1 run

The checkpoint (``make_deepspeed.py``, DeepSpeed's format, 2 ranks, fp32 partitions and Adam
state) is written once; then, round by round in rotating order, each way runs as its own
process: the ``zero_to_fp32.py`` DeepSpeed ships (``python zero_to_fp32.py SAVE_DIR OUT_DIR``,
also followed by ``sync`` of its output, since ckptd's output is durable before it counts, and
with ``--safe_serialization``) and ``ckptd slim SAVE_DIR -o OUT.pth`` (and
``--format safetensors``). Medians; peak RSS from ``os.wait4``. Every output is checked tensor
for tensor against DeepSpeed's (``verify_deepspeed.py``). Needs deepspeed installed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from common import (
    PYTHON,
    Verdict,
    ckptd_cmd,
    drop_dirty,
    fmt_bytes,
    fmt_s,
    header,
    loadavg,
    median,
    own_rss_mib,
    print_table,
    print_verdicts,
    run,
    scratch_dir,
)

HERE = Path(__file__).parent


def zero_to_fp32_script() -> Path:
    found = run([PYTHON, "-c", "import deepspeed.utils.zero_to_fp32 as z; print(z.__file__)"])
    return Path(found.check().stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=268_435_456)
    parser.add_argument("--runs", type=int, default=None, help="runs per way (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4M params, 1 run")
    args = parser.parse_args()
    params = 4_000_000 if args.quick else args.params
    runs = args.runs or (1 if args.quick else 3)
    header("DeepSpeed consolidation benchmark", [Path(PYTHON).name, *sys.argv])
    script = zero_to_fp32_script()
    with scratch_dir("ckptd-bench-ds-", params * 4 * 6) as root:
        harness_rss = own_rss_mib()
        save_dir = root / "save_dir"
        made = run([PYTHON, str(HERE / "make_deepspeed.py"), str(save_dir), "--params",
                    str(params), "--hidden", "256" if args.quick else "1024"]).check()  # fmt: skip
        info = json.loads(made.stdout.strip().splitlines()[-1])
        # as save_checkpoint does, and so it runs as users run it (from its own folder it
        # would import deepspeed/utils/torch.py as torch)
        script = Path(shutil.copy(script, save_dir / "zero_to_fp32.py"))
        ways = {
            "zero_to_fp32.py": lambda out: [PYTHON, str(script), str(save_dir), str(out)],
            # what the artifact's durability costs: ckptd fsyncs its output before it counts
            "zero_to_fp32.py, then fsync": lambda out: [
                "sh", "-c", f'"$0" "$@" && sync "{out}"/*', PYTHON, str(script), str(save_dir),
                str(out)],
            "zero_to_fp32.py --safe_serialization": lambda out: [
                PYTHON, str(script), str(save_dir), str(out), "--safe_serialization"],
            "ckptd slim": lambda out: [*ckptd_cmd(), "slim", str(save_dir), "-o",
                                       str(out / "model.pth")],
            "ckptd slim --format safetensors": lambda out: [
                *ckptd_cmd(), "slim", str(save_dir), "-o", str(out / "model.safetensors"),
                "--format", "safetensors"],
        }  # fmt: skip
        results: dict[str, list] = {w: [] for w in ways}
        names = list(ways)
        outputs: dict[str, Path] = {}
        for r in range(runs):
            for way in names[r % len(names) :] + names[: r % len(names)]:
                out = root / f"out-{names.index(way)}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                drop_dirty()
                results[way].append(run(ways[way](out)).check())
                outputs[way] = next(p for p in out.iterdir() if p.suffix != ".json")
        checked: dict[tuple[str, str], str] = {}
        for theirs, ours in (("zero_to_fp32.py", "ckptd slim"),
                             ("zero_to_fp32.py --safe_serialization",
                              "ckptd slim --format safetensors")):  # fmt: skip
            verify = [PYTHON, str(HERE / "verify_deepspeed.py"), str(outputs[theirs])]
            done = run([*verify, str(outputs[ours])])
            checked[theirs, ours] = "" if done.returncode == 0 else done.stdout + done.stderr[-500:]
        sizes = {w: p.stat().st_size for w, p in outputs.items()}
        load_after = loadavg()
    size = fmt_bytes(info["bytes"])
    print(f"checkpoint: {size}, {info['params']:,} params in {info['tensors']} tensors, "
          f"{info['world']} ranks, ZeRO 3; {runs} runs per way")  # fmt: skip
    print(f"harness peak RSS: {harness_rss:.1f} MiB; load average after: {load_after}")
    wall = {w: median([r.wall for r in rs]) for w, rs in results.items()}
    rss = {w: max(r.maxrss_mib for r in rs) for w, rs in results.items()}
    print_table(
        ("way", "wall", "CPU", "peak RSS", "output"),
        [(w, fmt_s(wall[w]), fmt_s(median([r.cpu for r in rs])), f"{rss[w]:.0f} MiB",
          fmt_bytes(sizes[w]))
         for w, rs in results.items()],
    )  # fmt: skip
    same = ", ".join(f"{o}: {'NO ' + bad if bad else 'yes'}" for (_, o), bad in checked.items())
    print(f"outputs equal to zero_to_fp32's, tensor for tensor: {same}")
    verdicts = []
    pairs = [*checked, ("zero_to_fp32.py, then fsync", "ckptd slim")]
    for theirs, ours in pairs:
        speed, memory = wall[theirs] / wall[ours], rss[theirs] / rss[ours]
        verdicts.append(
            Verdict(f"{ours} vs {theirs}: faster", f"{speed:.1f}x", ">= 3x", speed >= 3)
        )
        verdicts.append(Verdict(f"{ours} vs {theirs}: less memory", f"{memory:.1f}x", ">= 10x",
                                memory >= 10))  # fmt: skip
        verdicts.append(Verdict(f"{ours}: peak RSS", f"{rss[ours]:.0f} MiB", "<= 64 MiB",
                                rss[ours] <= 64))  # fmt: skip
    equal = not any(checked.values())
    verdicts.append(Verdict("tensor for tensor", "all" if equal else "NO", "equal", equal))
    print()
    return 0 if print_verdicts(verdicts) or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
