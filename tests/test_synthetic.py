"""The phantom corpus of the synthetic preset: datalists every bundle accepts, the same files for the same seed,
labels that the pictures carry (the finding is a bright opacity inside a lung field; the masks are the dark fields),
and no overwriting."""

from __future__ import annotations

import numpy as np
import pytest

from muscle_ext.data import load_datalist, read_mask, read_xray, validate_datalist
from muscle_ext.data.synthetic import BODY_PARTS, write_synthetic_corpus


def test_corpus_is_valid_deterministic_and_learnable(tmp_path):
    paths = write_synthetic_corpus(tmp_path / "a", n_chest=(6, 2, 2), n_other=5, size=64, seed=3)
    write_synthetic_corpus(tmp_path / "b", n_chest=(6, 2, 2), n_other=5, size=64, seed=3)
    pool = load_datalist(paths["pretrain"], "training") + load_datalist(paths["pretrain"], "validation")
    assert {item["body_part"] for item in pool} == set(BODY_PARTS)
    assert not any("chest_test_" in item["image"] for item in pool)  # test images stay out of pre-training
    findings = validate_datalist(load_datalist(paths["chest_findings"], "training"), classes=[0, 1], source="f")
    lungs = validate_datalist(load_datalist(paths["chest_lungs"], "test"), mask_key="label", source="l")
    assert [i["label"] for i in findings] == [0, 1] * 3 and len(lungs) == 2
    for name in ("images/chest_training_001.png", "masks/chest_test_000.png", "images/skull_004.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # the finding is a bright spot in a lung field: the brightest lung pixels stand far above the lung's median
    contrast = []
    for item in load_datalist(paths["chest_lungs"], "training"):
        image, mask = np.asarray(read_xray(item["image"])[0]), np.asarray(read_mask(item["label"])[0]) > 0
        lung = image[mask]
        contrast.append(float(np.percentile(lung, 99) - np.median(lung)))
    with_finding, without = contrast[1::2], contrast[0::2]
    assert min(with_finding) > max(without), contrast
    with pytest.raises(FileExistsError):
        write_synthetic_corpus(tmp_path / "a")
