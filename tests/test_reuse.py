"""The one reuse decision (iumask.artifacts.reuse_decision) and its users: members, checkpoints
(read once), mask stores (--overwrite replaces other inputs only), results files, one identity
normal form and one cache-hit line."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

import numpy as np
import pytest
from assertions import opened
from cli_runner import TINY_TRAIN, iumask

from iumask import engine
from iumask.artifacts import Reuse, comparable_identity, reuse_decision, same_identity
from iumask.errors import StoreMismatchError
from iumask.model import Model


class _Colour(Enum):
    RED = "red"


IDENTITY = {"stage": "baseline", "train_options": {"lr": 0.001, "size": [8, 8]}, "data": "/d"}


@pytest.mark.parametrize("stored, finished, overwrite, expected", [
    (None, False, False, Reuse.FRESH),
    (None, True, True, Reuse.FRESH),
    (IDENTITY, True, False, Reuse.HIT),
    (IDENTITY, False, False, Reuse.RESUME),
    (IDENTITY, True, True, Reuse.HIT),  # --overwrite replaces other inputs only
    (IDENTITY, False, True, Reuse.RESUME),
    ({**IDENTITY, "data": "/other"}, True, True, Reuse.REPLACE),
    ({**IDENTITY, "data": "/other"}, False, True, Reuse.REPLACE),
])
def test_reuse_decision_table(stored, finished, overwrite, expected):
    assert reuse_decision(stored, IDENTITY, finished, overwrite, "the thing", "fix it") is expected


def test_other_inputs_without_overwrite_are_the_one_refusal():
    stored = {**IDENTITY, "train_options": {"lr": 0.01, "size": [8, 8]}}
    for finished in (False, True):
        with pytest.raises(StoreMismatchError) as caught:
            reuse_decision(stored, IDENTITY, finished, False, "mask store m.zarr", "pass --overwrite",
                           StoreMismatchError)
        assert str(caught.value) == ("mask store m.zarr was made from other inputs (train_options.lr: stored 0.01, "
                                     "given 0.001); pass --overwrite")


def test_identities_compare_in_their_json_form():
    given = {"size": (8, 8), "path": Path("/d"), "colour": _Colour.RED, "count": np.int64(3),
             "scale": np.float32(0.5), "flags": np.array([True, False]),
             "train_options": {"lr": 0.001, "num_workers": 4}}
    stored = {"size": [8, 8], "path": "/d", "colour": "red", "count": 3, "scale": 0.5, "flags": [True, False],
              "train_options": {"lr": 0.001}}  # num_workers: retired from identities
    assert same_identity(stored, given) and comparable_identity(given) == stored
    assert reuse_decision(stored, given, True, False, "x", "y") is Reuse.HIT
    assert not same_identity({**stored, "count": 4}, given)
    assert not same_identity({**stored, "train_options": {"lr": 0.01}}, given)


# ----------------------------------------------------------------------------- the artifacts


class _Interrupted(Exception):
    pass


def _interrupted_baseline(data: Path, out: Path, monkeypatch, *extra) -> Path:
    """A train-baseline stopped right after its first mid-epoch checkpoint; the checkpoint's path."""
    real_save = engine.save_checkpoint

    def save_then_stop(path, state):
        real_save(path, state)
        raise _Interrupted

    monkeypatch.setattr(engine, "save_checkpoint", save_then_stop)
    args = ["train-baseline", "--data", data, "--out", out, *TINY_TRAIN, "--epochs", "2", "--checkpoint-every", "1",
            *extra]
    with pytest.raises(_Interrupted):
        iumask(*args)
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    return out / "mobilenet_v2" / "checkpoint.pt"


def test_a_checkpoint_is_read_once_and_one_of_other_inputs_is_refused(tiny_baseline, tmp_path, monkeypatch, capsys):
    data, _ = tiny_baseline(tmp_path)
    out = tmp_path / "run"
    checkpoint = _interrupted_baseline(data, out, monkeypatch)
    assert checkpoint.is_file()
    args = ["train-baseline", "--data", data, "--out", out, *TINY_TRAIN, "--epochs", "2", "--checkpoint-every", "1"]
    # Other options, no --overwrite: refused before any training, the checkpoint kept.
    before = checkpoint.read_bytes()
    iumask(*[a if a != "1e-3" else "2e-3" for a in args], expect=2)
    err = " ".join(capsys.readouterr().err.split())
    assert "the unfinished run in" in err and "train_options.lr: stored 0.001, given 0.002" in err
    assert checkpoint.read_bytes() == before
    # The same options: resumed, and the checkpoint file is opened once (it was read twice).
    with opened() as paths:
        iumask(*args)
    reads = [p for p in paths if p == str(checkpoint.resolve())]
    assert "resuming at epoch 1, step 1" in capsys.readouterr().err
    assert len(reads) == 1, reads
    assert (out / "mobilenet_v2" / "manifest.json").is_file() and not checkpoint.exists()


