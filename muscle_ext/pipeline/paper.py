"""The MUSCLE paper's published test results (Liao et al., MICCAI 2022, Tables 2-3; the same numbers are on the
authors' page, PaddleSeg ``EISeg/docs/MUSCLE_en.md``), for the report's "paper" column.

Reference values only: the paper trained at full scale on the full public datasets (Pneumonia: 4,686 training
images; lung masks: 718; TBX: 640) with its own splits, pre-processing and heads (DeepLab-V3, Faster R-CNN), so a
quick run on a small corpus is not expected to reach them. Values are fractions (the paper prints percent).
"""

from __future__ import annotations

__all__ = ["PAPER", "paper_value"]

SOURCE = "Liao et al., MICCAI 2022 (Tables 2-3)"

PAPER: dict[str, dict] = {
    # dataset -> {metric, note, backbone -> {start -> value}}
    # Kermany et al.'s pediatric set (Guangzhou): the corpus's pneumonia_site2 is a subset of it; pneumonia_nih is not
    "pneumonia": {"metric": "roc_auc", "note": "the pediatric Pneumonia dataset of Kermany et al. (Guangzhou), AUC",
                  "resnet18": {"scratch": 0.9658, "imagenet": 0.9605, "md_moco": 0.9848, "muscle_minus": 0.9951,
                               "muscle": 0.9961},
                  "resnet50": {"scratch": 0.9655, "imagenet": 0.9872, "md_moco": 0.9953, "muscle_minus": 0.9958,
                               "muscle": 0.9972}},
    # "Chest X-ray Masks and Labels" (Shenzhen/Montgomery): not the corpus's lung_seg_cxr (COVID-19 Radiography)
    "lung": {"metric": "dice", "note": "Chest X-ray Masks and Labels (Shenzhen/Montgomery); Dice as PaddleSeg "
                                       "computes it, pooled over pixels: compare with dice_pooled",
             "resnet18": {"scratch": 0.9524, "imagenet": 0.9526, "md_moco": 0.9531, "muscle_minus": 0.9514,
                          "muscle": 0.9537},
             "resnet50": {"scratch": 0.9352, "imagenet": 0.9377, "md_moco": 0.9433, "muscle_minus": 0.9504,
                          "muscle": 0.9527}},
    # an 800-image TBX11K subset; the corpus's tb_detection_tbx11k is another 800-image TB-positive subset
    "tbx": {"metric": "map", "note": "an 800-image TBX11K subset (ours is another), Faster R-CNN, mAP",
            "resnet18": {"scratch": 0.3071, "imagenet": 0.2946, "md_moco": 0.3600, "muscle_minus": 0.3470,
                         "muscle": 0.3671},
            "resnet50": {"scratch": 0.2393, "imagenet": 0.3561, "md_moco": 0.3678, "muscle_minus": 0.3514,
                         "muscle": 0.3783}},
}


def paper_value(dataset: str, start: str, backbone: str = "resnet18") -> float | None:
    """The paper's test value of ``start`` on ``dataset`` (a key of :data:`PAPER`) with ``backbone``; ``None`` where
    it published none (e.g. the joint baseline, which the paper does not have)."""
    return PAPER.get(dataset, {}).get(backbone, {}).get(start)
