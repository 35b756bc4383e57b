"""The sidecar reality test: trainer and ckptd in separate mount namespaces and as separate users.

One volume, mounted at a different path in each namespace (as a Kubernetes sidecar or a compose
service would see it), so the absolute path MMEngine writes into ``last_checkpoint`` does not
exist in ckptd's view. The trainer runs as its own uid with umask 002 in group ``training``;
ckptd runs as another uid that can delete the trainer's files only through that shared group.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.daemon_proc import DaemonProcess, actions
from tests.helpers import (
    REPO,
    assert_same_state_dict,
    checkpoints,
    load_full,
    load_weights_only,
    python_for_uid,
    write_config,
)

pytestmark = pytest.mark.root
TRAINING_GID, TRAINER_UID, CKPTD_UID = 61200, 61201, 61202
HARNESS = REPO / "tests" / "trainers" / "mmengine_real.py"


def in_namespace(
    volume: Path, view: Path, uid: int, argv: list[str], umask: str = "0002"
) -> list[str]:
    """Run ``argv`` in a private mount namespace where ``volume`` appears at ``view``."""
    inner = (
        f"mount --bind {shlex.quote(str(volume))} {shlex.quote(str(view))} && umask {umask} && "
        f"exec setpriv --reuid={uid} --regid={TRAINING_GID} --clear-groups " + shlex.join(argv)
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner]


def require_namespaces() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: mount namespaces and running as other uids")
    if not (shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("needs unshare and setpriv (util-linux)")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --mount is not permitted here: {probe.stderr.decode().strip()}")


@pytest.mark.trainer
def test_sidecar_in_its_own_mount_namespace_as_another_user() -> None:
    require_namespaces()
    python, env = python_for_uid(
        CKPTD_UID, TRAINING_GID, modules=("ckptd.cli.commands", "mmengine")
    )
    base = Path(tempfile.mkdtemp(prefix="ckptd-sidecar-"))
    try:
        base.chmod(0o755)
        volume, trainer_view, ckptd_view, home = (base / n for n in ("volume", "t", "c", "home"))
        for folder in (volume, trainer_view, ckptd_view, home):
            folder.mkdir()
        home.chmod(0o777)  # MMEngine and torch may write caches under $HOME
        os.chown(volume, 0, TRAINING_GID)
        volume.chmod(0o2775)  # the volume root: group `training`, setgid, group-writable
        env = {**env, "HOME": str(home)}
        config = write_config(base, watch={"settle": "1s"})
        config.write_text(config.read_text().replace("./work_dirs/*", f"{ckptd_view}/work_dirs/*"))

        def as_ckptd(argv: list[str]) -> list[str]:
            return in_namespace(volume, ckptd_view, CKPTD_UID, [python, *argv[1:]])

        with DaemonProcess(config, env=env, wrap=as_ckptd) as daemon:
            daemon.wait_ready()
            trainer = subprocess.run(
                in_namespace(
                    volume,
                    trainer_view,
                    TRAINER_UID,
                    [
                        python,
                        str(HARNESS),
                        str(trainer_view / "work_dirs" / "run"),
                        "--epochs",
                        "6",
                        "--epoch-seconds",
                        "0.5",
                        "--save-best",
                        "auto",
                    ],
                ),
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert trainer.returncode == 0, trainer.stderr[-3000:]
            run = volume / "work_dirs" / "run"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and checkpoints(run) != [
                "epoch_5.pth",
                "epoch_6.pth",
            ]:
                time.sleep(0.1)
            records = daemon.records()
            assert daemon.stop() == 0
        assert checkpoints(run) == ["epoch_5.pth", "epoch_6.pth"], daemon.text()

        pointer = (run / "last_checkpoint").read_text()
        assert pointer.startswith(str(trainer_view)) and not os.path.exists(pointer)
        assert any("matched epoch_6.pth by file name" in r.get("message", "") for r in records)
        deleted = {r["checkpoint"] for r in actions(records, "delete")}
        assert deleted == {f"epoch_{i}.pth" for i in range(1, 5)}
        assert (run / "epoch_6.pth").stat().st_uid == TRAINER_UID  # the trainer's files ...
        artifact = run / "best" / "best_coco_bbox_mAP_epoch_4.pth"
        assert artifact.stat().st_uid == CKPTD_UID  # ... deleted by another user via the group
        (their_best,) = run.glob("best_*.pth")
        assert_same_state_dict(
            load_weights_only(artifact)["state_dict"], load_full(their_best)["state_dict"]
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
