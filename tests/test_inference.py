"""The one place that turns probabilities into maps (iumask.inference): pixel entropy, predicted
class and IU, checked against slower independent computations on real CamVid labels; and the
TensorBoard images of a training run use the run's connectivity (they were always 8-connected)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iumask.data.folder import ClassInfo
from iumask.inference import InstanceUncertainty, pixel_maps
from iumask.models import build_model
from iumask.stages.train import EpochLog, validation_maps
from tests.reference import entropy_np, instance_means
from tests.testdata import CAMVID_VOID, camvid_labels, downsample, perturb_to_prediction

NUM_CLASSES = 11


def _probs_peaked_at(prediction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(1, C, H, W) probabilities whose argmax is ``prediction`` (random confidences)."""
    logits = rng.normal(size=(1, NUM_CLASSES, *prediction.shape))
    np.put_along_axis(logits, prediction[None, None].astype(np.int64), 6.0 + rng.random(prediction.shape)[None, None],
                      axis=1)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def camvid_case():
    rng = np.random.default_rng(3)
    label = downsample(camvid_labels(1)[0], 90, 120)
    prediction = perturb_to_prediction(label, rng, NUM_CLASSES)
    return label, prediction, _probs_peaked_at(prediction, rng)


@pytest.mark.parametrize("normalize", [False, True])
def test_pixel_maps_equal_entropy_and_argmax_computed_directly(camvid_case, normalize):
    _, prediction, probs = camvid_case
    maps = pixel_maps(torch.from_numpy(probs).to(torch.bfloat16), normalize)  # any precision in, float32 out
    assert maps.entropy.dtype == torch.float32 and maps.prediction.dtype == torch.uint8
    expected = entropy_np(torch.from_numpy(probs).to(torch.bfloat16).float().numpy())
    if normalize:
        expected /= np.log(NUM_CLASSES)
    np.testing.assert_allclose(maps.entropy.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(maps.prediction.numpy()[0], prediction)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("instances_from", ["prediction", "label"])
def test_instance_uncertainty_of_an_image_and_a_batch_match_flood_fill(camvid_case, connectivity, instances_from):
    label, prediction, probs = camvid_case
    maps = pixel_maps(torch.from_numpy(probs))
    iu_of = InstanceUncertainty(NUM_CLASSES, CAMVID_VOID, connectivity, instances_from)
    instances = prediction if instances_from == "prediction" else label
    expected = instance_means(instances, maps.entropy.numpy()[0], connectivity, CAMVID_VOID)
    image = iu_of.image(maps.prediction.numpy()[0], maps.entropy.numpy()[0], label)
    batch = iu_of.batch(maps, torch.from_numpy(label)[None])
    np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(batch.numpy()[0], image)


def test_connectivity_changes_the_iu_of_this_image(camvid_case):
    """The case above tells 4- from 8-connectivity apart (else the parametrised test proves little)."""
    _, _, probs = camvid_case
    maps = pixel_maps(torch.from_numpy(probs))
    four, eight = (InstanceUncertainty(NUM_CLASSES, CAMVID_VOID, c).batch(maps) for c in (4, 8))
    assert not torch.equal(four, eight)


def test_padding_joins_no_instance(camvid_case):
    label, prediction, probs = camvid_case
    maps = pixel_maps(torch.from_numpy(probs))
    valid = torch.ones(1, *label.shape, dtype=torch.bool)
    valid[:, :, -30:] = False  # the right quarter is padding
    iu = InstanceUncertainty(NUM_CLASSES, CAMVID_VOID, 8).batch(maps, valid=valid)
    cut = prediction.copy()
    cut[:, -30:] = CAMVID_VOID
    expected = instance_means(cut, maps.entropy.numpy()[0], 8, CAMVID_VOID)
    np.testing.assert_allclose(iu.numpy()[0], expected, rtol=1e-5, atol=1e-6)
    assert float(iu[0, :, -30:].abs().max()) == 0.0


def test_label_instances_need_the_labels(camvid_case):
    _, _, probs = camvid_case
    with pytest.raises(ValueError, match="needs the labels"):
        InstanceUncertainty(NUM_CLASSES, CAMVID_VOID, 8, "label").batch(pixel_maps(torch.from_numpy(probs)))


@pytest.mark.parametrize("connectivity", [4, 8])
def test_training_log_images_use_the_runs_connectivity(connectivity):
    """validation_maps (the TensorBoard images) computes IU at the connectivity the log was given."""
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", 3, None)
    image = torch.randn(3, 64, 64)
    val_set = [{"image": image}]
    classes = ClassInfo(("a", "b", "c"), ignore_index=255)
    log = EpochLog([], [], classes, val_set, torch.device("cpu"), connectivity=connectivity)
    assert log.iu_of.connectivity == connectivity
    [shown] = validation_maps(model, val_set, 1, log.iu_of, torch.device("cpu"))
    expected = instance_means(shown["prediction"], shown["entropy"], connectivity, 255)
    np.testing.assert_allclose(shown["iu"], expected, rtol=1e-5, atol=1e-6)
