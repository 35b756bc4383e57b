"""The simulated trainer (ckptd.demo.simulate) against real MMEngine 0.10.7, and its own knobs."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import pickle
import pickletools
import re
import subprocess
import sys
import threading
import time
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ckptd.demo.simulate import HistoryBuffer, SimConfig, SimulatedTrainer

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / "tests" / "trainers" / "mmengine_real.py"
TS = re.compile(r"\d{8}_\d{6}")
# Runs the simulator CLI for several (work_dir, events file, args) jobs in one fresh process,
# with the real harness's write recorder; waits for a new second before a resumed launch.
SIM_JOBS = """
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from mmengine_real import record_fs_events
from ckptd.demo.simulate import main
for work_dir, events, args in json.loads(sys.argv[2]):
    os.makedirs(work_dir, exist_ok=True)
    launched = set(os.listdir(work_dir))
    while time.strftime("%Y%m%d_%H%M%S") in launched:
        time.sleep(0.05)
    record_fs_events(work_dir, events)
    main([work_dir, *args])
"""
_spec = importlib.util.spec_from_file_location("mmengine_real", REAL)
assert _spec is not None and _spec.loader is not None
real_harness = sys.modules.setdefault("mmengine_real", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(real_harness)  # imports mmengine lazily, only to train
LOSS = ",".join(map(str, real_harness.DEFAULT_LOSS_VALUES))
_ITER = ["--iter-based", "--max-iters", "24", "--val-interval", "8", "--save-best", "auto"]
SCENARIOS = {  # name: (real harness args, simulator args)
    "epoch": (["--epochs", "6", "--save-best", "auto", "--max-keep-ckpts", "2"],) * 2,
    # A less-is-better 'loss' key, which MMEngine logs smoothed: see test_json_lines_have_...
    "iter": (
        [*_ITER, "--metric", "loss"],
        [*_ITER, "--metric-keys", "val/loss,val/acc", "--metric-values", LOSS],
    ),
}
RESUME = (["--epochs", "8", "--save-best", "auto", "--max-keep-ckpts", "2", "--resume"],) * 2


def _norm(p: str) -> str:
    return TS.sub("TS", p)


def _run(cmd: list[str]) -> None:
    p = subprocess.run(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120
    )
    assert p.returncode == 0, f"{cmd[1:3]} failed:\n{p.stderr.decode()[-3000:]}"


def _real_chain(base: Path, jobs: list[tuple[str, str, list[str]]]) -> None:
    for work_dir, events, args in jobs:
        launched = {p.name for p in base.joinpath(work_dir).glob("*_*/")}
        while time.strftime("%Y%m%d_%H%M%S") in launched:  # else the <ts>/ folder is reused
            time.sleep(0.05)
        _run(
            [sys.executable, str(REAL), str(base / work_dir), *args, "--events", str(base / events)]
        )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real and simulated work_dirs per scenario; 'epoch' then gets a resumed launch too."""
    pytest.importorskip("mmengine")
    base = tmp_path_factory.mktemp("pairs")
    jobs = {
        kind: [(f"{kind}-{n}", f"{kind}-{n}.ev", a[i]) for n, a in SCENARIOS.items()]
        for i, kind in enumerate(("real", "sim"))
    }
    for i, kind in enumerate(("real", "sim")):
        jobs[kind].insert(1, (f"{kind}-epoch", f"{kind}-resume.ev", RESUME[i]))
    jobs["real"].append(("real-iter-again", "real-iter-again.ev", SCENARIOS["iter"][0]))
    sim = [(str(base / w), str(base / e), a) for w, e, a in jobs["sim"]]
    chains = [
        lambda: _real_chain(base, jobs["real"][:2]),  # epoch, then its resume
        lambda: _real_chain(base, jobs["real"][2:]),
        lambda: _run([sys.executable, "-c", SIM_JOBS, str(REAL.parent), json.dumps(sim)]),
    ]
    errors: list[BaseException] = []

    def guarded(fn: Any) -> None:
        try:
            fn()
        except BaseException as e:  # re-raised in the test's thread below
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(fn,)) for fn in chains]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {p.name: p for p in base.iterdir()}


def _tree(d: Path) -> list[str]:
    return sorted(_norm(str(p.relative_to(d))) for p in d.rglob("*"))


def _lines(d: Path) -> list[tuple[Any, ...]]:
    """Per JSON line, all but measurements: keys in order, epoch, iter, step, val's 1st value."""
    out = []
    for f in sorted(d.glob("*/vis_data/scalars.json")):
        assert f.read_bytes() == (f.parent / f"{f.parent.parent.name}.json").read_bytes()
        for line in f.read_text().splitlines():
            r = json.loads(line)
            first = None if "lr" in r else next(iter(r.values()))
            out.append((tuple(r), r.get("epoch"), r.get("iter"), r["step"], first))
    return out


