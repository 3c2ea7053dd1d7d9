"""One validated config: a YAML file plus `--set section.key=value` overrides.

Unknown keys, out-of-range values and values of the wrong type are refused with a message naming where the
value came from (the file, or `--set section.key`) and the key (`pydantic`, strict, with `extra="forbid"`).
The SSL parameters the product exposes live under `ssl.`.
"""

from __future__ import annotations

import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from pipeline.config_sections import (
    DataConfig,
    ModelConfig,
    RayConfig,
    Section,
    SSLConfig,
    TrackingConfig,
    TrainConfig,
    TuneSection,
)
from pipeline.errors import InputError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow's own default: a sqlite file in the working directory


class _Loader(yaml.SafeLoader):
    """YAML with 1.2 numbers: `1e-4` is a float (PyYAML's YAML 1.1 reads it as the string "1e-4")."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    ssl: SSLConfig = Field(default_factory=SSLConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tune: TuneSection = Field(default_factory=TuneSection)

    @model_validator(mode="after")
    def _burn_in_ends(self) -> "Config":
        if self.ssl.burn_in_steps > self.train.steps:
            raise ValueError(
                f"ssl.burn_in_steps ({self.ssl.burn_in_steps}) exceeds train.steps ({self.train.steps}): "
                "the teacher would never be copied from the student"
            )
        return self

    @model_validator(mode="after")
    def _space_keys_exist(self) -> "Config":
        for key in self.tune.space:
            section, _, name = key.partition(".")
            if (
                section not in ("model", "data", "ssl", "train")
                or name not in type(getattr(self, section)).model_fields
            ):
                raise ValueError(f"tune.space: {key!r} is not a config key")
        return self

    def to_flat_dict(self) -> dict[str, Any]:
        """`section.key` -> the value the run uses (a derived one too, as `ssl.sync_interval`), `tune` aside."""
        sections = [name for name in type(self).model_fields if name != "tune"]
        return {f"{s}.{k}": v for s in sections for k, v in getattr(self, s).__dict__.items()}

    def with_absolute_paths(self) -> "Config":
        """Local paths made absolute: Ray workers and Tune trials run in other working directories."""

        def absolute(value: str | None) -> str | None:
            return value if value is None or "://" in value else str(Path(value).resolve())

        return self.with_overrides(
            {
                "data.prepared": absolute(self.data.prepared),
                "data.unlabeled_folder": absolute(self.data.unlabeled_folder),
                "model.weights_path": absolute(self.model.weights_path),
                "train.output_dir": absolute(self.train.output_dir),
                "tracking.uri": _absolute_store(tracking_uri(self.tracking.uri)),
            }
        )

    def with_overrides(self, flat: dict[str, Any]) -> "Config":
        """A validated copy with `section.key` values replaced (a Tune trial's config)."""
        tree = self.model_dump()
        for key, value in flat.items():
            section, _, name = key.partition(".")
            tree[section][name] = value
            other = type(getattr(self, section)).other_spelling.get(name)
            if other is not None:  # the value given replaces the other spelling's
                tree[section].pop(other, None)
        return Config.model_validate(tree)


def tracking_uri(cfg_uri: str | None) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI, else ./mlflow.db."""
    return cfg_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _absolute_store(uri: str) -> str:
    """A relative sqlite store made absolute: Ray workers run in Ray's session directory, not in this one."""
    prefix = "sqlite:///"
    path = uri[len(prefix) :]
    return f"{prefix}{Path(path).resolve()}" if uri.startswith(prefix) and not path.startswith("/") else uri


# The parts of a pydantic error location that name a member of a union (`constrained-float`, `literal['auto']`),
# not a key or a list index.
_UNION_MEMBER = re.compile(r"[-\[\]']|^(int|float|str|bool|none|list|dict)$")
_TYPE_ERRORS = ("_type", "literal_error", "enum", "_parsing")


def _show(value: Any) -> str:
    """A value as the user wrote it (YAML): `true`, `1.5`, `'3'`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def format_errors(err: ValidationError, source: str, set_keys: set[str] = frozenset()) -> str:
    """One line: each refused key once, named with where its value came from (`--set train.steps` or the file)."""
    by_key: dict[str, list[dict]] = {}
    for e in err.errors():
        parts = [str(p) for p in e["loc"] if not (isinstance(p, str) and _UNION_MEMBER.search(p))]
        by_key.setdefault(".".join(parts) or "(top level)", []).append(e)
    lines = []
    for key, errors in by_key.items():
        messages = list(
            dict.fromkeys(
                "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
                for e in errors
            )
        )
        text = " or ".join(messages[:1] + [m.removeprefix("Input should be ") for m in messages[1:]])
        if any(e["type"].endswith(_TYPE_ERRORS) for e in errors) and "input" in errors[0]:
            text += f", got {_show(errors[0]['input'])}"
        set_key = next((k for k in sorted(set_keys) if key == k or key.startswith(k + ".")), None)
        if set_key is None and "." not in key:  # an unknown section given by --set
            set_key = next((k for k in sorted(set_keys) if k.startswith(key + ".")), None)
            text = "unknown section" if set_key and text == "unknown key" else text
        if set_key is not None:
            lines.append(f"--set {max(key, set_key, key=len)}: {text}")
        else:
            lines.append(f"{source}: {text}" if key == "(top level)" else f"{source}: {key}: {text}")
    return "; ".join(lines)


def _field(section: str, name: str):
    """The pydantic field `section.name`, or None when there is no such key."""
    sec = Config.model_fields.get(section)
    return None if sec is None else sec.annotation.model_fields.get(name)


def _is_text_key(section: str, name: str) -> bool:
    """A key whose value is free text (a path, a name, a URI): `--set tracking.experiment=2024` means "2024"."""
    field = _field(section, name)
    if field is None:
        return False
    annotation = field.annotation
    members = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return str in members


def _apply_override(tree: dict, assignment: str) -> str:
    """Set one `section.key=value` in `tree`; return `section.key`."""
    key, sep, raw = assignment.partition("=")
    if not sep or "." not in key:
        raise InputError(f"--set {assignment!r}: expected section.key=value")
    section, _, name = key.strip().partition(".")
    try:
        value = read_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise InputError(f"--set {assignment!r}: the value is not valid YAML") from None
    if isinstance(value, (bool, int, float)) or type(value).__module__ == "datetime":
        if _is_text_key(section, name):  # the text itself, not the number or date YAML read in it
            value = raw.strip()
    node = tree.setdefault(section, {})
    if not isinstance(node, dict):
        raise InputError(f"--set {assignment!r}: {section} is not a section")
    node[name] = value
    return f"{section}.{name}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (if given), apply `section.key=value` overrides, validate everything."""
    tree: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        try:
            tree = read_yaml(Path(path).read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read the config file: {exc}") from None
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: malformed YAML: {exc}".replace("\n", " ")) from None
        if tree is None:
            raise InputError(f"{path}: the config file is empty")
        if not isinstance(tree, dict):
            raise InputError(f"{path}: expected a mapping of sections at the top level")
    set_keys = {_apply_override(tree, assignment) for assignment in overrides or []}
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise InputError(format_errors(err, source, set_keys)) from None


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
