"""A DCP folder consolidated into one file: the unsharded state_dict, streamed into place.

What ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` writes, for the kept
top-level keys only, without torch: the flat keys are nested again by ``planner_data`` (as its
``_EmptyStateDictLoadPlanner`` does), each tensor becomes one ``data/<n>`` record laid out from
its chunks (``dcp.TensorPlan``), and non-tensor values (DCP byte items, and the keys of a
trainer's own side file such as Lightning's ``meta.pt``) go into ``data.pkl`` through the same
``PickleWriter`` and allowlist as every artifact. ``artifact.format: safetensors`` writes the
tensors of ``state_dict``/``model`` under their own names, other keys' tensors as
``<key>.<name>``, and tensor-free keys as JSON in ``__metadata__`` (as the torch-zip one does).

Memory: one tensor's metadata and run cursor at a time plus the copy buffers; no tensor's bytes
are held (dim-0 chunks are copied in the kernel, other chunkings gathered in 4 MiB buffers).
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from ckptd.core.cancel import CancelToken
from ckptd.slim.artifact import ArtifactRequest, WrittenArtifact, split_keep_keys
from ckptd.slim.copyhash import CrcMismatch, Gather, write_archive
from ckptd.slim.dcp import DcpFolder, RunGather, TensorPlan, row_copies
from ckptd.slim.dcp_metadata import TensorMeta
from ckptd.slim.errors import (
    CorruptCheckpointError,
    MissingKeysError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from ckptd.slim.picklewriter import GlobalRefused, NotRepresentable, PickleWriter
from ckptd.slim.safepickle import Inert, InertGlobal, StorageRef, iter_storage_refs
from ckptd.slim.safetensors_writer import DTYPES as SAFETENSORS_DTYPES
from ckptd.slim.safetensors_writer import SUFFIX as SAFETENSORS_SUFFIX
from ckptd.slim.slimmer import zip_records
from ckptd.slim.source import CheckpointSource, scalar_meta, write_output
from ckptd.slim.tensors import NotJson, storage_type_of, to_json
from ckptd.slim.torchzip import Copy, OutRecord, layout_archive

TENSOR_ROOTS = ("state_dict", "model")  # their tensors keep their own names in safetensors


@dataclass(frozen=True, slots=True)
class _Leaf:
    meta: TensorMeta


def _stub(ref: tuple[str, str]) -> type[Inert]:
    return InertGlobal("InertStandIn", (Inert,), {"__slots__": (), "ref": ref})  # type: ignore[return-value]


_REBUILD = _stub(("torch._utils", "_rebuild_tensor_v2"))
_ORDERED = _stub(("collections", "OrderedDict"))


def _set(root: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    """``torch.distributed.checkpoint._traverse.set_element``: str keys make dicts, int keys
    lists (padded with None)."""

    def extend(items: list[Any], index: int) -> None:
        while len(items) <= index:
            items.append(None)

    cur: Any = root
    for prev, key in itertools.pairwise(path):
        fresh: Any = {} if type(key) is str else []
        if type(cur) is dict:
            cur = cur.setdefault(prev, fresh)
        else:
            extend(cur, prev)  # type: ignore[arg-type]
            if cur[prev] is None:
                cur[prev] = fresh
            cur = cur[prev]
    if type(path[-1]) is int:
        extend(cur, path[-1])
    cur[path[-1]] = value


def _has_leaf(value: Any) -> bool:
    if type(value) is _Leaf:
        return True
    if type(value) is dict:
        return any(_has_leaf(v) for v in value.values())
    if type(value) is list:
        return any(_has_leaf(v) for v in value)
    return False


class _Consolidation:
    """The kept keys of one open folder: the nested tree, and the side file's values."""

    def __init__(
        self,
        folder: DcpFolder,
        keep: Sequence[str],
        optional: Sequence[str],
        rename: dict[str, str],
        side: CheckpointSource | None,
    ) -> None:
        self.folder = folder
        order: list[str] = []
        for path in folder.meta.paths.values():
            top = rename.get(str(path[0]), str(path[0]))
            if top not in order:
                order.append(top)
        side_keys = [str(k) for k in side.mapping] if side else []
        available = order + [k for k in side_keys if k not in order]
        if tuple(keep) == ("*",):  # everything, as dcp_to_torch_save writes it
            keep = available
        missing = [k for k in keep if k not in available and k not in optional]
        kept = tuple(k for k in available if k in keep)
        if missing or not kept:
            raise MissingKeysError(folder.path, missing or list(keep), available)
        self.kept, self.dropped = kept, tuple(k for k in available if k not in keep)
        self.tree: dict[str, Any] = {}
        for fqn, path in folder.meta.paths.items():
            top = rename.get(str(path[0]), str(path[0]))
            if top not in kept:
                continue
            tensor = folder.meta.tensors.get(fqn)
            value = _Leaf(tensor) if tensor is not None else folder.byte_item(fqn)
            _set(self.tree, (top, *path[1:]), value)
        for key in kept:
            if key not in self.tree and side is not None:
                value = side.mapping[key]
                if next(iter_storage_refs(value), None) is not None:
                    raise UnsupportedFormatError(
                        side.path,
                        f"key {key!r} holds tensors; ckptd takes tensors only from the shards.",
                        "Remove the key from artifact.keep_keys.",
                    )
                self.tree[key] = value

    def data(self, meta: TensorMeta) -> tuple[TensorPlan, list[Copy | Gather], int]:
        """A tensor's plan, the pieces that write its bytes from output offset 0, and its
        CRC (gathered tensors are read once for it, their chunks' CRCs checked on the way)."""
        plan = self.folder.tensor(meta)
        if plan.rows:
            copies, crc = row_copies(plan, 0, meta.fqn)
            return plan, list(copies), crc
        gather = RunGather(plan, self.folder.path)
        return plan, [gather], gather.crc32()