def _globals(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    text = io.StringIO()
    pickletools.dis(data, text)
    names = {
        ln.split("GLOBAL", 1)[1].strip() for ln in text.getvalue().splitlines() if "GLOBAL" in ln
    }
    return {n.replace("mmengine.logging.history_buffer", "ckptd.demo.simulate") for n in names}


def _shape(ckpt: dict[str, Any]) -> dict[str, Any]:
    hub = ckpt["message_hub"]
    return {
        "keys": list(ckpt),
        "meta": list(ckpt["meta"]),
        "epoch_iter": (ckpt["meta"]["epoch"], ckpt["meta"]["iter"]),
        "classes": ckpt["meta"]["dataset_meta"]["classes"],
        "hub": list(hub),
        "runtime_info": sorted(hub["runtime_info"]),
        "log_scalars": sorted(hub["log_scalars"]),
        "buffer": {type(b).__name__ for b in hub["log_scalars"].values()},
        "state_dict": (type(ckpt["state_dict"]), hasattr(ckpt["state_dict"], "_metadata")),
    }


@pytest.mark.trainer
@pytest.mark.parametrize("name", ["epoch", "iter"])
def test_layout_and_write_order_match_real_mmengine(runs: dict[str, Path], name: str) -> None:
    real, sim = runs[f"real-{name}"], runs[f"sim-{name}"]
    assert _tree(sim) == _tree(real)
    for ev in (name, "resume") if name == "epoch" else (name,):
        real_ev = runs[f"real-{ev}.ev"].read_text().splitlines()
        assert [_norm(x) for x in runs[f"sim-{ev}.ev"].read_text().splitlines()] == [
            _norm(x) for x in real_ev
        ]
    assert _lines(sim) == _lines(real)
    for d in (real, sim):
        ckpts = [p for p in d.glob("*.pth") if not p.name.startswith("best_")]
        newest = max(ckpts, key=lambda p: int(p.stem.split("_")[1]))
        assert (d / "last_checkpoint").read_text() == str(newest)  # absolute, no newline


@pytest.mark.trainer
def test_json_lines_have_mmengine_keys(runs: dict[str, Path]) -> None:
    lines = _lines(runs["real-epoch"])
    train = [x for x in lines if "lr" in x[0]]
    val = [x for x in lines if "coco/bbox_mAP" in x[0]]
    assert train[0][0] == ("lr", "data_time", "loss", "loss_cls", "time", "epoch", "iter", "step")
    assert val[0][0][0] == "coco/bbox_mAP" and val[0][0][-3:] == ("data_time", "time", "step")
    assert [x[3] for x in val] == list(range(1, 9))  # val step = 1-based epoch, resume continues
    assert all(x[1] is None and x[2] is None for x in val)
    iter_val = [x for x in _lines(runs["real-iter"]) if "lr" not in x[0]]
    assert [x[3] for x in iter_val] == [8, 16, 24]  # iter-based: step = iteration
    # 'val/loss' matches LogProcessor's mean_pattern: logged as the running mean of the last
    # 10 evaluations (0.9, 0.7, 0.75 -> 0.9, 0.8, 0.783), while save_best uses the raw value.
    assert [x[4] for x in iter_val] == pytest.approx([0.9, 0.8, 0.78333333])
    assert (runs["real-iter"] / "best_val_loss_iter_16.pth").exists()


@pytest.mark.trainer
def test_real_harness_is_deterministic(runs: dict[str, Path]) -> None:
    """Same seed, two real MMEngine runs: every checkpoint's weights equal, tensor for tensor."""
    a, b = runs["real-iter"], runs["real-iter-again"]
    names = sorted(p.name for p in a.glob("*.pth"))
    assert names == sorted(p.name for p in b.glob("*.pth")) and len(names) == 4
    for n in names:
        sa = torch.load(a / n, weights_only=False)["state_dict"]
        sb = torch.load(b / n, weights_only=False)["state_dict"]
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa), n
    first, last = (
        torch.load(a / n, weights_only=False)["state_dict"] for n in ("iter_8.pth", "iter_24.pth")
    )
    assert not all(torch.equal(first[k], last[k]) for k in first)


