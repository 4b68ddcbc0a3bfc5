"""`--config FILE` is validated against the commands when it is read.

Real TOML files and real CLI runs; each error is one line naming the file, the table and the key.
"""

from __future__ import annotations

import json

import pytest
from assertions import error_line
from cli_runner import iumask

SMALL = ("--num-train", 1, "--num-val", 1, "--height", 32, "--width", 32)




def run_with(tmp_path, capsys, text: str, *args, expect: int = 2) -> str:
    config = tmp_path / "my-options.toml"
    config.write_text(text)
    capsys.readouterr()
    iumask("make-synthetic", "--out", tmp_path / "syn", *SMALL, "--config", config, *args, expect=expect)
    return error_line(capsys) if expect else ""


def assert_refused(tmp_path, capsys, text: str, needles) -> None:
    """The config file ``text`` is refused with one error line naming the file and every needle,
    before anything runs."""
    line = run_with(tmp_path, capsys, text)
    assert line.startswith(f"error: {tmp_path / 'my-options.toml'}: ")
    for needle in needles:
        assert needle in line, line
    assert not (tmp_path / "syn").exists(), "nothing may run with an invalid config file"


@pytest.mark.parametrize(
    "text, needles",
    [
        # a typo at the top level: no command has the option; the closest one is suggested in the same spelling
        ("num_trian = 2\n", ["unknown key 'num_trian'", "at the top level", "did you mean 'num_train'?"]),
        ("num-trian = 2\n", ["unknown key 'num-trian'", "at the top level", "did you mean 'num-train'?"]),
        # a typo in a command's table
        ("[make-synthetic]\nsede = 3\n", ["unknown key 'sede'", "in table 'make-synthetic'", "did you mean 'seed'?"]),
        # an option of other commands, but not of this table's command
        ("[evaluate]\nepochs = 3\n", ["unknown key 'epochs'", "in table 'evaluate'", "evaluate has no option --epochs",
                                      "train-baseline"]),
        # a table that names no command
        ("[train-baselin]\nepochs = 3\n", ["unknown table 'train-baselin'", "did you mean 'train-baseline'?"]),
        ("[make-synthetic]\nseed = 1\n[make_synthetic]\nseed = 2\n", ["table 'make-synthetic' given twice"]),
        ("[make-synthetic]\nnum-train = 1\nnum_train = 2\n",
         ["key 'num_train' in table 'make-synthetic' given twice", "'num-train'"]),
    ],
)
def test_unknown_tables_and_keys_are_errors(tmp_path, capsys, text, needles):
    assert_refused(tmp_path, capsys, text, needles)


@pytest.mark.parametrize(
    "text, needles",
    [
        ('epochs = "ten"\n', ["key 'epochs' at the top level", "must be an integer", 'got "ten"']),
        ('epochs = "10"\n', ["key 'epochs' at the top level", "must be an integer", 'got "10"']),
        ("[train-baseline]\nencoder = 3\n",
         ["key 'encoder' in table 'train-baseline'", "must be an array of strings", "got 3"]),
        ('[train-baseline]\nencoder = ["resnet18", 3]\n', ["key 'encoder'", "must be an array of strings"]),
        ("[make-synthetic]\nwidth = 40.5\n", ["key 'width' in table 'make-synthetic'", "must be an integer"]),
        ('[make-synthetic]\nshifted = "yes"\n', ["key 'shifted' in table 'make-synthetic'", "must be true or false"]),
        ("lr = true\n", ["key 'lr' at the top level", "must be a number", "got true"]),
        ("size = 768\n", ["key 'size' at the top level", "must be a string", "got 768"]),
        ("[evaluate]\nmodel = \"runs/a\"\n", ["key 'model' in table 'evaluate'", "must be an array of paths"]),
    ],
)
def test_values_of_the_wrong_type_are_errors(tmp_path, capsys, text, needles):
    assert_refused(tmp_path, capsys, text, needles)


def test_valid_file_spellings_precedence_and_placement(tmp_path, capsys):
    # Top-level keys of other commands are fine; both spellings; the table wins over the top level;
    # the command line wins over both; --config=FILE anywhere.
    config = tmp_path / "ok.toml"
    config.write_text('device = "cpu"\nepochs = 3\nencoder = ["mobilenet_v2"]\nseed = 1\nnum-val = 2\n'
                      "[make-synthetic]\nseed = 4\nnum_train = 3\nheight = 40\n[train_weighted]\nexponent = 1.0\n")
    iumask(f"--config={config}", "make-synthetic", "--out", tmp_path / "syn", "--height", 32, "--width", 32)
    manifest = json.loads((tmp_path / "syn" / "synthetic.json").read_text())
    assert (manifest["seed"], manifest["num_train"], manifest["num_val"], manifest["height"]) == (4, 3, 2, 32)


def test_missing_and_repeated_config(tmp_path, capsys):
    iumask("make-synthetic", "--config", tmp_path / "nothere.toml", expect=2)
    assert "nothere.toml: config file not found" in error_line(capsys)
    config = tmp_path / "c.toml"
    config.write_text("seed = 1\n")
    iumask("--config", config, "make-synthetic", "--config", config, expect=2)
    assert "--config given more than once" in error_line(capsys)
