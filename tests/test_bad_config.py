"""What `ssod` refuses in a config: values of the wrong type or out of range, from a file or `--set`.

Each ends in one line naming the source of the value and the key. A sweep feeds every key values it must
refuse through the CLI, in this process (`pipeline.cli.main`, stderr read with capsys).
"""

from __future__ import annotations

import pytest
from badinput import error_of

from pipeline.config import load_config

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
