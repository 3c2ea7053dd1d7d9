"""Ray Data stages of the two streams: teacher pseudo-labelling (an actor-pool class UDF) and the views.

Rows carry uint8 CHW images and flat box lists; masks travel as COCO RLE strings.
"""

from __future__ import annotations

import time

import numpy as np
import ray
import torch

from models.builders import build_detector
from models.pseudo_labels import PseudoLabelPolicy, Threshold
from pipeline.config import Config
from pipeline.data.augment import to_float
from pipeline.data.samples import Views
from pipeline.distributed.columns import Columns, batch_rows, encode_masks, flat
from pipeline.distributed.weights import NO_VERSION

# A labeler waits at most this long for credit, then labels anyway (counted): slow beats deadlocked.
# Long enough to outlast a slow student step, or a timed-out gate would let labelers run ahead.
GATE_TIMEOUT_S = 60.0


def credit_window(cfg: Config) -> int:
    """Rows labelers may run ahead of the trainers: what `max_staleness` steps consume, less the steps a
    row ages before the next publish; never less than what the stages between them hold (a labeler
    batch in each labeler, strong-view task and trainer prefetch), or the gate would stall the stream."""
    r, ssl = cfg.ray, cfg.ssl
    per_step = cfg.train.batch_size_unlabeled * r.num_workers
    in_flight = r.labeler_batch_size * (r.num_labelers + 1 + 2 * r.num_workers)
    return max(in_flight, (ssl.max_staleness - ssl.sync_interval) * per_step)


def labeled_views(batch: Columns, *, with_masks: bool, flip_prob: float, where: str) -> Columns:
    """Labeled rows -> weak and strong uint8 views with their (flipped) boxes, labels and masks."""
    views = Views(flip_prob, with_masks, where)  # `where`: the labeled split, which must decode whole
    out: dict[str, list] = {"image_id": [], "weak": [], "strong": [], "boxes": [], "labels": [], "masks": []}
    for row in batch_rows(batch):
        image, target = views.decode(row)
        out["image_id"].append(row["image_id"])
        out["weak"].append(image.numpy())
        out["strong"].append(views.strong(image).numpy())
        out["boxes"].append(flat(target["boxes"]))
        out["labels"].append(target["labels"].numpy())
        out["masks"].append(encode_masks(target["masks"]) if with_masks else [])
    return out


