"""MLflow tracking for one training run: config params, a metrics sink, pseudo-label images, plots, the teacher.

Everything goes through an explicit `MlflowClient` and run id, so several runs can live in one process
(a Tune driver, say). The only fluent call is `mlflow.pytorch.log_model`, which files the model under
the active run: `finish` resumes the run as active for that call alone (nested, so an outer active run
is left in place). The process-wide tracking URI is set, since log_model and `models:/` loading read it.
With `tracking.enabled: false` every method is a cheap no-op and nothing touches the store.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import numbers
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import torch
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
from torch import Tensor

import models
from pipeline.config import Config, tracking_uri
from pipeline.errors import InputError
from pipeline.labeling.model import write_bundle
from pipeline.tracking import plots


def _finite(value: Any) -> float | None:
    """The value as a float if it is a finite number (0-d tensors included), else None."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    return None


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


class Tracker:
    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        *,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: dict | None = None,
    ):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_name, self.parent_run_id, self.tags = run_name, parent_run_id, dict(tags or {})
        self.uri = tracking_uri(cfg.tracking.uri)
        self.run_id: str | None = None  # set while a run is open
        self._client: MlflowClient | None = None

    def start(self) -> str | None:
        """Open the run (under `parent_run_id` if given), log config params and input artifacts."""
        if not self.cfg.tracking.enabled:
            return None
        if self.run_id is not None:
            return self.run_id
        self._client = open_client(self.uri)
        mlflow.set_tracking_uri(self.uri)
        tags = {**{k: str(v) for k, v in self.tags.items()}, "run_dir": str(self.run_dir.resolve())}
        if self.parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = self.parent_run_id
        run = self._client.create_run(self._experiment_id(), tags=resolve_tags(tags), run_name=self.run_name)
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in self.cfg.to_flat_dict().items()]
        for batch in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=batch)
        for path in (self.run_dir / "config.yaml", Path(self.cfg.data.prepared) / "split.json"):
            if path.is_file():
                self._client.log_artifact(self.run_id, str(path))
        split = split_dataset(Path(self.cfg.data.prepared))
        if split is not None:  # the runs table's Dataset column then names the split a run trained on
            self._client.log_inputs(self.run_id, datasets=[split])
        return self.run_id

    def _experiment_id(self) -> str:
        name = self.cfg.tracking.experiment
        found = self._client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            # MLflow 3's UI opens an untagged experiment on its GenAI overview; this kind opens it on the runs.
            return self._client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
        except MlflowException as exc:  # another process (a Tune trial) created it meanwhile
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            return self._client.get_experiment_by_name(name).experiment_id

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics sink: log every finite number at `step` (None, NaN, inf and non-numbers are dropped)."""
        if self.run_id is not None:
            self._log_metrics(self.run_id, step, metrics)

    def _log_metrics(self, run_id: str, step: int, metrics: dict[str, Any]) -> None:
        now = int(time.time() * 1000)
        entries = [Metric(k, v, now, int(step)) for k, raw in metrics.items() if (v := _finite(raw)) is not None]
        for batch in _chunks(entries, MAX_METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.run_id is not None:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_pseudo_label_grid(
        self, step: int, images: list[Tensor], targets: list[dict[str, Tensor]], names: dict[int, str]
    ) -> None:
        """The first `tracking.log_images` images with their pseudo-labels, as pseudo_labels/step_NNNNNN.png."""
        keep = self.cfg.tracking.log_images
        if self.run_id is None or keep == 0 or not images:
            return
        grid = plots.pseudo_label_grid(images[:keep], targets[:keep], names)
        self._client.log_image(self.run_id, grid, artifact_file=f"pseudo_labels/step_{step:06d}.png")

    def log_score_histograms(self, step: int, scores: dict[str, list[float]], thresholds: dict[str, float]) -> None:
        """The teacher's score picture as score_histograms/step_NNNNNN.png."""
        if self.run_id is not None and any(scores.values()):
            self._client.log_figure(
                self.run_id, plots.score_histograms(scores, thresholds), f"score_histograms/step_{step:06d}.png"
            )

    def finish(self, metrics: dict, teacher: torch.nn.Module | None, status: str = "FINISHED") -> None:
        """Log metrics.json, final summary metrics, plots and the teacher model; end the run with `status`."""
        if self.run_id is None:
            return
        run_id, self.run_id = self.run_id, None
        try:
            self._log_summary(run_id, metrics)
            if teacher is not None:
                self._log_teacher(run_id, teacher, metrics.get("thresholds"))
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self._client.set_terminated(run_id, status)

    def _log_summary(self, run_id: str, metrics: dict) -> None:
        self._client.log_dict(run_id, metrics, "metrics.json")
        summary = {
            f"final/{who}/{iou}/{k}": v
            for who in ("teacher", "student")
            for iou, scores in (metrics.get(who) or {}).items()
            for k, v in scores.items()
            if k != "per_class"
        }
        summary.update({f"final/{k}": v for k, v in metrics.items() if k not in ("teacher", "student")})
        self._log_metrics(run_id, int(metrics.get("steps") or 0), summary)
        per_class = {
            who: (metrics.get(who) or {}).get("bbox", {}).get("per_class") or {} for who in ("teacher", "student")
        }
        if per_class["teacher"] or per_class["student"]:
            self._client.log_figure(
                run_id,
                plots.per_class_ap_bars(per_class["teacher"], per_class["student"]),
                "plots/per_class_ap_bbox.png",
            )
        if metrics.get("pseudo_label_class_counts") is not None and metrics.get("labeled_class_histogram") is not None:
            figure = plots.pseudo_label_distribution(
                metrics["pseudo_label_class_counts"], metrics["labeled_class_histogram"]
            )
            self._client.log_figure(run_id, figure, "plots/pseudo_label_distribution.png")

    def _log_teacher(self, run_id: str, teacher: torch.nn.Module, thresholds: dict[str, float] | None) -> None:
        """The teacher (a CPU copy, eval mode) as the run's "teacher" model, registered if a name is set.

        Its label bundle (state dict, config, categories, thresholds) rides along for `ssod label --model-uri`.
        """
        model = copy.deepcopy(teacher).cpu().eval()
        mlflow.set_tracking_uri(self.uri)
        mlflow.start_run(run_id=run_id, nested=True)
        try:
            with tempfile.TemporaryDirectory() as bundle:
                mlflow.pytorch.log_model(
                    model,
                    name="teacher",
                    registered_model_name=self.cfg.tracking.registered_model_name,
                    # torch.export ("pt2", MLflow's default) cannot trace a detector's list-in, dict-out,
                    # data-dependent forward. The pickle refers to `models.*` classes: ship that (torch-only) package.
                    serialization_format="pickle",
                    code_paths=[str(Path(models.__file__).parent)],
                    # Explicit requirements skip MLflow's inference, which reloads the model in a subprocess.
                    pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                    extra_files=write_bundle(Path(bundle), model, self.cfg, thresholds),
                )
        finally:
            mlflow.end_run()  # `finish` then sets the final status


def open_client(uri: str) -> MlflowClient:
    """A client on the store; a URI MLflow cannot use (an unknown scheme, say) is an InputError naming it."""
    try:
        return MlflowClient(uri)
    except Exception as exc:  # MLflow raises several types, none of which a user should see as a traceback
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"tracking.uri={uri}: not a tracking store MLflow can open ({detail})") from None


def split_dataset(prepared: Path) -> DatasetInput | None:
    """The prepared split as an MLflow dataset input: its folder, percent and seed, digest of split.json."""
    path = prepared / "split.json"
    if not path.is_file():
        return None
    text = path.read_text()
    split = json.loads(text)
    percent, seed = split.get("percent"), split.get("seed")
    name = prepared.name if percent is None else f"{prepared.name} ({percent:g} % labeled, seed {seed})"
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    dataset = MetaDataset(LocalArtifactDatasetSource(str(prepared.resolve())), name=name, digest=digest)
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])
