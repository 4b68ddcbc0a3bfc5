"""The mask store under faults and unusual input: one writer at a time (an OS lock that a
killed holder leaves free, shared by the ranks of one torchrun job), class ids above 255 end to end,
``--overwrite`` that builds the replacement beside the old store and swaps it in only when finished,
creation that a kill cannot leave half done, zarr's leftovers, and ``MaskStore.write``'s completion flag.

Kills are real: a new process SIGKILLs (or SIGSTOPs) itself at an exact point of the real code,
found with a Python audit hook (e.g. the ``open`` of zarr's temporary file for a chunk, a rename)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import zarr
from cli_runner import iumask

from iumask.artifacts import resolve_model_files
from iumask.core import instance_uncertainty, label_instances, pixel_entropy
from iumask.data.dataset import SegmentationDataset
from iumask.data.folder import ClassInfo, FolderDataset
from iumask.data.synthetic import generate_synthetic
from iumask.dataset_stats import label_statistics, mask_statistics
from iumask.errors import IumaskError
from iumask.inference import ensemble_probs
from iumask.model import Model
from iumask.models import load_member, save_member
from iumask.store import MaskStore

PARTIAL = r"\.[0-9a-f]{32}\.partial"  # zarr's atomic writes go through <name>.<uuid hex>.partial

# Runs `iumask ARGS...` (or `-c CODE`) and sends itself SIGNAL at the NTH audit event whose name
# matches EVENT and whose arguments, joined by spaces, match PATTERN.
SIGNAL_AT = r"""
import os, re, signal, sys, threading
sig, event, pattern, nth = int(sys.argv[1]), re.compile(sys.argv[2]), re.compile(sys.argv[3]), int(sys.argv[4])
seen = 0

def hook(name, args):
    global seen
    if event.fullmatch(name) and pattern.search(" ".join(map(str, args))):
        seen += 1
        if seen == nth:  # to this thread, so it stops before its next step (a process-wide SIGSTOP may not)
            signal.pthread_kill(threading.get_ident(), sig)

sys.addaudithook(hook)
if sys.argv[5] == "-c":
    exec(sys.argv[6])
else:
    sys.argv = ["iumask", *sys.argv[5:]]
    from iumask.cli import main
    main()
