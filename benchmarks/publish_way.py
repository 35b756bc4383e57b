"""The ``publish_model.py`` way of slimming, for comparison (run as a child process).

``python benchmarks/publish_way.py IN OUT``: ``torch.load(weights_only=False)`` of the whole
file (it runs the pickled code), pop every key but ``meta`` and ``state_dict``,
``torch.save``. MMDetection's ``tools/model_converters/publish_model.py`` does this and then
also runs ``sha256sum`` on the output; the sha256 and any fsync are left out here, so this
side of the comparison is, if anything, flattered.
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    src, dst = sys.argv[1], sys.argv[2]
    checkpoint = torch.load(src, map_location="cpu", weights_only=False)
    for key in list(checkpoint):
        if key not in ("meta", "state_dict"):
            checkpoint.pop(key)
    torch.save(checkpoint, dst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
