"""A model is an object, resolved once (issue 28 §1): one make-masks, evaluate or predict opens the
ensemble.json once and each member's manifest.json once (counted with an audit hook on ``open``),
and one model has one key everywhere (results files, mask stores, predict's arrays); the
identities a stage records are those of the earlier code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from assertions import opened
from cli_runner import iumask

from iumask.artifacts import ENSEMBLE_FILE, MANIFEST_FILE, write_ensemble
from iumask.config import DataConfig, EvalConfig
from iumask.errors import IumaskError
from iumask.model import Model
from iumask.stages.evaluate import evaluation_identity
from iumask.store import MaskStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

@pytest.fixture(scope="module")
def ensemble(tiny_baseline, tmp_path_factory):
    """The tiny dataset and a two-member ensemble (the tiny baseline's member and a copy of it)."""
    data, baseline = tiny_baseline(tmp_path_factory.mktemp("model-object"))
    shutil.copytree(baseline / "mobilenet_v2", baseline / "second")
    manifest = json.loads((baseline / ENSEMBLE_FILE).read_text())
    write_ensemble(baseline, {k: v for k, v in manifest.items() if k != "member_sha256"}
                   | {"members": ["mobilenet_v2", "second"]})
    return data, baseline


def model_files(baseline: Path) -> list[str]:
    return [str(baseline / ENSEMBLE_FILE), *(str(baseline / m / MANIFEST_FILE) for m in ("mobilenet_v2", "second"))]


def test_each_stage_reads_the_ensemble_and_each_manifest_once(ensemble, tmp_path):
    data, baseline = ensemble
    commands = {
        "make-masks": ["make-masks", "--ensemble", baseline, "--data", data, "--store", tmp_path / "masks.zarr",
                       "--device", "cpu"],
        "evaluate": ["evaluate", "--model", baseline, "--data", data, "--output", tmp_path / "results.json",
                     "--device", "cpu"],  # computes and caches the PAvPU threshold
        "predict": ["predict", "--model", baseline / ENSEMBLE_FILE, "--input", data / "images" / "val", "--out",
                    tmp_path / "predicted", "--device", "cpu", "--save-arrays"],
    }
    for name, args in commands.items():
        with opened() as paths:
            iumask(*args)
        counts = {file: paths.count(file) for file in model_files(baseline)}
        assert counts == dict.fromkeys(model_files(baseline), 1), f"{name} opened {counts}"


def test_one_model_has_one_key_everywhere(ensemble, tmp_path):
    data, baseline = ensemble
    key = Model.resolve(baseline).key
    assert key == str((baseline / ENSEMBLE_FILE).resolve()) == Model.resolve(baseline / ENSEMBLE_FILE).key
    member = Model.resolve(baseline / "second" / MANIFEST_FILE)
    assert member.key == str((baseline / "second").resolve()) == Model.resolve(baseline / "second").key

    iumask("make-masks", "--ensemble", baseline, "--data", data, "--store", tmp_path / "masks.zarr", "--device", "cpu")
    iumask("evaluate", "--model", baseline, "--data", data, "--output", tmp_path / "results.json",
           "--pavpu-threshold", "0.5", "--device", "cpu")
    iumask("predict", "--model", baseline / ENSEMBLE_FILE, "--input", data / "images" / "val", "--out",
           tmp_path / "predicted", "--device", "cpu", "--save-arrays")
    assert MaskStore.open(tmp_path / "masks.zarr").attrs["ensemble"] == key
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["path"] == key
    assert MaskStore.open(tmp_path / "predicted" / "arrays.zarr").attrs["ensemble"] == key


def test_identities_are_those_the_earlier_code_computed(ensemble):
    """The evaluation identity and a mask store's member digests, computed as the code before the
    model object did (each member's manifest read by hand), equal the new ones."""
    data, baseline = ensemble
    manifests = [json.loads((baseline / m / MANIFEST_FILE).read_text()) for m in ("mobilenet_v2", "second")]
    options, config = EvalConfig(split="val"), DataConfig(data)
    earlier = {"weights_sha256": [m["weights_sha256"] for m in manifests],
               "data": config.open("val").fingerprint(), "split": "val", "metrics_version": 2,
               "options": {"format": "auto", "conditions": None, "evaluation": options.identity()}}
    model = Model.resolve(baseline)
    assert evaluation_identity([model], config, options) == earlier
    with pytest.raises(TypeError, match=r"Model.resolve\(path\)"):  # a stage takes a model, never a path
        evaluation_identity([baseline], config, options)
    assert model.member_sha256() == {m.get("name", m["encoder"]): m["weights_sha256"] for m in manifests}
    assert model.size == (tuple(manifests[0]["image_size"]) if manifests[0].get("image_size") else None)


def test_a_model_is_checked_when_it_is_made(ensemble, tmp_path):
    _, baseline = ensemble
    copy = Path(shutil.copytree(baseline, tmp_path / "copy"))
    (copy / "second" / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(IumaskError, match="does not match the SHA-256"):
        Model.resolve(copy)
    manifest = json.loads((copy / ENSEMBLE_FILE).read_text())
    (copy / ENSEMBLE_FILE).write_text(json.dumps(dict(manifest, members=[])))
    with pytest.raises(IumaskError, match="names no members"):
        Model.resolve(copy)


def test_a_make_masks_cache_hit_loads_no_member(ensemble, tmp_path, monkeypatch, capsys):
    """The rerun decides from the manifests: no network is built and no weights file is read."""
    data, baseline = ensemble
    loads = []
    source = Model.source
    monkeypatch.setattr(Model, "source", lambda self, *a, **k: loads.append(self.key) or source(self, *a, **k))
    args = ["make-masks", "--ensemble", baseline, "--data", data, "--store", tmp_path / "masks.zarr", "--device", "cpu"]
    iumask(*args)
    assert loads == [Model.resolve(baseline).key]
    capsys.readouterr()
    iumask(*args)
    assert loads == [Model.resolve(baseline).key] and "cache hit" in capsys.readouterr().err
    iumask(*args[:-1], "gpu", expect=2)  # a malformed --device is refused on a cache hit too
    assert "--device" in capsys.readouterr().err and loads == [Model.resolve(baseline).key]