def _at(pieces: list[Copy | Gather], dest: int) -> list[Copy | Gather]:
    return [
        replace(p, dest_offset=p.dest_offset + dest) if isinstance(p, Copy) else p for p in pieces
    ]


def _torch_output(job: _Consolidation) -> tuple[list[bytes | Copy | Gather], int]:
    """A torch zip (``torch.save``'s layout, ``slimmer.zip_records``) of the kept keys."""
    leaves: dict[int, TensorMeta] = {}  # id(StorageRef) -> its tensor
    keep_alive: list[Any] = []

    def to_record(value: Any) -> Any:
        if type(value) is _Leaf:
            meta = value.meta
            storage_type = storage_type_of(meta.dtype)
            if storage_type is None:
                raise UnsupportedFormatError(
                    job.folder.path,
                    f"holds {meta.fqn!r} of dtype {meta.dtype}, which ckptd writes only to "
                    "safetensors.",
                    "Use artifact.format: safetensors (or --format safetensors).",
                )
            numel = math.prod(meta.size)
            ref = StorageRef(("storage", _stub(storage_type), "", "cpu", numel))
            leaves[id(ref)] = meta
            keep_alive.append(ref)
            return _REBUILD(ref, 0, meta.size, _strides(meta.size), False, _ORDERED())
        if type(value) is dict:
            return {k: to_record(v) for k, v in value.items()}
        if type(value) is list:
            return [to_record(v) for v in value]
        return value

    tree = {key: to_record(value) for key, value in job.tree.items()}
    order: list[TensorMeta] = []

    def persistent_id(ref: StorageRef) -> tuple[Any, ...]:
        meta = leaves.get(id(ref))
        if meta is None:
            raise NotRepresentable("a storage that is not one of the consolidated tensors")
        order.append(meta)
        tag, storage_type, _, location, numel = ref.pid
        pid = (tag, storage_type, str(len(order) - 1), location, numel)
        keep_alive.append(pid)  # the writer memoizes by id: a freed key's id could come back
        return pid

    writer = PickleWriter(persistent_id)
    writer.begin_root(tree, False)
    for key, value in tree.items():
        try:
            writer.save(key)
            writer.save(value)
        except GlobalRefused as exc:
            raise UnsafeCheckpointError(job.folder.path, key, str(exc)) from exc
        except NotRepresentable as exc:
            raise UnsupportedFormatError(job.folder.path, f"key {key!r} holds {exc}.") from exc
    data_pkl = writer.end_root()
    datas = [job.data(meta) for meta in order]
    copies = [
        (str(n), OutRecord(f"data/{n}", plan.nbytes, crc, source_offset=n))
        for n, (plan, _, crc) in enumerate(datas)
    ]
    records, alignment = zip_records(job.folder, data_pkl, copies)
    laid, total = layout_archive(job.folder.prefix(), records, alignment)
    pieces: list[bytes | Copy | Gather] = []
    for piece in laid:
        if isinstance(piece, Copy):  # a placeholder for data/<n>: its chunks go there
            pieces += _at(datas[piece.source_offset][1], piece.dest_offset)
        else:
            pieces.append(piece)
    return pieces, total


def _strides(size: tuple[int, ...]) -> tuple[int, ...]:
    """Contiguous strides, as torch computes them (a dim of size 0 counts as 1)."""
    strides, acc = [], 1
    for n in reversed(size):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def _flatten(
    job: _Consolidation, key: str, name: str, value: Any, tensors: dict[str, TensorMeta]
) -> None:
    if type(value) is _Leaf:
        if value.meta.dtype not in SAFETENSORS_DTYPES or not name or name in tensors:
            why = "two tensors of that name" if name in tensors else f"dtype {value.meta.dtype}"
            raise UnsupportedFormatError(
                job.folder.path,
                f"key {key!r} holds a tensor {name!r} that safetensors cannot hold ({why}).",
                "Use artifact.format: torch.",
            )
        tensors[name] = value.meta
        return
    items = (
        value.items() if type(value) is dict else enumerate(value) if type(value) is list else None
    )
    if items is None:
        raise UnsupportedFormatError(
            job.folder.path,
            f"key {key!r} holds a non-tensor value at {name!r} among its tensors, which has no "
            "place in a safetensors file.",
            "Use artifact.format: torch.",
        )
    for sub, item in items:
        _flatten(job, key, f"{name}.{sub}" if name else str(sub), item, tensors)


