"""``iumask predict``: a small trained model applied to unlabeled images (real CamVid test images when
present, generated images always) writes every output at the image's own size, with labels that
read back through the folder format and equal an independent prediction; a corrupt input is skipped
with a clear message and exit code 2; the heat maps are on the fixed scale [0, ln C]; a rerun skips
finished images, predicts again an image that lost one of its outputs, and --overwrite redoes them."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runner import iumask
from PIL import Image
from testdata import camvid_root

from iumask.data.folder import IMAGENET_MEAN, IMAGENET_STD, ClassInfo, PairedDataset, read_rgb
from iumask.models import load_member, predict_logits
from iumask.stages.predict import OUTPUT_KINDS, find_inputs, heat_map, output_paths
from iumask.store import MaskStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

MODEL_SIZE = (48, 64)  # trained at a reduced size: predictions are upsampled to each image's size


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_synthetic):
    data = make_synthetic("predict", height=64, width=64)
    out = tmp_path_factory.mktemp("predict-model") / "baseline"
    iumask("train-baseline", "--data", data, "--out", out, "--encoder", "mobilenet_v2", "--epochs", "1",
           "--batch-size", "2", "--lr", "5e-2", "--backbone-lr-factor", "1", "--device", "cpu", "--no-augment",
           "--size", f"{MODEL_SIZE[0]}x{MODEL_SIZE[1]}")
    return out / "mobilenet_v2"


def reference_labels(model_dir: Path, image_path: Path) -> np.ndarray:
    """Independently: the image normalised, resized to the training size, logits upsampled, argmax."""
    model, _ = load_member(model_dir)
    rgb = read_rgb(image_path)
    image = (rgb.astype(np.float32) / 255 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    image = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        small = F.interpolate(image, size=MODEL_SIZE, mode="bilinear", align_corners=False)
        logits = F.interpolate(predict_logits(model, small), size=rgb.shape[:2], mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].numpy()


def outputs(out: Path, rel: str) -> dict[str, Path]:
    stem = Path(rel).with_suffix("")
    return {kind: out / kind / f"{stem}.{'jpg' if kind == 'overlay' else 'png'}" for kind in OUTPUT_KINDS}


def magma(values: np.ndarray, top: float) -> np.ndarray:
    """Independently of ``heat_map``: ``values`` on the scale [0, ``top``] through matplotlib's magma, RGB as int."""
    return (np.asarray(matplotlib.colormaps["magma"](np.clip(values / top, 0, 1)))[..., :3] * 255).round().astype(int)


def stamps(files) -> dict[Path, tuple[int, int]]:
    return {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}


