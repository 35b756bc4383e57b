"""DeepSpeed checkpoint folders: recognised, judged complete, consolidated to one fp32 file.

``engine.save_checkpoint(save_dir, tag)`` writes ``save_dir/tag/`` (``global_stepN`` by
default): ``mp_rank_00_model_states.pt`` (ZeRO 1/2; ZeRO 3 writes one
``zero_pp_rank_R_mp_rank_00_model_states.pt`` per rank), one
``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` per data-parallel rank, then
``save_dir/zero_to_fp32.py`` and, on rank 0 and last, ``save_dir/latest`` naming the tag. Rank 0
may write ``latest`` before another rank has finished its file, so a folder is complete only
when every file its rank-0 model states ask for (``dp_world_size`` ranks) is a whole zip.

The artifact is what ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` returns, tensor
for tensor: buffers (16-bit ones as fp32), frozen parameters as stored, trainable parameters in
fp32 from the optimizer partitions (``slim/zero_layout.py``), tied parameters; written by
``slim/consolidate.py`` under ``state_dict``, with a ``meta`` of the run's scalars. Every shard
is read with the restricted unpickler and refused if it names a global outside
``ALLOWED_GLOBALS`` and ``DEEPSPEED_GLOBALS``.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from ckptd.fs.delete import tree_stat
from ckptd.fs.names import plain_name
from ckptd.slim.artifact import ArtifactRequest, Scalar, WrittenArtifact
from ckptd.slim.consolidate import (
    CONVERTIBLE,
    OutTensor,
    ShardFiles,
    ShardRecord,
    write_consolidated,
)
from ckptd.slim.dcp_writer import output_suffix as output_suffix
from ckptd.slim.errors import (
    CheckpointChangedError,
    CorruptCheckpointError,
    SlimError,
    UnsafeCheckpointError,
    UnsafeShardError,
    UnsupportedFormatError,
)
from ckptd.slim.pickle_allowlist import ALLOWED_GLOBALS, DEEPSPEED_GLOBALS
from ckptd.slim.safepickle import Inert
from ckptd.slim.safetensors_writer import check_globals
from ckptd.slim.source import CheckpointSource, scalar_meta
from ckptd.slim.tensors import ITEMSIZE, NotATensor, as_mapping, tensor_view
from ckptd.slim.torchzip import looks_complete
from ckptd.slim.zero_layout import LayoutMismatch, Part, zero2_params, zero3_frozen, zero3_params

LATEST = "latest"
MODEL_STATES = "mp_rank_00_model_states.pt"
_ZERO3_MODEL = "zero_pp_rank_{}_mp_rank_00_model_states.pt"
_OPTIM = re.compile(r"^(?:(?:bf16|fp16)_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL = re.compile(r"^(?:zero_pp_rank_\d+_)?mp_rank_\d+_model_states\.pt$")
_MAX_TAG = 255
_READABLE = ALLOWED_GLOBALS | DEEPSPEED_GLOBALS


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def is_tag_dir(folder: Path) -> bool:
    """Holds a DeepSpeed engine's model states (names only)."""
    return any(_MODEL.match(n) for n in _names(folder))


def read_latest(container: Path) -> str | None:
    """The tag ``latest`` names: a plain name of a folder beside it; SlimError if not."""
    path = container / LATEST
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SlimError(path, f"cannot be read: {exc.strerror or exc}.") from exc
    try:
        raw = os.read(fd, _MAX_TAG + 1)
    finally:
        os.close(fd)
    tag = raw.decode("utf-8", "replace").strip()
    if len(raw) > _MAX_TAG or not plain_name(tag):
        raise UnsupportedFormatError(
            path,
            f"names the tag {tag[:80]!r}, which is not a folder name beside it; ckptd reads "
            "and deletes nothing outside the checkpoint.",
            "Write the tag of a checkpoint folder of this save_dir into it.",
        )
    return tag


def tag_dir(folder: Path) -> Path | None:
    """The folder holding the shards: ``folder`` itself, the tag ``latest`` names (Hugging Face
    ``checkpoint-N/``, Lightning ``*.ckpt/``), or its one subfolder of shards."""
    if is_tag_dir(folder):
        return folder
    tag = read_latest(folder)
    if tag is not None:
        return folder / tag
    subs = [folder / n for n in _names(folder) if is_tag_dir(folder / n)]
    return subs[0] if len(subs) == 1 else None


