"""`make-synthetic` never deletes or overwrites what it did not write.

Every test runs the real CLI in-process on real folders and compares every file byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from assertions import error_line
from cli_runner import iumask
from testdata import small_tmpfs

from iumask.data import synthetic
from iumask.data.folder import FolderDataset

SMALL = ("--num-train", 2, "--num-val", 1, "--height", 32, "--width", 32)


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}




def user_dataset(root: Path) -> Path:
    """A user's own folder-format dataset, with a notes file beside it."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(root / "images" / split / f"street_{i}.png"), np.full((32, 32, 3), 40 * i, np.uint8))
            cv2.imwrite(str(root / "labels" / split / f"street_{i}.png"), np.full((32, 32), i, np.uint8))
    (root / "classes.json").write_text(json.dumps({"names": ["road", "car"], "ignore_index": 255}))
    (root / "notes.txt").write_text("three weeks of labelling")
    return root


def test_users_dataset_survives_with_and_without_overwrite(tmp_path, capsys):
    root = user_dataset(tmp_path / "mydata")
    before = snapshot(root)
    for extra in (("--overwrite",), ()):
        capsys.readouterr()
        iumask("make-synthetic", "--out", root, *SMALL, *extra, expect=2)
        line = error_line(capsys)
        assert str(root) in line and "did not write" in line and "classes.json" in line
        assert "even with --overwrite" in line and "choose an empty or new folder" in line
        assert snapshot(root) == before
    assert not (root / synthetic.MANIFEST_FILE).exists()


def test_other_parameters_need_overwrite_which_deletes_only_own_files(tmp_path, capsys):
    root = tmp_path / "syn"
    iumask("make-synthetic", "--out", root, *SMALL)
    (root / "README.txt").write_text("my notes beside the dataset")
    before = snapshot(root)
    capsys.readouterr()
    iumask("make-synthetic", "--out", root, "--num-train", 1, *SMALL[2:], "--seed", 5, expect=2)
    line = error_line(capsys)
    assert str(root) in line and "other parameters" in line and "pass --overwrite" in line
    assert "num_train 2 (now 1)" in line and "seed 0 (now 5)" in line
    assert snapshot(root) == before

    iumask("make-synthetic", "--out", root, "--num-train", 1, *SMALL[2:], "--seed", 5, "--overwrite")
    after = snapshot(root)
    assert "images/train/train_0001.png" not in after and "labels/train/train_0001.png" not in after
    assert after["README.txt"] == b"my notes beside the dataset"  # beside the dataset: kept
    assert after["images/train/train_0000.png"] != before["images/train/train_0000.png"]  # other seed
    assert len(FolderDataset(root, "train")) == 1
    manifest = json.loads(after["synthetic.json"])
    assert manifest["seed"] == 5 and manifest["complete"] is True
    assert set(manifest["files"]) == set(after) - {"synthetic.json", "README.txt"}


@pytest.mark.parametrize("change", ["added_image", "edited_label"])
def test_overwrite_refuses_a_synthetic_dataset_with_user_files(tmp_path, capsys, change):
    """A file the user added to (or edited in) the synthetic dataset is never deleted: --overwrite
    refuses, naming it, and changes nothing."""
    root = tmp_path / "syn"
    iumask("make-synthetic", "--out", root, *SMALL)
    if change == "added_image":
        rel = "images/train/my_photo.png"
        cv2.imwrite(str(root / rel), np.full((32, 32, 3), 7, np.uint8))
    else:
        rel = "labels/train/train_0001.png"
        label = cv2.imread(str(root / rel), cv2.IMREAD_UNCHANGED)
        label[:4] = 2  # a hand-corrected label
        cv2.imwrite(str(root / rel), label)
    before = snapshot(root)
    for extra in ((), ("--overwrite",)):
        capsys.readouterr()
        iumask("make-synthetic", "--out", root, "--num-train", 3, *SMALL[2:], *extra, expect=2)
        line = error_line(capsys)
        assert str(root) in line and rel in line and "even with --overwrite" in line and "move them out" in line
        assert snapshot(root) == before


