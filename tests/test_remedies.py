"""The remedies against confirmation bias: flip TTA fusion, soft background weights, soft class targets,
the density prior."""

import math
from pathlib import Path

import pytest
import torch

from models.builders import build_detector
from models.losses import background_weights, soft_class_targets, soft_focal_loss, softmax_focal_loss
from models.pseudo_labels import (
    DensityPrior,
    PseudoLabelPolicy,
    _mirror,
    filter_detections,
    fuse_views,
    teacher_detections,
)
from pipeline.config import load_config
from pipeline.training.pseudo import pseudo_label_policy


def _detections(boxes, labels, scores):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.long),
        "scores": torch.tensor(scores, dtype=torch.float32),
    }


def test_mirror_maps_boxes_back_onto_the_original_image():
    flipped = _detections([[10, 5, 30, 25]], [1], [0.9])
    assert _mirror(flipped, 100)["boxes"].tolist() == [[70, 5, 90, 25]]


def test_fusion_averages_agreeing_boxes_and_halves_boxes_one_view_saw():
    a = _detections([[0, 0, 10, 10], [50, 50, 60, 60]], [1, 2], [0.9, 0.8])
    b = _detections([[1, 0, 11, 10], [80, 80, 90, 90]], [1, 1], [0.6, 0.7])
    fused = fuse_views(a, b)
    # the pair: mean score, score-weighted box; the singletons keep their box at half their score
    assert fused["scores"].tolist() == pytest.approx([0.75, 0.4, 0.35])
    assert fused["boxes"][0].tolist() == pytest.approx([0.6 * 0 + 0.4 * 1, 0, 0.6 * 10 + 0.4 * 11, 10])
    assert fused["labels"].tolist() == [1, 2, 1]


def test_fusion_never_pairs_different_classes_and_keeps_empty_views_working():
    a = _detections([[0, 0, 10, 10]], [1], [0.9])
    b = _detections([[0, 0, 10, 10]], [2], [0.9])
    assert fuse_views(a, b)["scores"].tolist() == pytest.approx([0.45, 0.45])
    empty = _detections([], [], [])
    assert fuse_views(empty, a)["scores"].tolist() == pytest.approx([0.45])
    assert len(fuse_views(empty, empty)["boxes"]) == 0


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn"])
def test_flip_tta_and_background_on_a_real_detector(arch):
    torch.manual_seed(0)
    model = build_detector(3, arch=arch, backbone="tiny", min_size=[96], max_size=128).eval()
    model.roi_heads.score_thresh = 0.0  # an untrained head: keep every box so there is something to fuse
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 96)]
    plain = teacher_detections(model, images)
    fused = teacher_detections(model, images, tta="flip", background=True)
    for image, p, f in zip(images, plain, fused):
        assert len(f["boxes"]) >= len(p["boxes"]) > 0 and (f["scores"][:-1] >= f["scores"][1:]).all()
        assert len(f["proposal_boxes"]) == len(f["proposal_background"]) > 0
        assert ((0 <= f["proposal_background"]) & (f["proposal_background"] <= 1)).all()
        assert f["image_size"].tolist() == list(image.shape[-2:])
        assert (f["proposal_boxes"][:, 2] <= image.shape[-1] + 1e-3).all()
        if arch == "mask_rcnn":
            assert f["masks"].shape[0] == len(f["boxes"]) and f["masks"].shape[-2:] == image.shape[-2:]
    kept = PseudoLabelPolicy(tta="flip", background=True).keep(fused, 0.0)
    assert set(kept[0]) >= {"boxes", "labels", "scores", "proposal_boxes", "proposal_background", "image_size"}


def test_background_weights_follow_the_teacher_and_keep_the_background_share():
    proposals = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [0, 0, 5, 5]], dtype=torch.float)
    labels = torch.tensor([0, 0, 0, 1])
    # the teacher's frame is half the student's: its boxes are scaled by 2 before matching
    target = {
        "proposal_boxes": torch.tensor([[0, 0, 5, 5], [10, 10, 15, 15]], dtype=torch.float),
        "proposal_background": torch.tensor([0.2, 0.6]),
        "image_size": torch.tensor([30, 30]),
    }
    weights = background_weights(proposals, labels, (60, 60), target)
    reliability = torch.tensor([0.2, 0.6, 1.0])  # the third ROI overlaps no teacher proposal
    assert weights[:3].tolist() == pytest.approx((reliability * 3 / reliability.sum()).tolist())
    assert weights[3].item() == 1.0 and weights[:3].sum().item() == pytest.approx(3.0)


