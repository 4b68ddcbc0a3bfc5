"""Bad input found before the work it would spoil, as one line naming the file or option and the
fix: an oversized PAvPU window, an --output that is not a results file, a corrupt image met in a
DataLoader worker, a truncated validation image or an out-of-range validation label (found before
training, leaving no empty member folder), a dry run that accepts what the run refuses, class
lists of hundreds of names, config values reported as written, output folders created only for
usable models, and labels that are all ignored.

Models are tiny (one MobileNetV2 member, 1 epoch, 32x32 synthetic images)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from assertions import error_line
from cli_runner import TINY_TRAIN as TRAIN
from cli_runner import iumask

from iumask.core import SegmentationMetrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]



@pytest.fixture(scope="module")
def trained(tiny_baseline, tmp_path_factory):
    """A copy of the tiny synthetic dataset and its one-member baseline."""
    return tiny_baseline(tmp_path_factory.mktemp("input-errors"))




def truncate_pixels(image: Path) -> None:
    """Keep the PNG header (so header checks pass) and cut the pixel data."""
    raw = image.read_bytes()
    image.write_bytes(raw[: len(raw) // 2])


def copy_data(data: Path, tmp_path: Path) -> Path:
    return shutil.copytree(data, tmp_path / "data")


# ----------------------------------------------------------------------------- PAvPU window


def test_pavpu_window_larger_than_every_image_is_refused_before_any_work(trained, tmp_path, capsys):
    data, model = trained
    capsys.readouterr()
    iumask("evaluate", "--model", model, "--data", data, "--output", tmp_path / "r.json", "--device", "cpu",
           "--pavpu-window", "64", expect=2)
    line = error_line(capsys)
    assert "--pavpu-window 64" in line and "at most 32" in line
    assert "evaluate" not in capsys.readouterr().err and not tmp_path.joinpath("r.json").exists()


def test_images_smaller_than_the_pavpu_window_score_no_patch():
    """As documented, patches that would overhang an edge are left out: an image smaller than the
    window adds no patch (and does not crash); IoU still counts its pixels."""
    rng = np.random.default_rng(0)
    big = [torch.from_numpy(rng.integers(0, 3, (1, 16, 16))) for _ in range(2)]
    small = [torch.from_numpy(rng.integers(0, 3, (1, 5, 7))) for _ in range(2)]
    entropy_big, entropy_small = torch.rand(1, 16, 16), torch.rand(1, 5, 7)
    both = SegmentationMetrics(3, pavpu_window=8, pavpu_threshold=0.5)
    both.update(*big, entropy_big)
    both.update(*small, entropy_small)
    alone = SegmentationMetrics(3, pavpu_window=8, pavpu_threshold=0.5)
    alone.update(*big, entropy_big)
    assert both.compute()["pavpu_counts"] == alone.compute()["pavpu_counts"]
    assert sum(alone.compute()["pavpu_counts"].values()) == 4
    assert int(both.confusion.sum()) == 16 * 16 + 5 * 7


# ----------------------------------------------------------------------------- --output


@pytest.mark.parametrize("content", ["[1, 2]", '"str"', '{"results": [1]}', '{"results": "x"}', "not json {"])
def test_output_that_is_not_a_results_file_is_one_line_before_any_work(trained, tmp_path, capsys, content):
    """Valid JSON that is not a results object, or no JSON at all: the same error and advice, the
    file untouched, nothing evaluated."""
    data, model = trained
    output = tmp_path / "r.json"
    output.write_text(content)
    capsys.readouterr()
    iumask("evaluate", "--model", model, "--data", data, "--output", output, "--device", "cpu", expect=2)
    line = error_line(capsys)
    assert f"{output}: not an iumask results file" in line
    assert line.endswith("choose another --output, or delete the file if it is yours to discard")
    assert output.read_text() == content and not output.with_suffix(".csv").exists()


# ----------------------------------------------------------------------------- loader workers


@pytest.mark.parametrize("command", ["make-masks", "evaluate", "train-baseline"])
def test_corrupt_image_in_a_loader_worker_is_the_same_one_line_error(trained, tmp_path, capsys, command):
    """A file whose header is intact but whose pixels are cut, met while decoding: with --workers 0
    and --workers 2 the same single line naming it."""
    data, model = trained
    bad = copy_data(data, tmp_path)
    split = "val" if command == "evaluate" else "train"
    victim = sorted((bad / "images" / split).iterdir())[0]
    truncate_pixels(victim)
    lines = []
    for workers in ("0", "2"):
        out = tmp_path / f"out-{workers}"
        args = {"make-masks": ["make-masks", "--model", model, "--store", out / "m.zarr"],
                "evaluate": ["evaluate", "--model", model, "--output", out / "r.json", "--pavpu-threshold", "1"],
                "train-baseline": ["train-baseline", "--out", out, *TRAIN]}[command]
        capsys.readouterr()
        iumask(*args, "--data", bad, "--device", "cpu", "--workers", workers, expect=2)
        lines.append(error_line(capsys).replace(str(out), "OUT"))
    assert lines[0] == lines[1]
    assert str(victim) in lines[0] and "cannot decode" in lines[0]


def test_failed_training_leaves_no_empty_member_folder(trained, tmp_path, capsys):
    data, _ = trained
    bad = copy_data(data, tmp_path)
    truncate_pixels(sorted((bad / "images" / "train").iterdir())[-1])  # found mid-epoch
    capsys.readouterr()
    iumask("train-baseline", "--data", bad, "--out", tmp_path / "out", *TRAIN, expect=2)
    assert "cannot decode" in error_line(capsys)
    assert not (tmp_path / "out" / "mobilenet_v2").exists()


# ----------------------------------------------------------------------------- validation split


@pytest.mark.parametrize("damage", ["truncated image", "label outside the classes"])
def test_bad_validation_file_stops_before_training(trained, tmp_path, capsys, damage):
    """Found when the validation split is decoded before training, not after the first epoch: no
    member folder, no checkpoint."""
    data, _ = trained
    bad = copy_data(data, tmp_path)
    if damage == "truncated image":
        victim = sorted((bad / "images" / "val").iterdir())[1]
        truncate_pixels(victim)
    else:
        victim = sorted((bad / "labels" / "val").iterdir())[1]
        label = cv2.imread(str(victim), cv2.IMREAD_UNCHANGED)
        label[3, 4] = 42  # 10 classes, ignore label 255
        cv2.imwrite(str(victim), label)
    capsys.readouterr()
    iumask("train-baseline", "--data", bad, "--out", tmp_path / "out", *TRAIN, expect=2)
    line = error_line(capsys)
    assert str(victim) in line and (damage == "truncated image" or "42" in line)
    assert not (tmp_path / "out" / "mobilenet_v2").exists()
    assert not list((tmp_path / "out").rglob("checkpoint.pt"))


# ----------------------------------------------------------------------------- experiment dry run

SPEC = """
name = "dry"
encoders = ["mobilenet_v2"]
seeds = [0]
device = "{device}"

