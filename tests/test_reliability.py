"""Wrong numbers and lost work under faults and bad input, for training, evaluation and the file
system: the cached PAvPU threshold, --overwrite, the results file, damaged weights, read-only
folders and full disks, images of several sizes. Each test failed on the code before its fix.

Models are tiny (one MobileNetV2 member, 1 epoch, 64x64 synthetic images). File-system tests use
real mounts (a read-only bind mount, a size-limited tmpfs) and skip where mounting is not allowed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from assertions import error_line
from cli_runner import TINY_TRAIN as TRAIN
from cli_runner import iumask
from test_store_reliability import stopped

from iumask.config import MaskConfig
from iumask.core import pixel_entropy
from iumask.data.augment import JointAugment
from iumask.data.dataset import SegmentationDataset
from iumask.data.folder import FolderDataset
from iumask.data.synthetic import generate_synthetic
from iumask.files import file_sha256
from iumask.models import build_model, load_member, save_member
from iumask.stages.train import online_masks

pytestmark = pytest.mark.slow





@pytest.fixture(scope="module")
def trained(tiny_baseline, tmp_path_factory):
    """A copy of the tiny synthetic dataset and its one-member baseline (copied again by tests that
    change it), in ``root/data`` and ``root/baseline``."""
    root = tmp_path_factory.mktemp("reliability")
    data, _ = tiny_baseline(root)
    return root, data


def _copy_baseline(trained, tmp_path) -> Path:
    root, _ = trained
    out = tmp_path / "baseline"
    shutil.copytree(root / "baseline", out)
    return out


def _truncate_last_train_image_pixels(data: Path) -> Path:
    """A copy of the dataset whose last training image keeps a valid header but has corrupt pixel
    data, so it is found only when the image is decoded (during training)."""
    images = sorted((data / "images" / "train").iterdir())
    victim = images[-1]
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) // 2])  # PNG header intact, IDAT cut
    return victim


# ----------------------------------------------------------------------------- the cached PAvPU threshold


def test_retrained_members_do_not_inherit_the_old_pavpu_threshold(trained, tmp_path):
    root, data = trained
    out = _copy_baseline(trained, tmp_path)
    ensemble = out / "ensemble.json"
    iumask("evaluate", "--model", ensemble, "--data", data, "--output", tmp_path / "r1.json", "--device", "cpu")
    old = json.loads(ensemble.read_text())["train_mean_entropy"]
    # Other options, same member names: the old code carried the threshold over.
    iumask("train-baseline", "--data", data, "--out", out, *TRAIN, "--seed", "7", "--overwrite")
    iumask("evaluate", "--model", ensemble, "--data", data, "--output", tmp_path / "r2.json", "--device", "cpu")
    used = json.loads((tmp_path / "r2.json").read_text())["results"][0]["pavpu_threshold"]
    # An independent recomputation: no cache at all.
    manifest = json.loads(ensemble.read_text())
    for key in ("train_mean_entropy", "train_mean_entropy_weights_sha256"):
        manifest.pop(key, None)
    ensemble.write_text(json.dumps(manifest))
    iumask("evaluate", "--model", ensemble, "--data", data, "--output", tmp_path / "r3.json", "--device", "cpu")
    fresh = json.loads((tmp_path / "r3.json").read_text())["results"][0]["pavpu_threshold"]
    assert used == pytest.approx(fresh, rel=1e-6)
    assert fresh != pytest.approx(old, rel=1e-6)


# ----------------------------------------------------------------------------- --overwrite with bad new data


def test_overwrite_with_bad_new_data_keeps_the_old_member(trained, tmp_path, capsys):
    root, data = trained
    out = _copy_baseline(trained, tmp_path)
    member = out / "mobilenet_v2"
    before = {name: (member / name).read_bytes() for name in ("manifest.json", "model.safetensors")}
    bad = shutil.copytree(data, tmp_path / "bad")
    _truncate_last_train_image_pixels(bad)
    capsys.readouterr()
    iumask("train-baseline", "--data", bad, "--out", out, *TRAIN, "--overwrite", expect=2)
    assert "cannot decode" in error_line(capsys)
    for name, content in before.items():
        assert (member / name).read_bytes() == content, name
    load_member(member)  # still usable: weights match their manifest
    iumask("evaluate", "--model", out / "ensemble.json", "--data", data, "--output", tmp_path / "r.json",
           "--device", "cpu")


def test_kill_during_overwrite_keeps_old_member_and_resumes(trained, tmp_path):
    """A real process killed while it retrains a member with --overwrite: the old member stays
    usable; the rerun finishes the new one."""
    root, data = trained
    out = _copy_baseline(trained, tmp_path)
    member = out / "mobilenet_v2"
    old_sha = json.loads((member / "manifest.json").read_text())["weights_sha256"]
    more = generate_synthetic(tmp_path / "more", num_train=24, num_val=2, height=64, width=64, seed=4)
    args = ["train-baseline", "--data", str(more), "--out", str(out), *TRAIN, "--epochs", "3",
            "--checkpoint-every", "2", "--overwrite"]
    proc = subprocess.Popen([sys.executable, "-c", "from iumask.cli import main; main()", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = member / "checkpoint.pt"
    try:
        for _ in range(600):
            if checkpoint.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "training ended before it could be killed"
        proc.kill()
    finally:
        proc.wait()
    assert file_sha256(member / "model.safetensors") == old_sha
    assert json.loads((member / "manifest.json").read_text())["weights_sha256"] == old_sha
    load_member(member)
    iumask(*args)
    manifest = json.loads((member / "manifest.json").read_text())
    assert manifest["weights_sha256"] != old_sha
    assert manifest["weights_sha256"] == file_sha256(member / "model.safetensors")
    assert not checkpoint.exists()


# ----------------------------------------------------------------------------- evaluate's results file


def test_evaluate_output_merges_instead_of_replacing(trained, tmp_path, capsys):
    root, data = trained
    out = tmp_path / "results.json"
    member = root / "baseline" / "mobilenet_v2"
    iumask("evaluate", "--model", member, "--data", data, "--output", out, "--device", "cpu")
    iumask("evaluate", "--model", member, "--data", data, "--split", "train", "--output", out, "--device", "cpu",
           "--pavpu-threshold", "0.5")
    results = json.loads(out.read_text())["results"]
    assert [r["split"] for r in results] == ["val", "train"]
    # The same model, data and split again replaces its entry.
    iumask("evaluate", "--model", member, "--data", data, "--output", out, "--device", "cpu",
           "--pavpu-threshold", "0.25")
    results = json.loads(out.read_text())["results"]
    assert [r["split"] for r in results] == ["train", "val"] and results[1]["pavpu_threshold"] == 0.25
    assert len(out.with_suffix(".csv").read_text().splitlines()) == 3
    # A file that is not a results file is never replaced.
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"my": "notes"}')
    capsys.readouterr()
    iumask("evaluate", "--model", member, "--data", data, "--output", foreign, "--device", "cpu", expect=2)
    assert "not an iumask results file" in error_line(capsys)
    assert foreign.read_text() == '{"my": "notes"}'


# ----------------------------------------------------------------------------- damaged weights


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_damaged_weights_are_found_and_the_advice_works(trained, tmp_path, capsys, damage):
    root, data = trained
    out = _copy_baseline(trained, tmp_path)
    weights = out / "mobilenet_v2" / "model.safetensors"
    if damage == "corrupt":
        raw = bytearray(weights.read_bytes())
        raw[-100] ^= 0xFF  # a flipped byte inside a tensor: still loads, other numbers
        weights.write_bytes(bytes(raw))
    else:
        weights.unlink()
    capsys.readouterr()
    iumask("make-masks", "--ensemble", out / "ensemble.json", "--data", data, "--store", tmp_path / "m.zarr",
           "--device", "cpu", expect=2)
    line = error_line(capsys)
    assert "rerun the train command" in line and not (tmp_path / "m.zarr").exists()
    # The advice: rerun the train command with the same options. It must retrain, not report a cache hit.
    iumask("train-baseline", "--data", data, "--out", out, *TRAIN)
    assert "cache hit" not in capsys.readouterr().err
    manifest = json.loads((out / "mobilenet_v2" / "manifest.json").read_text())
    assert manifest["weights_sha256"] == file_sha256(weights)
    iumask("evaluate", "--model", out / "ensemble.json", "--data", data, "--output", tmp_path / "r.json",
           "--device", "cpu", "--pavpu-threshold", "1")


def test_changed_encoder_weights_file_is_not_a_cache_hit(trained, tmp_path, capsys):
    root, data = trained
    encoder_file = tmp_path / "encoder.pt"
    torch.manual_seed(0)
    torch.save(build_model("mobilenet_v2", 10).encoder.state_dict(), encoder_file)
    out = tmp_path / "out"
    iumask("train-baseline", "--data", data, "--out", out, *TRAIN, "--encoder-weights", encoder_file)
    torch.manual_seed(1)
    torch.save(build_model("mobilenet_v2", 10).encoder.state_dict(), encoder_file)  # same path, other content
    capsys.readouterr()
    iumask("train-baseline", "--data", data, "--out", out, *TRAIN, "--encoder-weights", encoder_file, expect=2)
    assert "encoder_weights_sha256" in error_line(capsys)


# ----------------------------------------------------------------------------- file-system errors (real mounts)


@pytest.mark.parametrize("args, needle", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "gpu"], "not a device"),
    (["--encoder", "resnet9000"], "unknown encoder"),  # the second encoder: nothing trains first
])
def test_bad_training_options_stop_before_any_training(trained, tmp_path, capsys, args, needle):
    root, data = trained
    out = tmp_path / "out"
    capsys.readouterr()
    iumask("train-baseline", "--data", data, "--out", out, *TRAIN, *args, expect=2)
    assert needle in error_line(capsys)
    assert not (out / "mobilenet_v2").exists()


def test_corrupt_validation_image_stops_before_training(trained, tmp_path, capsys):
    root, data = trained
    bad = shutil.copytree(data, tmp_path / "bad")
    victim = sorted((bad / "images" / "val").iterdir())[0]
    victim.write_bytes(b"not an image at all")
    capsys.readouterr()
    iumask("train-baseline", "--data", bad, "--out", tmp_path / "out", *TRAIN, expect=2)
    assert victim.name in error_line(capsys)
    assert not (tmp_path / "out" / "mobilenet_v2").exists()


@pytest.mark.parametrize("args, needle", [
    (["--pavpu-window", "0"], "--pavpu-window"),
    (["--pavpu-stride", "0"], "--pavpu-stride"),
    (["--device", "gpu"], "not a device"),
    (["--inference", "tiles"], "--inference"),
])
def test_bad_evaluate_options_are_one_line_errors(trained, tmp_path, capsys, args, needle):
    root, data = trained
    capsys.readouterr()
    iumask("evaluate", "--model", root / "baseline" / "mobilenet_v2", "--data", data,
           "--output", tmp_path / "r.json", *args, expect=2)
    assert needle in error_line(capsys)
    assert not (tmp_path / "r.json").exists()


# ----------------------------------------------------------------------------- a full disk


def _mount(args: list[str], target: Path) -> None:
    try:
        subprocess.run(["mount", *args, str(target)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount here ({exc}); needs root in a mount namespace")


@pytest.fixture
def read_only_copy(trained, tmp_path):
    """The trained baseline on a real read-only bind mount."""
    src = _copy_baseline(trained, tmp_path)
    target = tmp_path / "ro"
    target.mkdir()
    _mount(["--bind", str(src)], target)
    try:
        _mount(["-o", "remount,ro,bind"], target)
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_evaluate_reports_results_from_a_read_only_model_folder(trained, read_only_copy, tmp_path, capsys):
    root, data = trained
    out = tmp_path / "r.json"
    iumask("evaluate", "--model", read_only_copy / "ensemble.json", "--data", data, "--output", out, "--device", "cpu")
    err = capsys.readouterr().err
    assert "PAvPU threshold not cached" in err and "Traceback" not in err
    assert json.loads(out.read_text())["results"][0]["pavpu_threshold"] > 0


def test_read_only_output_folder_is_one_line_error(trained, read_only_copy, tmp_path, capsys):
    root, data = trained
    capsys.readouterr()
    iumask("evaluate", "--model", root / "baseline" / "mobilenet_v2", "--data", data,
           "--output", read_only_copy / "results.json", "--device", "cpu", expect=2)
    assert "Read-only file system" in error_line(capsys)
    iumask("train-baseline", "--data", data, "--out", read_only_copy / "new", *TRAIN, expect=2)
    assert str(read_only_copy / "new") in error_line(capsys)


def test_full_disk_during_training_is_one_line_error_without_temporary_files(trained, tmp_path, capsys):
    root, data = trained
    target = tmp_path / "small"
    target.mkdir()
    _mount(["-t", "tmpfs", "-o", "size=2m", "tmpfs"], target)  # a DeepLabV3+ checkpoint is far larger
    try:
        capsys.readouterr()
        iumask("train-baseline", "--data", data, "--out", target / "run", *TRAIN, expect=2)
        line = error_line(capsys)
        assert "No space left on device" in line and "checkpoint.pt" in line
        leftovers = [p.name for p in target.rglob("*") if p.name.endswith(".tmp")]
        assert leftovers == []
        # No file left open either (an open, unlinked temporary file would keep the disk full).
        assert subprocess.run(["umount", str(target)], capture_output=True).returncode == 0
    finally:
        if os.path.ismount(target):
            subprocess.run(["umount", "-l", str(target)], check=False)


# ----------------------------------------------------------------------------- images of several sizes


def test_training_on_images_of_several_sizes_needs_size(tmp_path, capsys):
    data = generate_synthetic(tmp_path / "data", num_train=4, num_val=2, height=64, width=64, seed=5)
    image = sorted((data / "images" / "train").iterdir())[1]
    label = data / "labels" / "train" / (image.stem + ".png")
    for path, interpolation in ((image, cv2.INTER_LINEAR), (label, cv2.INTER_NEAREST)):
        array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(path), cv2.resize(array, (80, 48), interpolation=interpolation))
    capsys.readouterr()
    iumask("train-baseline", "--data", data, "--out", tmp_path / "out", *TRAIN, expect=2)
    line = error_line(capsys)
    assert "--size" in line and image.stem in line
    assert not (tmp_path / "out" / "mobilenet_v2").exists()
    # With --size it trains (validation images of several sizes are batched one at a time).
    iumask("train-baseline", "--data", data, "--out", tmp_path / "out", *TRAIN, "--size", "64x64")


# ----------------------------------------------------------------------------- also noticed


def test_online_instances_exclude_augmentation_padding():
    """A predicted class touching the padded border: padding pixels (high entropy) must not be
    averaged into the real instance."""
    num_classes, h, w = 3, 8, 8
    logits = torch.full((1, num_classes, h, w), -4.0)
    logits[:, 1] = 4.0  # class 1 everywhere, confident
    logits[:, :, :, 6:] = 0.0  # the two right columns (the padding): nearly uniform, high entropy,
    logits[:, 1, :, 6:] = 0.3  # yet predicted as class 1, so without the mask they join the real instance
    label = torch.full((1, h, w), 1, dtype=torch.long)
    label[:, :, 6:] = 255
    valid = torch.ones(1, h, w, dtype=torch.bool)
    valid[:, :, 6:] = False
    masks = MaskConfig("prediction", 8, False)
    iu = online_masks([logits], label, masks, num_classes, 255, valid)
    entropy = pixel_entropy(torch.softmax(logits, 1))
    inside = entropy[0, :, :6]
    assert torch.allclose(iu[0, :, :6], inside.mean().expand_as(inside), atol=1e-6)
    assert torch.all(iu[0, :, 6:] == 0)
    # Without the padding mask the padding's entropy leaks into the instance (what the bug did).
    leaked = online_masks([logits], label, masks, num_classes, 255)
    assert leaked[0, 0, 0] > iu[0, 0, 0] + 0.1


def test_augmentation_valid_mask_marks_exactly_the_padding(tmp_path):
    data = generate_synthetic(tmp_path / "data", num_train=2, num_val=1, height=64, width=64, seed=6)
    folder = FolderDataset(data, "train")
    augment = JointAugment(scale=(0.5, 0.5), crop=(64, 64), flip=True, jitter=0.0, ignore_index=255)
    dataset = SegmentationDataset(folder, transform=augment, valid_mask=True)
    plain = SegmentationDataset(folder)
    for i in range(len(folder)):
        sample = dataset[i]
        valid = sample["valid"].numpy()
        assert valid.dtype == bool and valid.sum() == 32 * 32  # the half-size image inside a 64x64 crop
        assert np.all(sample["label"].numpy()[~valid] == 255)
        assert set(np.unique(sample["label"].numpy()[valid])) <= set(np.unique(plain[i]["label"].numpy()))
    assert "valid" not in SegmentationDataset(folder, transform=augment)[0]


def test_saved_weights_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_member(tmp_path / "m", build_model("mobilenet_v2", 3), {"complete": True})
    finally:
        os.umask(old)
    assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m" / "manifest.json").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------- found by the audit


@pytest.fixture(scope="module")
def two_members(tmp_path_factory, trained):
    """A 2-member ensemble and a member of the same encoder from another run (another seed)."""
    root, data = trained
    out = tmp_path_factory.mktemp("two")
    two = [*TRAIN, "--encoder", "mobilenet_v2"]
    iumask("train-baseline", "--data", data, "--out", out / "a", *two)
    iumask("train-baseline", "--data", data, "--out", out / "b", *two, "--seed", "5")
    return out, data


def test_ensemble_with_a_replaced_member_is_refused(two_members, tmp_path, capsys):
    """What an interrupted --overwrite retrain leaves (member 1 new, member 2 old), or a member
    copied in: the ensemble must not silently mix them."""
    out, data = two_members
    mixed = shutil.copytree(out / "a", tmp_path / "mixed")
    shutil.rmtree(mixed / "mobilenet_v2-2")
    shutil.copytree(out / "b" / "mobilenet_v2-2", mixed / "mobilenet_v2-2")
    capsys.readouterr()
    iumask("evaluate", "--model", mixed / "ensemble.json", "--data", data, "--output", tmp_path / "r.json",
           "--device", "cpu", expect=2)
    assert "mobilenet_v2-2 changed since this ensemble was written" in error_line(capsys)
    iumask("make-masks", "--ensemble", mixed, "--data", data, "--store", tmp_path / "m.zarr", "--device", "cpu",
           expect=2)
    assert "changed since" in error_line(capsys) and not (tmp_path / "m.zarr").exists()
    # One member on its own is still usable.
    iumask("evaluate", "--model", mixed / "mobilenet_v2-2", "--data", data, "--output", tmp_path / "r.json",
           "--device", "cpu", "--pavpu-threshold", "1")


def test_results_over_other_classes_are_refused_before_any_work(trained, tmp_path, capsys):
    root, data = trained
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"identity": None, "results": [{"model": "m", "classes": ["a", "b"]}]}))
    before = out.read_text()
    capsys.readouterr()
    iumask("evaluate", "--model", root / "baseline" / "mobilenet_v2", "--data", data, "--output", out,
           "--device", "cpu", expect=2)
    err = capsys.readouterr().err
    assert "other classes" in err and "evaluate baseline" not in err  # refused before evaluating
    assert out.read_text() == before


def test_one_model_spelled_two_ways_is_one_entry(trained, tmp_path):
    root, data = trained
    out = tmp_path / "r.json"
    for spelling in (root / "baseline", root / "baseline" / "ensemble.json"):
        iumask("evaluate", "--model", spelling, "--data", data, "--output", out, "--device", "cpu",
               "--pavpu-threshold", "1")
    assert len(json.loads(out.read_text())["results"]) == 1


def test_concurrent_evaluates_into_one_file_keep_both_results(trained, tmp_path):
    """An evaluate merging into a results file waits for another one's merge (an OS lock on the
    folder) instead of overwriting it with its own stale read."""
    from iumask.files import folder_lock

    root, data = trained
    member = root / "baseline" / "mobilenet_v2"
    other = tmp_path / "other" / "r.json"  # the entry the "other" evaluate is merging
    iumask("evaluate", "--model", member, "--data", data, "--split", "train", "--output", other, "--device", "cpu",
           "--pavpu-threshold", "1")
    out = tmp_path / "r.json"
    args = ["evaluate", "--model", str(member), "--data", str(data), "--output", str(out), "--device", "cpu",
            "--pavpu-threshold", "1"]
    # The evaluate stops itself (SIGSTOP) at its flock, i.e. after evaluating and before merging;
    # an evaluate that took no lock never gets there and fails the test here.
    proc = stopped(args, r"fcntl\.flock", "")
    with folder_lock(tmp_path):  # another evaluate is merging into this folder right now
        proc.send_signal(signal.SIGCONT)  # it now waits for the lock, whatever the machine's speed
        shutil.copy(other, out)  # the other merge's result lands
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert sorted(r["split"] for r in json.loads(out.read_text())["results"]) == ["train", "val"]


def test_full_disk_during_make_masks_names_the_store(trained, tmp_path, capsys):
    root, data = trained
    target = tmp_path / "small"
    target.mkdir()
    _mount(["-t", "tmpfs", "-o", "size=16k", "tmpfs"], target)
    try:
        capsys.readouterr()
        iumask("make-masks", "--ensemble", root / "baseline", "--data", data, "--store", target / "m.zarr",
               "--device", "cpu", expect=2)
        line = error_line(capsys)
        assert "No space left on device" in line and "m.zarr" in line
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_full_disk_when_the_weights_are_saved_is_one_line(trained, tmp_path, capsys):
    root, data = trained
    weights = (root / "baseline" / "mobilenet_v2" / "model.safetensors").stat().st_size
    target = tmp_path / "small"
    target.mkdir()
    # Room for the epoch-end checkpoint (weights + Adam's two moments) but not for the weights beside it.
    _mount(["-t", "tmpfs", "-o", f"size={int(3.5 * weights) // 4096 * 4096}", "tmpfs"], target)
    try:
        capsys.readouterr()
        iumask("train-baseline", "--data", data, "--out", target / "run", *TRAIN, "--checkpoint-every", "0",
               expect=2)
        line = error_line(capsys)
        assert "No space left on device" in line and "model.safetensors" in line
        assert [p.name for p in target.rglob("*.tmp")] == []
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_train_weighted_size_advice_leads_somewhere(trained, tmp_path, capsys):
    root, data = trained
    iumask("make-masks", "--ensemble", root / "baseline", "--data", data, "--store", tmp_path / "m.zarr",
           "--device", "cpu")
    capsys.readouterr()
    iumask("train-weighted", "--data", data, "--store", tmp_path / "m.zarr", "--out", tmp_path / "w", *TRAIN,
           "--size", "32x32", expect=2)
    line = error_line(capsys)
    assert "retrain the baseline with that --size and rerun make-masks" in line


def test_unfinished_run_with_other_options_is_not_discarded_silently(trained, tmp_path, capsys):
    """A killed run's checkpoint, then a rerun with another option by mistake: refused (naming what
    differs) instead of starting over; --overwrite discards it."""
    from iumask.engine import save_checkpoint

    root, data = trained
    out = tmp_path / "out"
    iumask("train-baseline", "--data", data, "--out", out, *TRAIN)
    manifest = json.loads((out / "mobilenet_v2" / "manifest.json").read_text())
    identity = {k: v for k, v in manifest.items() if k not in ("name", "complete", "history", "normalization",
                                                               "image_size", "train_data", "weights_sha256")}
    (out / "mobilenet_v2" / "manifest.json").unlink()  # as if killed before the end
    save_checkpoint(out / "mobilenet_v2" / "checkpoint.pt", {"format": 2, "identity": identity, "world_size": 1})
    capsys.readouterr()
    iumask("train-baseline", "--data", data, "--out", out, *TRAIN, "--epochs", "2", expect=2)
    line = error_line(capsys)
    assert "checkpoint.pt" in line and "train_options" in line and "--overwrite" in line
    assert (out / "mobilenet_v2" / "checkpoint.pt").exists()
    iumask("train-baseline", "--data", data, "--out", out, *TRAIN, "--epochs", "2", "--overwrite")


def test_a_store_swapped_under_a_reader_is_not_read_silently(trained, tmp_path):
    from iumask.errors import IumaskError
    from iumask.store import MaskStore

    root, data = trained
    store_path = tmp_path / "m.zarr"
    iumask("make-masks", "--ensemble", root / "baseline", "--data", data, "--store", store_path, "--device", "cpu")
    reader = MaskStore.open(store_path)
    reader.read_iu(0)
    iumask("make-masks", "--ensemble", root / "baseline", "--data", data, "--store", store_path, "--device", "cpu",
           "--normalize", "--overwrite")
    with pytest.raises(IumaskError, match="replaced or removed while it was being read"):
        reader.read_iu(0)
    assert MaskStore.open(store_path).identity["options"]["normalize"] is True


def test_a_model_made_from_other_inputs_is_refused_naming_each_difference(trained, tmp_path, capsys):
    """Members, checkpoints and mask stores share one refusal: what differs, stored and given."""
    root, data = trained
    out = _copy_baseline(trained, tmp_path)
    before = {p: p.read_bytes() for p in (out / "mobilenet_v2").iterdir()}
    capsys.readouterr()
    iumask("train-baseline", "--data", data, "--out", out, *TRAIN, "--seed", "7", "--lr", "2e-3", expect=2)
    line = error_line(capsys)
    assert f"the model in {out / 'mobilenet_v2'} was made from other inputs (" in line
    assert "train_options.seed: stored 0, given 7" in line and "train_options.lr: stored 0.001, given 0.002" in line
    assert "pass --overwrite" in line
    assert {p: p.read_bytes() for p in (out / "mobilenet_v2").iterdir()} == before


def test_up_to_ten_arms_get_distinct_bar_colours(tmp_path):
    """The CamVid study's nine arms drew two in one colour (an eight-colour cycle)."""
    import matplotlib.colors

    from iumask.figures import ARM_COLOURS, iou_bars_png

    arms = [f"arm{k}" for k in range(10)]
    assert len({matplotlib.colors.to_hex(c) for c in ARM_COLOURS[:len(arms)]}) == len(arms)
    means = np.linspace(0.1, 0.9, 3 * len(arms)).reshape(len(arms), 3)  # two classes and the mIoU
    iou_bars_png(tmp_path / "bars.png", ["a", "b"], arms, means, np.zeros_like(means), "test")
    assert (tmp_path / "bars.png").stat().st_size > 0