def check_predict(model_dir: Path, images: list[Path], work: Path, shapes: list[tuple[int, int]], capsys,
                  save_arrays: bool = False) -> None:
    """Predict ``images`` (the last one in a subfolder) plus two corrupt files and check everything."""
    inputs = work / "in"
    (inputs / "sub").mkdir(parents=True)
    rels = [f"img{k}{p.suffix}" for k, p in enumerate(images[:-1])] + [f"sub/last{images[-1].suffix}"]
    for rel, path in zip(rels, images):
        shutil.copy(path, inputs / rel)
    (inputs / "truncated.png").write_bytes(images[0].read_bytes()[:2000])  # header intact, pixels cut
    (inputs / "garbage.jpg").write_bytes(b"not an image at all" * 10)
    out = work / "out"
    extra = ["--save-arrays"] if save_arrays else []
    args = ["predict", "--model", model_dir, "--input", inputs, "--out", out, "--device", "cpu", "--batch-size", "2",
            *extra]

    capsys.readouterr()
    iumask(*args, expect=2)
    err = " ".join(capsys.readouterr().err.split())
    for name in ("truncated.png", "garbage.jpg"):
        assert f"skipped {inputs / name}" in err
    assert "2 input(s) could not be read and were skipped" in err
    assert "3 predicted" in err and "images/s" in err

    classes = ClassInfo.from_dict(json.loads((model_dir / "manifest.json").read_text())["classes"])
    num_classes = classes.num_classes
    for rel, shape in zip(rels, shapes):
        files = outputs(out, rel)
        assert all(f.is_file() for f in files.values()), files
        for kind in ("color", "overlay", "entropy", "iu"):
            picture = np.asarray(Image.open(files[kind]))
            assert picture.shape == (*shape, 3) and picture.dtype == np.uint8, (kind, picture.shape)
        assert Image.open(files["entropy"]).mode == "RGB"
    for kind in OUTPUT_KINDS:  # nothing written for the corrupt inputs
        assert not list((out / kind).glob("truncated*")) and not list((out / kind).glob("garbage*"))

    # The label PNGs read back through the folder format's label reader, and equal the argmax of an
    # independent run of the model.
    folder = PairedDataset(inputs, "in", classes, rels, [inputs / r for r in rels],
                           [outputs(out, r)["labels"] for r in rels])
    for k, (rel, shape) in enumerate(zip(rels, shapes)):
        labels = folder.read_label(k)
        assert labels.shape == shape and labels.dtype == np.uint8 and labels.max() < num_classes
        expected = reference_labels(model_dir, inputs / rel)
        assert (labels != expected).mean() < 1e-3  # batched vs single-image CPU convolutions: ties only
        color = np.asarray(Image.open(outputs(out, rel)["color"]))
        np.testing.assert_array_equal(color, classes.palette()[labels])
        if save_arrays:
            store = MaskStore.open(out / "arrays.zarr")
            index = store.index_of(Path(rel).as_posix())
            arrays = store.read(index)
            np.testing.assert_array_equal(arrays["prediction"], labels)
            assert 0 <= arrays["entropy"].min() and arrays["entropy"].max() <= math.log(num_classes) + 1e-2
            heat = np.asarray(Image.open(outputs(out, rel)["iu"]))
            expected_heat = heat_map(arrays["instance_uncertainty"], math.log(num_classes))
            assert np.abs(heat.astype(int) - expected_heat.astype(int)).max() <= 8  # float16 store
            # The entropy image: the stored entropy on the fixed scale [0, ln C] (colours comparable
            # across images), not on the image's own range, which a confident image would stretch.
            entropy, top = arrays["entropy"].astype(np.float64), math.log(num_classes)
            heat = np.asarray(Image.open(outputs(out, rel)["entropy"])).astype(int)
            off = int(np.abs(heat - magma(entropy, top)).max())
            assert off <= 8, f"entropy image not on the fixed [0, ln C] scale (colours off by up to {off})"
            assert np.abs(magma(entropy, entropy.max()) - magma(entropy, top)).max() > 8  # the scales differ here

    # A rerun skips the finished images (files untouched) and still reports the corrupt ones.
    written = [f for rel in rels for f in outputs(out, rel).values()]
    before = stamps(written)
    iumask(*args, expect=2)
    err = " ".join(capsys.readouterr().err.split())
    assert "0 predicted, 3 already done (skipped)" in err
    assert stamps(written) == before

    # An image with one output missing (deleted here) is not done: a rerun predicts it again and
    # writes the file back; the other images are skipped (files untouched).
    missing = outputs(out, rels[0])["iu"]
    missing.unlink()
    iumask(*args, expect=2)
    err = " ".join(capsys.readouterr().err.split())
    assert missing.is_file(), "an image with a missing output was skipped as done"
    assert "1 predicted, 2 already done (skipped)" in err
    others = [f for rel in rels[1:] for f in outputs(out, rel).values()]
    assert stamps(others) == {f: before[f] for f in others}
    before = stamps(written)

    # With the corrupt files gone and --overwrite, every image is predicted again: exit 0.
    (inputs / "truncated.png").unlink()
    (inputs / "garbage.jpg").unlink()
    iumask(*args, "--overwrite")
    assert "3 predicted" in " ".join(capsys.readouterr().err.split())
    after = stamps(written)
    assert all(after[f] != before[f] for f in written)


def test_predict_camvid_test_images(model_dir, tmp_path, capsys):
    test = camvid_root() / "test"
    images = sorted(test.glob("*.png"))[:3] if test.is_dir() else []
    if len(images) < 3:
        pytest.skip(f"CamVid test images not found under {test} (set IUMASK_CAMVID to the camvid folder)")
    check_predict(model_dir, images, tmp_path, [(360, 480)] * 3, capsys)


def test_predict_generated_images_of_several_sizes(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    shapes = [(72, 96), (72, 96), (50, 70)]  # two sizes: batched by shape
    images = []
    for k, (h, w) in enumerate(shapes):
        path = tmp_path / f"gen{k}.{'jpg' if k == 1 else 'png'}"
        picture = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (7, 7), 0)
        cv2.imwrite(str(path), picture)
        images.append(path)
    check_predict(model_dir, images, tmp_path / "work", shapes, capsys, save_arrays=True)


