"""Config: validation by key name, overrides, and paths that survive Ray's working-directory changes."""

import pytest

from pipeline.config import Config, load_config
from pipeline.errors import InputError


def test_relative_local_paths_become_absolute_but_uris_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None, ["data.prepared=data/p", "data.unlabeled_folder=s3://bucket/raw", "train.output_dir=runs/x"]
    )
    resolved = cfg.with_absolute_paths()
    assert resolved.data.prepared == str(tmp_path / "data" / "p")
    assert resolved.train.output_dir == str(tmp_path / "runs" / "x")
    assert resolved.data.unlabeled_folder == "s3://bucket/raw" and resolved.model.weights_path is None


def test_default_mlflow_store_is_pinned_to_the_launch_directory(tmp_path, monkeypatch):
    # Ray workers run elsewhere: a relative ./mlflow.db would land in Ray's session directory.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert load_config(None).with_absolute_paths().tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    server = load_config(None, ["tracking.uri=http://127.0.0.1:5000"]).with_absolute_paths()
    assert server.tracking.uri == "http://127.0.0.1:5000"


def test_ema_span_is_the_products_spelling_and_conflicts_are_refused():
    assert load_config(None, ["ssl.ema_span=1999"]).ssl.ema_keep_rate == pytest.approx(0.999)
    with pytest.raises(InputError, match="ema_span"):
        load_config(None, ["ssl.ema_span=1999", "ssl.ema_keep_rate=0.9"])
    with pytest.raises(InputError, match="max_staleness"):
        load_config(None, ["ssl.max_staleness=2", "ssl.sync_interval=4"])


def test_a_derived_value_follows_its_source_through_a_dump_and_an_override():
    cfg = load_config(None, ["ssl.ema_span=1999"])
    again = Config.model_validate(cfg.model_dump())  # how Ray workers and labelers receive the config
    assert again.ssl.ema_keep_rate == pytest.approx(0.999) and again.ssl.sync_interval == 1
    trial = cfg.with_overrides({"ssl.ema_keep_rate": 0.9, "ssl.teacher_update_interval": 3})  # a Tune trial
    assert (trial.ssl.ema_span, trial.ssl.ema_keep_rate, trial.ssl.sync_interval) == (None, 0.9, 3)
    assert cfg.to_flat_dict()["ssl.ema_keep_rate"] == pytest.approx(0.999)  # tracked as the run uses it