def test_same_parameters_rerun_is_a_no_op(tmp_path):
    root = tmp_path / "syn"
    iumask("make-synthetic", "--out", root, *SMALL)
    fresh = snapshot(root)
    # A user's additions and edits inside the dataset stay untouched by a rerun with the same parameters.
    cv2.imwrite(str(root / "images" / "train" / "extra.png"), np.zeros((32, 32, 3), np.uint8))
    (root / "labels" / "train" / "train_0000.png").write_bytes(b"edited")
    before = snapshot(root)
    for extra in ((), ("--overwrite",)):
        iumask("make-synthetic", "--out", root, *SMALL, *extra)
        assert snapshot(root) == before
    # A missing file of the dataset is written again (the same bytes), nothing else is touched.
    (root / "labels" / "val" / "val_0000.png").unlink()
    iumask("make-synthetic", "--out", root, *SMALL)
    assert snapshot(root) == before
    assert snapshot(root)["labels/val/val_0000.png"] == fresh["labels/val/val_0000.png"]


def test_library_call_used_by_run_is_a_no_op(tmp_path):
    """`iumask run` without --data calls generate_synthetic(out / "data") on every run."""
    root = synthetic.generate_synthetic(tmp_path / "data", num_train=2, num_val=1, height=32, width=32)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert synthetic.generate_synthetic(root, num_train=2, num_val=1, height=32, width=32) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_killed_write_is_finished_by_a_rerun(tmp_path):
    """A generator process killed part way: the rerun with the same parameters finishes the dataset
    (its own half-written files are recognised), without --overwrite."""
    root, n = tmp_path / "syn", 600
    script = ("import sys; from iumask.data.synthetic import generate_synthetic as g; "
              "g(sys.argv[1], num_train=int(sys.argv[2]), num_val=1, height=32, width=32)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(root), str(n)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    labels = root / "labels" / "train"
    deadline = time.time() + 120
    while time.time() < deadline and (not labels.is_dir() or len(os.listdir(labels)) < 3):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= len(os.listdir(labels)) < n, "the process should have been killed part way"
    iumask("make-synthetic", "--out", root, "--num-train", n, *SMALL[2:])
    files = snapshot(root)
    manifest = json.loads(files.pop("synthetic.json"))
    assert manifest["complete"] is True and len(FolderDataset(root, "train")) == n
    assert manifest["files"] == {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
    # The samples are the ones an uninterrupted run writes (sample i depends on seed, split and i only).
    reference = snapshot(synthetic.generate_synthetic(tmp_path / "ref", num_train=4, num_val=1, height=32, width=32))
    assert all(files[k] == v for k, v in reference.items() if k != "synthetic.json")


def test_manifest_without_file_records_still_counts_as_own(tmp_path, capsys):
    """Folders written before manifests recorded their files: the files the parameters name are its own."""
    root = tmp_path / "syn"
    iumask("make-synthetic", "--out", root, *SMALL)
    manifest = json.loads((root / "synthetic.json").read_text())
    old = {k: v for k, v in manifest.items() if k not in ("files", "complete")}
    (root / "synthetic.json").write_text(json.dumps(old, indent=2) + "\n")
    before = snapshot(root)
    iumask("make-synthetic", "--out", root, *SMALL)
    assert snapshot(root) == before
    capsys.readouterr()
    iumask("make-synthetic", "--out", root, "--num-train", 1, *SMALL[2:], expect=2)
    assert "pass --overwrite" in error_line(capsys) and snapshot(root) == before
    iumask("make-synthetic", "--out", root, "--num-train", 1, *SMALL[2:], "--overwrite")
    assert len(FolderDataset(root, "train")) == 1 and "images/train/train_0001.png" not in snapshot(root)


def test_manifest_without_file_records_protects_an_edited_file(tmp_path, capsys):
    """A manifest of the previous version records parameters but no SHA-256: the files its parameters
    name count as its own only where they are byte-identical to what those parameters render to.
    A label the user edited is never deleted, even with --overwrite."""
    root = tmp_path / "syn"
    iumask("make-synthetic", "--out", root, *SMALL)
    manifest = json.loads((root / "synthetic.json").read_text())
    rel = "labels/train/train_0001.png"
    assert isinstance(manifest["files"], dict) and rel in manifest["files"]  # how the current one records them
    old = {k: v for k, v in manifest.items() if k not in ("files", "complete")}
    (root / "synthetic.json").write_text(json.dumps(old, indent=2) + "\n")
    edited = bytearray((root / rel).read_bytes())
    edited[len(edited) // 2] ^= 0x01  # one byte of a hand-corrected label
    (root / rel).write_bytes(bytes(edited))
    before = snapshot(root)
    for extra in (("--overwrite",), ()):
        capsys.readouterr()
        iumask("make-synthetic", "--out", root, "--num-train", 1, *SMALL[2:], "--seed", 3, *extra, expect=2)
        line = error_line(capsys)
        assert str(root) in line and rel in line and "even with --overwrite" in line
        assert "train_0000" not in line  # the unchanged files are recognised as its own
        assert snapshot(root) == before
    assert (root / rel).read_bytes() == bytes(edited)

    # Unchanged again, the old dataset is its own and --overwrite replaces it.
    edited[len(edited) // 2] ^= 0x01
    (root / rel).write_bytes(bytes(edited))
    iumask("make-synthetic", "--out", root, "--num-train", 1, *SMALL[2:], "--seed", 3, "--overwrite")
    assert len(FolderDataset(root, "train")) == 1 and json.loads((root / "synthetic.json").read_text())["seed"] == 3


def test_manifest_of_another_generator_version_without_file_records_is_not_trusted(tmp_path, capsys):
    """Without recorded SHA-256 and with a rendering this version cannot reproduce, no file can be
    shown to be its own: --overwrite refuses rather than deleting on trust."""
    root = tmp_path / "syn"
    iumask("make-synthetic", "--out", root, *SMALL)
    manifest = json.loads((root / "synthetic.json").read_text())
    old = {k: v for k, v in manifest.items() if k not in ("files", "complete")}
    (root / "synthetic.json").write_text(json.dumps(dict(old, version=synthetic.GENERATOR_VERSION + 1)))
    before = snapshot(root)
    capsys.readouterr()
    iumask("make-synthetic", "--out", root, *SMALL, "--overwrite", expect=2)
    assert "even with --overwrite" in error_line(capsys) and snapshot(root) == before


# ----------------------------------------------------------------------------- full disk


def fill(folder: Path, leave: int = 0) -> None:
    """Use up the free space of ``folder``'s file system but ``leave`` bytes."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


@pytest.mark.parametrize("full_at", ["images", "manifest"])
def test_full_disk_leaves_no_partial_or_temporary_file_and_a_rerun_finishes(tmp_path, capsys, full_at):
    """make-synthetic on a real full disk: a one-line error naming the file, no `*.tmp` and no partial
    PNG left (every PNG there is the complete file); with space again, a rerun finishes the dataset."""
    args = ("--num-train", 60, "--num-val", 1, "--height", 64, "--width", 64)
    reference = snapshot(synthetic.generate_synthetic(tmp_path / "ref", num_train=60, num_val=1, height=64,
                                                      width=64))
    assert sum(map(len, reference.values())) > 400_000  # more than the disk holds
    with small_tmpfs(tmp_path / "small") as target:
        if full_at == "manifest":
            fill(target)  # not even the manifest that claims the folder fits
        root = target / "syn"
        capsys.readouterr()
        iumask("make-synthetic", "--out", root, *args, expect=2)
        line = error_line(capsys)
        assert str(root) in line and "No space left on device" in line
        if full_at == "manifest":
            assert "synthetic.json" in line
        assert [p for p in target.rglob("*") if p.name.endswith(".tmp")] == []
        files = snapshot(root) if root.is_dir() else {}
        files.pop("synthetic.json", None)
        assert all(files[k] == reference[k] for k in files)  # complete files only, no truncated PNG
        if full_at == "images":  # it failed part way through the PNGs, in a folder it claimed
            assert any(k.endswith(".png") for k in files)
            assert json.loads((root / "synthetic.json").read_text())["complete"] is False

        (target / "filler").unlink(missing_ok=True)
        subprocess.run(["mount", "-o", "remount,size=4m", str(target)], check=True, capture_output=True)
        iumask("make-synthetic", "--out", root, *args)
        assert snapshot(root) == reference
        # No file left open either (an open, unlinked temporary file would keep the disk full).
        assert subprocess.run(["umount", str(target)], capture_output=True).returncode == 0
