"""Tests for the dataset format readers (Cityscapes, ACDC, CamVid, auto-detection)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from assertions import raises_naming
from PIL import Image
from testdata import camvid_root

from iumask.data.dataset import SegmentationDataset
from iumask.data.folder import FolderDataset
from iumask.data.formats import FORMATS, detect_format, open_dataset
from iumask.data.readers import (
    ACDC_CLASSES,
    CITYSCAPES_CLASSES,
    ACDCDataset,
    CamVidDataset,
    CityscapesDataset,
)

H, W = 16, 32

# The standard labelId -> trainId table, written out independently of iumask's.
TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
            26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_NAMES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                    "motorcycle", "bicycle"]
CAMVID_NAMES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                "Pedestrian", "Bicyclist"]

CITY_SAMPLES = (("aachen", "aachen_000001_000019"), ("aachen", "aachen_000000_000019"),
                ("bochum", "bochum_000000_000313"))
ACDC_SAMPLES = (("fog", "GOPR0475", "GOPR0475_frame_000041"), ("fog", "GOPR0475", "GOPR0475_frame_000042"),
                ("night", "GOPR0351", "GOPR0351_frame_000159"))


def write_image(path: Path, value: int = 0, shape=(H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((*shape, 3), value, np.uint8))


def write_label(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label).save(path)


def label_ids_pattern() -> np.ndarray:
    """Every labelId 0..33 and 255 (license plate, -1 as uint8)."""
    values = np.arange(H * W).reshape(H, W) % 35
    values[values == 34] = 255
    return values.astype(np.uint8)


def expected_train_ids(label_ids: np.ndarray) -> np.ndarray:
    out = np.full(label_ids.shape, 255, np.uint8)
    for label_id, train_id in TRAIN_ID.items():
        out[label_ids == label_id] = train_id
    return out


def make_cityscapes(root: Path, split="train", samples=CITY_SAMPLES, kind="labelIds") -> Path:
    for k, (city, stem) in enumerate(samples):
        write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", 10 * k)
        gt = root / "gtFine" / split / city
        label = label_ids_pattern() if kind == "labelIds" else (np.arange(H * W).reshape(H, W) % 19).astype(np.uint8)
        write_label(gt / f"{stem}_gtFine_{kind}.png", label)
        # The other files of a real gtFine folder must be left alone.
        write_image(gt / f"{stem}_gtFine_color.png", 7)
        write_label(gt / f"{stem}_gtFine_instanceIds.png", np.zeros((H, W), np.uint16))
        (gt / f"{stem}_gtFine_polygons.json").write_text("{}")
    return root


def make_acdc(root: Path, split="train", samples=ACDC_SAMPLES, kind="labelTrainIds") -> Path:
    for k, (cond, seq, stem) in enumerate(samples):
        write_image(root / "rgb_anon" / cond / split / seq / f"{stem}_rgb_anon.png", 10 * k)
        gt = root / "gt" / cond / split / seq
        label = label_ids_pattern() if kind == "labelIds" else np.full((H, W), k, np.uint8)
        write_label(gt / f"{stem}_gt_{kind}.png", label)
        write_image(gt / f"{stem}_gt_labelColor.png", 7)
    return root


def make_camvid(root: Path, split="train", names=("0001TP_006690", "0001TP_006720")) -> Path:
    for k, name in enumerate(names):
        write_image(root / split / f"{name}.png", 10 * k)
        write_label(root / f"{split}annot" / f"{name}.png", (np.arange(H * W).reshape(H, W) % 12).astype(np.uint8))
    return root


def make_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps({"names": ["a", "b"]}))
    write_image(root / "images" / "train" / "x.png")
    write_label(root / "labels" / "train" / "x.png", np.zeros((H, W), np.uint8))
    return root




# ---------------------------------------------------------------- Cityscapes


def test_cityscapes_ids_paths_and_label_mapping(tmp_path):
    ds = open_dataset(make_cityscapes(tmp_path), "train")
    assert isinstance(ds, CityscapesDataset) and ds.split == "train" and ds.root == tmp_path
    assert ds.ids == ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019", "bochum/bochum_000000_000313"]
    assert len(ds) == 3
    assert ds.image_paths[0] == tmp_path / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    assert ds.label_paths[2] == tmp_path / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelIds.png"
    assert ds.read_image(0).shape == (H, W, 3) and ds.read_image(1)[0, 0].tolist() == [0, 0, 0]
    assert ds.image_shape(0) == (H, W)
    label = ds.read_label(0)
    assert label.dtype == np.uint8 and label.shape == (H, W)
    np.testing.assert_array_equal(label, expected_train_ids(label_ids_pattern()))
    assert set(np.unique(label).tolist()) == set(range(19)) | {255}
    # Spot checks of the table: road, bicycle, license plate, unlabeled, rail track.
    raw = label_ids_pattern()
    for label_id, train_id in ((7, 0), (33, 18), (255, 255), (0, 255), (10, 255), (31, 16)):
        assert (label[raw == label_id] == train_id).all()


def test_cityscapes_classes_match_acdc():
    assert CITYSCAPES_CLASSES == ACDC_CLASSES
    assert list(CITYSCAPES_CLASSES.names) == CITYSCAPES_NAMES and CITYSCAPES_CLASSES.ignore_index == 255
    assert CITYSCAPES_CLASSES.colors[0] == (128, 64, 128) and CITYSCAPES_CLASSES.colors[18] == (119, 11, 32)


def test_cityscapes_and_acdc_datasets_share_classes(tmp_path):
    city = open_dataset(make_cityscapes(tmp_path / "cs"), "train")
    acdc = open_dataset(make_acdc(tmp_path / "acdc"), "train")
    assert city.classes == acdc.classes
    assert city.classes.to_dict() == acdc.classes.to_dict()


def test_cityscapes_label_train_ids_preferred(tmp_path):
    root = make_cityscapes(tmp_path)
    trainids = np.full((H, W), 13, np.uint8)
    trainids[0, 0] = 255
    path = root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"
    write_label(path, trainids)
    ds = open_dataset(root, "train", format="cityscapes")
    assert ds.label_paths[0] == path
    assert ds.label_paths[1].name.endswith("_gtFine_labelIds.png")  # chosen per file
    np.testing.assert_array_equal(ds.read_label(0), trainids)
    np.testing.assert_array_equal(ds.read_label(1), expected_train_ids(label_ids_pattern()))


def test_cityscapes_label_id_outside_table(tmp_path):
    root = make_cityscapes(tmp_path)
    label = label_ids_pattern()
    label[3, 3] = 34
    name = "bochum_000000_000313_gtFine_labelIds.png"
    write_label(root / "gtFine/train/bochum" / name, label)
    ds = open_dataset(root, "train")
    ds.read_label(0)
    with raises_naming(name, "34"):
        ds.read_label(2)


def test_cityscapes_train_id_out_of_range(tmp_path):
    root = make_cityscapes(tmp_path, kind="labelTrainIds")
    name = "aachen_000001_000019_gtFine_labelTrainIds.png"
    write_label(root / "gtFine/train/aachen" / name, np.full((H, W), 19, np.uint8))
    with raises_naming(name, "19", "0..18", "255"):
        open_dataset(root, "train").read_label(1)


def test_cityscapes_size_mismatch_and_corrupt_files(tmp_path):
    root = make_cityscapes(tmp_path)
    name = "aachen_000000_000019_gtFine_labelIds.png"
    write_label(root / "gtFine/train/aachen" / name, np.zeros((H, W - 1), np.uint8))
    bad_image = root / "leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png"
    bad_image.write_bytes(b"not a png")
    ds = open_dataset(root, "train")
    with raises_naming(name, f"{W - 1}x{H}", f"{W}x{H}"):
        ds.read_label(0)
    with raises_naming(bad_image.name):
        ds.read_image(2)


def test_cityscapes_image_without_label(tmp_path):
    root = make_cityscapes(tmp_path)
    (root / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelIds.png").unlink()
    with raises_naming("bochum_000000_000313_leftImg8bit.png", "bochum_000000_000313_gtFine_label"):
        open_dataset(root, "train")


def test_cityscapes_missing_and_empty_splits(tmp_path):
    root = make_cityscapes(tmp_path)
    with raises_naming("leftImg8bit/val", "train"):
        open_dataset(root, "val")
    (root / "leftImg8bit/val/lindau").mkdir(parents=True)
    with raises_naming("gtFine/val"):
        open_dataset(root, "val")
    (root / "gtFine/val").mkdir()
    with raises_naming("leftImg8bit/val", "no <city>"):
        open_dataset(root, "val")
    with raises_naming("leftImg8bit"):
        CityscapesDataset(tmp_path / "nothing", "train")


def test_cityscapes_fingerprint_covers_exactly_the_split(tmp_path):
    root = make_cityscapes(tmp_path)
    first = open_dataset(root, "train").fingerprint()
    assert len(first) == 64 and open_dataset(root, "train").fingerprint() == first
    # Files outside the split (other splits, other gtFine products) do not count.
    make_cityscapes(root, split="val", samples=(("lindau", "lindau_000000_000019"),))
    write_image(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_color.png", 99)
    assert open_dataset(root, "train").fingerprint() == first
    # A changed label does.
    label = label_ids_pattern()
    label[0, 0] = 26
    write_label(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png", label)
    second = open_dataset(root, "train").fingerprint()
    assert second != first
    # So does an added sample.
    make_cityscapes(root, samples=(("zurich", "zurich_000000_000019"),))
    assert open_dataset(root, "train").fingerprint() not in (first, second)


def test_cityscapes_feeds_segmentation_dataset(tmp_path):
    seg = SegmentationDataset(open_dataset(make_cityscapes(tmp_path), "train"), size=(8, 16))
    sample = seg[0]
    assert sample["image"].shape == (3, 8, 16)
    assert set(sample["label"].unique().tolist()) <= set(range(19)) | {255}


# ---------------------------------------------------------------- ACDC


def test_acdc_ids_and_default_conditions(tmp_path):
    ds = open_dataset(make_acdc(tmp_path), "train")
    assert isinstance(ds, ACDCDataset) and ds.conditions == ["fog", "night"]
    assert ds.ids == ["fog/GOPR0475/GOPR0475_frame_000041", "fog/GOPR0475/GOPR0475_frame_000042",
                      "night/GOPR0351/GOPR0351_frame_000159"]
    assert ds.image_paths[0] == tmp_path / "rgb_anon/fog/train/GOPR0475/GOPR0475_frame_000041_rgb_anon.png"
    assert ds.label_paths[0] == tmp_path / "gt/fog/train/GOPR0475/GOPR0475_frame_000041_gt_labelTrainIds.png"
    assert [int(ds.read_label(i)[0, 0]) for i in range(3)] == [0, 1, 2]
    assert ds.classes == CITYSCAPES_CLASSES


def test_acdc_condition_selection(tmp_path):
    root = make_acdc(tmp_path)
    night = open_dataset(root, "train", conditions=["night"])
    assert night.ids == ["night/GOPR0351/GOPR0351_frame_000159"]
    both = open_dataset(root, "train", format="acdc", conditions="night, fog")
    assert both.conditions == ["fog", "night"] and len(both) == 3
    fog_print = open_dataset(root, "train", conditions=["fog"]).fingerprint()
    assert fog_print != both.fingerprint()
    # Another condition's files do not enter the fog fingerprint.
    write_label(root / "gt/night/train/GOPR0351/GOPR0351_frame_000159_gt_labelTrainIds.png",
                np.full((H, W), 5, np.uint8))
    assert open_dataset(root, "train", conditions=["fog"]).fingerprint() == fog_print


def test_acdc_unknown_and_absent_conditions(tmp_path):
    root = make_acdc(tmp_path)
    with raises_naming("rgb_anon", "'dust'", "fog, night, rain, snow", "present for split 'train': fog, night"):
        open_dataset(root, "train", conditions=["dust"])
    with raises_naming("rgb_anon/snow/train", "available: fog, night"):
        open_dataset(root, "train", conditions="snow")


def test_acdc_label_ids_mapped(tmp_path):
    root = make_acdc(tmp_path, samples=ACDC_SAMPLES[:1], kind="labelIds")
    ds = open_dataset(root, "train")
    assert ds.label_paths[0].name == "GOPR0475_frame_000041_gt_labelIds.png"
    np.testing.assert_array_equal(ds.read_label(0), expected_train_ids(label_ids_pattern()))
    # labelTrainIds wins once it exists.
    write_label(root / "gt/fog/train/GOPR0475/GOPR0475_frame_000041_gt_labelTrainIds.png", np.ones((H, W), np.uint8))
    assert open_dataset(root, "train").read_label(0).max() == 1


def test_acdc_errors(tmp_path):
    root = make_acdc(tmp_path)
    with raises_naming("rgb_anon", "fog, night, rain, snow", "val"):
        open_dataset(root, "val")
    (root / "gt/night/train/GOPR0351/GOPR0351_frame_000159_gt_labelTrainIds.png").unlink()
    with raises_naming("GOPR0351_frame_000159_rgb_anon.png", "gt/night/train/GOPR0351/GOPR0351_frame_000159_gt_label"):
        open_dataset(root, "train")
    write_image(root / "rgb_anon/rain/train/GOPR0400/GOPR0400_frame_000001_rgb_anon.png")
    with raises_naming("gt/rain/train"):
        open_dataset(root, "train", conditions=["rain"])
    (root / "rgb_anon/snow/train").mkdir(parents=True)
    (root / "gt/snow/train").mkdir(parents=True)
    with raises_naming("rgb_anon/snow/train", "_rgb_anon.png"):
        open_dataset(root, "train", conditions=["snow"])


# ---------------------------------------------------------------- CamVid layout (synthetic tree)


def test_camvid_layout_maps_void_and_checks(tmp_path):
    root = make_camvid(tmp_path)
    ds = open_dataset(root, "train")
    assert isinstance(ds, CamVidDataset) and ds.ids == ["0001TP_006690", "0001TP_006720"]
    label = ds.read_label(0)
    raw = np.asarray(Image.open(ds.label_paths[0]))
    np.testing.assert_array_equal(label == 255, raw == 11)
    np.testing.assert_array_equal(label[raw < 11], raw[raw < 11])
    bad = raw.copy()
    bad[2, 2] = 12
    write_label(ds.label_paths[1], bad)
    with raises_naming("0001TP_006720.png", "12", "11 for void"):
        ds.read_label(1)
    with raises_naming("val", "train"):
        open_dataset(root, "val", format="camvid")
    (root / "trainannot" / "0001TP_006690.png").unlink()
    with raises_naming("train/0001TP_006690.png", "trainannot/0001TP_006690.png"):
        open_dataset(root, "train")
    (root / "emptyannot").mkdir()
    (root / "empty").mkdir()
    with raises_naming("empty", "no .png"):
        open_dataset(root, "empty", format="camvid")


# ---------------------------------------------------------------- detection and open_dataset


def test_detect_each_format(tmp_path):
    assert detect_format(make_folder(tmp_path / "f")) == "folder"
    assert detect_format(make_cityscapes(tmp_path / "c")) == "cityscapes"
    assert detect_format(make_acdc(tmp_path / "a")) == "acdc"
    assert detect_format(make_camvid(tmp_path / "v")) == "camvid"
    assert isinstance(open_dataset(tmp_path / "f", "train"), FolderDataset)
    assert isinstance(open_dataset(tmp_path / "f", "train", format="folder"), FolderDataset)
    assert FORMATS == ("auto", "folder", "cityscapes", "acdc", "camvid")


def test_detect_unknown_ambiguous_and_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with raises_naming("empty", "classes.json", "leftImg8bit", "gtFine", "rgb_anon", "trainannot"):
        detect_format(tmp_path / "empty")
    both = make_acdc(make_cityscapes(tmp_path / "both"))
    with raises_naming("both", "ambiguous", "cityscapes", "acdc"):
        open_dataset(both, "train")
    assert len(open_dataset(both, "train", format="acdc")) == 3  # an explicit format settles it
    with raises_naming("missing", "not found"):
        detect_format(tmp_path / "missing")
    with raises_naming("missing", "not found"):
        open_dataset(tmp_path / "missing", "train", format="camvid")


def test_open_dataset_argument_errors(tmp_path):
    root = make_cityscapes(tmp_path)
    with raises_naming("'kitti'", "cityscapes, acdc"):
        open_dataset(root, "train", format="kitti")
    with raises_naming("ACDC", "cityscapes"):
        open_dataset(root, "train", conditions=["fog"])


# ---------------------------------------------------------------- real CamVid

CAMVID = camvid_root()
needs_camvid = pytest.mark.skipif(not (CAMVID / "train").is_dir(), reason=f"CamVid not found at {CAMVID}")


@needs_camvid
def test_real_camvid_splits():
    assert detect_format(CAMVID) == "camvid"
    counts = {}
    for split in ("train", "val", "test"):
        ds = open_dataset(CAMVID, split)
        counts[split] = len(ds)
        assert ds.ids == sorted(ds.ids)
        assert [p.name for p in ds.image_paths] == [p.name for p in ds.label_paths]
        assert ds.label_paths[0].parent.name == f"{split}annot"
        assert list(ds.classes.names) == CAMVID_NAMES and ds.classes.ignore_index == 255
        assert ds.classes.colors[4] == (60, 40, 222)
    assert counts == {"train": 367, "val": 101, "test": 233}


@needs_camvid
def test_real_camvid_labels_and_fingerprint():
    ds = open_dataset(CAMVID, "train")
    assert ds.ids[0] == "0001TP_006690"
    found_void = False
    for i in (0, 100, 200, 366):
        image, label = ds.read_image(i), ds.read_label(i)
        assert image.shape == (360, 480, 3) and label.shape == (360, 480) and ds.image_shape(i) == (360, 480)
        raw = np.asarray(Image.open(ds.label_paths[i]))
        np.testing.assert_array_equal(label == 255, raw == 11)
        assert set(np.unique(label).tolist()) <= set(range(11)) | {255}
        found_void |= bool((label == 255).any())
    assert found_void
    fingerprint = ds.fingerprint()
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0


def test_a_format_registered_after_import_is_usable_by_name(tmp_path):
    """The registry is read when a config is validated, not frozen at import (was: --format must be
    one of auto, folder, ...)."""
    from iumask.config import DataConfig
    from iumask.data.folder import FolderDataset
    from iumask.data.formats import DATASET_FORMATS, DatasetFormat, format_names, register_format
    from iumask.data.synthetic import generate_synthetic
    from iumask.errors import IumaskError

    root = generate_synthetic(tmp_path / "mine", num_train=2, num_val=1, height=32, width=32)
    register_format(DatasetFormat("my-folder", "a folder of mine", lambda r: False,
                                  lambda r, split, conditions: FolderDataset(r, split)))
    try:
        assert "my-folder" in format_names()
        assert len(DataConfig(root, format="my-folder").open("train")) == 2
    finally:
        del DATASET_FORMATS["my-folder"]
    with pytest.raises(IumaskError, match="--format must be one of auto, folder"):
        DataConfig(root, format="my-folder")


def test_the_fingerprint_depends_on_the_mapping_not_only_on_the_files(camvid_dir, tmp_path, monkeypatch):
    """The same CamVid files read with another label mapping (another table, or classes) get another
    fingerprint, also when the first reading's fingerprint is cached: the cache record's signature
    covers the definition, so the second reading is not a hit on the first's record."""
    import shutil

    from iumask.data.folder import ClassInfo, LabelTable, PairedDataset
    from iumask.data.readers import CAMVID_LABELS

    monkeypatch.setenv("IUMASK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("iumask.data.folder.RACY_SECONDS", 0.0)  # files copied just now are cached too
    root = tmp_path / "camvid"
    names = [p.name for p in sorted((camvid_dir / "train").glob("*.png"))[:2]]
    for folder in ("train", "trainannot"):
        (root / folder).mkdir(parents=True)
        for name in names:
            shutil.copyfile(camvid_dir / folder / name, root / folder / name)
    camvid = open_dataset(root, "train", "camvid")
    cached = camvid.fingerprint()  # computed and kept in the cache
    assert list((tmp_path / "cache" / "fingerprints").glob("*.json"))
    swapped = CAMVID_LABELS.table.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # sky and building exchanged

    def reading(table: LabelTable, classes: ClassInfo) -> PairedDataset:
        definition = json.dumps({"table": table.name, "classes": classes.to_dict()}).encode()
        return PairedDataset(root, "train", classes, camvid.ids, camvid.image_paths, camvid.label_paths, table,
                             definition=definition)

    other_table = reading(LabelTable("swapped", swapped, "0..11"), camvid.classes)
    other_classes = reading(CAMVID_LABELS, ClassInfo(tuple(reversed(camvid.classes.names))))
    same = reading(CAMVID_LABELS, camvid.classes)
    fingerprints = {cached, other_table.fingerprint(), other_classes.fingerprint(), same.fingerprint()}
    assert len(fingerprints) == 4
    assert open_dataset(root, "train", "camvid").fingerprint() == cached
    # Computed afresh (no cache), each reading's fingerprint is the one it got beside the others'.
    monkeypatch.setenv("IUMASK_CACHE", str(tmp_path / "cache2"))
    assert other_table.fingerprint() in fingerprints and other_table.fingerprint() != cached


def test_the_label_lookup_equals_numpy_indexing_on_real_camvid_labels(tmp_path):
    """LabelTable.apply takes OpenCV's 8-bit lookup for 8-bit labels: on real CamVid labels it gives
    numpy's ``table[label]`` (and the 16-bit path's result); a value outside the table is refused
    naming the smallest such value, on both paths."""
    from iumask.data.folder import LabelTable
    from iumask.data.readers import CAMVID_LABELS

    ds = open_dataset(CAMVID, "train")
    for i in (0, 150, 366):
        raw = np.asarray(Image.open(ds.label_paths[i]))
        assert raw.dtype == np.uint8
        expected = CAMVID_LABELS.table[raw]  # the slow, obvious lookup
        for stored in (raw, raw.astype(np.uint16)):
            mapped = CAMVID_LABELS.apply(stored, ds.label_paths[i])
            assert mapped.dtype == np.uint8
            np.testing.assert_array_equal(mapped, expected)
    holes = CAMVID_LABELS.table.copy()
    holes[[3, 8]] = -1
    table = LabelTable("holes", holes, "0..11 but 3 and 8")
    raw = np.asarray(Image.open(ds.label_paths[0]))
    assert {3, 8} <= set(np.unique(raw).tolist())
    for stored in (raw, raw.astype(np.uint16)):
        with raises_naming(ds.label_paths[0].name, "label value 3", "holes"):
            table.apply(stored, ds.label_paths[0])
    np.testing.assert_array_equal(table.apply(np.where(np.isin(raw, [3, 8]), 0, raw).astype(np.uint8), tmp_path),
                                  holes[np.where(np.isin(raw, [3, 8]), 0, raw)])

    # A table for 16-bit stored values: 8-bit labels take its first 256 entries, 16-bit ones all of
    # it; a stored value past its end (exactly its length too) is refused; classes above 255 come
    # out 16-bit.
    wide = np.full(65536, -1, np.int16)
    wide[:12] = CAMVID_LABELS.table[:12]
    wide[1000] = 7
    big = LabelTable("wide", wide, "0..11 or 1000")
    for stored in (raw, raw.astype(np.uint16)):
        np.testing.assert_array_equal(big.apply(stored, tmp_path), CAMVID_LABELS.table[raw])
    sixteen = raw.astype(np.uint16)
    sixteen[0, 0] = 1000
    assert big.apply(sixteen, tmp_path)[0, 0] == 7
    for past_end in (256, 300):
        sixteen[0, 0] = past_end
        with raises_naming(ds.label_paths[0].name, f"label value {past_end}", "camvid"):
            CAMVID_LABELS.apply(sixteen, ds.label_paths[0])
    classes = np.arange(256, dtype=np.int16) + 1  # class ids 1..256: 256 needs 16 bits
    shifted = LabelTable("shifted", classes, "0..255")
    for stored in (raw, raw.astype(np.uint16)):
        mapped = shifted.apply(stored, tmp_path)
        assert mapped.dtype == np.uint16
        np.testing.assert_array_equal(mapped, raw.astype(np.uint16) + 1)


def test_the_readers_names_are_still_importable_from_formats():
    """The public layouts' readers moved to iumask.data.readers (so the registry imports no numpy);
    code that imported them from iumask.data.formats gets the same objects."""
    from iumask.data import formats, readers
    from iumask.data.folder import FolderDataset
    from iumask.data.formats import ACDC_CONDITIONS, CamVidDataset

    assert CamVidDataset is readers.CamVidDataset and formats.CAMVID_LABELS is readers.CAMVID_LABELS
    assert formats.FolderDataset is FolderDataset
    assert ACDC_CONDITIONS == ("fog", "night", "rain", "snow")
    with pytest.raises(AttributeError, match="no_such_reader"):
        formats.no_such_reader  # noqa: B018
