"""Logging for people by default and JSON lines for log shippers (``--log-format json``).

Actions log with ``extra={"fields": {...}}`` (work_dir, checkpoint, rule/reason, bytes); the
text format appends them as ``key=value`` and the JSON format as top-level keys.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        text = f"{stamp} {record.levelname:<7} {record.getMessage()}"
        extra = " ".join(f"{k}={_quote(v)}" for k, v in _fields(record).items() if v is not None)
        if extra:
            text += f"  {extra}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(_fields(record))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def setup_logging(fmt: str = "text", verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("ckptd")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


class CompactFormatter(logging.Formatter):
    """``12:19:53  delete: epoch_1.pth  (older than the 2 newest; evaluated)`` for the demo."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = _fields(record)
        why = fields.get("reason") or ""
        if fields.get("action") == "slim" and fields.get("bytes"):
            why = f"{int(fields['bytes']) / 2**20:.1f} MiB, meta + state_dict only"
        return f"{stamp}  {record.getMessage()}" + (f"  ({why})" if why else "")


def use_compact_logging() -> None:
    """One short line per action; the start of each slim is implied by its result."""
    for handler in logging.getLogger("ckptd").handlers:
        handler.setFormatter(CompactFormatter())
        handler.addFilter(lambda record: _fields(record).get("action") != "slim-start")
