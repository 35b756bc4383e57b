"""Make modules unimportable in a child process, and record every attempt to import them.

``tests/integration/test_torch_optional.py`` puts this folder first on the child's
``PYTHONPATH``; Python imports ``sitecustomize`` at startup, before any ckptd code.
``CKPTD_TEST_BLOCK`` lists the top-level modules (``torch,numpy``); each attempt is appended to
``CKPTD_TEST_BLOCK_LOG`` at once, because code may catch the ImportError and the process may be
killed before it exits.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

BLOCKED = frozenset(filter(None, os.environ.get("CKPTD_TEST_BLOCK", "").split(",")))
LOG = os.environ.get("CKPTD_TEST_BLOCK_LOG", os.devnull)


class BlockImports:
    """First on ``sys.meta_path``: refuses the blocked modules, defers everything else."""

    def find_spec(
        self,
        name: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if name.partition(".")[0] not in BLOCKED:
            return None
        with open(LOG, "a", encoding="utf-8") as log:
            log.write(f"{name}\n")
        raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)


if BLOCKED:
    sys.meta_path.insert(0, BlockImports())
