"""Model building, local encoder weights, saving/loading and inference at another resolution."""

from __future__ import annotations

import pytest
import torch

from iumask.errors import IumaskError
from iumask.inference import ensemble_probs
from iumask.models import build_model, load_member, save_member


class Pointwise(torch.nn.Module):
    """A 1x1-conv 'segmenter': each pixel's logits depend on that pixel only."""

    def __init__(self, classes: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, classes, 1)

    def forward(self, x):
        return self.conv(x)


def test_sliding_windows_equal_whole_image_for_a_pointwise_model():
    models = [Pointwise(seed=0).eval(), Pointwise(seed=1).eval()]
    images = torch.randn(2, 3, 70, 100)
    whole = ensemble_probs(models, images)
    slid = ensemble_probs(models, images, model_size=(32, 48), mode="slide")
    torch.testing.assert_close(slid, whole)
    assert torch.allclose(whole.sum(1), torch.ones(2, 70, 100))


def test_resize_mode_returns_probabilities_at_the_image_size():
    models = [Pointwise().eval()]
    images = torch.randn(1, 3, 64, 96)
    probs = ensemble_probs(models, images, model_size=(32, 48), mode="resize")
    assert probs.shape == (1, 4, 64, 96)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 64, 96))
    # A constant image gives constant logits, so resizing loses nothing.
    flat = torch.ones(1, 3, 64, 96)
    torch.testing.assert_close(ensemble_probs(models, flat, (32, 48)), ensemble_probs(models, flat))
    with pytest.raises(IumaskError):
        ensemble_probs(models, images, (32, 48), mode="tiles")


def test_local_encoder_weights_are_loaded(tmp_path):
    source = build_model("mobilenet_v2", 5)
    path = tmp_path / "encoder.pth"
    torch.save(source.encoder.state_dict(), path)
    model = build_model("mobilenet_v2", 5, str(path))
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key
    fresh = build_model("mobilenet_v2", 5)
    assert not all(torch.equal(fresh.encoder.state_dict()[k], v) for k, v in source.encoder.state_dict().items())
    # A whole-model state dict with an "encoder." prefix works too.
    torch.save(source.state_dict(), tmp_path / "model.pth")
    model = build_model("mobilenet_v2", 5, str(tmp_path / "model.pth"))
    first = next(iter(source.encoder.state_dict()))
    assert torch.equal(model.encoder.state_dict()[first], source.encoder.state_dict()[first])


def test_wrong_or_missing_encoder_weights_fail_clearly(tmp_path):
    with pytest.raises(IumaskError, match="not found"):
        build_model("mobilenet_v2", 5, str(tmp_path / "nope.pth"))
    torch.save(build_model("resnet18", 5).encoder.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(IumaskError, match="same encoder"):
        build_model("mobilenet_v2", 5, str(tmp_path / "resnet.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(IumaskError, match="junk.pth"):
        build_model("mobilenet_v2", 5, str(tmp_path / "junk.pth"))
    with pytest.raises(IumaskError, match="unknown encoder"):
        build_model("mobilenet_v9", 5)


def test_saved_member_round_trips(tmp_path):
    model = build_model("mobilenet_v2", 3)
    manifest = {"encoder": "mobilenet_v2", "classes": {"names": ["a", "b", "c"]}, "complete": True}
    save_member(tmp_path / "m", model, manifest)
    loaded, stored = load_member(tmp_path / "m")
    assert len(stored["weights_sha256"]) == 64
    x = torch.randn(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_architecture_names_are_the_installed_smp_registry():
    """iumask.architectures lists smp's architectures without importing it (for the CLI's start):
    the list must be the installed segmentation-models-pytorch's."""
    import segmentation_models_pytorch as smp

    from iumask.architectures import ARCHITECTURES

    assert ARCHITECTURES == {name: cls.__name__ for name, cls in smp.MODEL_ARCHITECTURES_MAPPING.items()}
