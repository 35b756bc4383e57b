"""Bad input, fuzzed (hypothesis): scalars.json lines, checkpoint bytes and configs.

Every input goes through a real reconcile pass (the code ``ckptd once`` and ``ckptd run`` run)
on a work_dir of real checkpoints, and is judged by an oracle written apart from ckptd
(``tests.faults.invariants.protected`` over this file's own reading of the metric log):

* ckptd never raises; each malformed line is reported with its file and line number;
* when anything is reported as an error, nothing is deleted;
* whatever is deleted is unprotected by the oracle (newest, resume target, pending evaluation,
  best without an artifact), so nothing is ever deleted *because of* a bad input;
* a corrupted best checkpoint yields either an artifact identical to the original's kept keys
  (corruption outside them) or an error naming the file, never a partial or corrupt artifact.

``CKPTD_FUZZ_EXAMPLES`` scales the number of examples per property (default 250).
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptd.core.config import ConfigError, load_config
from ckptd.engine.outcome import PassOptions
from ckptd.engine.reconcile import reconcile
from ckptd.engine.targets import Target
from ckptd.present.report import format_report, report_json
from tests.faults.figures import env_number, report
from tests.faults.hostile import hostile_checkpoint, payloads
from tests.faults.invariants import (
    TrainerView,
    artifact_problems,
    protected,
    read_manifest,
    temp_files,
)
from tests.faults.trainer import CHECKPOINT, Op, record, replay_now
from tests.helpers import write_config

EXAMPLES = int(env_number("CKPTD_FUZZ_EXAMPLES", 250))
METRIC = "coco/bbox_mAP"
LAUNCHES = ("20240101_000000", "20240102_000000")  # a second launch = a resumed run
SETTLED = 1_700_000_000  # an mtime long past any settle or "stuck being written" limit
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- a template work_dir, copied per example by hard links (ckptd only ever unlinks) --------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work_dir = tmp_path_factory.mktemp("template") / "run"
    work_dir.mkdir()
    replay_now(record(), work_dir, upto_epoch=4)  # epoch_1..4.pth, best so far epoch 4
    return work_dir


class Bench:
    """Fresh work_dirs from the template and one reconcile pass over each."""

    def __init__(self, root: Path, template: Path, **config: Any) -> None:
        self.root = root
        self.template = template
        self.project = load_config(write_config(root, **config)).config.projects[0]
        self.count = 0

    def work_dir(self, scalars: dict[str, bytes] | None = None) -> Path:
        self.count += 1
        work_dir = self.root / "work_dirs" / f"w{self.count}"
        work_dir.mkdir(parents=True)
        for entry in self.template.iterdir():
            if CHECKPOINT.fullmatch(entry.name):
                os.link(entry, work_dir / entry.name)
        shutil.copy(self.template / "last_checkpoint", work_dir / "last_checkpoint")
        if scalars is None:
            shutil.copytree(self.template / LAUNCHES[0], work_dir / LAUNCHES[0])
        for launch, data in (scalars or {}).items():
            (work_dir / launch / "vis_data").mkdir(parents=True)
            (work_dir / launch / "vis_data" / "scalars.json").write_bytes(data)
        return work_dir

    def reconcile(self, work_dir: Path, project: Any = None) -> Any:
        target = Target(work_dir, project or self.project, self.root)
        result = reconcile(target, PassOptions(settle=0))
        format_report(result)  # what `ckptd once` prints must not fail either
        json.dumps(report_json(result), allow_nan=False)
        return result

    def done(self, work_dir: Path) -> None:
        shutil.rmtree(work_dir, ignore_errors=True)


def checkpoints(work_dir: Path) -> set[str]:
    return {p.name for p in work_dir.iterdir() if CHECKPOINT.fullmatch(p.name)}


def _number(value: Any) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


class Oracle:
    """This file's own reading of MMEngine metric logs (see docs/DESIGN.md: val lines have no
    epoch/iter key and their step is the epoch) and what it says must be reported/kept."""

    TRAIN = (b'"epoch": ', b'"iter": ')

    def __init__(self) -> None:
        self.view = TrainerView(present={f"epoch_{i}.pth": i for i in range(1, 5)})
        self.view.resume = "epoch_4.pth"
        self.bad: list[str] = []  # "rel:line" that must be reported
        self.records: list[tuple[int, bool, str]] = []  # (step, has the metric, where)

    @property
    def must_report(self) -> list[str]:
        # a record without the metric counts only if a resume did not supersede it
        return self.bad + [where for _, has, where in self.records if not has]

    def read(self, rel: str, data: bytes) -> None:
        lines = data.split(b"\n")[:-1]  # a last line without newline is not complete yet
        for number, raw in enumerate(lines, 1):
            raw = raw.rstrip(b"\r")
            where = f"{rel}:{number}"
            if any(marker in raw for marker in self.TRAIN):
                continue
            try:
                record = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                self.bad.append(where)
                continue
            if not isinstance(record, dict):
                self.bad.append(where)
                continue
            if "epoch" in record or "iter" in record:
                continue
            step = record.get("step")
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                self.bad.append(where)
                continue
            metrics = {
                k: _number(v)
                for k, v in record.items()
                if k not in ("step", "data_time", "time")
                and isinstance(v, int | float)
                and not isinstance(v, bool)
            }
            while self.records and self.records[-1][0] >= step:  # a resumed run repeats
                self.records.pop()
            self.records.append((step, METRIC in metrics, where))
            self.view.apply(Op("append", rel, val=(step, metrics)))

    def check(self, bench: Bench, work_dir: Path, result: Any, before: set[str]) -> list[str]:
        problems = []
        text = "\n".join(result.errors)
        for where in self.must_report:
            if f"{where}:" not in text:
                problems.append(f"{where} is malformed but was not reported")
        deleted = before - checkpoints(work_dir)
        if deleted and result.errors:
            problems.append(f"deleted {sorted(deleted)} although errors were reported")
        manifest = read_manifest(work_dir / "best") or {"artifacts": {}}
        ready = [e["index"] for e in manifest["artifacts"].values()]
        guarded = protected(self.view, METRIC, "greater", ready)
        for name in sorted(deleted & set(guarded)):
            problems.append(f"deleted {name}, protected ({guarded[name]})")
        problems += artifact_problems(work_dir / "best")
        problems += [f"left behind: {p}" for p in temp_files(work_dir)]
        return problems


def recorded_log_oracle(template: Path) -> Oracle:
    oracle = Oracle()
    rel = f"{LAUNCHES[0]}/vis_data/scalars.json"
    oracle.read(rel, (template / rel).read_bytes())
    return oracle


# --- 1. scalars.json lines ---------------------------------------------------------------

finite = st.floats(min_value=0, max_value=1, allow_nan=False)
odd_number = st.one_of(
    st.just(math.nan),
    st.just(math.inf),
    st.just(-math.inf),
    st.floats(),
    st.integers(min_value=-(10**400), max_value=10**400),
)
odd_value = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    odd_number,
)


@st.composite
def val_record(draw: st.DrawFn, step: int, clean: bool) -> dict[str, Any]:
    value = draw(st.one_of(finite, finite, odd_number))
    record: dict[str, Any] = {METRIC: value, "coco/bbox_mAP_50": 0.6, "data_time": 0.01}
    record |= {"time": 0.1, "step": step}
    if not clean and draw(st.integers(0, 4)) == 0:  # wrong types, missing keys
        key = draw(st.sampled_from([METRIC, "step", "time"]))
        if draw(st.booleans()):
            record.pop(key)
        else:
            record[key] = draw(odd_value)
    return record


@st.composite
def line(draw: st.DrawFn, step: int, clean: bool = False) -> bytes:
    kinds = ["val", "val", "val", "train"] + ([] if clean else ["mutated", "garbage", "empty"])
    kind = draw(st.sampled_from(kinds))
    if kind == "train":
        record = {"lr": 0.01, "loss": 1.2, "epoch": step, "iter": step * 8, "step": step * 8}
        return json.dumps(record).encode()
    if kind == "garbage":
        return draw(st.binary(max_size=40)).replace(b"\n", b"")
    if kind == "empty":
        return draw(st.sampled_from([b"", b" ", b"\r", b"{}", b"[]", b"null", b"1"]))
    data = json.dumps(draw(val_record(step, clean))).encode()  # NaN/Infinity as json writes them
    if kind == "mutated" and data:
        how = draw(st.sampled_from(["truncate", "byte", "insert", "huge"]))
        at = draw(st.integers(0, len(data) - 1))
        if how == "truncate":
            data = data[:at]
        elif how == "byte":
            data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
        elif how == "insert":
            data = data[:at] + draw(st.binary(max_size=8)) + data[at:]
        else:
            data = data.replace(b'"step": ', b'"step": 1' + b"0" * draw(st.integers(20, 400)))
        data = data.replace(b"\n", b"")
    return data


@st.composite
def scalars_files(draw: st.DrawFn) -> dict[str, bytes]:
    files = {}
    for launch in LAUNCHES[: draw(st.integers(1, 2))]:
        # steps mostly climb 1..4; duplicates, gaps and a resume that goes back are drawn too
        steps = draw(st.lists(st.integers(0, 6), min_size=0, max_size=12))
        clean = draw(st.integers(0, 2)) == 0  # odd values and steps, but no malformed line
        lines = [draw(line(s, clean)) for s in (sorted(steps) if draw(st.booleans()) else steps)]
        tail = b"\n" if draw(st.integers(0, 4)) else b""  # sometimes a partial last line
        files[launch] = b"\n".join(lines) + (tail if lines else b"")
    return files


def test_fuzzed_metric_logs(
    tmp_path: Path, template: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = Bench(tmp_path, template, best={"metric": METRIC, "rule": "greater"})
    tally: collections.Counter[str] = collections.Counter()

    @FUZZ
    @given(scalars_files())
    def one(files: dict[str, bytes]) -> None:
        work_dir = bench.work_dir(files)
        oracle = Oracle()
        for launch, data in files.items():
            oracle.read(f"{launch}/vis_data/scalars.json", data)
            tally["lines"] += data.count(b"\n")
        before = checkpoints(work_dir)
        result = bench.reconcile(work_dir)
        problems = oracle.check(bench, work_dir, result, before)
        tally["inputs"] += 1
        tally["malformed lines"] += len(oracle.must_report)
        tally["passes with deletions"] += bool(before - checkpoints(work_dir))
        tally["passes held back by bad input"] += bool(result.errors)
        bench.done(work_dir)
        assert not problems, (files, problems, result.errors)

    one()
    report(capsys, "fuzzed scalars.json", **tally)
    assert tally["passes with deletions"] and tally["passes held back by bad input"]


# --- 2. checkpoint bytes -------------------------------------------------------------------


def _zip_regions(path: Path) -> dict[str, tuple[int, int]]:
    """Byte ranges of interest in a torch zip: data.pkl, kept and dropped storages, the
    central directory."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        cd_start = min(i.header_offset for i in infos)
        raw = path.read_bytes()
        eocd = raw.rindex(b"PK\x05\x06")
        (cd_offset,) = struct.unpack_from("<I", raw, eocd + 16)
        regions = {"central directory": (cd_offset, eocd + 22)}
        for info in infos:
            name = info.filename.split("/", 1)[1]
            nlen, elen = struct.unpack_from("<HH", raw, info.header_offset + 26)
            start = info.header_offset + 30 + nlen + elen
            if name == "data.pkl":
                regions["data.pkl"] = (start, start + info.file_size)
            elif name == "data/0":
                regions["first storage"] = (start, start + info.file_size)
        regions["last storage"] = (start, start + info.file_size)
        regions["local headers"] = (cd_start, cd_start + 200)
    return regions