class TeacherLabeler:
    """Class UDF for `map_batches(compute=ActorPoolStrategy(...))`: weak view -> teacher -> kept boxes.

    Pulls new teacher weights from the store when its version changed (checked every few batches) and
    stamps every row with the version that labelled it, so the trainer can measure staleness.
    """

    def __init__(
        self,
        config: dict,
        num_classes: int,
        store_name: str,
        policy: PseudoLabelPolicy | None = None,
        wait_timeout_s: float = 600.0,
    ):
        cfg = Config.model_validate(config)
        self.policy = policy or PseudoLabelPolicy()
        self.ssl, self.with_masks = cfg.ssl, cfg.model.arch == "mask_rcnn"
        self.check_every = cfg.ray.weight_check_batches
        self.window = credit_window(cfg)
        self.device = torch.device("cuda" if torch.cuda.is_available() and cfg.ray.gpus_per_labeler else "cpu")
        self.model = build_detector(num_classes, **cfg.model.model_dump(), init_weights=False).to(self.device).eval()
        self.store = ray.get_actor(store_name)
        self.actor_id = ray.get_runtime_context().get_actor_id()
        self.attempt = ray.get(self.store.labeler_started.remote(self.actor_id))
        self.version, self.batches, self.wait_timeout_s = NO_VERSION, 0, wait_timeout_s
        auto = cfg.ssl.score_threshold == "auto"  # until the first fit arrives with the weights: the floor
        self.threshold: Threshold = cfg.ssl.threshold_floor if auto else cfg.ssl.score_threshold
        # an image that does not decode is skipped and counted in the store
        self.views = Views(cfg.data.flip_prob, False, self.store.skip.remote)

    def _refresh_weights(self) -> None:
        if self.version != NO_VERSION and self.batches % self.check_every:
            return
        deadline = time.monotonic() + self.wait_timeout_s
        while (version := ray.get(self.store.version.remote())) == NO_VERSION:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no teacher was published to the weight store in {self.wait_timeout_s:.0f} s")
            time.sleep(0.2)
        if version != self.version:
            version, [ref], thresholds = ray.get(self.store.latest.remote())
            self.model.load_state_dict(ray.get(ref))
            self.version = version
            if thresholds is not None:  # `ssl.score_threshold: auto`: the trainer's current per-class fit
                self.threshold = torch.tensor(thresholds)

    def __call__(self, batch: Columns) -> Columns:
        rows = len(batch["image_id"])
        key = f"{batch['image_id'][0]}+{rows}" if rows else ""  # a retry of this batch has the same key
        ray.get(self.store.acquire.remote(rows, self.window, GATE_TIMEOUT_S, self.actor_id, key, self.attempt))
        self._refresh_weights()
        self.batches += 1
        started = time.perf_counter()
        decoded, samples = self._decode(batch)
        images = [to_float(image).to(self.device) for image, _ in samples]
        detections = self.policy.detect(self.model, images) if images else []  # a batch may not decode at all
        kept = self.policy.keep(detections, self.threshold)
        seconds = (time.perf_counter() - started) / max(len(samples), 1)
        out = {
            "image_id": batch["image_id"][decoded],
            "file_name": batch["file_name"][decoded],
            "image": [image.numpy() for image, _ in samples],
            "pl_boxes": [flat(k["boxes"].cpu()) for k in kept],
            "pl_labels": [k["labels"].cpu().numpy() for k in kept],
            "pl_scores": [k["scores"].cpu().numpy().astype(np.float32) for k in kept],
            "pl_masks": [encode_masks(k["masks"]) if self.with_masks else [] for k in kept],
            "gt_boxes": [flat(t["boxes"]) for _, t in samples],
            "gt_labels": [t["labels"].numpy() for _, t in samples],
            "annotated": batch["annotated"][decoded],
            # every detection's score, before thresholding: what the trainer fits adaptive thresholds on
            "teacher_labels": [d["labels"].cpu().numpy() for d in detections],
            "teacher_scores": [d["scores"].cpu().numpy().astype(np.float32) for d in detections],
            "teacher_version": np.full(len(samples), self.version, dtype=np.int64),
            "label_seconds": np.full(len(samples), seconds, dtype=np.float64),
        }
        if self.policy.background:  # what soft background weighting needs from the teacher
            out["pl_proposal_boxes"] = [flat(k["proposal_boxes"].cpu()) for k in kept]
            out["pl_proposal_background"] = [k["proposal_background"].cpu().numpy() for k in kept]
        if self.policy.soft_classes:  # soft class targets: each pseudo-box's class distribution
            out["pl_class_probs"] = [flat(k["class_probs"].cpu()) for k in kept]
        self.store.delivered.remote(self.actor_id, key)
        return out

    def _decode(self, batch: Columns) -> tuple[np.ndarray, list[tuple]]:
        """Weak views of the rows that decode, and their indices in the batch."""
        decoded, samples = [], []
        for i, row in enumerate(batch_rows(batch)):
            sample = self.views.decode(row)
            if sample is not None:
                samples.append(sample)
                decoded.append(i)
        return np.asarray(decoded, dtype=np.int64), samples


def add_strong_views(batch: Columns) -> Columns:
    """The student's input: photometric/erasing on top of the weak view (`image`, kept for the picture of the
    teacher's boxes), made on Ray Data's CPUs."""
    batch["strong"] = [Views.strong(torch.from_numpy(image)).numpy() for image in batch["image"]]
    return batch