def test_weighted_focal_loss_is_the_weighted_sum():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    weights = torch.tensor([0.5, 1.0, 1.0, 1.5])
    per_roi = [softmax_focal_loss(logits[i : i + 1], labels[i : i + 1]).item() for i in range(4)]
    expected = sum(w * loss for w, loss in zip(weights.tolist(), per_roi)) / 4
    assert softmax_focal_loss(logits, labels, weights=weights).item() == pytest.approx(expected, rel=1e-5)


def test_student_loss_trains_with_teacher_background_targets():
    torch.manual_seed(0)
    student = build_detector(3, backbone="tiny", min_size=[96], max_size=128).train()
    target = {
        "boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]]),
        "labels": torch.tensor([1]),
        "proposal_boxes": torch.tensor([[50.0, 50.0, 90.0, 90.0], [0.0, 0.0, 30.0, 30.0]]),
        "proposal_background": torch.tensor([0.05, 0.9]),
        "image_size": torch.tensor([96, 128]),
    }
    losses = student([torch.rand(3, 96, 128)], [target])
    assert math.isfinite(float(losses["loss_classifier"]))
    losses["loss_classifier"].backward()


def test_soft_focal_loss_generalises_the_hard_one():
    logits, labels = torch.randn(5, 4), torch.tensor([0, 1, 3, 2, 0])
    weights = torch.rand(5)
    one_hot = torch.nn.functional.one_hot(labels, 4).float()
    hard = softmax_focal_loss(logits, labels, 1.5, weights)
    soft_logits = logits.clone().requires_grad_()
    assert soft_focal_loss(soft_logits, one_hot, 1.5, weights).item() == pytest.approx(hard.item(), rel=1e-5)
    hard_logits = logits.clone().requires_grad_()
    softmax_focal_loss(hard_logits, labels, 1.5, weights).backward()
    soft_focal_loss(soft_logits, one_hot, 1.5, weights).backward()
    assert torch.allclose(soft_logits.grad, hard_logits.grad, atol=1e-6)  # the same gradient too
    # one ROI, an even split over two classes: (1 - mean p)^gamma times the cross-entropy
    p = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), -1)
    expected = (1 - (p[1] + p[2]) / 2) ** 2 * sum(0.5 * -math.log(p[k]) for k in (1, 2))
    soft = soft_focal_loss(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[0.0, 0.5, 0.5]]), 2.0)
    assert soft.item() == pytest.approx(float(expected), rel=1e-5)


def test_soft_focal_loss_is_smallest_at_the_teacher_distribution():
    # were each class term focused, q = 0.95 / 0.05 would be learned as about 0.79 / 0.21
    target = torch.tensor([[0.0, 0.95, 0.05]])
    logits = target.clamp_min(1e-9).log().requires_grad_()
    soft_focal_loss(logits, target, 1.5).backward()
    assert logits.grad.abs().max().item() < 1e-6


def test_soft_class_targets_take_the_matched_pseudo_box_distribution():
    from pipeline.distributed.columns import class_probs

    probs = torch.tensor([[0.1, 0.7, 0.2], [0.05, 0.15, 0.8]])
    labels = [torch.tensor([1, 0, 2, 1]), torch.tensor([0, 0])]
    matched = [torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0])]
    # the second image has no pseudo-box: its (0, 0) probabilities as a Ray row carries them
    targets = [{"class_probs": probs}, {"class_probs": class_probs(torch.zeros(0).numpy(), 0)}]
    rows = soft_class_targets(labels, matched, targets, 3)
    background = torch.tensor([1.0, 0.0, 0.0])
    assert torch.allclose(rows, torch.stack([probs[0], background, probs[1], probs[0], background, background]))
    assert torch.equal(class_probs(probs.reshape(-1).numpy(), 2), probs)