"""


def start(argv, event: str, pattern: str, nth: int = 1, sig: int = signal.SIGKILL) -> subprocess.Popen:
    """A new process running ``iumask *argv`` (or ``["-c", code]``) that sends itself ``sig`` at
    the ``nth`` audit event ``event`` (a regex, e.g. ``open`` or ``os\\.(rename|link)``) whose
    arguments match ``pattern``."""
    cmd = [sys.executable, "-c", SIGNAL_AT, str(int(sig)), event, pattern, str(nth), *map(str, argv)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def killed(argv, event: str, pattern: str, nth: int = 1) -> None:
    """Run ``start`` to its SIGKILL; fail if the process was not killed there."""
    proc = start(argv, event, pattern, nth)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, \
        f"not killed at {event} {pattern} (exit {proc.returncode}): {err[-3000:]}"


def stopped(argv, event: str, pattern: str, nth: int = 1) -> subprocess.Popen:
    """Run ``start`` until it stops itself with SIGSTOP; the caller kills it."""
    proc = start(argv, event, pattern, nth, signal.SIGSTOP)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"not stopped at {event} {pattern}: {proc.stderr.read()[-3000:]}"
    return proc


def identity(n: int = 3, shape=(8, 8), classes: int = 3, **changes) -> dict:
    ident = {"image_ids": [f"img{i}" for i in range(n)], "image_shapes": [list(shape)] * n,
             "class_names": [f"c{i}" for i in range(classes)], "options": {"connectivity": 8},
             "member_sha256": {"m": "0" * 64}, "dataset_fingerprint": "f00d"}
    ident.update(changes)
    return ident


def arrays(seed: int, shape=(8, 8), classes: int = 3):
    rng = np.random.default_rng(seed)
    return (rng.random(shape).astype(np.float32), rng.random(shape).astype(np.float32),
            rng.integers(0, classes, shape))


def store_code(path: Path, ident: dict, then: str = "") -> list[str]:
    """``-c`` arguments for a process that opens or creates the store, then runs ``then`` (``s`` is the store)."""
    return ["-c", f"import json, os, signal\nfrom iumask.store import MaskStore\n"
                  f"s = MaskStore.open_or_create({str(path)!r}, json.loads({json.dumps(ident)!r}))\n{then}"]


def same_store(a: Path, b: Path, ignore=("ensemble",)) -> None:
    """Same attributes (but ``ignore``) and bitwise the same arrays."""
    sa, sb = MaskStore.open(a), MaskStore.open(b)
    attrs = [{k: v for k, v in s.attrs.items() if k not in ignore} for s in (sa, sb)]
    assert attrs[0] == attrs[1]
    np.testing.assert_array_equal(sa.completed(), sb.completed())
    for i in np.flatnonzero(sa.completed()):
        x, y = sa.read(i), sb.read(i)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def chunk_files(store: Path, shards) -> dict:
    """(inode, mtime) of the entropy file of each shard: unchanged unless rewritten."""
    stats = {i: os.stat(store / "entropy" / "c" / str(i) / "0" / "0") for i in shards}
    return {i: (s.st_ino, s.st_mtime_ns) for i, s in stats.items()}


def only(folder: Path, *names: str) -> None:
    """``folder`` holds exactly ``names``: no staged or set-aside store is left behind."""
    assert sorted(os.listdir(folder)) == sorted(names)


# ----------------------------------------------------------------------------- store level (fast)


def test_writer_lock_names_the_holder_and_a_killed_holders_lock_is_taken(tmp_path):
    """Item 2: a second writer is refused with a one-line error naming the holder; the ranks of the
    holder's job open the store without the lock; once the holder is SIGKILLed its lock is taken."""
    path, ident = tmp_path / "s.zarr", identity()
    holder = subprocess.Popen([sys.executable, *store_code(path, ident, "os.kill(os.getpid(), signal.SIGSTOP)")],
                              stderr=subprocess.PIPE, text=True)
    _, status = os.waitpid(holder.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), holder.stderr.read()
    try:
        for attempt in (lambda: MaskStore.open_or_create(path, ident),
                        lambda: MaskStore.open_or_create(path, identity(classes=4), overwrite=True),
                        lambda: MaskStore.create(path, ident, overwrite=True)):
            with pytest.raises(IumaskError) as info:
                attempt()
            message = str(info.value)
            assert "\n" not in message and str(path) in message and "use another path" in message
            assert f"pid {holder.pid} on {socket.gethostname()}" in message
        MaskStore.open(path, mode="r+").write(0, *arrays(0))  # another rank of the holder's job
    finally:
        holder.kill()
        holder.wait()
    store = MaskStore.open_or_create(path, ident)  # the dead holder's lock is free
    assert store.completed().tolist() == [True, False, False]
    store.close()
    taker = subprocess.run([sys.executable, *store_code(path, ident)], capture_output=True, text=True)
    assert taker.returncode == 0, taker.stderr  # released by close()
    only(tmp_path, "s.zarr")


