"""The shared training engine: data order and sharding, exact resume after a real SIGKILL, online
ensemble training (CLI, resume, evaluate/make-masks on its ensemble), torchrun with 2 Gloo
processes on CPU, and the CPU side of mixed precision. Tiny data: 32x32 images, MobileNetV2."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from cli_runner import iumask
from safetensors.torch import load_file

from iumask import engine
from iumask.config import TrainConfig as TrainOptions
from iumask.data.synthetic import generate_synthetic
from iumask.device import Precision, resolve_amp
from iumask.engine import EpochBatchSampler, steps_per_epoch
from iumask.stages.evaluate import read_image_counts
from iumask.store import MaskStore

pytestmark = pytest.mark.slow

SMALL = ["--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--backbone-lr-factor", "1", "--device", "cpu"]



BASELINE = ["train-baseline", "--encoder", "mobilenet_v2", *SMALL, "--checkpoint-every", "1"]  # 2 steps/epoch
ONLINE = ["train-weighted", "--online", "--encoder", "mobilenet_v2", "--encoder", "mobilenet_v2", *SMALL[2:],
          "--epochs", "1", "--checkpoint-every", "1"]


@pytest.fixture(scope="module")
def data(make_synthetic):
    return make_synthetic("engine", num_train=8, num_val=2, height=32, width=32, seed=11)


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory):
    """An uninterrupted train-baseline run (the reference of the kill test, the ensemble of make-masks)."""
    out = tmp_path_factory.mktemp("straight") / "baseline"
    iumask(*BASELINE, "--data", data, "--out", out)
    return out


@pytest.fixture(scope="module")
def online(data, tmp_path_factory):
    """An uninterrupted online run of two members."""
    out = tmp_path_factory.mktemp("straight") / "online"
    iumask(*ONLINE, "--data", data, "--out", out)
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc: int = 2, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "iumask.cli", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


# ----------------------------------------------------------------------------- data order


@pytest.mark.parametrize("n, batch, world", [(10, 2, 1), (11, 2, 2), (9, 4, 1), (3, 4, 1), (16, 3, 2)])
def test_epoch_order_depends_on_seed_and_epoch_and_shards_partition_global_batches(n, batch, world):
    steps = steps_per_epoch(n, batch, world)
    full = [list(EpochBatchSampler(n, batch, seed=5, epoch=3, rank=r, world_size=world)) for r in range(world)]
    assert all(len(f) == steps for f in full)
    seen = [i for step in range(steps) for r in range(world) for i in full[r][step]]
    assert len(seen) == len(set(seen)) == min(n, steps * batch * world)
    # Same (seed, epoch): same order; another epoch or seed: another order.
    assert full[0] == list(EpochBatchSampler(n, batch, seed=5, epoch=3, rank=0, world_size=world))
    if n > 3:
        assert full[0] != list(EpochBatchSampler(n, batch, seed=5, epoch=4, rank=0, world_size=world))
        assert full[0] != list(EpochBatchSampler(n, batch, seed=6, epoch=3, rank=0, world_size=world))
    # Starting at step s yields exactly the remaining batches.
    for start in range(steps + 1):
        assert list(EpochBatchSampler(n, batch, 5, 3, 0, world, start=start)) == full[0][start:]


def test_resumed_epoch_loads_only_the_remaining_batches():
    """The skipped batches' samples are never read (the sampler starts at the saved position)."""
    loaded = []

    class Counting(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            loaded.append(i)
            return torch.tensor(i)

    sampler = EpochBatchSampler(12, 3, seed=0, epoch=1, start=3)
    batches = [b.tolist() for b in torch.utils.data.DataLoader(Counting(), batch_sampler=sampler)]
    assert len(batches) == 1 and sorted(loaded) == sorted(batches[0])


def test_too_few_images_for_the_processes_is_an_error():
    from iumask.errors import IumaskError

    assert steps_per_epoch(3, 4, 1) == 1  # one short batch, as before
    with pytest.raises(IumaskError, match="fewer than one batch"):
        steps_per_epoch(5, 4, 2)


# ----------------------------------------------------------------------------- exact resume


def test_train_baseline_killed_mid_epoch_resumes_bitwise_identical(data, baseline, tmp_path, capsys):
    """SIGKILL a real train-baseline right after its first (mid-epoch) checkpoint, rerun, and get
    the very weights of an uninterrupted run (dropout RNG, optimizer, schedule, data position)."""
    args = [*BASELINE, "--data", str(data)]

    out = tmp_path / "killed"
    checkpoint = out / "mobilenet_v2" / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-m", "iumask.cli", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not checkpoint.exists() and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "mobilenet_v2" / "manifest.json").exists(), "the run should have been killed part way"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 1), "killed right after the mid-epoch checkpoint"
    assert set(state) >= {"identity", "members", "histories", "ranks", "world_size"}
    assert set(state["members"][0]) == {"model", "optimizer", "scheduler", "scaler"}
    assert state["ranks"][0]["loss_count"] == 1 and state["ranks"][0]["rng"]["cpu"].dtype == torch.uint8

    # A row logged after the checkpoint (as by a kill between an epoch's log and its checkpoint) is dropped.
    (out / "mobilenet_v2" / "metrics.csv").write_text("epoch,loss\n1,0.5\n")
    capsys.readouterr()
    iumask(*args, "--out", out)
    assert "resuming at epoch 1, step 1/2" in capsys.readouterr().err  # not started over
    assert metrics_rows(out / "mobilenet_v2", seconds=False) == metrics_rows(baseline / "mobilenet_v2", seconds=False)
    assert_same_weights(baseline / "mobilenet_v2" / "model.safetensors", out / "mobilenet_v2" / "model.safetensors")
    straight = json.loads((baseline / "mobilenet_v2" / "manifest.json").read_text())
    resumed = json.loads((out / "mobilenet_v2" / "manifest.json").read_text())
    assert resumed["history"] == straight["history"] and len(resumed["history"]) == 2
    assert resumed["train_options"] == straight["train_options"] and "checkpoint_every" not in resumed["train_options"]
    assert not checkpoint.exists()


# ----------------------------------------------------------------------------- training log


def metrics_rows(folder: Path, seconds: bool = True) -> list[dict]:
    with open(folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows if seconds else [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] >= 200 and image.shape[1] >= 400


def test_metrics_csv_and_curves_follow_the_history(data, baseline, online):
    manifest = json.loads((baseline / "mobilenet_v2" / "manifest.json").read_text())
    classes = manifest["classes"]["names"]
    rows = metrics_rows(baseline / "mobilenet_v2")
    assert list(rows[0]) == ["epoch", "step", "loss", "lr_encoder", "lr_decoder", "val_miou",
                             *(f"iou_{name}" for name in classes), "seconds"]
    assert [int(r["epoch"]) for r in rows] == [1, 2] and [int(r["step"]) for r in rows] == [2, 4]
    for row, entry in zip(rows, manifest["history"], strict=True):
        assert float(row["loss"]) == entry["loss"] and float(row["val_miou"]) == entry["val_miou"]
        ious = np.array([float(row[f"iou_{name}"]) for name in classes])
        assert np.nanmean(ious) == pytest.approx(entry["val_miou"]) and float(row["seconds"]) > 0
    assert float(rows[1]["lr_decoder"]) < float(rows[0]["lr_decoder"]) <= 1e-3  # the poly schedule
    assert_png(baseline / "mobilenet_v2" / "curves.png")
    # Online: one log per member, with the ensemble's mIoU.
    for name in ("mobilenet_v2", "mobilenet_v2-2"):
        manifest = json.loads((online / name / "manifest.json").read_text())
        (row,) = metrics_rows(online / name)
        assert float(row["loss"]) == manifest["history"][0]["loss"]
        assert float(row["ensemble_val_miou"]) == manifest["ensemble_history"][0]["val_miou"]
        assert_png(online / name / "curves.png")


def test_tensorboard_needs_its_package_and_logs_scalars_and_images(data, tmp_path, monkeypatch, capsys):
    args = ["train-baseline", "--encoder", "mobilenet_v2", *SMALL[2:], "--epochs", "1", "--data", data,
            "--tensorboard", "--checkpoint-every", "0"]
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails: not installed
        iumask(*args, "--out", tmp_path / "none", expect=2)
    assert "pip install iumask[tensorboard]" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()  # before training starts
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    iumask(*args, "--out", tmp_path / "tb")
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb" / "mobilenet_v2" / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "val/miou", "train/lr_encoder"} <= set(tags["scalars"])
    assert len(tags["images"]) == 2  # the two validation images: image | prediction | entropy | IU
    miou = json.loads((tmp_path / "tb" / "mobilenet_v2" / "manifest.json").read_text())["history"][0]["val_miou"]
    assert events.Scalars("val/miou")[0].value == pytest.approx(miou)


# ----------------------------------------------------------------------------- online


def test_online_training_cli_manifests_timing_and_use_of_its_ensemble(data, online, tmp_path, capsys):
    out = online
    ensemble = json.loads((out / "ensemble.json").read_text())
    assert ensemble["stage"] == "online" and ensemble["members"] == ["mobilenet_v2", "mobilenet_v2-2"]
    for k, name in enumerate(ensemble["members"]):
        manifest = json.loads((out / name / "manifest.json").read_text())
        assert manifest["stage"] == "online" and manifest["complete"] and manifest["init_seed"] == k
        assert manifest["online_masks"] == {"instances_from": "prediction", "connectivity": 8, "normalize": False}
        assert manifest["loss"]["exponent"] == 2.0 and len(manifest["history"]) == 1
        assert len(manifest["ensemble_history"]) == 1
        timing = manifest["timing"]
        assert timing["steps"] == 2 and timing["forward_backward_s"] > 0 and timing["masks_s"] > 0
    assert not (out / "checkpoint.pt").exists()
    # Two members, same data, other initialisations: different weights.
    a, b = (load_file(str(out / n / "model.safetensors")) for n in ensemble["members"])
    assert any(not torch.equal(a[k], b[k]) for k in a)

    args = [*ONLINE, "--data", data, "--out", out]
    capsys.readouterr()
    iumask(*args)
    assert "cache hit" in capsys.readouterr().err
    iumask(*args, "--instances-from", "label", expect=2)  # other inputs: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err

    # Killed after saving the members, before ensemble.json: a rerun trains nothing and writes the
    # ensemble with the timing its members' manifests recorded.
    killed = tmp_path / "killed"
    shutil.copytree(out, killed)
    (killed / "ensemble.json").unlink()
    iumask(*ONLINE, "--data", data, "--out", killed)
    printed = capsys.readouterr()
    assert "online step time" not in printed.out + printed.err
    recorded = json.loads((out / "mobilenet_v2" / "manifest.json").read_text())["timing"]
    assert json.loads((killed / "ensemble.json").read_text())["timing"] == ensemble["timing"] == recorded

    # Its ensemble.json works with evaluate and make-masks.
    iumask("evaluate", "--model", out / "ensemble.json", "--model", out / "mobilenet_v2", "--data", data,
           "--output", tmp_path / "results.json", "--device", "cpu")
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["model"] for r in results] == ["online ensemble", "online mobilenet_v2"]
    iumask("make-masks", "--ensemble", out / "ensemble.json", "--data", data, "--store", tmp_path / "m.zarr",
           "--device", "cpu")
    assert MaskStore.open(tmp_path / "m.zarr").completed().all()


def test_online_training_of_one_member_records_what_a_group_of_k_records(data, tmp_path):
    """An online group of one is still online: its manifest has init_seed, ensemble_history and
    timing, and its ensemble.json the timing (the one training path once keyed this on k > 1)."""
    out = tmp_path / "online-1"
    iumask("train-weighted", "--online", "--encoder", "mobilenet_v2", *SMALL[2:], "--epochs", "1", "--data", data,
           "--out", out)
    manifest = json.loads((out / "mobilenet_v2" / "manifest.json").read_text())
    assert manifest["init_seed"] == 0 and manifest["ensemble_history"] == []  # one member: no ensemble score
    assert manifest["timing"]["steps"] == 2 and manifest["timing"]["masks_s"] > 0
    assert json.loads((out / "ensemble.json").read_text())["timing"] == manifest["timing"]
    assert not (out / "checkpoint.pt").exists()


class _Interrupted(Exception):
    pass


def test_online_training_interrupted_mid_epoch_resumes_bitwise_identical(data, online, tmp_path, monkeypatch,
                                                                         capsys):
    args = [*ONLINE, "--data", data]

    real_save = engine.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if state["step"]:
            raise _Interrupted  # like a kill right after the mid-epoch checkpoint

    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
    with pytest.raises(_Interrupted):
        iumask(*args, "--out", tmp_path / "resumed")
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"], len(state["members"])) == (0, 1, 2)
    assert state["extra"]["steps"] == 1  # the timing is saved and keeps counting
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    capsys.readouterr()
    iumask(*args, "--out", tmp_path / "resumed")
    err = capsys.readouterr().err
    assert "resuming at epoch 1, step 1/2" in err
    assert "online step time" in err and "masks (entropy + instance uncertainty)" in err
    for name in ("mobilenet_v2", "mobilenet_v2-2"):
        assert_same_weights(online / name / "model.safetensors", tmp_path / "resumed" / name / "model.safetensors")
    manifest = json.loads((tmp_path / "resumed" / "mobilenet_v2" / "manifest.json").read_text())
    assert manifest["timing"]["steps"] == 2
    assert manifest["history"] == json.loads((online / "mobilenet_v2" / "manifest.json").read_text())["history"]


def test_run_online_skips_make_masks_and_compares_side_by_side(tmp_path):
    data = generate_synthetic(tmp_path / "data", num_train=4, num_val=2, height=32, width=32, seed=12)
    iumask("run", "--online", "--data", data, "--out", tmp_path / "run", "--encoder", "mobilenet_v2",
           "--epochs", "1", "--batch-size", "2", "--device", "cpu", "--no-augment", "--instances-from", "label",
           "--checkpoint-every", "0")
    results = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
    assert [r["model"] for r in results] == ["baseline mobilenet_v2", "baseline mobilenet_v2",
                                             "online mobilenet_v2", "online mobilenet_v2"]
    assert not (tmp_path / "run" / "masks.zarr").exists()
    manifest = json.loads((tmp_path / "run" / "online" / "mobilenet_v2" / "manifest.json").read_text())
    assert manifest["online_masks"]["instances_from"] == "label"


# ----------------------------------------------------------------------------- torchrun


def test_make_masks_with_two_processes_equals_one_process(data, baseline, tmp_path):
    common = ["make-masks", "--ensemble", baseline, "--data", data, "--device", "cpu", "--batch-size", "2"]
    # One process with one intra-op thread, as torchrun's ranks have: the comparison is about the
    # number of processes; a different thread count changes the convolutions' float rounding.
    subprocess.run([sys.executable, "-m", "iumask.cli", *map(str, common), "--store", str(tmp_path / "one.zarr")],
                   check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    # Two ranks, shards of 2 images: each rank writes whole shards (every other one).
    torchrun(*common, "--store", tmp_path / "two.zarr", "--images-per-shard", "2")
    one, two = MaskStore.open(tmp_path / "one.zarr"), MaskStore.open(tmp_path / "two.zarr")
    assert two.completed().all() and two.attrs["finished"]
    assert two.images_per_shard == 2 and two.num_images > 4  # at least three shards
    timing = {k for k in one.attrs if "time" in k or "timing" in k}
    assert {k: v for k, v in one.attrs.items() if k not in timing} == \
        {k: v for k, v in two.attrs.items() if k not in timing}
    for i in range(one.num_images):
        a, b = one.read(i), two.read(i)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_evaluate_with_two_processes_equals_one_process(data, baseline, tmp_path):
    """Evaluation under torchrun: each rank predicts every other batch (the training-set entropy of
    the PAvPU threshold too), the metrics' states are reduced over the two Gloo ranks, rank 0 writes:
    the counts-based numbers equal one process's exactly, the float sums to rounding."""
    results = {}
    for runner in ("one", "two"):
        model = tmp_path / runner / "baseline"
        shutil.copytree(baseline, model)  # each computes (and caches) the PAvPU threshold itself
        args = ["evaluate", "--model", model / "ensemble.json", "--data", data, "--split", "train", "--device", "cpu",
                "--temperature-scale", "--output", tmp_path / runner / "results.json", "--workers", "0"]
        if runner == "one":
            subprocess.run([sys.executable, "-m", "iumask.cli", *map(str, args)], check=True, capture_output=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        else:
            assert torchrun(*args).stdout.count("per-class IoU") == 1  # one table, from rank 0
        [results[runner]] = json.loads((tmp_path / runner / "results.json").read_text())["results"]
    one, two = results["one"], results["two"]
    assert one["images_scored"] == two["images_scored"] == 8
    for key in ("iou", "miou", "pixel_accuracy", "class_accuracy", "mean_accuracy", "pavpu_threshold",
                "pavpu_counts", "instance_counts", "worst_10pct_miou", "temperature"):
        assert one[key] == two[key], key  # 8 images on both: no image left out or counted twice
    assert one["calibration_bins"]["pixels"] == two["calibration_bins"]["pixels"]
    # the per-image counts, gathered from both ranks, in the split's image order as one process's
    [counts_one], [counts_two] = (read_image_counts(tmp_path / runner / "results.json") for runner in ("one", "two"))
    for name in ("intersection", "union", "label_pixels", "images"):
        np.testing.assert_array_equal(counts_one[name], counts_two[name])
    assert counts_one["images"].tolist() == sorted(counts_one["images"].tolist())  # the synthetic ids sort
    for key in ("mean_entropy", "ece", "brier", "nll", "per_image_miou", "aurc", "augrc", "risk_at_80_coverage",
                "ece_scaled", "nll_scaled"):
        assert two[key] == pytest.approx(one[key], rel=1e-12, abs=1e-15), key


def test_train_baseline_with_two_processes_writes_each_member_once(data, tmp_path):
    """DDP, with an encoder that has parameters the output does not use (EfficientNet's head)."""
    out = tmp_path / "ddp"
    result = torchrun("train-baseline", "--data", data, "--out", out, "--encoder", "mobilenet_v2",
                      "--encoder", "efficientnet-b0", *SMALL[2:], "--epochs", "1", "--batch-size", "2",
                      "--checkpoint-every", "1", "--amp", "fp16")  # 2 global steps of 2 × 2 images
    output = result.stdout + result.stderr
    assert output.count("ensemble:") == 1 and output.count("needs a CUDA device") == 1  # rank 1 is silent
    ensemble = json.loads((out / "ensemble.json").read_text())
    assert ensemble["members"] == ["mobilenet_v2", "efficientnet-b0"]
    assert sorted(p.name for p in out.iterdir()) == [".iumask-writer.lock", "efficientnet-b0", "ensemble.json",
                                                 "mobilenet_v2"]  # the lock: rank 0 held it for the job
    for name in ensemble["members"]:
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == ["curves.png", "manifest.json", "metrics.csv", "model.safetensors"]
        manifest = json.loads((out / name / "manifest.json").read_text())
        assert manifest["world_size"] == 2 and len(manifest["history"]) == 1
        assert manifest["train_options"]["amp"] == "off"  # --amp is ignored on CPU, and recorded so
        assert np.isfinite(manifest["history"][0]["loss"]) and 0 <= manifest["history"][0]["val_miou"] <= 1


def test_run_with_two_processes(data, tmp_path):
    """All stages under torchrun: make-masks right after training in the same processes (every rank
    reads the completion flags before any rank writes: without that barrier this run fails), DDP
    training of baseline and weighted models, the evaluation shared by the ranks, the report from rank 0."""
    out = tmp_path / "run"
    result = torchrun("run", "--data", data, "--out", out, "--encoder", "mobilenet_v2", "--epochs", "1",
                      "--batch-size", "2", "--device", "cpu")
    assert result.stdout.count("per-class IoU") == 1  # one table, from rank 0
    for stage in ("baseline", "weighted"):
        for name in ("mobilenet_v2",):
            assert sorted(p.name for p in (out / stage / name).iterdir()) == [
                "curves.png", "manifest.json", "metrics.csv", "model.safetensors"]
            assert json.loads((out / stage / name / "manifest.json").read_text())["world_size"] == 2
    store = MaskStore.open(out / "masks.zarr")
    assert store.completed().all() and store.attrs["finished"]
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["model"] for r in results] == ["baseline mobilenet_v2", "baseline mobilenet_v2", "weighted mobilenet_v2"]


def test_unused_parameters_are_found_without_side_effects():
    from iumask.engine import unused_parameters
    from iumask.models import build_model

    torch.manual_seed(0)
    model = build_model("efficientnet-b0", 3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert sorted(unused_parameters(model, torch.device("cpu"))) == [
        "encoder._bn1.bias", "encoder._bn1.weight", "encoder._conv_head.weight"]
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not unused_parameters(build_model("mobilenet_v2", 3), torch.device("cpu"))


# ----------------------------------------------------------------------------- precision


def test_fp16_on_cpu_is_switched_off_with_a_warning_and_bf16_runs(capsys):
    options = TrainOptions(amp="fp16")
    assert resolve_amp(options, torch.device("cpu")).amp == "off"
    assert "needs a CUDA device" in capsys.readouterr().err
    assert resolve_amp(TrainOptions(amp="bf16"), torch.device("cpu")).amp == "bf16"  # torch's CPU autocast
    from iumask.errors import IumaskError

    with pytest.raises(IumaskError, match="--amp"):
        resolve_amp(TrainOptions(amp="fp8"), torch.device("cpu"))
    for amp in ("off", "fp16"):  # what resolve_amp leaves on a CPU: float32
        precision = Precision(resolve_amp(TrainOptions(amp=amp), torch.device("cpu")).amp, torch.device("cpu"))
        assert not precision.enabled and not precision.scaler().is_enabled()
        with precision.autocast():
            assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    bf16 = Precision("bf16", torch.device("cpu"))
    assert bf16.enabled and not bf16.scaled and not bf16.scaler().is_enabled()
    with bf16.autocast():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16
    cuda = Precision("fp16", torch.device("cuda"))
    assert cuda.enabled and cuda.scaled and cuda.dtype == torch.float16
    assert Precision("bf16", torch.device("cuda")).scaled is False


def test_a_log_file_gets_one_line_per_epoch(make_synthetic, tmp_path, capsys):
    """Output to a file (nohup, a cluster job) is not a terminal: each epoch is one plain line, so a
    long run's log shows its progress (the bar alone prints nothing until the end there)."""
    data = make_synthetic("log-lines", num_train=4, num_val=2)
    capsys.readouterr()
    iumask("train-baseline", "--data", data, "--out", tmp_path / "out", "--encoder", "mobilenet_v2", "--epochs",
           "2", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu", "--no-augment")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("baseline mobilenet_v2: epoch")]
    assert [line.split(" loss ")[0] for line in lines] == ["baseline mobilenet_v2: epoch 1/2",
                                                          "baseline mobilenet_v2: epoch 2/2"]
    assert all("val mIoU" in line and line.endswith(" s)") for line in lines)
