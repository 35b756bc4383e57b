"""ZeRO partition arithmetic as byte ranges, against a simulation of how DeepSpeed partitions.

The simulation writes each rank's flat fp32 buffer the way DeepSpeed's optimizers do (ZeRO 3:
each parameter padded to ``world * ceil(numel / world)`` and cut into equal rank slices, laid
one after the other, over several groups; ZeRO 1/2: the concatenated group padded to
``2 * world`` alignment and cut into equal rank partitions); reading the parameters back through
``zero_layout``'s parts must give each parameter's elements in order.
"""

from __future__ import annotations

import math
import struct

import pytest

from ckptd.slim.zero_layout import LayoutMismatch, Part, take, zero2_params, zero3_params


def read(parts: tuple[Part, ...], files: dict[int, bytes]) -> list[int]:
    data = b"".join(files[p.fd][p.offset : p.offset + p.size] for p in parts)
    return list(struct.unpack(f"<{len(data) // 4}i", data))


SHAPES = [(3, 5), (7,), (1,), (4, 4, 3), (11,)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("groups", [1, 2])
def test_zero3_parameters_come_back_whole(world: int, groups: int) -> None:
    params = [(f"p{i}", shape) for i, shape in enumerate(SHAPES)]
    values = {n: list(range(1000 * i, 1000 * i + math.prod(s))) for i, (n, s) in enumerate(params)}
    ranks: list[list[int]] = [[] for _ in range(world)]
    for name, shape in params:
        per = math.ceil(math.prod(shape) / world)
        padded = values[name] + [-1] * (per * world - len(values[name]))
        for r in range(world):
            ranks[r] += padded[r * per : (r + 1) * per]
    files = {r: struct.pack(f"<{len(ranks[r])}i", *ranks[r]) for r in range(world)}
    cut = len(ranks[0]) // 2 if groups == 2 else len(ranks[0])  # groups split a rank's buffer
    size = len(ranks[0]) * 4
    flat = [[Part(r, 0, cut * 4), Part(r, cut * 4, size - cut * 4)] for r in range(world)]
    for name, _, parts in zero3_params(params, flat, 4):
        assert read(parts, files) == values[name], name


@pytest.mark.parametrize("world", [1, 2, 3])
def test_zero2_parameters_come_back_whole(world: int) -> None:
    params = [(f"p{i}", shape) for i, shape in enumerate(SHAPES)]
    group: list[int] = []
    for i, (_, shape) in enumerate(params):
        group += list(range(1000 * i, 1000 * i + math.prod(shape)))
    align = 2 * world
    group += [-1] * (align * math.ceil(len(group) / align) - len(group))
    per = len(group) // world
    files = {r: struct.pack(f"<{per}i", *group[r * per : (r + 1) * per]) for r in range(world)}
    flat = [[Part(r, 0, per * 4)] for r in range(world)]
    out = zero2_params([params], flat, None, 4)
    for i, (name, shape, parts) in enumerate(out):
        assert read(parts, files) == list(range(1000 * i, 1000 * i + math.prod(shape))), name


def test_shards_that_do_not_add_up_are_refused() -> None:
    with pytest.raises(LayoutMismatch):
        zero3_params([("p", (10,))], [[Part(0, 0, 4 * 4)], [Part(1, 0, 4 * 4)]], 4)
    with pytest.raises(LayoutMismatch):
        take([Part(0, 0, 8)], 1, 5, 4)