def writer_in_another_process(path: Path, ident: dict) -> subprocess.CompletedProcess:
    """Another process opens the store as its writer and, if it may, writes image 2 and closes it."""
    then = "import numpy as np\ns.write(2, np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((8, 8), int))\ns.close()"
    return subprocess.run([sys.executable, *store_code(path, ident, then)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


def assert_refused(process: subprocess.CompletedProcess, why: str) -> None:
    assert process.returncode != 0, f"another process became the writer {why}"
    assert "is being written by another process" in process.stderr, process.stderr[-2000:]


def test_writer_lock_is_held_until_the_last_handle_of_this_process_closes(tmp_path):
    """Two writer handles on one store in this process share the lock: closing the first keeps
    other processes out (the second may still be writing), closing the second releases it."""
    path, ident = tmp_path / "s.zarr", identity()
    first = MaskStore.open_or_create(path, ident)
    second = MaskStore.open_or_create(path, ident)  # resumes the same store: a second handle
    first.close()
    assert_refused(writer_in_another_process(path, ident), "after the first of two handles closed")
    second.write(0, *arrays(0))
    second.close()  # the last handle: must not fail, and releases the lock
    process = writer_in_another_process(path, ident)
    assert process.returncode == 0, process.stderr[-2000:]
    assert MaskStore.open(path).completed().tolist() == [True, False, True]


def test_a_resumed_writer_holds_the_writer_lock(tmp_path):
    """``open_or_create`` on an existing store made from the same identity (a resume) holds the writer
    lock like a new store does: another process is refused until the resumed writer closes."""
    path, ident = tmp_path / "s.zarr", identity()
    MaskStore.open_or_create(path, ident).close()  # an earlier run made the store and stopped
    resumed = MaskStore.open_or_create(path, ident)
    assert_refused(writer_in_another_process(path, ident), "while a resumed writer had the store open")
    resumed.write(0, *arrays(0))
    resumed.close()
    process = writer_in_another_process(path, ident)
    assert process.returncode == 0, process.stderr[-2000:]
    assert MaskStore.open(path).completed().tolist() == [True, False, True]


def test_predictions_are_uint16_beyond_256_classes_and_range_checked(tmp_path):
    """Item 3: the prediction dtype follows the class count, and the range check can fire."""
    wide = MaskStore.create(tmp_path / "wide", identity(classes=300))
    assert wide.identity["format_version"] == 2 and wide.prediction_dtype == np.uint16
    pred = np.arange(64).reshape(8, 8) + 250  # class ids 250..313 (int64, as argmax gives them)
    wide.write(0, *arrays(0)[:2], pred)
    out = MaskStore.open(tmp_path / "wide").read(0)["prediction"]
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, pred)
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        wide.write(1, *arrays(1)[:2], pred + 70000)

    narrow = MaskStore.create(tmp_path / "narrow", identity(classes=256))
    assert narrow.identity["format_version"] == 1 and narrow.prediction_dtype == np.uint8
    with pytest.raises(ValueError, match=r"0\.\.255"):
        narrow.write(0, *arrays(0)[:2], pred)  # would wrap 256.. onto 0..
    with pytest.raises(ValueError, match="integer"):
        narrow.write(0, *arrays(0)[:2], pred.astype(np.float32))
    assert not narrow.completed().any()


def legacy_store(path: Path, ident: dict) -> None:
    """A store as iumask wrote them before wide predictions: format_version 1, uint8 predictions."""
    group = zarr.open_group(path, mode="w-", zarr_format=3, attributes={"format_version": 1, **ident})
    n, (h, w) = len(ident["image_ids"]), ident["image_shapes"][0]
    for name in ("entropy", "instance_uncertainty"):
        group.create_array(name, shape=(n, h, w), chunks=(1, h, w), dtype="float16", fill_value=0)
    group.create_array("prediction", shape=(n, h, w), chunks=(1, h, w), dtype="uint8", fill_value=0)
    group.create_array("complete", shape=(n,), chunks=(1,), dtype="bool", compressors=None, fill_value=False)
    entropy, iu, pred = arrays(0)
    group["entropy"][0], group["instance_uncertainty"][0] = entropy.astype(np.float16), iu.astype(np.float16)
    group["prediction"][0] = pred.astype(np.uint8)
    group["complete"][0] = True


def test_format_version_1_stores_are_read_and_resumed_but_wrapped_ones_refused(tmp_path):
    path, ident = tmp_path / "old.zarr", identity()
    legacy_store(path, ident)
    out = MaskStore.open(path).read(0)
    assert out["prediction"].dtype == np.uint8
    np.testing.assert_array_equal(out["prediction"], arrays(0)[2])
    with MaskStore.open_or_create(path, ident) as store:  # resumed, no --overwrite needed
        assert store.completed().tolist() == [True, False, False]
        store.write(1, *arrays(1))
    # A version-1 store of more than 256 classes holds class ids cut to 8 bits: refused.
    wrapped = tmp_path / "wrapped.zarr"
    legacy_store(wrapped, identity(classes=300))
    with pytest.raises(IumaskError, match=r"format_version 1 for 300 classes.*overwrite=True") as info:
        MaskStore.open(wrapped)
    assert str(wrapped) in str(info.value)
    with MaskStore.open_or_create(wrapped, identity(classes=300), overwrite=True) as store:
        store.commit()
    assert MaskStore.open(wrapped).prediction_dtype == np.uint16


def test_statistics_count_classes_above_255(tmp_path):
    """Item 3: mask statistics of uint16 predictions and label statistics of a 300-class dataset."""
    path = tmp_path / "wide.zarr"
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 300, (16, 16)) for _ in range(2)]
    with MaskStore.create(path, identity(n=2, shape=(16, 16), classes=300)) as store:
        for i, pred in enumerate(preds):
            store.write(i, np.full((16, 16), 0.5), (pred % 7) / 7.0, pred)
    per = mask_statistics(MaskStore.open(path))["per_class"]
    everything = np.concatenate([p.ravel() for p in preds])
    assert per["pixels"] == np.bincount(everything, minlength=300).tolist()
    present = np.unique(everything)
    for c in (present[0], present[present > 255][0], present[-1]):
        assert per["mean_iu"][c] == pytest.approx((c % 7) / 7.0, abs=1e-3)  # float16 IU

    class Labels:  # the label_statistics interface; 300 classes, 8- or 16-bit label arrays
        classes = ClassInfo(names=tuple(f"c{i}" for i in range(300)), ignore_index=65535)
        ids = ["a", "b"]

        def __init__(self, dtype, top):
            self.labels = [np.random.default_rng(i).integers(0, top, (12, 12)).astype(dtype) for i in range(2)]

        def read_label(self, i):
            return self.labels[i]

    for dtype, top in ((np.uint8, 256), (np.uint16, 300)):
        dataset = Labels(dtype, top)
        stats = label_statistics(dataset)
        counts = np.bincount(np.concatenate([x.ravel() for x in dataset.labels]).astype(np.int64), minlength=300)
        assert stats["per_class"]["pixels"] == counts.tolist()


