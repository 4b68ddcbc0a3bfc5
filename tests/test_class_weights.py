"""Class-weight baselines (docs/method.md §7) on the real CamVid training labels, checked against an
independent count and against the median-frequency weights published in the CamVid README."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

import iumask

CAMVID = Path(os.environ.get("IUMASK_CAMVID", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"))
VOID = 11


@pytest.fixture(scope="module")
def camvid_counts():
    labels = sorted((CAMVID / "trainannot").glob("*.png"))
    if not labels:
        pytest.skip(f"CamVid not found at {CAMVID} (set IUMASK_CAMVID)")
    pixels = np.zeros(11, dtype=np.int64)
    containing = np.zeros(11, dtype=np.int64)
    for path in labels:
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
