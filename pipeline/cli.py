"""`ssod` / `python -m pipeline.cli`: synth, prepare, train, evaluate, label, tune, ui.

Bad input ends in one line `error: ...` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
from pathlib import Path

from pipeline.errors import InputError

MAX_PORT = 65535


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (a missing option, `--port abc`) are the CLI's one line, not usage text."""

    def error(self, message: str):
        raise InputError(message)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (configs/demo.yaml, configs/coco_1pct.yaml, ...)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value; repeatable",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ssod", description="Unbiased Teacher semi-supervised detection on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic benchmark as COCO train/val sets")
    p.add_argument("out")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--masks", action="store_true", help="also write polygon masks")
    p.add_argument(
        "--layout", choices=["standard", "small"], default="standard", help="small: many small objects in clutter"
    )

    p = sub.add_parser("prepare", help="split a COCO set into labeled/unlabeled Parquet shards")
    p.add_argument("--annotations", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--percent", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--val-annotations")
    p.add_argument("--val-images")
    p.add_argument("--unlabeled-images", help="extra raw images with no annotations")

    p = sub.add_parser("train", help="burn-in then teacher-student mutual learning")
    _config_args(p)
    p.add_argument("--output", help="run directory (train.output_dir)")

    p = sub.add_parser("evaluate", help="score a saved teacher or student on the validation set")
    _config_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model", choices=["teacher", "student"], default="teacher")

    p = sub.add_parser("label", help="a trained teacher labels images: COCO labels, a report, a review queue")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="RUN_DIR/checkpoint.pt (or RUN_DIR); its config.yaml is used by default")
    model.add_argument("--model-uri", help="a registered teacher, models:/NAME/VERSION")
    images = p.add_mutually_exclusive_group(required=True)
    images.add_argument("--images", help="an image folder (read recursively: jpg, png, webp, ...)")
    images.add_argument("--prepared", help="a `ssod prepare` output directory")
    p.add_argument("--split", choices=["unlabeled", "labeled", "val"], default="unlabeled", help="with --prepared")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--threshold", type=float, help="keep boxes scoring >= this (default: the run's ssl.score_threshold)"
    )
    _config_args(p)
    p.add_argument("--model", choices=["teacher", "student"], default="teacher")
    p.add_argument("--review", type=int, default=16, help="images drawn in OUT/review/, least certain first")
    p.add_argument("--sweep", action="store_true", help="precision/recall at thresholds 0.3 ... 0.9")

    p = sub.add_parser("tune", help="Ray Tune search over the SSL parameters (ASHA on teacher AP)")
    _config_args(p)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-concurrent", type=int, default=1)
    p.add_argument("--output", default="runs/tune", help="search directory (trials, best_config.yaml)")

    p = sub.add_parser("ui", help="open the MLflow UI on the tracking store (127.0.0.1)")
    _config_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    return parser


def _at_least(flag: str, value: int | None, low: int, why: str = "") -> None:
    if value is not None and value < low:
        raise InputError(f"{flag} {value}: must be at least {low}{why}")


def _in_range(flag: str, value: float | None, low: float, high: float, low_open: bool = True) -> None:
    """`value` in (low, high] (or [low, high] when not `low_open`); NaN and infinities are refused."""
    if value is None:
        return
    inside = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not inside:
        raise InputError(f"{flag} {value}: must be in {'(' if low_open else '['}{low:g}, {high:g}]")


def _path(flag: str, value: str | None, kind: str) -> None:
    """An input path that must exist: kind "file" or "dir" (URIs are left to the reader)."""
    if value is None or "://" in value:
        return
    path = Path(value)
    if not path.exists():
        raise InputError(f"{flag} {value}: not found")
    if kind == "file" and path.is_dir():
        raise InputError(f"{flag} {value}: is a directory, expected a file")
    if kind == "dir" and not path.is_dir():
        raise InputError(f"{flag} {value}: is not a directory")


def _not_a_file(flag: str, value: str | None) -> None:
    if value is not None and Path(value).is_file():
        raise InputError(f"{flag} {value}: is an existing file, expected a directory")


