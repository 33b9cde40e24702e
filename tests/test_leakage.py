"""The leakage check (issue #18) on real radiographs: planted copies of test images in a reference set (an identical
file under another name, a resized and JPEG re-encoded copy, another image of the same patient) are found, each for
its reason, and nothing else is."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from muscle_ext.data import find_leaks, load_datalist
from muscle_ext.data.leakage import thumbnail


@pytest.fixture(scope="module")
def site2(xray_root) -> dict[str, list[dict]]:
    datalist = xray_root / "pneumonia_site2" / "datalist.json"
    return {"training": load_datalist(datalist, "training"), "test": load_datalist(datalist, "test")}


def test_planted_copies_are_found_and_nothing_else(site2, tmp_path):
    test, training = site2["test"], site2["training"]
    copy = tmp_path / "renamed.png"
    shutil.copyfile(test[0]["image"], copy)
    with Image.open(test[1]["image"]) as image:
        image.convert("L").resize((image.width * 2 // 3, image.height * 2 // 3), Image.BILINEAR).save(
            tmp_path / "smaller.jpg", quality=80)
    other = next(i for i in training + test[3:] if i["patient_id"] != test[2]["patient_id"])
    planted = [{"image": str(copy), "patient_id": "x1"}, {"image": str(tmp_path / "smaller.jpg"), "patient_id": "x2"},
               {"image": other["image"], "patient_id": test[2]["patient_id"]}]
    reference = training + planted
    leaks = find_leaks(test, reference)
    n = len(training)
    assert [(leak.test_index, leak.reference_index, leak.reason) for leak in leaks] == [
        (0, n, "identical file"), (1, n + 1, "near duplicate"), (2, n + 2, "same patient")]
    assert 0.975 <= leaks[1].correlation < 1.0
    # the site's own training and test splits share no radiograph and no patient (as its SOURCES.md says)
    assert find_leaks(test, training) == []


def test_thumbnails_are_normalised_and_the_threshold_is_checked(site2):
    vector = thumbnail(site2["test"][0]["image"])
    assert vector.shape == (64 * 64,) and abs(float(vector.mean())) < 1e-5
    assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="threshold must be in"):
        find_leaks(site2["test"][:1], site2["training"][:1], threshold=1.5)
