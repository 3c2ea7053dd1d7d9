"""The model `ssod label` runs: a training checkpoint or a registered MLflow model, with its config,
categories and score thresholds.

A registered teacher carries a *label bundle* beside MLflow's pickled model (`extra_files/`): the state
dict (loaded with `weights_only=True`, never unpickled as a module), the run's config, its categories
and the thresholds training ended with. `write_bundle` and `_read_bundle` are the one place that format lives.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import Config, dump_config, load_config, tracking_uri
from pipeline.data.readers import load_categories
from pipeline.errors import InputError
from pipeline.training.checkpoints import CHECKPOINT_NAME, load_checkpoint

CONFIG_NAME = "config.yaml"
BUNDLE_STATE, BUNDLE_CATEGORIES, BUNDLE_THRESHOLDS = "teacher_state.pt", "categories.json", "thresholds.json"
CONFIG_SEARCH_LEVELS = 4  # a Ray checkpoint sits in RUN_DIR/ray/ssod-ID/checkpoint_*/, its config.yaml in RUN_DIR


@dataclass
class LabelModel:
    cfg: Config
    categories: list[dict]  # categories.json entries: COCO id, name, model label 1..K
    state: dict[str, torch.Tensor]
    fitted_thresholds: list[float] | None  # per model label (0 = background), what `auto` training ended with
    source: str
    weights_load: dict | None = None  # what the state matched of the model the config builds (weights_report)

    @property
    def names(self) -> dict[int, str]:
        return {c["label"]: c["name"] for c in self.categories}


def from_checkpoint(
    checkpoint: str | Path,
    config: str | Path | None,
    overrides: list[str],
    which: str,
    prepared: str | Path | None = None,
) -> LabelModel:
    """The teacher (or student) of a checkpoint file, or of a run directory's newest checkpoint."""
    path = _checkpoint_file(Path(checkpoint))
    state = load_checkpoint(path)
    cfg = load_config(config or _config_beside(path), overrides)
    if which not in state:
        raise InputError(f"{path}: not a training checkpoint (it has no '{which}' weights)")
    scores = state.get("scores") or {}
    categories = _categories(cfg, prepared)
    source = f"{path} ({which})"
    weights, report = checked_state(cfg, len(categories), state[which], source, which)
    return LabelModel(cfg, categories, weights, scores.get("values"), source, report)


def checked_state(
    cfg: Config, num_classes: int, state: dict, source: str, target: str
) -> tuple[dict[str, torch.Tensor], dict]:
    """`state` checked against the model `cfg` builds (counts, refusal: models.weights_report), as a complete
    state dict of that model: what the labelers load."""
    from models.builders import build_detector
    from models.weights_report import PartialWeightsError, load_checked

    model = build_detector(num_classes, **{**cfg.model.model_dump(), "init_weights": False})
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{source}: expected a state dict (name -> tensor)")
    try:
        report = load_checked(model, state, source, target, cfg.model.allow_partial_weights)
    except PartialWeightsError as exc:
        raise InputError(str(exc)) from None
    return model.state_dict(), report.as_dict()


