"""Any segmentation-models-pytorch architecture (``--arch``): a U-Net trains, makes masks and is
evaluated end to end; the manifest records the architecture and loading honours it; an
architecture that cannot take the encoder is refused before any work, and MC dropout names an
architecture without dropout."""

from __future__ import annotations

import json

import pytest
import torch
from cli_runner import TINY_TRAIN as TRAIN
from cli_runner import iumask

from iumask.config import ModelConfig
from iumask.errors import IumaskError
from iumask.models import build_model, input_stride, load_member, predict_logits
from iumask.store import MaskStore

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]



def test_unet_trains_makes_masks_and_evaluates(make_synthetic, tmp_path, capsys):
    data = make_synthetic("arch", num_train=4, num_val=2, height=48, width=40)  # sides not divisible by 32
    iumask("train-baseline", "--data", data, "--out", tmp_path / "unet", *TRAIN, "--arch", "unet")
    manifest = json.loads((tmp_path / "unet" / "mobilenet_v2" / "manifest.json").read_text())
    assert manifest["architecture"] == "Unet"
    model, _ = load_member(tmp_path / "unet" / "mobilenet_v2")
    assert type(model).__name__ == "Unet" and input_stride(model) == 32
    iumask("make-masks", "--model", tmp_path / "unet", "--data", data, "--store", tmp_path / "m.zarr", "--device",
           "cpu")
    assert MaskStore.open(tmp_path / "m.zarr").completed().all()
    iumask("train-weighted", "--data", data, "--store", tmp_path / "m.zarr", "--out", tmp_path / "iu", *TRAIN,
           "--arch", "unet")
    iumask("evaluate", "--model", tmp_path / "iu", "--model", tmp_path / "unet", "--data", data, "--output",
           tmp_path / "r.json", "--device", "cpu", "--pavpu-threshold", "1")
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert len(results) == 2 and all(0 <= r["miou"] <= 1 for r in results)
    capsys.readouterr()
    iumask("make-masks", "--model", tmp_path / "unet" / "mobilenet_v2", "--data", data, "--store",
           tmp_path / "mc.zarr", "--source", "mc-dropout", "--device", "cpu", expect=2)
    assert "(Unet) has no dropout layer" in capsys.readouterr().err.replace("\n", " ")


def test_the_default_is_the_papers_deeplabv3plus_and_logits_keep_the_input_size():
    model = build_model("mobilenet_v2", 3)
    assert type(model).__name__ == "DeepLabV3Plus" and input_stride(model) == 16
    assert ModelConfig(("mobilenet_v2",)).architecture == "DeepLabV3Plus"
    unet = build_model("mobilenet_v2", 3, architecture="unet").eval()
    with torch.no_grad():
        assert predict_logits(unet, torch.zeros(1, 3, 50, 70)).shape == (1, 3, 50, 70)


def test_an_architecture_that_cannot_take_the_encoder_is_refused(tmp_path, capsys):
    with pytest.raises(IumaskError, match="--arch DPT with --encoder mobilenet_v2: segmentation-models-pytorch"):
        ModelConfig(("mobilenet_v2",), None, "dpt")
    with pytest.raises(IumaskError, match="unknown architecture; choose one of"):
        ModelConfig(("mobilenet_v2",), None, "segnet")
    capsys.readouterr()
    iumask("train-baseline", "--data", tmp_path, "--out", tmp_path / "o", *TRAIN, "--arch", "dpt", expect=2)
    assert "cannot build it" in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "o").exists()


def test_experiment_spec_takes_an_architecture_for_the_arms_and_one_for_the_masks(make_synthetic, tmp_path):
    from iumask.experiment.spec import load_spec

    data = make_synthetic("arch-spec")
    spec = tmp_path / "spec.toml"
    spec.write_text(f'name = "x"\nencoders = ["mobilenet_v2"]\narch = "fpn"\nseeds = [0]\n[data]\nroot = "{data}"\n'
                    '[masks]\nencoders = ["mobilenet_v2"]\n[[arms]]\nname = "iu"\niu = "offline"\n')
    loaded = load_spec(spec)
    assert loaded.model(("mobilenet_v2",)).architecture == "FPN"
    assert loaded.ensemble.model.architecture == "DeepLabV3Plus"  # the paper's, unless [masks] arch says
    spec.write_text(spec.read_text().replace('arch = "fpn"', 'arch = "dpt"'))
    with pytest.raises(IumaskError, match="cannot build it"):
        load_spec(spec)