def test_zarr_leftovers_are_recognised_but_foreign_files_never_deleted(tmp_path):
    """Item 6: a 0-byte zarr.<uuid>.partial (a kill in zarr's atomic write) and the lock file do not
    stop a resume or --overwrite; a folder with anything else in it is never deleted."""
    path, ident = tmp_path / "s.zarr", identity()
    MaskStore.create(path, ident).close()
    (path / f"zarr.{uuid.uuid4().hex}.partial").touch()
    with MaskStore.open_or_create(path, ident) as store:
        store.write(0, *arrays(0))
    with MaskStore.open_or_create(path, identity(classes=4), overwrite=True) as store:
        store.commit()
    assert MaskStore.open(path).identity["class_names"] == [f"c{i}" for i in range(4)]
    assert not any(name.endswith(".partial") for name in os.listdir(path))
    only(tmp_path, "s.zarr")

    (path / "notes.txt").write_text("mine")
    for attempt in (lambda: MaskStore.open_or_create(path, ident, overwrite=True),
                    lambda: MaskStore.create(path, ident, overwrite=True)):
        with pytest.raises(IumaskError, match="not a mask store") as info:
            attempt()
        assert str(path) in str(info.value)
    assert (path / "notes.txt").read_text() == "mine" and MaskStore.open(path).num_images == 3

    # A user's folder that holds something named like a store array, and nothing of zarr's.
    user = tmp_path / "user"
    (user / "prediction").mkdir(parents=True)
    (user / "prediction" / "a.png").write_bytes(b"png")
    for overwrite in (False, True):
        with pytest.raises(IumaskError, match="not a mask store"):
            MaskStore.open_or_create(user, ident, overwrite=overwrite)
    assert (user / "prediction" / "a.png").read_bytes() == b"png"

    # The staging folder is iumask's, but a file iumask did not write there is not deleted either.
    staged = tmp_path / ".t.zarr.iumask-new"
    staged.mkdir()
    (staged / "x.txt").write_text("x")
    with pytest.raises(IumaskError, match="did not write"):
        MaskStore.open_or_create(tmp_path / "t.zarr", ident)
    assert (staged / "x.txt").exists() and not (tmp_path / "t.zarr").exists()


