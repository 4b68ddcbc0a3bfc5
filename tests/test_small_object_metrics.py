"""The metrics that see small and rare objects and selective prediction, each against a direct
computation on real CamVid labels (with plausible predictions made from them): instance recall per
class and size (instances by scipy.ndimage, independently of iumask's OpenCV labelling), mean class
accuracy, per-image mIoU and the worst 10 % of images, and AURC, AUGRC and risk at 80 % coverage by
sorting every pixel (torch-uncertainty's definitions) against the streamed histogram and its bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from testdata import CAMVID_CLASSES, CAMVID_VOID, camvid_labels, downsample, perturb_to_prediction

from iumask.core import SegmentationMetrics
from iumask.core.metrics import LARGE_INSTANCE_AREA, SMALL_INSTANCE_AREA, selective_risk, worst_mean


@pytest.fixture(scope="module")
def camvid(camvid_dir):
    """Ten CamVid labels at 180x240, predictions made from them, and class probabilities whose
    argmax is the prediction (random confidences, higher on correct pixels)."""
    rng = np.random.default_rng(11)
    labels = [downsample(label, 180, 240) for label in camvid_labels(10)]
    preds = [perturb_to_prediction(label, rng) for label in labels]
    probs = []
    for label, pred in zip(labels, preds):
        logits = rng.normal(size=(CAMVID_CLASSES, *pred.shape)) * 1.5
        # correct pixels tend to be more confident, as a model's are
        top = logits.max(0) + rng.exponential(1.0, pred.shape) + 1.5 * (pred == label)
        np.put_along_axis(logits, pred[None].astype(np.int64), top[None], 0)
        probs.append(torch.softmax(torch.from_numpy(logits), 0).float())
    return labels, preds, probs


def metrics_of(labels, preds, probs) -> SegmentationMetrics:
    m = SegmentationMetrics(CAMVID_CLASSES, ignore_index=CAMVID_VOID)
    for label, pred, prob in zip(labels, preds, probs):
        m.update(pred, label, probs=prob)
    return m


def test_instance_recall_per_class_and_size(camvid):
    labels, preds, probs = camvid
    found = np.zeros((CAMVID_CLASSES, 3))
    total = np.zeros((CAMVID_CLASSES, 3))
    for label, pred in zip(labels, preds):
        for c in range(CAMVID_CLASSES):
            components, count = ndimage.label(label == c, structure=np.ones((3, 3)))
            for i in range(1, count + 1):
                pixels = components == i
                size = 0 if pixels.mean() < SMALL_INSTANCE_AREA else 1 if pixels.mean() < LARGE_INSTANCE_AREA else 2
                total[c, size] += 1
                found[c, size] += (pred[pixels] == c).mean() >= 0.5
    result = metrics_of(labels, preds, probs).compute()
    assert result["instance_counts"]["total"] == total.astype(int).tolist()
    assert result["instance_counts"]["found"] == found.astype(int).tolist()
    assert total[:, 0].sum() > 20 and 0 < found[:, 0].sum() < total[:, 0].sum()  # small ones, some missed
    for i, size in enumerate(("small", "medium", "large")):
        assert result[f"instance_recall_{size}"] == pytest.approx(found[:, i].sum() / total[:, i].sum())
    per_class = found.sum(1) / np.maximum(total.sum(1), 1)
    got = result["instance_recall_per_class"]
    for c in range(CAMVID_CLASSES):
        assert math.isnan(got[c]) if total[c].sum() == 0 else got[c] == pytest.approx(per_class[c])
    assert result["instance_recall"] == pytest.approx(found.sum() / total.sum())


def test_mean_accuracy_and_per_image_miou(camvid):
    labels, preds, probs = camvid
    correct, labelled, per_image = np.zeros(CAMVID_CLASSES), np.zeros(CAMVID_CLASSES), []
    for label, pred in zip(labels, preds):
        valid = label != CAMVID_VOID
        ious = []
        for c in range(CAMVID_CLASSES):
            t, p = (label == c) & valid, (pred == c) & valid
            correct[c] += (t & p).sum()
            labelled[c] += t.sum()
            if (t | p).any():
                ious.append((t & p).sum() / (t | p).sum())
        per_image.append(np.mean(ious))
    result = metrics_of(labels, preds, probs).compute()
    present = labelled > 0
    assert result["mean_accuracy"] == pytest.approx((correct[present] / labelled[present]).mean())
    assert result["per_image_miou"] == pytest.approx(np.mean(per_image))
    assert result["worst_10pct_miou"] == pytest.approx(min(per_image))  # 10 images: the worst one
    assert result["images_scored"] == 10
    assert worst_mean([0.5, 0.1, 0.9, math.nan, 0.3], 0.5) == pytest.approx(0.2)  # ceil(0.5 · 4) = 2 worst


def exact_selective_risk(confidence: np.ndarray, error: np.ndarray) -> dict:
    """torch-uncertainty's AURC, AUGRC and RiskAt80Cov over every pixel: sort by confidence
    (descending), risk_k = errors of the first k / k, trapezoid over coverage k/n, / (1 − 1/n)."""
    order = np.argsort(-confidence, kind="stable")
    n = error.size
    cumulative = np.cumsum(error[order])
    k = np.arange(1, n + 1)
    risk, coverage = cumulative / k, k / n
    return {"aurc": np.trapezoid(risk, coverage) / (1 - 1 / n),
            "augrc": np.trapezoid(risk * coverage, coverage) / (1 - 1 / n),
            "risk_at_80_coverage": risk[math.ceil(0.8 * n) - 1]}


def test_selective_risk_equals_the_sorted_computation_within_its_bound(camvid):
    labels, preds, probs = camvid
    confidence, error = [], []
    for label, pred, prob in zip(labels, preds, probs):
        valid = label != CAMVID_VOID
        confidence.append(prob.max(0).values.numpy()[valid])
        error.append((pred != label)[valid].astype(np.float64))
    exact = exact_selective_risk(np.concatenate(confidence).astype(np.float64), np.concatenate(error))
    result = metrics_of(labels, preds, probs).compute()
    for key, value in exact.items():
        bound = result[f"{key}_bound"]
        assert abs(result[key] - value) <= bound, (key, result[key], value, bound)
        assert bound < 2e-3, (key, bound)  # a fine histogram: the bound is small on real data
    assert 0.05 < exact["aurc"] < exact["risk_at_80_coverage"] < np.concatenate(error).mean()


def test_selective_risk_of_orders_known_by_hand():
    """Two bins, most confident first: bin A has 2 pixels, 0 errors; bin B 2 pixels, 2 errors.
    Exact: risk = [0, 0, 1/3, 1/2]; the bins leave nothing to order, so the bound is only 2/n."""
    counts, errors = np.zeros(8), np.zeros(8)
    counts[7], counts[2], errors[2] = 2, 2, 2
    got = selective_risk(counts, errors, coverage=0.75)
    assert got["risk_at_80_coverage"] == pytest.approx(1 / 3)
    # ∫ E(k)/k over k ∈ [2, 4] with E = k − 2, divided by n = 4: (2 − 2 ln 2) / 4
    assert got["aurc"] == pytest.approx((2 - 2 * math.log(2)) / 4)
    assert got["augrc"] == pytest.approx((0 + 2) / 2 * 2 / 16)
    assert got["aurc_bound"] == pytest.approx(0.5) and got["augrc_bound"] == pytest.approx(0.5)


def test_new_state_sums_across_processes(camvid):
    """Instance counts and the risk histogram are summed (what all_reduce does); the per-image
    values are concatenated: two halves give the whole's metrics."""
    labels, preds, probs = camvid
    whole = metrics_of(labels, preds, probs)
    a, b = metrics_of(labels[::2], preds[::2], probs[::2]), metrics_of(labels[1::2], preds[1::2], probs[1::2])
    a.merge(b)
    merged, expected = a.compute(), whole.compute()
    for key in ("instance_recall", "instance_recall_small", "mean_accuracy", "per_image_miou", "worst_10pct_miou",
                "aurc", "augrc", "risk_at_80_coverage"):
        assert merged[key] == pytest.approx(expected[key], rel=1e-12), key
