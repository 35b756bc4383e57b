"""Check a slim artifact against its source checkpoint (run as a child process).

``python benchmarks/verify_slim.py SOURCE SLIM``: the slim file must load with
``torch.load(weights_only=True)``, hold exactly ``meta`` and ``state_dict``, and its
``state_dict`` must be bit-identical to the source's (same keys in the same order, dtypes,
shapes, strides and bytes); ``meta`` must compare equal. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys

import torch


def main() -> int:
    source = torch.load(sys.argv[1], map_location="cpu", weights_only=False, mmap=True)
    slim = torch.load(sys.argv[2], map_location="cpu", weights_only=True, mmap=True)
    problems = []
    if list(slim) != ["meta", "state_dict"]:
        problems.append(f"keys {list(slim)}")
    if slim.get("meta") != source["meta"]:
        problems.append("meta differs")
    a, b = source["state_dict"], slim.get("state_dict", {})
    if list(a) != list(b):
        problems.append("state_dict keys differ")
    for key in a:
        x, y = a[key], b.get(key)
        if y is None:
            continue
        same = (
            x.dtype == y.dtype
            and x.shape == y.shape
            and x.stride() == y.stride()
            and x.storage_offset() == y.storage_offset()
            and x.contiguous()
            .view(torch.uint8)
            .reshape(-1)
            .equal(y.contiguous().view(torch.uint8).reshape(-1))
            if x.dim()
            else x.dtype == y.dtype
            and x.view(-1).view(torch.uint8).equal(y.view(-1).view(torch.uint8))
        )
        if not same:
            problems.append(f"state_dict[{key!r}] differs")
    print(json.dumps({"identical": not problems, "tensors": len(a), "problems": problems[:5]}))
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