@pytest.mark.parametrize("event, pattern, nth", [
    ("open", PARTIAL, 1),  # the group's metadata: nothing written yet
    (r"os\.(rename|link)", PARTIAL, 1),  # the group's metadata written to its temporary file only
    ("open", PARTIAL, 6),  # some arrays created
    ("os.rename", r"\.iumask-new ", 1),  # all created, not yet moved into place
], ids=["group-open", "group-partial", "arrays", "rename"])
def test_kill_while_creating_leaves_nothing_that_blocks_the_rerun(tmp_path, event, pattern, nth):
    """Item 6: a store killed while being created is never half there; the rerun needs no --overwrite."""
    path, ident = tmp_path / "s.zarr", identity()
    killed(store_code(path, ident), event, pattern, nth)
    assert not path.exists()
    with MaskStore.open_or_create(path, ident) as store:
        assert store.path == path and not store.completed().any()
        for i in range(3):
            store.write(i, *arrays(i))
    assert MaskStore.open(path).completed().all()
    only(tmp_path, "s.zarr")


@pytest.mark.parametrize("rewrite", [False, True], ids=["new", "rewrite"])
@pytest.mark.parametrize("array", ["entropy", "instance_uncertainty", "prediction"])
def test_write_killed_before_all_its_arrays_are_written_leaves_the_image_incomplete(tmp_path, array, rewrite):
    """MaskStore.write must set the completion flag only after all three arrays: a real process is
    killed while write() stores ``array`` (a new image, or a finished one being rewritten)."""
    path, ident = tmp_path / "s.zarr", identity(n=2, shape=(32, 32))
    with MaskStore.create(path, ident) as store:
        if rewrite:
            store.write(0, *arrays(0, (32, 32)))
    code = (f"import numpy as np\nfrom iumask.store import MaskStore\n"
            f"rng = np.random.default_rng(5)\n"
            f"MaskStore.open({str(path)!r}, 'r+').write(0, rng.random((32, 32)), rng.random((32, 32)), "
            f"rng.integers(0, 3, (32, 32)))")
    killed(["-c", code], "open", rf"/{array}/c/0/0/0{PARTIAL} ")
    store = MaskStore.open(path)
    assert not store.is_complete(0) and not store.is_complete(1)
    with pytest.raises(IumaskError, match="not complete"):
        store.read(0)


# ----------------------------------------------------------------------------- make-masks (real models)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A one-member baseline on 8 synthetic 32x32 images."""
    root = tmp_path_factory.mktemp("reliability")
    data = generate_synthetic(root / "data", num_train=8, num_val=2, height=32, width=32, seed=3)
    iumask("train-baseline", "--data", data, "--out", root / "baseline", "--encoder", "mobilenet_v2", "--epochs",
           "1", "--batch-size", "4", "--lr", "1e-3", "--device", "cpu", "--no-augment")
    return root / "baseline", data


def masks(ensemble: Path, data: Path, store: Path, *extra) -> list:
    """make-masks of the 8 images into 4 shards of 2 (shard s: images 2s and 2s + 1)."""
    return ["make-masks", "--ensemble", ensemble, "--data", data, "--store", store, "--device", "cpu",
            "--batch-size", "1", "--images-per-shard", "2", *extra]


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    return err[err.rindex("error:"):].replace("\n", "") if "error:" in err else err


@pytest.mark.slow
def test_second_make_masks_is_refused_while_one_runs_and_runs_once_it_was_killed(models, tmp_path, capsys):
    """Item 2: while a real make-masks writes a store, a second one with --overwrite and other
    options is refused, naming the first; after the first is SIGKILLed the second runs."""
    ensemble, data = models
    store = tmp_path / "masks.zarr"
    holder = stopped(masks(ensemble, data, store), "open", rf"/complete/c/1{PARTIAL} ")  # finishing images 3 and 4
    try:
        capsys.readouterr()
        iumask(*masks(ensemble, data, store, "--overwrite", "--normalize"), expect=2)
        message = last_error(capsys)
        assert str(store) in message and f"pid {holder.pid} on {socket.gethostname()}" in message
        assert "make-masks" in message and "--store" in message
        untouched = MaskStore.open(store)
        assert untouched.identity["options"]["normalize"] is False
        assert untouched.completed().tolist() == [True, True] + [False] * 6
    finally:
        holder.kill()
        holder.wait()
    iumask(*masks(ensemble, data, store, "--overwrite", "--normalize"))
    iumask(*masks(ensemble, data, tmp_path / "reference.zarr", "--normalize"))
    same_store(store, tmp_path / "reference.zarr")
    only(tmp_path, "masks.zarr", "reference.zarr")


