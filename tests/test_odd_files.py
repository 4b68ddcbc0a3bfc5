"""Files as a file system may hold them (issue 26): a file name that is not UTF-8 (Linux allows any
bytes but ``/`` and NUL) is read, fingerprinted, checked and trained on alike by every command, and
an empty (0-byte) image or label is the same one line from every reader. Real CamVid files copied
into a temporary CamVid-format folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from assertions import error_line, raises_naming
from cli_runner import TINY_TRAIN, iumask

from iumask.data.formats import open_dataset
from iumask.errors import DataError, printable
from iumask.stages.check_data import check_data

# 0xff never occurs in UTF-8: Python holds this name with a lone surrogate (os.fsdecode).
ODD_NAME = os.fsdecode(b"0001TP_\xff06.png")


def camvid_copy(camvid_dir: Path, root: Path, train_names: list[str]) -> Path:
    """A CamVid-format folder with the first CamVid training pairs under ``train_names`` and one
    validation pair."""
    sources = sorted((camvid_dir / "train").glob("*.png"))
    for split, names in (("train", train_names), ("val", ["0016E5_07959.png"])):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for source, name in zip(sources, names):
            shutil.copyfile(source, root / split / name)
            shutil.copyfile(camvid_dir / "trainannot" / source.name, root / f"{split}annot" / name)
    return root


def test_printable_shows_the_bytes_of_a_name_that_is_not_utf8():
    assert printable(ODD_NAME) == "0001TP_\\xff06.png"
    assert printable(Path("data") / ODD_NAME) == "data/0001TP_\\xff06.png"
    assert printable("camvid/é.png") == "camvid/é.png"  # valid UTF-8 is kept as it is
    assert printable(os.fsencode(ODD_NAME)) == "0001TP_\\xff06.png"
    assert str(DataError(f"{Path('a') / ODD_NAME}: bad")) == "a/0001TP_\\xff06.png: bad"


def test_a_file_name_that_is_not_utf8_is_fingerprinted_and_read(camvid_dir, tmp_path):
    """The fingerprint (metadata signature and content hash) takes the name's bytes: it neither
    crashes nor equals the fingerprint of the same files under another name; a rerun is a cache hit."""
    odd = camvid_copy(camvid_dir, tmp_path / "odd", ["0001TP_006690.png", ODD_NAME])
    plain = camvid_copy(camvid_dir, tmp_path / "plain", ["0001TP_006690.png", "0001TP_ff06.png"])
    dataset = open_dataset(odd, "train", "camvid")
    assert ODD_NAME[:-4] in dataset.ids
    first = dataset.fingerprint()
    assert first == open_dataset(odd, "train", "camvid").fingerprint()
    assert first != open_dataset(plain, "train", "camvid").fingerprint()
    assert dataset.check_headers() == [(360, 480), (360, 480)]
    index = dataset.ids.index(ODD_NAME[:-4])
    assert dataset.read_image(index).shape == (360, 480, 3)
    assert dataset.read_label(index).shape == (360, 480)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_check_data_and_training_agree_on_a_name_that_is_not_utf8(camvid_dir, tmp_path, capsys):
    """check-data calls the folder usable, and train-baseline then trains on it (it crashed in the
    metadata signature's UTF-8 encoding while check-data said ok)."""
    root = camvid_copy(camvid_dir, tmp_path / "data", ["0001TP_006690.png", ODD_NAME])
    iumask("check-data", root)
    out = capsys.readouterr().out
    assert "train: 2 images, 2 labels; ok" in out and "not usable" not in out, out
    iumask("train-baseline", "--data", root, "--out", tmp_path / "baseline", *TINY_TRAIN, "--size", "32x32")
    assert (tmp_path / "baseline" / "ensemble.json").is_file()


def test_a_damaged_file_with_a_name_that_is_not_utf8_is_one_printable_line(camvid_dir, tmp_path, capsys):
    root = camvid_copy(camvid_dir, tmp_path / "data", ["0001TP_006690.png", ODD_NAME])
    (root / "train" / ODD_NAME).write_bytes(b"not an image")
    iumask("check-data", root, expect=2)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "0001TP_\\xff06.png: cannot" in captured.out + captured.err


@pytest.mark.parametrize("which", ["image", "label"])
def test_an_empty_file_is_the_same_one_line_for_every_reader(camvid_dir, tmp_path, capsys, which):
    """0 bytes: OpenCV raised on the empty buffer (a traceback in check-data) while the header check
    gave another line; now the header check, decoding, check-data (full and quick) say the same."""
    root = camvid_copy(camvid_dir, tmp_path / "data", ["0001TP_006690.png", "0001TP_006720.png"])
    empty = root / ("train" if which == "image" else "trainannot") / "0001TP_006720.png"
    empty.write_bytes(b"")
    expected = f"{empty}: the {which} file is empty (0 bytes); re-copy or re-export it"
    dataset = open_dataset(root, "train", "camvid")
    with raises_naming(expected):
        dataset.check_headers()
    with raises_naming(expected):
        dataset.read_image(1) if which == "image" else dataset.read_label(1)
    for quick in (False, True):
        (check,) = check_data(root, "camvid", quick=quick)
        assert check.problem == f"split train: {expected}"
    iumask("check-data", root, expect=2)
    assert expected in capsys.readouterr().out
    iumask("train-baseline", "--data", root, "--out", tmp_path / "baseline", *TINY_TRAIN, "--size", "32x32",
           expect=2)
    assert error_line(capsys).endswith(expected)
