"""One writer per artifact folder: every command that writes a folder (train-baseline, train-weighted
and its --online form, run, experiment, predict, as make-masks for its store) holds an OS lock on it
for its whole run. A second command on the same folder stops at once with one line naming the
holder; a holder that was killed leaves no stale lock; the ranks of one torchrun job share rank 0's
lock (tests/test_engine.py and tests/test_experiment.py run jobs of two ranks).

The holders are real processes: a real train command or experiment stopped (SIGSTOP) at the write
of its first checkpoint, or a process that only takes the lock."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from assertions import error_line
from cli_runner import TINY_TRAIN, iumask
from test_store_reliability import stopped

from iumask.errors import IumaskError
from iumask.files import LOCK_FILE, WriterLock

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TRAIN = [*TINY_TRAIN, "--checkpoint-every", "1"]
HOLD = ("import sys, time\nfrom iumask.files import WriterLock\n"
        "lock = WriterLock(sys.argv[1], 'folder', 'wait')\nprint('locked', flush=True)\ntime.sleep(600)\n")


@pytest.fixture(scope="module")
def data(make_synthetic):
    return make_synthetic("locks", num_train=4, num_val=2, height=32, width=32)


@contextlib.contextmanager
def lock_held_by_another_process(folder: Path):
    """A live process holding the writer lock of ``folder``, killed (SIGKILL) on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        yield child
    finally:
        child.kill()
        child.wait()




def test_a_second_train_baseline_on_one_out_is_refused_and_a_killed_holder_frees_it(data, tmp_path, capsys):
    """Two train-baseline runs with different seeds on one --out: the second stops before any
    training with a message naming the first (which is really training: stopped at its first
    checkpoint); once the first is killed its lock is free and the second trains."""
    out = tmp_path / "out"
    first = stopped(["train-baseline", "--data", data, "--out", out, *TRAIN, "--seed", "1"],
                    "open", r"checkpoint\.pt")
    try:
        capsys.readouterr()
        iumask("train-baseline", "--data", data, "--out", out, *TRAIN, "--seed", "2", expect=2)
        line = error_line(capsys)
        assert f"model folder {out} is being written by another process (pid {first.pid}" in line
        assert "train-baseline" in line and "--seed 1" in line  # the holder's command
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not (out / "ensemble.json").exists()
    iumask("train-baseline", "--data", data, "--out", out, *TRAIN, "--seed", "2")  # the stale lock is taken
    manifest = json.loads((out / "mobilenet_v2" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["train_options"]["seed"] == 2


@pytest.mark.parametrize("command", ["train-baseline", "online", "train-weighted", "run", "predict"])
def test_every_writing_command_refuses_a_locked_folder(data, tiny_baseline, tmp_path, capsys, command):
    """Each command that writes an artifact folder refuses one another process writes, before any
    work, and leaves the holder's files alone."""
    out = tmp_path / "out"
    store = tmp_path / "masks.zarr"
    if command in ("train-weighted", "predict"):  # they need a model (and masks) of their data first
        data, _ = tiny_baseline(tmp_path)
    args = {
        "train-baseline": ["train-baseline", "--data", data, "--out", out, *TRAIN],
        "online": ["train-weighted", "--online", "--data", data, "--out", out, *TRAIN, "--size", "32x32"],
        "train-weighted": ["train-weighted", "--data", data, "--out", out, "--store", store, *TRAIN],
        "run": ["run", "--data", data, "--out", out, *TRAIN],
        "predict": ["predict", "--input", data / "images" / "val", "--out", out, "--device", "cpu",
                    "--model", tmp_path / "baseline"],
    }[command]
    if command == "train-weighted":
        iumask("make-masks", "--model", tmp_path / "baseline", "--data", data, "--store", store, "--device", "cpu")
    with lock_held_by_another_process(out) as holder:
        capsys.readouterr()
        iumask(*args, expect=2)
        assert f"{out} is being written by another process (pid {holder.pid}" in error_line(capsys)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


EXPERIMENT = """
name = "locked"
encoders = ["mobilenet_v2"]
seeds = [0]

[data]
root = "{data}"
size = "32x32"

[train]
epochs = 1
batch_size = 2
lr = 1e-3
backbone_lr_factor = 1.0
checkpoint_every = 1

[[arms]]
name = "regular"

[[evaluations]]
split = "val"
"""


def test_a_second_experiment_on_one_folder_is_refused(data, tmp_path, capsys):
    """An experiment whose folder another experiment is training in (stopped at its first
    checkpoint) stops at once instead of training the same models at the same time."""
    spec = tmp_path / "spec.toml"
    spec.write_text(EXPERIMENT.format(data=data))
    out = tmp_path / "out"
    first = stopped(["experiment", spec, "--out", out], "open", r"checkpoint\.pt")
    try:
        before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        capsys.readouterr()
        iumask("experiment", spec, "--out", out, expect=2)
        assert f"experiment folder {out} is being written by another process (pid {first.pid}" in error_line(capsys)
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    iumask("experiment", spec, "--out", out)  # resumes under the freed lock
    assert (out / "report.md").is_file()


def test_lock_handles_in_one_process_share_the_lock(tmp_path):
    """A stage may lock a folder its caller holds (reference-counted): the lock is released when the
    last handle closes, not the first."""
    first = WriterLock(tmp_path, "folder", "wait")
    second = WriterLock(tmp_path, "folder", "wait")
    first.close()
    probe = [sys.executable, "-c", HOLD.replace("time.sleep(600)", ""), str(tmp_path)]
    refused = subprocess.run(probe, capture_output=True, text=True)
    assert refused.returncode != 0 and "is being written by another process" in refused.stderr
    second.close()
    second.close()  # closing twice is harmless
    assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "locked"
    with pytest.raises(IumaskError, match="is being written"), lock_held_by_another_process(tmp_path):
        WriterLock(tmp_path, "folder", "wait")
