"""Pretrained weights: the packaged EfficientNet-Lite0, torchvision's cache (seeded here, never downloaded)."""

import pytest
import torch
from badinput import cli_refuses
from conftest import sets
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, mobilenet_v3_large
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights, fasterrcnn_resnet50_fpn

from models.builders import build_detector
from models.pretrained import PretrainedWeightsError, efficientnet_lite0_imagenet, torchvision_cache_file
from pipeline.config import load_config
from pipeline.errors import InputError


@pytest.fixture()
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def _seed_cache(weights, state: dict) -> None:
    path = torchvision_cache_file(weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def _trainable(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def test_packaged_efficientnet_loads_strictly_and_differs_from_random():
    state = efficientnet_lite0_imagenet()  # raises unless every key of timm's model is covered
    assert len(state) == 296
    loaded = build_detector(3, backbone="efficientnet_lite0_fpn", pretrained="imagenet")
    random = build_detector(3, backbone="efficientnet_lite0_fpn", pretrained="none")
    body, random_body = loaded.backbone.body.state_dict(), random.backbone.body.state_dict()
    assert torch.equal(body["conv_stem.weight"], state["conv_stem.weight"])
    assert torch.equal(body["blocks.5.0.conv_pw.weight"], state["blocks.5.0.conv_pw.weight"])
    assert all(not torch.equal(body[k], random_body[k]) for k in body if k.endswith("conv_pw.weight"))
    # The ported TensorFlow weights expect inputs in [-1, 1].
    assert loaded.transform.image_mean == [0.5, 0.5, 0.5] and loaded.transform.image_std == [0.5, 0.5, 0.5]


def test_pretrained_bodies_freeze_norms_and_stem_random_ones_train_them():
    loaded = build_detector(3, backbone="efficientnet_lite0_fpn", pretrained="imagenet").backbone.body
    assert not _trainable(loaded.conv_stem) and not _trainable(loaded.blocks[1]) and _trainable(loaded.blocks[2])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules())
    random = build_detector(3, backbone="efficientnet_lite0_fpn", pretrained="none").backbone.body
    assert _trainable(random.conv_stem) and any(isinstance(m, torch.nn.BatchNorm2d) for m in random.modules())


def test_a_structure_only_copy_reads_no_weights_and_takes_the_state_dict(tmp_path, monkeypatch):
    trained = build_detector(3, backbone="efficientnet_lite0_fpn", pretrained="imagenet")
    with torch.no_grad():  # a trained state: nothing a fresh or a pretrained build has
        for value in trained.state_dict().values():
            if value.is_floating_point():
                value.add_(0.125)

    def no_reading(*args, **kwargs):
        raise AssertionError("a structure-only copy read a weights file")

    monkeypatch.setattr(torch, "load", no_reading)  # every weights file (packaged, cached, a path) reads through it
    copy = build_detector(3, backbone="efficientnet_lite0_fpn", pretrained="imagenet", init_weights=False)
    build_detector(3, backbone="tiny", weights_path=str(tmp_path / "absent.pt"), init_weights=False)  # not opened
    assert not _trainable(copy.backbone.body.conv_stem) and _trainable(copy.backbone.body.blocks[2])  # as trained's
    stem = "backbone.body.conv_stem.weight"
    assert not torch.equal(copy.state_dict()[stem], trained.state_dict()[stem])
    copy.load_state_dict(trained.state_dict(), strict=True)  # the same structure: every key and shape fits
    taken = copy.state_dict()
    assert all(torch.equal(taken[key], value) for key, value in trained.state_dict().items())


def test_torchvision_imagenet_weights_come_from_its_cache(torch_home):
    reference = mobilenet_v3_large().state_dict()
    _seed_cache(MobileNet_V3_Large_Weights.IMAGENET1K_V1, reference)
    model = build_detector(3, backbone="mobilenet_v3_fpn", pretrained="imagenet")
    assert torch.equal(model.backbone.body.state_dict()["0.0.weight"], reference["features.0.0.weight"])


def test_coco_weights_keep_everything_but_the_class_predictors(torch_home):
    reference = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict()
    _seed_cache(FasterRCNN_ResNet50_FPN_Weights.COCO_V1, reference)
    model = build_detector(4, backbone="resnet50_fpn", pretrained="coco")
    state = model.state_dict()
    for key in ("backbone.fpn.layer_blocks.0.0.weight", "rpn.head.cls_logits.weight", "roi_heads.box_head.fc6.weight"):
        assert torch.equal(state[key], reference[key])
    assert state["roi_heads.box_predictor.cls_score.weight"].shape[0] == 5  # 4 classes + background


def test_missing_cache_file_is_one_error_naming_it(torch_home):
    expected = torchvision_cache_file(ResNet50_Weights.IMAGENET1K_V1)
    with pytest.raises(PretrainedWeightsError, match=f"{expected.name} is not in torchvision's cache.*{expected}"):
        build_detector(3, backbone="resnet50_fpn", pretrained="imagenet")


def test_cli_offline_pretrained_is_one_line_and_exit_2(prepared, tmp_path, torch_home, capsys):
    overrides = sets(
        f"data.prepared={prepared}",
        "model.backbone=resnet50_fpn",
        "model.pretrained=coco",
        "train.backend=local",
        "tracking.enabled=false",
    )
    line = cli_refuses(capsys, ["train", *overrides, "--output", str(tmp_path / "run")])
    assert line.startswith("error: model.pretrained=coco: fasterrcnn_resnet50_fpn_coco")


@pytest.mark.parametrize("backbone, pretrained", [("tiny", "imagenet"), ("efficientnet_lite0_fpn", "coco")])
def test_config_refuses_weights_a_backbone_does_not_have(backbone, pretrained):
    with pytest.raises(InputError, match=f"model.pretrained={pretrained} is not available"):
        load_config(None, [f"model.backbone={backbone}", f"model.pretrained={pretrained}"])