def test_teacher_class_distributions_reach_the_student_through_flip_fusion():
    torch.manual_seed(0)
    model = build_detector(3, backbone="tiny", min_size=[96], max_size=128).eval()
    model.roi_heads.score_thresh = 0.0
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 96)]
    detections = PseudoLabelPolicy(tta="flip", class_target="soft").detect(model, images)
    for d in detections:
        assert d["class_probs"].shape == (len(d["boxes"]), 4) and len(d["boxes"]) > 0
        assert d["class_probs"].sum(-1).tolist() == pytest.approx([1.0] * len(d["boxes"]), abs=1e-5)
    kept = PseudoLabelPolicy(class_target="soft").keep(detections, float(detections[0]["scores"].median()))
    assert len(kept[0]["class_probs"]) == len(kept[0]["boxes"]) > 0
    target = {k: kept[0][k] for k in ("boxes", "labels", "class_probs")}
    losses = model.train()([images[0]], [target])
    assert math.isfinite(float(losses["loss_classifier"]))
    losses["loss_classifier"].backward()


def test_pseudo_label_figures_tell_class_confusion_from_background():
    from pipeline.training.pseudo_stats import PseudoLabelStats

    held_aside = _detections([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 2], [1.0, 1.0])
    # a hit, a box of class 1 on the class-2 object, a box on nothing
    pseudo = _detections([[0, 0, 10, 10], [20, 20, 30, 31], [50, 50, 60, 60]], [1, 1, 2], [0.9, 0.9, 0.9])
    stats = PseudoLabelStats()
    earlier = stats.state()
    stats.add(pseudo, held_aside)
    interval = stats.since(earlier)
    assert interval["pseudo_label_precision"] == pytest.approx(1 / 3)
    assert interval["pseudo_label_wrong_class"] == pytest.approx(1 / 3)
    assert interval["pseudo_label_recall"] == pytest.approx(1 / 2)
    restored = PseudoLabelStats.from_state(stats.state())
    assert restored.summary({1: "a", 2: "b"})["pseudo_label_wrong_class"] == pytest.approx(1 / 3)


def _prior(per_class, multiple=2.0, floor=0.5, min_score=0.3):
    return DensityPrior(torch.tensor(per_class), multiple, floor, min_score)


def test_density_prior_caps_each_class_by_the_labeled_mean():
    # class 1: 0.4 boxes per labeled image -> at most ceil(2 * 0.4) = 1; class 2: 1.5 -> 3
    prior = _prior([0.0, 0.4, 1.5])
    output = _detections([[i, 0, i + 5, 5] for i in range(6)], [1, 1, 2, 2, 2, 2], [0.95, 0.9, 0.99, 0.9, 0.85, 0.81])
    kept = filter_detections(output, 0.8, prior=prior)
    assert kept["scores"].tolist() == pytest.approx([0.95, 0.99, 0.9, 0.85])


def test_density_prior_floor_tops_up_with_the_most_confident_boxes():
    # mean 4 boxes per labeled image, floor 0.5 -> at least 2 boxes when the teacher has them above 0.3
    prior = _prior([0.0, 2.0, 2.0])
    output = _detections([[i, 0, i + 5, 5] for i in range(4)], [1, 2, 1, 2], [0.7, 0.6, 0.25, 0.5])
    kept = filter_detections(output, 0.8, prior=prior)
    assert kept["scores"].tolist() == pytest.approx([0.7, 0.6])
    low = _detections([[0, 0, 5, 5]], [1], [0.2])  # nothing above the minimum score: nothing is invented
    assert len(filter_detections(low, 0.8, prior=prior)["boxes"]) == 0