def _checkpoint_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    if (path / CHECKPOINT_NAME).is_file():
        return path / CHECKPOINT_NAME
    found = sorted((path / "ray").glob(f"*/*/{CHECKPOINT_NAME}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise InputError(f"{path}: no {CHECKPOINT_NAME} in this run directory (nor under ray/)")
    return found[-1]


def _config_beside(checkpoint: Path) -> Path:
    for folder in list(checkpoint.resolve().parents)[:CONFIG_SEARCH_LEVELS]:
        if (folder / CONFIG_NAME).is_file():
            return folder / CONFIG_NAME
    raise InputError(f"{checkpoint}: no {CONFIG_NAME} beside it or in its run directory; pass --config")


def _categories(cfg: Config, prepared: str | Path | None) -> list[dict]:
    """The training categories: from the run's prepared directory, else from the one being labelled."""
    for folder in (cfg.data.prepared, prepared):
        if folder is not None and (Path(folder) / BUNDLE_CATEGORIES).is_file():
            return load_categories(folder)
    raise InputError(
        f"{Path(cfg.data.prepared) / BUNDLE_CATEGORIES}: the run's categories are not here; "
        "point --set data.prepared=DIR at a prepared directory with the same categories"
    )


def from_registry(uri: str, config: str | Path | None, overrides: list[str], which: str) -> LabelModel:
    """A registered teacher (`models:/NAME/VERSION`) from the tracking store of --config or MLFLOW_TRACKING_URI."""
    if which != "teacher":
        raise InputError(f"--model {which}: a registered model holds the teacher only; use --checkpoint")
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri(load_config(config, overrides).tracking.uri if config else None))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(f"{uri.rstrip('/')}/extra_files", dst_path=tmp))
        except MlflowException as exc:
            raise InputError(f"{uri}: {exc.message.splitlines()[0]}") from None
        return _read_bundle(local, uri, config, overrides)


def _read_bundle(folder: Path, uri: str, config: str | Path | None, overrides: list[str]) -> LabelModel:
    if not (folder / BUNDLE_STATE).is_file():
        raise InputError(
            f"{uri}: no {BUNDLE_STATE} among its files (registered before `ssod label` existed); use --checkpoint"
        )
    cfg = load_config(config or folder / CONFIG_NAME, overrides)
    state = torch.load(folder / BUNDLE_STATE, map_location="cpu", weights_only=True)
    bundled = folder / BUNDLE_CATEGORIES
    categories = load_categories(folder) if bundled.is_file() else _categories(cfg, None)
    thresholds = None
    if (folder / BUNDLE_THRESHOLDS).is_file():
        by_name = json.loads((folder / BUNDLE_THRESHOLDS).read_text())
        floor = cfg.ssl.threshold_floor
        thresholds = [floor] + [
            float(by_name.get(c["name"], floor)) for c in sorted(categories, key=lambda c: c["label"])
        ]
    weights, report = checked_state(cfg, len(categories), state, uri, "teacher")
    return LabelModel(cfg, categories, weights, thresholds, uri, report)


def write_bundle(folder: Path, model: torch.nn.Module, cfg: Config, thresholds: dict[str, float] | None) -> list[str]:
    """The label bundle's files in `folder`, for `mlflow.pytorch.log_model(extra_files=...)`."""
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / BUNDLE_STATE)
    dump_config(cfg, folder / CONFIG_NAME)
    files = [folder / BUNDLE_STATE, folder / CONFIG_NAME]
    categories = Path(cfg.data.prepared) / BUNDLE_CATEGORIES
    if categories.is_file():
        files.append(folder / BUNDLE_CATEGORIES)
        (folder / BUNDLE_CATEGORIES).write_text(categories.read_text())
    if thresholds:
        files.append(folder / BUNDLE_THRESHOLDS)
        (folder / BUNDLE_THRESHOLDS).write_text(json.dumps(thresholds))
    return [str(f) for f in files]


def label_thresholds(model: LabelModel, override: float | None) -> tuple[list[float], str]:
    """Score thresholds per model label (index 0 = background) and the rule that chose them."""
    count = len(model.categories) + 1
    ssl = model.cfg.ssl
    if override is not None:
        return [override] * count, "--threshold"
    if ssl.score_threshold != "auto":
        return [float(ssl.score_threshold)] * count, "ssl.score_threshold"
    if model.fitted_thresholds is not None and len(model.fitted_thresholds) == count:
        return [
            float(t) for t in model.fitted_thresholds
        ], "ssl.score_threshold=auto: per-class thresholds fitted in training"
    return [ssl.threshold_floor] * count, "ssl.score_threshold=auto, none fitted: ssl.threshold_floor"