def test_overwrite_discards_a_checkpoint_of_other_inputs(tiny_baseline, tmp_path, monkeypatch, capsys):
    data, _ = tiny_baseline(tmp_path)
    out = tmp_path / "run"
    _interrupted_baseline(data, out, monkeypatch)
    capsys.readouterr()
    iumask("train-baseline", "--data", data, "--out", out, *[a if a != "1e-3" else "2e-3" for a in TINY_TRAIN],
           "--epochs", "2", "--checkpoint-every", "1", "--overwrite")
    assert "resuming" not in capsys.readouterr().err
    assert (out / "mobilenet_v2" / "manifest.json").is_file()


def test_overwrite_keeps_a_store_of_the_same_inputs_and_every_cache_hit_says_one_line(tiny_baseline, tmp_path,
                                                                                        capsys):
    """--overwrite replaces artifacts of *other* inputs (its help): a finished mask store of the same
    inputs is a cache hit with it too (before, it was computed again and swapped in). Every reused
    artifact prints the same line."""
    data, baseline = tiny_baseline(tmp_path)
    store = tmp_path / "m.zarr"
    masks = ["make-masks", "--ensemble", baseline, "--data", data, "--store", store, "--device", "cpu",
             "--workers", "0"]
    iumask(*masks)
    inode, metadata = os.stat(store).st_ino, (store / "zarr.json").read_bytes()
    capsys.readouterr()
    iumask(*masks, "--overwrite")
    err = " ".join(capsys.readouterr().err.split())
    assert f"cache hit: {store} was made from these inputs" in err
    assert os.stat(store).st_ino == inode and (store / "zarr.json").read_bytes() == metadata
    iumask(*masks, "--overwrite", "--normalize")  # other inputs: replaced
    assert os.stat(store).st_ino != inode
    capsys.readouterr()
    iumask("train-baseline", "--data", data, "--out", baseline, *TINY_TRAIN)
    err = " ".join(capsys.readouterr().err.split())
    assert f"cache hit: {baseline / 'mobilenet_v2'} was made from these inputs" in err
    # The results of run and experiment (cached_evaluate; iumask evaluate itself always evaluates).
    from iumask.config import DataConfig, EvalConfig
    from iumask.stages.evaluate import cached_evaluate

    results, options = tmp_path / "r.json", EvalConfig(num_workers=0, pavpu_threshold=0.5)
    model = Model.resolve(baseline / "ensemble.json")
    first = cached_evaluate([model], DataConfig(data), options, results, device="cpu")
    capsys.readouterr()
    assert cached_evaluate([model], DataConfig(data), options, results, device="cpu") == first
    err = " ".join(capsys.readouterr().err.split())
    assert f"cache hit: {results} was made from these inputs" in err


def test_the_plan_reads_each_artifacts_progress_from_its_files(tiny_baseline, tmp_path):
    """ensemble_progress and MaskStore.progress (what the experiment plan shows): missing, partial
    with the parts done, done; an unreadable store counts as begun."""
    from iumask.artifacts import CHECKPOINT_FILE, ENSEMBLE_FILE, Progress, State, ensemble_progress
    from iumask.store import MaskStore

    data, baseline = tiny_baseline(tmp_path)
    names = ["mobilenet_v2", "other"]
    folder = tmp_path / "training"
    assert ensemble_progress(folder, names) == Progress(State.MISSING, 0, 2)
    (folder / "other").mkdir(parents=True)
    (folder / "other" / CHECKPOINT_FILE).write_bytes(b"")
    assert ensemble_progress(folder, names) == Progress(State.PARTIAL, 0, 2)
    (folder / "mobilenet_v2").symlink_to(baseline / "mobilenet_v2")
    assert ensemble_progress(folder, names) == Progress(State.PARTIAL, 1, 2)
    (folder / ENSEMBLE_FILE).write_text("{}")
    assert ensemble_progress(folder, names) == Progress(State.DONE, 2, 2)

    store = tmp_path / "m.zarr"
    assert MaskStore.progress(store) == Progress(State.MISSING, 0, 0)
    iumask("make-masks", "--ensemble", baseline, "--data", data, "--store", store, "--device", "cpu", "--workers", "0")
    assert MaskStore.progress(store) == Progress(State.DONE, 4, 4)
    (store / "zarr.json").write_text("{not json")
    assert MaskStore.progress(store) == Progress(State.PARTIAL, 0, 0)
