"""The ``disk:``, ``hooks:`` and ``priority:`` sections of ``ckptd.yaml``: how ckptd acts
around the trainers (a free-space watermark across runs, commands on events, its own CPU and
I/O priority), beside retention."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from ckptd.core.configtypes import Duration, _Strict
from ckptd.core.units import parse_size


class DiskConfig(_Strict):
    """``disk.min_free``: a watermark per filesystem, a share ("15%") or a size ("200GiB")."""

    min_free: str

    @field_validator("min_free", mode="before")
    @classmethod
    def _share_or_size(cls, value: Any) -> str:
        text = str(value).strip()
        if text.endswith("%"):
            try:
                share = float(text[:-1])
            except ValueError:
                share = -1.0
            if not 0 < share < 100:
                raise ValueError(f"{text!r}: a share must be between 0% and 100%, e.g. 15%")
            return text
        try:
            if parse_size(text) <= 0:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{text!r} is neither a share (e.g. 15%) nor a size (e.g. 200GiB)"
            ) from None
        return text

    def threshold(self, total_bytes: int) -> int:
        """The free bytes wanted on a filesystem of ``total_bytes``."""
        if self.min_free.endswith("%"):
            return int(total_bytes * float(self.min_free[:-1]) / 100)
        return parse_size(self.min_free)


class HooksConfig(_Strict):
    """Commands ckptd runs on events, with no shell (see docs/hooks.md)."""

    # argv; a name without '/' is looked up on PATH when the hook runs
    on_new_best: list[str] | None = None
    timeout: Duration = 30.0  # killed after it

    @field_validator("on_new_best")
    @classmethod
    def _a_command(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError(
                    "give the command as a list, e.g. [/usr/local/bin/notify, --channel, ml]"
                )
            if not value[0].strip():
                raise ValueError("the first item, the executable, is empty")
        return value

    @field_validator("timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0, e.g. 30s")
        return value


class PriorityConfig(_Strict):
    """ckptd's own priority, lowered at the start of ``ckptd run`` and ``ckptd once``."""

    nice: int | None = Field(default=10, ge=-20, le=19)  # null: leave the nice value alone
    io_idle: bool = True  # the idle I/O scheduling class (ioprio_set); false: leave it
