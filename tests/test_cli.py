"""The four stages end to end through the CLI on small synthetic data, caching, resume and the
errors a user meets. Models are tiny (two MobileNetV2 members, 1 epoch, 64x64 images)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from cli_runner import iumask

from iumask.core import label_instances
from iumask.data.synthetic import generate_synthetic
from iumask.store import MaskStore

pytestmark = pytest.mark.slow

TRAIN = ["--encoder", "mobilenet_v2", "--encoder", "mobilenet_v2", "--epochs", "1", "--batch-size", "4",
         "--lr", "1e-3", "--backbone-lr-factor", "1", "--device", "cpu"]



@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A synthetic dataset, a trained 2-member baseline and its mask store, shared by the tests."""
    root = tmp_path_factory.mktemp("e2e")
    data = generate_synthetic(root / "data", num_train=10, num_val=4, height=64, width=64, seed=1)
    iumask("train-baseline", "--data", data, "--out", root / "baseline", *TRAIN)
    iumask("make-masks", "--ensemble", root / "baseline" / "ensemble.json", "--data", data,
           "--store", root / "masks.zarr", "--device", "cpu")
    return root, data


def test_baseline_members_and_manifests(work):
    root, data = work
    ensemble = json.loads((root / "baseline" / "ensemble.json").read_text())
    assert ensemble["members"] == ["mobilenet_v2", "mobilenet_v2-2"]
    for name in ensemble["members"]:
        manifest = json.loads((root / "baseline" / name / "manifest.json").read_text())
        assert manifest["complete"] and manifest["architecture"] == "DeepLabV3Plus"
        assert manifest["classes"]["names"][0] == "sky"
        assert len(manifest["history"]) == 1 and np.isfinite(manifest["history"][0]["loss"])
        assert manifest["normalization"]["mean"] == [0.485, 0.456, 0.406]
        assert not (root / "baseline" / name / "checkpoint.pt").exists()
    seeds = [json.loads((root / "baseline" / n / "manifest.json").read_text())["train_options"]["seed"]
             for n in ensemble["members"]]
    assert seeds == [0, 1]


def test_mask_store_contents(work):
    root, data = work
    store = MaskStore.open(root / "masks.zarr")
    assert store.num_images == 10 and store.completed().all() and store.attrs["finished"]
    assert store.image_ids == sorted(store.image_ids)
    assert store.identity["options"]["connectivity"] == 8
    assert store.identity["options"]["instances_from"] == "prediction"
    assert set(store.identity["member_sha256"]) == {"mobilenet_v2", "mobilenet_v2-2"}
    means = []
    for i in range(store.num_images):
        arrays = store.read(i)
        entropy, iu, pred = arrays["entropy"], arrays["instance_uncertainty"], arrays["prediction"]
        assert entropy.shape == (64, 64) and entropy.min() >= 0 and entropy.max() <= np.log(10) + 1e-2
        # IU is constant on every instance of the stored prediction and equals its mean entropy.
        instances, _ = label_instances(pred, 10)
        for k in np.unique(instances)[:20]:
            values = iu[instances == k]
            assert np.ptp(values) < 1e-3
            assert abs(values[0] - entropy[instances == k].mean()) < 5e-3
        means.append(entropy.astype(np.float64).mean())
    assert store.attrs["mean_entropy"] == pytest.approx(np.mean(means), rel=1e-4)


def test_stages_are_cache_hits(work, capsys):
    root, data = work
    weights = root / "baseline" / "mobilenet_v2" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    iumask("train-baseline", "--data", data, "--out", root / "baseline", *TRAIN)
    iumask("make-masks", "--ensemble", root / "baseline", "--data", data, "--store", root / "masks.zarr",
           "--device", "cpu")
    err = capsys.readouterr().err
    assert err.count("cache hit") == 3
    assert weights.stat().st_mtime_ns == before


