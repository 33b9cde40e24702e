"""Datalists, pre-processing, validation and pooling on the real X-ray corpus."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, OneOf, RandAffined, RandGaussianNoised, RandScaleIntensityd
from PIL import Image

from muscle_ext.data import (
    CLAHE,
    DatalistError,
    DrawSeededDataset,
    PooledSampler,
    datalist_from_class_folders,
    datalist_from_csv,
    datalist_from_dicom_tree,
    dataset_weights,
    load_datalist,
    make_dataset,
    pool_datasets,
    validate_datalist,
    write_datalist,
    xray_preprocessing,
)

SUBSETS = {  # task folder: (mask key, declared classes)
    "pneumonia_nih": (None, [0, 1]),
    "knee_oa": (None, [0, 1]),
    "lung_seg_cxr": ("label", None),
    "tb_detection_tbx11k": (None, [0, 1, 2]),
    "hand_boneage": (None, None),
    "ceph_landmarks": (None, None),
}


@pytest.mark.parametrize("task", sorted(SUBSETS))
def test_every_subset_loads_to_configured_size(xray_root, task):
    mask_key, classes = SUBSETS[task]
    datalist = xray_root / task / "datalist.json"
    for section in ("training", "validation", "test"):
        items = load_datalist(datalist, section)
        assert items, (task, section)
        sample = items[:: max(1, len(items) // 6)][:6]
        if classes is not None:
            validate_datalist(sample, classes=classes, mask_key=mask_key, source=str(datalist))
        chain = Compose(xray_preprocessing("image", mask_keys=mask_key or (), size=96, tags={"dataset": task}))
        for item in sample:
            out = chain(item)
            image = out["image"]
            assert tuple(image.shape) == (1, 96, 96) and image.dtype == torch.float32
            assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0 and float(image.std()) > 0.05
            assert out["dataset"] == task
            if mask_key:
                assert tuple(out[mask_key].shape) == (1, 96, 96)
                assert set(torch.unique(out[mask_key]).tolist()) <= {0.0, 1.0}


def test_pretrain_pool_loads_every_dataset(xray_root):
    items = load_datalist(xray_root / "pretrain_datalist.json", "training")
    by_dataset = {}
    for item in items:
        by_dataset.setdefault(item["dataset"], item)
    assert len(by_dataset) == 6
    chain = Compose(xray_preprocessing("image", size=64))
    for name, item in by_dataset.items():
        out = chain(item)
        assert tuple(out["image"].shape) == (1, 64, 64), name
        assert out["body_part"] in {"chest", "knee", "hand", "skull"}


def test_lung_masks_line_up_with_images_after_the_same_geometric_transform(xray_root):
    """Lungs are dark on a radiograph: the mask must cover darker pixels than its transposed or upside-down
    copy would, after a random affine applied to both image and mask."""
    items = load_datalist(xray_root / "lung_seg_cxr" / "datalist.json", "test")[:12]
    chain = Compose(xray_preprocessing("image", "label", size=160) + [
        RandAffined(["image", "label"], prob=1.0, rotate_range=0.3, translate_range=20, scale_range=0.15,
                    mode=["bilinear", "nearest"])])
    chain.set_random_state(0)
    wins = Counter()
    for item in items:
        out = chain(item)
        image, mask = out["image"][0], out["label"][0] > 0.5
        assert 0.1 < float(mask.float().mean()) < 0.5
        inside = float(image[mask].mean())
        wins["transposed"] += inside < float(image[mask.T].mean())
        wins["flipped"] += inside < float(image[mask.flip(0)].mean())
    assert wins["transposed"] >= 11 and wins["flipped"] >= 11, wins


def test_clahe_without_tiles_or_clipping_is_histogram_equalisation(xray_root):
    item = load_datalist(xray_root / "knee_oa" / "datalist.json", "test")[0]
    image = Compose(xray_preprocessing("image", size=128))(item)["image"]
    out = CLAHE(tiles=1, clip_limit=256, num_bins=256)(image)
    bins = np.clip((image.numpy() * 255).round().astype(int), 0, 255)
    cdf = np.cumsum(np.bincount(bins.ravel(), minlength=256)).astype(float)
    expected = (cdf[bins] - cdf[0]) / (cdf[-1] - cdf[0])
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    local = CLAHE(tiles=8, clip_limit=2.0)(image)
    assert float(local.min()) >= 0 and float(local.max()) <= 1 and local.shape == image.shape
    assert float(local.std()) > float(image.std())  # contrast enhanced


# ---------------------------------------------------------------- bad input: one test per cause


@pytest.fixture()
def good_items(xray_root):
    items = load_datalist(xray_root / "lung_seg_cxr" / "datalist.json", "training")[:3]
    return [{"image": i["image"], "mask": i["label"], "label": 1} for i in items]


def _assert_reports(items, index, pattern, **kwargs):
    with pytest.raises(DatalistError, match=pattern) as info:
        validate_datalist(items, **kwargs)
    assert info.value.report.bad_indices == [index]
    kept = validate_datalist(items, on_error="skip", **kwargs)
    assert kept == [item for i, item in enumerate(items) if i != index]


def test_truncated_png_is_reported(tmp_path, good_items):
    data = open(good_items[0]["image"], "rb").read()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 3])
    items = good_items + [{"image": str(tmp_path / "cut.png"), "label": 1}]
    _assert_reports(items, 3, r"cut\.png: damaged image")


def test_text_file_named_dcm_is_reported(tmp_path, good_items):
    (tmp_path / "report.dcm").write_text("not an image\n" * 50)
    _assert_reports([{"image": str(tmp_path / "report.dcm"), "label": 1}, *good_items], 0,
                    r"report\.dcm: not a DICOM file")


def test_dicom_without_pixel_data_is_reported(tmp_path, good_items):
    from tests.bundle_utils import write_dicom as _write_dicom

    _write_dicom(tmp_path / "nopix.dcm", np.zeros((4, 4)), with_pixels=False)
    _assert_reports([*good_items, {"image": str(tmp_path / "nopix.dcm"), "label": 0}], 3,
                    r"nopix\.dcm: DICOM has no pixel data")


def test_missing_path_is_reported(tmp_path, good_items):
    _assert_reports([*good_items[:1], {"image": str(tmp_path / "gone.png"), "label": 1}, *good_items[1:]], 1,
                    r"gone\.png: missing file")


def test_label_outside_classes_is_reported(good_items):
    items = [*good_items, {**good_items[0], "label": 7}]
    _assert_reports(items, 3, r"label 7 is not one of the declared classes \[0, 1\]", classes=[0, 1])


def test_mask_of_wrong_size_is_reported(tmp_path, good_items):
    Image.fromarray(np.zeros((100, 80), np.uint8)).save(tmp_path / "small_mask.png")
    items = [{**good_items[0], "mask": str(tmp_path / "small_mask.png")}, *good_items[1:]]
    _assert_reports(items, 0, r"mask small_mask\.png is 80x100 pixels but the image is 256x256")


def test_boxes_empty_or_outside_are_reported(xray_root):
    items = load_datalist(xray_root / "tb_detection_tbx11k" / "datalist.json", "training")[:3]
    items[1] = {**items[1], "box": [[10, 10, 300, 40]], "label": [0]}
    items[2] = {**items[2], "box": [], "label": []}
    with pytest.raises(DatalistError) as info:
        validate_datalist(items, classes=[0, 1, 2])
    message = str(info.value)
    assert "box outside the image (256x256 pixels)" in message and "no boxes" in message
    assert info.value.report.bad_indices == [1, 2]


def test_all_problems_reported_at_once(tmp_path, good_items):
    items = [*good_items, {"image": str(tmp_path / "a.png"), "label": 0}, {**good_items[0], "label": 5}]
    with pytest.raises(DatalistError) as info:
        validate_datalist(items, classes=[0, 1])
    assert info.value.report.bad_indices == [3, 4] and "2 of 5 datalist entries are unusable" in str(info.value)


# ---------------------------------------------------------------- builders


def test_builders_make_valid_datalists(tmp_path, xray_root):
    source = load_datalist(xray_root / "pneumonia_nih" / "datalist.json", "training")[:6]
    for i, item in enumerate(source):
        folder = tmp_path / "byclass" / item["class_name"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(open(item["image"], "rb").read())
    folders = datalist_from_class_folders(tmp_path / "byclass", split={"training": 0.5, "validation": 0.5},
                                          dataset="nih", body_part="chest")
    assert sum(len(v) for v in folders.values()) == 6
    classes = sorted({i["class_name"] for i in source})
    assert all(i["label"] == classes.index(i["class_name"]) for v in folders.values() for i in v)
    path = write_datalist(tmp_path / "dl.json", folders)
    assert len(load_datalist(path, "training")) == 3 and validate_datalist(load_datalist(path, "validation"))

    (tmp_path / "labels.csv").write_text("file,y,split\n" + "".join(
        f"byclass/{i['class_name']}/{n}.png,{i['label']},{'training' if n < 4 else 'test'}\n"
        for n, i in enumerate(source)))
    from_csv = datalist_from_csv(tmp_path / "labels.csv", "file", "y", split_column="split")
    assert len(from_csv["training"]) == 4 and len(from_csv["test"]) == 2
    validate_datalist(from_csv["training"], classes=[0, 1])

    dicoms = datalist_from_dicom_tree(xray_root / "dicom")
    assert len(dicoms["training"]) == 6 and {i["body_part"] for i in dicoms["training"]} == {"chest", "extremity"}


# ---------------------------------------------------------------- pooling and caching


def test_dataset_weights():
    np.testing.assert_allclose(dataset_weights([300, 100], "proportional"), [0.75, 0.25])
    np.testing.assert_allclose(dataset_weights([300, 100], "balanced"), [0.5, 0.5])
    np.testing.assert_allclose(dataset_weights([400, 100], "temperature", temperature=2), [2 / 3, 1 / 3])
    with pytest.raises(ValueError, match="at least one item"):
        dataset_weights([10, 0])


def test_pooled_sampler_weights_seed_and_disjoint_shards():
    pool = [list(range(1000)), list(range(40)), list(range(10))]
    sampler = PooledSampler(pool, weighting="balanced", num_samples=3000, seed=3, num_replicas=1, rank=0)
    draws = np.array(list(sampler))
    share = np.bincount(np.searchsorted([1000, 1040, 1050], draws, side="right"), minlength=3) / len(draws)
    np.testing.assert_allclose(share, [1 / 3] * 3, atol=0.03)
    # A small dataset is cycled through whole permutations: every item is seen before any repeats.
    small = draws[(draws >= 1040)] - 1040
    assert sorted(small[:10].tolist()) == list(range(10))
    assert list(PooledSampler(pool, weighting="balanced", num_samples=3000, seed=3, num_replicas=1, rank=0)) == \
        draws.tolist()
    sampler.set_epoch(1)
    assert list(sampler) != draws.tolist()
    shards = [list(PooledSampler(pool, num_samples=999, seed=3, num_replicas=2, rank=r)) for r in range(2)]
    full = list(PooledSampler(pool, num_samples=1000, seed=3, num_replicas=1, rank=0))
    assert len(shards[0]) == len(shards[1]) == 500
    assert sorted(shards[0] + shards[1]) == sorted(full)  # disjoint draws that together make the whole epoch


def test_pooled_datasets_apply_their_own_preprocessing(xray_root, tmp_path):
    items = load_datalist(xray_root / "pretrain_datalist.json", "training")
    subset = [i for i in items if i["dataset"] == "knee_oa_chen2018"][:3] + \
        [i for i in items if i["dataset"] == "nih_chestxray14"][:3]
    pre = {"default": xray_preprocessing("image", size=64),
           "knee_oa_chen2018": xray_preprocessing("image", size=64, clahe={"clip_limit": 3.0})}
    pool = pool_datasets(subset, pre, cache="disk", cache_dir=tmp_path / "cache")
    assert pool.names == ["knee_oa_chen2018", "nih_chestxray14"] and len(pool) == 6
    for i in range(6):
        assert tuple(pool[i]["image"].shape) == (1, 64, 64)
    assert (tmp_path / "cache" / "knee_oa_chen2018").is_dir() and (tmp_path / "cache" / "nih_chestxray14").is_dir()
    memory = make_dataset(subset, xray_preprocessing("image", size=64), cache="memory")
    torch.testing.assert_close(torch.as_tensor(memory[4]["image"]), torch.as_tensor(pool[4]["image"]))
    with pytest.raises(ValueError, match="no pre-processing configured"):
        pool_datasets(subset, {"nih_chestxray14": pre["default"]})


def test_a_disk_cache_is_never_read_back_stale(xray_root, tmp_path):
    """One cache folder, reused with another image size and after a file was replaced under the same name: each
    read gives what decoding now gives (MONAI's PersistentDataset keys only the item by default)."""
    source = load_datalist(xray_root / "pneumonia_nih" / "datalist.json", "training")[:2]
    items = []
    for k, item in enumerate(source):
        copy = tmp_path / f"image{k}.png"
        copy.write_bytes(open(item["image"], "rb").read())
        items.append({**item, "image": str(copy)})
    cache = tmp_path / "cache"

    def first(size: int, **kwargs) -> torch.Tensor:
        return torch.as_tensor(make_dataset(items, xray_preprocessing("image", size=size), **kwargs)[0]["image"])

    assert first(32, cache="disk", cache_dir=cache).shape[-1] == 32
    assert first(48, cache="disk", cache_dir=cache).shape[-1] == 48
    before = first(32, cache="disk", cache_dir=cache)
    Image.fromarray(255 - np.asarray(Image.open(items[0]["image"]))).save(items[0]["image"])  # a new image, same name
    after, fresh = first(32, cache="disk", cache_dir=cache), first(32)
    torch.testing.assert_close(after, fresh)
    assert not torch.allclose(after, before)
    assert len(list(cache.glob("*.pt"))) == 3  # the first item at 32 and 48 px, and its replacement at 32 px


def test_a_cache_file_cut_short_is_decoded_again(xray_root, tmp_path):
    """A truncated cache file (a run killed while another file system copied it in, or a file another worker is
    still copying) is decoded again and rewritten, where MONAI's PersistentDataset would stop the run."""
    items = load_datalist(xray_root / "pneumonia_nih" / "datalist.json", "training")[:1]
    cache = tmp_path / "cache"
    fresh = torch.as_tensor(make_dataset(items, xray_preprocessing("image", size=32))[0]["image"])
    make_dataset(items, xray_preprocessing("image", size=32), cache="disk", cache_dir=cache)[0]
    (written,) = cache.glob("*.pt")
    whole = written.read_bytes()
    written.write_bytes(whole[: len(whole) // 2])
    again = make_dataset(items, xray_preprocessing("image", size=32), cache="disk", cache_dir=cache)[0]["image"]
    torch.testing.assert_close(torch.as_tensor(again), fresh)
    assert written.stat().st_size == len(whole)  # rewritten whole
    with pytest.raises(RuntimeError) as stopped:  # a transform's own error still stops, naming the file
        make_dataset([{"image": str(tmp_path / "nope.png")}], xray_preprocessing("image", size=32), cache="disk",
                     cache_dir=cache)[0]
    chain, error = [], stopped.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("nope.png" in text for text in chain), chain


def test_draw_seeded_pool_augments_by_seed_alone(xray_root):
    from muscle_ext.data.augment import moco_two_view_transforms

    items = load_datalist(xray_root / "pretrain_datalist.json", "training")
    subset = [i for i in items if i["dataset"] == "knee_oa_chen2018"][:3] + \
        [i for i in items if i["dataset"] == "nih_chestxray14"][:3]
    branch = OneOf([RandScaleIntensityd("image_q", factors=0.5, prob=1.0), RandGaussianNoised("image_q", prob=1.0)])
    augmentation = {"default": moco_two_view_transforms(32, flip_lr=True) + [branch],
                    "chest": moco_two_view_transforms(32, flip_lr=False)}
    pool = DrawSeededDataset(pool_datasets(subset, {"default": xray_preprocessing("image", size=48)},
                                           augmentation, cache="memory"))
    first = pool[(4, 11)]
    assert isinstance(first["image_q"], torch.Tensor) and not isinstance(first["image_q"], MetaTensor)  # views
    assert not torch.equal(first["image_q"], first["image_k"])  # the two views of one draw are augmented apart
    for key in [(0, 5), (1, 11), (5, 3), (-2, 11), (2, 8)]:  # whatever was drawn in between, from either part
        pool[key]
    again = pool[(4, 11)]
    assert torch.equal(first["image_q"], again["image_q"]) and torch.equal(first["image_k"], again["image_k"])
    assert not torch.equal(pool[(4, 12)]["image_q"], first["image_q"])
    # the OneOf branch of the knee chain (a nested Compose with its own choice) is seeded too: unseeded, its
    # choice would differ between two draws of the same seed in about half of these
    for seed in range(8):
        assert torch.equal(pool[(1, seed)]["image_q"], pool[(1, seed)]["image_q"])
    with pytest.raises(IndexError, match="out of range"):
        pool[(6, 0)]


def test_datalist_json_is_decathlon_style(xray_root):
    raw = json.loads((xray_root / "pneumonia_nih" / "datalist.json").read_text())
    assert {"training", "validation", "test"} <= set(raw)
