"""iumask.core.entropy (``pixel_entropy``, ``mean_softmax``) against per-pixel loops with
``math.log`` and a hand-written softmax."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import iumask

# --------------------------------------------------------------------------------------------
# pixel_entropy, mean_softmax
# --------------------------------------------------------------------------------------------

def _entropy_loop(probs: np.ndarray) -> np.ndarray:
    b, c, h, w = probs.shape
    out = np.zeros((b, h, w))
    for i in range(b):
        for y in range(h):
            for x in range(w):
                out[i, y, x] = -sum(p * math.log(p) for p in probs[i, :, y, x].tolist() if p > 0)
    return out


def _softmax_loop(logits: np.ndarray) -> np.ndarray:
    probs = np.zeros_like(logits, dtype=np.float64)
    b, c, h, w = logits.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                z = logits[i, :, y, x].tolist()
                m = max(z)
                e = [math.exp(v - m) for v in z]
                s = sum(e)
                probs[i, :, y, x] = [v / s for v in e]
    return probs


def test_pixel_entropy_matches_loop_numpy_and_torch():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(2, 11, 9, 13))
    probs = _softmax_loop(logits)
    ref = _entropy_loop(probs)

    ent_np = iumask.pixel_entropy(probs)
    assert isinstance(ent_np, np.ndarray) and ent_np.shape == (2, 9, 13)
    np.testing.assert_allclose(ent_np, ref, rtol=1e-10, atol=1e-12)

    probs_t = torch.from_numpy(probs)
    ent_t = iumask.pixel_entropy(probs_t)
    assert isinstance(ent_t, torch.Tensor) and ent_t.dtype == torch.float64
    np.testing.assert_allclose(ent_t.numpy(), ref, rtol=1e-10, atol=1e-12)

    # float32 in, float32 out, both kinds agree
    ent32_np = iumask.pixel_entropy(probs.astype(np.float32))
    ent32_t = iumask.pixel_entropy(probs_t.float())
    assert ent32_np.dtype == np.float32 and ent32_t.dtype == torch.float32
    np.testing.assert_allclose(ent32_np, ent32_t.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ent32_np, ref, rtol=1e-5, atol=1e-5)

    # torch softmax of the same logits gives the same entropy
    ent_sm = iumask.pixel_entropy(torch.softmax(torch.from_numpy(logits), dim=1))
    np.testing.assert_allclose(ent_sm.numpy(), ref, rtol=1e-9, atol=1e-12)

    # normalize divides by ln C
    norm = iumask.pixel_entropy(probs, normalize=True)
    np.testing.assert_allclose(norm, ref / math.log(11), rtol=1e-10)
    assert norm.max() <= 1.0 and ref.max() > 1.0  # the normalised range is [0, 1]


def test_pixel_entropy_special_distributions():
    c = 7
    onehot = np.zeros((1, c, 3, 4))
    onehot[0, 2] = 1.0
    for probs in (onehot, torch.from_numpy(onehot)):
        ent = iumask.pixel_entropy(probs)
        assert not np.isnan(np.asarray(ent)).any()
        assert np.all(np.asarray(ent) == 0)

    uniform = np.full((2, c, 3, 4), 1.0 / c)
    for probs in (uniform, torch.from_numpy(uniform)):
        np.testing.assert_allclose(np.asarray(iumask.pixel_entropy(probs)), math.log(c), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(iumask.pixel_entropy(probs, normalize=True)), 1.0, rtol=1e-12)

    # exact zeros among non-trivial probabilities: no NaN, zeros contribute nothing
    probs = np.zeros((1, c, 1, 2))
    probs[0, :2, 0, 0] = 0.5
    probs[0, [1, 3, 5], 0, 1] = [0.2, 0.3, 0.5]
    for p in (probs, torch.from_numpy(probs), probs.astype(np.float32), torch.from_numpy(probs).float()):
        ent = np.asarray(iumask.pixel_entropy(p), dtype=np.float64)
        assert not np.isnan(ent).any()
        np.testing.assert_allclose(ent[0, 0, 0], math.log(2), rtol=1e-6)
        np.testing.assert_allclose(ent[0, 0, 1], -sum(q * math.log(q) for q in (0.2, 0.3, 0.5)), rtol=1e-6)

    # gradient through torch entropy is finite even with zeros
    t = torch.from_numpy(probs).requires_grad_(True)
    iumask.pixel_entropy(t).sum().backward()
    assert torch.isfinite(t.grad).all()

    with pytest.raises(ValueError):
        iumask.pixel_entropy(np.full((c, 3, 4), 1.0 / c))


def test_mean_softmax_is_equal_weight_average():
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 5, 4, 6, generator=gen) * 2 for _ in range(3)]
    ref = sum(torch.softmax(x, 1) for x in logits) / 3
    out = iumask.mean_softmax(logits)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(out.sum(1), torch.ones(2, 4, 6), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_top_class_is_the_first_highest_class_as_a_loop_finds_it(dtype):
    """top_class (max(1).indices) against a per-pixel loop taking the first maximum, on random
    scores, on scores with many ties (quantised), on uniform ones (all tied) and on 300 classes."""
    rng = np.random.default_rng(3)
    cases = [rng.random((2, 11, 9, 13)), np.round(rng.random((2, 5, 9, 13)) * 3) / 3, np.full((1, 7, 4, 6), 0.25),
             rng.random((1, 300, 5, 4))]
    for scores in cases:
        tensor = torch.from_numpy(scores).to(dtype)
        stored = tensor.float().numpy()  # the values in this dtype, as the loop must see them
        b, c, h, w = stored.shape
        expected = np.zeros((b, h, w), dtype=np.int64)
        for i in range(b):
            for y in range(h):
                for x in range(w):
                    column = stored[i, :, y, x].tolist()
                    expected[i, y, x] = column.index(max(column))
        got = iumask.core.top_class(tensor)
        assert got.dtype == torch.int64
        np.testing.assert_array_equal(got.numpy(), expected)
        assert torch.equal(got, tensor.argmax(1))
