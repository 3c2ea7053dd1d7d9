"""`ssod tune`: Ray Tune over the SSL parameters, one TorchTrainer per trial, ASHA on teacher AP.

Under Ray Train V2 Tune runs a function that builds and fits the trainer (`Tuner(trainer)` is gone);
`TuneReportCallback` forwards the trainer's reports to Tune. A trial itself holds no CPU, or it would
block its own train workers; its trainer's resources are what `ray.*` plans.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from pipeline.config import Config, dump_config, format_errors
from pipeline.distributed.cluster import start_ray
from pipeline.distributed.driver import train_ray
from pipeline.distributed.resources import plan_resources
from pipeline.errors import InputError, find_input_error
from pipeline.paths import writable_dir
from pipeline.tracking.tracker import Tracker
from tune.space import check_space, to_tune_space

TRIAL_MEMORY_BYTES = 256 * 1024**2  # Tune refuses an all-zero request; memory keeps the trial schedulable


def _trial(trial_config: dict[str, Any]) -> None:
    base = Config.model_validate(trial_config["base"])
    overrides = {k: v for k, v in trial_config.items() if k not in ("base", "output", "parent_run_id")}
    trial_dir = Path(trial_config["output"]) / f"trial_{tune.get_context().get_trial_id()}"
    try:
        cfg = base.with_overrides({**overrides, "train.output_dir": str(trial_dir)})
    except ValidationError as err:  # check_space should have caught it: a failed trial, in one line
        raise InputError(f"trial values {overrides}: {format_errors(err, 'tune.space')}") from None
    train_ray(cfg, callbacks=[TuneReportCallback()], parent_run_id=trial_config["parent_run_id"])


def _one_line(error: BaseException | None) -> str:
    """A failed trial's error as one line: its InputError, else the last line of what Ray kept."""
    if error is None:
        return ""
    found = find_input_error(error)
    if found is not None:
        return str(found)
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def summarize(results: Iterable[Any], metric: str, mode: str, space: Iterable[str]) -> dict[str, Any]:
    """The search's outcome from Tune's results (`.error`, `.metrics`, `.config` each): a trial that raised is
    failed and never the best; the best is the finite `metric` of a trial that completed or was stopped early."""
    results = list(results)
    failed = [r for r in results if r.error is not None]
    scored = [
        r
        for r in results
        if r.error is None
        and isinstance((r.metrics or {}).get(metric), (int, float))
        and math.isfinite(r.metrics[metric])
    ]
    best = (max if mode == "max" else min)(scored, key=lambda r: r.metrics[metric]) if scored else None
    return {
        "trials": len(results),
        "completed": len(results) - len(failed),
        "errors": len(failed),
        "failures": sorted({_one_line(r.error) for r in failed}),
        "best": None if best is None else {k: v for k, v in best.config.items() if k in space},
        "best_metric": None if best is None else best.metrics[metric],
    }


def _search_alg(cfg: Config, max_concurrent: int):
    if cfg.tune.search != "optuna":
        return None
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(), max_concurrent=max_concurrent)


def run_search(cfg: Config, samples: int, max_concurrent: int, output: str | Path) -> dict[str, Any]:
    """Run the search; write the best config as a ready-to-train YAML; return a summary."""
    output, cfg = Path(output).resolve(), cfg.with_absolute_paths()
    check_space(cfg)
    writable_dir(output, "--output")
    start_ray(cfg, plan_resources(cfg).times(max_concurrent))  # concurrent trials must all fit
    parent = Tracker(cfg, output, run_name=f"search-{output.name}", tags={"ssod.search": "true"})
    param_space = {
        **to_tune_space(cfg.tune.space),
        "base": cfg.model_dump(),
        "output": str(output),
        "parent_run_id": parent.start(),
    }
    scheduler = ASHAScheduler(
        time_attr="step",
        max_t=cfg.train.steps,
        grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
    )
    tuner = tune.Tuner(
        tune.with_resources(_trial, {"cpu": 0, "memory": TRIAL_MEMORY_BYTES}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=cfg.tune.metric,
            mode=cfg.tune.mode,
            num_samples=samples,
            max_concurrent_trials=max_concurrent,
            scheduler=scheduler,
            search_alg=_search_alg(cfg, max_concurrent),
        ),
        run_config=tune.RunConfig(name="search", storage_path=str(output / "tune")),
    )
    results = tuner.fit()
    summary = summarize(results, cfg.tune.metric, cfg.tune.mode, cfg.tune.space)
    best_path = output / "best_config.yaml"
    if summary["best"] is not None:
        best_cfg = cfg.with_overrides({**summary["best"], "train.output_dir": str(output / "best_run")})
        dump_config(best_cfg, best_path)
        parent.log_artifact(best_path)
    summary["best_config"] = str(best_path) if summary["best"] is not None else None
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    status = "FINISHED" if summary["best"] is not None else "FAILED"
    parent.finish({"best_" + cfg.tune.metric: summary["best_metric"], "trials": summary["trials"]}, None, status)
    if summary["best"] is None:
        why = f"{summary['errors']} failed" if summary["errors"] else f"none reported {cfg.tune.metric}"
        first = f" (first failure: {summary['failures'][0]})" if summary["failures"] else ""
        raise InputError(
            f"--output {output}: no trial of {summary['trials']} has a result, {why}{first}; see summary.json"
        )
    return summary
