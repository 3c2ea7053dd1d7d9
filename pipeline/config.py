"""One validated config: a YAML file plus `--set section.key=value` overrides.

Unknown keys and out-of-range values are refused with a message naming the key
(`pydantic` with `extra="forbid"`). The SSL parameters the product exposes live under `ssl.`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.backbones import DEFAULT_ANCHORS
from models.ema import keep_rate_from_span
from models.pretrained import check_supported
from pipeline.errors import InputError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow's own default: a sqlite file in the working directory


class _Section(BaseModel):
    # NaN and infinity are refused everywhere: `train.lr=.inf` destroyed the weights at step 1.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    arch: Literal["faster_rcnn", "mask_rcnn"] = "faster_rcnn"
    backbone: Literal["resnet50_fpn", "mobilenet_v3_fpn", "efficientnet_lite0_fpn", "tiny"] = "tiny"
    # Where the weights start: random, ImageNet (the backbone) or COCO (the whole detector but its
    # class-specific predictors). `weights_path`, a local file, wins when set.
    pretrained: Literal["none", "imagenet", "coco"] = "none"
    weights_path: str | None = None
    # The weak view's resize happens inside torchvision's detector transform: in training the shortest
    # edge is drawn from `min_size`, at test time the last entry is used. torchvision's 800 px default
    # is far too big for CPU work.
    min_size: list[Annotated[int, Field(ge=32)]] = Field(default_factory=lambda: [288, 320, 352], min_length=1)
    max_size: int = Field(512, ge=32)
    roi_loss: Literal["focal", "ce"] = "focal"
    focal_gamma: float = Field(1.5, ge=0)
    # One tuple of anchor sizes per feature map; None = the backbone's default.
    anchor_sizes: list[list[Annotated[int, Field(ge=1)]]] | None = None
    detections_per_image: int = Field(100, ge=1)
    # ROIs sampled per image for the ROI head loss (reference 512). ROI-align backward dominates a CPU
    # step, so small images with few objects train much faster at 128.
    rois_per_image: int = Field(512, ge=16)

    @model_validator(mode="after")
    def _pretrained_exists(self) -> "ModelConfig":
        check_supported(self.backbone, self.pretrained)
        return self

    @model_validator(mode="after")
    def _anchors_fit(self) -> "ModelConfig":
        levels = len(DEFAULT_ANCHORS[self.backbone])
        sizes = self.anchor_sizes
        if sizes is not None and (len(sizes) != levels or len({len(s) for s in sizes}) != 1 or not sizes[0]):
            raise ValueError(
                f"model.anchor_sizes needs {levels} lists (one per feature map of {self.backbone}), "
                "all of the same non-zero length"
            )
        return self


class DataConfig(_Section):
    prepared: str = "data/demo/prepared"
    # Extra raw images (a folder, local or any pyarrow filesystem URI) streamed into the unlabeled pool.
    unlabeled_folder: str | None = None
    flip_prob: float = Field(0.5, ge=0, le=1)
    eval_images: int | None = Field(None, ge=1, description="score on the first N val images only")


class SSLConfig(_Section):
    burn_in_steps: int = Field(2000, ge=0)
    unsup_loss_weight: float = Field(4.0, ge=0)
    # A number, or "auto": per-class thresholds fitted on the teacher's scores (models/thresholds.py),
    # between `threshold_floor` and `threshold_ceiling`, refitted every `threshold_refit_interval` steps
    # on the last `threshold_window` scores of each class.
    score_threshold: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] = 0.7
    threshold_floor: float = Field(0.5, gt=0, le=1)
    threshold_ceiling: float = Field(0.9, gt=0, le=1)
    threshold_refit_interval: int = Field(10, ge=1)
    threshold_window: int = Field(2000, ge=20)
    ema_keep_rate: float = Field(0.9996, ge=0, lt=1)
    # The product's spelling: the EMA spans the N most recent iterations, k = 1 - 2/(N+1).
    ema_span: int | None = Field(None, ge=1)
    teacher_update_interval: int = Field(1, ge=1)
    sync_interval: int | None = Field(None, ge=1, description="publish period; default: every refresh")
    max_staleness: int = Field(16, ge=1)
    unsup_mask_loss: bool = True

    @model_validator(mode="after")
    def _span_or_rate(self) -> "SSLConfig":
        if self.ema_span is not None:
            if "ema_keep_rate" in self.model_fields_set:
                raise ValueError("ssl.ema_keep_rate and ssl.ema_span are two spellings of one value: give one")
            object.__setattr__(self, "ema_keep_rate", keep_rate_from_span(self.ema_span))
        if self.threshold_floor > self.threshold_ceiling:
            raise ValueError(
                f"ssl.threshold_floor ({self.threshold_floor}) exceeds ssl.threshold_ceiling ({self.threshold_ceiling})"
            )
        if self.max_staleness <= self.publish_interval:
            raise ValueError(
                f"ssl.max_staleness ({self.max_staleness}) must exceed the publish interval "
                f"({self.publish_interval}): a row ages that much before the next teacher arrives"
            )
        return self

    @property
    def publish_interval(self) -> int:
        return self.sync_interval or self.teacher_update_interval


class TrainConfig(_Section):
    backend: Literal["ray", "local"] = "ray"
    steps: int = Field(180000, ge=1)
    batch_size_labeled: int = Field(2, ge=1)
    batch_size_unlabeled: int = Field(2, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip_norm: float | None = Field(10.0, gt=0)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    output_dir: str = "runs/demo"
    eval_period: int = Field(500, ge=1)
    checkpoint_period: int = Field(500, ge=1)
    log_period: int = Field(20, ge=1)
    seed: int = 0
    target_ap: float | None = Field(None, gt=0, le=100)
    # A run stops with an error when more than this fraction of the last `skip_window` steps were skipped
    # (non-finite loss or gradient): a diverged run must not end as a success.
    max_skipped_fraction: float = Field(0.5, ge=0, le=1)
    skip_window: int = Field(20, ge=1)


class RayConfig(_Section):
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs for a local Ray")
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    num_labelers: int = Field(1, ge=1)
    cpus_per_labeler: float = Field(0.5, ge=0)
    gpus_per_labeler: float = Field(0.0, ge=0)
    labeler_batch_size: int = Field(2, ge=1)
    weight_check_batches: int = Field(1, ge=1)
    max_failures: int = Field(0, ge=-1)
    startup_timeout_s: float = Field(600.0, gt=0, description="wait this long for an autoscaling cluster to grow")


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str | None = None
    experiment: str = Field("ssod", min_length=1)
    registered_model_name: str | None = Field("ssod-teacher", min_length=1)
    log_images: int = Field(8, ge=0)


class SearchDim(_Section):
    """One searched parameter: `choice` needs `values`; the others `low` and `high`."""

    type: Literal["choice", "uniform", "loguniform", "randint"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _complete(self) -> "SearchDim":
        if self.type == "choice" and not self.values:
            raise ValueError("a choice dimension needs `values`")
        if self.type != "choice" and (self.low is None or self.high is None or self.low >= self.high):
            raise ValueError(f"a {self.type} dimension needs low < high")
        return self


def _default_space() -> dict[str, SearchDim]:
    return {
        "ssl.burn_in_steps": SearchDim(type="choice", values=[500, 1000, 2000]),
        "ssl.unsup_loss_weight": SearchDim(type="uniform", low=1.0, high=4.0),
        "ssl.score_threshold": SearchDim(type="choice", values=[0.6, 0.7, 0.8, 0.9, "auto"]),
        "ssl.ema_keep_rate": SearchDim(type="choice", values=[0.99, 0.999, 0.9996]),
        "ssl.teacher_update_interval": SearchDim(type="choice", values=[1, 2, 4]),
        "train.lr": SearchDim(type="loguniform", low=0.002, high=0.04),
    }


class TuneSection(_Section):
    metric: str = "teacher_AP"
    mode: Literal["max", "min"] = "max"
    search: Literal["random", "optuna"] = "random"
    grace_period: int = Field(1, ge=1, description="ASHA: reports before a trial may be stopped")
    reduction_factor: float = Field(2.0, gt=1)
    space: dict[str, SearchDim] = Field(default_factory=_default_space)


class Config(_Section):
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
