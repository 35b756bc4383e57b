"""Imports between ckptd's packages flow one way, and docs/ARCHITECTURE.md maps every module.

Every import counts: at module level, inside functions, and under ``if TYPE_CHECKING:`` (a
type-only import upward is still a layer that knows about the one above it).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "ckptd"
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"

# Bottom to top: a package may import only from itself and the packages before it.
LAYERS = (
    "core",  # pure values and decisions
    "fs",  # durable writes, deletion through directory fds, plain names
    "slim",  # reading and slimming torch checkpoints
    "layouts",  # trainer formats (read-only)
    "engine",  # one reconcile pass
    "publish",  # object storage, after the pass
    "present",  # how passes are shown
    "service",  # the daemon
    "demo",  # ckptd demo and the simulated trainer
    "cli",  # the commands
)
# ckptd/__init__.py (the version) is below every layer; ckptd/__main__.py is above them all.
ROOT_RANK = -1
MAIN_RANK = len(LAYERS)


@dataclass(frozen=True)
class Import:
    source: Path  # the importing file
    line: int
    target: str  # dotted module imported (or the module a name is imported from)


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@cache
def _imports() -> tuple[Import, ...]:
    found = []
    for path in _modules():
        tree = ast.parse(path.read_text(), str(path))
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):  # every nesting level: functions, TYPE_CHECKING blocks
            if isinstance(node, ast.Import):
                found += [Import(path, node.lineno, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolved against the importing package
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                # ``from ckptd.engine import artifacts`` imports a module, not a name
                found += [
                    Import(path, node.lineno, f"{target}.{a.name}")
                    if _is_module(f"{target}.{a.name}")
                    else Import(path, node.lineno, target)
                    for a in node.names
                ]
    return tuple(i for i in found if i.target == "ckptd" or i.target.startswith("ckptd."))


def _is_module(dotted: str) -> bool:
    path = REPO.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _layer(dotted: str) -> str:
    parts = dotted.split(".")
    if len(parts) == 1:
        return "ckptd"
    if parts[1] == "__main__":
        return "__main__"
    return parts[1]


def _rank(layer: str) -> int:
    if layer == "ckptd":
        return ROOT_RANK
    if layer == "__main__":
        return MAIN_RANK
    return LAYERS.index(layer)


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _file_of(dotted: str) -> str:
    path = REPO.joinpath(*dotted.split("."))
    file = path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"
    return _rel(file)


def test_every_module_is_in_a_layer() -> None:
    """A flat module or a new package must be placed in the order before it is used."""
    stray = [
        _rel(p)
        for p in _modules()
        if (p.parent == PACKAGE and p.name not in ("__init__.py", "__main__.py"))
        or (p.parent != PACKAGE and p.relative_to(PACKAGE).parts[0] not in LAYERS)
    ]
    assert not stray, f"not in any layer of tests/unit/test_layering.py's LAYERS: {stray}"


def test_every_import_resolves() -> None:
    missing = [
        f"{_rel(i.source)}:{i.line} imports {i.target}"
        for i in _imports()
        if not _is_module(i.target)
    ]
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_imports_flow_one_way() -> None:
    upward = []
    for i in _imports():
        source, target = _layer(_module_name(i.source)), _layer(i.target)
        if _rank(target) > _rank(source):
            upward.append(
                f"{_rel(i.source)}:{i.line} imports {_file_of(i.target)}: "
                f"{source} is below {target} in LAYERS"
            )
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_cycle_between_packages() -> None:
    """Independent of LAYERS: a cycle is a knot even if someone reorders the list."""
    edges: dict[tuple[str, str], Import] = {}
    for i in _imports():
        source, target = _layer(_module_name(i.source)), _layer(i.target)
        if source != target:
            edges.setdefault((source, target), i)
    graph: dict[str, set[str]] = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)

    def path_between(start: str, goal: str) -> list[str] | None:
        todo, seen = [[start]], {start}
        while todo:
            walk = todo.pop()
            if walk[-1] == goal:
                return walk
            for nxt in sorted(graph.get(walk[-1], ())):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append([*walk, nxt])
        return None

    cycles, seen = [], set()
    for (source, target), i in sorted(edges.items()):
        back = path_between(target, source)
        if back and frozenset(back) not in seen:  # each cycle once, not once per edge
            seen.add(frozenset(back))
            j = edges[(back[0], back[1])]
            cycles.append(
                f"{source} -> {target} ({_rel(i.source)}:{i.line} imports {_file_of(i.target)}) "
                f"and back {' -> '.join(back)} ({_rel(j.source)}:{j.line} imports "
                f"{_file_of(j.target)})"
            )
    assert not cycles, "cycles between packages:\n" + "\n".join(cycles)


def _only_a_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return len(body) <= 1 and all(
        isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body
    )


def test_architecture_maps_every_module() -> None:
    text = ARCHITECTURE.read_text()
    packages = sorted({f"ckptd/{p}/" for p in LAYERS})
    modules = [_rel(p) for p in _modules() if not _only_a_docstring(p)]
    missing = [name for name in [*packages, *modules] if f"`{name}`" not in text]
    assert not missing, f"not in docs/ARCHITECTURE.md's package map: {missing}"