def test_foreground_cut_keeps_an_object_torn_between_classes_once():
    # one object reported as class 1 (0.5) and class 2 (0.45), sure it is an object; a weak box elsewhere
    output = _detections([[0, 0, 10, 10], [0, 0, 10, 11], [50, 50, 60, 60]], [1, 2, 1], [0.5, 0.45, 0.4])
    output["class_probs"] = torch.tensor([[0.05, 0.5, 0.45], [0.05, 0.5, 0.45], [0.5, 0.4, 0.1]])
    output["foreground"] = 1.0 - output["class_probs"][:, 0]
    assert len(filter_detections(output, 0.7)["boxes"]) == 0  # the class cut drops the torn object
    kept = PseudoLabelPolicy(cut_score="foreground").keep([output], 0.7)[0]
    assert kept["labels"].tolist() == [1] and kept["scores"].tolist() == pytest.approx([0.5])
    assert "class_probs" not in kept  # hard class targets: the distribution was read for the cut only
    soft = PseudoLabelPolicy(class_target="soft", cut_score="foreground").keep([output], 0.7)[0]
    assert soft["class_probs"][0].tolist() == pytest.approx([0.05, 0.5, 0.45])
    objects = PseudoLabelPolicy(class_target="soft_foreground", cut_score="foreground").keep([output], 0.7)[0]
    assert objects["class_probs"][0].tolist() == pytest.approx([0.0, 0.5 / 0.95, 0.45 / 0.95])


def test_soft_split_keeps_the_mixture_only_where_the_teacher_splits_the_classes():
    output = _detections([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 2], [0.9, 0.85])
    # box 1: clear (class 2 holds 0.05 / 0.95 of the object mass); box 2: split (class 1 holds 0.1 / 0.95)
    output["class_probs"] = torch.tensor([[0.05, 0.9, 0.05], [0.05, 0.1, 0.85]])
    kept = PseudoLabelPolicy(class_target="soft_split", split_share=0.1).keep([output], 0.8)[0]
    assert kept["class_probs"][0].tolist() == [0.0, 1.0, 0.0]
    assert kept["class_probs"][1].tolist() == pytest.approx([0.0, 0.1 / 0.95, 0.85 / 0.95])
    assert kept["labels"].tolist() == [1, 2]
    cfg = load_config(None, ["ssl.unsup_class_target=soft_split", "ssl.class_split_share=0.2"])
    assert pseudo_label_policy(cfg, 3) == PseudoLabelPolicy(class_target="soft_split", split_share=0.2)


def test_fusion_halves_the_foreground_of_a_box_one_view_missed():
    a = _detections([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1], [0.8, 0.6])
    b = _detections([[0, 0, 10, 10]], [1], [0.6])
    a["foreground"], b["foreground"] = torch.tensor([0.9, 0.8]), torch.tensor([0.7])
    assert fuse_views(a, b)["foreground"].tolist() == pytest.approx([0.8, 0.4])


def test_policy_without_remedies_is_the_plain_score_cut():
    output = _detections([[0, 0, 5, 5], [1, 1, 6, 6]], [1, 2], [0.9, 0.5])
    assert PseudoLabelPolicy().keep([output], 0.7)[0]["scores"].tolist() == pytest.approx([0.9])


REMEDIES = (  # every remedy at once; the Ray run of them is test_ray_pipeline's two-worker run
    "ssl.teacher_tta=flip",
    "ssl.unsup_background_weight=teacher",
    "ssl.unsup_class_target=soft_foreground",
    "ssl.cut_score=foreground",
    "ssl.density_prior=2.0",
    "ssl.threshold_floor=0.05",
)


def assert_density_capped(metrics: dict, prepared: Path) -> None:
    """Pseudo-labels reached the student, no more per image than the density prior's caps allow."""
    from pipeline.training.pseudo_stats import labeled_boxes_per_image

    assert metrics["pseudo_labeled_images"] > 0
    # the density prior caps each image's boxes: ceil(2 x the labeled mean) per class
    caps = torch.ceil(2.0 * labeled_boxes_per_image(prepared, len(metrics["labeled_class_histogram"])))
    assert 0 < metrics["pseudo_labels_per_image"] <= caps.sum().item()


@pytest.mark.slow
def test_a_run_with_every_remedy_trains_locally(prepared, tmp_path):
    from conftest import tiny_config

    from pipeline.training.local import train_local

    settings = ["train.backend=local", "ssl.score_threshold=0.05"]  # a tiny random model's scores sit low
    metrics = train_local(tiny_config(prepared, tmp_path, *settings, *REMEDIES))
    assert metrics["steps"] == 8 and metrics["skipped_steps"] == 0 and metrics["stop_reason"] is None
    assert_density_capped(metrics, prepared)
