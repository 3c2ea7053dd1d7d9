"""The teacher weight store: a named, per-run actor holding the latest teacher state dict and its version.

Ray Data's pool actors are anonymous, so weights are pulled: rank 0 publishes, labelers poll the version
and fetch the state when it changed. The store `ray.put`s the state itself, so it owns the object and a
train-worker restart loses nothing.

It also keeps the labelling credit that bounds staleness: labelers may run at most `window` rows ahead
of what the trainers consumed. The wait times out (and is counted) instead of blocking forever, so a
window smaller than what Ray Data keeps in flight slows the stream down but can never deadlock it.

And it counts faults: worker-group restarts (`begin_attempt` after the first), labeler actors that came
back (Ray restarts a killed actor under its old id) and the rows they held that never came back.
"""

from __future__ import annotations

import asyncio
import time

import ray
import torch

from pipeline.data.shards import Skipped

NO_VERSION = -1


class WeightStore:
    """The store's logic; `TeacherWeightStore` is this class as a Ray actor."""

    def __init__(self) -> None:
        self._gate_timeouts = self._labeler_restarts = 0
        self._attempt = 0  # worker groups started so far (`begin_attempt`)
        self._skipped = Skipped()  # damaged parts of the unlabeled pool, from the preflight, readers and labelers
        self._labelers: dict[str, dict[str, int]] = {}  # actor id -> its batches in flight (key -> rows)
        self._lost: dict[str, int] = {}  # batches a dead labeler held, until a retry labels them again
        self._fresh_attempt()

    def begin_attempt(self) -> None:
        """A (re)started worker group: its teacher versions and its labelers' credit start afresh.

        After a train-worker restart the run resumes from an older step, and Ray Data re-executes the
        streams with new labelers: the last attempt's newer version would win over every new publish, and
        its produced/consumed counts would make every labeler wait out the gate.
        """
        self._attempt += 1
        self._fresh_attempt()

    def _fresh_attempt(self) -> None:
        self._version = NO_VERSION
        self._state_ref: ray.ObjectRef | None = None
        self._thresholds: list[float] | None = None
        self._published_at = 0.0
        self._produced = self._consumed = 0
        self._labelers = {actor: {} for actor in self._labelers}  # the last attempt's batches reach no trainer

    def publish(self, version: int, state: dict[str, torch.Tensor], thresholds: list[float] | None = None) -> int:
        """Store a teacher taken at student step `version` (with its per-class thresholds, if adaptive);
        an older version never replaces a newer one."""
        if version > self._version:
            self._state_ref, self._thresholds = ray.put(state), thresholds
            self._version, self._published_at = version, time.time()
        return self._version

    def version(self) -> int:
        return self._version

    def labeler_started(self, actor_id: str) -> int:
        """Called by every labeler as it starts: an id seen before is an actor Ray restarted. Returns the
        worker-group attempt the labeler serves."""
        if actor_id in self._labelers:
            self._labeler_restarts += 1
            held = self._labelers[actor_id]
            self._lost.update(held)
            self._produced -= sum(held.values())  # their credit comes back: a retry asks for it again
        self._labelers[actor_id] = {}
        return self._attempt

    def delivered(self, actor_id: str, batch: str) -> None:
        self._labelers.get(actor_id, {}).pop(batch, None)

    async def acquire(
        self,
        rows: int,
        window: int,
        timeout_s: float,
        actor_id: str | None = None,
        batch: str | None = None,
        attempt: int | None = None,
    ) -> bool:
        """A labeler asks to label `rows` more (the batch `batch`); waits while that would run more than
        `window` ahead. A labeler of an earlier attempt's streams, still winding down, is let through
        uncounted: its rows reach no trainer."""
        if attempt is not None and attempt != self._attempt:
            return True
        if actor_id is not None:
            self._labelers.setdefault(actor_id, {})[batch] = rows
            self._lost.pop(batch, None)  # a retried batch is labelled after all
        deadline = time.monotonic() + timeout_s
        while self._produced + rows - self._consumed > window and time.monotonic() < deadline:
            if attempt is not None and attempt != self._attempt:
                return True
            await asyncio.sleep(0.05)
        granted = self._produced + rows - self._consumed <= window
        self._gate_timeouts += int(not granted)
        self._produced += rows
        return granted

    def consumed(self, rows: int) -> None:
        self._consumed += rows

    def skip(self, part: str, rows: int, why: str) -> None:
        self._skipped.add(part, rows, why)

    def skipped(self) -> dict:
        return self._skipped.metrics()

    def counters(self) -> dict[str, int]:
        return {
            "produced": self._produced,
            "consumed": self._consumed,
            "gate_timeouts": self._gate_timeouts,
            "worker_restarts": max(self._attempt - 1, 0),
            "labeler_restarts": self._labeler_restarts,
            "pseudo_rows_lost": sum(self._lost.values()),
        }

    def latest(self) -> tuple[int, list[ray.ObjectRef], list[float] | None]:
        # The ref travels inside a list so Ray hands over the reference, not the resolved value.
        return self._version, [self._state_ref], self._thresholds


TeacherWeightStore = ray.remote(num_cpus=0)(WeightStore)


def store_name(run_id: str) -> str:
    return f"ssod-teacher-weights-{run_id}"


def get_or_create_store(name: str) -> ray.actor.ActorHandle:
    """Owned by the driver: it outlives train-worker restarts and goes away with the run."""
    return TeacherWeightStore.options(name=name, get_if_exists=True).remote()


def publish(
    store: ray.actor.ActorHandle, version: int, teacher: torch.nn.Module, thresholds: list[float] | None = None
) -> ray.ObjectRef:
    """Non-blocking: training goes on while the store takes the copy."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in teacher.state_dict().items()}
    return store.publish.remote(version, state, thresholds)
