"""The CLI refuses bad arguments and bad inputs in one line and exit code 2, before any work.

The cases call `pipeline.cli.main` in this process and read its stderr; only the read-only file system runs
the CLI in a process of its own (in a mount namespace).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from badinput import assert_one_line_error, cli_refuses, error_of
from conftest import cli, tiny_config

from pipeline.train import train


def test_unknown_tracking_scheme_is_the_same_line_on_both_backends(prepared, tmp_path):
    messages = {
        backend: error_of(
            train,
            tiny_config(
                prepared,
                tmp_path / backend,
                f"train.backend={backend}",
                "tracking.enabled=true",
                "tracking.uri=notascheme://x",
            ),
        )
        for backend in ("local", "ray")
    }
    assert messages["local"] == messages["ray"] and messages["local"].startswith("tracking.uri=notascheme://x: ")


def test_ray_address_nobody_answers_at_is_refused_at_once(prepared, tmp_path):
    from pipeline.distributed.cluster import start_ray
    from pipeline.distributed.resources import plan_resources

    with socket.socket() as s:  # a port with nothing behind it: ray.init would retry it for minutes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tiny_config(prepared, tmp_path, f"ray.address=127.0.0.1:{port}")
    assert error_of(start_ray, cfg, plan_resources(cfg)).startswith(f"ray.address=127.0.0.1:{port}: no Ray cluster")


def _cli_cases(prepared: Path, files: Path) -> dict[str, tuple[list[str], list[str]]]:
    """case -> (argv, what the one line names)."""
    data = ["--set", f"data.prepared={prepared}", "--output", str(files / "run")]
    no_val = files / "no_val"
    shutil.copytree(prepared, no_val)
    (no_val / "val_annotations.json").unlink()
    return {
        "empty_config_file": (
            ["train", "--config", str(files / "empty.yaml")],
            ["empty.yaml: the config file is empty"],
        ),
        "lr_infinite": (["train", "--set", "train.lr=.inf"], ["train.lr"]),
        "unknown_key_in_a_section": (["train", *data, "--set", "ssl.unknown=1"], ["ssl.unknown"]),
        "score_threshold_above_one": (["train", *data, "--set", "ssl.score_threshold=1.5"], ["ssl.score_threshold"]),
        "weights_file_not_found": (
            ["train", *data, "--set", "train.backend=local", "--set", f"model.weights_path={files / 'no.pt'}"],
            ["no.pt: weights file not found"],
        ),
        "weights_file_is_text": (
            [
                "train",
                *data,
                "--set",
                "train.backend=local",
                "--set",
                "tracking.enabled=false",
                "--set",
                f"model.weights_path={files / 'text.pt'}",
            ],
            ["text.pt: not a torch weights"],
        ),
        "unknown_tracking_scheme_on_ray": (["train", *data, "--set", "tracking.uri=notascheme://x"], ["notascheme"]),
        "val_annotations_missing_on_ray": (
            ["train", "--set", f"data.prepared={no_val}", "--output", str(files / "run")],
            ["val_annotations.json: no validation set"],
        ),
        "prepare_out_is_a_file": (
            [
                "prepare",
                "--annotations",
                str(files / "empty.yaml"),
                "--images",
                str(files),
                "--percent",
                "5",
                "--out",
                str(files / "existing"),
            ],
            ["existing: --out is an existing file"],
        ),
        "evaluate_checkpoint_is_text": (
            ["evaluate", "--set", f"data.prepared={prepared}", "--checkpoint", str(files / "text.pt")],
            ["text.pt: not a readable checkpoint"],
        ),
    }


CLI_CASES = [
    "empty_config_file",
    "lr_infinite",
    "unknown_key_in_a_section",
    "score_threshold_above_one",
    "weights_file_not_found",
    "weights_file_is_text",
    "unknown_tracking_scheme_on_ray",
    "val_annotations_missing_on_ray",
    "prepare_out_is_a_file",
    "evaluate_checkpoint_is_text",
]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_prints_one_line_and_exits_2(prepared, bad_files, capsys, case):
    argv, names = _cli_cases(prepared, bad_files)[case]
    cli_refuses(capsys, argv, *names)


def _read_only_mount_works(path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount --bind -o ro {path} {path} && ! touch {path}/x"], capture_output=True
    )
    return probe.returncode == 0


def test_outputs_on_a_read_only_file_system(prepared, synthetic_coco, tmp_path):
    if not _read_only_mount_works(tmp_path):
        pytest.skip("needs `unshare -m` and bind mounts (root) to make a read-only file system")
    ro = ("unshare", "-m", "sh", "-c", f'mount --bind -o ro {tmp_path} {tmp_path} && exec "$0" "$@"')
    train_dir = synthetic_coco / "train"
    done = cli(
        "prepare",
        "--annotations",
        str(train_dir / "annotations.json"),
        "--images",
        str(train_dir / "images"),
        "--percent",
        "10",
        "--out",
        str(tmp_path / "out"),
        prefix=ro,
    )
    assert_one_line_error(done, f"{tmp_path / 'out'}: cannot write --out (Read-only file system)")
    done = cli(
        "train",
        "--set",
        f"data.prepared={prepared}",
        "--set",
        "tracking.enabled=false",
        "--output",
        str(tmp_path / "run"),
        prefix=ro,
    )
    assert_one_line_error(done, f"{tmp_path / 'run'}: cannot write train.output_dir (Read-only file system)")


def _argument_cases(files: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (argv, its one line): each refused by `pipeline.cli.check_args` before any work."""
    ann = str(files / "a.json")
    prepare = ["prepare", "--annotations", ann, "--images", str(files), "--out", str(files / "out")]
    label = ["label", "--checkpoint", str(files / "zip.pt"), "--images", str(files), "--out", str(files / "l")]
    return {
        "percent_zero": ([*prepare, "--percent", "0"], "--percent 0.0: must be in (0, 100]"),
        "percent_above_100": ([*prepare, "--percent", "150"], "--percent 150.0: must be in (0, 100]"),
        "percent_nan": ([*prepare, "--percent", "nan"], "--percent nan: must be in (0, 100]"),
        "percent_not_a_number": ([*prepare, "--percent", "five"], "argument --percent: invalid float value: 'five'"),
        "percent_missing": (prepare, "the following arguments are required: --percent"),
        "negative_seed": ([*prepare, "--percent", "5", "--seed", "-1"], "--seed -1: must be at least 0"),
        "annotations_not_found": (
            [
                "prepare",
                "--annotations",
                str(files / "no.json"),
                "--images",
                str(files),
                "--percent",
                "5",
                "--out",
                "o",
            ],
            f"--annotations {files / 'no.json'}: not found",
        ),
        "images_is_a_file": (
            ["prepare", "--annotations", ann, "--images", ann, "--percent", "5", "--out", "o"],
            f"--images {ann}: is not a directory",
        ),
        "val_images_alone": (
            [*prepare, "--percent", "5", "--val-images", str(files)],
            "--val-annotations and --val-images must be given together",
        ),
        "synth_one_image": (["synth", str(files / "s"), "--images", "1"], "--images 1: must be at least 2"),
        "tune_no_samples": (["tune", "--samples", "0"], "--samples 0: must be at least 1"),
        "tune_no_concurrency": (["tune", "--max-concurrent", "-2"], "--max-concurrent -2: must be at least 1"),
        "label_negative_review": ([*label, "--review", "-1"], "--review -1: must be at least 0"),
        "label_threshold_above_one": ([*label, "--threshold", "1.5"], "--threshold 1.5: must be in (0, 1]"),
        "label_threshold_zero": ([*label, "--threshold", "0"], "--threshold 0.0: must be in (0, 1]"),
        "label_split_without_prepared": ([*label, "--split", "val"], "--split val: only with --prepared"),
        "label_checkpoint_not_found": (
            ["label", "--checkpoint", str(files / "no.pt"), "--images", str(files), "--out", "l"],
            f"--checkpoint {files / 'no.pt'}: not found",
        ),
        "label_out_is_a_file": (
            ["label", "--checkpoint", str(files / "zip.pt"), "--images", str(files), "--out", str(files / "existing")],
            f"--out {files / 'existing'}: is an existing file, expected a directory",
        ),
        "evaluate_checkpoint_not_found": (
            ["evaluate", "--checkpoint", str(files / "no.pt")],
            f"--checkpoint {files / 'no.pt'}: not found",
        ),
        "unknown_command": (["trian"], "argument command: invalid choice: 'trian'"),
    }


ARGUMENT_CASES = list(_argument_cases(Path("x")))


@pytest.mark.parametrize("case", ARGUMENT_CASES)
def test_every_cli_argument_is_checked_before_work(bad_files, capsys, case):
    from pipeline.cli import main

    (bad_files / "a.json").write_text("{}")
    argv, line = _argument_cases(bad_files)[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {line}"), err
