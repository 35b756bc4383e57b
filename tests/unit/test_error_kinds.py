"""The error kinds a pass reports are an enum, and the metrics' label set is exactly what the
code emits: a dashboard never waits for a kind that cannot happen, nor misses one that does."""

from __future__ import annotations

import ast
from pathlib import Path

from ckptd.engine.outcome import ErrorKind
from ckptd.service.metrics import ERROR_KINDS

PACKAGE = Path(__file__).resolve().parents[2] / "ckptd"


def emitted_kinds() -> dict[str, list[str]]:
    """ErrorKind members passed to ``<report>.error(...)`` anywhere in the package."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "error"
                and len(node.args) == 2
            ):
                continue
            kind = node.args[0]
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            assert (
                isinstance(kind, ast.Attribute)
                and isinstance(kind.value, ast.Name)
                and kind.value.id == "ErrorKind"
            ), f"{where}: report.error() takes an ErrorKind member, not {ast.unparse(kind)}"
            found.setdefault(kind.attr, []).append(where)
    return found


def test_every_error_kind_is_emitted_and_nothing_else() -> None:
    emitted = emitted_kinds()
    assert set(emitted) == {k.name for k in ErrorKind}, emitted


def test_metrics_label_set_is_the_enum() -> None:
    assert set(ERROR_KINDS) == {str(k) for k in ErrorKind}
