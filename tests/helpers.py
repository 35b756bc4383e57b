"""Shared test helpers: configs, running the CLI, simulated work_dirs, reading artifacts."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CKPTD = [sys.executable, "-m", "ckptd"]


def write_config(root: Path, *, watch: dict[str, Any] | None = None, **project: Any) -> Path:
    """A config with one project over ``root/work_dirs/*``; keyword args override its keys."""
    body: dict[str, Any] = {"name": "test", "work_dirs": ["./work_dirs/*"]}
    for key, value in project.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key].update(value)
        else:
            body[key] = value
    config = {"projects": [body], "watch": {"settle": "0s", **(watch or {})}}
    root.mkdir(parents=True, exist_ok=True)
    path = root / "ckptd.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str) -> tuple[int, str, str]:
    """Run ``ckptd`` in-process; (exit code, stdout, stderr)."""
    from ckptd.cli.commands import main

    argv = list(args)
    # In-process, ``once`` and ``run`` would lower the test process's own nice and I/O class for
    # the rest of the session (and every child it starts); tests/integration/test_priority.py
    # checks the priority in child processes.
    command = next((i for i, a in enumerate(argv) if a in ("once", "run")), None)
    if command is not None and "--keep-priority" not in argv:
        argv.insert(command + 1, "--keep-priority")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def cli_process(
    *args: str, timeout: float = 120, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CKPTD, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, **kwargs
    )


def _run_trainer(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def run_harness(harness: Path, out: Path, *args: str) -> dict[str, Any]:
    """Run a real-trainer harness (``tests/trainers/*_real.py``) into ``out``; its result JSON."""
    result_file = out.parent / f"{out.name}-result.json"
    _run_trainer([sys.executable, str(harness), str(out), "--result", str(result_file), *args])
    return json.loads(result_file.read_text())


def run_harness_batch(harness: Path, runs: list[tuple[Path, list[str]]]) -> list[dict[str, Any]]:
    """Several runs of a harness that takes ``--batch`` (one process, one import of the
    framework), in order; each run's result JSON."""
    if not runs:
        return []
    results = [out.parent / f"{out.name}-result.json" for out, _ in runs]
    batch = [
        [str(out), "--result", str(result), *args]
        for (out, args), result in zip(runs, results, strict=True)
    ]
    batch_file = runs[0][0].parent / f"{runs[0][0].name}-batch.json"
    batch_file.parent.mkdir(parents=True, exist_ok=True)
    batch_file.write_text(json.dumps(batch))
    _run_trainer([sys.executable, str(harness), "--batch", str(batch_file)])
    return [json.loads(r.read_text()) for r in results]


def once_ok(root: Path, **project: Any) -> str:
    """Write a config for ``root/work_dirs/*`` and run ``ckptd once``, which must succeed."""
    write_config(root, **project)
    code, out, err = cli("once", "-c", str(root / "ckptd.yaml"))
    assert code == 0, out + err
    return out


def simulate(work_dir: Path, **config: Any) -> Path:
    from ckptd.demo.simulate import SimConfig, SimulatedTrainer

    SimulatedTrainer(work_dir, SimConfig(**config)).run()
    return work_dir


def checkpoints(work_dir: Path) -> list[str]:
    return sorted(
        (p.name for p in work_dir.glob("*_*.pth") if not p.name.startswith("best_")),
        key=lambda n: int(n.rsplit("_", 1)[1].split(".")[0]),
    )


def manifest(artifact_dir: Path) -> dict[str, Any]:
    return json.loads((artifact_dir / "manifest.json").read_text())


def load_weights_only(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, weights_only=True, map_location="cpu")


def load_full(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, weights_only=False, map_location="cpu")


def assert_same_state_dict(a: dict[str, Any], b: dict[str, Any]) -> None:
    import torch

    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def inventory(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (not following symlinks) -> (size, mtime_ns)."""
    found = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            found[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return found


def python_for_uid(
    uid: int, gid: int, modules: tuple[str, ...] = ("ckptd.cli.commands",)
) -> tuple[str, dict[str, str]]:
    """An interpreter that another uid can run with this venv's packages and this checkout
    (a pyenv Python under /root is out of its reach: then the system's python3.X)."""
    import contextlib
    import sysconfig

    import pytest

    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], str(REPO)}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sorted(paths)))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    probe = "import " + ", ".join(modules)
    for python in (sys.executable, f"/usr/bin/python{version}"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            ok = subprocess.run(
                [python, "-c", probe], user=uid, group=gid, extra_groups=[], env=env, cwd="/",
                capture_output=True, timeout=120,
            )  # fmt: skip
            if ok.returncode == 0:
                return python, env
    pytest.skip(f"no Python {version} here that uid {uid} may run with the venv's packages")