def _safetensors_output(job: _Consolidation) -> tuple[list[bytes | Copy | Gather], int]:
    """A safetensors file: tensors back to back after the JSON header."""
    tensors: dict[str, TensorMeta] = {}
    metadata: dict[str, str] = {"format": "pt"}
    for key, value in job.tree.items():
        if _has_leaf(value):
            _flatten(job, key, "" if key in TENSOR_ROOTS else key, value, tensors)
            continue
        try:
            metadata[key] = json.dumps(to_json(value, key), ensure_ascii=False)
        except NotJson as exc:
            raise UnsupportedFormatError(
                job.folder.path, f"key {key!r} holds a value without a JSON form ({exc})."
            ) from exc
    header: dict[str, Any] = {"__metadata__": metadata}
    pos = 0
    for name, meta in tensors.items():
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[meta.dtype],
            "shape": list(meta.size),
            "data_offsets": [pos, pos + meta.nbytes],
        }
        pos += meta.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    prefix = struct.pack("<Q", len(text)) + text
    pieces: list[bytes | Copy | Gather] = [prefix]
    at = len(prefix)
    for meta in tensors.values():
        pieces += _at(job.data(meta)[1], at)
        at += meta.nbytes
    return pieces, at


def consolidate(
    src: Path,
    dest_dir: Path,
    final_name: str | Callable[[str], str],
    keep: Sequence[str],
    fmt: str = "torch",
    progress: Callable[[int, int], None] | None = None,
    *,
    optional: Sequence[str] = (),
    rename: dict[str, str] | None = None,
    side_file: str | None = None,
    cancel: CancelToken | None = None,
) -> WrittenArtifact:
    """Write ``dest_dir/final_name``: the ``keep`` keys of the DCP folder ``src``, unsharded.

    ``rename`` maps the checkpoint's top-level keys to the artifact's (Lightning's ``model`` is
    its ``state_dict``); ``side_file`` is a torch file in the folder whose keys can be kept too
    (Lightning's ``meta.pt``). The contract of ``source.write_single_file``: atomic, durable,
    a ``SlimError`` naming the folder or file, no partial output.
    """
    started = time.perf_counter()
    folder = DcpFolder(src)
    side = None
    try:
        if side_file is not None:
            side = CheckpointSource(src / side_file)
        job = _Consolidation(folder, keep, optional, rename or {}, side)
        build = _safetensors_output if fmt == "safetensors" else _torch_output
        pieces, total = build(job)
        meta = scalar_meta(job.tree.get("meta")) if "meta" in job.kept else {}
        if side is not None:
            side.close()
            side = None

        def write(fd: int, temp: str) -> str:
            try:
                return write_archive(-1, fd, temp, pieces, total, progress, cancel)
            except CrcMismatch as exc:
                folder.check_unchanged()
                file, _, fqn = exc.copy.name.partition(": ")
                raise CorruptCheckpointError(
                    src / file, f"has a CRC mismatch in its chunk of {fqn!r}."
                ) from exc

        target, sha256 = write_output(folder, dest_dir, final_name, output_suffix(fmt), write)
    finally:
        if side is not None:
            side.close()
        folder.close()
    return WrittenArtifact(
        path=target,
        sha256=sha256,
        size=total,
        kept_keys=job.kept,
        dropped_keys=job.dropped,
        source_stat=folder.stat,
        seconds=time.perf_counter() - started,
        meta=meta,
    )


def output_suffix(fmt: str) -> str:
    return SAFETENSORS_SUFFIX if fmt == "safetensors" else ".pth"


class DcpConsolidation:
    """The ``ArtifactWriter`` of DCP folders (``artifact.format`` torch or safetensors)."""

    kind: ClassVar[str] = "dcp consolidation"

    def __init__(
        self, fmt: str = "torch", rename: dict[str, str] | None = None, side_file: str | None = None
    ) -> None:
        self.fmt, self.rename, self.side_file = fmt, rename, side_file

    def write(self, request: ArtifactRequest) -> WrittenArtifact:
        required, optional = split_keep_keys(request.keep)
        return consolidate(
            request.source,
            request.dest_dir,
            request.name,
            (*required, *optional),
            self.fmt,
            request.progress,
            optional=optional,
            rename=self.rename,
            side_file=self.side_file,
            cancel=request.cancel,
        )
