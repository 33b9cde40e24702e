"""ImageNet weight conversion from a torchvision-layout state dict (built here: torchvision is not installed)."""

from __future__ import annotations

import pytest
import torch

from muscle_ext.networks.backbone import build_backbone
from muscle_ext.networks.pretrained import convert_torchvision_resnet, load_imagenet_backbone

from tests.bundle_utils import torchvision_resnet18_state_dict


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
