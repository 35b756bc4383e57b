"""The figure each fault test reports (runs, faults injected, inputs tried, what was lost).

Printed past pytest's capture so it shows in every run's output, and appended as a JSON line to
``$CKPTD_FIGURES`` when that is set (the README's Reliability section is filled from it).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest


def env_number(name: str, default: float) -> float:
    """A scale knob such as ``CKPTD_CRASH_RUNS``; CI runs the defaults."""
    value = os.environ.get(name)
    return float(value) if value else default


def report(capsys: pytest.CaptureFixture[str], test: str, **figures: Any) -> None:
    figures.setdefault("lost", "nothing")
    text = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in figures.items())
    with capsys.disabled():
        print(f"\n[reliability] {test}: {text}", flush=True)
    path = os.environ.get("CKPTD_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "time": time.time(), **figures}, default=str) + "\n")