[data]
root = "{data}"

[train]
epochs = 1

[[arms]]
name = "regular"

[[evaluations]]
root = "{evaluation}"
split = "{split}"
"""


def with_classes(data: Path, folder: Path, names: list[str]) -> Path:
    copy = shutil.copytree(data, folder)
    classes = json.loads((copy / "classes.json").read_text())
    classes["names"] = names
    classes.pop("colors", None)
    if len(names) > 255:
        classes["ignore_index"] = 65535
    (copy / "classes.json").write_text(json.dumps(classes))
    return copy


@pytest.mark.parametrize("problem, needle", [
    ("missing split", "split folder not found"),
    ("other classes", "has other classes than the training data (class 0: 'x0' vs 'sky'"),
    ("gpu", "--device 'gpu' is not a device"),
])
def test_dry_run_refuses_what_the_run_refuses(trained, tmp_path, capsys, problem, needle):
    data, _ = trained
    names = json.loads((data / "classes.json").read_text())["names"]
    evaluation = with_classes(data, tmp_path / "other", ["x0", *names[1:]]) if problem == "other classes" else data
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(data=data, evaluation=evaluation, split="test" if problem == "missing split" else "val",
                                device="gpu" if problem == "gpu" else "cpu"))
    for dry in (["--dry-run"], []):
        capsys.readouterr()
        iumask("experiment", spec, "--out", tmp_path / "out", *dry, expect=2)
        assert needle in error_line(capsys)
        assert not (tmp_path / "out").exists()


def test_class_mismatch_among_hundreds_of_classes_shows_the_differences(trained, tmp_path, capsys):
    data, model = trained
    names = [f"class{i}" for i in range(300)]
    train = with_classes(data, tmp_path / "train", names)
    evaluation = with_classes(data, tmp_path / "eval", [*names[:150], "other", *names[151:]])
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(data=train, evaluation=evaluation, split="val", device="cpu"))
    capsys.readouterr()
    iumask("experiment", spec, "--out", tmp_path / "out", "--dry-run", expect=2)
    line = error_line(capsys)
    assert "class 150: 'other' vs 'class150'" in line and len(line) < 600
    iumask("evaluate", "--model", model, "--data", train, "--output", tmp_path / "r.json", expect=2)
    line = error_line(capsys)
    assert "class 0: 'class0' vs 'sky'" in line and "300 classes vs 10" in line and len(line) < 600


# ----------------------------------------------------------------------------- small ones


def test_config_integer_is_reported_as_written(trained, tmp_path, capsys):
    data, model = trained
    config = tmp_path / "c.toml"
    config.write_text("[make-masks]\nconnectivity = 5\n")
    capsys.readouterr()
    iumask("make-masks", "--config", config, "--model", model, "--data", data, "--store", tmp_path / "m.zarr",
           expect=2)
    line = error_line(capsys)
    assert "got 5" in line and 'got "5"' not in line


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_bad_model_creates_no_output_folder(trained, tmp_path, capsys, command):
    data, _ = trained
    out = tmp_path / "new" / "out"
    args = (["predict", "--input", data / "images" / "val", "--out", out] if command == "predict"
            else ["evaluate", "--data", data, "--output", out / "r.json"])
    capsys.readouterr()
    iumask(*args, "--model", tmp_path / "no-model", "--device", "cpu", expect=2)
    line = error_line(capsys)
    assert "no model here" in line and "iumask train-baseline" in line  # says how to get one
    assert not (tmp_path / "new").exists()


def test_split_whose_labels_are_all_ignored_warns(trained, tmp_path, capsys):
    data, model = trained
    bad = copy_data(data, tmp_path)
    for label in (bad / "labels" / "val").iterdir():
        shape = cv2.imread(str(label), cv2.IMREAD_UNCHANGED).shape
        cv2.imwrite(str(label), np.full(shape, 255, np.uint8))
    capsys.readouterr()
    iumask("evaluate", "--model", model, "--data", bad, "--output", tmp_path / "r.json", "--device", "cpu",
           "--pavpu-threshold", "1")
    err = capsys.readouterr().err.replace("\n", " ")
    assert "every label pixel is the ignore label 255" in err
    # strict JSON: undefined values are null, not the bare NaN most parsers reject
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    result = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)["results"][0]
    assert result["miou"] is None and result["iou"] == [None] * 10
    assert next(csv.DictReader(open(tmp_path / "r.csv")))["miou"] == "nan"
    # a results file with nulls merges and evaluates again
    iumask("evaluate", "--model", model, "--data", data, "--output", tmp_path / "r.json", "--device", "cpu",
           "--pavpu-threshold", "1")
    results = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)["results"]
    assert len(results) == 2 and results[1]["miou"] > 0