@pytest.mark.slow
def test_overwrite_with_bad_new_data_keeps_the_old_store(models, tmp_path, capsys):
    """Item 4: a label with a value that is no class, found only when the last image is read."""
    ensemble, data = models
    store = tmp_path / "masks.zarr"
    iumask(*masks(ensemble, data, store))
    shutil.copytree(store, tmp_path / "before.zarr")
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    label = sorted((bad / "labels" / "train").iterdir())[-1]
    cv2.imwrite(str(label), np.full((32, 32), 77, np.uint8))
    capsys.readouterr()
    iumask(*masks(ensemble, bad, store, "--overwrite"), expect=2)
    assert "77" in last_error(capsys)
    same_store(store, tmp_path / "before.zarr")
    # Fixed, the data is the store's again: the store is kept (a cache hit, --overwrite replaces
    # other inputs only) and the abandoned replacement is removed.
    shutil.copy(data / "labels" / "train" / label.name, label)
    iumask(*masks(ensemble, bad, store, "--overwrite"))
    assert "cache hit" in capsys.readouterr().err
    same_store(store, tmp_path / "before.zarr")
    only(tmp_path, "bad", "before.zarr", "masks.zarr")
    cv2.imwrite(str(label), cv2.imread(str(label), cv2.IMREAD_UNCHANGED)[::-1].copy())  # other (valid) labels
    iumask(*masks(ensemble, bad, store, "--overwrite"))  # now the replacement goes in
    assert MaskStore.open(store).attrs["finished"]
    assert MaskStore.open(store).identity["dataset_fingerprint"] != MaskStore.open(tmp_path / "before.zarr").identity[
        "dataset_fingerprint"]
    only(tmp_path, "bad", "before.zarr", "masks.zarr")


@pytest.mark.slow
def test_killed_overwrite_keeps_the_old_store_and_the_rerun_resumes_the_replacement(models, tmp_path):
    """Item 4: make-masks --overwrite SIGKILLed while marking its second shard complete."""
    ensemble, data = models
    store, staged = tmp_path / "masks.zarr", tmp_path / ".masks.zarr.iumask-new"
    iumask(*masks(ensemble, data, store))
    shutil.copytree(store, tmp_path / "before.zarr")
    args = masks(ensemble, data, store, "--overwrite", "--normalize")
    killed(args, "open", rf"/complete/c/\d+{PARTIAL} ", nth=2)
    same_store(store, tmp_path / "before.zarr")
    assert MaskStore.open(staged).completed().tolist() == [True, True] + [False] * 6
    done = chunk_files(staged, [0])
    iumask(*args)
    assert chunk_files(store, [0]) == done  # resumed: the first shard's images were not computed again
    iumask(*masks(ensemble, data, tmp_path / "reference.zarr", "--normalize"))
    same_store(store, tmp_path / "reference.zarr")
    only(tmp_path, "before.zarr", "masks.zarr", "reference.zarr")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["between-renames", "removing-old"])
def test_kill_during_the_swap_is_completed_by_the_rerun(models, tmp_path, point):
    """Item 4: killed after the old store was renamed aside (before the new one is in place), or
    before the old one is removed: the rerun recovers without any hand work."""
    ensemble, data = models
    store, staged, aside = (tmp_path / name for name in ("masks.zarr", ".masks.zarr.iumask-new",
                                                         ".masks.zarr.iumask-old"))
    iumask(*masks(ensemble, data, store))
    shutil.copytree(store, tmp_path / "before.zarr")
    args = masks(ensemble, data, store, "--overwrite", "--normalize")
    if point == "between-renames":
        killed(args, "os.rename", f"^{re.escape(str(staged))} ")
        same_store(aside, tmp_path / "before.zarr")
        done = chunk_files(staged, range(4))
        iumask(*args)  # the old store goes back first; then the finished replacement is resumed
        assert chunk_files(store, range(4)) == done
    else:
        killed(args, "shutil.rmtree", re.escape(str(aside)))
        iumask(*masks(ensemble, data, store, "--normalize"))  # the new store is in place: a cache hit
    assert MaskStore.open(store).identity["options"]["normalize"] is True
    only(tmp_path, "before.zarr", "masks.zarr")


