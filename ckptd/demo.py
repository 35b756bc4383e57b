"""``ckptd demo``: watch ckptd manage a live (simulated) MMEngine training in a temp folder.

A separate process writes real torch checkpoints in MMEngine's layout and order, including the
in-place rewrite after a new best and a validation metric that rises and falls; the daemon
runs here and logs every keep, slim and delete as it happens.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ckptd.config import load_config
from ckptd.daemon import Daemon
from ckptd.logs import use_compact_logging
from ckptd.reconcile import WorkDirReport
from ckptd.units import format_size

DEMO_CONFIG = """\
# Written by `ckptd demo`.
projects:
  - name: demo
    work_dirs: ["./work_dirs/*"]
    retention:
      keep_last: 2
      pending_eval_grace: 5m
watch:
  mode: inotify
  settle: 1s
  resync_interval: 30s
"""
# mAP per epoch: rises, dips, peaks at epoch 8, then overfits.
METRIC = "0.12,0.21,0.29,0.27,0.34,0.38,0.36,0.41,0.39,0.40,0.37,0.38"
# What the simulated trainer imports: the `demo` extra, which a plain `pip install ckptd` lacks.
TRAINER_MODULES = ("torch", "numpy")
# The CPU index first: resolving `ckptd[demo]`'s bare torch requirement from PyPI pulls CUDA.
INSTALL_ADVICE = """\
ckptd demo: the simulated trainer needs {missing}, which a plain `pip install ckptd` does not
install (the daemon itself never imports them). Install a CPU torch first, then the demo extra:
  pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
  pip install 'ckptd[demo]'      # from a checkout: pip install -e '.[demo]'  (or: make demo)
A bare `pip install torch` from PyPI would pull a multi-GB CUDA build."""


@dataclass
class DemoTally:
    sizes: dict[str, int] = field(default_factory=dict)  # every checkpoint ever seen
    last: WorkDirReport | None = None
    passes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, report: WorkDirReport) -> None:
        with self.lock:
            self.passes += 1
            self.last = report
            if report.observation:
                for c in report.observation.scan.checkpoints:
                    if c.complete:
                        self.sizes[c.name] = max(self.sizes.get(c.name, 0), c.stat.size)


def _summary(tally: DemoTally, work_dir: Path, elapsed: float) -> str:
    report = tally.last
    remaining = sum(p.stat().st_size for p in work_dir.glob("epoch_*.pth"))
    artifact_dir = work_dir / "best"
    artifact_bytes = sum(p.stat().st_size for p in artifact_dir.glob("*.pth"))
    lines = ["", "== ckptd demo summary", f"  work_dir           {work_dir}"]
    lines.append(f"  epochs seen        {len(tally.sizes)}  ({elapsed:.0f} s)")
    if report and report.artifacts:
        a = report.artifacts[0]
        lines.append(f"  best               {a.key} = {a.best.value:g} at epoch {a.best.index}")
        lines.append(f"  artifact           {a.path}  ({format_size(artifact_bytes)})")
    written = sum(tally.sizes.values())
    lines.append(f"  trainer wrote      {format_size(written)} of checkpoints")
    kept = sorted(p.name for p in work_dir.glob("epoch_*.pth"))
    lines.append(f"  left on disk       {format_size(remaining)} ({', '.join(kept)}) + artifact")
    if written:
        saved = 1 - (remaining + artifact_bytes) / written
        lines.append(f"  space saved        {saved:.0%}")
    return "\n".join(lines)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_requirements() -> str | None:
    """Install advice when the trainer's modules are missing, else None.

    Looked up, not imported: the daemon half of the demo runs in this process and, like the
    real daemon, has no use for torch's 1.4 s import.
    """
    missing = [m for m in TRAINER_MODULES if not _importable(m)]
    return INSTALL_ADVICE.format(missing=" and ".join(missing)) if missing else None


def run_demo(keep: bool = False, epochs: int = 12, delay: float = 1.2) -> int:
    root = Path(tempfile.mkdtemp(prefix="ckptd-demo-"))
    work_dir = root / "work_dirs" / "faster-rcnn_r50_fpn_1x_coco"
    work_dir.mkdir(parents=True)
    (root / "ckptd.yaml").write_text(DEMO_CONFIG)
    print(f"ckptd demo in {root}: a simulated MMEngine training writes {epochs} epochs;")
    print("ckptd keeps the 2 newest, slims each new best, and explains every delete.\n")
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ckptd.simulate",
            str(work_dir),
            "--epochs",
            str(epochs),
            "--delay",
            str(delay),
            "--param-count",
            "2000000",
            "--optimizer",
            "adamw",
            "--rewrite-after-best",
            "--metric-values",
            METRIC,
        ],
        stdout=subprocess.DEVNULL,
    )
    tally = DemoTally()
    daemon = Daemon(load_config(root / "ckptd.yaml"), on_report=tally.add)
    started = time.monotonic()

    def stop_when_trainer_is_done() -> None:
        trainer.wait()
        time.sleep(2.5)  # one settle period for the last checkpoint, then a final pass
        daemon.request_stop()

    threading.Thread(target=stop_when_trainer_is_done, daemon=True).start()
    daemon.install_signal_handlers()
    use_compact_logging()
    try:
        daemon.run()
    finally:
        if trainer.poll() is None:
            trainer.terminate()
            trainer.wait()
    logging.getLogger("ckptd").handlers[0].flush()
    print(_summary(tally, work_dir, time.monotonic() - started))
    if trainer.returncode not in (0, None, -15):
        print(f"the simulated trainer failed with exit code {trainer.returncode}")
        return 1
    if keep:
        print(f"\nkept {root} for inspection: ckptd status -c {root / 'ckptd.yaml'}")
    else:
        shutil.rmtree(root, ignore_errors=True)
        print(f"\nremoved {root} (use --keep to inspect it)")
    return 0