def recognise(folder: Path) -> bool:
    if is_tag_dir(folder):
        return True
    names = _names(folder)
    return (LATEST in names or "zero_to_fp32.py" in names) and any(
        is_tag_dir(folder / n) for n in names if not n.startswith(".")
    )


def _step(tag: str) -> int | None:
    found = re.fullmatch(r"global_step(\d+)", tag)
    return int(found.group(1)) if found else None


def _optim_files(tag: Path) -> dict[int, str]:
    ranks: dict[int, str] = {}
    for name in _names(tag):
        found = _OPTIM.match(name)
        if found:
            if found.group(2) != "00":
                raise UnsupportedFormatError(
                    tag / name,
                    "is a tensor- or pipeline-parallel shard (mp_rank other than 00); ckptd "
                    "consolidates data-parallel ZeRO checkpoints only, as zero_to_fp32.py does.",
                )
            ranks[int(found.group(1))] = name
    return ranks


def _world(model: CheckpointSource) -> tuple[int, int]:
    """(dp_world_size, zero stage) as the rank-0 model states record them."""
    world = model.mapping.get("dp_world_size")
    config = model.mapping.get("ds_config")
    zero = config.get("zero_optimization") if type(config) is dict else None
    stage = zero.get("stage", 0) if type(zero) is dict else 0
    if type(world) is not int or world < 1 or type(stage) is not int:
        raise CorruptCheckpointError(model.path, "has no dp_world_size / ZeRO stage recorded.")
    return world, stage


def shard_paths(tag: Path) -> tuple[Path, list[Path], list[Path]]:
    """(rank-0 model states, every model states, every optim states file) the folder needs;
    SlimError naming the first one missing."""
    zero3 = tag / _ZERO3_MODEL.format(0)
    first = zero3 if zero3.exists() else tag / MODEL_STATES
    if not first.exists():
        raise CorruptCheckpointError(tag, f"has no {MODEL_STATES} (nor {zero3.name}).")
    source = CheckpointSource(first)
    try:
        world, stage = _world(source)
    finally:
        source.close()
    optim = _optim_files(tag)
    missing = [r for r in range(world) if r not in optim]
    if missing:
        raise CorruptCheckpointError(
            tag,
            f"has no optimizer states of rank {missing[0]} (dp_world_size {world}, found ranks "
            f"{sorted(optim)}); a rank did not finish saving, or a shard was removed.",
        )
    models = [tag / _ZERO3_MODEL.format(r) for r in range(world)] if stage >= 3 else [first]
    return first, models, [tag / optim[r] for r in range(world)]


def complete(folder: Path) -> tuple[bool, str]:
    """Every shard the rank-0 model states ask for is a whole zip, and where the folder has a
    ``latest`` (or sits beside one) it names this tag or a later ``global_step``."""
    try:
        tag = tag_dir(folder)
        if tag is None or not tag.is_dir():
            return False, "the DeepSpeed tag folder named by 'latest' is not there yet"
        if tag == folder:
            latest = read_latest(folder.parent)
            step, latest_step = _step(folder.name), _step(latest or "")
            later = step is not None and latest_step is not None and step <= latest_step
            if latest is not None and latest != folder.name and not later:
                return False, f"'latest' names {latest}, not this folder (still being saved)"
        first, models, optims = shard_paths(tag)
        for path in dict.fromkeys([first, *models, *optims]):
            if not path.exists():
                return False, f"{path.name} is missing"
            if looks_complete(path) is not True:
                return False, f"{path.name} is not whole yet (a rank is still writing it)"
    except SlimError as exc:
        return False, str(exc)
    return True, ""


def _shape(value: Any) -> tuple[int, ...]:
    if isinstance(value, Inert) and value.origin == ("torch", "Size") and len(value.args) == 1:
        value = value.args[0]
    if type(value) in (tuple, list) and all(type(n) is int and n >= 0 for n in value):
        return tuple(value)
    raise LayoutMismatch(f"a parameter shape that is not a torch.Size ({type(value).__name__})")


