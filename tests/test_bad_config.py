"""What `ssod` refuses in a config, a weights file, a checkpoint or a tracking URI.

Each ends in one line naming the key or the file and the problem (exit code 2 from the CLI), before any
training. The CLI cases call `pipeline.cli.main` in this process and read its stderr; only the read-only file
system runs the CLI in a process of its own (in a mount namespace).
"""

from __future__ import annotations

import json
import pickle
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from badinput import assert_one_line_error, cli_refuses, error_of
from conftest import cli, tiny_config

from models.builders import build_detector
from pipeline.config import load_config
from pipeline.data.readers import load_categories
from pipeline.preflight import check_model
from pipeline.train import train
from pipeline.training.local import train_local

REFUSED = {  # case -> (overrides, the key its message names)
    "lr_infinite": (["train.lr=.inf"], "train.lr"),
    "lr_nan": (["train.lr=.nan"], "train.lr"),
    "unsup_loss_weight_infinite": (["ssl.unsup_loss_weight=.inf"], "ssl.unsup_loss_weight"),
    "min_size_zero": (["model.min_size=[0]"], "model.min_size"),
    "anchor_sizes_of_another_backbone": (["model.anchor_sizes=[[32], [64]]"], "model.anchor_sizes"),
    "anchor_size_zero": (["model.anchor_sizes=[[0], [64], [128]]"], "model.anchor_sizes"),
    "burn_in_longer_than_the_run": (["train.steps=10", "ssl.burn_in_steps=11"], "ssl.burn_in_steps"),
    "max_skipped_fraction_above_one": (["train.max_skipped_fraction=1.5"], "train.max_skipped_fraction"),
    "empty_experiment_name": (['tracking.experiment=""'], "tracking.experiment"),
    "set_value_not_yaml": (["train.lr=[1,"], "--set 'train.lr=[1,': the value is not valid YAML"),
}


@pytest.mark.parametrize("overrides, key", REFUSED.values(), ids=REFUSED.keys())
def test_config_value_is_refused_by_key(overrides, key):
    assert key in error_of(load_config, None, overrides)


WRONG_TYPES = {  # case -> (override, its one line)
    "bool_for_an_int": ("train.steps=true", "--set train.steps: Input should be a valid integer, got true"),
    "float_for_an_int": ("ssl.burn_in_steps=1.5", "--set ssl.burn_in_steps: Input should be a valid integer, got 1.5"),
    "whole_float_for_an_int": ("train.steps=10.0", "--set train.steps: Input should be a valid integer, got 10.0"),
    "string_for_an_int": ('train.steps="5"', "--set train.steps: Input should be a valid integer, got '5'"),
    "bool_for_a_float": ("train.lr=false", "--set train.lr: Input should be a valid number, got false"),
    "string_for_a_float": ('train.lr="0.1"', "--set train.lr: Input should be a valid number, got '0.1'"),
    "int_for_a_bool": ("tracking.enabled=1", "--set tracking.enabled: Input should be a valid boolean, got 1"),
    "bool_for_a_threshold": (
        "ssl.score_threshold=true",
        "--set ssl.score_threshold: Input should be a valid number or 'auto', got true",
    ),
    "bool_in_a_list": (
        "model.min_size=[128, true]",
        "--set model.min_size.1: Input should be a valid integer, got true",
    ),
    "list_for_a_string": (
        "tracking.experiment=[a]",
        "--set tracking.experiment: Input should be a valid string, got [a]",
    ),
    "unknown_key": ("train.stepz=3", "--set train.stepz: unknown key"),
    "unknown_section": ("trian.steps=3", "--set trian.steps: unknown section"),
}


