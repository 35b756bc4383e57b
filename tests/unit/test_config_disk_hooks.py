"""disk.min_free and hooks.on_new_best in ckptd.yaml: parsed, and errors naming the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptd.core.config import ConfigError, effective_config_yaml, load_config

PROJECT = "projects:\n  - name: p\n    work_dirs: [./w/*]\n"


def load(tmp_path: Path, text: str):
    path = tmp_path / "ckptd.yaml"
    path.write_text(text)
    return load_config(path)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value)


def test_disk_and_hooks_parse_and_default_to_off(tmp_path: Path) -> None:
    loaded = load(tmp_path, PROJECT)
    assert loaded.config.disk is None
    assert loaded.config.projects[0].hooks.on_new_best is None
    text = (
        PROJECT
        + "    hooks:\n      on_new_best: [notify, --channel, ml]\n      timeout: 5s\n"
        + "disk:\n  min_free: 15%\n"
    )
    loaded = load(tmp_path, text)
    assert loaded.config.disk is not None and loaded.config.disk.min_free == "15%"
    hooks = loaded.config.projects[0].hooks
    assert hooks.on_new_best == ["notify", "--channel", "ml"] and hooks.timeout == 5
    assert "min_free: 15%" in effective_config_yaml(loaded)


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        ("disk:\n  min_free: 150%\n", "disk.min_free: '150%': a share must be between"),
        ("disk:\n  min_free: lots\n", "disk.min_free: 'lots' is neither a share"),
        ("disk:\n  free: 1GiB\n", "disk.free: unknown key; allowed here: min_free"),
        ("    hooks:\n      on_new_best: []\n", "projects[0].hooks.on_new_best: give the command"),
        ("    hooks:\n      on_new_best: curl -d x\n", "projects[0].hooks.on_new_best"),
        ("    hooks:\n      on_new_best: ['', x]\n", "the first item, the executable, is empty"),
        ("    hooks:\n      on_new_best: [x, 3]\n", "projects[0].hooks.on_new_best[1]"),
        ("    hooks:\n      on_new_best: [x]\n      timeout: 0s\n", "hooks.timeout: must be"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, tail: str, expected: str) -> None:
    assert expected in error_of(tmp_path, PROJECT + tail)