@pytest.mark.slow
def test_partial_file_left_in_the_store_blocks_neither_resume_nor_overwrite(models, tmp_path):
    """Item 6: killed inside zarr's atomic write of the store's metadata (a zarr.<uuid>.partial
    stays in the store folder)."""
    ensemble, data = models
    store = tmp_path / "masks.zarr"
    killed(masks(ensemble, data, store), r"os\.(rename|link)", f"^{re.escape(str(store))}/zarr{PARTIAL} ")
    assert any(re.fullmatch(f"zarr{PARTIAL}", name) for name in os.listdir(store))
    iumask(*masks(ensemble, data, store))
    assert MaskStore.open(store).attrs["finished"]
    iumask(*masks(ensemble, data, store, "--overwrite", "--connectivity", "4"))
    assert MaskStore.open(store).identity["options"]["connectivity"] == 4
    only(store.parent, "masks.zarr")


def write_wide_dataset(root: Path, num_classes: int) -> Path:
    """A folder-format dataset of random 32x32 images with 16-bit labels of ``num_classes`` classes."""
    rng = np.random.default_rng(0)
    (root).mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps({"names": [f"class{i}" for i in range(num_classes)],
                                                   "ignore_index": 65535}))
    for split, n in (("train", 4), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / "images" / split / f"{i:03d}.png"), rng.integers(0, 256, (32, 32, 3), np.uint8))
            label = np.repeat(np.repeat(rng.integers(0, num_classes, (4, 4)), 8, 0), 8, 1).astype(np.uint16)
            cv2.imwrite(str(root / "labels" / split / f"{i:03d}.png"), label)
    return root


@pytest.mark.slow
def test_make_masks_with_300_classes_keeps_class_ids_above_255(tmp_path):
    """Item 3: the member predicts classes 7 and 263 (= 7 + 256) side by side; cast to 8 bits they
    would be one class and their instances merge."""
    data = write_wide_dataset(tmp_path / "data", 300)
    iumask("train-baseline", "--data", data, "--out", tmp_path / "model", "--encoder", "mobilenet_v2",
           "--epochs", "1", "--batch-size", "2", "--device", "cpu", "--no-augment")
    folder = resolve_model_files(tmp_path / "model").folders[0]
    model, manifest = load_member(folder)
    images = SegmentationDataset(FolderDataset(data, "train"), None)
    batch = torch.stack([images[i]["image"] for i in range(len(images))])
    # Only classes 7 and 263 can win, each on about half of the pixels.
    head = model.segmentation_head[0]
    with torch.no_grad():
        keep = torch.zeros(300, dtype=torch.bool)
        keep[[7, 263]] = True
        head.weight[~keep] = 0
        head.bias[~keep] = -1e4
        head.bias[[7, 263]] = 0
        logits = model(batch)
        difference = logits[:, 263] - logits[:, 7]  # linear in the two rows (and the upsampling)
        scale = 4 / difference.std()  # confident far from the border between them: entropy varies
        head.weight[263] = (head.weight[263] - head.weight[7]) * scale
        head.weight[7] = 0
        head.bias[263] = -difference.median() * scale
    save_member(folder, model, {k: v for k, v in manifest.items() if k != "weights_sha256"})

    # The edited member itself (its ensemble.json recorded the weights before the edit).
    iumask(*masks(folder, data, tmp_path / "masks.zarr"))
    store = MaskStore.open(tmp_path / "masks.zarr")
    merged_somewhere = False
    pixels = np.zeros(300, np.int64)
    for i in range(len(images)):
        probs = ensemble_probs([model.eval()], batch[i:i + 1])
        argmax = probs.argmax(1)[0].numpy()
        entropy = pixel_entropy(probs)[0].numpy()
        out = store.read(i)
        np.testing.assert_array_equal(out["prediction"].astype(np.int64), argmax)
        iu = instance_uncertainty(argmax, entropy, 300)
        np.testing.assert_allclose(out["instance_uncertainty"], iu, atol=2e-3)
        wrapped = argmax % 256
        if label_instances(wrapped, 300)[1].size < label_instances(argmax, 300)[1].size:
            merged_somewhere = True
            assert np.abs(instance_uncertainty(wrapped, entropy, 300) - out["instance_uncertainty"]).max() > 1e-2
        pixels += np.bincount(argmax.ravel(), minlength=300)
    assert merged_somewhere and pixels[7] > 0 and pixels[263] > 0
    assert mask_statistics(store)["per_class"]["pixels"] == pixels.tolist()
    assert store.prediction_dtype == np.uint16 and store.identity["format_version"] == 2
    # `iumask stats` draws classes above 255 too (the palette has a colour for every class).
    iumask("stats", "--data", data, "--store", tmp_path / "masks.zarr", "--out", tmp_path / "stats")
    assert (tmp_path / "stats" / "class_histogram.png").is_file() and (tmp_path / "stats" / "masks.png").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_overwrite_with_two_torchrun_processes(models, tmp_path):
    """Item 2: rank 0 holds the lock and stages the replacement; rank 1 writes into the staged store
    without the lock; the result equals one process's."""
    ensemble, data = models
    store = tmp_path / "masks.zarr"
    iumask(*masks(ensemble, data, store))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "iumask.cli",
           *map(str, masks(ensemble, data, store, "--overwrite", "--normalize"))]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    iumask(*masks(ensemble, data, tmp_path / "reference.zarr", "--normalize"))
    same_store(store, tmp_path / "reference.zarr")
    only(tmp_path, "masks.zarr", "reference.zarr")