@pytest.mark.trainer
@pytest.mark.parametrize("name", ["epoch", "iter"])
def test_checkpoints_match_real_mmengine(runs: dict[str, Path], name: str) -> None:
    real, sim = runs[f"real-{name}"], runs[f"sim-{name}"]
    for rp in sorted(real.glob("*.pth")):
        sp = sim / rp.name
        with pytest.raises(pickle.UnpicklingError):
            torch.load(rp, weights_only=True)
        with pytest.raises(pickle.UnpicklingError):
            torch.load(sp, weights_only=True)
        r, s = torch.load(rp, weights_only=False), torch.load(sp, weights_only=False)
        assert _shape(s) == _shape(r), rp.name
        assert _globals(sp) == _globals(rp), rp.name


# Recorded from a real MMEngine 0.10.7 run; see docs/DESIGN.md, "How the trainers write".
REFERENCE = ROOT / "tests" / "data" / "reference" / "mmengine"


def test_matches_the_recorded_reference_run(tmp_path: Path) -> None:
    """inotify order and scalars.json of a real run (save_best auto, max_keep 2), in the repo:
    no skip, so CI always compares the simulator with what MMEngine really wrote."""
    trainer = SimulatedTrainer(tmp_path, SimConfig(epochs=6, save_best="auto", max_keep_ckpts=2))
    seen = []
    for e in trainer.events():
        if e.kind in ("train_log", "val_log"):
            seen += [("CLOSE_WRITE", "TS.json"), ("CLOSE_WRITE", "scalars.json")]
        elif e.kind == "delete":
            seen.append(("DELETE", e.path.name))
        elif e.path is not None and e.kind != "launch":
            seen.append(("CLOSE_WRITE", e.path.name))
    recorded = [ln.split()[1:3] for ln in (REFERENCE / "write-order.events.txt").open()][1:]
    assert seen == [(ev, _norm(n)) for ev, n in recorded if ev in ("CLOSE_WRITE", "DELETE")]
    assert _lines(tmp_path) == [
        (
            tuple(r),
            r.get("epoch"),
            r.get("iter"),
            r["step"],
            None if "lr" in r else r[next(iter(r))],
        )
        for r in map(json.loads, (REFERENCE / "scalars.json").open())
    ]


def _epoch_tensors(work_dir: Path) -> dict[str, list[bytes]]:
    return {
        p.name: [
            t.numpy().tobytes() for t in torch.load(p, weights_only=False)["state_dict"].values()
        ]
        for p in sorted(work_dir.glob("epoch_*.pth"))
    }


def test_weights_only_refuses_simulated_checkpoints(tmp_path: Path) -> None:
    SimulatedTrainer(tmp_path, SimConfig(epochs=1, save_best="auto")).run()
    for p in (tmp_path / "epoch_1.pth", tmp_path / "best_coco_bbox_mAP_epoch_1.pth"):
        with pytest.raises(pickle.UnpicklingError, match=r"ckptd\.demo\.simulate\.HistoryBuffer"):
            torch.load(p, weights_only=True)
        ckpt = torch.load(p, weights_only=False)
        buf = ckpt["message_hub"]["log_scalars"]["train/loss"]
        assert isinstance(buf, HistoryBuffer) and isinstance(buf._log_history, np.ndarray)
        assert isinstance(ckpt["state_dict"], OrderedDict)
    assert {"optimizer", "param_schedulers"} <= set(
        torch.load(tmp_path / "epoch_1.pth", weights_only=False)
    )


def test_same_seed_same_weights_resume_included(tmp_path: Path) -> None:
    cfg = SimConfig(epochs=3, optimizer="adamw", seed=7)
    SimulatedTrainer(tmp_path / "a", cfg).run()
    SimulatedTrainer(tmp_path / "b", cfg).run()
    first = SimulatedTrainer(tmp_path / "c", SimConfig(epochs=2, optimizer="adamw", seed=7))
    first.run()
    resume = SimConfig(
        epochs=3, optimizer="adamw", seed=7, resume=True, timestamp="20990101_000000"
    )
    SimulatedTrainer(tmp_path / "c", resume).run()
    SimulatedTrainer(tmp_path / "d", SimConfig(epochs=3, optimizer="adamw", seed=8)).run()
    a = _epoch_tensors(tmp_path / "a")
    assert list(a) == ["epoch_1.pth", "epoch_2.pth", "epoch_3.pth"]
    assert a == _epoch_tensors(tmp_path / "b") == _epoch_tensors(tmp_path / "c")
    assert a["epoch_1.pth"] != a["epoch_3.pth"]
    assert a != _epoch_tensors(tmp_path / "d")
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "c/20990101_000000/vis_data/scalars.json").open()
    ]
    assert steps[-1] == 3 and steps[0] == 20  # the resumed launch continues the count


