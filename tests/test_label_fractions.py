"""Label-efficiency subsets (issue #17) on the real training splits: stratified, grouped by patient, nested across
fractions for one seed, reproducible, and different across seeds."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from muscle_ext.data import k_shot_subset, label_fraction_subset, load_datalist


@pytest.fixture(scope="module")
def pneumonia(xray_root) -> list[dict]:
    return load_datalist(xray_root / "pneumonia_nih" / "datalist.json", "training")


def _patients(items: list[dict]) -> set[str]:
    return {i["patient_id"] for i in items}


def test_subsets_are_stratified_and_keep_every_class(pneumonia):
    full = Counter(i["label"] for i in pneumonia)
    for fraction in (0.01, 0.1, 0.5):
        part = label_fraction_subset(pneumonia, fraction, seed=0, min_per_class=5)
        counts = Counter(i["label"] for i in part)
        assert set(counts) == set(full)  # even at 1 %: at least 5 patients of each class
        for label, n in full.items():
            share_full, share_part = n / len(pneumonia), counts[label] / len(part)
            if fraction >= 0.1:
                assert abs(share_part - share_full) < 0.06, (fraction, label, share_part, share_full)


def test_a_patient_is_in_or_out_with_all_their_images(pneumonia):
    by_patient = Counter(i["patient_id"] for i in pneumonia)
    assert max(by_patient.values()) > 1  # the split has patients with several images: the test can fail
    part = label_fraction_subset(pneumonia, 0.1, seed=3)
    assert all(Counter(i["patient_id"] for i in part)[p] == by_patient[p] for p in _patients(part))
    # the unit counted is the patient: 10 % of each class's patients (rounded up)
    groups: dict[int, set[str]] = {}
    for item in pneumonia:
        groups.setdefault(item["label"], set()).add(item["patient_id"])
    lowest = {p: min(i["label"] for i in pneumonia if i["patient_id"] == p) for p in by_patient}
    expected = sum(math.ceil(0.1 * sum(1 for p in lowest if lowest[p] == c)) for c in groups)
    assert len(_patients(part)) == expected


def test_subsets_are_nested_reproducible_and_seeded(pneumonia):
    small, medium, large = (label_fraction_subset(pneumonia, f, seed=7) for f in (0.01, 0.1, 0.5))
    images = [{i["image"] for i in s} for s in (small, medium, large)]
    assert images[0] < images[1] < images[2]
    assert json.dumps(label_fraction_subset(pneumonia, 0.1, seed=7)) == json.dumps(medium)
    assert {i["image"] for i in label_fraction_subset(pneumonia, 0.1, seed=8)} != images[1]
    order = [i["image"] for i in pneumonia]
    assert [i["image"] for i in medium] == sorted((i["image"] for i in medium), key=order.index)
    assert label_fraction_subset(pneumonia, 1.0) == pneumonia


def test_masks_without_patients_draw_items_in_one_stratum(xray_root):
    lungs = load_datalist(xray_root / "lung_seg_cxr" / "datalist.json", "training")
    part = label_fraction_subset(lungs, 0.1, seed=0, stratify=False)
    assert len(part) == math.ceil(0.1 * len(lungs))
    with pytest.raises(ValueError, match="pass stratify=False"):
        label_fraction_subset([{"image": "a.png", "label": 0.5}] * 3, 0.5)


@pytest.mark.parametrize("fraction", [0, 1.5, "10%", True])
def test_a_fraction_outside_0_1_is_refused(pneumonia, fraction):
    with pytest.raises(ValueError, match="label fraction must be a number in"):
        label_fraction_subset(pneumonia, fraction)


def test_k_shot_sets_are_stratified_nested_and_never_touch_the_evaluation_cases(xray_root):
    """The new site's few labelled cases (issue #20): pneumonia_site2's training split as the pool, its test split
    as the evaluation cases; one of them is planted in the pool to check it is never drawn."""
    pool = load_datalist(xray_root / "pneumonia_site2" / "datalist.json", "training")
    evaluation = load_datalist(xray_root / "pneumonia_site2" / "datalist.json", "test")
    planted = [*pool, {**evaluation[0]}]
    sets = {k: k_shot_subset(planted, k, seed=2, exclude=evaluation) for k in (5, 10, 20)}
    for k, chosen in sets.items():
        patients = Counter(label for label, _ in {(i["label"], i["patient_id"]) for i in chosen})
        assert patients == {0: k, 1: k}, patients
        assert evaluation[0]["image"] not in {i["image"] for i in chosen}
    images = [{i["image"] for i in sets[k]} for k in (5, 10, 20)]
    assert images[0] < images[1] < images[2]
    assert [i["image"] for i in k_shot_subset(planted, 5, seed=2, exclude=evaluation)] == \
        [i["image"] for i in sets[5]]
    assert {i["image"] for i in k_shot_subset(planted, 5, seed=3, exclude=evaluation)} != images[0]
    with pytest.raises(ValueError, match="k must be a whole number"):
        k_shot_subset(pool, 0)


def test_k_shot_counts_patients_and_excludes_a_shared_patient(pneumonia):
    evaluation = [pneumonia[0]]
    chosen = k_shot_subset(pneumonia, 3, seed=0, exclude=evaluation)
    assert pneumonia[0]["patient_id"] not in _patients(chosen)
    per_class: dict[int, set[str]] = {}
    for item in chosen:
        per_class.setdefault(item["label"], set()).add(item["patient_id"])
    assert {label: len(p) for label, p in per_class.items()} == {0: 3, 1: 3}
