"""RetinaNet detection on the ResNet backbone (Lin et al. 2017, focal loss): a feature pyramid on the backbone's
stages and MONAI's ``RetinaNetDetector`` with ATSS anchor matching (Zhang et al. 2020).

The detector takes lists of images and targets (MONAI's detection API), not a single batch tensor. torchvision is
not installable next to the CPU torch, so the pieces of MONAI's detection code that need it are replaced here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from monai.networks.nets import ResNet

from .resnet_utils import BackboneModel, stage_channels, stage_strides

__all__ = ["ATSSRetinaNetDetector", "ResNetFPN", "build_retinanet_detector"]


class ResNetFPN(BackboneModel):
    """Backbone + feature pyramid (MONAI's ``FeaturePyramidNetwork`` with an extra max-pooled level).

    MONAI's ``BackboneWithFPN`` extracts stages with torchvision's ``IntermediateLayerGetter``, which we cannot
    install next to the CPU torch; this module runs the stages itself. ``forward`` returns the FPN maps as a
    ``dict`` (finest first): ``len(returned_layers) + 1`` maps of ``out_channels`` each. Raises ``ValueError``
    for layers outside 1..4.
    """

    def __init__(self, backbone: ResNet, returned_layers: Sequence[int] = (1, 2, 3), out_channels: int = 256) -> None:
        super().__init__(backbone)
        returned_layers = sorted(int(k) for k in returned_layers)
        if not returned_layers or returned_layers[0] < 1 or returned_layers[-1] > 4:
            raise ValueError(f"returned_layers must be in 1..4, got {returned_layers}")
        self.returned_layers = returned_layers
        self.last_layer = returned_layers[-1]
        channels = stage_channels(backbone)
        self.fpn = FeaturePyramidNetwork(spatial_dims=2, in_channels_list=[channels[k - 1] for k in returned_layers],
                                         out_channels=out_channels, extra_blocks=LastLevelMaxPool(2))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.feature_maps(x, self.last_layer)
        features: dict[str, torch.Tensor] = {}
        for k in self.returned_layers:
            features[str(k)] = maps[k - 1]
        return self.fpn(features)


class ATSSRetinaNetDetector(RetinaNetDetector):
    """``RetinaNetDetector`` that matches anchors with MONAI's ATSS matcher only.

    The parent's matching step tests ``isinstance(matcher, torchvision Matcher)`` first, which raises without
    torchvision (not installable next to the CPU torch); this override skips that test. Same outputs otherwise.
    """

    def compute_anchor_matched_idxs(self, anchors: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
                                    num_anchor_locs_per_level: Sequence[int]) -> list[torch.Tensor]:
        if not isinstance(self.proposal_matcher, ATSSMatcher):
            raise NotImplementedError("only the ATSS matcher (set_atss_matcher) is supported without torchvision")
        matched_idxs = []
        for anchors_per_image, targets_per_image in zip(anchors, targets, strict=True):
            boxes = targets_per_image[self.target_box_key].to(anchors_per_image.device)
            if boxes.numel() == 0:  # no ground truth: every anchor is background
                matched_idxs.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64,
                                               device=anchors_per_image.device))
                continue
            _, matched = self.proposal_matcher(boxes, anchors_per_image, num_anchor_locs_per_level,
                                               self.num_anchors_per_loc)
            if int(matched.max()) < 0:
                warnings.warn(f"no anchor matches the ground-truth boxes {boxes.tolist()}: check anchor shapes",
                              stacklevel=2)
            matched_idxs.append(matched)
        return matched_idxs


def build_retinanet_detector(
    backbone: ResNet,
    num_classes: int,
    returned_layers: Sequence[int] = (1, 2, 3),
    base_anchor_shapes: Sequence[Sequence[float]] = ((32, 32), (48, 24), (24, 48)),
    fpn_channels: int = 256,
    atss_num_candidates: int = 4,
    hard_negative_batch_size: int = 64,
    positive_fraction: float = 0.3,
    score_thresh: float = 0.05,
    topk_candidates_per_level: int = 1000,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
) -> ATSSRetinaNetDetector:
    """MONAI ``RetinaNetDetector`` (2-D) on ``backbone`` + FPN, ready to train and to infer.

    Anchors: ``base_anchor_shapes`` on the finest FPN level, doubled on each coarser level. Training uses MONAI's
    ATSS matcher and hard-negative sampler (torchvision's ``Matcher``/balanced sampler are unavailable here).

    Boxes follow MONAI's ``StandardMode`` over array axes: ``[a0_min, a1_min, a0_max, a1_max]`` where axis 0 is the
    first spatial axis of the tensor. For our ``(C, H, W)`` arrays that is ``[row_min, col_min, row_max, col_max]``;
    annotations given as image ``(x=column, y=row)`` must be swapped to that order.
    Train mode: ``detector(images, targets)`` -> ``{"classification": loss, "box_regression": loss}`` with targets
    ``[{"boxes": (N, 4) float, "labels": (N,) long}]``; eval mode: ``detector(images)`` ->
    ``[{"boxes", "labels", "labels_scores"}]`` per image.
    """
    feature_extractor = ResNetFPN(backbone, returned_layers, fpn_channels)
    num_levels = len(feature_extractor.returned_layers) + 1
    # inputs are padded so that the coarsest (extra pooled) level has an integer size
    coarsest_stride = stage_strides(backbone)[feature_extractor.last_layer - 1] * 2
    anchor_generator = AnchorGeneratorWithAnchorShape(
        feature_map_scales=[2**i for i in range(num_levels)],
        base_anchor_shapes=[tuple(float(s) for s in shape) for shape in base_anchor_shapes],
    )
    network = RetinaNet(spatial_dims=2, num_classes=num_classes,
                        num_anchors=anchor_generator.num_anchors_per_location()[0],
                        feature_extractor=feature_extractor, size_divisible=coarsest_stride)
    detector = ATSSRetinaNetDetector(network, anchor_generator)
    detector.set_atss_matcher(num_candidates=atss_num_candidates, center_in_gt=False)
    detector.set_hard_negative_sampler(batch_size_per_image=hard_negative_batch_size,
                                       positive_fraction=positive_fraction)
    detector.set_box_selector_parameters(score_thresh=score_thresh, topk_candidates_per_level=topk_candidates_per_level,
                                         nms_thresh=nms_thresh, detections_per_img=detections_per_img)
    return detector
