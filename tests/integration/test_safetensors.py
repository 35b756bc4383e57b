"""safetensors artifacts (``artifact.format: safetensors``, ``ckptd slim --format safetensors``).

Every file is checked with safetensors' own loader and against the torch artifact of the same
checkpoint, tensor for tensor: the torch slim keeps views as views, the safetensors file holds
each tensor's own contiguous bytes, so values, dtypes and shapes must be equal.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ckptd.slim.safetensors_writer as st_module
from ckptd.layouts.hf import HFLayout
from ckptd.layouts.lightning import LightningLayout
from ckptd.slim.errors import SlimError, UnsafeCheckpointError, UnsupportedFormatError
from ckptd.slim.safetensors_writer import write_safetensors
from ckptd.slim.slimmer import slim_checkpoint
from tests.faults.hostile import hostile_checkpoint, payloads
from tests.helpers import checkpoints, cli, manifest, simulate, write_config
from tests.integration.test_slim import mmengine_like


def flatten(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    out: dict[str, torch.Tensor] = {}
    for key, item in value.items():
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def assert_equal_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        # byte-wise: NaN-safe, and float8 has no torch.equal
        a = got[name].detach().contiguous().reshape(-1).view(torch.uint8)
        b = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), name


def both(src: Path, dest: Path, keep: tuple[str, ...]) -> tuple[dict[str, Any], Path]:
    """The torch artifact (loaded weights_only) and the safetensors file of ``src``."""
    torch_art = slim_checkpoint(src, dest, "best.pth", keep_keys=keep)
    st_art = write_safetensors(src, dest, "best.safetensors", keep_keys=keep)
    assert st_art.sha256 == hashlib.sha256(st_art.path.read_bytes()).hexdigest()
    assert st_art.size == st_art.path.stat().st_size
    assert st_art.kept_keys == torch_art.kept_keys and st_art.meta == torch_art.meta
    return torch.load(torch_art.path, weights_only=True), st_art.path


def metadata(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata()


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    folder = tmp_path / "artifacts"
    folder.mkdir()
    return folder


def test_every_tensor_kind_equals_the_torch_artifact(tmp_path: Path, dest: Path) -> None:
    """Tied weights, transposed/strided/offset views, bf16/fp16/int64/bool/uint16/float8/
    complex64, 0-d, empty, Parameters, an expanded view, nested dicts."""
    ckpt = mmengine_like()
    ckpt["meta"].pop("extras")  # bytes in meta: refused below
    base = torch.arange(30, dtype=torch.float64).reshape(5, 6)
    ckpt["state_dict"]["extra.expanded"] = torch.ones(3).expand(4, 3)
    ckpt["state_dict"]["extra.nested"] = {"a": base[1:, 2:].t(), "b": {"c": base[0]}}
    src = tmp_path / "epoch_3.pth"
    torch.save(ckpt, src)
    loaded, path = both(src, dest, ("meta", "state_dict"))
    sd = loaded["state_dict"]
    assert sd["head.weight"].data_ptr() == sd["emb.weight"].data_ptr()  # tied in the source
    assert not sd["extra.transposed"].is_contiguous()
    assert sd["extra.offset"].storage_offset() == 6
    assert_equal_tensors(load_file(path), flatten(sd))
    info = metadata(path)
    assert info["format"] == "pt"
    assert json.loads(info["meta"]) == {
        **json.loads(json.dumps(loaded["meta"], default=sorted)),
        "ids": [1, 2],
        "counts": {"a": 2, "b": 1},
    }


def test_mmengine_simulated_run(tmp_path: Path, dest: Path) -> None:
    work_dir = simulate(tmp_path / "run", epochs=2)
    src = work_dir / checkpoints(work_dir)[-1]
    loaded, path = both(src, dest, ("meta", "state_dict"))
    assert_equal_tensors(load_file(path), flatten(loaded["state_dict"]))
    assert json.loads(metadata(path)["meta"])["epoch"] == loaded["meta"]["epoch"]


def test_lightning_like_dict(tmp_path: Path, dest: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    src = tmp_path / "epoch=1-step=10.ckpt"
    hparams = {"lr": 1e-3, "layers": [4, 3], "name": "tiny", "nested": {"p": None}}
    torch.save(
        {
            "epoch": 1,
            "global_step": 10,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": OrderedDict((f"model.{k}", v) for k, v in model.state_dict().items()),
            "optimizer_states": [opt.state_dict()],
            "lr_schedulers": [],
            "callbacks": {"ModelCheckpoint{}": {"best_model_score": torch.tensor(0.5)}},
            "hyper_parameters": hparams,
        },
        src,
    )
    keep = LightningLayout.default_keep_keys
    write_safetensors(src, dest, "best.safetensors", keep_keys=[k.rstrip("?") for k in keep])
    got = load_file(dest / "best.safetensors")
    assert_equal_tensors(got, {f"model.{k}": v for k, v in model.state_dict().items()})
    info = metadata(dest / "best.safetensors")
    assert json.loads(info["hyper_parameters"]) == hparams
    assert json.loads(info["pytorch-lightning_version"]) == "2.4.0"


def test_refusals_name_the_file_and_the_way_out(
    tmp_path: Path, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "c.pth"

    def refused(ckpt: dict[str, Any], match: str, error: type[SlimError] = UnsupportedFormatError):
        torch.save(ckpt, src)
        with pytest.raises(error, match=match) as caught:
            write_safetensors(src, dest, "x.safetensors", keep_keys=("meta", "state_dict"))
        assert str(src) in str(caught.value)
        assert os.listdir(dest) == []  # nothing partial, no temp file

    sd = {"w": torch.randn(3, 3)}
    refused({"meta": {"b": b"\x00"}, "state_dict": sd}, r"meta.b holds a bytes.*format: torch")
    refused({"meta": {}, "state_dict": {**sd, "n": 3}}, r"non-tensor value \(int\) at 'n'")
    refused({"meta": {}, "state_dict": {"a.b": sd["w"], "a": {"b": sd["w"]}}}, r"two tensors")
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    refused({"meta": {}, "state_dict": {"q": q}}, r"_rebuild_qtensor")
    monkeypatch.setattr(st_module, "MAX_GATHER_BYTES", 64)
    big = torch.randn(8, 8)
    refused({"meta": {}, "state_dict": {"t": big.t()}}, r"non-contiguous tensor 't'.*contiguous")
    torch.save({"meta": {}, "state_dict": {"t": big[:2].t()}}, src)  # 64 bytes: gathered
    write_safetensors(src, dest, "x.safetensors", keep_keys=("meta", "state_dict"))
    assert torch.equal(load_file(dest / "x.safetensors")["t"], big[:2].t())


@pytest.mark.parametrize("where", ["meta", "state_dict", "state_dict._metadata", "optimizer"])
def test_hostile_payloads(tmp_path: Path, dest: Path, where: str) -> None:
    template = tmp_path / "template.pth"
    torch.save(
        {"meta": {"epoch": 1}, "state_dict": {"w": torch.ones(2)}, "optimizer": {"s": 1}},
        template,
    )
    marker = tmp_path / "marker"
    for kind, body in payloads(marker).items():
        src = hostile_checkpoint(template, tmp_path / f"{kind}.pth", where, body)
        if where == "optimizer":  # dropped: never read, the artifact is written
            write_safetensors(src, dest, f"{kind}.safetensors", keep_keys=("meta", "state_dict"))
            continue
        with pytest.raises(UnsafeCheckpointError, match=r"safe load") as caught:
            write_safetensors(src, dest, "x.safetensors", keep_keys=("meta", "state_dict"))
        assert str(src) in str(caught.value), kind
    assert not marker.exists()


def test_cli_slim_format_safetensors(tmp_path: Path) -> None:
    src = tmp_path / "epoch_3.pth"
    torch.save({"meta": {"epoch": 3}, "state_dict": {"w": torch.randn(4, 2).t()}}, src)
    code, out, err = cli("slim", str(src), "--format", "safetensors", "--hash-in-name")
    assert code == 0, err
    (written,) = tmp_path.glob("epoch_3_slim-*.safetensors")
    assert str(written) in out
    assert torch.equal(load_file(written)["w"], torch.load(src)["state_dict"]["w"])


def test_daemon_pass_writes_safetensors_and_switches_back(tmp_path: Path) -> None:
    work_dir = simulate(tmp_path / "work_dirs" / "run", epochs=3)
    write_config(tmp_path, artifact={"format": "safetensors"})
    code, out, err = cli("once", "-c", str(tmp_path / "ckptd.yaml"))
    assert code == 0, out + err
    (entry,) = manifest(work_dir / "best")["artifacts"].values()
    assert entry["format"] == "safetensors" and entry["file"].endswith(".safetensors")
    path = work_dir / "best" / entry["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    source = torch.load(work_dir / entry["source_checkpoint"], weights_only=False)
    assert_equal_tensors(load_file(path), flatten(source["state_dict"]))
    # a pass with the same config changes nothing; back to torch rewrites it as a .pth
    code, out, err = cli("once", "-c", str(tmp_path / "ckptd.yaml"))
    assert code == 0, out + err
    assert list(manifest(work_dir / "best")["artifacts"].values()) == [entry]
    write_config(tmp_path)
    code, out, err = cli("once", "-c", str(tmp_path / "ckptd.yaml"))
    assert code == 0, out + err
    (again,) = manifest(work_dir / "best")["artifacts"].values()
    assert again["format"] == "torch" and again["file"].endswith(".pth")
    assert not path.exists()  # the replaced artifact is removed once the manifest moved on


def test_old_manifest_reads_as_torch(tmp_path: Path) -> None:
    from ckptd.engine.artifacts import ArtifactEntry

    data = {
        "key": "acc", "file": "best.pth", "rule": "greater", "value": 1.0, "unit": "epoch",
        "index": 1, "epoch": 1, "step": None, "sha256": "0" * 64, "bytes": 1,
        "source_checkpoint": "epoch_1.pth", "source_stat": [1, 2, 3], "kept_keys": ["meta"],
        "time": "now",
    }  # fmt: skip
    assert ArtifactEntry.from_json(data).format == "torch"


def test_hf_format_means_which_weights_are_kept() -> None:
    layout = HFLayout()
    # the folder artifact whatever the format (only a DeepSpeed folder without model files is
    # consolidated, in the format asked for: ckptd/layouts/hf_deepspeed.py)
    (torch_writer, torch_suffix) = layout.artifact_output("torch")
    (st_writer, st_suffix) = layout.artifact_output("safetensors")
    assert torch_suffix == st_suffix == "" and torch_writer.folder_writer is st_writer.folder_writer
    kept = layout.auto_keep_keys("safetensors")
    assert "model.safetensors?" in kept and not any(".bin" in k for k in kept)
    assert layout.auto_keep_keys("torch") == HFLayout.default_keep_keys


@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="needs /usr/bin/time")
def test_gathering_a_large_transposed_view_stays_bounded(tmp_path: Path) -> None:
    """A 15 MiB transpose is gathered in memory; the whole process stays under 64 MiB RSS."""
    import subprocess
    import sys

    weight = torch.randn(2000, 2000)
    src = tmp_path / "big.pth"
    torch.save({"meta": {}, "state_dict": {"t": weight.t()}}, src)
    out = tmp_path / "big.safetensors"
    # /usr/bin/time reports the child's own peak (a child forked from pytest inherits its RSS)
    done = subprocess.run(
        ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "ckptd", "slim", str(src),
         "--format=safetensors", f"-o={out}"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert int(done.stderr.split()[-1]) < 64 * 1024, done.stderr  # KiB
    assert torch.equal(load_file(out)["t"], weight.t())
