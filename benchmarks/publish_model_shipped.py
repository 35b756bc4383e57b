"""MMDetection's ``tools/model_converters/publish_model.py`` as shipped (run as a child process).

``python benchmarks/publish_model_shipped.py IN OUT.pth`` does what that script does, in this
project's own words: ``torch.load`` the whole checkpoint, pop every key but ``meta`` and
``state_dict``, ``torch.save`` it in the legacy format (the script passes
``_use_new_zipfile_serialization=False`` on any torch >= 1.6), run the coreutils ``sha256sum``
on the output and ``mv`` it to ``OUT-<first 8 hex digits>.pth``. Two differences, both needed
to run it here and neither making it slower: ``weights_only=False`` (torch >= 2.6 refuses the
numpy arrays of MMEngine's message hub otherwise), and the ``mv`` is waited for (the script
leaves it running) so the file is in place when the process ends. Prints the final path.
"""

from __future__ import annotations

import subprocess
import sys

import torch

SAVE_KEYS = ("meta", "state_dict")


def main() -> int:
    src, out = sys.argv[1], sys.argv[2]
    checkpoint = torch.load(src, map_location="cpu", weights_only=False)
    for key in list(checkpoint):
        if key not in SAVE_KEYS:
            checkpoint.pop(key, None)
    torch.save(checkpoint, out, _use_new_zipfile_serialization=False)
    sha = subprocess.check_output(["sha256sum", out]).decode()
    final = (out[:-4] if out.endswith(".pth") else out) + f"-{sha[:8]}.pth"
    subprocess.run(["mv", out, final], check=True)
    print(final)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
