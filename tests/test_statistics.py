"""iumask.dataset_stats and iumask.figures against independent numpy / cv2 computations, on generated data and on real
CamVid labels (3 files of the SegNet 11-class version, 11 = void, at ``<repo>/../shared/data/camvid``
or ``$IUMASK_CAMVID``; those tests are skipped without them), plus the cache, the PNGs and the
``iumask stats`` command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from cli_runner import iumask
from testdata import small_tmpfs

from iumask import dataset_stats as stats_module
from iumask.core import instance_uncertainty
from iumask.data.folder import FolderDataset
from iumask.data.synthetic import generate_synthetic
from iumask.dataset_stats import CACHE_SUBDIR, cached_label_statistics, label_statistics, mask_statistics
from iumask.figures import class_histogram_png, mask_gallery_png
from iumask.store import MaskStore

CAMVID_NAMES = ["sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car", "pedestrian",
                "bicyclist"]
CAMVID_COLORS = [[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
                 [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]]
CAMVID_VOID = 11



# --------------------------------------------------------------------------------------------
# data


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("stats") / "data", num_train=6, num_val=2,
                              height=64, width=64)


def camvid_root() -> Path:
    env = os.environ.get("IUMASK_CAMVID")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


@pytest.fixture(scope="module")
def camvid(tmp_path_factory) -> Path:
    """A generic-format folder made from 3 real CamVid training images and labels (void -> 255)."""
    src = camvid_root()
    labels = sorted((src / "trainannot").glob("*.png")) if (src / "trainannot").is_dir() else []
    if len(labels) < 3:
        pytest.skip(f"CamVid not found under {src} (set IUMASK_CAMVID to the camvid folder)")
    root = tmp_path_factory.mktemp("camvid")
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for k in np.linspace(0, len(labels) - 1, 3).round().astype(int):  # spread over the sequences
        label = cv2.imread(str(labels[k]), cv2.IMREAD_UNCHANGED)
        assert label is not None and label.ndim == 2 and label.max() <= CAMVID_VOID
        label[label == CAMVID_VOID] = 255
        cv2.imwrite(str(root / "labels" / "train" / labels[k].name), label)
        shutil.copy(src / "train" / labels[k].name, root / "images" / "train" / labels[k].name)
    (root / "classes.json").write_text(json.dumps({"names": CAMVID_NAMES, "colors": CAMVID_COLORS,
                                                   "ignore_index": 255}))
    return root


def reference(labels: list[np.ndarray], num_classes: int, ignore: int, connectivity: int) -> dict:
    """Label statistics the plain way: np.bincount and one cv2.connectedComponents per class."""
    pixels = np.zeros(num_classes, dtype=np.int64)
    images = np.zeros(num_classes, dtype=np.int64)
    in_images = np.zeros(num_classes, dtype=np.int64)
    sizes = [[] for _ in range(num_classes)]
    ignored = 0
    for label in labels:
        counts = np.bincount(label[label != ignore].astype(np.int64), minlength=num_classes)
        assert len(counts) == num_classes
        pixels += counts
        images += counts > 0
        in_images += np.where(counts > 0, counts.sum(), 0)
        ignored += int((label == ignore).sum())
        for c in range(num_classes):
            n, _, stats, _ = cv2.connectedComponentsWithStats((label == c).astype(np.uint8), connectivity=connectivity)
            sizes[c] += stats[1:, cv2.CC_STAT_AREA].tolist()
            assert n - 1 == len(stats) - 1
    return {"pixels": pixels, "images": images, "in_images": in_images, "sizes": sizes, "ignored": ignored,
            "total": sum(label.size for label in labels)}


def check_against_reference(stats: dict, ref: dict, num_classes: int) -> None:
    per = stats["per_class"]
    assert per["pixels"] == ref["pixels"].tolist()
    assert per["images"] == ref["images"].tolist()
    assert per["pixels_in_images_containing"] == ref["in_images"].tolist()
    assert stats["total_pixels"] == ref["total"] and stats["ignored_pixels"] == ref["ignored"]
    assert stats["labelled_pixels"] == ref["total"] - ref["ignored"] == sum(per["pixels"])
    np.testing.assert_allclose(per["fraction"], ref["pixels"] / ref["pixels"].sum(), rtol=1e-12)
    bins = stats["instance_size_bins"]
    assert bins == [1 << k for k in range(len(bins))]
    for c in range(num_classes):
        s = np.array(ref["sizes"][c])
        assert per["instances"][c] == len(s)
        hist = np.zeros(len(bins), dtype=int)
        for v in s.tolist():
            hist[int(v).bit_length() - 1] += 1  # bin k: 2^k <= size < 2^(k+1)
        assert per["instance_size_histogram"][c] == hist.tolist()
        if len(s):
            assert per["instance_size_mean"][c] == pytest.approx(s.mean())
            assert per["instance_size_median"][c] == pytest.approx(np.median(s))
            assert (per["instance_size_min"][c], per["instance_size_max"][c]) == (s.min(), s.max())
        else:
            assert per["instance_size_mean"][c] is None and per["instance_size_max"][c] is None


def labels_of(ds: FolderDataset) -> list[np.ndarray]:
    # Read independently of FolderDataset.read_label.
    return [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in ds.label_paths]


# --------------------------------------------------------------------------------------------
# label statistics


@pytest.mark.parametrize("connectivity", [8, 4])
def test_label_statistics_synthetic(synthetic, connectivity):
    ds = FolderDataset(synthetic, "train")
    stats = label_statistics(ds, connectivity=connectivity)
    json.dumps(stats, allow_nan=False)  # JSON-able as it is
    assert stats["num_images"] == 6 and stats["class_names"] == list(ds.classes.names)
    ref = reference(labels_of(ds), ds.classes.num_classes, 255, connectivity)
    assert ref["ignored"] > 0  # the generated data has ignored pixels
    check_against_reference(stats, ref, ds.classes.num_classes)


def test_label_statistics_camvid(camvid):
    ds = FolderDataset(camvid, "train")
    stats = label_statistics(ds)
    labels = labels_of(ds)
    assert labels[0].shape == (360, 480)
    ref = reference(labels, 11, 255, 8)
    check_against_reference(stats, ref, 11)
    assert sum(stats["per_class"]["instances"]) > 30  # real labels have many small pieces
    np.testing.assert_array_equal(stats["per_class"]["total_pixels_in_images_containing"],
                                  np.where(ref["images"] > 0, ref["images"] * 360 * 480, 0))


def test_label_statistics_resized(synthetic):
    ds = FolderDataset(synthetic, "train")
    stats = label_statistics(ds, size=(40, 24))
    labels = [cv2.resize(label, (24, 40), interpolation=cv2.INTER_NEAREST_EXACT) for label in labels_of(ds)]
    check_against_reference(stats, reference(labels, 10, 255, 8), 10)
    assert stats["size"] == [40, 24] and stats["total_pixels"] == 6 * 40 * 24


# --------------------------------------------------------------------------------------------
# cache


def test_cache_reused_and_invalidated(synthetic, tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(synthetic, root)
    calls = []
    compute = label_statistics
    monkeypatch.setattr(stats_module, "label_statistics", lambda *a, **k: calls.append(1) or compute(*a, **k))
    cache = tmp_path / "cache"

    first = cached_label_statistics(FolderDataset(root, "train"), cache)
    files = list((cache / CACHE_SUBDIR).glob("*.json"))
    assert len(calls) == 1 and len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    assert cached_label_statistics(FolderDataset(root, "train"), cache) == first
    assert len(calls) == 1 and files[0].stat().st_mtime_ns == mtime  # reused, not rewritten

    # Other options are another entry; the first stays valid.
    cached_label_statistics(FolderDataset(root, "train"), cache, connectivity=4)
    assert len(calls) == 2
    cached_label_statistics(FolderDataset(root, "train"), cache)
    assert len(calls) == 2

    # Changing a label invalidates it.
    ds = FolderDataset(root, "train")
    label = cv2.imread(str(ds.label_paths[0]), cv2.IMREAD_UNCHANGED)
    label[:8, :8] = 9  # a car block in the corner
    cv2.imwrite(str(ds.label_paths[0]), label)
    changed = cached_label_statistics(FolderDataset(root, "train"), cache)
    assert len(calls) == 3 and changed != first
    check_against_reference(changed, reference(labels_of(ds), 10, 255, 8), 10)

    # A corrupt entry is recomputed; refresh recomputes.
    for f in (cache / CACHE_SUBDIR).glob("*.json"):
        f.write_text("{not json")
    assert cached_label_statistics(FolderDataset(root, "train"), cache) == changed
    assert len(calls) == 4
    cached_label_statistics(FolderDataset(root, "train"), cache, refresh=True)
    assert len(calls) == 5


def test_cache_location_and_unwritable(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("IUMASK_CACHE", str(tmp_path / "env-cache"))
    ds = FolderDataset(synthetic, "val")
    stats = cached_label_statistics(ds)
    assert len(list((tmp_path / "env-cache" / CACHE_SUBDIR).glob("*.json"))) == 1
    # A cache folder that cannot be made only costs a warning.
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cached_label_statistics(ds, blocker / "sub") == stats


# --------------------------------------------------------------------------------------------
# class histogram


@pytest.mark.parametrize("log_scale", [True, False])
def test_class_histogram_png(synthetic, tmp_path, log_scale):
    ds = FolderDataset(synthetic, "train")
    stats = label_statistics(ds)
    path = class_histogram_png(stats, ds.classes, tmp_path / "sub" / "hist.png", log_scale=log_scale)
    img = cv2.imread(str(path))
    assert img is not None and img.ndim == 3
    assert 360 <= img.shape[1] <= 2000 and 300 <= img.shape[0] <= 1000
    # Every class has a bar in its colour (BGR), largest count first.
    centres = []
    for c in range(10):
        r, g, b = ds.classes.colors[c]
        ys, xs = np.nonzero(np.all(img == (b, g, r), axis=2))
        assert len(xs) > (100 if log_scale else 20), ds.classes.names[c]
        centres.append(xs.mean())
    assert np.argsort(centres).tolist() == np.argsort(-np.array(stats["per_class"]["pixels"]), kind="stable").tolist()


def test_class_histogram_png_camvid(camvid, tmp_path):
    ds = FolderDataset(camvid, "train")
    path = class_histogram_png(label_statistics(ds), ds.classes, tmp_path / "hist.png")
    img = cv2.imread(str(path))
    assert img is not None and img.shape[1] >= 11 * 34


# --------------------------------------------------------------------------------------------
# mask store


def make_store(path: Path, ds: FolderDataset, seed: int = 0) -> MaskStore:
    identity = {
        "image_ids": ds.ids, "image_shapes": [list(ds.image_shape(i)) for i in range(len(ds))],
        "class_names": list(ds.classes.names),
        "options": {"connectivity": 8, "instances_from": "prediction", "normalize": False, "image_size": None,
                    "split": ds.split, "ignore_index": ds.classes.ignore_index},
        "member_sha256": {"m": "0" * 64}, "dataset_fingerprint": ds.fingerprint(),
    }
    store = MaskStore.create(path, identity)
    rng = np.random.default_rng(seed)
    n = ds.classes.num_classes
    for i in range(len(ds)):
        label = ds.read_label(i)
        pred = np.where(label >= n, 0, label).astype(np.uint8)
        noise = rng.random(label.shape) < 0.1
        pred[noise] = rng.integers(0, n, int(noise.sum()))
        entropy = (rng.random(label.shape) * np.log(n)).astype(np.float32)
        store.write(i, entropy, instance_uncertainty(pred, entropy, n), pred)
    store.set_attrs(finished=True)
    return store


def test_mask_statistics(synthetic, tmp_path):
    ds = FolderDataset(synthetic, "train")
    store = make_store(tmp_path / "masks.zarr", ds)
    stats = mask_statistics(MaskStore.open(tmp_path / "masks.zarr"))
    json.dumps(stats, allow_nan=False)
    arrays = [store.read(i) for i in range(store.num_images)]
    pred = np.concatenate([a["prediction"].ravel() for a in arrays])
    iu = np.concatenate([a["instance_uncertainty"].ravel() for a in arrays]).astype(np.float64)
    entropy = np.concatenate([a["entropy"].ravel() for a in arrays]).astype(np.float64)
    per = stats["per_class"]
    for c in range(10):
        sel = pred == c
        assert per["pixels"][c] == sel.sum() > 0
        assert per["mean_iu"][c] == pytest.approx(iu[sel].mean(), rel=1e-9)
        assert per["mean_entropy"][c] == pytest.approx(entropy[sel].mean(), rel=1e-9)
    assert stats["mean_iu"] == pytest.approx(iu.mean(), rel=1e-9)
    assert stats["mean_entropy"] == pytest.approx(entropy.mean(), rel=1e-9)
    assert stats["max_entropy"] == pytest.approx(entropy.max())


def test_mask_statistics_class_never_predicted(synthetic, tmp_path):
    ds = FolderDataset(synthetic, "val")
    identity = {"image_ids": ds.ids, "image_shapes": [[8, 8]] * len(ds), "class_names": ["a", "b", "c"],
                "options": {}, "member_sha256": {}, "dataset_fingerprint": "x"}
    store = MaskStore.create(tmp_path / "m.zarr", identity)
    for i in range(len(ds)):
        pred = np.zeros((8, 8), np.uint8)
        pred[:, 4:] = 2
        store.write(i, np.full((8, 8), 0.5), np.where(pred == 2, 1.0, 0.25), pred)
    per = mask_statistics(store)["per_class"]
    assert per["mean_iu"] == [0.25, None, 1.0] and per["mean_entropy"] == [0.5, None, 0.5]


def test_mask_gallery_png(synthetic, tmp_path):
    ds = FolderDataset(synthetic, "train")
    store = make_store(tmp_path / "masks.zarr", ds)
    path = mask_gallery_png(ds, store, tmp_path / "g.png", count=3)
    img = cv2.imread(str(path))
    assert img is not None
    assert img.shape[1] == 6 + 4 * (256 + 6)  # image, label, entropy, IU tiles of 256 px
    assert 3 * 256 < img.shape[0] < 3 * 256 + 300
    small = cv2.imread(str(mask_gallery_png(ds, store, tmp_path / "s.png", count=10, size=(40, 50))))
    assert small.shape[1] == 6 + 4 * (50 + 6) and small.shape[0] > 6 * 40


def _malformed(record: dict) -> list[tuple[str, dict]]:
    """Records of the right key (the cache file's own name) that are not what the code wrote."""
    def edited(change) -> dict:
        copy = json.loads(json.dumps(record))
        change(copy)
        return copy
    per_class = lambda r: r["stats"]["per_class"]  # noqa: E731
    return [
        ("empty stats", edited(lambda r: r.update(stats={}))),
        ("stats a list", edited(lambda r: r.update(stats=[]))),
        ("pixels a string", edited(lambda r: per_class(r).update(pixels="12"))),
        ("pixels one class short", edited(lambda r: per_class(r)["pixels"].pop())),
        ("a count a float", edited(lambda r: per_class(r)["images"].__setitem__(0, 1.5))),
        ("total_pixels_in_images_containing missing", edited(lambda r: per_class(r).pop(
            "total_pixels_in_images_containing"))),
        ("per_class null", edited(lambda r: r["stats"].update(per_class=None))),
        ("histogram rows short", edited(lambda r: per_class(r)["instance_size_histogram"][0].pop())),
        ("num_images a string", edited(lambda r: r["stats"].update(num_images="4"))),
        ("a size mean a string", edited(lambda r: per_class(r)["instance_size_mean"].__setitem__(0, "x"))),
        ("class names of other classes", edited(lambda r: r["stats"]["class_names"].reverse())),
        ("an extra field", edited(lambda r: r.update(extra=1))),
    ]


def test_a_cache_record_not_as_written_is_a_miss(synthetic, tmp_path, monkeypatch, capsys):
    """A record with the right key but a wrong shape (an empty ``stats``, a field of the wrong type or
    length) was returned as it was and crashed ``iumask stats`` (and class weights in training) with a
    traceback; now it is recomputed and rewritten."""
    monkeypatch.setenv("IUMASK_CACHE", str(tmp_path / "cache"))
    iumask("stats", "--data", synthetic, "--out", tmp_path / "first")
    expected = json.loads((tmp_path / "first" / "stats.json").read_text())["labels"]
    (entry,) = (tmp_path / "cache" / CACHE_SUBDIR).glob("*.json")
    good = json.loads(entry.read_text())
    assert good["stats"] == expected
    for what, record in _malformed(good):
        entry.write_text(json.dumps(record))
        capsys.readouterr()
        iumask("stats", "--data", synthetic, "--out", tmp_path / "again")
        assert "Traceback" not in capsys.readouterr().err, what
        assert json.loads((tmp_path / "again" / "stats.json").read_text())["labels"] == expected, what
        assert json.loads(entry.read_text()) == good, what  # rewritten as the code writes it
    assert stats_module.is_statistics_record(good, good["key"], FolderDataset(synthetic, "train").classes)


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_stats(synthetic, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IUMASK_CACHE", str(tmp_path / "cache"))
    ds = FolderDataset(synthetic, "train")
    make_store(tmp_path / "masks.zarr", ds)

    iumask("stats", "--data", synthetic, "--out", tmp_path / "plain")
    out = json.loads((tmp_path / "plain" / "stats.json").read_text())
    assert out["masks"] is None and out["dataset"]["split"] == "train"
    assert out["labels"] == label_statistics(ds)
    assert cv2.imread(str(tmp_path / "plain" / "class_histogram.png")) is not None
    assert not (tmp_path / "plain" / "masks.png").exists()
    assert "sidewalk" in capsys.readouterr().out  # the table

    iumask("stats", "--data", synthetic, "--store", tmp_path / "masks.zarr", "--out", tmp_path / "full",
           "--connectivity", "4")
    out = json.loads((tmp_path / "full" / "stats.json").read_text())
    assert out["labels"]["connectivity"] == 4
    assert out["masks"]["per_class"] == mask_statistics(MaskStore.open(tmp_path / "masks.zarr"))["per_class"]
    for name in ("class_histogram.png", "masks.png"):
        assert cv2.imread(str(tmp_path / "full" / name)) is not None
    assert "mean IU" in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / CACHE_SUBDIR).glob("*.json"))) == 2  # connectivity 8 and 4

    # A store of another split (other images, other fingerprint) is refused.
    capsys.readouterr()
    iumask("stats", "--data", synthetic, "--split", "val", "--store", tmp_path / "masks.zarr",
           "--out", tmp_path / "val", expect=2)
    assert "run iumask make-masks on this dataset" in capsys.readouterr().err
    assert not (tmp_path / "val" / "stats.json").exists()
    iumask("stats", "--data", synthetic, "--store", tmp_path / "missing.zarr", "--out", tmp_path / "x", expect=2)


