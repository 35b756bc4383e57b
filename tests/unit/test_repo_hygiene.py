"""The repository is self-contained: no tracked file names a path outside it, every design-note
reference resolves to docs/DESIGN.md, and every invariant a file cites exists there.

A reference to one machine's folder reads fine where it was written and silently does nothing
(or skips a test) everywhere else, so these checks fail naming file:line.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[2]
DESIGN = "docs/DESIGN.md"
# This file spells the patterns out; everything else tracked is scanned.
SELF = PurePosixPath(Path(__file__).resolve().relative_to(REPO).as_posix())
OUTSIDE = re.compile(r"/work/|\.\./shared/|shared/DESIGN")
# A path-like token ending in DESIGN.md, and whether it is a markdown link target.
DESIGN_REF = re.compile(r"(\]\()?([\w./-]*DESIGN\.md)")
# "invariant 2", "invariants 1, 3 and 5"
CITATION = re.compile(r"\binvariants? (\d+(?:(?:, | and )\d+)*)", re.IGNORECASE)
NUMBERED = re.compile(r"^(\d+)\. ", re.MULTILINE)


def tracked_files() -> list[PurePosixPath]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout, so there is no list of tracked files: {exc}")
    return [PurePosixPath(p) for p in out.decode().split("\0") if p]


def lines(path: PurePosixPath) -> Iterator[tuple[int, str]]:
    try:
        text = (REPO / path).read_text(encoding="utf-8")
    except (UnicodeDecodeError, FileNotFoundError):  # binary, or deleted but not yet staged
        return
    yield from enumerate(text.splitlines(), start=1)


def resolves_to_design(path: PurePosixPath, ref: str, link: bool) -> bool:
    # Prose names the file from the repository root; a markdown link is relative to its page.
    base = path.parent if link else PurePosixPath()
    parts: list[str] = []
    for part in (base / ref).parts:
        if part == "..":
            if not parts:
                return False
            parts.pop()
        elif part != ".":
            parts.append(part)
    return "/".join(parts) == DESIGN


def invariant_numbers() -> set[int]:
    text = (REPO / DESIGN).read_text(encoding="utf-8")
    _, found, section = text.partition("\n## 3. Invariants\n")
    assert found, f"{DESIGN} has no '## 3. Invariants' section (README and ARCHITECTURE link it)"
    section = section.split("\n## ", 1)[0]
    numbers = [int(n) for n in NUMBERED.findall(section)]
    assert numbers == list(range(1, len(numbers) + 1)), f"{DESIGN}: invariants numbered {numbers}"
    return set(numbers)


def test_no_file_names_a_path_outside_the_repository() -> None:
    bad = [
        f"{path}:{n}: {line.strip()}"
        for path in tracked_files()
        if path != SELF
        for n, line in lines(path)
        if OUTSIDE.search(line)
    ]
    assert not bad, "paths outside the repository:\n" + "\n".join(bad)


def test_design_references_resolve_to_docs_design() -> None:
    bad = [
        f"{path}:{n}: {m.group(2)!r} is not {DESIGN}"
        for path in tracked_files()
        if path != SELF
        for n, line in lines(path)
        for m in DESIGN_REF.finditer(line)
        if not resolves_to_design(path, m.group(2), link=bool(m.group(1)))
    ]
    assert not bad, "design-note references that do not resolve:\n" + "\n".join(bad)
    assert (REPO / DESIGN).is_file(), f"{DESIGN} is missing"


def test_cited_invariants_exist_in_the_design() -> None:
    known = invariant_numbers()
    assert len(known) == 7, "README says 'the seven invariants'; update it with the list"
    bad = [
        f"{path}:{n}: invariant {number} (docs/DESIGN.md has {min(known)}-{max(known)})"
        for path in tracked_files()
        if path.suffix in (".py", ".md")
        for n, line in lines(path)
        for m in CITATION.finditer(line)
        for number in map(int, re.findall(r"\d+", m.group(1)))
        if number not in known
    ]
    assert not bad, "cited invariants that docs/DESIGN.md does not have:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("path", "ref", "link", "ok"),
    [
        ("ckptd/slim.py", "docs/DESIGN.md", False, True),
        ("ckptd/slim.py", "DESIGN.md", False, False),
        ("README.md", "docs/DESIGN.md", True, True),
        ("docs/ARCHITECTURE.md", "DESIGN.md", True, True),
        ("docs/ARCHITECTURE.md", "../DESIGN.md", True, False),
        ("tests/x.py", "../" + "shared/DESIGN.md", False, False),  # split, or OUTSIDE finds it
    ],
)
def test_reference_resolution(path: str, ref: str, link: bool, ok: bool) -> None:
    assert resolves_to_design(PurePosixPath(path), ref, link) is ok
