"""Fixtures of the trainer tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def deepspeed_saves(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT/zero{1,2,3}/ (``global_step2/``, ``4/``, ``6/``, ``latest``) and the trainer-shaped
    OUT/mmengine/, OUT/lightning/ and OUT/hf/ save_dirs, all written by real DeepSpeed engines
    (``deepspeed_real.py`` under torchrun, 2 ranks on CPU) in one run of about 20 s."""
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", str(HERE / "deepspeed_real.py"), str(out)]
    cmd += ["--saves", "3", "--layouts", "plain,mmengine,lightning,hf"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out