def test_weighted_training_and_evaluation(work, tmp_path):
    root, data = work
    iumask("train-weighted", "--data", data, "--store", root / "masks.zarr", "--out", tmp_path / "weighted",
           "--exponent", "2", *TRAIN)
    manifest = json.loads((tmp_path / "weighted" / "mobilenet_v2" / "manifest.json").read_text())
    assert manifest["stage"] == "weighted" and manifest["loss"]["exponent"] == 2.0
    assert manifest["image_size"] is None or manifest["image_size"] == [64, 64]
    out = tmp_path / "results.json"
    iumask("evaluate", "--model", root / "baseline" / "mobilenet_v2", "--model", root / "baseline" / "ensemble.json",
           "--model", tmp_path / "weighted" / "mobilenet_v2", "--data", data, "--output", out, "--device", "cpu")
    results = json.loads(out.read_text())["results"]
    assert [r["model"] for r in results] == ["baseline mobilenet_v2", "baseline ensemble", "weighted mobilenet_v2"]
    for r in results:
        assert len(r["iou"]) == 10 and 0 <= r["miou"] <= 1 and 0 <= r["pavpu"] <= 1
        counts = r["pavpu_counts"]
        assert sum(counts.values()) > 0
    # The PAvPU threshold defaults to the model's training-set mean entropy, recorded once computed.
    recorded = json.loads((root / "baseline" / "ensemble.json").read_text())["train_mean_entropy"]
    assert results[1]["pavpu_threshold"] == pytest.approx(recorded)
    store_mean = MaskStore.open(root / "masks.zarr").attrs["mean_entropy"]
    assert recorded == pytest.approx(store_mean, rel=2e-3)  # same ensemble, same images (float16 store)
    csv = out.with_suffix(".csv").read_text().splitlines()
    assert len(csv) == 4 and csv[0].startswith("label,model,path,data,split,resolution,inference,iou_sky")


def test_domain_shift_and_foreign_classes(work, tmp_path, capsys):
    root, data = work
    shifted = generate_synthetic(tmp_path / "fog", num_train=2, num_val=3, height=64, width=64, seed=2,
                                 domain="shifted")
    iumask("evaluate", "--model", root / "baseline" / "mobilenet_v2", "--data", shifted,
           "--output", tmp_path / "shift.json", "--device", "cpu")
    assert json.loads((tmp_path / "shift.json").read_text())["results"][0]["split"] == "val"
    classes = json.loads((shifted / "classes.json").read_text())
    classes["names"][3] = "pavement"
    (shifted / "classes.json").write_text(json.dumps(classes))
    capsys.readouterr()
    iumask("evaluate", "--model", root / "baseline" / "mobilenet_v2", "--data", shifted,
           "--output", tmp_path / "other.json", "--device", "cpu", expect=2)
    err = capsys.readouterr().err
    assert "fog" in err and "same class names" in err
    assert not (tmp_path / "other.json").exists()


def test_store_mismatch_refused_then_overwritten(work, tmp_path, capsys):
    root, data = work
    store = tmp_path / "masks.zarr"
    args = ["make-masks", "--ensemble", root / "baseline", "--data", data, "--store", store, "--device", "cpu"]
    iumask(*args)
    capsys.readouterr()
    iumask(*args, "--connectivity", "4", expect=2)
    err = capsys.readouterr().err
    assert "connectivity" in err and "--overwrite" in err and str(store) in err.replace("\n", "")
    assert MaskStore.open(store).identity["options"]["connectivity"] == 8  # untouched
    iumask(*args, "--connectivity", "4", "--overwrite")
    assert MaskStore.open(store).identity["options"]["connectivity"] == 4


def test_train_weighted_refuses_store_of_other_data(work, tmp_path, capsys):
    root, data = work
    other = generate_synthetic(tmp_path / "other", num_train=10, num_val=4, height=64, width=64, seed=9)
    capsys.readouterr()
    iumask("train-weighted", "--data", other, "--store", root / "masks.zarr", "--out", tmp_path / "w", *TRAIN,
           expect=2)
    err = capsys.readouterr().err
    assert "masks.zarr" in err and "dataset_fingerprint" in err and "make-masks" in err
    assert not (tmp_path / "w" / "mobilenet_v2" / "manifest.json").exists()


