"""Config errors name the file, the key path and what is allowed; defaults are the contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptd.core.config import ConfigError, effective_config_yaml, load_config
from ckptd.core.units import format_duration, format_size, parse_duration, parse_size

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ckptd.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return str(info.value)


def test_repo_default_config_is_valid_and_watches_work_dirs() -> None:
    loaded = load_config(REPO / "ckptd.yaml")
    project = loaded.config.projects[0]
    assert project.work_dirs == ["./work_dirs/*"]
    assert project.retention.keep_last == 2
    assert project.retention.keep_best == 0 and project.retention.keep_best_full is None
    assert project.retention.pending_eval_grace == 3600
    assert loaded.config.watch.resync_interval == 300


def test_contract_shape_from_the_issue_parses(tmp_path: Path) -> None:
    loaded = load_config(
        write(
            tmp_path,
            """
projects:
  - name: detection
    work_dirs: ["./work_dirs/*"]
    layout: auto
    best:
      metric: ["coco/bbox_mAP", "coco/segm_mAP"]
      rule: [greater, auto]
    retention:
      keep_last: 2
      keep_every: 5
      keep_best: 3
      pending_eval_grace: 1h30m
      max_total_size: "200GiB"
    artifact:
      dir: "{work_dir}/best"
      keep_keys: [meta, state_dict]
      hash_in_name: true
    dry_run: false
""",
        )
    )
    project = loaded.config.projects[0]
    assert project.best.metric == ["coco/bbox_mAP", "coco/segm_mAP"]
    assert project.best.rule_for(1) == "auto"
    assert project.retention.max_total_size == 200 * 2**30
    assert project.retention.pending_eval_grace == 5400
    text = effective_config_yaml(loaded)
    assert "max_total_size: 200.0 GiB" in text and "pending_eval_grace: 1h30m" in text
    # the printed effective config is itself a valid config
    assert load_config(write(tmp_path, text)).config == loaded.config


def test_single_metric_string_becomes_a_list(tmp_path: Path) -> None:
    loaded = load_config(
        write(tmp_path, "projects: [{name: a, work_dirs: [x], best: {metric: accuracy/top1}}]")
    )
    assert loaded.config.projects[0].best.metric == ["accuracy/top1"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("retention: {keep_last: 0}", "projects[0].retention.keep_last: Input should be greater"),
        (
            "retention: {keep_lst: 3}",
            "projects[0].retention.keep_lst: unknown key; allowed here: keep_last",
        ),
        (
            "retention: {max_total_size: lots}",
            "projects[0].retention.max_total_size: cannot read 'lots' as a size",
        ),
        (
            "retention: {pending_eval_grace: soon}",
            "projects[0].retention.pending_eval_grace: cannot read 'soon' as a duration",
        ),
        ("retention: {keep_every: 0}", "projects[0].retention.keep_every"),
        ("retention: {keep_last: two}", "projects[0].retention.keep_last"),
        (
            "best: {rule: bigger}",
            "projects[0].best.rule: unknown rule 'bigger'; use auto, greater or less",
        ),
        ("best: {metric: [a, b], rule: [greater]}", "rule lists 1 entries but metric lists 2"),
        ("best: {metric: auto, rule: [greater]}", "with metric: auto, rule must be one of"),
        ("best: {metric: []}", "projects[0].best.metric"),
        ("layout: tensorflow", "projects[0].layout: Input should be 'auto', 'mmengine', 'mmcv'"),
        ("artifact: {dir: '{wd}/best'}", "unknown placeholder {wd}"),
        ("artifact: {keep_keys: []}", "projects[0].artifact.keep_keys"),
        ("dry_run: maybe", "projects[0].dry_run"),
    ],
)
def test_errors_name_file_key_and_allowed(tmp_path: Path, body: str, expected: str) -> None:
    message = error_of(tmp_path, f"projects:\n  - name: a\n    work_dirs: [x]\n    {body}\n")
    assert str(tmp_path / "ckptd.yaml") in message
    assert expected in message


def test_top_level_errors(tmp_path: Path) -> None:
    assert "required key is missing" in error_of(tmp_path, "watch: {mode: poll}\n")
    assert "unknown key; allowed here: projects, watch" in error_of(tmp_path, "projcts: []\n")
    assert "watch.mode" in error_of(
        tmp_path, "projects: [{name: a, work_dirs: [x]}]\nwatch: {mode: x}"
    )
    assert "the file is empty" in error_of(tmp_path, "")
    assert "two projects are named 'a'" in error_of(
        tmp_path, "projects: [{name: a, work_dirs: [x]}, {name: a, work_dirs: [y]}]"
    )


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    message = error_of(tmp_path, "projects:\n  - name: [unclosed\n")
    assert "ckptd.yaml:" in message and "not valid YAML" in message


def test_missing_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file; pass one with -c"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("5m", 300),
        ("1h30m", 5400),
        ("2d", 172800),
        ("500ms", 0.5),
        (45, 45),
        ("45", 45),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(parse_duration(text))) == seconds


@pytest.mark.parametrize("bad", ["", "h", "1x", "-5s", True, None, [1], "1h-"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("200GiB", 200 * 2**30),
        ("1.5TB", 1_500_000_000_000),
        ("500MB", 500_000_000),
        ("10Gi", 10 * 2**30),
        (1024, 1024),
        ("1k", 1000),
    ],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "GB", "12 parsecs", -1, True, 1.5, "1..5G"])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(3 * 2**30) == "3.0 GiB"


def test_keep_best_default_and_bounds(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, "projects: [{name: a, work_dirs: [x]}]"))
    assert loaded.config.projects[0].retention.keep_best == 0
    assert "keep_best: 0" in effective_config_yaml(loaded)
    message = error_of(
        tmp_path, "projects: [{name: a, work_dirs: [x], retention: {keep_best: -1}}]"
    )
    assert "projects[0].retention.keep_best: Input should be greater than or equal to 0" in message


@pytest.mark.parametrize(("old", "k"), [(True, 1), (False, 0)])
def test_keep_best_full_is_still_read_as_keep_best(tmp_path: Path, old: bool, k: int) -> None:
    from ckptd.core.config import deprecations

    text = f"projects: [{{name: a, work_dirs: [x], retention: {{keep_best_full: {old}}}}}]"
    loaded = load_config(write(tmp_path, text))
    assert loaded.config.projects[0].retention.keep_best == k
    (note,) = deprecations(loaded.config)
    assert note.startswith("projects[0].retention.keep_best_full is deprecated; write keep_best")
    # the effective config says it the new way, and reads back without the note
    printed = effective_config_yaml(loaded)
    assert "keep_best_full" not in printed and f"keep_best: {k}" in printed
    assert deprecations(load_config(write(tmp_path, printed)).config) == []


def test_keep_best_full_and_keep_best_must_agree(tmp_path: Path) -> None:
    ok = "projects: [{name: a, work_dirs: [x], retention: {keep_best_full: true, keep_best: 3}}]"
    assert load_config(write(tmp_path, ok)).config.projects[0].retention.keep_best == 3
    for old, k in (("false", 2), ("true", 0)):
        both = f"{{keep_best_full: {old}, keep_best: {k}}}"
        text = f"projects: [{{name: a, work_dirs: [x], retention: {both}}}]"
        message = error_of(tmp_path, text)
        assert f"projects[0].retention: keep_best_full: {old} contradicts keep_best: {k}" in message
        assert "set only keep_best" in message
    message = error_of(
        tmp_path, "projects: [{name: a, work_dirs: [x], retention: {keep_best_full: 2}}]"
    )
    assert "projects[0].retention.keep_best_full" in message
