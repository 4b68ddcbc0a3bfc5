"""Overlapped host work (issue: keep the accelerator busy): the bounded background pool, ``--workers
auto``, make-masks overlapped against the serial path (equal stores, also after a SIGKILL while the
pool holds unwritten images), the batch's instances in parallel, bf16 autocast on the CPU, and the
worker count not being part of a model's identity."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runner import iumask
from test_store_reliability import killed

from iumask.config import DataConfig, MaskConfig
from iumask.core import instance_uncertainty_batch
from iumask.data.synthetic import generate_synthetic
from iumask.model import Model
from iumask.overlap import BackgroundPool, resolve_workers
from iumask.stages.masks import make_masks
from iumask.store import MaskStore

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = ["--encoder", "mobilenet_v2", "--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--device", "cpu",
         "--no-augment"]


# ----------------------------------------------------------------------------- the pool


def test_submit_blocks_while_max_pending_tasks_are_in_flight():
    release = threading.Event()
    started = []
    pool = BackgroundPool(threads=1, max_pending=2)
    pool.submit(lambda: (started.append(1), release.wait()))
    pool.submit(lambda: started.append(2))
    third_submitted = threading.Event()

    def producer():
        pool.submit(lambda: started.append(3))
        third_submitted.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not third_submitted.wait(0.3), "a third task entered while two were in flight"
    release.set()
    assert third_submitted.wait(10)
    thread.join()
    pool.drain()
    pool.close()
    assert started == [1, 2, 3]


def test_a_task_error_reaches_the_producer_and_queued_tasks_are_dropped():
    done = []

    def fail():
        raise ValueError("disk full")

    with pytest.raises(ValueError, match="disk full"):
        with BackgroundPool(threads=1, max_pending=8) as pool:
            pool.submit(fail)
            for i in range(50):
                pool.submit(done.append, i)
    assert len(done) < 50  # the producer stopped at the first error it saw


def test_the_error_of_the_last_task_submitted_surfaces_at_drain_and_at_the_end_of_the_block():
    """With no later ``submit`` to see it, the last task's error is raised by ``drain()`` and on leaving
    the ``with`` block: otherwise the last image's failed write would pass as a finished run."""
    def fail():
        raise ValueError("last write failed")

    pool = BackgroundPool(threads=2)
    pool.submit(lambda: None)
    pool.submit(fail)
    with pytest.raises(ValueError, match="last write failed"):
        pool.drain()
    pool.close()

    with pytest.raises(ValueError, match="last write failed"):
        with BackgroundPool(threads=2) as pool:
            pool.submit(lambda: None)
            pool.submit(fail)


def test_serial_pool_runs_in_the_caller_and_map_keeps_order():
    calls = []
    with BackgroundPool(threads=0) as pool:
        pool.submit(calls.append, threading.get_ident())
        assert calls == [threading.get_ident()]
        assert pool.map(lambda a, b: a * b, [1, 2, 3], [4, 5, 6]) == [4, 10, 18]
    with BackgroundPool(threads=3) as pool:
        assert pool.map(lambda a: a + 1, range(20)) == list(range(1, 21))


