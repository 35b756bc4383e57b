"""Fixtures every group of tests shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import simulate, write_config

# rises and falls; strict maximum at epoch 4 (0.5), a later tie at epoch 6 must not win
VALUES = [0.3, 0.45, 0.4, 0.5, 0.48, 0.5]


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A finished 6-epoch simulated MMEngine run (``VALUES``) in ``tmp_path/work_dirs/``, with
    a config for it at ``tmp_path/ckptd.yaml``. Layout tests override it with their own."""
    work_dir = simulate(tmp_path / "work_dirs" / "retinanet", epochs=6, metric_values=VALUES)
    write_config(tmp_path)
    return work_dir