def test_trained_folder_with_other_inputs_is_not_overwritten(work, capsys):
    root, data = work
    weights = root / "baseline" / "mobilenet_v2" / "model.safetensors"
    digest = weights.read_bytes()
    capsys.readouterr()
    iumask("train-baseline", "--data", data, "--out", root / "baseline", *TRAIN[:-4], "--lr", "0.5", "--device", "cpu",
           expect=2)
    err = capsys.readouterr().err
    assert "--overwrite" in err and "train_options" in err
    assert weights.read_bytes() == digest


def test_config_file_options_are_used_and_recorded(tmp_path):
    data = generate_synthetic(tmp_path / "data", num_train=4, num_val=2, height=32, width=32, seed=3)
    config = tmp_path / "cfg.toml"
    config.write_text('device = "cpu"\n[train-baseline]\nepochs = 2\nbatch-size = 2\nlr = 0.002\n'
                      'encoder = ["mobilenet_v2"]\nbackbone-lr-factor = 1.0\n')
    iumask("--config", config, "train-baseline", "--data", data, "--out", tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "mobilenet_v2" / "manifest.json").read_text())
    assert manifest["train_options"]["epochs"] == 2 and manifest["train_options"]["lr"] == 0.002
    assert len(manifest["history"]) == 2


@pytest.mark.parametrize(
    "setup, args, needle",
    [
        (None, ["train-baseline", "--data", "{tmp}/missing", "--device", "cpu"], "missing"),
        ("label_range", ["train-baseline", "--data", "{data}", "--device", "cpu", "--epochs", "1",
                         "--encoder", "mobilenet_v2", "--out", "{tmp}/o"], "outside"),
        ("corrupt_image", ["train-baseline", "--data", "{data}", "--device", "cpu", "--epochs", "1",
                           "--encoder", "mobilenet_v2", "--out", "{tmp}/o"], "train_0001"),
        (None, ["train-baseline", "--data", "{data}", "--size", "64by64"], "HxW"),
        (None, ["evaluate", "--model", "{tmp}/nothing", "--data", "{data}"], "no model here"),
        ("corrupt_weights", ["evaluate", "--model", "{tmp}/m", "--data", "{data}", "--device", "cpu"],
         "model.safetensors"),
        (None, ["train-weighted", "--data", "{data}", "--store", "{tmp}/none.zarr"], "none.zarr"),
        ("bad_config", ["--config", "{tmp}/bad.toml", "run"], "bad.toml"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, capsys, setup, args, needle):
    import cv2

    data = generate_synthetic(tmp_path / "data", num_train=4, num_val=2, height=32, width=32, seed=4)
    if setup == "label_range":
        label = cv2.imread(str(data / "labels" / "train" / "train_0002.png"), cv2.IMREAD_UNCHANGED)
        label[0, 0] = 42
        cv2.imwrite(str(data / "labels" / "train" / "train_0002.png"), label)
    elif setup == "corrupt_image":
        path = data / "images" / "train" / "train_0001.png"
        path.write_bytes(path.read_bytes()[:40])
    elif setup == "corrupt_weights":
        iumask("train-baseline", "--data", data, "--out", tmp_path / "b", "--encoder", "mobilenet_v2",
               "--epochs", "1", "--batch-size", "2", "--device", "cpu")
        (tmp_path / "m").mkdir()
        for name in ("manifest.json", "model.safetensors"):
            (tmp_path / "m" / name).write_bytes((tmp_path / "b" / "mobilenet_v2" / name).read_bytes())
        weights = tmp_path / "m" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif setup == "bad_config":
        (tmp_path / "bad.toml").write_text("epochs = = 3\n")
    capsys.readouterr()
    iumask(*(a.format(tmp=tmp_path, data=data) for a in args), expect=2)
    err = capsys.readouterr().err.strip()
    # Progress bars may precede it; the error itself is the last line.
    last = err[err.rindex("error:"):] if "error:" in err else err
    assert last.startswith("error:") and needle in last.replace("\n", "")
    assert "Traceback" not in err


def test_interrupted_make_masks_resumes(work, tmp_path):
    """Kill a real make-masks process part way, rerun, and get the same store as an uninterrupted run."""
    root, _ = work
    data = generate_synthetic(tmp_path / "data", num_train=60, num_val=2, height=64, width=64, seed=5)
    store = tmp_path / "masks.zarr"
    cmd = [sys.executable, "-m", "iumask.cli", "make-masks", "--ensemble", str(root / "baseline"), "--data",
           str(data), "--store", str(store), "--batch-size", "1", "--device", "cpu", "--images-per-shard", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    complete_dir = store / "complete" / "c"  # a flag file per finished shard of 4 images
    deadline = time.time() + 120
    while time.time() < deadline and (not complete_dir.is_dir() or len(list(complete_dir.iterdir())) < 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = MaskStore.open(store).completed()
    assert 8 <= done.sum() < 60, "the process should have been killed part way"
    assert done.sum() % 4 == 0  # whole shards
    iumask("make-masks", "--ensemble", root / "baseline", "--data", data, "--store", store, "--batch-size", "1",
           "--device", "cpu")
    resumed = MaskStore.open(store)
    assert resumed.completed().all() and resumed.attrs["finished"]
    iumask("make-masks", "--ensemble", root / "baseline", "--data", data, "--store", tmp_path / "fresh.zarr",
           "--batch-size", "1", "--device", "cpu")
    fresh = MaskStore.open(tmp_path / "fresh.zarr")
    for i in range(60):
        a, b = resumed.read(i), fresh.read(i)
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=2e-3)
    assert resumed.attrs["mean_entropy"] == pytest.approx(fresh.attrs["mean_entropy"], rel=1e-5)


def test_run_all_stages_then_cache_hits(tmp_path, capsys):
    data = generate_synthetic(tmp_path / "data", num_train=6, num_val=2, height=32, width=64, seed=6)
    args = ["run", "--data", data, "--out", tmp_path / "run", "--encoder", "mobilenet_v2", "--epochs", "1",
            "--batch-size", "2", "--lr", "1e-3", "--device", "cpu"]
    iumask(*args)
    first = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
    assert [r["model"] for r in first] == ["baseline mobilenet_v2", "baseline mobilenet_v2", "weighted mobilenet_v2"]
    capsys.readouterr()
    iumask(*args)
    captured = capsys.readouterr()
    assert captured.err.count("cache hit") == 4  # baseline member, store, weighted member, results
    assert json.loads((tmp_path / "run" / "results.json").read_text())["results"] == first


def test_version_value_typos_and_help_texts(capsys, monkeypatch):
    """--version prints the version; a value outside an option's choices gets one clean line with
    the closest choice; help texts show what they say (a [extra] is not eaten as markup)."""
    import iumask as package

    iumask("--version")
    assert capsys.readouterr().out.strip() == f"iumask {package.__version__}"
    iumask("train-baseline", "--data", "x", "--class-weights", "inverce", expect=2)
    err = capsys.readouterr().err.replace("\n", " ")
    assert "did you mean 'inverse'?" in err and "Value error" not in err
    iumask("train-baseline", "--help")
    assert "iumask[tensorboard]" in re.sub(r"\s", "", capsys.readouterr().out)
    iumask("make-synthetic", "--help")
    assert "member k" not in capsys.readouterr().out


def test_every_help_reads_at_80_columns(capsys, monkeypatch):
    """Plain help at 80 columns: every option named in full (no "…"), values as INTEGER, NUMBER,
    TEXT, PATH or the choices (no typer placeholders such as <int> or <bool>), arguments in the
    usage line by name (SPEC, not {spec}), and --config in every command's help."""
    import typer

    from iumask.cli import app, readable_help

    monkeypatch.setenv("COLUMNS", "80")
    group = readable_help(typer.main.get_command(app))
    for name, command in group.commands.items():
        capsys.readouterr()
        iumask(name, "--help")
        text = capsys.readouterr().out
        assert "…" not in text and "{" not in text.splitlines()[0], name
        options = text.split("Options:")[1]  # (an argument's line keeps typer's type, e.g. SPEC <path>)
        assert not re.search(r"<(int|float|str|bool|path|list\[\w+\])>", options), name
        assert "--config FILE" in " ".join(text.split()), name
        for param in command.params:
            for flag in param.opts:
                assert flag in text, (name, flag)
    iumask("experiment", "--help")
    assert capsys.readouterr().out.startswith("Usage: iumask experiment [OPTIONS] SPEC\n")
