"""Task models on the MONAI ResNet backbone: stage maps, shapes at odd sizes, TorchScript, dilation, RetinaNet,
LR groups (``muscle_ext.networks``: resnet_utils, classifier, deeplab, retinanet, finetune)."""

from __future__ import annotations

import pytest
import torch

from muscle_ext.networks import (
    ASPP,
    BackboneClassifier,
    BackboneRegressor,
    BackboneSegmenter,
    ResNetFPN,
    backbone_feature_maps,
    build_backbone,
    build_retinanet_detector,
    dilate_backbone,
    find_backbone,
    freeze_backbone,
    layerwise_param_groups,
    scaled_atrous_rates,
    stage_channels,
    stage_strides,
)

ODD = (97, 130)
SMALL_ODD = (45, 62)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_feature_maps_of_the_stages():
    backbone = build_backbone("resnet18").eval()
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        maps = backbone_feature_maps(backbone, x)
        assert [m.shape[1] for m in maps] == stage_channels(backbone) == [64, 128, 256, 512]
        assert [64 // m.shape[-2] for m in maps] == stage_strides(backbone) == [4, 8, 16, 32]
        torch.testing.assert_close(backbone(x), maps[-1].mean(dim=(2, 3)))  # pooled features: layer4's map
        early = backbone_feature_maps(backbone, x, last_stage=2)
        assert len(early) == 2 and all(torch.equal(a, b) for a, b in zip(early, maps, strict=False))
        # the FPN runs the same stages (its backbone is the same module)
        fpn = ResNetFPN(backbone, returned_layers=(2, 3), out_channels=8).eval()
        assert torch.equal(fpn.feature_maps(x, 3)[-1], maps[2])
        assert [f.shape[-2] for f in fpn(x).values()] == [8, 4, 2]
    with pytest.raises(ValueError, match="last_stage"):
        backbone_feature_maps(backbone, x, last_stage=5)


def test_classifier_and_regressor_shapes_and_script():
    x = torch.randn(2, 1, *SMALL_ODD)
    clf = BackboneClassifier(build_backbone("resnet18"), num_outputs=3, dropout=0.2).eval()
    assert clf(x).shape == (2, 3)
    scripted = torch.jit.script(clf)
    torch.testing.assert_close(scripted(x), clf(x))
    reg = BackboneRegressor(build_backbone("resnet18")).eval()
    assert reg(x).shape == (2, 1)
    # the backbone stays a plain attribute: its state dict is the checkpoint format's
    assert set(clf.backbone.state_dict()) == set(build_backbone("resnet18").state_dict())


@pytest.mark.parametrize("output_stride,source", [(16, "layer4"), (32, "layer4"), (8, "layer4"), (16, "layer3")])
def test_segmenter_odd_size(output_stride, source):
    model = BackboneSegmenter(build_backbone("resnet18"), num_classes=3, output_stride=output_stride,
                              aspp_source=source, aspp_channels=32)
    size = ODD if output_stride == 16 and source == "layer4" else SMALL_ODD
    out = model(torch.randn(2, 1, *size))
    assert out.shape == (2, 3, *size)
    if size == ODD:
        out.mean().backward()
        assert model.backbone.conv1.weight.grad is not None
    layer = 4 if source == "layer4" else 3
    assert stage_strides(model.backbone)[layer - 1] == output_stride


def test_segmenter_batch_of_one_trains_and_scripts():
    # the image-pooling branch has no BatchNorm, so batch size 1 works in train mode
    model = BackboneSegmenter(build_backbone("resnet18"), num_classes=2, aspp_channels=32)
    model.train()
    assert model(torch.randn(1, 1, 64, 72)).shape == (1, 2, 64, 72)
    model.eval()
    x = torch.randn(1, 1, *SMALL_ODD)
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))


def test_aspp_branches_and_rates():
    aspp = ASPP(16, 8, atrous_rates=(2, 3, 4), dropout=0.0)
    assert len(aspp.branches) == 4
    assert aspp(torch.randn(2, 16, 9, 11)).shape == (2, 8, 9, 11)
    assert scaled_atrous_rates((6, 12, 18), 16) == (6, 12, 18)
    assert scaled_atrous_rates((6, 12, 18), 8) == (12, 24, 36)
    assert scaled_atrous_rates((6, 12, 18), 32) == (3, 6, 9)


def test_dilate_backbone_keeps_weights_and_rejects_bad_stride():
    net = build_backbone("resnet18")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert stage_strides(net) == [4, 8, 16, 32]
    with pytest.raises(ValueError):
        dilate_backbone(net, 12)
    assert stage_strides(net) == [4, 8, 16, 32]  # untouched after the error
    dilate_backbone(net, 8)
    assert stage_strides(net) == [4, 8, 8, 8]
    assert net.layer4[1].conv1.dilation == (4, 4) and net.layer3[0].conv1.stride == (1, 1)
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert net(torch.randn(1, 1, 64, 64)).shape == (1, 512)


def _boxes_targets():
    # boxes in MONAI StandardMode over array axes: [row_min, col_min, row_max, col_max]
    return [
        {"boxes": torch.tensor([[10.0, 20.0, 50.0, 70.0]]), "labels": torch.tensor([0])},
        {"boxes": torch.tensor([[30.0, 30.0, 90.0, 80.0], [5.0, 60.0, 40.0, 120.0]]), "labels": torch.tensor([1, 0])},
    ]


def test_retinanet_train_loss_and_eval_boxes():
    detector = build_retinanet_detector(build_backbone("resnet18"), num_classes=2, fpn_channels=32,
                                        score_thresh=0.0, detections_per_img=5)
    images = torch.rand(2, 1, 128, 128)
    detector.train()
    losses = detector(images, _boxes_targets())
    assert set(losses) == {"classification", "box_regression"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    backbone = find_backbone(detector)
    assert backbone.conv1.weight.grad is not None and backbone.layer3[0].conv1.weight.grad is not None

    detector.eval()
    with torch.no_grad():
        # different sizes, neither divisible by 32: padded inside, boxes clipped to each image
        outputs = detector([torch.rand(1, 100, 90), torch.rand(1, 128, 128)])
    assert len(outputs) == 2
    for out, (h, w) in zip(outputs, [(100, 90), (128, 128)], strict=True):
        boxes = out["boxes"]
        assert boxes.shape == (5, 4) and out["labels"].shape == (5,) and out["labels_scores"].shape == (5,)
        assert out["labels"].min() >= 0 and out["labels"].max() <= 1
        assert (boxes[:, 2] <= h).all() and (boxes[:, 3] <= w).all() and (boxes[:, :2] >= 0).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()


def test_freeze_and_layerwise_param_groups():
    model = BackboneClassifier(build_backbone("resnet18"), num_outputs=2)
    groups = layerwise_param_groups(model, base_lr=1e-3, head_lr_mult=10.0, decay=0.5)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == pytest.approx({"stem": 1e-3 / 16, "layer1": 1e-3 / 8, "layer2": 1e-3 / 4, "layer3": 1e-3 / 2,
                                 "layer4": 1e-3, "head": 1e-2})
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    torch.optim.SGD(groups, lr=1.0)  # valid optimizer groups (extra "name" key is kept)

    freeze_backbone(model)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert [g["name"] for g in layerwise_param_groups(model, 1e-3)] == ["head"]
    freeze_backbone(model, freeze=False)
    assert all(p.requires_grad for p in model.parameters())