@pytest.mark.parametrize("override, line", WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_a_value_of_the_wrong_type_is_refused_not_coerced(override, line):
    assert error_of(load_config, None, [override]) == line


def test_a_wrong_type_in_a_file_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: true\n  lr: 0.01\nssl:\n  burn_in_steps: 2.5\n")
    assert error_of(load_config, path) == (
        f"{path}: ssl.burn_in_steps: Input should be a valid integer, got 2.5; "
        f"{path}: train.steps: Input should be a valid integer, got true"
    )
    # The same key from --set is named as --set: the file is not blamed for it.
    message = error_of(load_config, path, ["ssl.burn_in_steps=1", "train.steps=yes"])
    assert message == "--set train.steps: Input should be a valid integer, got true"


def test_numbers_that_are_numbers_are_taken():
    cfg = load_config(None, ["train.lr=1", "train.weight_decay=1e-4", "ray.cpus_per_worker=2", "train.steps=3000"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # YAML reads `1` as an int: a float key takes it
    assert cfg.train.weight_decay == 1e-4  # YAML 1.1 reads `1e-4` as a string; the config reads it as a number
    assert cfg.ray.cpus_per_worker == 2.0 and cfg.train.steps == 3000


def test_a_text_key_keeps_the_text_it_was_given():
    cfg = load_config(None, ["tracking.experiment=2024", "train.output_dir=1e3", "model.weights_path=null"])
    assert cfg.tracking.experiment == "2024" and cfg.train.output_dir == "1e3" and cfg.model.weights_path is None


def test_the_cli_prints_the_wrong_type_on_one_line(capsys):
    from pipeline.cli import main

    assert main(["train", "--set", "train.steps=true"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --set train.steps: Input should be a valid integer, got true\n"


def test_burn_in_as_long_as_the_run_is_allowed():
    # The teacher is copied at the end of the last step: a burn-in-only (supervised) run is valid.
    assert load_config(None, ["train.steps=10", "ssl.burn_in_steps=10"]).ssl.burn_in_steps == 10


@pytest.mark.parametrize("text", ["", "# only a comment\n"], ids=["empty", "comments_only"])
def test_empty_yaml_file_is_refused(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert error_of(load_config, path) == f"{path}: the config file is empty"


def test_config_path_that_is_a_directory(tmp_path):
    assert error_of(load_config, tmp_path).startswith(f"{tmp_path}: cannot read the config file")


def test_tune_space_value_that_makes_an_invalid_config_is_refused_up_front():
    from tune.space import check_space

    cfg = load_config(None, ["train.steps=1500", "ssl.burn_in_steps=50"])  # the default space draws 2000
    assert "tune.space.ssl.burn_in_steps: the value 2000" in error_of(check_space, cfg)


@pytest.fixture
def bad_files(tmp_path) -> Path:
    (tmp_path / "text.pt").write_text("these are not weights\n")
    torch.save({"model": pickle.PickleError}, tmp_path / "objects.pt")  # a pickled class, not a tensor
    torch.save({"a": torch.zeros(2)}, tmp_path / "zip.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "zip.pt").read_bytes()[:100])
    (tmp_path / "dir.pt").mkdir()
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "existing").write_text("a file")
    return tmp_path


@pytest.mark.parametrize(
    "name, problem",
    [
        ("text.pt", "not a torch weights file"),
        ("objects.pt", "holds Python objects"),
        ("truncated.pt", "not a torch weights file"),
        ("dir.pt", "a directory"),
    ],
    ids=["text_file", "pickled_objects", "truncated", "directory"],
)
def test_weights_file_error_is_one_line_without_unsafe_advice(bad_files, name, problem):
    message = error_of(train_local_build, bad_files / name)
    assert message.startswith(f"model.weights_path: {bad_files / name}: {problem}")
    assert "weights_only=False" not in message and "trust" not in message


def train_local_build(path: Path) -> None:
    from pipeline.training.setup import build_student_teacher

    cfg = load_config(None, [f"model.weights_path={path}"])
    build_student_teacher(cfg, 3, torch.device("cpu"))


def test_resume_with_a_checkpoint_of_another_architecture(prepared, tmp_path):
    cfg = tiny_config(prepared, tmp_path / "run", "train.backend=local")
    (tmp_path / "run").mkdir()
    other = build_detector(len(load_categories(prepared)), arch="mask_rcnn", backbone="tiny").state_dict()
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    torch.save({"student": other, "teacher": other, "step": 4}, checkpoint)
    local = error_of(train_local, cfg)
    assert local.startswith(f"{checkpoint}: its student does not fit this config")
    # A Ray run checks the checkpoint it would resume from on the driver, with the same words.
    assert error_of(check_model, cfg, len(load_categories(prepared)), checkpoint) == local


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


# -- weights say what they loaded ---------------------------------------------------------------------
def _tiny_state() -> dict:
    return build_detector(3, backbone="tiny", min_size=(96,)).state_dict()


def test_a_weights_file_that_fits_one_tensor_is_refused_with_its_counts(tmp_path):
    state = _tiny_state()
    total = sum(1 for k in state if not k.endswith("num_batches_tracked"))
    first = next(k for k in state if k.startswith("backbone."))
    path = tmp_path / "one.pt"
    torch.save({first: state[first], "head.extra": torch.zeros(2)}, path)
    message = error_of(train_local_build, path)
    assert message.startswith(
        f"model.weights_path: {path}: 1 of {total} detector tensors matched "
        f"({total - 1} missing, 1 unexpected, 0 shape-mismatched); first missing: "
    )
    assert message.endswith("; set model.allow_partial_weights=true to load it anyway")


def test_a_partial_load_on_purpose_is_taken_and_counted(tmp_path, capsys):
    from models.weights_report import LOADS

    state = _tiny_state()
    keep = {k: v for k, v in list(state.items())[:5]}
    path = tmp_path / "five.pt"
    torch.save(keep, path)
    LOADS.clear()
    cfg = load_config(None, [f"model.weights_path={path}", "model.allow_partial_weights=true"])
    from pipeline.training.setup import build_student_teacher

    student, _ = build_student_teacher(cfg, 3, torch.device("cpu"))
    [report] = LOADS
    assert report["matched"] == 5 and report["missing"] == report["model_tensors"] - 5 and report["unexpected"] == 0
    assert torch.equal(student.state_dict()[next(iter(keep))], next(iter(keep.values())))
    assert f"weights {path}: 5 of {report['model_tensors']} detector tensors matched" in capsys.readouterr().err


def test_a_weights_file_for_other_classes_names_the_mismatch(tmp_path):
    path = tmp_path / "five_classes.pt"
    torch.save(build_detector(5, backbone="tiny", min_size=(96,)).state_dict(), path)
    message = error_of(train_local_build, path)  # train_local_build: 3 classes
    assert "shape-mismatched); shape mismatch at roi_heads.box_predictor.cls_score.weight: file (6, " in message


def test_evaluate_and_label_count_what_they_load_and_refuse_a_poor_fit(prepared, tmp_path):
    from pipeline.labeling.model import checked_state
    from pipeline.train import evaluate_checkpoint

    cfg = tiny_config(prepared, tmp_path / "run", "data.eval_images=1")
    classes = len(load_categories(prepared))
    full = build_detector(classes, backbone="tiny", min_size=(128,)).state_dict()
    few = dict(list(full.items())[:3])
    checkpoint = tmp_path / "few.pt"
    torch.save({"student": full, "teacher": few, "step": 1}, checkpoint)
    message = error_of(evaluate_checkpoint, cfg, checkpoint, "teacher")
    assert message.startswith(f"{checkpoint} (teacher): 3 of ")
    scores = evaluate_checkpoint(cfg, checkpoint, "student")
    [report] = scores["weights_load"]
    assert report["matched"] == report["model_tensors"] and report["target"] == "student"
    assert error_of(checked_state, cfg, classes, few, "labels", "teacher").startswith("labels: 3 of ")
    state, report = checked_state(cfg, classes, full, "labels", "teacher")
    assert report["fraction"] == 1.0 and state.keys() == full.keys()


@pytest.mark.slow
def test_a_run_records_its_weights_load_in_metrics_json(prepared, tmp_path):
    classes = len(load_categories(prepared))
    path = tmp_path / "w.pt"
    torch.save(build_detector(classes, backbone="tiny", min_size=(128,)).state_dict(), path)
    cfg = tiny_config(
        prepared,
        tmp_path / "run",
        "train.backend=local",
        "train.steps=1",
        "ssl.burn_in_steps=1",
        "data.eval_images=1",
        f"model.weights_path={path}",
    )
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    [load] = metrics["weights_load"]
    assert load["source"] == str(path) and load["matched"] == load["model_tensors"] and load["missing"] == 0


# -- sweeping: every key, values of the wrong type or out of range ------------------------------------
def _config_keys() -> list[tuple[str, object]]:
    from pipeline.config import Config

    return [
        (f"{section}.{name}", field)
        for section, sec_field in Config.model_fields.items()
        for name, field in sec_field.annotation.model_fields.items()
    ]


def _accepts(annotation) -> set:
    """The kinds of YAML value a key takes: int, float, bool, str, list, dict, or a set of literal strings."""
    import types
    import typing

    kinds: set = set()
    for member in typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,):
        origin = typing.get_origin(member)
        if origin is typing.Annotated:
            kinds |= _accepts(typing.get_args(member)[0])
        elif origin is typing.Literal:
            kinds |= {("literal", v) for v in typing.get_args(member)}
        elif origin in (list, dict):
            kinds.add(origin)
        elif member is not type(None):
            kinds.add(member)
    return kinds


def _wrong_values(field):
    """Values `field` must refuse: of a kind it does not take, or outside its bounds."""
    import annotated_types
    from hypothesis import strategies as st

    kinds = _accepts(field.annotation)
    literals = {v for kind, v in (k for k in kinds if isinstance(k, tuple))}
    words = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8).filter(lambda w: w not in literals)
    wrong = [st.fixed_dictionaries({"k": st.integers()})]  # a mapping fits no key but tune.space
    if dict in kinds:
        wrong = [st.integers(), st.lists(st.integers(), min_size=1, max_size=2)]
    if list not in kinds and dict not in kinds:
        wrong.append(st.lists(st.integers(1, 99), min_size=1, max_size=3))
    if int not in kinds and float not in kinds and bool not in kinds:
        if str not in kinds:  # --set gives a text key the text of a number
            wrong.append(st.integers() | st.floats(allow_nan=False, allow_subnormal=False))
    if bool not in kinds and str not in kinds:  # --set gives a text key the text `true` too
        wrong.append(st.booleans())
    if int in kinds and float not in kinds:
        wrong.append(
            st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False).filter(lambda x: x != int(x))
        )
        wrong.append(st.sampled_from([2.0, -3.0]))  # whole floats are no ints either
    if float in kinds:
        wrong.append(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    if (int in kinds or float in kinds or bool in kinds or list in kinds) and str not in kinds:
        wrong.append(words | st.sampled_from(["1", "0.5", "true"]))  # a quoted number is text, not a number
    elif literals and str not in kinds:
        wrong.append(words)
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Ge):
            wrong.append(st.just(bound.ge - (1 if int in kinds and float not in kinds else 0.5)))
        elif isinstance(bound, annotated_types.Gt):
            wrong.append(st.just(bound.gt))
        elif isinstance(bound, annotated_types.Le):
            wrong.append(st.just(bound.le + (1 if int in kinds and float not in kinds else 0.5)))
        elif isinstance(bound, annotated_types.Lt):
            wrong.append(st.just(bound.lt))
    return st.one_of(wrong)


def _as_yaml(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def test_every_key_refuses_wrong_types_and_out_of_range_values_in_one_line(tmp_path_factory, capsys):
    import yaml
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from pipeline.cli import main

    folder = tmp_path_factory.mktemp("sweep")
    keys = _config_keys()
    cases = st.sampled_from(keys).flatmap(
        lambda kf: st.tuples(st.just(kf[0]), _wrong_values(kf[1]), st.sampled_from(["set", "file"]))
    )
    nowhere = ["--set", f"data.prepared={folder / 'none'}"]  # were a value taken, the run stops here, not trains

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(cases)
    def refused(case):
        key, value, source = case
        section, name = key.split(".")
        if source == "set":
            argv, where = ["train", "--set", f"{key}={_as_yaml(value)}"], f"--set {key}"
        else:
            path = folder / "c.yaml"
            path.write_text(yaml.safe_dump({section: {name: value}}))
            argv, where = ["train", "--config", str(path)], f"{path}: {key}"
        capsys.readouterr()
        code = main(argv + (nowhere if key != "data.prepared" else []))
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), (key, value, err)
        assert where in err, (key, value, err)

    refused()
