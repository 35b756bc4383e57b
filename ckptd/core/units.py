"""Human units for durations and sizes: parsed strictly, printed back the way users write them."""

from __future__ import annotations

import math
import re

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "p": 10**15,
    "pb": 10**15,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
    "pi": 2**50,
    "pib": 2**50,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")

DURATION_HELP = "a duration such as 90s, 5m, 1h30m, 2d or a number of seconds"
SIZE_HELP = "a size such as 500MB, 200GiB, 1.5TB or a number of bytes"


def parse_duration(value: object) -> float:
    """Seconds from ``"1h30m"``, ``"500ms"``, ``90`` …; raises ValueError naming what is allowed."""
    if isinstance(value, bool):
        raise ValueError(f"expected {DURATION_HELP}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif text and _DURATION_PART.sub("", text) == "":
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
        else:
            raise ValueError(f"cannot read {value!r} as a duration; expected {DURATION_HELP}")
    else:
        raise ValueError(f"expected {DURATION_HELP}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be finite and >= 0, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    parts = []
    rest = seconds
    for unit in ("d", "h", "m"):
        size = _DURATION_UNITS[unit]
        whole = int(rest // size)
        if whole:
            parts.append(f"{whole}{unit}")
            rest -= whole * size
    if rest:
        parts.append(f"{rest:g}s")
    return "".join(parts)


def parse_size(value: object) -> int:
    """Bytes from ``"200GiB"``, ``"1.5TB"``, ``1048576`` …; decimal and binary prefixes."""
    if isinstance(value, bool):
        raise ValueError(f"expected {SIZE_HELP}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float) and value.is_integer():
        size = int(value)
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value.strip().lower())
        if not match or match.group(2) not in _SIZE_UNITS:
            raise ValueError(f"cannot read {value!r} as a size; expected {SIZE_HELP}")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    else:
        raise ValueError(f"expected {SIZE_HELP}")
    if size < 0:
        raise ValueError(f"a size must be >= 0, got {value!r}")
    return size


def format_size(size: int | float) -> str:
    """``1536 → '1.5 KiB'``: binary units with one decimal, for people."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