def test_find_inputs_folder_glob_and_file(tmp_path, cli):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.png", "a/b/y.JPG", "a/b/z.tif", "a/notes.txt", "a/.hidden.png"):
        (tmp_path / name).write_bytes(b"")
    rels = sorted(rel.as_posix() for _, rel in find_inputs(tmp_path / "a"))
    assert rels == ["b/y.JPG", "b/z.tif", "x.png"]
    assert [rel.as_posix() for _, rel in find_inputs(f"{tmp_path}/a/**/*.tif")] == ["b/z.tif"]
    assert [rel.as_posix() for _, rel in find_inputs(tmp_path / "a" / "x.png")] == ["x.png"]
    (tmp_path / "a" / "x.jpg").write_bytes(b"")
    with pytest.raises(Exception, match="would write the same outputs"):
        find_inputs(tmp_path / "a")
    with pytest.raises(Exception, match="no such file or folder"):
        find_inputs(tmp_path / "missing")


def test_predict_store_messages_name_predicts_own_options(model_dir, tmp_path, capsys):
    """predict --save-arrays writes its store inside --out, and its --overwrite predicts every image
    again: the store's refusals say so, not make-masks' --store."""
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    cv2.imwrite(str(image), np.full((40, 56, 3), 120, np.uint8))
    out = tmp_path / "out"
    args = ["predict", "--model", model_dir, "--input", image.parent, "--out", out, "--device", "cpu", "--save-arrays"]
    iumask(*args)
    cv2.imwrite(str(image.parent / "b.png"), np.full((40, 56, 3), 90, np.uint8))
    capsys.readouterr()
    iumask(*args, expect=2)  # the same model and options, but the store holds other images
    err = " ".join(capsys.readouterr().err.split())
    assert "--overwrite to predict every image again or use another --out folder" in err and "--store" not in err
    (out / "arrays.zarr" / "zarr.json").write_text("{not json")
    iumask(*args, expect=2)  # an unreadable store
    err = " ".join(capsys.readouterr().err.split())
    assert "rerun iumask predict with --save-arrays --overwrite" in err and "--store" not in err


def test_outputs_of_other_options_are_refused_never_skipped(model_dir, tmp_path, capsys):
    """A rerun skips an image only when its files were written for this model and these options
    (OUT/prediction.json): other options are refused, --overwrite predicts every image again, and
    an interrupted replacement resumes with only the files written after it started."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in range(2):
        cv2.imwrite(str(inputs / f"{k}.png"), np.full((40, 56, 3), 60 + 40 * k, np.uint8))
    out = tmp_path / "out"
    args = ["predict", "--model", model_dir, "--input", inputs, "--out", out, "--device", "cpu"]

    def summary() -> str:
        return " ".join(capsys.readouterr().err.split())

    iumask(*args, "--connectivity", "8")
    assert "2 predicted" in summary()
    iumask(*args, "--connectivity", "8")
    assert "0 predicted, 2 already done" in summary()
    iumask(*args, "--connectivity", "4", expect=2)
    err = summary()
    assert "options.connectivity: stored 8, given 4" in err and "--overwrite" in err
    iumask(*args, "--connectivity", "4", "--overwrite")
    assert "2 predicted" in summary()
    record = json.loads((out / "prediction.json").read_text())
    assert record["finished"] and record["identity"]["options"]["connectivity"] == 4

    assert record["trusted_after_ns"] is None  # finished: every file is this identity's

    # The state a replacement killed after its first image leaves: image 1's files are the new
    # model's (written after the record's reference time), image 0's the old model's (before it).
    # The rerun predicts image 0 only.
    reference = (out / "prediction.json").stat().st_mtime_ns - 60 * 10**9  # a minute ago; files only move back
    for file in output_paths(out, Path("0.png")).values():
        os.utime(file, ns=(reference - 10**10, reference - 10**10))
    for file in output_paths(out, Path("1.png")).values():
        os.utime(file, ns=(reference + 10**10, reference + 10**10))
    (out / "prediction.json").write_text(json.dumps(dict(record, finished=False, trusted_after_ns=reference)))
    iumask(*args, "--connectivity", "4")
    assert "1 predicted, 1 already done" in summary()
    assert json.loads((out / "prediction.json").read_text())["finished"]
    iumask(*args, "--connectivity", "4", "--overwrite")  # a replacement of the same identity: all again
    assert "2 predicted" in summary()

    (out / "prediction.json").unlink()  # a folder written before the record existed
    iumask(*args, "--connectivity", "4", expect=2)
    assert "no prediction.json naming the model" in summary()
