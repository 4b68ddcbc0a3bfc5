"""Tests for the folder dataset format, SegmentationDataset and the synthetic generator."""

from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from assertions import raises_naming

from iumask.data.dataset import SegmentationDataset
from iumask.data.folder import ClassInfo, FolderDataset, load_classes
from iumask.data.synthetic import SYNTHETIC_CLASSES, generate_synthetic
from iumask.errors import DataError, IumaskError

NAMES = ["background", "road", "car"]


def write_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def write_label(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), label)


def make_folder(root: Path, ids=("b", "a", "c"), shape=(12, 16), classes=None) -> Path:
    """A tiny dataset with split "train"; image i has constant colour 10*i, labels cycle 0..2 and 255."""
    (root / "classes.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps(classes or {"names": NAMES}))
    h, w = shape
    for k, sample_id in enumerate(ids):
        write_image(root / "images" / "train" / f"{sample_id}.png", np.full((h, w, 3), 10 * k, np.uint8))
        label = (np.arange(h * w).reshape(h, w) % 3).astype(np.uint8)
        label[0, 0] = 255
        write_label(root / "labels" / "train" / f"{sample_id}.png", label)
    return root




# ---------------------------------------------------------------- classes.json


def test_load_classes_defaults_and_roundtrip(tmp_path):
    make_folder(tmp_path)
    info = load_classes(tmp_path)
    assert info.names == tuple(NAMES) and info.num_classes == 3 and info.ignore_index == 255
    assert info.colors is None
    again = ClassInfo.from_dict(json.loads(json.dumps(SYNTHETIC_CLASSES.to_dict())))
    assert again == SYNTHETIC_CLASSES


def test_palette_uses_colors_and_blacks_out_ignore():
    info = ClassInfo(names=("a", "b"), colors=((1, 2, 3), (4, 5, 6)), ignore_index=255)
    pal = info.palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[0].tolist() == [1, 2, 3] and pal[1].tolist() == [4, 5, 6] and pal[255].tolist() == [0, 0, 0]
    default = ClassInfo(names=("a", "b", "c")).palette()
    assert len({tuple(c) for c in default[:3]}) == 3  # distinct default colours
    np.testing.assert_array_equal(default, ClassInfo(names=("a", "b", "c")).palette())


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ('{"colors": []}', "missing \"names\""),
        ('{"names": ["a", "a"]}', "appears twice"),
        ('{"names": ["a", "b"], "ignore_index": 1}', "is a class index"),
        ('{"names": ["a", "b"], "colors": [[1, 2, 3]]}', "one \\[r, g, b\\] per class"),
        ('{"names": ["a"], "colors": [[1, 2, 300]]}', "integers in 0..255"),
        ('{"names": "a"}', "non-empty list"),
    ],
)
def test_bad_classes_json(tmp_path, content, fragment):
    if content is not None:
        (tmp_path / "classes.json").write_text(content)
    with pytest.raises(DataError, match=fragment) as info:
        load_classes(tmp_path)
    message = str(info.value)
    assert "classes.json" in message and "\n" not in message


# ---------------------------------------------------------------- FolderDataset


