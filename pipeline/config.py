"""One validated config: a YAML file plus `--set section.key=value` overrides.

Unknown keys and out-of-range values are refused with a message naming the key
(`pydantic` with `extra="forbid"`). The SSL parameters the product exposes live under `ssl.`.
"""

from __future__ import annotations

import os
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
        return {f"{s}.{k}": v for s, sec in self.model_dump(exclude={"tune"}).items() for k, v in sec.items()}

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
        if self.ssl.ema_span is not None:  # keep one spelling of the EMA rate
            if "ssl.ema_keep_rate" in flat:
                tree["ssl"]["ema_span"] = None
            else:
                tree["ssl"].pop("ema_keep_rate")
        for key, value in flat.items():
            section, _, name = key.partition(".")
            tree[section][name] = value
        return Config.model_validate(tree)


def tracking_uri(cfg_uri: str | None) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI, else ./mlflow.db."""
    return cfg_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _absolute_store(uri: str) -> str:
    """A relative sqlite store made absolute: on Ray the default ./mlflow.db landed in Ray's session dir."""
    prefix = "sqlite:///"
    path = uri[len(prefix) :]
    return f"{prefix}{Path(path).resolve()}" if uri.startswith(prefix) and not path.startswith("/") else uri


def _format_errors(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        parts.append(f"{key}: {e['msg']}")
    return f"{source}: " + "; ".join(parts)


def _apply_override(tree: dict, assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or "." not in key:
        raise InputError(f"--set {assignment!r}: expected section.key=value")
    section, _, name = key.strip().partition(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise InputError(f"--set {assignment!r}: the value is not valid YAML") from None
    node = tree.setdefault(section, {})
    if not isinstance(node, dict):
        raise InputError(f"--set {assignment!r}: {section} is not a section")
    node[name] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (if given), apply `section.key=value` overrides, validate everything."""
    tree: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text())
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
    for assignment in overrides or []:
        _apply_override(tree, assignment)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise InputError(_format_errors(err, source)) from None


def dump_config(cfg: Config, path: str | Path) -> None:
    data = cfg.model_dump()
    if cfg.ssl.ema_span is not None:
        data["ssl"].pop("ema_keep_rate")
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
