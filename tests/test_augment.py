"""Tests for iumask.data.augment: label and IU mask stay aligned under every augmentation."""

from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest

from iumask.data.augment import DEFAULT_AUGMENTATION, JointAugment
from iumask.data.dataset import SegmentationDataset
from iumask.data.folder import FolderDataset
from iumask.data.synthetic import generate_synthetic
from iumask.errors import IumaskError

IGNORE = 255
NUM_CLASSES = 12
PALETTE = np.array([[(37 * c) % 256, (91 * c + 40) % 256, (53 * c + 200) % 256] for c in range(256)], dtype=np.uint8)
PALETTE[IGNORE] = (255, 255, 255)


def make_scene(h: int = 96, w: int = 128, seed: int = 0, label_dtype=np.uint8, ignore: int = IGNORE):
    """Many instances (rectangles, ellipses) of several classes over a background, with ignore blobs.

    Returns image (colour per class), label, iu (one distinct value > 0 per instance, including the
    background and the ignore regions) and the instance map.
    """
    rng = np.random.default_rng(seed)
    inst = np.zeros((h, w), dtype=np.int32)  # instance 0 = background (class 0)
    classes = [0]
    n = 40
    for k in range(1, n + 1):
        cls = ignore if k % 10 == 0 else int(rng.integers(1, NUM_CLASSES))
        classes.append(cls)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        ry, rx = int(rng.integers(2, h // 5)), int(rng.integers(2, w // 5))
        if rng.random() < 0.5:
            cv2.rectangle(inst, (cx - rx, cy - ry), (cx + rx, cy + ry), k, thickness=-1)
        else:
            cv2.ellipse(inst, (cx, cy), (rx, ry), float(rng.uniform(0, 180)), 0, 360, k, thickness=-1)
    classes_arr = np.array(classes)
    label = classes_arr[inst].astype(label_dtype)
    iu = ((inst + 1) / (n + 2)).astype(np.float32)  # distinct per instance, never 0
    image = PALETTE[np.minimum(label, 255)]
    if ignore != IGNORE:
        image[label == ignore] = PALETTE[IGNORE]
    return image, label, iu, inst


def pairs(label: np.ndarray, iu: np.ndarray) -> set[tuple[int, float]]:
    return set(zip(label.ravel().tolist(), iu.ravel().tolist()))


def run(aug: JointAugment, sample: dict, seed: int) -> dict:
    return aug({k: v.copy() for k, v in sample.items()}, np.random.default_rng(seed))


def check_aligned(before: dict, after: dict, ignore: int = IGNORE) -> np.ndarray:
    """Asserts the alignment invariants and returns the padding mask."""
    pad = after["iu"] == 0  # real pixels all have iu > 0, so iu == 0 marks padding
    assert (after["label"][pad] == ignore).all()
    assert (after["image"][pad] == 0).all()
    real = ~pad
    allowed = pairs(before["label"], before["iu"])
    got = pairs(after["label"][real], after["iu"][real])
    assert got <= allowed, f"misaligned (label, iu) pairs: {sorted(got - allowed)[:5]}"
    return pad


@pytest.fixture(scope="module")
def scene():
    image, label, iu, _ = make_scene()
    return {"image": image, "label": label, "iu": iu}


SETTINGS = [
    dict(scale=(0.5, 2.0), crop=None, flip=True, jitter=0.2),
    dict(scale=(0.5, 2.0), crop=(64, 80), flip=True, jitter=0.0),
    dict(scale=(0.3, 0.7), crop=(120, 150), flip=True, jitter=0.3),  # always padding
    dict(scale=(1.3, 2.5), crop=(33, 47), flip=False, jitter=0.0),  # odd sizes, always crop
    dict(scale=(0.75, 1.5), crop=(96, 96), flip=True, jitter=0.0),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_label_and_iu_stay_aligned(scene, settings):
    aug = JointAugment(**settings)
    padded_any = False
    for seed in range(25):
        out = run(aug, scene, seed)
        pad = check_aligned(scene, out)
        padded_any |= bool(pad.any())
        expected = settings["crop"] or scene["label"].shape
        assert out["label"].shape == tuple(expected)
    if settings["scale"][1] < 1:
        assert padded_any


def test_alignment_check_has_teeth(scene):
    """A one-pixel shift between label and mask is caught by the pair check."""
    out = run(JointAugment(jitter=0.0), scene, 3)
    shifted = dict(out, iu=np.roll(out["iu"], 1, axis=1))
    with pytest.raises(AssertionError):
        check_aligned(scene, shifted)


def test_uint16_labels_and_other_ignore():
    image, label, iu, _ = make_scene(label_dtype=np.uint16, ignore=1000, seed=5)
    sample = {"image": image, "label": label, "iu": iu}
    aug = JointAugment(scale=(0.4, 1.6), crop=(100, 140), ignore_index=1000)
    for seed in range(10):
        out = run(aug, sample, seed)
        assert out["label"].dtype == np.uint16
        check_aligned(sample, out, ignore=1000)
    with pytest.raises(ValueError, match="does not fit"):
        JointAugment(ignore_index=1000)({"image": image, "label": label.astype(np.uint8), "iu": iu},
                                        np.random.default_rng(0))


@pytest.mark.parametrize("settings", [dict(scale=(0.5, 2.0), crop=None), dict(scale=(0.4, 0.6), crop=(80, 100)),
                                      dict(scale=(1.5, 2.0), crop=(50, 70))])
def test_image_matches_label_away_from_boundaries(scene, settings):
    """With jitter 0, image pixels whose source neighbourhood is one instance keep their class colour."""
    image, label = scene["image"], scene["label"]
    # Source pixels whose 3x3 neighbourhood is uniform in label; bilinear reads only such neighbours.
    lab = label.astype(np.float32)
    uniform = (cv2.erode(lab, np.ones((3, 3))) == cv2.dilate(lab, np.ones((3, 3))))
    aug = JointAugment(**settings, flip=True, jitter=0.0)
    for seed in range(15):
        out = run(aug, scene, seed)
        # Same rng -> same geometry: carry the "uniform" map through the mask channel.
        marks = run(aug, {"image": image, "label": label, "iu": uniform.astype(np.float32) + 1}, seed)["iu"]
        inner = marks == 2
        assert inner.sum() > 0.5 * (marks > 0).sum()  # most real (unpadded) pixels are checked
        assert np.array_equal(out["image"][inner], PALETTE[out["label"][inner]])
        check_aligned(scene, out)


def test_flip_only_is_exact_mirror(scene):
    aug = JointAugment(scale=(1, 1), crop=None, flip=True, jitter=0)
    flipped = 0
    for seed in range(20):
        out = run(aug, scene, seed)
        mirror = not np.array_equal(out["label"], scene["label"])
        flipped += mirror
        for key in ("image", "label", "iu"):
            expected = scene[key][:, ::-1] if mirror else scene[key]
            assert np.array_equal(out[key], expected)
    assert 3 <= flipped <= 17  # p = 0.5


def test_everything_off_is_identity(scene):
    aug = JointAugment(scale=(1.0, 1.0), crop=None, flip=False, jitter=0.0)
    for seed in range(5):
        out = run(aug, scene, seed)
        assert set(out) == set(scene)
        for key in scene:
            assert out[key].dtype == scene[key].dtype
            assert np.array_equal(out[key], scene[key])


def test_crop_larger_than_input_pads_exactly(scene):
    h, w = scene["label"].shape
    aug = JointAugment(scale=(1, 1), crop=(h + 10, w + 30), flip=False, jitter=0)
    offsets = set()
    for seed in range(10):
        out = run(aug, scene, seed)
        pad = check_aligned(scene, out)
        assert pad.sum() == (h + 10) * (w + 30) - h * w
        ys, xs = np.nonzero(~pad)
        y0, x0 = ys.min(), xs.min()
        offsets.add((y0, x0))
        assert np.array_equal(out["label"][y0:y0 + h, x0:x0 + w], scene["label"])
        assert np.array_equal(out["iu"][y0:y0 + h, x0:x0 + w], scene["iu"])
        assert np.array_equal(out["image"][y0:y0 + h, x0:x0 + w], scene["image"])
    assert len(offsets) > 1  # the placement is random


def test_photometric_changes_only_the_image(scene):
    plain = JointAugment(scale=(1, 1), flip=False, jitter=0.0)
    jit = JointAugment(scale=(1, 1), flip=False, jitter=0.3)
    changed = 0
    for seed in range(10):
        out = run(jit, scene, seed)
        assert np.array_equal(out["label"], scene["label"]) and np.array_equal(out["iu"], scene["iu"])
        assert out["image"].dtype == np.uint8 and out["image"].shape == scene["image"].shape
        changed += not np.array_equal(out["image"], scene["image"])
    assert changed >= 9
    # With geometry on, turning jitter on or off does not change the geometry that is drawn.
    geo, geo_jit = JointAugment(crop=(70, 90), jitter=0.0), JointAugment(crop=(70, 90), jitter=0.3)
    for seed in range(10):
        a, b = run(geo, scene, seed), run(geo_jit, scene, seed)
        assert np.array_equal(a["label"], b["label"]) and np.array_equal(a["iu"], b["iu"])
        assert not np.array_equal(a["image"], b["image"])
    assert np.array_equal(plain(dict(scene), np.random.default_rng(0))["image"], scene["image"])


def test_jitter_range_on_grey_image():
    """A uniform grey image is only affected by brightness: stays uniform, within +-jitter."""
    grey = {"image": np.full((20, 30, 3), 100, np.uint8), "label": np.zeros((20, 30), np.uint8)}
    aug = JointAugment(scale=(1, 1), flip=False, jitter=0.2)
    values = set()
    for seed in range(40):
        out = aug(dict(grey), np.random.default_rng(seed))
        assert "iu" not in out
        assert np.ptp(out["image"]) <= 1  # float rounding may split one x.5 value
        values.add(int(out["image"][0, 0, 0]))
    assert min(values) >= 80 and max(values) <= 120 and len(values) > 10


def test_saturation_and_contrast_move_colours():
    image = np.zeros((10, 10, 3), np.uint8)
    image[:, :5] = (200, 40, 40)
    image[:, 5:] = (40, 40, 200)
    sample = {"image": image, "label": np.zeros((10, 10), np.uint8)}
    aug = JointAugment(scale=(1, 1), flip=False, jitter=0.5)
    spreads = [np.ptp(aug(dict(sample), np.random.default_rng(s))["image"].astype(int)) for s in range(30)]
    assert min(spreads) < 160 < max(spreads)


def test_deterministic_per_seed(scene):
    aug = JointAugment(crop=(64, 64))
    a, b, c = run(aug, scene, 11), run(aug, scene, 11), run(aug, scene, 12)
    for key in scene:
        assert np.array_equal(a[key], b[key])
    assert any(not np.array_equal(a[key], c[key]) for key in scene)
    outputs = {run(aug, scene, s)["image"].tobytes() for s in range(8)}
    assert len(outputs) == 8


def test_shapes_and_dtypes(scene):
    h, w = scene["label"].shape
    for crop, shape in ((None, (h, w)), ((40, 50), (40, 50)), (64, (64, 64)), ((200, 10), (200, 10))):
        out = run(JointAugment(crop=crop), scene, 1)
        assert set(out) == {"image", "label", "iu"}
        assert out["image"].shape == shape + (3,) and out["image"].dtype == np.uint8
        assert out["label"].shape == shape and out["label"].dtype == np.uint8
        assert out["iu"].shape == shape and out["iu"].dtype == np.float32
        assert all(v.flags.c_contiguous for v in out.values())
    no_iu = JointAugment()({"image": scene["image"], "label": scene["label"]}, np.random.default_rng(0))
    assert set(no_iu) == {"image", "label"}


def test_bad_samples_rejected(scene):
    aug = JointAugment()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown sample key"):
        aug(dict(scene, depth=scene["iu"]), rng)
    with pytest.raises(ValueError, match="iu mask"):
        aug(dict(scene, iu=scene["iu"][:, :-1]), rng)
    with pytest.raises(ValueError, match="image must be uint8"):
        aug(dict(scene, image=scene["image"].astype(np.float32)), rng)


def test_options_describe_and_pickle():
    default = JointAugment.from_options(None)
    assert default == JointAugment.from_options(DEFAULT_AUGMENTATION) == JointAugment()
    assert DEFAULT_AUGMENTATION == {"scale": [0.5, 2.0], "crop": None, "flip": True, "jitter": 0.2}
    aug = JointAugment.from_options({"scale": [1, 1.5], "crop": [48, 64], "flip": False}, ignore_index=7)
    d = aug.describe()
    assert d == {"scale": [1.0, 1.5], "crop": [48, 64], "flip": False, "jitter": 0.2, "ignore_index": 7}
    assert json.loads(json.dumps(d)) == d
    assert JointAugment.from_options(json.loads(json.dumps(d))) == aug
    clone = pickle.loads(pickle.dumps(aug))
    assert clone == aug and repr(clone) == repr(aug)
    image, label, iu, _ = make_scene(seed=2)
    sample = {"image": image, "label": label, "iu": iu}
    a, b = run(aug, sample, 4), run(clone, sample, 4)
    assert all(np.array_equal(a[k], b[k]) for k in sample)


@pytest.mark.parametrize("options", [
    {"scale": [2.0, 1.0]}, {"scale": [0, 1]}, {"scale": 1.0}, {"scale": [1, "2"]}, {"crop": [0, 10]},
    {"crop": [10.5, 10]}, {"crop": "big"}, {"flip": 1}, {"jitter": 1.0}, {"jitter": -0.1}, {"jitter": True},
    {"ignore_index": -1}, {"ignore_index": 70000}, {"rotate": 10}, ["scale"],
])
def test_bad_options_rejected(options):
    with pytest.raises(IumaskError, match="augmentation"):
        JointAugment.from_options(options)


def test_default_augmentation_of_a_768_sample_keeps_shape_dtypes_and_alignment():
    """The case benchmarks/bench_augment.py times (a 768x768 random sample, default settings, 768x768
    crop), checked for what it returns: the crop's shape and the dtypes, padding where the scale is
    below 1, and every pixel's label still beside its own mask value (the speed is the benchmark's
    business: a test asserts no durations)."""
    rng = np.random.default_rng(0)
    sample = {"image": rng.integers(0, 256, (768, 768, 3), dtype=np.uint8),
              "label": rng.integers(0, 20, (768, 768), dtype=np.uint8),
              "iu": rng.uniform(0.01, 1.0, (768, 768)).astype(np.float32)}  # > 0: iu == 0 marks padding
    aug = JointAugment(crop=(768, 768))
    padded = []
    for seed in range(4):
        out = run(aug, sample, seed)
        assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
            "image": ((768, 768, 3), np.uint8), "label": ((768, 768), np.uint8), "iu": ((768, 768), np.float32)}
        assert all(v.flags.c_contiguous for v in out.values())
        padded.append(bool(check_aligned(sample, out).any()))
    assert any(padded) and not all(padded)  # the seeds cover scales below and above 1


def _instance_masks(folder: FolderDataset):
    """IU masks constant per instance (connected component of one class), distinct per instance, > 0."""
    masks = []
    for i in range(len(folder)):
        label = folder.read_label(i)
        iu = np.zeros(label.shape, np.float32)
        next_id = 1
        for cls in np.unique(label):
            n, comp = cv2.connectedComponents((label == cls).astype(np.uint8), connectivity=8)
            for c in range(1, n):
                iu[comp == c] = next_id / 1000.0
                next_id += 1
        masks.append(iu)
    return masks


def test_end_to_end_segmentation_dataset(tmp_path):
    root = generate_synthetic(tmp_path / "syn", num_train=2, num_val=1, height=64, width=64)
    folder = FolderDataset(root, "train")
    masks = _instance_masks(folder)
    originals = [pairs(folder.read_label(i), masks[i]) for i in range(len(folder))]
    for crop, shape in ((None, (64, 64)), ((48, 80), (48, 80))):
        aug = JointAugment.from_options({"crop": crop}, ignore_index=folder.classes.ignore_index)
        ds = SegmentationDataset(folder, masks=masks.__getitem__, transform=aug, seed=3)
        seen = set()
        for epoch in range(4):
            ds.set_epoch(epoch)
            for i in range(len(ds)):
                item = ds[i]
                label, iu = item["label"].numpy(), item["iu"].numpy()
                assert item["image"].shape == (3, *shape) and label.shape == shape and iu.shape == shape
                pad = iu == 0
                assert (label[pad] == folder.classes.ignore_index).all()
                assert pairs(label[~pad], iu[~pad]) <= originals[i]
                seen.add(item["image"].numpy().tobytes())
        assert len(seen) == 4 * len(ds)  # every epoch draws new augmentations
        again = SegmentationDataset(folder, masks=masks.__getitem__, transform=pickle.loads(pickle.dumps(aug)), seed=3)
        again.set_epoch(3)
        assert np.array_equal(again[1]["iu"].numpy(), ds[1]["iu"].numpy())
