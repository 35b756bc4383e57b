"""``ckptd.yaml``: the pydantic models and the loader whose errors name file, key and remedy.

The key names here are a contract that docs and other tools rely on; see the repo's
``ckptd.yaml`` for the commented default.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ckptd.core.configops import DiskConfig, HooksConfig, PriorityConfig
from ckptd.core.configtypes import Duration, Size, _Strict
from ckptd.core.reads import read_file
from ckptd.core.units import format_duration

LAYOUT_NAMES = ("mmengine", "mmcv", "lightning", "hf", "deepspeed")
Rule = Literal["greater", "less"]
ARTIFACT_DIR_FIELDS = {"work_dir", "project", "run"}
PUBLISH_URL_FIELDS = {"project", "run"}
MIN_PUBLISH_TIMEOUT = 2.0  # seconds; an attempt's process needs about one to start
# storage_options keys (any depth, compared without case, '_' and '-') that carry a credential.
SECRET_OPTION_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "passwd",
        "apikey",
        "privatekey",
        "credential",
        "credentials",
        "accesskey",
        "awsaccesskeyid",
        "awssecretaccesskey",
        "awssessiontoken",
        "clientsecret",
        "accountkey",
        "sastoken",
        "connectionstring",
        "ssecustomerkey",
    }
)


class ConfigError(Exception):
    """A config that cannot be used; ``str()`` is the message users see (file, key, remedy)."""


class BestConfig(_Strict):
    metric: Literal["auto"] | list[str] = "auto"
    rule: Literal["auto"] | Rule | list[Literal["auto"] | Rule] = "auto"

    @field_validator("metric", mode="before")
    @classmethod
    def _one_metric_is_a_list(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "auto":
            return [value]
        return value

    @field_validator("rule", mode="before")
    @classmethod
    def _known_rules(cls, value: Any) -> Any:
        allowed = ("auto", "greater", "less")
        values = value if isinstance(value, list) else [value]
        for item in values:
            if item not in allowed:
                raise ValueError(
                    f"unknown rule {item!r}; use auto, greater or less (or a list aligned "
                    "with metric)"
                )
        return value

    @field_validator("metric")
    @classmethod
    def _metrics_unique(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("list an evaluation key such as 'coco/bbox_mAP', or use 'auto'")
            if len(set(value)) != len(value):
                raise ValueError(f"a metric is listed twice: {value}")
            if "auto" in value:
                raise ValueError("'auto' cannot be mixed with named metrics")
        return value

    @model_validator(mode="after")
    def _rules_align_with_metrics(self) -> BestConfig:
        if isinstance(self.rule, list):
            if self.metric == "auto":
                raise ValueError("with metric: auto, rule must be one of auto, greater, less")
            if len(self.rule) != len(self.metric):
                raise ValueError(
                    f"rule lists {len(self.rule)} entries but metric lists {len(self.metric)}; "
                    "give one rule per metric or a single rule for all"
                )
        return self

    def rule_for(self, index: int) -> str:
        return self.rule[index] if isinstance(self.rule, list) else self.rule


class RetentionConfig(_Strict):
    keep_last: int = Field(default=2, ge=1)
    keep_every: int | None = Field(default=None, ge=1)
    # The full checkpoints of the k best evaluations of each metric (0: none).
    keep_best: int = Field(default=0, ge=0)
    pending_eval_grace: Duration = 3600.0
    max_total_size: Size | None = None
    # Deprecated spelling of keep_best 1 / 0, still read; never printed back (exclude).
    keep_best_full: bool | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _keep_best_full_is_keep_best(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("keep_best_full"), bool):
            return data  # absent, or not a bool: the field's own check says what is wrong
        old = data["keep_best_full"]
        new = data.get("keep_best")
        if new is None:
            return {**data, "keep_best": 1 if old else 0}
        if isinstance(new, int) and not isinstance(new, bool) and (new >= 1) != old:
            raise ValueError(
                f"keep_best_full: {str(old).lower()} contradicts keep_best: {new}; "
                "keep_best_full is deprecated: remove it and set only keep_best (1 keeps the "
                "best checkpoint in full, k the k best, 0 none)"
            )
        return data


def _check_placeholders(value: str, allowed: set[str]) -> None:
    names = ", ".join(f"{{{f}}}" for f in sorted(allowed))
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc}); use {names}") from None
    unknown = fields - allowed
    if unknown:
        raise ValueError(f"unknown placeholder {{{sorted(unknown)[0]}}}; allowed: {names}")


def _secret_option(options: Any, path: str = "") -> str | None:
    """The key path of the first option that looks like a credential, if any."""
    if isinstance(options, dict):
        for key, value in options.items():
            where = f"{path}.{key}" if path else str(key)
            normalized = str(key).lower().replace("_", "").replace("-", "")
            if normalized in SECRET_OPTION_KEYS or any(
                word in normalized for word in ("secret", "password", "token")
            ):
                return where
            found = _secret_option(value, where)
            if found:
                return found
    elif isinstance(options, list):
        for i, item in enumerate(options):
            found = _secret_option(item, f"{path}[{i}]")
            if found:
                return found
    return None


class PublishConfig(_Strict):
    url: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    keep_history: bool = False
    # Each attempt's limit, whatever storage_options make the backend retry or wait.
    timeout: Duration = 600.0

    @field_validator("url")
    @classmethod
    def _url_with_scheme(cls, value: str) -> str:
        _check_placeholders(value, PUBLISH_URL_FIELDS)
        scheme, sep, rest = value.partition("://")
        if not sep or not scheme or not rest.strip("/"):
            raise ValueError(
                "expected a URL with a scheme and a path, e.g. s3://bucket/{project}/{run}/ "
                "or file:///srv/models/{project}/{run}/"
            )
        try:
            from fsspec.registry import known_implementations, registry
        except ImportError:
            raise ValueError(
                "publishing needs fsspec (and s3fs for s3://): pip install 'ckptd[publish]'"
            ) from None
        if scheme not in known_implementations and scheme not in registry:
            raise ValueError(
                f"unknown scheme {scheme!r}; fsspec knows e.g. s3, gs, az, file (the backend "
                "package, such as s3fs, gcsfs or adlfs, must be installed)"
            )
        return value

    @field_validator("timeout")
    @classmethod
    def _room_to_publish(cls, value: float) -> float:
        if value < MIN_PUBLISH_TIMEOUT:
            raise ValueError(
                f"{format_duration(value)} is too short: each publish attempt starts its own "
                f"process first (about a second); use at least {MIN_PUBLISH_TIMEOUT:g}s, "
                "e.g. 10m, the time one attempt may take on your slowest link"
            )
        return value

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        where = _secret_option(value)
        if where:
            raise ValueError(
                f"{where!r} looks like a credential, and ckptd does not read secrets from its "
                "config file; provide them the standard way: environment variables (e.g. "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, "
                "AZURE_STORAGE_ACCOUNT_NAME + an Azure identity), the provider's default chain "
                "(IAM role, workload or managed identity) or a named profile (profile: NAME)"
            )
        return value


class ArtifactConfig(_Strict):
    dir: str = "{work_dir}/best"
    keep_keys: Literal["auto"] | list[str] = "auto"
    hash_in_name: bool = False
    # torch: the layout's own format (a torch zip .pth/.ckpt, or the Hugging Face folder);
    # safetensors: a .safetensors file (docs/layouts.md, "Artifact formats")
    format: Literal["torch", "safetensors"] = "torch"
    publish: PublishConfig | None = None

    @field_validator("dir")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        _check_placeholders(value, ARTIFACT_DIR_FIELDS)
        return value

    @field_validator("keep_keys")
    @classmethod
    def _keys_given(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("list at least one checkpoint key, e.g. [meta, state_dict], or 'auto'")
        return value


class LightningConfig(_Strict):
    # Folders (relative to the work_dir) where ModelCheckpoint(dirpath=...) writes, besides
    # <logger>/version_N/checkpoints and checkpoints/.
    checkpoint_dirs: list[str] = Field(default_factory=list)

    @field_validator("checkpoint_dirs")
    @classmethod
    def _inside_work_dir(cls, value: list[str]) -> list[str]:
        for item in value:
            parts = item.replace("\\", "/").split("/")
            if not item or item.startswith(("/", "~")) or ".." in parts:
                raise ValueError(
                    f"{item!r} must be a folder inside the work_dir, given relative to it "
                    "(e.g. 'ckpts' for ModelCheckpoint(dirpath='<work_dir>/ckpts')); ckptd "
                    "never deletes outside the work_dir"
                )
            if any(c in item for c in "*?["):
                raise ValueError(f"{item!r}: wildcards are not supported; list each folder")
        return value


class ProjectConfig(_Strict):
    name: str = Field(min_length=1)
    work_dirs: list[str] = Field(min_length=1)
    layout: Literal["auto", *LAYOUT_NAMES] = "auto"  # type: ignore[valid-type]
    best: BestConfig = BestConfig()
    retention: RetentionConfig = RetentionConfig()
    artifact: ArtifactConfig = ArtifactConfig()
    lightning: LightningConfig = LightningConfig()
    hooks: HooksConfig = HooksConfig()
    dry_run: bool = False

    @model_validator(mode="after")
    def _layout_options_match(self) -> ProjectConfig:
        if self.lightning.checkpoint_dirs and self.layout not in ("auto", "lightning"):
            raise ValueError(
                f"lightning.checkpoint_dirs applies to Lightning work_dirs, but layout is "
                f"{self.layout!r}; remove it or set layout: lightning"
            )
        return self


class WatchConfig(_Strict):
    mode: Literal["auto", "inotify", "poll"] = "auto"
    poll_interval: Duration = 2.0
    settle: Duration = 2.0
    resync_interval: Duration = 300.0

    @field_validator("poll_interval", "resync_interval")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value


class Config(_Strict):
    projects: list[ProjectConfig] = Field(min_length=1)
    watch: WatchConfig = WatchConfig()
    disk: DiskConfig | None = None  # absent: no watermark
    priority: PriorityConfig = PriorityConfig()

    @field_validator("projects")
    @classmethod
    def _unique_names(cls, value: list[ProjectConfig]) -> list[ProjectConfig]:
        seen: set[str] = set()
        for project in value:
            if project.name in seen:
                raise ValueError(f"two projects are named {project.name!r}; names must be unique")
            seen.add(project.name)
        return value


class LoadedConfig(BaseModel):
    """A validated config plus where it came from (relative globs resolve against its folder)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    config: Config
    path: Path

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def _key_path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.startswith(("function-", "literal[", "list[", "int", "str", "bool", "float")):
            continue  # pydantic's union-branch labels are noise to users
        else:
            text += f".{part}" if text else part
    return text or "(top level)"


