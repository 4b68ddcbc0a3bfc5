"""Results files that keep apart what is different: evaluate's results.json / results.csv merge
entries by model path, data, split, resolution and inference, and the CSV and the terminal table
label each row or column distinctly even when two models share a display name (two ensembles of
one stage, one model on two datasets)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from cli_runner import TINY_TRAIN as TRAIN
from cli_runner import iumask

from iumask.tables import result_labels

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

EVAL = ["--device", "cpu", "--pavpu-threshold", "1"]


@pytest.fixture(scope="module")
def two_runs(tiny_baseline, tmp_path_factory):
    """Two one-member baselines of one dataset with different seeds, in runA/ (the tiny baseline,
    seed 0) and runB/ (seed 7); both are displayed as "baseline mobilenet_v2"."""
    root = tmp_path_factory.mktemp("results-files")
    data, _ = tiny_baseline(root / "runA")
    iumask("train-baseline", "--data", data, "--out", root / "runB" / "baseline", *TRAIN, "--seed", "7")
    return data, root / "runA" / "baseline", root / "runB" / "baseline"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_models_evaluated_into_one_output_in_two_calls_are_both_kept(two_runs, tmp_path, capsys):
    data, a, b = two_runs
    output = tmp_path / "results.json"
    iumask("evaluate", "--model", a, "--data", data, "--output", output, *EVAL)
    iumask("evaluate", "--model", b, "--data", data, "--output", output, *EVAL)
    results = json.loads(output.read_text())["results"]
    assert [r["path"] for r in results] == [str(a / "ensemble.json"), str(b / "ensemble.json")]
    assert results[0]["iou"] != results[1]["iou"]  # different seeds, different models
    rows = read_csv(output.with_suffix(".csv"))
    assert [r["label"] for r in rows] == ["baseline mobilenet_v2 [runA/baseline]",
                                          "baseline mobilenet_v2 [runB/baseline]"]
    assert [r["path"] for r in rows] == [r["path"] for r in results]
    assert all(r["data"] == str(data) and r["split"] == "val" and r["resolution"] == "native" for r in rows)
    # Evaluating the first again replaces its entry, nothing else.
    iumask("evaluate", "--model", a / "ensemble.json", "--data", data, "--output", output, *EVAL)
    assert [r["path"] for r in json.loads(output.read_text())["results"]] == [str(b / "ensemble.json"),
                                                                              str(a / "ensemble.json")]


def test_alike_models_in_one_call_get_distinct_columns(two_runs, tmp_path, capsys):
    data, a, b = two_runs
    output = tmp_path / "results.json"
    capsys.readouterr()
    iumask("evaluate", "--model", a, "--model", b, "--data", data, "--output", output, *EVAL)
    table = capsys.readouterr().out
    assert "runA/baseline" in table and "runB/baseline" in table
    labels = [r["label"] for r in read_csv(output.with_suffix(".csv"))]
    assert len(set(labels)) == 2


def test_one_model_on_two_datasets_is_two_rows_told_apart_by_the_data(two_runs, tmp_path):
    data, a, _ = two_runs
    copy = shutil.copytree(data, tmp_path / "copy" / "data")
    output = tmp_path / "results.json"
    for root in (data, copy):
        iumask("evaluate", "--model", a, "--data", root, "--output", output, *EVAL)
    rows = read_csv(output.with_suffix(".csv"))
    assert [r["data"] for r in rows] == [str(data), str(copy)]
    assert len({r["label"] for r in rows}) == 2 and all("[" in r["label"] for r in rows)


def test_result_labels_use_the_first_distinguishing_key_and_number_exact_repeats():
    base = {"model": "baseline ensemble", "path": "/x/run1/ens/ensemble.json", "data": "/d/camvid",
            "split": "val", "resolution": "native", "inference": "resize"}
    results = [base, dict(base, path="/x/run2/ens/ensemble.json"), dict(base, split="test"),
               dict(base, model="weighted ensemble"), dict(base, model="weighted ensemble")]
    assert result_labels(results) == [
        "baseline ensemble [run1/ens] [split val]", "baseline ensemble [run2/ens]",
        "baseline ensemble [run1/ens] [split test]", "weighted ensemble", "weighted ensemble #2"]
