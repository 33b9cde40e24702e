"""The leakage check (issue #18) on real radiographs: planted copies of test images in a reference set (an identical
file under another name, a resized and JPEG re-encoded copy, another image of the same patient) are found, each for
its reason, and nothing else is."""

from __future__ import annotations

import shutil
from pathlib import Path

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


def test_the_command_line_names_entries_not_files_and_exits_1_on_a_leak(site2, xray_root, tmp_path, capsys):
    import json

    from muscle_ext.cli import main

    datalist = xray_root / "pneumonia_site2" / "datalist.json"
    planted = tmp_path / "pool.json"
    planted.write_text(json.dumps({"training": [{"image": site2["test"][4]["image"]}]}))
    assert main(["data", "check-leakage", "--test", f"{datalist}:test", "--reference", str(planted)]) == 1
    said = capsys.readouterr().out
    assert f"{planted}:training entry 0: identical file" in said and "1 leak(s) in all" in said
    assert "entry 4 = " in said and Path(site2["test"][4]["image"]).name not in said  # no image names
    assert main(["data", "check-leakage", "--test", f"{datalist}:test", "--reference",
                 f"{datalist}:training"]) == 0
    assert main(["data", "check-leakage", "--test", str(tmp_path / "absent.json"), "--reference", str(planted)]) == 2


def test_the_main_job_checks_its_test_splits_and_the_report_says_what_it_found(site2, xray_root, tmp_path):
    import json

    from muscle_ext.pipeline import Stage, build_report
    from muscle_ext.pipeline.data_check import check_job_data, leakage_sets

    task = xray_root / "pneumonia_site2" / "datalist.json"
    pool = tmp_path / "pool.json"  # a pre-training pool that holds one test image of the task
    pool.write_text(json.dumps({"training": [{"image": site2["test"][7]["image"]},
                                             {"image": site2["training"][0]["image"]}]}))
    stages = [Stage("md_moco", tmp_path / "md_moco", [], inputs=(pool,), extra={"kind": "pretrain"}),
              Stage("site2_scratch", tmp_path / "site2", [], inputs=(task,), extra={"kind": "downstream"})]
    test, reference = leakage_sets(stages)
    assert test == [(task, "test")] and reference == [(pool, "training"), (task, "training"), (task, "validation")]
    other = xray_root / "pneumonia_nih" / "datalist.json"  # another site a model is scored at: its test split only
    scored = Stage("site2_md_moco", tmp_path / "x", [], inputs=(task, other),
                   extra={"kind": "downstream", "external_datalist": str(other)})
    assert leakage_sets([*stages, scored]) == ([(task, "test"), (other, "test")], reference)
    checked = check_job_data(stages, tmp_path, placeholders={str(xray_root): "<data>", str(tmp_path): "<out>"})
    assert checked["leaks"] == 1 and checked["tests"][0]["datalist"] == "<data>/pneumonia_site2/datalist.json"
    assert checked["tests"][0]["leaks"] == [{"entry": 7, "reference": "<out>/pool.json:training", "reference_entry": 0,
                                             "reason": "identical file", "correlation": 1.0}]
    assert check_job_data(stages, tmp_path) == checked  # the same datalists: the saved result, not a second check
    (tmp_path / "pipeline.json").write_text(json.dumps({"preset": "p", "data_name": "xray", "seed": 0, "stages": []}))
    report = build_report(tmp_path).read_text()
    assert "| `<data>/pneumonia_site2/datalist.json:test` | 75 | 1 | 0 | 0 |" in report
    assert "> **1 test entries also sit in data a stage trains on" in report
    pool.write_text(json.dumps({"training": [{"image": site2["training"][0]["image"]}]}))  # fixed: checked again
    assert check_job_data(stages, tmp_path)["leaks"] == 0
    assert "No test image or patient found in them." in build_report(tmp_path).read_text()
