"""The one atomic writer (iumask.files.atomic_write): unique temporary names, so two writers of
one file never write into each other's temporary file, and a crashed write's leftover is still
recognised as the dataset's own by make-synthetic."""

from __future__ import annotations

import json
import math
import stat

import numpy as np
import pytest
from cli_runner import iumask

from iumask.errors import IumaskError
from iumask.files import atomic_write, temporary_target, write_json_atomic


def test_two_writers_of_one_file_do_not_share_a_temporary_file(tmp_path):
    """Before: one fixed name (results.json.tmp); the inner writer renamed the outer one's half
    written file away and the outer one then failed."""
    target = tmp_path / "results.json"
    with atomic_write(target) as first:
        first.write_text("first")
        with atomic_write(target) as second:
            assert second != first and second.parent == first.parent
            second.write_text("second")
        assert target.read_text() == "second"
    assert target.read_text() == "first"  # the last rename wins, each content whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "summary.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed half way")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    with pytest.raises(IumaskError, match="missing"):  # an OSError: one line naming the file
        write_json_atomic(tmp_path / "missing" / "x.json", {})


@pytest.mark.parametrize("name, target", [("a.json.k3x_9q.tmp", "a.json"), ("x.png.abc.tmp", "x.png"),
                                          ("a.json.tmp", "a"), ("a.json", None), (".tmp", None),
                                          ("labels/train/t.png.q1.tmp", "labels/train/t.png")])
def test_temporary_target(name, target):
    assert temporary_target(name) == target


def test_leftovers_of_interrupted_writes_count_as_the_datasets_own(tmp_path):
    """A killed make-synthetic leaves temporary files with unique names beside its files; a rerun
    with other parameters and --overwrite recognises and deletes them (a foreign file would stop it)."""
    root = tmp_path / "syn"
    small = ("--num-val", 1, "--height", 32, "--width", 32)
    iumask("make-synthetic", "--out", root, "--num-train", 2, *small)
    (root / "images" / "train" / "train_0001.png.k3x_9q.tmp").write_bytes(b"half an image")
    (root / "synthetic.json.zz81.tmp").write_text("{half")
    iumask("make-synthetic", "--out", root, "--num-train", 1, *small, "--seed", 3, "--overwrite")
    assert not list(root.rglob("*.tmp"))
    assert json.loads((root / "synthetic.json").read_text())["seed"] == 3


def test_a_read_only_target_is_refused_and_keeps_its_mode(tmp_path):
    """A file the user made read-only (0444) was replaced through the rename and came back 0644;
    now every atomic write refuses it with one line naming it and the fix. The mode bits are
    checked, not a failed write, since the suite may run as root."""
    target = tmp_path / "results.json"
    target.write_text('{"results": []}\n')
    target.chmod(0o444)
    with pytest.raises(IumaskError) as info:
        write_json_atomic(target, {"results": [1]})
    assert str(info.value) == (f"{target}: the file is read-only (mode 0444), so iumask does not replace it; "
                               f"make it writable (chmod u+w {target}) or write elsewhere")
    assert target.read_text() == '{"results": []}\n' and stat.S_IMODE(target.stat().st_mode) == 0o444
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left
    target.chmod(0o644)
    write_json_atomic(target, {"results": [1]})
    assert json.loads(target.read_text()) == {"results": [1]}


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, np.float64(np.inf), np.float64(-np.inf)])
def test_a_diverged_loss_is_written_as_null(tmp_path, value):
    """±inf (a diverged loss) is ``null`` like NaN, wherever it sits, never a crash at save time
    (``allow_nan=False``) nor a bare ``Infinity`` that strict parsers reject."""
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"loss": value, "history": [1.0, value, {"val": (value, 2)}]})
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in {text}"))
    assert strict == {"loss": None, "history": [1.0, None, {"val": [None, 2]}]}


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_evaluate_refuses_a_read_only_output_before_any_work(tiny_baseline, tmp_path, capsys):
    from assertions import error_line

    data, baseline = tiny_baseline(tmp_path)
    output = tmp_path / "results.json"
    output.write_text('{"results": []}\n')
    output.chmod(0o444)
    iumask("evaluate", "--model", baseline / "ensemble.json", "--data", data, "--output", output,
           "--device", "cpu", expect=2)
    assert error_line(capsys) == f"error: {output}: the file is read-only (mode 0444), so iumask does not replace " \
                                 f"it; make it writable (chmod u+w {output}) or write elsewhere"
    assert stat.S_IMODE(output.stat().st_mode) == 0o444 and output.read_text() == '{"results": []}\n'
    assert not output.with_suffix(".csv").exists()