def check_args(args: argparse.Namespace) -> None:
    """Every command-line argument, before any work starts: counts, percents, thresholds, ports, paths."""
    _at_least("--seed", getattr(args, "seed", None), 0)
    if args.command == "synth":
        _at_least("--images", args.images, 2, " (train and val)")
        _not_a_file("out", args.out)
    elif args.command == "prepare":
        _in_range("--percent", args.percent, 0, 100)
        _path("--annotations", args.annotations, "file")
        _path("--images", args.images, "dir")
        _path("--val-annotations", args.val_annotations, "file")
        _path("--val-images", args.val_images, "dir")
        _path("--unlabeled-images", args.unlabeled_images, "dir")
        if (args.val_annotations is None) != (args.val_images is None):
            raise InputError("--val-annotations and --val-images must be given together")
    elif args.command in ("evaluate", "label"):
        _path("--checkpoint", args.checkpoint, "any")  # a file, or (label) its run directory
    if args.command == "label":
        _path("--images", args.images, "dir")
        _path("--prepared", args.prepared, "dir")
        _in_range("--threshold", args.threshold, 0, 1)
        _at_least("--review", args.review, 0)
        if args.prepared is None and args.split != "unlabeled":
            raise InputError(f"--split {args.split}: only with --prepared")
        _not_a_file("--out", args.out)
    elif args.command == "tune":
        _at_least("--samples", args.samples, 1)
        _at_least("--max-concurrent", args.max_concurrent, 1)
    elif args.command == "ui":
        if not 1 <= args.port <= MAX_PORT:
            raise InputError(f"--port {args.port}: not a TCP port (1 to {MAX_PORT})")
        if not args.host.strip():
            raise InputError("--host: empty")


def _synth(args: argparse.Namespace) -> None:
    from pipeline.data.synth import generate

    print(json.dumps(generate(args.out, args.images, args.seed, masks=args.masks, layout=args.layout), indent=2))


def _prepare(args: argparse.Namespace) -> None:
    from pipeline.data.prepare import prepare

    report = prepare(
        args.annotations,
        args.images,
        args.percent,
        args.seed,
        args.out,
        val_annotations=args.val_annotations,
        val_images=args.val_images,
        unlabeled_images=args.unlabeled_images,
    )
    print(json.dumps(report, indent=2))


def _load(args: argparse.Namespace):
    from pipeline.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "output", None):
        overrides.append(f"train.output_dir={args.output}")
    return load_config(args.config, overrides)


def _train(args: argparse.Namespace) -> None:
    from pipeline.train import train

    run_dir = train(_load(args))
    print(run_dir)


def _evaluate(args: argparse.Namespace) -> None:
    from pipeline.train import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(_load(args), args.checkpoint, args.model), indent=2))


def _label(args: argparse.Namespace) -> None:
    from pathlib import Path

    from pipeline.labeling.label import LabelJob, label
    from pipeline.labeling.model import from_checkpoint, from_registry
    from pipeline.labeling.report import summary_lines

    if args.model_uri:
        model = from_registry(args.model_uri, args.config, args.overrides, args.model)
    else:
        model = from_checkpoint(args.checkpoint, args.config, args.overrides, args.model, args.prepared)
    job = LabelJob(
        Path(args.out),
        images=args.images,
        prepared=args.prepared,
        split=args.split,
        threshold=args.threshold,
        review=args.review,
        sweep=args.sweep,
    )
    print("\n".join(summary_lines(label(model, job))))


def _tune(args: argparse.Namespace) -> None:
    from tune.driver import run_search

    args.output, output = None, args.output
    print(json.dumps(run_search(_load(args), args.samples, args.max_concurrent, output), indent=2))


def _ui(args: argparse.Namespace) -> int:
    from pipeline.config import tracking_uri
    from pipeline.tracking.ui import serve_ui

    cfg = _load(args)
    return serve_ui(tracking_uri(cfg.tracking.uri), args.host, args.port, cfg.tracking.experiment)


COMMANDS = {
    "synth": _synth,
    "prepare": _prepare,
    "train": _train,
    "evaluate": _evaluate,
    "label": _label,
    "tune": _tune,
    "ui": _ui,
}


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C: Ray is shut down on the way out


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _stop)
    # MLflow announces the creation of a new sqlite store on stderr: a refused run would print more than its line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    try:
        args = _build_parser().parse_args(argv)
        check_args(args)
        return COMMANDS[args.command](args) or 0
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped: the same command resumes from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