def test_folder_reads_sorted_ids_shapes_and_dtypes(tmp_path):
    ds = FolderDataset(make_folder(tmp_path), "train")
    assert ds.ids == ["a", "b", "c"] and len(ds) == 3
    assert [p.name for p in ds.image_paths] == ["a.png", "b.png", "c.png"]
    assert [p.name for p in ds.label_paths] == ["a.png", "b.png", "c.png"]
    image, label = ds.read_image(0), ds.read_label(0)
    assert image.shape == (12, 16, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [10, 10, 10]  # "a" was written second (k=1)
    assert label.shape == (12, 16) and label.dtype == np.uint8
    assert set(np.unique(label).tolist()) == {0, 1, 2, 255}
    assert ds.image_shape(2) == (12, 16)


def test_rgb_channel_order(tmp_path):
    root = make_folder(tmp_path, ids=("a",))
    image = np.zeros((12, 16, 3), np.uint8)
    image[..., 0] = 200  # red
    write_image(root / "images" / "train" / "a.png", image)
    assert FolderDataset(root, "train").read_image(0)[0, 0].tolist() == [200, 0, 0]


def test_jpeg_images_and_16bit_labels(tmp_path):
    classes = {"names": [f"c{i}" for i in range(300)], "ignore_index": 65535}
    root = make_folder(tmp_path, ids=("a",), classes=classes)
    (root / "images" / "train" / "a.png").unlink()
    write_image(root / "images" / "train" / "a.jpg", np.full((12, 16, 3), 128, np.uint8))
    label = np.full((12, 16), 299, np.uint16)
    label[0, 0] = 65535
    write_label(root / "labels" / "train" / "a.png", label)
    ds = FolderDataset(root, "train")
    assert ds.image_paths[0].name == "a.jpg" and ds.read_image(0).shape == (12, 16, 3)
    read = ds.read_label(0)
    assert read.dtype == np.uint16 and read.max() == 65535 and read[1, 1] == 299


@pytest.mark.parametrize("decoder", ["as chosen", "PIL only"])
def test_labels_of_every_png_kind_read_as_pil_reads_their_values(tmp_path, monkeypatch, capfd, decoder):
    """Grayscale 8- and 16-bit labels take OpenCV's decoder, palette and 1-bit ones PIL's: each
    reads as its stored values (a palette label as its indices, not colours), checked against
    PIL's own reading, and so does every kind through PIL alone (where OpenCV declines); a
    grayscale label without IEND reads, a cut one is refused naming it, neither with libpng's
    complaints on stderr; an empty one gets the one empty-file message."""
    from PIL import Image

    import iumask.data.folder as folder

    if decoder == "PIL only":
        monkeypatch.setattr(folder.cv2, "imdecode", lambda *args: None)
    root = make_folder(tmp_path / "data", ids=("a",))
    path = root / "labels" / "train" / "a.png"
    values = np.random.default_rng(0).integers(0, 3, (12, 16))
    palette = Image.fromarray(values.astype(np.uint8), mode="L").convert("P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] * 85 + [0, 0, 0])
    kinds = {"gray8": Image.fromarray(values.astype(np.uint8), mode="L"),
             "gray16": Image.fromarray(values.astype(np.uint16)), "palette": palette,
             "bits": Image.fromarray(values.astype(bool))}
    for name, image in kinds.items():
        image.save(path)
        read = FolderDataset(root, "train").read_label(0)
        expected = np.asarray(Image.open(path))
        assert read.ndim == 2 and read.dtype == (np.uint16 if name == "gray16" else np.uint8), name
        np.testing.assert_array_equal(read, expected.astype(read.dtype), err_msg=name)
        np.testing.assert_array_equal(read, values.astype(bool) if name == "bits" else values, err_msg=name)
    kinds["gray16"].save(path)
    data = path.read_bytes()
    capfd.readouterr()
    path.write_bytes(data[:-12])  # no IEND, every pixel there: PIL reads it, as it always did
    np.testing.assert_array_equal(FolderDataset(root, "train").read_label(0), values)
    path.write_bytes(data[: len(data) // 2])
    with raises_naming(str(path)):
        FolderDataset(root, "train").read_label(0)
    assert capfd.readouterr().err == ""  # libpng, given the damaged files, would complain there
    path.write_bytes(b"")
    with raises_naming(str(path), "the label file is empty"):
        FolderDataset(root, "train").read_label(0)


def test_missing_split_folder(tmp_path):
    make_folder(tmp_path)
    with raises_naming("images/val"):
        FolderDataset(tmp_path, "val")


def test_empty_split(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "images" / "empty").mkdir()
    with raises_naming("images/empty"):
        FolderDataset(tmp_path, "empty")


def test_image_without_label(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "labels" / "train" / "b.png").unlink()
    with raises_naming("b.png"):
        FolderDataset(tmp_path, "train")


def test_label_of_wrong_size(tmp_path):
    make_folder(tmp_path)
    write_label(tmp_path / "labels" / "train" / "b.png", np.zeros((12, 15), np.uint8))
    ds = FolderDataset(tmp_path, "train")
    with pytest.raises(DataError, match="b.png") as info:
        ds.read_label(1)
    assert "15x12" in str(info.value) and "16x12" in str(info.value)


def test_three_channel_label(tmp_path):
    make_folder(tmp_path)
    write_image(tmp_path / "labels" / "train" / "c.png", np.zeros((12, 16, 3), np.uint8))
    with pytest.raises(DataError, match="c.png") as info:
        FolderDataset(tmp_path, "train").read_label(2)
    assert "single-channel" in str(info.value) and "3 channels (mode RGB)" in str(info.value)
    assert "convert it to an 8-bit grayscale PNG of class indices" in str(info.value)


def test_label_value_out_of_range(tmp_path):
    make_folder(tmp_path)
    label = np.zeros((12, 16), np.uint8)
    label[3, 4] = 17
    write_label(tmp_path / "labels" / "train" / "a.png", label)
    with pytest.raises(DataError, match="a.png") as info:
        FolderDataset(tmp_path, "train").read_label(0)
    message = str(info.value)
    assert "17" in message and "0..2" in message and "255" in message and "\n" not in message


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image(tmp_path, suffix):
    make_folder(tmp_path)
    (tmp_path / "images" / "train" / "b.png").unlink()
    path = tmp_path / "images" / "train" / f"b{suffix}"
    # Large enough that the cut lands in the pixel data, not the headers.
    write_image(path, np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    data = path.read_bytes()
    cut = len(data) * 3 // 4
    if suffix == ".jpg":
        assert data.find(b"\xff\xda") < cut
    path.write_bytes(data[:cut])
    ds = FolderDataset(tmp_path, "train")
    with raises_naming(path.name):
        ds.read_image(1)


def test_a_png_image_is_verified_by_its_checksums_without_decoding(tmp_path, monkeypatch):
    """check_pixels verifies PNG images by their chunks' CRC-32 checksums and decodes none; a byte
    changed in the pixel data (size and header intact), a cut file and a file without its IEND are
    each refused naming the file; bytes after IEND are ignored, and a JPEG named .png is decoded."""
    monkeypatch.setenv("IUMASK_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", shape=(64, 96))
    path = root / "images" / "train" / "a.png"
    write_image(path, np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    decoded = []
    read_image = FolderDataset.read_image
    monkeypatch.setattr(FolderDataset, "read_image", lambda self, i: decoded.append(i) or read_image(self, i))
    FolderDataset(root, "train").check_pixels()
    assert decoded == []

    good = path.read_bytes()
    idat = good.index(b"IDAT")
    data_length = int.from_bytes(good[idat - 4:idat], "big")
    flipped = bytearray(good)
    flipped[idat + 4 + data_length // 2] ^= 0x10  # inside the compressed pixels
    dataset = FolderDataset(root, "train")
    index = dataset.ids.index("a")
    for damaged, words in ((bytes(flipped), "checksum of its IDAT chunk"), (good[: len(good) * 3 // 4], "truncated"),
                           (good[:-12], "ends before its IEND"), (good[:8], "ends before its IEND"),
                           (good[:8] + good[33:], "not IHDR"), (good[:33] + good[-12:], "no IDAT")):
        path.write_bytes(damaged)
        with raises_naming(str(path), words):
            dataset.verify_image(index)
    path.write_bytes(bytes(flipped))
    with raises_naming(str(path), "checksum"):
        FolderDataset(root, "train").check_pixels()  # the same check (stops at the damaged image)
    path.write_bytes(good + b"trailing bytes")
    dataset.verify_image(index)
    text = b"tEXt" + b"Comment\x00made by a test"
    bad_text = len(text[4:]).to_bytes(4, "big") + text + (zlib.crc32(text) ^ 1).to_bytes(4, "big")
    path.write_bytes(good[:33] + bad_text + good[33:])  # after IHDR: an ancillary chunk, checksum wrong
    dataset.verify_image(index)  # decoders ignore it (libpng warns), and so does the check
    assert cv2.imread(str(path)) is not None
    assert decoded == []
    ok, jpeg = cv2.imencode(".jpg", np.zeros((64, 96, 3), np.uint8))
    path.write_bytes(jpeg.tobytes())  # not PNG bytes: decoded as training would read it
    dataset.verify_image(index)
    assert decoded == [index]


def test_garbage_image(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "images" / "train" / "c.png").write_bytes(b"this is not a png")
    ds = FolderDataset(tmp_path, "train")
    with raises_naming("c.png"):
        ds.read_image(2)
    with raises_naming("c.png"):
        ds.read_label(2)  # the size check reads the image header


def test_fingerprint_is_cached_and_an_edit_of_the_same_size_and_mtime_is_noticed(tmp_path, monkeypatch):
    """A second fingerprint of an unchanged split comes from the cache (a value planted there comes
    back: no file was hashed); a same-size edit with the modification time set back is noticed."""
    import iumask.data.folder as folder

    monkeypatch.setenv("IUMASK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(folder, "RACY_SECONDS", 0.05)
    root = tmp_path / "data"
    make_folder(root)
    path = root / "labels" / "train" / "c.png"
    while time.time_ns() < path.stat().st_ctime_ns + 100_000_000:  # past the racy window
        time.sleep(0.01)
    first = FolderDataset(root, "train").fingerprint()
    (record,) = (tmp_path / "cache" / "fingerprints").glob("*.json")
    planted = dict(json.loads(record.read_text()), fingerprint="f00d")
    record.write_text(json.dumps(planted))
    assert FolderDataset(root, "train").fingerprint() == "f00d"

    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    edited = FolderDataset(root, "train").fingerprint()
    assert edited not in ("f00d", first)
    monkeypatch.setenv("IUMASK_CACHE", str(tmp_path / "empty-cache"))
    assert edited == FolderDataset(root, "train").fingerprint()  # what hashing every byte gives


def test_header_shapes_are_kept_with_the_fingerprint_and_a_changed_file_is_checked_again(tmp_path, monkeypatch):
    """check_headers of an unchanged split comes from the cache (planted shapes come back: no header
    was read) and sits in the same record as the fingerprint; a file replaced by one of another size
    is read and refused again; a missing file is still named."""
    import iumask.data.folder as folder

    monkeypatch.setenv("IUMASK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(folder, "RACY_SECONDS", 0.05)
    root = tmp_path / "data"
    make_folder(root)
    time.sleep(0.1)  # past the racy window
    shapes = FolderDataset(root, "train").check_headers()
    fingerprint = FolderDataset(root, "train").fingerprint()
    (record,) = (tmp_path / "cache" / "fingerprints").glob("*.json")
    kept = json.loads(record.read_text())
    assert kept["image_shapes"] == [list(s) for s in shapes] and kept["fingerprint"] == fingerprint
    record.write_text(json.dumps(dict(kept, image_shapes=[[7, 9]] * len(shapes))))
    dataset = FolderDataset(root, "train")
    assert dataset.check_headers() == [(7, 9)] * len(shapes)
    assert dataset.image_shape(0) == shapes[0]  # a sample's own header is read when it is read

    label = root / "labels" / "train" / "c.png"
    cv2.imwrite(str(label), np.zeros((5, 5), np.uint8))  # another size than its image
    with raises_naming("c.png"):
        FolderDataset(root, "train").check_headers()
    dataset = FolderDataset(root, "train")
    label.unlink()  # gone after the split was listed: the header check names it
    with raises_naming("c.png"):
        dataset.check_headers()


def test_a_split_whose_pixels_passed_is_not_decoded_again_until_a_file_changes(tmp_path, monkeypatch):
    """check_pixels (check-data, training's validation check) keeps its pass with the fingerprint:
    an unchanged split decodes nothing; a record of another check version, or an edited label,
    decodes again, and the edited label is refused."""
    import iumask.data.folder as folder

    monkeypatch.setenv("IUMASK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(folder, "RACY_SECONDS", 0.05)
    root = tmp_path / "data"
    make_folder(root)
    time.sleep(0.1)  # past the racy window
    decoded = []
    read_label = FolderDataset.read_label
    monkeypatch.setattr(FolderDataset, "read_label", lambda self, i: decoded.append(i) or read_label(self, i))
    FolderDataset(root, "train").check_pixels()
    pairs = len(FolderDataset(root, "train"))
    assert sorted(decoded) == list(range(pairs))
    (record,) = (tmp_path / "cache" / "fingerprints").glob("*.json")
    assert json.loads(record.read_text())["pixels_checked"] == folder.PIXEL_CHECK_VERSION
    FolderDataset(root, "train").check_pixels()
    assert len(decoded) == pairs  # nothing decoded
    record.write_text(json.dumps(dict(json.loads(record.read_text()), pixels_checked=0)))
    FolderDataset(root, "train").check_pixels()
    assert len(decoded) == 2 * pairs  # a pass of another check version counts for nothing

    path = root / "labels" / "train" / "c.png"
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    label[0, 0] = 200  # outside the classes
    write_label(path, label)
    with raises_naming("c.png"):
        FolderDataset(root, "train").check_pixels()


def test_fingerprint(tmp_path):
    make_folder(tmp_path)
    first = FolderDataset(tmp_path, "train").fingerprint()
    assert len(first) == 64 and first == FolderDataset(tmp_path, "train").fingerprint()
    path = tmp_path / "labels" / "train" / "c.png"
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    label[5, 5] = (label[5, 5] + 1) % 3
    write_label(path, label)
    changed = FolderDataset(tmp_path, "train").fingerprint()
    assert changed != first
    # Renaming a sample (same bytes) also changes it.
    for kind in ("images", "labels"):
        (tmp_path / kind / "train" / "c.png").rename(tmp_path / kind / "train" / "d.png")
    assert FolderDataset(tmp_path, "train").fingerprint() not in (first, changed)


# ---------------------------------------------------------------- SegmentationDataset


def test_segmentation_dataset_native_size(tmp_path):
    seg = SegmentationDataset(FolderDataset(make_folder(tmp_path), "train"))
    sample = seg[1]
    assert sample["index"] == 1 and "iu" not in sample
    assert sample["image"].shape == (3, 12, 16) and str(sample["image"].dtype) == "torch.float32"
    assert sample["label"].shape == (12, 16) and str(sample["label"].dtype) == "torch.int64"
    # "b" is constant 0: normalised to -mean/std per channel.
    expected = -np.array([0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(sample["image"][:, 0, 0].numpy(), expected, rtol=1e-5)
    assert seg.sample_shape(0) == (12, 16)


def test_segmentation_dataset_resize_keeps_label_set(tmp_path):
    seg = SegmentationDataset(FolderDataset(make_folder(tmp_path), "train"), size=(29, 37))
    sample = seg[0]
    assert sample["image"].shape == (3, 29, 37) and sample["label"].shape == (29, 37)
    assert set(sample["label"].unique().tolist()) <= {0, 1, 2, 255}
    assert seg.sample_shape(0) == (29, 37)


def test_masks_are_returned_and_shape_checked(tmp_path):
    folder = FolderDataset(make_folder(tmp_path), "train")
    seg = SegmentationDataset(folder, size=(6, 8), masks=lambda i: np.full((6, 8), i / 10, np.float32))
    sample = seg[2]
    assert sample["iu"].shape == (6, 8) and str(sample["iu"].dtype) == "torch.float32"
    assert float(sample["iu"][0, 0]) == pytest.approx(0.2)
    wrong = SegmentationDataset(folder, size=(6, 8), masks=lambda i: np.zeros((12, 16), np.float32))
    with pytest.raises(DataError, match="another size") as info:
        wrong[0]
    assert "a.png" in str(info.value)


def test_transform_gets_aligned_arrays(tmp_path):
    folder = FolderDataset(make_folder(tmp_path), "train")
    seen = {}

    def flip(sample, rng):
        seen.update(sample)
        return {k: np.ascontiguousarray(v[:, ::-1]) for k, v in sample.items()}

    masks = lambda i: np.arange(6 * 8, dtype=np.float32).reshape(6, 8)  # noqa: E731
    seg = SegmentationDataset(folder, size=(6, 8), masks=masks, transform=flip)
    sample = seg[0]
    assert set(seen) == {"image", "label", "iu"}
    assert seen["image"].shape == (6, 8, 3) and seen["image"].dtype == np.uint8
    assert seen["label"].shape == (6, 8) and seen["iu"].shape == (6, 8) and seen["iu"].dtype == np.float32
    np.testing.assert_array_equal(sample["label"].numpy(), seen["label"][:, ::-1])
    np.testing.assert_array_equal(sample["iu"].numpy(), seen["iu"][:, ::-1])


# ---------------------------------------------------------------- synthetic generator


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "data", seed=3)


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_is_a_valid_folder_dataset(synthetic_root):
    train, val = FolderDataset(synthetic_root, "train"), FolderDataset(synthetic_root, "val")
    assert (len(train), len(val)) == (48, 16)
    assert train.classes == SYNTHETIC_CLASSES
    assert train.read_image(0).shape == (96, 128, 3) and train.read_label(0).shape == (96, 128)


def test_synthetic_is_deterministic(tmp_path, synthetic_root):
    again = generate_synthetic(tmp_path / "again", seed=3)
    assert all_files(again) == all_files(synthetic_root)
    other = generate_synthetic(tmp_path / "other", num_train=2, num_val=1, seed=4)
    assert all_files(other)["images/train/train_0000.png"] != all_files(synthetic_root)["images/train/train_0000.png"]


def test_synthetic_class_balance(synthetic_root):
    train = FolderDataset(synthetic_root, "train")
    counts = sum(np.bincount(train.read_label(i).ravel(), minlength=256) for i in range(len(train)))
    labelled = counts[:10] / counts[:10].sum()
    assert (labelled > 0).all(), "every class appears in train"
    assert labelled.min() < 0.01, "the rarest class is under 1% like CamVid's"
    assert labelled.max() > 0.15
    assert 0 < counts[255] / counts.sum() < 0.05


def test_shifted_domain_is_darker(tmp_path, synthetic_root):
    shifted = generate_synthetic(tmp_path / "shifted", num_train=8, num_val=1, seed=3, domain="shifted")
    src, dst = FolderDataset(synthetic_root, "train"), FolderDataset(shifted, "train")
    src_mean = np.mean([src.read_image(i).mean() for i in range(8)])
    dst_mean = np.mean([dst.read_image(i).mean() for i in range(8)])
    assert dst_mean < src_mean - 10
    # Same scenes: only appearance changes.
    np.testing.assert_array_equal(dst.read_label(0), src.read_label(0))


def test_regenerate_is_noop_and_other_params_need_overwrite(tmp_path):
    # Other parameters used to replace the dataset silently; now they need --overwrite.
    root = generate_synthetic(tmp_path / "d", num_train=2, num_val=1, seed=1)
    label = root / "labels" / "train" / "train_0000.png"
    original, marker = label.read_bytes(), b"untouched"
    label.write_bytes(marker)  # a no-op must not rewrite existing files
    generate_synthetic(root, num_train=2, num_val=1, seed=1)
    assert label.read_bytes() == marker
    with pytest.raises(IumaskError, match="changed"):  # an edited file is never replaced, even with overwrite
        generate_synthetic(root, num_train=3, num_val=1, seed=1, overwrite=True)
    label.write_bytes(original)
    with pytest.raises(IumaskError, match="--overwrite"):
        generate_synthetic(root, num_train=3, num_val=1, seed=1)
    assert len(FolderDataset(root, "train")) == 2
    generate_synthetic(root, num_train=3, num_val=1, seed=1, overwrite=True)
    assert len(FolderDataset(root, "train")) == 3


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(IumaskError, match=str(tmp_path).replace(".", r"\.")) as info:
        generate_synthetic(tmp_path, num_train=1, num_val=1)
    assert "\n" not in str(info.value) and not (tmp_path / "images").exists()
    generate_synthetic(tmp_path, num_train=1, num_val=1, overwrite=True)
    assert (tmp_path / "mine.txt").read_text() == "precious"
    assert len(FolderDataset(tmp_path, "train")) == 1


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(IumaskError, match="domain"):
        generate_synthetic(tmp_path, domain="night")
    with pytest.raises(IumaskError, match="height"):
        generate_synthetic(tmp_path, height=8)


def test_palette_has_a_colour_for_every_class_beyond_256():
    """300 classes drawn by `iumask stats` and `predict` need 300 colours."""
    pal = ClassInfo(names=tuple(f"c{i}" for i in range(300))).palette()
    assert pal.shape == (300, 3)
    np.testing.assert_array_equal(pal[:255], ClassInfo(names=("a", "b", "c")).palette()[:255])
    # Distinct colours; class 0 (VOC's black) and the ignore index 255 share black.
    assert len({tuple(c) for c in pal}) == 299 and not pal[255].any() and pal[263].any()
