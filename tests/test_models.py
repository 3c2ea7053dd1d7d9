"""The algorithm's pieces, without Ray: focal loss, EMA, pseudo-labels, the step, augmentation, weights."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.builders import WeightsFileError, build_detector
from models.ema import ema_update, keep_rate_from_span
from models.losses import softmax_focal_loss, unsupervised_loss
from models.pseudo_labels import filter_detections, pseudo_label
from models.unbiased_teacher import Batch, refresh_teacher, unbiased_teacher_step
from pipeline.data.augment import make_target, strong_view, to_model_target, weak_transform


def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    expected = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        p = math.exp(row[y]) / sum(math.exp(v) for v in row)
        expected += (1 - p) ** 1.5 * -math.log(p)
    assert softmax_focal_loss(logits, labels, gamma=1.5).item() == pytest.approx(expected / 2, rel=1e-5)


def test_focal_loss_at_gamma_zero_is_cross_entropy():
    logits, labels = torch.randn(20, 5), torch.randint(0, 5, (20,))
    assert softmax_focal_loss(logits, labels, 0.0).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-5
    )


def test_focal_loss_down_weights_easy_examples():
    easy = torch.tensor([[8.0, 0.0]]), torch.tensor([0])
    assert softmax_focal_loss(*easy, 1.5) < 0.01 * F.cross_entropy(*easy)


class _WithBuffer(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        nn.init.constant_(self.lin.weight, value)
        nn.init.constant_(self.lin.bias, value)
        self.norm = nn.BatchNorm1d(2)
        self.norm.running_mean.fill_(value)
        self.norm.num_batches_tracked.fill_(int(value))


def test_ema_math_over_parameters_and_buffers():
    teacher, student = _WithBuffer(1.0), _WithBuffer(3.0)
    ema_update(teacher, student, keep_rate=0.75)
    assert torch.allclose(teacher.lin.weight, torch.full((2, 2), 0.75 * 1 + 0.25 * 3))
    assert torch.allclose(teacher.norm.running_mean, torch.full((2,), 1.5))
    assert teacher.norm.num_batches_tracked.item() == 3  # integer buffers are copied


def test_ema_keep_rate_zero_is_an_exact_copy_and_span_formula():
    teacher, student = _WithBuffer(1.0), _WithBuffer(-2.5)
    ema_update(teacher, student, keep_rate=0.0)
    for (_, t), (_, s) in zip(teacher.state_dict().items(), student.state_dict().items()):
        assert torch.equal(t, s)
    assert keep_rate_from_span(1999) == pytest.approx(0.999)


def test_teacher_schedule_copies_at_burn_in_end_then_refreshes_every_interval():
    teacher, student = _WithBuffer(0.0), _WithBuffer(1.0)
    assert not refresh_teacher(teacher, student, 3, burn_in_steps=5, update_interval=2, keep_rate=0.5)
    assert refresh_teacher(teacher, student, 5, 5, 2, 0.5)
    assert teacher.lin.weight[0, 0].item() == 1.0
    student.lin.weight.data.fill_(3.0)
    assert not refresh_teacher(teacher, student, 6, 5, 2, 0.5)
    assert refresh_teacher(teacher, student, 7, 5, 2, 0.5)
    assert teacher.lin.weight[0, 0].item() == pytest.approx(2.0)


def test_thresholding_keeps_only_confident_boxes_and_binarises_masks():
    out = {
        "boxes": torch.tensor([[0.0, 0, 4, 4], [1, 1, 5, 5], [2, 2, 6, 6]]),
        "labels": torch.tensor([1, 2, 3]),
        "scores": torch.tensor([0.9, 0.7, 0.69]),
        "masks": torch.tensor([0.2, 0.6, 0.9]).view(3, 1, 1, 1).expand(3, 1, 2, 2),
    }
    kept = filter_detections(out, 0.7)
    assert kept["labels"].tolist() == [1, 2]
    assert kept["masks"].shape == (2, 2, 2) and kept["masks"].dtype == torch.uint8
    assert kept["masks"][:, 0, 0].tolist() == [0, 1]


def _images(n, size=(96, 112)):
    torch.manual_seed(0)
    return [torch.rand(3, *size) for _ in range(n)]


def _target(boxes, labels, masks_hw=None):
    t = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    if masks_hw:
        m = torch.zeros(len(labels), *masks_hw, dtype=torch.uint8)
        for i, b in enumerate(t["boxes"].int().tolist()):
            m[i, b[1] : b[3], b[0] : b[2]] = 1
        t["masks"] = m
    return t


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn"])
def test_empty_pseudo_labels_give_a_finite_loss(arch):
    model = build_detector(3, arch=arch, backbone="tiny", min_size=(96,), max_size=128, rois_per_image=32)
    masks = (96, 112) if arch == "mask_rcnn" else None
    labeled = Batch(_images(2), [_target([[10, 10, 40, 50]], [1], masks), _target([[20, 5, 60, 30]], [3], masks)])
    teacher = build_detector(3, arch=arch, backbone="tiny", min_size=(96,), max_size=128)
    pseudo = pseudo_label(teacher, _images(2), score_threshold=1.0)  # nothing is that confident
    assert all(len(p["boxes"]) == 0 for p in pseudo)
    pseudo = [{k: v for k, v in p.items() if k != "scores"} for p in pseudo]
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    result = unbiased_teacher_step(model, opt, labeled, Batch(_images(2), pseudo), 4.0, grad_clip_norm=10.0)
    assert not result.skipped and math.isfinite(result.total)
    assert math.isfinite(result.losses["unsup/total"])


def test_weight_zero_step_is_a_supervised_step_and_never_trains_on_the_pseudo_batch():
    labeled = Batch(_images(2), [_target([[10, 10, 40, 50]], [1]), _target([[20, 5, 60, 30]], [3])])
    pseudo = Batch(_images(2), [_target([[5, 5, 30, 30]], [2]), _target([[40, 40, 90, 90]], [1])])
    weights = []
    for batch in (pseudo, None):
        torch.manual_seed(0)
        model = build_detector(3, backbone="tiny", min_size=(96,), max_size=128, rois_per_image=32)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        torch.manual_seed(1)
        result = unbiased_teacher_step(model, opt, labeled, batch, 0.0)
        assert not any(k.startswith("unsup/") for k in result.losses)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_unsupervised_loss_drops_box_regression_but_keeps_the_graph():
    w = torch.tensor(2.0, requires_grad=True)
    losses = {"loss_objectness": w * 1, "loss_classifier": w * 2, "loss_box_reg": w * 100, "loss_rpn_box_reg": w * 100}
    total = unsupervised_loss(losses)
    assert total.item() == pytest.approx(6.0)
    total.backward()
    assert w.grad.item() == pytest.approx(3.0)


def test_a_nan_loss_is_skipped_and_never_reaches_the_weights():
    model = build_detector(3, backbone="tiny", min_size=(96,), max_size=128, rois_per_image=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bad = _images(1)
    bad[0][0, 0, 0] = float("nan")
    result = unbiased_teacher_step(model, opt, Batch(bad, [_target([[10, 10, 40, 50]], [1])]), None, 1.0)
    assert result.skipped
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_weak_view_flips_boxes_and_masks_with_the_image():
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    image[:, 2:6, 1:4] = 255
    masks = torch.zeros(1, 20, 30, dtype=torch.uint8)
    masks[0, 2:6, 1:4] = 1
    target = make_target(torch.tensor([[1.0, 2, 4, 6]]), torch.tensor([1]), (20, 30), masks)
    flipped, out = weak_transform(flip_prob=1.0)(image, target)
    assert out["boxes"].tolist() == [[26.0, 2.0, 29.0, 6.0]]
    assert flipped.dtype == torch.uint8 and flipped[0, 2:6, 26:29].min() == 255
    assert out["masks"][0, 2:6, 26:29].all() and out["masks"].sum() == 12
    strong = strong_view(flipped)
    assert strong.shape == flipped.shape and to_model_target(out)["boxes"].shape == (1, 4)


def test_weights_file_round_trip_and_shape_mismatch(tmp_path):
    model = build_detector(3, backbone="tiny", min_size=(96,))
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    loaded = build_detector(3, backbone="tiny", min_size=(96,), weights_path=str(path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(WeightsFileError, match="shape mismatch at roi_heads.box_predictor"):
        build_detector(5, backbone="tiny", min_size=(96,), weights_path=str(path))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsFileError, match="junk.pt"):
        build_detector(3, backbone="tiny", weights_path=str(tmp_path / "junk.pt"))