@pytest.mark.parametrize("advice_name, says, never", [("MAKE_MASKS_ADVICE", "use another --store path", "--out"),
                                                      ("OUT_FOLDER_ADVICE", "use another --out folder", "--store")])
def test_a_store_path_taken_by_a_file_is_refused_in_the_callers_words(tiny_baseline, tmp_path, advice_name, says,
                                                                      never):
    """make-masks names its --store; run and experiment keep the store in their --out folder and say so."""
    import iumask.config
    from iumask.config import DataConfig, MaskConfig
    from iumask.stages.masks import make_masks

    data, baseline = tiny_baseline(tmp_path)
    taken = tmp_path / "masks.zarr"
    taken.write_text("a user's file")
    with pytest.raises(IumaskError) as caught:
        make_masks(Model.resolve(baseline / "ensemble.json"), DataConfig(data), MaskConfig(num_workers=0), taken,
                   device="cpu", advice=getattr(iumask.config, advice_name))
    assert says in str(caught.value) and never not in str(caught.value)
    assert taken.read_text() == "a user's file"


def test_a_store_written_from_python_trains_a_weighted_model(tiny_baseline, tmp_path):
    """docs/store.md's recipe: masks of one's own, written with MaskStore.create and write, are read
    by train-weighted like a store make-masks wrote (and one of other data is refused)."""
    from cli_runner import TINY_TRAIN

    from iumask.data.formats import open_dataset
    from iumask.files import json_digest

    data, _ = tiny_baseline(tmp_path)
    folder = open_dataset(data, "train")
    shapes = [list(shape) for shape in folder.check_headers()]
    identity = {"image_ids": folder.ids, "image_shapes": shapes, "class_names": list(folder.classes.names),
                "options": {"source": "my own uncertainty"}, "member_sha256": {},
                "dataset_fingerprint": folder.fingerprint()}
    rng = np.random.default_rng(0)
    store = MaskStore.create(tmp_path / "own.zarr", identity)
    for i, (h, w) in enumerate(shapes):
        iu = rng.random((h, w)).astype(np.float32)
        store.write(i, iu, iu, folder.read_label(i))
    store.set_attrs(finished=True)
    store.close()
    out = tmp_path / "weighted"
    iumask("train-weighted", "--data", data, "--store", tmp_path / "own.zarr", "--out", out, *TINY_TRAIN)
    manifest = json.loads((out / "mobilenet_v2" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["stage"] == "weighted"
    assert manifest["mask_store_sha256"] == json_digest(MaskStore.open(tmp_path / "own.zarr").identity)
    other = tmp_path / "other.zarr"
    store = MaskStore.create(other, {**identity, "dataset_fingerprint": "another dataset"})
    store.close()
    iumask("train-weighted", "--data", data, "--store", other, "--out", tmp_path / "refused", *TINY_TRAIN, expect=2)
    assert not (tmp_path / "refused" / "mobilenet_v2" / "manifest.json").exists()