def test_cache_entry_and_stats_json_follow_the_umask(synthetic, tmp_path, monkeypatch):
    """Like every file iumask writes, the cache entry and stats.json get the permissions the user's
    umask gives new files (mkstemp alone makes them private, 0600)."""
    monkeypatch.setenv("IUMASK_CACHE", str(tmp_path / "cache"))
    old = os.umask(0o022)
    try:
        iumask("stats", "--data", synthetic, "--split", "val", "--out", tmp_path / "out")
        os.umask(0o007)
        cached_label_statistics(FolderDataset(synthetic, "val"), tmp_path / "cache2")
    finally:
        os.umask(old)
    entries = list((tmp_path / "cache" / CACHE_SUBDIR).iterdir())
    assert [p.suffix for p in entries] == [".json"]  # no temporary file left
    assert oct(entries[0].stat().st_mode & 0o777) == oct(0o644)
    for name in ("stats.json", "class_histogram.png"):
        assert oct((tmp_path / "out" / name).stat().st_mode & 0o777) == oct(0o644), name
    (entry,) = (tmp_path / "cache2" / CACHE_SUBDIR).iterdir()
    assert oct(entry.stat().st_mode & 0o777) == oct(0o660)


@pytest.mark.parametrize("full_at", ["class_histogram.png", "masks.png"])
def test_cli_stats_on_a_full_disk_leaves_no_truncated_png(synthetic, tmp_path, monkeypatch, capsys, full_at):
    """`iumask stats` into a real size-limited tmpfs that fills up while a PNG is written: a one-line
    error naming that PNG, no truncated PNG and no temporary file left; the files written before
    it are complete."""
    monkeypatch.setenv("IUMASK_CACHE", str(tmp_path / "cache"))
    make_store(tmp_path / "masks.zarr", FolderDataset(synthetic, "train"))
    args = ("--data", synthetic, "--store", tmp_path / "masks.zarr")
    iumask("stats", *args, "--out", tmp_path / "ref")
    order = ("stats.json", "class_histogram.png", "masks.png")
    sizes = {name: (tmp_path / "ref" / name).stat().st_size for name in order}
    page = 4096
    before = order[:order.index(full_at)]
    room = sum(-(-sizes[name] // page) * page for name in before) + page  # the earlier files and one page
    assert sizes[full_at] > 2 * page
    with small_tmpfs(tmp_path / "small") as target:
        out = target / "stats"
        out.mkdir()
        vfs = os.statvfs(target)
        (target / "filler").write_bytes(b"\0" * max(vfs.f_bavail * vfs.f_frsize - room, 0))
        capsys.readouterr()
        iumask("stats", *args, "--out", out, expect=2)
        err = capsys.readouterr().err
        assert "Traceback" not in err
        line = err[err.rindex("error:"):].strip()
        assert "\n" not in line and str(out / full_at) in line and "No space left on device" in line
        assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no truncated PNG, no *.tmp
        for name in before:
            if name.endswith(".png"):
                assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
            else:
                assert json.loads((out / name).read_text()) == json.loads((tmp_path / "ref" / name).read_text())
        # No file left open either (an open, unlinked temporary file would keep the disk full).
        assert subprocess.run(["umount", str(target)], capture_output=True).returncode == 0


def test_reliability_diagram_shows_the_share_of_pixels_on_its_own_axis(tmp_path):
    """The share-of-pixels bars (grey) lie below the accuracy axis, not hidden behind its bars."""
    from iumask.figures import reliability_png

    bins = {"edges": np.linspace(0, 1, 11).tolist(), "pixels": [0, 0, 1, 5, 10, 20, 40, 80, 200, 900],
            "accuracy": [None, None, .2, .3, .45, .5, .6, .7, .85, .97]}
    image = cv2.imread(str(reliability_png(tmp_path / "r.png", [("a", bins)], "t")))
    grey = np.all(image == 0x6E, axis=2)  # _GREY, #6e6e6e
    rows = np.nonzero(grey.sum(axis=1) >= 5)[0]  # bar rows (not a stray anti-aliased text pixel)
    assert rows.size and rows.min() > image.shape[0] * 0.7  # only in the bottom axis
    blue = np.all(image == (0xB0, 0x72, 0x4C), axis=2)  # accuracy bars, #4c72b0 (BGR)
    assert np.nonzero(blue.sum(axis=1) >= 5)[0].max() < rows.min()


def test_reliability_diagrams_of_many_arms_wrap_into_rows(tmp_path):
    """Nine arms: two rows of at most five panels (not one row nine panels wide), each panel's share
    of pixels below its own accuracy bars."""
    from iumask.figures import RELIABILITY_COLUMNS, reliability_png

    bins = {"edges": np.linspace(0, 1, 11).tolist(), "pixels": [0, 0, 1, 5, 10, 20, 40, 80, 200, 900],
            "accuracy": [None, None, .2, .3, .45, .5, .6, .7, .85, .97]}
    one = cv2.imread(str(reliability_png(tmp_path / "one.png", [("a", bins)], "t")))
    nine = cv2.imread(str(reliability_png(tmp_path / "nine.png", [(f"arm{i}", bins) for i in range(9)], "t")))
    assert RELIABILITY_COLUMNS == 5
    assert nine.shape[1] < 5.5 * one.shape[1] and nine.shape[0] > 1.8 * one.shape[0]
    grey = np.all(nine == 0x6E, axis=2)
    blue = np.all(nine == (0xB0, 0x72, 0x4C), axis=2)
    half = nine.shape[0] // 2
    for top, bottom in ((0, half), (half, nine.shape[0])):  # each row of panels: accuracy above share
        grey_rows = np.nonzero(grey[top:bottom].sum(axis=1) >= 5)[0]
        blue_rows = np.nonzero(blue[top:bottom].sum(axis=1) >= 5)[0]
        assert grey_rows.size and blue_rows.size and blue_rows.max() < grey_rows.min()
    # the fifth place of the second row is empty: no bars there
    width = nine.shape[1] / 5
    assert not blue[half:, int(4.2 * width):].any()
