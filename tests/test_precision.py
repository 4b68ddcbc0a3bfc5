"""One constructor resolves precision, and identities record the precision actually used (issue 28
§4): ``--amp fp16`` on a CPU runs float32, says so in one warning line, and the mask store, the
predicted arrays and the evaluation record float32 (the identity of ``--amp off``). A store that an
earlier version labelled fp16 though it computed float32 on a CPU is refused with one line
(docs/store.md), and ``--overwrite`` recomputes it with the precision recorded truthfully."""

from __future__ import annotations

import json

import pytest
import torch
import zarr
from cli_runner import iumask

from iumask.config import DataConfig, EvalConfig
from iumask.device import Precision
from iumask.model import Model
from iumask.stages.evaluate import cached_evaluate, evaluation_identity
from iumask.store import MaskStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

FALLBACK = "--amp fp16 needs a CUDA device"


@pytest.fixture(scope="module")
def trained(tiny_baseline, tmp_path_factory):
    return tiny_baseline(tmp_path_factory.mktemp("precision"))


def masks(data, baseline, store, *extra, expect: int = 0):
    iumask("make-masks", "--ensemble", baseline, "--data", data, "--store", store, "--device", "cpu", *extra,
           expect=expect)


def test_the_one_constructor_says_what_runs():
    cpu = torch.device("cpu")
    assert Precision.resolve("fp16", cpu).amp == "off" and not Precision.resolve("fp16", cpu).enabled
    assert Precision.resolve("bf16", cpu).amp == "bf16" and Precision.resolve("off", cpu).amp == "off"
    assert Precision("fp16", cpu).amp == "off"  # even built directly, it never claims what does not run


def test_make_masks_fp16_on_a_cpu_records_float32_and_warns_once(trained, tmp_path, capsys):
    data, baseline = trained
    capsys.readouterr()
    masks(data, baseline, tmp_path / "fp16.zarr", "--amp", "fp16")
    err = capsys.readouterr().err
    assert err.count(FALLBACK) == 1 and len([line for line in err.splitlines() if FALLBACK in line]) == 1
    masks(data, baseline, tmp_path / "off.zarr")
    fp16, off = MaskStore.open(tmp_path / "fp16.zarr"), MaskStore.open(tmp_path / "off.zarr")
    assert "amp" not in fp16.identity["options"]
    assert fp16.identity == off.identity  # the same computation, the same identity
    capsys.readouterr()
    masks(data, baseline, tmp_path / "fp16.zarr")  # --amp off: a cache hit
    assert "cache hit" in capsys.readouterr().err


def test_a_store_labelled_fp16_by_an_earlier_version_is_refused_then_overwritten(trained, tmp_path, capsys):
    data, baseline = trained
    store = tmp_path / "masks.zarr"
    masks(data, baseline, store)
    group = zarr.open_group(store, mode="r+", zarr_format=3)  # what earlier versions wrote on a CPU
    group.attrs["options"] = dict(group.attrs["options"], amp="fp16")
    capsys.readouterr()
    masks(data, baseline, store, "--amp", "fp16", expect=2)
    err = capsys.readouterr().err
    assert "records amp fp16, which runs as float32 on this device" in err and "--overwrite" in err
    assert len([line for line in err.splitlines() if "records amp fp16" in line]) == 1
    masks(data, baseline, store, "--amp", "fp16", "--overwrite")
    assert "amp" not in MaskStore.open(store).identity["options"]
    capsys.readouterr()
    masks(data, baseline, store, "--amp", "fp16")  # now a cache hit
    assert "cache hit" in capsys.readouterr().err


def test_predict_arrays_record_the_precision_used(trained, tmp_path):
    data, baseline = trained
    for amp in ("fp16", "off"):
        iumask("predict", "--model", baseline, "--input", data / "images" / "val", "--out", tmp_path / amp,
               "--device", "cpu", "--save-arrays", "--amp", amp)
    fp16, off = (MaskStore.open(tmp_path / amp / "arrays.zarr") for amp in ("fp16", "off"))
    assert "amp" not in fp16.identity["options"] and fp16.identity == off.identity


def test_an_evaluation_records_the_precision_used_and_warns_once(trained, tmp_path, capsys):
    data, baseline = trained
    config, fp16 = DataConfig(data), EvalConfig(split="val", amp="fp16", temperature_split="val")
    capsys.readouterr()
    cached_evaluate([Model.resolve(baseline)], config, fp16, tmp_path / "results.json", "cpu")
    assert capsys.readouterr().err.count(FALLBACK) == 1  # one line, though three passes run
    off = EvalConfig(split="val", temperature_split="val")
    assert json.loads((tmp_path / "results.json").read_text())["identity"] == \
        evaluation_identity([Model.resolve(baseline)], config, off)
    cached_evaluate([Model.resolve(baseline)], config, off, tmp_path / "results.json", "cpu")  # float32 both times
    assert "cache hit" in capsys.readouterr().err