def test_workers_auto_leaves_two_cpus_to_the_main_process(monkeypatch):
    import iumask.overlap as overlap

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cpus, expected in ((1, 0), (2, 0), (4, 2), (16, 8), (64, 8)):
        monkeypatch.setattr(overlap, "available_cpus", lambda cpus=cpus: cpus)
        assert resolve_workers("auto") == expected
    monkeypatch.setattr(overlap, "available_cpus", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks share the machine's CPUs
    assert resolve_workers("auto") == 2
    assert resolve_workers(3) == 3 and resolve_workers(0) == 0


def test_instances_of_a_batch_in_parallel_equal_the_serial_ones():
    rng = np.random.default_rng(0)
    seg = torch.from_numpy(rng.integers(0, 5, (6, 40, 48)))
    entropy = torch.from_numpy(rng.random((6, 40, 48)).astype(np.float32))
    serial = instance_uncertainty_batch(seg, entropy, 5)
    with BackgroundPool(threads=3) as pool:
        parallel = instance_uncertainty_batch(seg, entropy, 5, map_fn=pool.map)
    assert torch.equal(serial, parallel)


# ----------------------------------------------------------------------------- make-masks


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("overlap")
    data = generate_synthetic(root / "data", num_train=10, num_val=2, height=32, width=32, seed=5)
    iumask("train-baseline", "--data", data, "--out", root / "baseline", *TRAIN, "--workers", "0")
    return root / "baseline" / "ensemble.json", data


def assert_same_store(a: Path, b: Path) -> None:
    first, second = MaskStore.open(a), MaskStore.open(b)
    assert first.completed().all() and second.completed().all()
    assert first.identity == second.identity
    for i in range(first.num_images):
        x, y = first.read(i), second.read(i)
        for name in x:
            assert np.array_equal(x[name], y[name]), (i, name)


def test_overlapped_make_masks_writes_the_serial_store(baseline, tmp_path, monkeypatch):
    ensemble, data = baseline
    options = DataConfig(data)
    # Serial into a file per image; background threads into shards of 3 images (written when
    # whole, by whichever thread finishes a shard's last image): the same values.
    monkeypatch.setenv("IUMASK_BACKGROUND_THREADS", "0")
    make_masks(Model.resolve(ensemble), options, MaskConfig(batch_size=3, num_workers=0, images_per_shard=1),
               tmp_path / "serial.zarr", device="cpu")
    monkeypatch.setenv("IUMASK_BACKGROUND_THREADS", "3")
    make_masks(Model.resolve(ensemble), options, MaskConfig(batch_size=3, num_workers=2, images_per_shard=3),
               tmp_path / "overlap.zarr", device="cpu")
    assert (MaskStore.open(tmp_path / "serial.zarr").images_per_shard,
            MaskStore.open(tmp_path / "overlap.zarr").images_per_shard) == (1, 3)
    assert_same_store(tmp_path / "serial.zarr", tmp_path / "overlap.zarr")


def test_make_masks_killed_with_images_in_the_pool_resumes_to_the_serial_store(baseline, tmp_path, monkeypatch):
    ensemble, data = baseline
    monkeypatch.setenv("IUMASK_BACKGROUND_THREADS", "0")
    make_masks(Model.resolve(ensemble), DataConfig(data), MaskConfig(batch_size=4, num_workers=0),
               tmp_path / "serial.zarr", device="cpu")
    store = tmp_path / "killed.zarr"
    args = ["make-masks", "--ensemble", ensemble, "--data", data, "--store", store, "--device", "cpu",
            "--batch-size", "4", "--workers", "1", "--images-per-shard", "3"]
    # SIGKILL at the 2nd shard's prediction file (images 3-5): images of the 2nd batch (4-7) are
    # in the pool or buffered; the rerun recomputes the shards not marked complete.
    killed(args, "open", r"killed\.zarr/prediction/c/1/", nth=1)
    flags = MaskStore.open(store, mode="r+").completed() if (store / "zarr.json").exists() else None
    assert flags is None or not flags.all()
    iumask(*args)
    assert_same_store(tmp_path / "serial.zarr", store)


# ----------------------------------------------------------------------------- precision and workers


def test_bf16_autocast_runs_on_the_cpu_in_training_make_masks_and_evaluate(baseline, tmp_path, capsys):
    ensemble, data = baseline
    out = tmp_path / "bf16"
    iumask("train-baseline", "--data", data, "--out", out, *TRAIN, "--amp", "bf16", "--workers", "0")
    manifest = json.loads((out / "mobilenet_v2" / "manifest.json").read_text())
    assert manifest["train_options"]["amp"] == "bf16"
    iumask("make-masks", "--ensemble", out, "--data", data, "--store", tmp_path / "bf16.zarr", "--device", "cpu",
           "--amp", "bf16")
    iumask("make-masks", "--ensemble", out, "--data", data, "--store", tmp_path / "fp32.zarr", "--device", "cpu")
    low, full = MaskStore.open(tmp_path / "bf16.zarr"), MaskStore.open(tmp_path / "fp32.zarr")
    assert low.identity["options"]["amp"] == "bf16" and "amp" not in full.identity["options"]
    gaps = [np.abs(low.read(i)["entropy"] - full.read(i)["entropy"]).max() for i in range(low.num_images)]
    assert max(gaps) < 0.05  # near-uniform softmax of a 1-epoch model: float16 storage hides most of it
    # bf16 really runs: the training loss and the probabilities differ from float32, slightly
    reference = json.loads((ensemble.parent / "mobilenet_v2" / "manifest.json").read_text())["history"]
    assert manifest["history"][0]["loss"] != reference[0]["loss"]
    assert manifest["history"][0]["loss"] == pytest.approx(reference[0]["loss"], rel=0.05)
    from iumask.device import Precision
    from iumask.model import load_source

    source = load_source(out, "ensemble", torch.device("cpu"))
    images = torch.randn(2, 3, 32, 32)
    with Precision("bf16", torch.device("cpu")).autocast():
        low_probs = source.probs(images)
    full_probs = source.probs(images)
    assert 0 < (low_probs - full_probs).abs().max() < 0.05
    results = {}
    for amp in ("off", "bf16"):
        iumask("evaluate", "--model", out / "mobilenet_v2", "--data", data, "--output", tmp_path / f"{amp}.json",
               "--device", "cpu", "--amp", amp, "--pavpu-threshold", "0.5")
        results[amp] = json.loads((tmp_path / f"{amp}.json").read_text())["results"][0]
    assert abs(results["off"]["nll"] - results["bf16"]["nll"]) < 0.05
    iumask("train-baseline", "--data", data, "--out", tmp_path / "fp16", *TRAIN, "--amp", "fp16", "--workers", "0")
    assert "needs a CUDA device" in capsys.readouterr().err
    assert json.loads((tmp_path / "fp16" / "mobilenet_v2" / "manifest.json").read_text())["train_options"]["amp"] \
        == "off"


def test_workers_change_neither_the_weights_nor_the_identity(baseline, tmp_path, capsys):
    ensemble, data = baseline
    folder = ensemble.parent
    capsys.readouterr()
    iumask("train-baseline", "--data", data, "--out", folder, *TRAIN, "--workers", "2")
    assert "cache hit" in capsys.readouterr().err  # trained with --workers 0
    other = tmp_path / "two-workers"
    iumask("train-baseline", "--data", data, "--out", other, *TRAIN, "--workers", "2")
    from safetensors.torch import load_file

    a, b = load_file(folder / "mobilenet_v2" / "model.safetensors"), load_file(other / "mobilenet_v2" /
                                                                               "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # A manifest of an earlier version recorded num_workers in its identity: still a cache hit.
    manifest_path = other / "mobilenet_v2" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert "num_workers" not in manifest["train_options"]
    manifest["train_options"]["num_workers"] = 0
    manifest_path.write_text(json.dumps(manifest))
    capsys.readouterr()
    iumask("train-baseline", "--data", data, "--out", other, *TRAIN)
    assert "cache hit" in capsys.readouterr().err


def test_make_masks_batches_images_of_one_size_made_without_a_training_size(baseline, tmp_path, monkeypatch):
    """A model trained at the images' own size (no --size) has no size; images of one shape are
    still batched (--batch-size), not passed one at a time. The profiler records the batch size
    each convolution saw."""
    ensemble, data = baseline
    monkeypatch.setenv("IUMASK_BACKGROUND_THREADS", "0")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        make_masks(Model.resolve(ensemble), DataConfig(data), MaskConfig(batch_size=4, num_workers=0),
                   tmp_path / "m.zarr", device="cpu")
    batches = {event.input_shapes[0][0] for event in prof.events()
               if event.name == "aten::conv2d" and event.input_shapes and event.input_shapes[0]}
    assert max(batches) == 4, batches  # 10 images: batches of 4, 4 and 2


def test_background_threads_follow_the_environment_variable(monkeypatch):
    from iumask.errors import IumaskError
    from iumask.overlap import background_threads

    monkeypatch.setattr("iumask.overlap.available_cpus", lambda: 8)
    monkeypatch.delenv("IUMASK_BACKGROUND_THREADS", raising=False)
    assert background_threads() == 2
    monkeypatch.setattr("iumask.overlap.available_cpus", lambda: 2)
    assert background_threads() == 1
    for value, expected in (("0", 0), (" 5 ", 5)):
        monkeypatch.setenv("IUMASK_BACKGROUND_THREADS", value)
        assert background_threads() == expected
    for bad in ("-1", "two", "1.5"):
        monkeypatch.setenv("IUMASK_BACKGROUND_THREADS", bad)
        with pytest.raises(IumaskError, match="IUMASK_BACKGROUND_THREADS must be an integer >= 0"):
            background_threads()
