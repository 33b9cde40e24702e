"""ImageNet weight conversion from a torchvision-layout state dict (built here: torchvision is not installed)."""

from __future__ import annotations

import pytest
import torch

from muscle_ext.networks.backbone import build_backbone
from muscle_ext.networks.pretrained import convert_torchvision_resnet, load_imagenet_backbone


def _bn(prefix: str, channels: int, counters: bool) -> dict[str, torch.Tensor]:
    sd = {f"{prefix}.weight": torch.rand(channels) + 0.5, f"{prefix}.bias": torch.randn(channels),
          f"{prefix}.running_mean": torch.randn(channels), f"{prefix}.running_var": torch.rand(channels) + 0.5}
    if counters:
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(7)
    return sd


def torchvision_resnet18_state_dict(counters: bool = True) -> dict[str, torch.Tensor]:
    """torchvision.models.resnet18().state_dict() layout: names and shapes written out from torchvision's
    ResNet/BasicBlock definitions (downsample = Sequential(conv1x1, bn) in the first block of layers 2-4)."""
    g = torch.Generator().manual_seed(0)
    sd = {"conv1.weight": torch.randn(64, 3, 7, 7, generator=g), **_bn("bn1", 64, counters)}
    in_planes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (2, 2, 2, 2), strict=True), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            stride = 2 if (stage > 1 and b == 0) else 1
            sd[f"{p}.conv1.weight"] = torch.randn(planes, in_planes, 3, 3, generator=g)
            sd.update(_bn(f"{p}.bn1", planes, counters))
            sd[f"{p}.conv2.weight"] = torch.randn(planes, planes, 3, 3, generator=g)
            sd.update(_bn(f"{p}.bn2", planes, counters))
            if stride != 1 or in_planes != planes:
                sd[f"{p}.downsample.0.weight"] = torch.randn(planes, in_planes, 1, 1, generator=g)
                sd.update(_bn(f"{p}.downsample.1", planes, counters))
            in_planes = planes
    sd["fc.weight"] = torch.randn(1000, 512, generator=g)
    sd["fc.bias"] = torch.randn(1000, generator=g)
    return sd


def test_convert_resnet18_loads_strictly_with_rgb_sum():
    tv = torchvision_resnet18_state_dict()
    assert len(tv) == 122  # torchvision resnet18: 120 backbone entries + fc.weight + fc.bias
    converted = convert_torchvision_resnet(tv, "resnet18")
    assert not any(k.startswith("fc.") for k in converted)
    net = build_backbone("resnet18", in_channels=1, imagenet_stem=True)
    net.load_state_dict(converted, strict=True)
    torch.testing.assert_close(net.conv1.weight, tv["conv1.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(net.layer3[0].downsample[0].weight, tv["layer3.0.downsample.0.weight"])
    torch.testing.assert_close(net.layer4[1].bn2.running_var, tv["layer4.1.bn2.running_var"])
    # a grey image through the converted net = the same image on three channels through the RGB filters
    x = torch.rand(1, 1, 16, 16)
    torch.testing.assert_close(net.conv1(x), torch.nn.functional.conv2d(x.expand(1, 3, 16, 16), tv["conv1.weight"],
                                                                         stride=2, padding=3))


def test_load_from_file_with_wrapper_prefix_and_old_checkpoint(tmp_path):
    # old torchvision weights have no BN counters; DataParallel checkpoints prefix "module."
    tv = {f"module.{k}": v for k, v in torchvision_resnet18_state_dict(counters=False).items()}
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save({"state_dict": tv}, path)
    net = load_imagenet_backbone(path, "resnet18")
    torch.testing.assert_close(net.conv1.weight, tv["module.conv1.weight"].sum(dim=1, keepdim=True))
    assert int(net.bn1.num_batches_tracked) == 0
    assert net.eval()(torch.rand(1, 1, 32, 32)).shape == (1, 512)


def test_three_channel_and_wrong_arch():
    tv = torchvision_resnet18_state_dict()
    rgb = convert_torchvision_resnet(tv, "resnet18", in_channels=3)
    torch.testing.assert_close(rgb["conv1.weight"], tv["conv1.weight"])
    with pytest.raises(ValueError, match="resnet34"):
        convert_torchvision_resnet(tv, "resnet34")
