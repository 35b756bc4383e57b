"""`make demo` keeps working: the demo runs a trainer and the daemon and summarises."""

from __future__ import annotations

import re

from tests.helpers import cli_process


def test_demo_runs_and_summarises() -> None:
    result = cli_process("demo", "--epochs", "5", "--delay", "0.5", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "== ckptd demo summary" in out
    assert re.search(r"epochs seen\s+5", out)
    assert re.search(r"best\s+coco/bbox_mAP = 0.34 at epoch 5", out)
    assert "left on disk" in out and "(epoch_4.pth, epoch_5.pth)" in out
    assert "delete: epoch_1.pth" in result.stderr
    assert "removed /tmp/ckptd-demo-" in out
