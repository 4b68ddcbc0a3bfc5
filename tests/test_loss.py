"""iumask.core.loss: ``uncertainty_weighted_cross_entropy`` against a per-pixel loop with a
hand-written log-softmax (value) and a vectorised autograd reference (gradient), on downsampled CamVid
labels; ``class_weights`` (docs/method.md §7) on the real CamVid training labels, checked against an
independent count and against the median-frequency weights published in the CamVid README.

The CamVid tests are skipped when the data is absent; generated-data twins of the loss tests are in
``test_training_loss_oracle.py``.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from testdata import CAMVID_CLASSES, CAMVID_VOID, camvid_label_files, camvid_labels, downsample

import iumask

# --------------------------------------------------------------------------------------------
# uncertainty-weighted cross-entropy
# --------------------------------------------------------------------------------------------

def _camvid_targets(height, width, count=2):
    labels = camvid_labels()[:count]
    return torch.from_numpy(np.stack([downsample(lab, height, width) for lab in labels]).astype(np.int64))


def _loss_inputs(height=45, width=60, seed=0):
    target = _camvid_targets(height, width)
    assert (target == CAMVID_VOID).any()
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(target.shape[0], CAMVID_CLASSES, height, width, generator=gen,
                         dtype=torch.float64) * 2
    entropy = iumask.pixel_entropy(torch.softmax(logits, 1))
    iu = torch.from_numpy(np.stack([
        iumask.instance_uncertainty(t.numpy(), e.numpy(), CAMVID_CLASSES, 8, CAMVID_VOID)
        for t, e in zip(target, entropy)
    ])).double()
    assert iu.max() > 0.5
    return logits, target, iu


def _loss_loop(logits, target, iu, gamma, ignore, class_weights=None):
    """Σ_valid CE · w_y · (1 + IU)^γ / N_valid with a hand-written log-softmax, pixel by pixel."""
    b, c, h, w = logits.shape
    z = logits.detach().double().numpy()
    total, n_valid = 0.0, 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                t = int(target[i, y, x])
                if t == ignore:
                    continue
                row = z[i, :, y, x].tolist()
                m = max(row)
                lse = m + math.log(sum(math.exp(v - m) for v in row))
                ce = lse - row[t]
                weight = 1.0 if class_weights is None else float(class_weights[t])
                u = 0.0 if iu is None else float(iu[i, y, x])
                total += ce * weight * (1.0 + u) ** gamma
                n_valid += 1
    return total / n_valid


def _loss_autograd_ref(logits, target, iu, gamma, ignore, class_weights=None):
    """The same formula, vectorised, with a hand-written log-softmax (for the gradient)."""
    shifted = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_probs = shifted - shifted.exp().sum(dim=1, keepdim=True).log()
    valid = target != ignore
    safe = torch.where(valid, target, torch.zeros_like(target))
    ce = -log_probs.gather(1, safe[:, None])[:, 0]
    weight = valid.double()
    if class_weights is not None:
        weight = weight * class_weights.double()[safe]
    if iu is not None:
        weight = weight * (1.0 + iu.detach().double()) ** gamma
    return (ce * weight).sum() / valid.sum()


def test_loss_plain_equals_cross_entropy():
    logits, target, iu = _loss_inputs()
    ref = F.cross_entropy(logits, target, ignore_index=CAMVID_VOID)
    for out in (
        iumask.uncertainty_weighted_cross_entropy(logits, target, None, ignore_index=CAMVID_VOID),
        iumask.uncertainty_weighted_cross_entropy(logits, target, iu, exponent=0.0, ignore_index=CAMVID_VOID),
        iumask.uncertainty_weighted_cross_entropy(logits, target, torch.zeros_like(iu), exponent=2.0,
                                                  ignore_index=CAMVID_VOID),
    ):
        assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    # the default ignore_index is 255
    t255 = target.clone()
    t255[t255 == CAMVID_VOID] = 255
    out = iumask.uncertainty_weighted_cross_entropy(logits, t255, None)
    assert torch.allclose(out, F.cross_entropy(logits, t255, ignore_index=255), rtol=1e-12)
    # and the weighting actually changes the value when IU > 0
    weighted = iumask.uncertainty_weighted_cross_entropy(logits, target, iu, ignore_index=CAMVID_VOID)
    assert weighted > ref * 1.5


@pytest.mark.parametrize("gamma", [1.0, 2.0, 3.5])
def test_loss_matches_loop(gamma):
    logits, target, iu = _loss_inputs(24, 32, seed=int(gamma * 10))
    out = iumask.uncertainty_weighted_cross_entropy(logits, target, iu, exponent=gamma,
                                                    ignore_index=CAMVID_VOID)
    ref = _loss_loop(logits, target, iu, gamma, CAMVID_VOID)
    assert out.dim() == 0
    assert math.isclose(float(out), ref, rel_tol=1e-10)
    # the default exponent is 2
    if gamma == 2.0:
        default = iumask.uncertainty_weighted_cross_entropy(logits, target, iu, ignore_index=CAMVID_VOID)
        assert math.isclose(float(default), ref, rel_tol=1e-10)


def test_loss_class_weights_mean_over_valid_pixels():
    logits, target, iu = _loss_inputs(24, 32, seed=3)
    weights = torch.linspace(0.2, 5.0, CAMVID_CLASSES, dtype=torch.float64)
    for gamma, mask in ((0.0, None), (2.0, iu)):
        out = iumask.uncertainty_weighted_cross_entropy(logits, target, mask, exponent=gamma,
                                                        ignore_index=CAMVID_VOID, class_weights=weights)
        ref = _loss_loop(logits, target, mask, gamma, CAMVID_VOID, weights)
        assert math.isclose(float(out), ref, rel_tol=1e-10)
    # not torch's weighted mean (which divides by the sum of the weights)
    torch_weighted = F.cross_entropy(logits, target, weight=weights, ignore_index=CAMVID_VOID)
    plain_weighted = iumask.uncertainty_weighted_cross_entropy(logits, target, None,
                                                               ignore_index=CAMVID_VOID, class_weights=weights)
    assert not math.isclose(float(torch_weighted), float(plain_weighted), rel_tol=1e-3)
    valid = target != CAMVID_VOID
    assert math.isclose(float(plain_weighted),
                        float(torch_weighted) * float(weights[target[valid]].sum()) / int(valid.sum()),
                        rel_tol=1e-10)
    # uniform weights scale the loss
    const = torch.full((CAMVID_CLASSES,), 3.0, dtype=torch.float64)
    scaled = iumask.uncertainty_weighted_cross_entropy(logits, target, iu, ignore_index=CAMVID_VOID,
                                                       class_weights=const)
    base = iumask.uncertainty_weighted_cross_entropy(logits, target, iu, ignore_index=CAMVID_VOID)
    assert math.isclose(float(scaled), 3 * float(base), rel_tol=1e-12)
    # float32 weights with float64 logits work
    out32 = iumask.uncertainty_weighted_cross_entropy(logits, target, iu, ignore_index=CAMVID_VOID,
                                                      class_weights=weights.float())
    ref = _loss_loop(logits, target, iu, 2.0, CAMVID_VOID, weights.float().double())
    assert math.isclose(float(out32), ref, rel_tol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 2.0, 3.5])
def test_loss_gradients(gamma):
    logits, target, iu = _loss_inputs(45, 60, seed=7)
    weights = torch.linspace(0.5, 2.0, CAMVID_CLASSES, dtype=torch.float64)
    for cw in (None, weights):
        x1 = logits.clone().requires_grad_(True)
        u1 = iu.clone().requires_grad_(True)
        out = iumask.uncertainty_weighted_cross_entropy(x1, target, u1, exponent=gamma,
                                                        ignore_index=CAMVID_VOID, class_weights=cw)
        out.backward()
        assert u1.grad is None  # the mask is a constant
        x2 = logits.clone().requires_grad_(True)
        ref = _loss_autograd_ref(x2, target, iu, gamma, CAMVID_VOID, cw)
        ref.backward()
        assert torch.allclose(out.detach(), ref.detach(), rtol=1e-10)
        assert torch.allclose(x1.grad, x2.grad, rtol=1e-8, atol=1e-14)
        # ignored pixels get no gradient
        ignored = (target == CAMVID_VOID)[:, None].expand_as(x1.grad)
        assert torch.all(x1.grad[ignored] == 0)
        assert x1.grad.abs().sum() > 0


def test_loss_all_ignored_and_shape_errors():
    logits = torch.randn(1, 3, 4, 5, requires_grad=True)
    target = torch.full((1, 4, 5), 255, dtype=torch.int64)
    out = iumask.uncertainty_weighted_cross_entropy(logits, target, torch.rand(1, 4, 5))
    assert torch.isfinite(out) and float(out.detach()) == 0.0
    out.backward()
    assert torch.all(logits.grad == 0)
    with pytest.raises(ValueError):
        iumask.uncertainty_weighted_cross_entropy(logits, target[0], None)
    with pytest.raises(ValueError):
        iumask.uncertainty_weighted_cross_entropy(logits, target, torch.rand(1, 4, 4))


# --------------------------------------------------------------------------------------------
# class weights (docs/method.md §7) on the real CamVid training labels
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def camvid_counts(camvid_dir):
    pixels = np.zeros(11, dtype=np.int64)
    containing = np.zeros(11, dtype=np.int64)
    for path in camvid_label_files():
        label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        # Independent of iumask: one boolean mask per class.
        for c in range(11):
            n = int((label == c).sum())
            pixels[c] += n
            if n:
                containing[c] += label.size
    return pixels, containing


def test_counts_match_camvid_readme(camvid_counts):
    pixels, _ = camvid_counts
    assert pixels[0] == 10_682_767 and pixels[3] == 20_076_880 and pixels[10] == 184_967


def test_median_frequency_matches_published_weights(camvid_counts):
    pixels, containing = camvid_counts
    weights = iumask.class_weights(pixels, "median", containing)
    published = [0.2793, 0.2017, 4.7865, 0.1490, 1.0000, 0.4217, 3.8467, 1.9736, 0.7889, 6.3747, 8.8587]
    np.testing.assert_allclose(weights, published, atol=6e-5)


def test_inverse_proportion_has_unit_mean_pixel_weight(camvid_counts):
    pixels, _ = camvid_counts
    weights = iumask.class_weights(pixels, "inverse")
    np.testing.assert_allclose(weights, pixels.sum() / (11 * pixels))
    assert (weights * pixels).sum() / pixels.sum() == pytest.approx(1.0)
    assert weights.argmax() == 10 and weights.argmin() == 3  # bicyclist rarest, road commonest


def test_absent_class_gets_zero_and_a_warning():
    with pytest.warns(UserWarning, match=r"\[2\]"):
        w = iumask.class_weights([10, 30, 0], "inverse")
    np.testing.assert_allclose(w, [40 / 30, 40 / 90, 0])
    with pytest.warns(UserWarning):
        w = iumask.class_weights([10, 30, 0], "median", [100, 100, 0])
    np.testing.assert_allclose(w, [0.2 / 0.1, 0.2 / 0.3, 0])
    np.testing.assert_array_equal(iumask.class_weights([1, 2], "none"), [1, 1])
    with pytest.raises(ValueError):
        iumask.class_weights([1, 2], "sqrt")
