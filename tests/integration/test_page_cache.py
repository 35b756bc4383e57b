"""A slim leaves none of its artifact's pages in the page cache (``DROP_ARTIFACT_PAGES``).

The oracle is util-linux's ``fincore`` (``mincore(2)`` over the file), not ckptd's code. The
artifact is bigger than ``copyhash.COPY_CHUNK`` so the pages dropped behind the read-back are
exercised as well as the final drop after the fsync.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import ckptd.slim.source as source_module
from ckptd.slim import copyhash
from ckptd.slim.slimmer import slim_checkpoint

pytestmark = pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore")


def resident(path: Path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "epoch_3.pth"
    weights = {f"layer{i}.weight": torch.randn(1 << 20) for i in range(12)}  # 48 MiB
    torch.save({"meta": {"epoch": 3}, "state_dict": weights, "optimizer": {"lr": 0.1}}, path)
    return path


@pytest.mark.parametrize("drop", [True, False])
def test_artifact_pages_leave_the_page_cache(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drop: bool
) -> None:
    monkeypatch.setattr(source_module, "DROP_ARTIFACT_PAGES", drop)
    written = slim_checkpoint(checkpoint, tmp_path, "best.pth")
    assert written.size > 2 * copyhash.COPY_CHUNK
    cached = resident(written.path)
    if drop:
        assert cached <= written.size // 100, f"{cached} of {written.size} bytes still cached"
    elif cached < written.size // 2:
        pytest.skip(f"{tmp_path} does not keep written pages cached (tmpfs-like?)")
    loaded = torch.load(written.path, weights_only=True)  # dropped pages read back from disk
    assert torch.equal(
        loaded["state_dict"]["layer7.weight"], torch.load(checkpoint)["state_dict"]["layer7.weight"]
    )