def _mapping(value: Any) -> dict[Any, Any]:
    found = value if type(value) is dict else as_mapping(value)
    return found if found is not None else {}


class _Reader:
    """The shards of one tag folder, open, with their tensors as ``Part``s."""

    def __init__(self, tag: Path) -> None:
        self.tag = tag
        self.files = ShardFiles(tag)
        self.records: dict[tuple[int, str], ShardRecord] = {}

    def open(self, path: Path) -> CheckpointSource:
        source = CheckpointSource(path)
        self.files.add(source)
        for key, value in source.mapping.items():
            try:
                check_globals(path, str(key), value, _READABLE)
            except UnsafeCheckpointError as exc:
                raise UnsafeShardError(path, exc.key, exc.global_name) from None
        return source

    def tensor(self, source: CheckpointSource, value: Any, what: str) -> tuple[str, Part]:
        try:
            view = tensor_view(value)
        except NotATensor as exc:
            raise UnsupportedFormatError(source.path, f"holds {exc} at {what}.") from exc
        if view is None or not view.is_contiguous():
            raise UnsupportedFormatError(
                source.path, f"holds no contiguous tensor at {what}; ckptd cannot consolidate it."
            )
        entry = source.archive.entries.get(f"data/{view.storage_key}")
        if entry is None or entry.size != view.storage_bytes:
            raise CorruptCheckpointError(source.path, f"has a bad storage record for {what}.")
        base = source.archive.data_offset(entry)
        if (source.fd, view.storage_key) not in self.records:
            self.records[source.fd, view.storage_key] = ShardRecord(
                source.path, source.fd, base, entry.size, entry.crc32,
                f"{source.archive.prefix}/data/{view.storage_key}",
            )  # fmt: skip
        return view.dtype, Part(source.fd, base + view.span()[0], view.nbytes)


def _stage(value: Any) -> int | None:
    if isinstance(value, Inert) and len(value.args) == 1:
        value = value.args[0]
    return value if type(value) is int else None


def read_consolidation(tag: Path) -> tuple[_Reader, list[OutTensor], dict[str, Scalar]]:
    """The output tensors of the tag folder, in ``get_fp32_state_dict_from_zero_checkpoint``'s
    order, and the meta; the caller closes ``reader.files``."""
    _, model_paths, optim_paths = shard_paths(tag)
    reader = _Reader(tag)
    try:
        models = [reader.open(p) for p in model_paths]
        optims = [reader.open(p) for p in optim_paths]
        tensors, meta = _plan(reader, models, optims)
    except LayoutMismatch as exc:
        reader.files.close()
        raise CorruptCheckpointError(tag, f"does not add up: {exc}.") from exc
    except BaseException:
        reader.files.close()
        raise
    return reader, tensors, meta


def _plan(
    reader: _Reader, models: list[CheckpointSource], optims: list[CheckpointSource]
) -> tuple[list[OutTensor], dict[str, Scalar]]:
    model = models[0].mapping
    states = [_mapping(o.mapping.get("optimizer_state_dict")) for o in optims]
    stage = _stage(states[0].get("zero_stage"))
    count = states[0].get("partition_count")
    count = max(count) if type(count) is list and count else count
    if stage not in (1, 2, 3) or count != len(optims):
        raise CorruptCheckpointError(
            optims[0].path,
            f"records ZeRO stage {stage} over {count} partitions, with {len(optims)} "
            "optimizer-states files; ckptd consolidates ZeRO 1, 2 and 3 checkpoints.",
        )
    out: dict[str, OutTensor] = {}
    module = _mapping(model.get("module"))
    buffers = model.get("buffer_names") or []
    for name, value in module.items():
        if name in buffers:
            dtype, part = reader.tensor(models[0], value, f"module[{name!r}]")
            view = tensor_view(value)
            shape = view.shape if view is not None else ()
            convert = dtype if dtype in CONVERTIBLE else None
            out[name] = OutTensor(name, "float32" if convert else dtype, shape, (part,), convert)
    frozen = _mapping(model.get("frozen_param_shapes"))
    for name, raw in frozen.items():
        shape = _shape(raw)
        frags = [
            reader.tensor(m, _mapping(m.mapping.get("frozen_param_fragments")).get(name), name)
            for m in (models if stage == 3 else models[:1])
        ]
        dtype = frags[0][0]
        parts = tuple(p for _, p in frags)
        parts = zero3_frozen(name, shape, parts, ITEMSIZE[dtype]) if stage == 3 else parts
        out[name] = OutTensor(name, dtype, shape, parts)
    shapes = [[(n, _shape(s)) for n, s in _mapping(g).items()] for g in model["param_shapes"]]
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    groups = [
        [reader.tensor(o, g, f"{key}[{i}]")[1] for i, g in enumerate(s.get(key) or [])]
        for o, s in zip(optims, states, strict=True)
    ]
    if stage == 3:
        params = zero3_params([p for g in shapes for p in g], groups, 4)
    else:
        params = zero2_params(shapes, groups, states[0].get("param_alignment_paddings"), 4)
    for name, shape, parts in params:
        out[name] = OutTensor(name, "float32", shape, parts)
    shared = model.get("shared_params")
    for alias, owner in shared.items() if type(shared) is dict else ():
        if owner in out:
            t = out[owner]
            out[alias] = OutTensor(alias, t.dtype, t.shape, t.parts, t.source_dtype, owner)
    return list(out.values()), _meta(model, stage, len(optims))


