"""MC dropout as the uncertainty source: ``make-masks --source mc-dropout --model M --passes T`` makes
a mask store from one trained model, checked against an independent recomputation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_runner import TINY_TRAIN as TRAIN
from cli_runner import iumask

from iumask.core import instance_uncertainty, pixel_entropy
from iumask.data.dataset import SegmentationDataset
from iumask.data.folder import FolderDataset
from iumask.data.synthetic import generate_synthetic
from iumask.models import load_member, predict_logits
from iumask.store import MaskStore

pytestmark = pytest.mark.slow

PASSES = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mc")
    data = generate_synthetic(root / "data", num_train=4, num_val=2, height=64, width=64, seed=8)
    # A high learning rate for two epochs: a model confident in places, so entropy varies.
    iumask("train-baseline", "--data", data, "--out", root / "baseline", *TRAIN, "--encoder", "resnet18",
           "--lr", "5e-2", "--epochs", "2")
    return root, data


def test_make_masks_with_mc_dropout_from_one_model(trained, tmp_path):
    root, data = trained
    model_dir = root / "baseline" / "mobilenet_v2"
    store_path = tmp_path / "mc.zarr"
    iumask("make-masks", "--source", "mc-dropout", "--model", model_dir, "--passes", PASSES, "--data", data,
           "--store", store_path, "--batch-size", "1", "--device", "cpu")
    store = MaskStore.open(store_path)
    options = store.identity["options"]
    assert options["source"] == "mc-dropout" and options["passes"] == PASSES
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert store.identity["member_sha256"] == {"mobilenet_v2": manifest["weights_sha256"]}

    # Independently: T forward passes with only the dropout layers in train mode, the RNG seeded
    # as documented (seed 0 + the batch's first image index), mean softmax, entropy, IU.
    model, _ = load_member(model_dir)
    dropout = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert dropout, "DeepLabV3+ has dropout in its ASPP"
    dataset = SegmentationDataset(FolderDataset(data, "train"))
    for index in range(len(dataset)):
        image = dataset[index]["image"][None]
        model.eval()
        for layer in dropout:
            layer.train()
        torch.manual_seed(index)
        with torch.no_grad():
            probs = torch.stack([torch.softmax(predict_logits(model, image), 1) for _ in range(PASSES)]).mean(0)
            model.eval()
            single = torch.softmax(predict_logits(model, image), 1)
        entropy = pixel_entropy(probs)[0].numpy()
        stored = store.read(index)
        np.testing.assert_allclose(stored["entropy"], entropy, atol=2e-3, rtol=2e-3)  # float16 store
        np.testing.assert_array_equal(stored["prediction"], probs.argmax(1)[0].numpy())
        iu = instance_uncertainty(probs.argmax(1)[0].numpy().astype(np.uint8), stored["entropy"], 10, 8, 255)
        np.testing.assert_allclose(stored["instance_uncertainty"], iu, atol=2e-3, rtol=2e-3)
        # The passes really differ: MC dropout is not one deterministic prediction.
        assert np.abs(pixel_entropy(single)[0].numpy() - entropy).max() > 1e-3

    # The store trains weighted models like an ensemble's store.
    iumask("train-weighted", "--data", data, "--store", store_path, "--out", tmp_path / "weighted", *TRAIN)
    assert (tmp_path / "weighted" / "mobilenet_v2" / "model.safetensors").is_file()


def test_mc_dropout_needs_exactly_one_model(trained, tmp_path, capsys):
    root, data = trained
    capsys.readouterr()
    iumask("make-masks", "--source", "mc-dropout", "--model", root / "baseline" / "ensemble.json", "--data", data,
           "--store", tmp_path / "mc.zarr", "--device", "cpu", expect=2)
    err = capsys.readouterr().err
    assert "takes one model" in err and "Traceback" not in err
    assert not (tmp_path / "mc.zarr").exists()
    iumask("make-masks", "--source", "mc-dropout", "--model", root / "baseline" / "mobilenet_v2", "--passes", "1",
           "--data", data, "--store", tmp_path / "mc.zarr", "--device", "cpu", expect=2)
    assert "--passes" in capsys.readouterr().err
