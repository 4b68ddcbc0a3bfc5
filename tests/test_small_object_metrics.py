"""The metrics that see small and rare objects and selective prediction, each against a direct
computation on real CamVid labels (with plausible predictions made from them): instance recall per
class and COCO size (instances by scipy.ndimage, independently of iumask's OpenCV labelling), mean
class accuracy, per-image mIoU (Wang et al.'s, and the label-or-prediction variant) and the worst
10 % of images, the per-image counts, and AURC, AUGRC and risk at 80 % coverage by sorting every
pixel (torch-uncertainty's definitions) against the streamed histogram and its bound; plus hand
cases of the roundings (worst k, coverage k) and of the bounds' range."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from testdata import CAMVID_CLASSES, CAMVID_VOID, camvid_labels, downsample, perturb_to_prediction

from iumask.core import SegmentationMetrics
from iumask.core.metrics import per_image_miou, risk_bin, selective_risk, worst_mean


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
                area = pixels.sum()  # COCO's absolute areas, in pixels at the scored resolution
                size = 0 if area < 32 ** 2 else 1 if area < 96 ** 2 else 2
                total[c, size] += 1
                found[c, size] += (pred[pixels] == c).mean() >= 0.5
    result = metrics_of(labels, preds, probs).compute()
    assert result["instance_counts"]["total"] == total.astype(int).tolist()
    assert result["instance_counts"]["found"] == found.astype(int).tolist()
    assert total[:, 0].sum() > 20 and 0 < found[:, 0].sum() < total[:, 0].sum()  # small ones, some missed
    assert total[:, 1].sum() > 5 and total[:, 2].sum() > 5  # and every size occurs
    for i, size in enumerate(("small", "medium", "large")):
        assert result[f"instance_recall_{size}"] == pytest.approx(found[:, i].sum() / total[:, i].sum())
    per_class = found.sum(1) / np.maximum(total.sum(1), 1)
    got = result["instance_recall_per_class"]
    for c in range(CAMVID_CLASSES):
        assert math.isnan(got[c]) if total[c].sum() == 0 else got[c] == pytest.approx(per_class[c])
    assert result["instance_recall"] == pytest.approx(found.sum() / total.sum())


def test_mean_accuracy_and_per_image_miou(camvid):
    """Per image, Wang et al.'s fine-grained mIoU averages the IoU of the classes in the image's
    label; the other variant also counts classes only predicted (IoU 0 for those)."""
    labels, preds, probs = camvid
    correct, labelled, per_image, either = np.zeros(CAMVID_CLASSES), np.zeros(CAMVID_CLASSES), [], []
    for label, pred in zip(labels, preds):
        valid = label != CAMVID_VOID
        ious, ious_either = [], []
        for c in range(CAMVID_CLASSES):
            t, p = (label == c) & valid, (pred == c) & valid
            correct[c] += (t & p).sum()
            labelled[c] += t.sum()
            if t.any():
                ious.append((t & p).sum() / (t | p).sum())
            if (t | p).any():
                ious_either.append((t & p).sum() / (t | p).sum())
        per_image.append(np.mean(ious))
        either.append(np.mean(ious_either))
    assert not np.allclose(per_image, either)  # the predictions add classes: the variants differ
    result = metrics_of(labels, preds, probs).compute()
    present = labelled > 0
    assert result["mean_accuracy"] == pytest.approx((correct[present] / labelled[present]).mean())
    assert result["per_image_miou"] == pytest.approx(np.mean(per_image))
    assert result["worst_10pct_miou"] == pytest.approx(min(per_image))  # 10 images: the worst one
    assert result["per_image_miou_label_or_prediction"] == pytest.approx(np.mean(either))
    assert result["worst_10pct_miou_label_or_prediction"] == pytest.approx(min(either))
    assert result["images_scored"] == 10
    assert per_image_miou(preds[0], labels[0], CAMVID_CLASSES, CAMVID_VOID) == pytest.approx(per_image[0])


@pytest.mark.parametrize("n, k", [(5, 1), (9, 1), (15, 1), (19, 1), (20, 2), (25, 2), (39, 3)])
def test_worst_10_percent_is_the_worst_max_1_floor_tenth(n, k):
    """Wang et al.'s worst k images, k = max(1, floor(0.1 n)): n = 15 gives 1 (ceil would give 2),
    n = 39 gives 3 (round or ceil: 4), n = 5 gives 1 (floor alone: none)."""
    values = [0.05 * (i + 1) for i in range(n)][::-1] + [math.nan]  # NaN: an image without valid pixels
    assert worst_mean(values) == pytest.approx(np.mean([0.05 * (i + 1) for i in range(k)]))
    assert worst_mean([0.5, 0.1, 0.9, math.nan, 0.3], 0.5) == pytest.approx(0.2)  # floor(0.5 · 4) = 2 worst
    assert math.isnan(worst_mean([math.nan]))


def test_image_counts_sum_to_the_dataset_iou_and_keep_image_order(camvid):
    """The per-image counts, summed over images, give the split's IoU exactly (what a bootstrap over
    images resamples); split over two processes, they come back in image order."""
    labels, preds, probs = camvid
    whole = SegmentationMetrics(CAMVID_CLASSES, ignore_index=CAMVID_VOID)
    for i, (label, pred) in enumerate(zip(labels, preds)):
        whole.update(pred, label, image_ids=i)
    counts = whole.image_counts()
    assert counts["intersection"].shape == counts["union"].shape == (10, CAMVID_CLASSES)
    assert counts["intersection"].dtype == np.int64 and counts["image_ids"].tolist() == list(range(10))
    for i, (label, pred) in enumerate(zip(labels, preds)):  # one image against set counting
        valid = label != CAMVID_VOID
        for c in range(CAMVID_CLASSES):
            t, p = (label == c) & valid, (pred == c) & valid
            assert counts["intersection"][i, c] == (t & p).sum() and counts["union"][i, c] == (t | p).sum()
            assert counts["label_pixels"][i, c] == t.sum()
    result = whole.compute()
    union = counts["union"].sum(0)
    iou = np.where(union > 0, counts["intersection"].sum(0) / np.maximum(union, 1), np.nan)
    assert np.array_equal(np.array(result["iou"], np.float64), iou, equal_nan=True)  # exactly
    # two "ranks" with every other image, gathered rank by rank as sync does: image order again
    ranks = [SegmentationMetrics(CAMVID_CLASSES, ignore_index=CAMVID_VOID) for _ in range(2)]
    for i, (label, pred) in enumerate(zip(labels, preds)):
        ranks[i % 2].update(pred[None], label[None], image_ids=[i])
    gathered = [r.per_image.image_counts for r in ranks]
    for r in ranks:
        r.sync(lambda tensor: None, lambda value, parts=gathered: parts)
    synced = ranks[1].image_counts()
    for name in ("intersection", "union", "label_pixels", "image_ids"):
        assert np.array_equal(synced[name], counts[name]), name


def test_merge_goes_by_name_when_one_side_has_no_pavpu(camvid):
    """A collection without PAvPU (no threshold) merged with one that has it: every other state
    lands in its own accumulator (zipping the lists would add calibration into mean entropy)."""
    labels, preds, probs = camvid
    entropy = [-(p * torch.log(p)).sum(0) for p in probs]
    with_pavpu = SegmentationMetrics(CAMVID_CLASSES, ignore_index=CAMVID_VOID, pavpu_threshold=1.0)
    without = SegmentationMetrics(CAMVID_CLASSES, ignore_index=CAMVID_VOID)
    whole_with = SegmentationMetrics(CAMVID_CLASSES, ignore_index=CAMVID_VOID, pavpu_threshold=1.0)
    for i, (label, pred, prob, ent) in enumerate(zip(labels, preds, probs, entropy)):
        (with_pavpu if i < 5 else without).update(pred, label, ent, prob)
        whole_with.update(pred, label, ent, prob)
    expected = whole_with.compute()
    for first, second in ((without, with_pavpu), (with_pavpu, without)):
        merged = SegmentationMetrics(CAMVID_CLASSES, ignore_index=CAMVID_VOID,
                                     pavpu_threshold=1.0 if first is with_pavpu else None)
        merged.merge(first)
        merged.merge(second)
        got = merged.compute()
        for key in ("miou", "mean_entropy", "ece", "nll", "aurc", "instance_recall", "per_image_miou"):
            assert got[key] == pytest.approx(expected[key], rel=1e-12), key
        # PAvPU: the patches of the half scored with the threshold
        assert got["pavpu_counts"] == with_pavpu.compute()["pavpu_counts"]


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


@pytest.mark.parametrize("errors, coverage, k", [
    ([0, 0, 1, 1], 0.8, 4),  # 3.2 pixels: ceil 4 (floor or round: 3)
    ([0, 1, 0, 1, 1], 0.5, 3),  # 2.5: ceil 3 (floor, or round half to even: 2)
    ([0, 0, 0, 1, 1, 1, 0], 0.8, 6),  # 5.6: ceil 6 (floor 5)
    ([0, 1, 0, 0, 1], 0.8, 4),  # 4.0 exactly: 4
])
def test_risk_at_coverage_is_the_risk_of_the_ceil_most_confident_pixels(errors, coverage, k):
    """One pixel per bin (so the order is known), most confident first: the risk at coverage c is
    errors among the first ceil(c · n) pixels / ceil(c · n), with no bound but 1/k."""
    n = len(errors)
    counts, errs = np.zeros(16), np.zeros(16)
    counts[16 - n:] = 1
    errs[16 - n:] = errors[::-1]  # bins in increasing confidence
    got = selective_risk(counts, errs, coverage=coverage)
    assert got["risk_at_80_coverage"] == pytest.approx(sum(errors[:k]) / k)
    assert got["risk_at_80_coverage_bound"] == pytest.approx(min(1 / k, max(sum(errors[:k]) / k,
                                                                            1 - sum(errors[:k]) / k)))


def test_selective_risk_bounds_stay_within_the_metrics_range():
    """A degenerate model: one pixel very confident, a thousand in one bin, half of them wrong. The
    unclamped AURC bound was 125; AURC lies in [0, 1] and AUGRC in [0, 1/2], so each bound is at
    most the distance from the estimate to the far end of that range, and still holds."""
    counts, errors = np.zeros(8), np.zeros(8)
    counts[7], counts[3], errors[3] = 1, 1000, 500
    got = selective_risk(counts, errors)
    for key, top in (("aurc", 1.0), ("augrc", 0.5), ("risk_at_80_coverage", 1.0)):
        value, bound = got[key], got[f"{key}_bound"]
        assert 0 <= value <= top and bound <= max(value, top - value) + 1e-15, (key, value, bound)
    error = np.array([0.0] + [1.0] * 500 + [0.0] * 500)
    for order in (error, np.concatenate([[0.0], error[1:][::-1]])):  # the bin's errors first or last
        exact = exact_selective_risk(-np.arange(error.size, dtype=np.float64), order)
        for key, value in exact.items():
            assert abs(got[key] - value) <= got[f"{key}_bound"], (key, got[key], value)
    assert got["aurc_bound"] < 1.0


def test_selective_risk_keeps_float64_confidences_in_float64():
    """Two pixels whose float64 confidences differ below float32's resolution near 1: the more
    confident one is right, the other wrong. In float64 they fall in different bins, so the order
    is known (risk 0, then 1/2); cast to float32 they would share a bin and AURC would be 1/2."""
    confidence = torch.tensor([1 - 5.0e-7, 1 - 5.03e-7], dtype=torch.float64)
    assert confidence.float()[0] == confidence.float()[1]  # one float32 value
    bins = risk_bin(confidence)
    assert bins[0] > bins[1]
    probs = torch.stack([confidence, 1 - confidence])[:, None, :]  # (C=2, H=1, W=2), float64
    m = SegmentationMetrics(2, ignore_index=255)
    m.update(np.zeros((1, 2), np.int64), np.array([[0, 1]]), probs=probs)
    got = m.compute()
    # ∫ E(k)/k over k ∈ [1, 2] with E = k − 1, over n = 2 (one shared bin: E/k = 1/2 throughout, 0.5)
    assert got["aurc"] == pytest.approx((1 - math.log(2)) / 2, abs=1e-12)
    assert got["augrc"] == pytest.approx(1 / 8) and got["risk_at_80_coverage"] == pytest.approx(0.5)
    assert m.selective_risk.risk_counts[bins[0]] == 1 and m.selective_risk.risk_errors[bins[1]] == 1


def test_selective_risk_of_orders_known_by_hand():
    """Two bins, most confident first: bin A has 2 pixels, 0 errors; bin B 2 pixels, 2 errors.
    Exact: risk = [0, 0, 1/3, 1/2]; the bins leave nothing to order, so the bound is only 2/n
    (within the metric's range)."""
    counts, errors = np.zeros(8), np.zeros(8)
    counts[7], counts[2], errors[2] = 2, 2, 2
    got = selective_risk(counts, errors, coverage=0.75)
    assert got["risk_at_80_coverage"] == pytest.approx(1 / 3)
    # ∫ E(k)/k over k ∈ [2, 4] with E = k − 2, divided by n = 4: (2 − 2 ln 2) / 4
    assert got["aurc"] == pytest.approx((2 - 2 * math.log(2)) / 4)
    assert got["augrc"] == pytest.approx((0 + 2) / 2 * 2 / 16)
    # AUGRC's 2/n = 0.5 is clamped to its range: at most 1/2 − AUGRC = 0.375
    assert got["aurc_bound"] == pytest.approx(0.5) and got["augrc_bound"] == pytest.approx(0.375)


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
