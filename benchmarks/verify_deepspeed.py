"""Compare two consolidated state_dicts tensor for tensor (a child process of bench_deepspeed).

``python benchmarks/verify_deepspeed.py THEIRS OURS``: THEIRS is what ``zero_to_fp32.py`` wrote
(``pytorch_model.bin`` or ``model.safetensors``), OURS ckptd's (a torch zip with ``state_dict``,
or safetensors). Exit 0 and print the tensor count when every tensor is equal in name, dtype,
shape and value.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def load(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    loaded = torch.load(path, weights_only=True, mmap=True)
    return loaded.get("state_dict", loaded)


def main() -> int:
    theirs, ours = load(Path(sys.argv[1])), load(Path(sys.argv[2]))
    # a safetensors file keeps no order (safetensors writes its header sorted)
    ordered = not sys.argv[1].endswith(".safetensors")
    if (list(theirs) != list(ours)) if ordered else (sorted(theirs) != sorted(ours)):
        print(f"names differ: {sorted(set(theirs) ^ set(ours))[:5]}")
        return 1
    for name, tensor in theirs.items():
        mine = ours[name]
        if (
            mine.dtype != tensor.dtype
            or mine.shape != tensor.shape
            or not torch.equal(mine, tensor)
        ):
            print(f"tensor {name} differs")
            return 1
    print(len(theirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