def _describe(error: dict[str, Any], model_fields: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key" + (
            f"; allowed here: {', '.join(model_fields)}" if model_fields else ""
        )
    if kind == "missing":
        return "required key is missing"
    message = str(error["msg"])
    message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if "input" in error and kind not in ("value_error", "assertion_error"):
        message += f" (got {error['input']!r})"
    return message


def _fields_at(loc: tuple[int | str, ...]) -> dict[str, Any]:
    """The keys allowed at the parent of ``loc``, so 'unknown key' can list the right ones."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return {}
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        model = next((a for a in (annotation, *args) if hasattr(a, "model_fields")), None)
        if model is None:
            return {}
    return dict(model.model_fields) if hasattr(model, "model_fields") else {}


def format_validation_error(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: invalid configuration ({exc.error_count()} problem(s)):"]
    seen: set[str] = set()
    for error in exc.errors():
        loc = tuple(error["loc"])
        line = f"  {_key_path(loc)}: {_describe(dict(error), _fields_at(loc))}"
        if line not in seen:  # union branches repeat the same complaint
            seen.add(line)
            lines.append(line)
    return "\n".join(lines)


def parse_config(data: Any, path: Path) -> LoadedConfig:
    if data is None:
        raise ConfigError(
            f"{path}: the file is empty; it needs a 'projects:' list (see ckptd.yaml)"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'projects:' list at the top level")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from None
    return LoadedConfig(config=config, path=path.absolute())


def load_config(path: Path) -> LoadedConfig:
    import yaml

    try:
        text = read_file(path).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such config file; pass one with -c/--config or create ckptd.yaml"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    except RecursionError:  # the YAML parser recurses per nesting level
        raise ConfigError(f"{path}: nested too deeply to be a ckptd config") from None
    return parse_config(data, path)


def deprecations(config: Config) -> list[str]:
    """Deprecated keys the config still uses, by key path, with what to write instead."""
    return [
        f"projects[{i}].retention.keep_best_full is deprecated; write keep_best: "
        f"{p.retention.keep_best} instead (how many best evaluations keep their full checkpoint)"
        for i, p in enumerate(config.projects)
        if p.retention.keep_best_full is not None
    ]


def effective_config_yaml(loaded: LoadedConfig) -> str:
    """The config with every default filled in, as YAML (what ``ckptd check`` prints)."""
    import yaml

    data = loaded.config.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