def _meta(model: dict[Any, Any], stage: int, world: int) -> dict[str, Scalar]:
    meta = scalar_meta(model.get("meta"))  # MMEngine's client state
    for key in ("epoch", "global_step", "global_steps", "global_samples", "ds_version"):
        if type(model.get(key)) in (int, str) and key not in meta:
            meta[key] = model[key]
    meta.update(zero_stage=stage, dp_world_size=world)
    return meta


def client_state_file(folder: Path) -> Path | None:
    """The rank-0 model-states file, which holds the trainer's client state (Lightning's
    ``epoch``, ``global_step``, ``callbacks``; MMEngine's ``meta``), or None."""
    try:
        tag = tag_dir(folder)
        return shard_paths(tag)[0] if tag is not None else None
    except SlimError:
        return None


def _strip(name: str | None, prefix: str) -> str | None:
    return name.removeprefix(prefix) if name is not None else None


def write_deepspeed(request: ArtifactRequest, fmt: str, strip_prefix: str = "") -> WrittenArtifact:
    """The consolidated artifact of the DeepSpeed checkpoint folder ``request.source``; tensor
    names lose ``strip_prefix`` (Lightning's ``_forward_module.``, as its own converter does)."""
    started = time.perf_counter()
    tag = tag_dir(request.source)
    if tag is None:
        raise UnsupportedFormatError(request.source, "holds no DeepSpeed checkpoint folder.")
    before = tree_stat(request.source)
    reader, tensors, meta = read_consolidation(tag)
    if strip_prefix:
        tensors = [
            replace(t, name=_strip(t.name, strip_prefix), same_as=_strip(t.same_as, strip_prefix))
            for t in tensors
        ]
    try:
        records = list(reader.records.values())
        for source in reader.files.sources:
            source.release_tree()
        path, sha256, size = write_consolidated(
            reader.files, tensors, records, dict(meta), fmt, request.dest_dir, request.name,
            request.progress, request.cancel,
        )  # fmt: skip
        if tree_stat(request.source) != before:
            path.unlink(missing_ok=True)
            raise CheckpointChangedError(request.source, "changed while it was consolidated.")
    finally:
        reader.files.close()
    return WrittenArtifact(
        path=path,
        sha256=sha256,
        size=size,
        kept_keys=("meta", "state_dict"),
        dropped_keys=(),
        source_stat=before,
        seconds=time.perf_counter() - started,
        meta=meta,
    )


class DeepSpeedConsolidation:
    """The ``ArtifactWriter`` of DeepSpeed folders (``artifact.format`` torch or safetensors)."""

    kind: ClassVar[str] = "deepspeed consolidation"

    def __init__(self, fmt: str = "torch", strip_prefix: str = "") -> None:
        self.fmt, self.strip_prefix = fmt, strip_prefix

    def write(self, request: ArtifactRequest) -> WrittenArtifact:
        return write_deepspeed(request, self.fmt, self.strip_prefix)


writer = DeepSpeedConsolidation
