"""Hostile checkpoints end to end (invariant 4): pickle payloads built from every code-running
opcode, placed in every part of the best checkpoint, go through ``ckptd status``, ``ckptd once
--dry-run``, ``ckptd run``, ``ckptd once`` and ``ckptd slim`` as real processes. No code runs
(no marker file ever appears); a payload in a kept key (``meta``, ``state_dict`` and its
``_metadata``, or the pickle's root) fails the slim with a message naming the key and the
global, and nothing is deleted in that work_dir; one in a dropped key never reaches the artifact.

The slimmer's own tests (tests/integration/test_slim.py, tests/unit/test_safepickle.py) cover
the opcode handling; this file checks the whole path, with the daemon and the CLI around it.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.daemon_proc import DaemonProcess
from tests.faults.figures import report
from tests.faults.hostile import KEPT, PLACES, hostile_checkpoint, payloads
from tests.faults.invariants import artifact_problems, read_manifest, temp_files
from tests.faults.trainer import CHECKPOINT, record, replay_now
from tests.helpers import REPO, write_config

ALL_FOUR = ["epoch_1.pth", "epoch_2.pth", "epoch_3.pth", "epoch_4.pth"]
WHERE = (*PLACES, "root")  # root: data.pkl is the payload itself, not a dict
REFUSED = (
    "os.system",
    "posix.system",
    "argparse.Namespace",
    "subprocess.Popen",
    "builtins.getattr",
    "ckptd_fault_nowhere.UnknownThing",
)


def _root_payload(source: Path, target: Path, body: bytes) -> None:
    with zipfile.ZipFile(source) as archive:
        records = [(i.filename, archive.read(i)) for i in archive.infolist()]
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records:
            archive.writestr(name, b"\x80\x02" + body + b"." if name.endswith("data.pkl") else data)


def ckptd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptd", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def checkpoints(work_dir: Path) -> list[str]:
    return sorted(p.name for p in work_dir.iterdir() if CHECKPOINT.fullmatch(p.name))


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[str, str]]]:
    """One work_dir per (place, payload): epochs 1-4, the best (epoch 4) made hostile."""
    root = tmp_path_factory.mktemp("hostile")
    template = root / "template"
    template.mkdir()
    replay_now(record(), template, upto_epoch=4)
    found: dict[str, tuple[str, str]] = {}
    markers = root / "markers"
    markers.mkdir()
    for where in WHERE:
        for kind, body in payloads(markers / "x").items():
            name = f"c{len(found):02d}"
            found[name] = (where, kind)
            work_dir = root / "work_dirs" / name
            work_dir.mkdir(parents=True)
            replay_now(record(), work_dir, upto_epoch=4)
            body = payloads(markers / name)[kind]
            best = work_dir / "epoch_4.pth"
            if where == "root":
                _root_payload(template / "epoch_4.pth", best, body)
            else:
                hostile_checkpoint(template / "epoch_4.pth", best, where, body)
    write_config(root, watch={"settle": "0s", "mode": "inotify"})
    return root, found


def test_no_code_runs_and_kept_payloads_fail_clearly(
    cases: tuple[Path, dict[str, tuple[str, str]]], capsys: pytest.CaptureFixture[str]
) -> None:
    root, found = cases
    config = str(root / "ckptd.yaml")
    markers = root / "markers"
    tally: collections.Counter[str] = collections.Counter()

    status = ckptd("status", "-c", config)
    dry = ckptd("once", "--dry-run", "-c", config)
    for result in (status, dry):
        assert result.returncode in (0, 1), result.stderr
        assert "Traceback" not in result.stderr
    assert all(len(checkpoints(root / "work_dirs" / n)) == 4 for n in found)
    tally["ckptd status + once --dry-run"] += 2 * len(found)

    with DaemonProcess(Path(config)) as daemon:
        daemon.wait_ready(120)
    crashed = [r for r in daemon.records() if "Traceback" in r.get("exception", r["message"])]
    assert not crashed, crashed
    tally["ckptd run (passes)"] += len(found)
    once = ckptd("once", "-c", config)
    assert "Traceback" not in once.stderr
    tally["ckptd once"] += len(found)

    problems = []
    for name, (where, kind) in found.items():
        work_dir = root / "work_dirs" / name
        best_dir = work_dir / "best"
        manifest = read_manifest(best_dir)
        refused = where in (*KEPT, "root")
        if refused:
            if checkpoints(work_dir) != [
                "epoch_1.pth",
                "epoch_2.pth",
                "epoch_3.pth",
                "epoch_4.pth",
            ]:
                problems.append(f"{name} {where}/{kind}: deleted {checkpoints(work_dir)}")
            if manifest is not None:
                problems.append(f"{name} {where}/{kind}: an artifact was published")
            message = [line for line in once.stdout.splitlines() if f"{name}/epoch_4.pth" in line]
            text = " ".join(message)
            key = "state_dict" if where.startswith("state_dict") else where
            if where == "root":
                ok = "not a dict of keys" in text
            else:
                ok = f"key {key!r}" in text and any(g in text for g in REFUSED)
                ok = ok and "weights_only=True" in text and "keep_keys" in text
            if not ok:
                problems.append(f"{name} {where}/{kind}: unclear message {message}")
        else:
            if checkpoints(work_dir) != ["epoch_3.pth", "epoch_4.pth"]:
                problems.append(f"{name} {where}/{kind}: kept {checkpoints(work_dir)}")
            if manifest is None:
                problems.append(f"{name} {where}/{kind}: no artifact")
            problems += [f"{name}: {p}" for p in artifact_problems(best_dir)]
        problems += [f"{name}: left {p}" for p in temp_files(work_dir)]

    def slim(name: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        out = root / "slim" / name
        out.mkdir(parents=True)
        return name, ckptd("slim", str(root / "work_dirs" / name / "epoch_4.pth"), "-o", str(out))

    with ThreadPoolExecutor(4) as pool:
        for name, result in pool.map(slim, found):
            where, kind = found[name]
            tally["ckptd slim"] += 1
            refused = where in (*KEPT, "root")
            if "Traceback" in result.stderr or result.returncode != (1 if refused else 0):
                problems.append(f"slim {name} {where}/{kind}: {result.returncode} {result.stderr}")
            if refused and "epoch_4.pth" not in result.stderr:
                problems.append(f"slim {name}: the message does not name the file")
            if not refused:
                problems += [f"slim {name}: {p}" for p in artifact_problems(root / "slim" / name)]

    ran = sorted(p.name for p in markers.iterdir())
    assert not ran, f"pickled code ran for {[found[n] for n in ran]}"
    assert not problems, "\n".join(problems)
    report(
        capsys,
        "hostile checkpoints end to end",
        payload_kinds=len(payloads(markers)),
        places=len(WHERE),
        cases=len(found),
        refused_cases=sum(w in (*KEPT, "root") for w, _ in found.values()),
        command_runs=sum(tally.values()),
        code_executed="never",
    )


def test_hostile_older_checkpoints_are_deleted_unread(tmp_path: Path) -> None:
    """Payloads in checkpoints that are not the best are never unpickled, only deleted."""
    work_dir = tmp_path / "work_dirs" / "run"
    work_dir.mkdir(parents=True)
    replay_now(record(), work_dir, upto_epoch=4)
    marker = tmp_path / "marker"
    for n, where in ((1, "meta"), (2, "state_dict")):
        path = work_dir / f"epoch_{n}.pth"
        staged = tmp_path / path.name
        hostile_checkpoint(path, staged, where, payloads(marker)["GLOBAL+REDUCE"])
        os.replace(staged, path)
    write_config(tmp_path)
    result = ckptd("once", "-c", str(tmp_path / "ckptd.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert checkpoints(work_dir) == ["epoch_3.pth", "epoch_4.pth"]
    assert not marker.exists()