@st.composite
def corruption(draw: st.DrawFn, size: int, regions: dict[str, tuple[int, int]]) -> list[Any]:
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["truncate", "flip", "flip", "zero", "magic", "append"]))
        region = draw(st.sampled_from(sorted(regions)))
        start, end = regions[region]
        at = draw(st.integers(start, max(start, end - 1)))
        edits.append((how, region, at, draw(st.integers(1, 255)), draw(st.integers(1, 64))))
    return edits


def _corrupt(data: bytes, edits: list[Any]) -> bytes:
    buf = bytearray(data)
    for how, _region, at, value, length in edits:
        at = min(at, len(buf) - 1)
        if how == "truncate":
            del buf[at:]
        elif how == "flip":
            buf[at] ^= value
        elif how == "zero":
            buf[at : at + length] = bytes(len(buf[at : at + length]))
        elif how == "magic":
            buf[0:4] = b"\x00\x00\x00\x00"
        else:
            buf += bytes([value]) * length
        if not buf:
            break
    return bytes(buf)


def test_fuzzed_checkpoint_bytes(
    tmp_path: Path, template: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    bench = Bench(tmp_path, template)
    best = template / "epoch_4.pth"
    original = torch.load(best, weights_only=False, map_location="cpu")
    data = best.read_bytes()
    regions = _zip_regions(best)
    tally: collections.Counter[str] = collections.Counter()

    @FUZZ
    @given(corruption(len(data), regions))
    def one(edits: list[Any]) -> None:
        work_dir = bench.work_dir()
        (work_dir / "epoch_4.pth").unlink()  # a hard link: replace it, never write through it
        (work_dir / "epoch_4.pth").write_bytes(_corrupt(data, edits))
        os.utime(work_dir / "epoch_4.pth", (SETTLED, SETTLED))  # stays so: not being written
        before = checkpoints(work_dir)
        result = bench.reconcile(work_dir)
        problems = recorded_log_oracle(template).check(bench, work_dir, result, before)
        artifact = work_dir / "best" / "best_coco_bbox_mAP_epoch_4.pth"
        tally["inputs"] += 1
        tally["edits"] += len(edits)
        if artifact.exists():
            slim = torch.load(artifact, weights_only=True, map_location="cpu")
            if slim["meta"] != original["meta"] or list(slim["state_dict"]) != list(
                original["state_dict"]
            ):
                problems.append("the artifact differs from the original's kept keys")
            for key, tensor in original["state_dict"].items():
                if not torch.equal(slim["state_dict"][key], tensor):
                    problems.append(f"corruption reached the artifact: {key}")
            tally["artifact written (corruption outside kept keys)"] += 1
        else:
            named = [e for e in result.errors if "epoch_4.pth" in e]  # the work_dir is in the
            if not named and "epoch_4.pth" in checkpoints(work_dir):  # report's header
                problems.append(f"no artifact and no error naming the checkpoint: {result.errors}")
            if before - checkpoints(work_dir):
                problems.append("deleted although the best could not be slimmed")
            tally["refused with a message"] += 1
        bench.done(work_dir)
        assert not problems, (edits, problems, result.errors, result.notes)

    one()
    report(capsys, "fuzzed checkpoint bytes", **tally)


def _rezip(source: Path, target: Path, edit: Any, method: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(source) as archive:
        records = [(i.filename, archive.read(i)) for i in archive.infolist()]
    with zipfile.ZipFile(target, "w", method) as archive:
        for name, blob in records:
            out = edit(name.split("/", 1)[1], blob)
            if out is not None:
                archive.writestr(name, out)


def _bomb_many_entries(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(100_000):
            archive.writestr(f"archive/data/{i}", b"")


def _bomb_deflate(path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00." + b"\0" * 50_000_000)
        archive.writestr("archive/version", b"3\n")


def _huge_declared_size(path: Path, template: Path) -> None:
    raw = bytearray((template).read_bytes())
    eocd = raw.rindex(b"PK\x05\x06")
    (cd_offset,) = struct.unpack_from("<I", raw, eocd + 16)
    at = raw.index(b"PK\x01\x02", cd_offset)
    struct.pack_into("<II", raw, at + 20, 0xFFFFFFFE, 0xFFFFFFFE)  # sizes of the first entry
    path.write_bytes(bytes(raw))


def _bad_checkpoint(kind: str, template: Path, path: Path) -> None:
    best = template / "epoch_4.pth"
    if kind == "truncated zip":
        path.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    elif kind == "bad CRC in a kept storage":
        raw = bytearray(best.read_bytes())
        start, _ = _zip_regions(best)["first storage"]
        raw[start] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif kind == "wrong magic":
        path.write_bytes(b"\x7fELF" + best.read_bytes()[4:])
    elif kind == "zip bomb: 100k entries":
        _bomb_many_entries(path)
    elif kind == "zip bomb: deflated data.pkl":
        _bomb_deflate(path)
    elif kind == "zip bomb: 4 GiB declared size":
        _huge_declared_size(path, best)
    elif kind == "storage referenced but missing":
        _rezip(best, path, lambda name, blob: None if name == "data/0" else blob)
    elif kind == "unknown global in a kept key":
        hostile_checkpoint(best, path, "meta", payloads(path.parent / "x")["unknown global"])
    elif kind == "not a zip at all":
        path.write_bytes(os.urandom(4096))
    elif kind == "empty file":
        path.write_bytes(b"")
    else:
        raise AssertionError(kind)


BAD_KINDS = [
    "truncated zip",
    "bad CRC in a kept storage",
    "wrong magic",
    "zip bomb: 100k entries",
    "zip bomb: deflated data.pkl",
    "zip bomb: 4 GiB declared size",
    "storage referenced but missing",
    "unknown global in a kept key",
    "not a zip at all",
    "empty file",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_best_checkpoint_is_reported_and_nothing_is_deleted(
    tmp_path: Path, template: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = Bench(tmp_path, template)
    work_dir = bench.work_dir()
    best = work_dir / "epoch_4.pth"
    best.unlink()
    _bad_checkpoint(kind, template, best)
    os.utime(best, (SETTLED, SETTLED))  # long unchanged: not "being written"
    before = checkpoints(work_dir)
    result = bench.reconcile(work_dir)
    assert checkpoints(work_dir) == before, result.errors
    assert not (work_dir / "best").exists() or not list((work_dir / "best").iterdir())
    assert not temp_files(work_dir)
    text = "\n".join(result.errors + result.notes)
    assert best.name in text, (kind, text)  # with the work_dir in the report's header
    report(capsys, f"bad best checkpoint: {kind}", deleted=0, message=text[:160])


# --- 3. configs ----------------------------------------------------------------------------

BASE: dict[str, Any] = {
    "projects": [
        {
            "name": "p",
            "work_dirs": ["./work_dirs/*"],
            "layout": "auto",
            "best": {"metric": "auto", "rule": "auto"},
            "retention": {
                "keep_last": 2,
                "keep_every": None,
                "keep_best": 0,
                "pending_eval_grace": "1h",
                "max_total_size": None,
            },
            "artifact": {"dir": "{work_dir}/best", "keep_keys": "auto", "hash_in_name": False},
            "dry_run": False,
        }
    ],
    "watch": {"mode": "auto", "poll_interval": "2s", "settle": "0s", "resync_interval": "5m"},
}
PLAUSIBLE: dict[str, Any] = {
    "keep_last": st.integers(-2, 6),
    "keep_every": st.one_of(st.none(), st.integers(-1, 5)),
    "keep_best": st.integers(-1, 4),
    "pending_eval_grace": st.sampled_from(["0s", "1h", "-5m", "1e309s", "soon", 0, 3.5]),
    "max_total_size": st.sampled_from([None, "0", "1 B", "1MiB", "2 MB", "1 PiB", "-1GiB", "x"]),
    "metric": st.sampled_from(["auto", METRIC, "coco/bbox_mAP_50", "nope", [METRIC, "x"], []]),
    "rule": st.sampled_from(["auto", "greater", "less", "sideways", ["greater", "less"]]),
    "keep_keys": st.sampled_from(["auto", ["meta", "state_dict"], ["state_dict"], ["nope"], []]),
    "hash_in_name": st.booleans(),
    "dry_run": st.booleans(),
    "dir": st.sampled_from(["{work_dir}/best", "{work_dir}", "{nope}", "/proc/x", "{work_dir"]),
}
junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)


@st.composite
def config_data(draw: st.DrawFn) -> Any:
    data = json.loads(json.dumps(BASE))
    project = data["projects"][0]
    sections = {"best": ("metric", "rule"), "artifact": ("dir", "keep_keys", "hash_in_name")}
    for key in draw(st.lists(st.sampled_from(sorted(PLAUSIBLE)), max_size=4, unique=True)):
        section = next((s for s, keys in sections.items() if key in keys), None)
        if section is None:
            section = "retention" if key in BASE["projects"][0]["retention"] else None
        holder = project[section] if section else project
        holder[key] = draw(PLAUSIBLE[key])
    for _ in range(draw(st.integers(0, 2))):  # unknown keys, wrong types, missing keys
        parts = [data, project, project.get("retention"), data.get("watch")]
        where: dict[str, Any] = draw(st.sampled_from([d for d in parts if isinstance(d, dict)]))
        how = draw(st.sampled_from(["add", "replace", "drop"]))
        if how == "add":
            where[draw(st.text(min_size=1, max_size=6))] = draw(junk)
        elif where:
            key = draw(st.sampled_from(sorted(where)))
            if how == "replace":
                where[key] = draw(junk)
            else:
                del where[key]
    return draw(st.one_of(st.just(data), st.just(data), junk))


def test_fuzzed_configs(tmp_path: Path, template: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = Bench(tmp_path, template)
    path = tmp_path / "ckptd.yaml"
    tally: collections.Counter[str] = collections.Counter()

    @FUZZ
    @given(config_data())
    def one(data: Any) -> None:
        tally["inputs"] += 1
        path.write_text(yaml.safe_dump(data))
        try:
            loaded = load_config(path)
        except ConfigError as exc:
            assert str(exc).startswith(str(path)), exc
            tally["refused with a message"] += 1
            return
        tally["valid"] += 1
        project = loaded.config.projects[0]
        work_dir = bench.work_dir()

        def disk() -> dict[str, int]:
            return {str(p.relative_to(work_dir)): p.stat().st_mtime_ns for p in work_dir.rglob("*")}

        before, kept = disk(), checkpoints(work_dir)
        result = bench.reconcile(work_dir, project)
        problems = recorded_log_oracle(template).check(bench, work_dir, result, kept)
        if project.dry_run:
            tally["dry runs"] += 1
            if disk() != before:
                problems.append(f"dry_run: true changed the disk: {set(disk()) ^ set(before)}")
        tally["passes with deletions"] += bool(kept - checkpoints(work_dir))
        bench.done(work_dir)
        assert not problems, (data, problems, result.errors)

    one()

    # and raw text: YAML that is not a mapping, binary, deep nesting, python tags
    raw = [
        b"",
        b"\xff\xfe\x00garbage",
        b"projects: [" * 5000,
        b"- " * 3000 + b"x",
        b"!!python/object/apply:os.system ['touch /tmp/ckptd-fuzz-pwned']",
        b"projects: &a [*a]",
        b"a: b: c",
        b"projects:\n  - name: x\n    work_dirs: ['/']\n    retention: {keep_last: 1e999}",
    ]
    for text in raw:
        tally["inputs"] += 1
        path.write_bytes(text)
        try:
            load_config(path)
        except ConfigError as exc:
            assert str(exc).startswith(str(path)), exc
            tally["refused with a message"] += 1
    assert not os.path.exists("/tmp/ckptd-fuzz-pwned")
    report(capsys, "fuzzed configs", **tally)


def test_config_dry_run_writes_nothing(tmp_path: Path, template: Path) -> None:
    """``dry_run: true`` in the config: plan and report, never delete or write artifacts."""
    bench = Bench(tmp_path, template, dry_run=True)
    work_dir = bench.work_dir()
    before = sorted(p.name for p in work_dir.rglob("*"))
    result = bench.reconcile(work_dir)
    assert [a.status for a in result.artifacts] == ["would write"]
    assert sorted(p.name for p in work_dir.rglob("*")) == before


def test_an_artifact_dir_shared_by_two_work_dirs_is_refused(tmp_path: Path) -> None:
    """``artifact.dir: models/{project}`` matching two runs: their manifests would overwrite
    each other (re-slimming both on every pass) and equal names (best at the same epoch)
    would replace one run's best model by the other's. Neither is managed; the note says why."""
    import subprocess
    import sys

    from tests.helpers import REPO

    runs = [tmp_path / "work_dirs" / n for n in ("a", "b")]
    for run in runs:
        run.mkdir(parents=True)
        replay_now(record(), run, upto_epoch=4)
    shared = tmp_path / "models" / "test"  # write_config names the project "test"
    config = write_config(tmp_path, artifact={"dir": str(tmp_path / "models" / "{project}")})
    argv = [sys.executable, "-m", "ckptd", "once", "-c", str(config)]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO).stdout
    assert f"note: {shared}: artifact.dir of {runs[0]} and {runs[1]}" in out, out
    assert "put {run} or {work_dir} in artifact.dir" in out
    assert not shared.exists()
    assert all(len(checkpoints(run)) == 4 for run in runs)
    write_config(tmp_path, artifact={"dir": str(tmp_path / "models" / "{project}" / "{run}")})
    assert subprocess.run(argv, capture_output=True, cwd=REPO).returncode == 0
    assert all(checkpoints(run) == {"epoch_3.pth", "epoch_4.pth"} for run in runs)
