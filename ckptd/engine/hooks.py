"""``hooks.on_new_best``: a command run once per new best, after its artifact and manifest are
durable (and, in ``ckptd once``, after ``artifact.publish``: ``CKPTD_PUBLISHED_URL`` is set only
when the remote copy is known to be in place).

No shell: the configured argv is executed as is, with the ``CKPTD_*`` values in its
environment. It runs in its own session, so at ``hooks.timeout`` the whole process group is
killed; its output (stdout and stderr together) is kept up to ``MAX_OUTPUT`` bytes. A hook
never raises into a pass: every failure is a ``HookResult``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ckptd.core.units import format_duration
from ckptd.engine.outcome import ArtifactStatus, WorkDirReport

HOOK = "on_new_best"
MAX_OUTPUT = 4096  # bytes of a hook's output kept for the log
PUBLISHED = ("published", "in sync")


@dataclass(frozen=True, slots=True)
class HookRun:
    project: str
    work_dir: Path
    hook: str
    argv: tuple[str, ...]
    env: dict[str, str]  # the CKPTD_* values only; the rest is ckptd's environment
    timeout: float


@dataclass(frozen=True, slots=True)
class HookResult:
    run: HookRun
    ok: bool
    detail: str  # "exit 0 in 0.1 s", "killed after 30s", "not found on PATH", ...
    output: str = ""
    timed_out: bool = False


def new_best_hooks(report: WorkDirReport) -> list[HookRun]:
    """One run per artifact this pass wrote (a new best), none for passes that only found the
    artifact current."""
    hooks = report.target.project.hooks
    if not hooks.on_new_best:
        return []
    url = ""
    if report.publish is not None and report.publish.status in PUBLISHED:
        url = report.publish.url
    runs = []
    for artifact in report.artifacts:
        if artifact.status is not ArtifactStatus.WRITTEN:
            continue
        env = {
            "CKPTD_PROJECT": report.target.project.name,
            "CKPTD_WORK_DIR": str(report.target.work_dir),
            "CKPTD_METRIC": artifact.key,
            "CKPTD_VALUE": repr(float(artifact.best.value)),
            "CKPTD_RULE": artifact.best.rule,
            "CKPTD_INDEX": str(artifact.best.index),
            "CKPTD_ARTIFACT": str(artifact.path),
            "CKPTD_SHA256": artifact.entry.sha256 if artifact.entry else "",
        }
        if url:
            env["CKPTD_PUBLISHED_URL"] = url
        runs.append(
            HookRun(
                report.target.project.name,
                report.target.work_dir,
                HOOK,
                tuple(hooks.on_new_best),
                env,
                hooks.timeout,
            )
        )
    return runs


def _executable(run: HookRun) -> str | None:
    name = run.argv[0]
    if "/" in name:
        return name if os.access(name, os.X_OK) and os.path.isfile(name) else None
    return shutil.which(name)


def run_hook(run: HookRun) -> HookResult:
    key = f"project {run.project!r}: hooks.{run.hook}[0]"
    executable = _executable(run)
    if executable is None:
        where = "is not an executable file" if "/" in run.argv[0] else "is not found on PATH"
        return HookResult(run, False, f"{key}: {run.argv[0]!r} {where}")
    started = time.monotonic()
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                [executable, *run.argv[1:]],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **run.env},
                cwd=run.work_dir,
                start_new_session=True,  # its own process group, killed as a whole
            )
        except OSError as exc:
            return HookResult(run, False, f"{key}: cannot start {executable}: {exc.strerror}")
        timed_out = False
        try:
            code = proc.wait(timeout=run.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):  # it ended just now
                os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        out.seek(0)
        data = out.read(MAX_OUTPUT + 1)
    output = data[:MAX_OUTPUT].decode("utf-8", "replace")
    if len(data) > MAX_OUTPUT:
        output += " [... cut]"
    seconds = time.monotonic() - started
    if timed_out:
        detail = f"{key}: killed after hooks.timeout {format_duration(run.timeout)}"
    elif code != 0:
        detail = f"{key}: {run.argv[0]} exited with {code} after {seconds:.1f} s"
    else:
        detail = f"{run.argv[0]} exited with 0 after {seconds:.1f} s"
    return HookResult(run, code == 0 and not timed_out, detail, output, timed_out)


def log_result(result: HookResult, log: logging.Logger) -> None:
    """The hook's outcome and its (bounded) output in ckptd's log."""
    fields = {
        "work_dir": str(result.run.work_dir),
        "project": result.run.project,
        "hook": result.run.hook,
        "output": result.output,
    }
    text = f"hook {result.run.hook}: {result.detail}"
    if result.output.strip():
        text += f"; output: {result.output.strip()}"
    if result.ok:
        log.info(text, extra={"fields": fields})
    else:
        log.warning(f"{text}; retention goes on regardless", extra={"fields": fields})