def test_slow_write_is_visible_and_incomplete(tmp_path: Path) -> None:
    trainer = SimulatedTrainer(tmp_path, SimConfig(epochs=1, slow_write_seconds=1.0))
    thread = threading.Thread(target=trainer.run)
    thread.start()
    ckpt = tmp_path / "epoch_1.pth"
    deadline = time.monotonic() + 10
    while not (ckpt.exists() and ckpt.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    partial = ckpt.stat().st_size
    assert not (tmp_path / "last_checkpoint").exists()
    with pytest.raises(Exception):  # noqa: B017 - any failure: zip/pickle/EOF depending on cut
        torch.load(ckpt, weights_only=False)
    thread.join()
    assert ckpt.stat().st_size > partial
    assert torch.load(ckpt, weights_only=False)["meta"]["epoch"] == 1


def test_events_interleave_and_val_interval(tmp_path: Path) -> None:
    cfg = SimConfig(epochs=5, val_interval=2, metric_values=[0.1, 0.2, 0.3, 0.2, math.nan])
    trainer = SimulatedTrainer(tmp_path, cfg)
    for ev in trainer.events():  # stop right after epoch 1's checkpoint, before anything else
        if ev.kind == "checkpoint":
            break
    assert (tmp_path / "epoch_1.pth").exists() and not (tmp_path / "last_checkpoint").exists()
    kinds = [e.kind for e in trainer.run_epoch()]
    assert kinds == ["last_checkpoint", "round_end"]  # epoch 1 is not evaluated
    kinds = [e.kind for e in trainer.run_epoch()]
    assert kinds[-4:] == ["checkpoint", "last_checkpoint", "val_log", "round_end"]
    trainer.run()
    assert trainer.done
    val = [json.loads(x) for x in trainer.scalars.read_text().splitlines() if "lr" not in x]
    assert [v["step"] for v in val] == [2, 4, 5]  # last epoch always evaluated
    assert math.isnan(val[-1]["coco/bbox_mAP"]) and "NaN" in trainer.scalars.read_text()
    assert all("epoch" not in v and "iter" not in v for v in val)


def test_rewrite_after_best_without_save_best(tmp_path: Path) -> None:
    cfg = SimConfig(epochs=4, rewrite_after_best=True, metric_values=[0.5, 0.4, 0.6, 0.6])
    kinds = [(e.kind, e.epoch) for e in SimulatedTrainer(tmp_path, cfg).events()]
    assert [k for k in kinds if k[0] == "rewrite"] == [("rewrite", 1), ("rewrite", 3)]  # strict >
    assert not list(tmp_path.glob("best_*"))


def test_trainer_side_save_best_rules_and_max_keep(tmp_path: Path) -> None:
    cfg = SimConfig(
        epochs=5,
        metric_keys=("val/loss", "val/acc"),
        metric_values={"val/loss": [0.9, 0.5, 0.7, 0.4, 0.6], "val/acc": [0.1, 0.9, 0.2, 0.3, 0.4]},
        save_best=["val/loss", "val/acc"],
        max_keep_ckpts=2,
    )
    trainer = SimulatedTrainer(tmp_path, cfg)
    trainer.run()
    names = sorted(p.name for p in tmp_path.glob("*.pth"))
    assert names == [
        "best_val_acc_epoch_2.pth",
        "best_val_loss_epoch_4.pth",
        "epoch_4.pth",
        "epoch_5.pth",
    ]
    # Like MMEngine's LogProcessor: 'loss' keys are logged as a running mean (window 10),
    # 'acc' keys as is; the best files above were chosen on the raw values.
    val = [json.loads(x) for x in trainer.scalars.read_text().splitlines() if "lr" not in x]
    assert [v["val/loss"] for v in val] == pytest.approx([0.9, 0.7, 0.7, 0.625, 0.62])
    assert [v["val/acc"] for v in val] == [0.1, 0.9, 0.2, 0.3, 0.4]


def test_cli_runs_as_a_separate_process(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "ckptd.demo.simulate", str(tmp_path), "--epochs", "2"]
    cmd += ["--iter-based", "--max-iters", "6", "--val-interval", "4", "--save-best", "auto"]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=60)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == [
        "best_coco_bbox_mAP_iter_4.pth",
        "iter_4.pth",
        "iter_6.pth",
    ]
    ckpt = torch.load(tmp_path / "iter_6.pth", weights_only=False)
    assert (ckpt["meta"]["epoch"], ckpt["meta"]["iter"]) == (0, 6)
