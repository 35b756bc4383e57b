"""torch and numpy are optional: only ``ckptd demo``'s simulated trainer (and the tests) use them.

The child processes here start with torch and numpy made unimportable by
``tests/blocked_imports/sitecustomize.py``, which also records every attempt to import them: a
daemon path that imports them, even one that catches the ImportError, fails the test. The
work_dir is written beforehand, in this process and with torch, by the simulated trainer.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from ckptd.demo.run import INSTALL_ADVICE
from tests.daemon_proc import DaemonProcess, actions
from tests.helpers import CKPTD, REPO, checkpoints, simulate, write_config

HOOK = REPO / "tests" / "blocked_imports"
OPTIONAL = "torch,numpy"
# Epoch 2 is the best of the first launch, epoch 6 of the resumed one.
MAP = (0.3, 0.5, 0.4, 0.45, 0.2, 0.6)
# Every ckptd module, for its module-level imports: but the demo trainer, and __main__ (it runs).
# By last name, so that the modules may move into packages.
IMPORT_ALL = """
import importlib, pkgutil, ckptd
for m in pkgutil.walk_packages(ckptd.__path__, "ckptd."):
    if m.name.rpartition(".")[2] not in ("simulate", "__main__"):
        importlib.import_module(m.name)
"""


def blocked_env(tmp_path: Path, blocked: str = OPTIONAL) -> tuple[dict[str, str], Path]:
    """Environment for a child process without ``blocked``; the file its attempts go to."""
    log = tmp_path / "blocked-imports.log"
    path = [str(HOOK), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        "CKPTD_TEST_BLOCK": blocked,
        "CKPTD_TEST_BLOCK_LOG": str(log),
    }
    return env, log


def attempts(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def run(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_hook_blocks_and_records(tmp_path: Path) -> None:
    env, log = blocked_env(tmp_path)
    result = run(env, sys.executable, "-c", "import numpy")
    assert result.returncode == 1 and "blocked by the test" in result.stderr, result.stderr
    assert attempts(log) == ["numpy"]


@pytest.mark.parametrize("blocked", ["torch,numpy", "torch", "numpy"])
def test_demo_without_torch_exits_2_saying_what_to_install(tmp_path: Path, blocked: str) -> None:
    env, _ = blocked_env(tmp_path, blocked)
    env["TMPDIR"] = str(tmp_path)
    result = run(env, *CKPTD, "demo", "--epochs", "2")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    missing = " and ".join(blocked.split(","))
    assert result.stderr == INSTALL_ADVICE.format(missing=missing) + "\n"
    # The CPU index comes first, so that resolving ckptd[demo]'s torch pulls no CUDA build.
    cpu = result.stderr.index("--index-url https://download.pytorch.org/whl/cpu")
    assert cpu < result.stderr.index("pip install 'ckptd[demo]'")
    assert not list(tmp_path.glob("ckptd-demo-*")), "refused before making its temp folder"


def test_demo_advice_pins_the_torch_the_makefile_installs() -> None:
    pinned = re.search(r"^TORCH\s*\?=\s*(\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert pinned, "Makefile: no TORCH ?= line"
    assert f"pip install {pinned.group(1)} --index-url" in INSTALL_ADVICE


def test_daemon_paths_never_import_torch_or_numpy(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    work_dir = simulate(root / "work_dirs" / "run", epochs=4, metric_values=MAP)
    config = str(write_config(root, retention={"keep_last": 1}))
    env, log = blocked_env(tmp_path)

    for argv in (
        ["check", "-c", config],
        ["once", "-c", config, "--dry-run"],
        ["slim", str(work_dir / "epoch_3.pth"), "-o", str(tmp_path / "slim.pth")],
        ["once", "-c", config],
        ["status", "-c", config],
    ):
        result = run(env, *CKPTD, *argv)
        assert result.returncode == 0, f"ckptd {argv[0]}:\n{result.stdout}{result.stderr}"
    assert checkpoints(work_dir) == ["epoch_4.pth"]
    assert [p.name for p in (work_dir / "best").glob("*.pth")] == ["best_coco_bbox_mAP_epoch_2.pth"]
    assert (tmp_path / "slim.pth").stat().st_size > 0

    # The service, with its watcher and metrics server, while the trainer resumes.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{probe.getsockname()[1]}"
    with DaemonProcess(Path(config), "--metrics-addr", addr, env=env) as daemon:
        daemon.wait_ready()
        simulate(work_dir, epochs=6, metric_values=MAP, resume=True, timestamp="20990101_000000")
        daemon.wait_for(lambda r: r.get("action") == "delete" and "epoch_5" in str(r), 60)
        for page in ("healthz", "metrics"):
            assert urllib.request.urlopen(f"http://{addr}/{page}", timeout=5).status == 200
        assert daemon.stop() == 0
    assert not actions(daemon.records(), "error")
    assert checkpoints(work_dir) == ["epoch_6.pth"]
    assert (work_dir / "best" / "best_coco_bbox_mAP_epoch_6.pth").is_file()

    result = run(env, sys.executable, "-c", IMPORT_ALL)
    assert result.returncode == 0, result.stderr
    assert attempts(log) == [], "the daemon imported what `pip install ckptd` does not install"
