"""Where each parameter of a DeepSpeed ZeRO checkpoint lies in its shards: byte ranges only.

The arithmetic of DeepSpeed's own ``deepspeed/utils/zero_to_fp32.py``
(``_zero2_merge_trainable_params``, ``_zero3_merge_trainable_params``,
``_zero3_merge_frozen_params``), without its tensors: a flat fp32 group is a ``Part`` of one
shard file, and a parameter becomes the list of ``Part``s whose bytes, concatenated, are the
parameter in row-major order. Nothing here reads a file, so the consolidating writer can copy
those ranges in the kernel, one parameter after the other, never holding the model.

- ZeRO 1/2: rank r's ``single_partition_of_fp32_groups[g]`` is the r-th slice of group g; the
  group is their concatenation, each parameter a run of it (plus its
  ``param_alignment_paddings``), and the group is used up to ``2 * world_size`` alignment.
- ZeRO 3: every parameter is cut into ``ceil(numel / world_size)`` elements per rank, laid one
  after the other in each rank's ``fp32_flat_groups`` (groups concatenated); the parameter is
  the concatenation of the ranks' slices, cut to its numel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


class LayoutMismatch(Exception):
    """The shards do not add up to the parameters the model states name (the text says how)."""


@dataclass(frozen=True, slots=True)
class Part:
    """``size`` bytes at byte ``offset`` of the file open as ``fd``."""

    fd: int
    offset: int
    size: int


def take(parts: Sequence[Part], start: int, count: int, itemsize: int) -> tuple[Part, ...]:
    """Elements ``[start, start + count)`` of the concatenation of ``parts``, as parts."""
    first, last = start * itemsize, (start + count) * itemsize
    out: list[Part] = []
    pos = 0
    for part in parts:
        lo, hi = max(first, pos), min(last, pos + part.size)
        if lo < hi:
            out.append(Part(part.fd, part.offset + lo - pos, hi - lo))
        pos += part.size
        if pos >= last:
            break
    if pos < last and count:
        raise LayoutMismatch(
            f"elements {start}..{start + count} are past the end of the shards "
            f"({pos // itemsize} elements)"
        )
    return tuple(out)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def zero2_params(
    shapes: Sequence[Sequence[tuple[str, tuple[int, ...]]]],
    groups: Sequence[Sequence[Part]],
    paddings: Sequence[Sequence[int]] | None,
    itemsize: int,
) -> list[tuple[str, tuple[int, ...], tuple[Part, ...]]]:
    """ZeRO 1/2: ``groups[rank][g]`` is rank's slice of group g; ``shapes[g]`` its params."""
    world_size = len(groups)
    if any(len(rank) != len(shapes) for rank in groups):
        raise LayoutMismatch(
            f"the model states name {len(shapes)} parameter groups, the optimizer states hold "
            f"{sorted({len(rank) for rank in groups})}"
        )
    out = []
    align = 2 * world_size
    for g, group_shapes in enumerate(shapes):
        flat = [rank[g] for rank in groups]
        avail = sum(p.size for p in flat) // itemsize
        pads = paddings[g] if paddings is not None else None
        if pads is not None and len(pads) != len(group_shapes):
            raise LayoutMismatch(
                f"group {g} has {len(group_shapes)} parameters but {len(pads)} alignment paddings"
            )
        offset = 0
        for i, (name, shape) in enumerate(group_shapes):
            numel = _numel(shape)
            out.append((name, shape, take(flat, offset, numel, itemsize)))
            offset += numel + (pads[i] if pads is not None else 0)
        if align * math.ceil(offset / align) != align * math.ceil(avail / align):
            raise LayoutMismatch(f"group {g}: consumed {offset} elements out of {avail}")
    return out


def zero3_partition(numel: int, world_size: int) -> int:
    """Elements of a parameter each rank holds (the last ones padding)."""
    return math.ceil(numel / world_size)


def zero3_params(
    shapes: Sequence[tuple[str, tuple[int, ...]]],
    groups: Sequence[Sequence[Part]],
    itemsize: int,
) -> list[tuple[str, tuple[int, ...], tuple[Part, ...]]]:
    """ZeRO 3: ``groups[rank]`` are rank's flat groups; ``shapes`` every trainable param."""
    world_size = len(groups)
    sizes = {sum(p.size for p in rank) for rank in groups}
    if len(sizes) != 1:
        raise LayoutMismatch(f"the ranks' flat groups differ in size: {sorted(sizes)} bytes")
    avail = sizes.pop() // itemsize * world_size
    out = []
    offset = 0
    for name, shape in shapes:
        numel = _numel(shape)
        per_rank = zero3_partition(numel, world_size)
        slices = [p for rank in groups for p in take(rank, offset, per_rank, itemsize)]
        out.append((name, shape, take(slices, 0, numel, itemsize)))
        offset += per_rank
    if offset * world_size != avail:
        raise LayoutMismatch(f"consumed {offset * world_size} elements out of {avail}")
    return out


def zero3_frozen(
    name: str, shape: tuple[int, ...], fragments: Sequence[Part], itemsize: int
) -> tuple[Part, ...]:
    """A frozen ZeRO-3 parameter: the ranks' fragments concatenated, cut to its numel."""
    return take(fragments, 0, _numel(shape), itemsize)
