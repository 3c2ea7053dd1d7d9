"""The training loop without models: the order of hooks, stopping from a hook, a dry unlabeled stream."""

from types import SimpleNamespace

import pytest
import torch

import pipeline.training.loop as loop_module
from models.unbiased_teacher import Batch, StepResult
from pipeline.config import load_config
from pipeline.training.loop import Hook, Loop
from pipeline.training.state import RunState


class _State:
    """The part of `RunState` the loop itself reads and writes."""

    stopping = RunState.stopping

    def __init__(self, steps: int, burn_in: int):
        self.cfg = load_config(None, [f"train.steps={steps}", f"ssl.burn_in_steps={burn_in}"])
        self.step = self.skipped_steps = 0
        self.stop_reason, self.target_reached = None, False
        self.device, self.student, self.optimizer = torch.device("cpu"), None, None
        self.scheduler = SimpleNamespace(step=lambda: None)
        self.last_result, self.metrics = None, {"written": True}


class _Feed:
    def __init__(self, unlabeled_batches: int):
        self.left = unlabeled_batches

    def labeled(self) -> Batch:
        return Batch([], [])

    def unlabeled(self, step: int):
        self.left -= 1
        return object() if self.left >= 0 else None


class _PseudoLabels:
    def batch(self, run, unlabeled) -> Batch:
        return Batch([], [])


class _Recorder(Hook):
    def __init__(self, name: str, calls: list, stop_at: int | None = None):
        self.name, self.calls, self.stop_at = name, calls, stop_at

    def before_step(self, run) -> None:
        self.calls.append((self.name, "before_step", run.step))

    def after_step(self, run) -> None:
        self.calls.append((self.name, "after_step", run.step))
        if run.step == self.stop_at:
            run.stop_reason = "stopped by a hook"

    def after_run(self, run) -> None:
        self.calls.append((self.name, "after_run", run.step))


@pytest.fixture(autouse=True)
def _no_model_step(monkeypatch):
    monkeypatch.setattr(loop_module, "unbiased_teacher_step", lambda *args: StepResult(total=0.0))


def test_hooks_run_in_order_and_a_stopping_hook_ends_the_run_after_its_own_call():
    calls: list = []
    hooks = [_Recorder("a", calls), _Recorder("b", calls, stop_at=2), _Recorder("c", calls)]
    metrics = Loop(_State(steps=5, burn_in=5), _Feed(0), _PseudoLabels(), hooks).run()
    assert metrics == {"written": True}
    assert calls[:6] == [
        ("a", "before_step", 0),
        ("b", "before_step", 0),
        ("c", "before_step", 0),
        ("a", "after_step", 1),
        ("b", "after_step", 1),
        ("c", "after_step", 1),
    ]
    assert [c for c in calls if c[1] == "after_step" and c[2] == 2] == [("a", "after_step", 2), ("b", "after_step", 2)]
    assert [c for c in calls if c[1] == "after_run"] == [
        ("a", "after_run", 2),
        ("b", "after_run", 2),
        ("c", "after_run", 2),
    ]


def test_a_dry_unlabeled_stream_stops_the_run_with_its_step():
    run = _State(steps=6, burn_in=2)
    Loop(run, _Feed(unlabeled_batches=1), _PseudoLabels(), []).run()
    assert run.step == 3 and "the unlabeled stream ran dry at step 3 of 6" in run.stop_reason
