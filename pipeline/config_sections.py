"""The sections of the config (`model`, `data`, `ssl`, `train`, `ray`, `tracking`, `tune`): keys, defaults, ranges.

Each section refuses unknown keys, out-of-range and non-finite values; the checks that span sections
are on `pipeline.config.Config`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_serializer, model_validator

from models.backbones import DEFAULT_ANCHORS
from models.ema import keep_rate_from_span
from models.pretrained import check_supported


class Section(BaseModel):
    # NaN and infinity are refused everywhere: `train.lr=.inf` would turn the weights to NaN at the first step.
    # Strict types: no bool taken for a number (`train.steps=true` would mean 1 step), no float truncated into
    # an int, no number read out of a string. A float key takes an int (YAML reads `1` as an int).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True)
    # Keys that spell another key's value (`ssl.ema_span` for `ssl.ema_keep_rate`): setting one in
    # `Config.with_overrides` drops the other.
    other_spelling: ClassVar[dict[str, str]] = {}
    _derived: set[str] = PrivateAttr(default_factory=set)  # keys whose value follows another key

    def _derive(self, key: str, value: Any) -> None:
        """Set `key` from another key: the code reads one name, and a dump leaves it out, so it follows its
        source again when the dump is read back (a Ray worker's config, a Tune trial's, config.yaml)."""
        object.__setattr__(self, key, value)
        self._derived.add(key)

    @model_serializer(mode="wrap")
    def _without_derived(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if k not in self._derived}


class ModelConfig(Section):
    arch: Literal["faster_rcnn", "mask_rcnn"] = "faster_rcnn"
    backbone: Literal["resnet50_fpn", "mobilenet_v3_fpn", "efficientnet_lite0_fpn", "tiny"] = "tiny"
    # Where the weights start: random, ImageNet (the backbone) or COCO (the whole detector but its
    # class-specific predictors). `weights_path`, a local file, wins when set.
    pretrained: Literal["none", "imagenet", "coco"] = "none"
    weights_path: str | None = None
    # A load (weights_path, a checkpoint) that fills less than half of the model's tensors, or any of them
    # with another shape, is refused with its counts; true accepts such a partial load on purpose.
    allow_partial_weights: bool = False
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


class DataConfig(Section):
    prepared: str = "data/demo/prepared"
    # Extra raw images (a folder, local or any pyarrow filesystem URI) streamed into the unlabeled pool.
    unlabeled_folder: str | None = None
    flip_prob: float = Field(0.5, ge=0, le=1)
    eval_images: int | None = Field(None, ge=1, description="score on the first N val images only")


class SSLConfig(Section):
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
    # Steps between publishing the teacher to the labelers (None: `teacher_update_interval`).
    sync_interval: int | None = Field(None, ge=1, description="publish period; default: every refresh")
    max_staleness: int = Field(16, ge=1)
    unsup_mask_loss: bool = True
    # Remedies against the teacher teaching its own mistakes back (models/pseudo_labels.py, models/losses.py):
    # `flip`: the teacher labels the weak view and its mirror, the two fused before the threshold;
    teacher_tta: Literal["none", "flip"] = "none"
    # `teacher`: an unlabeled image's background ROI weighs what the teacher's background score of it says;
    unsup_background_weight: Literal["uniform", "teacher"] = "uniform"
    # `soft`: a pseudo-box teaches the teacher's class distribution of it instead of its top class alone;
    # `soft_foreground`: that distribution over the object classes only (the box is taught as an object);
    # `soft_split`: `soft_foreground` where the other classes hold >= `class_split_share` of the box's object
    # mass, its label one-hot where the teacher is that clear (clear boxes sharpen as with `hard`);
    unsup_class_target: Literal["hard", "soft", "soft_foreground", "soft_split"] = "hard"
    class_split_share: float = Field(0.1, gt=0, lt=1)
    # `foreground`: the score cut reads the teacher's foreground probability (1 - background) of a box, not
    # its top class's score, so an object the teacher is sure of but torn between two classes is kept;
    cut_score: Literal["class", "foreground"] = "class"
    # a number m: per image and class at most ceil(m * the labeled set's boxes per image) pseudo-boxes, and
    # when the cut keeps fewer than `density_floor` x the labeled boxes per image, the teacher's most
    # confident boxes scoring >= `density_min_score` fill up to that count (None: the score cut alone).
    density_prior: float | None = Field(None, gt=0)
    density_floor: float = Field(0.5, ge=0)
    density_min_score: float = Field(0.3, ge=0, le=1)

    other_spelling: ClassVar[dict[str, str]] = {"ema_keep_rate": "ema_span", "ema_span": "ema_keep_rate"}

    @model_validator(mode="after")
    def _one_value_per_setting(self) -> "SSLConfig":
        if self.ema_span is not None:
            if "ema_keep_rate" in self.model_fields_set:
                raise ValueError("ssl.ema_keep_rate and ssl.ema_span are two spellings of one value: give one")
            self._derive("ema_keep_rate", keep_rate_from_span(self.ema_span))
        if self.sync_interval is None:
            self._derive("sync_interval", self.teacher_update_interval)
        if self.threshold_floor > self.threshold_ceiling:
            raise ValueError(
                f"ssl.threshold_floor ({self.threshold_floor}) exceeds ssl.threshold_ceiling ({self.threshold_ceiling})"
            )
        if self.max_staleness <= self.sync_interval:
            raise ValueError(
                f"ssl.max_staleness ({self.max_staleness}) must exceed ssl.sync_interval ({self.sync_interval}"
                f"{', from ssl.teacher_update_interval' if 'sync_interval' in self._derived else ''}): "
                "a row ages that much before the next teacher arrives"
            )
        return self


class TrainConfig(Section):
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


class RayConfig(Section):
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


class TrackingConfig(Section):
    enabled: bool = True
    uri: str | None = None
    experiment: str = Field("ssod", min_length=1)
    registered_model_name: str | None = Field("ssod-teacher", min_length=1)
    log_images: int = Field(8, ge=0)


class SearchDim(Section):
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
        "ssl.teacher_tta": SearchDim(type="choice", values=["none", "flip"]),
        "ssl.unsup_background_weight": SearchDim(type="choice", values=["uniform", "teacher"]),
        "ssl.unsup_class_target": SearchDim(type="choice", values=["hard", "soft", "soft_foreground", "soft_split"]),
        "ssl.density_prior": SearchDim(type="choice", values=[None, 1.5, 2.0, 3.0]),
        "train.lr": SearchDim(type="loguniform", low=0.002, high=0.04),
    }


class TuneSection(Section):
    metric: str = "teacher_AP"
    mode: Literal["max", "min"] = "max"
    search: Literal["random", "optuna"] = "random"
    grace_period: int = Field(1, ge=1, description="ASHA: reports before a trial may be stopped")
    reduction_factor: float = Field(2.0, gt=1)
    space: dict[str, SearchDim] = Field(default_factory=_default_space)
