"""iumask.core.metrics (``SegmentationMetrics``: confusion matrix, IoU, pixel accuracy, mean
entropy, PAvPU) against per-class set counting and explicit loops over patches, on CamVid labels and
predictions perturbed from them (skipped without CamVid; generated-data twins are in
``test_evaluate_oracle.py``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from testdata import CAMVID_CLASSES, CAMVID_VOID, camvid_labels, downsample, perturb_to_prediction

import iumask

# --------------------------------------------------------------------------------------------
# SegmentationMetrics
# --------------------------------------------------------------------------------------------

def _metric_data(count=5, height=None, width=None, seed=0):
    """CamVid targets (void 11), predictions made by perturbing them, and entropies quantised to
    multiples of 1/64 (so that patch means are exact in float32 and thresholds avoid ties).
    Class 10 is removed from both (-> a class with TP+FP+FN = 0), and a void block is punched in."""
    rng = np.random.default_rng(seed)
    targets, preds, ents = [], [], []
    for label in camvid_labels(count):
        if height is not None:
            label = downsample(label, height, width)
        target = label.copy()
        target[target == 10] = CAMVID_VOID
        h, w = target.shape
        target[h // 3:h // 3 + 12, w // 2:w // 2 + 16] = CAMVID_VOID
        pred = perturb_to_prediction(label, rng)
        pred[pred == 10] = 9
        ent = (rng.integers(0, 150, target.shape) / 64.0).astype(np.float32)
        targets.append(target)
        preds.append(pred)
        ents.append(ent)
    return targets, preds, ents


def _iou_reference(targets, preds, num_classes, ignore):
    tp = np.zeros(num_classes)
    fp = np.zeros(num_classes)
    fn = np.zeros(num_classes)
    for t, p in zip(targets, preds):
        valid = t != ignore
        for c in range(num_classes):
            in_t = set(np.flatnonzero((t == c) & valid).tolist())
            in_p = set(np.flatnonzero((p == c) & valid).tolist())
            tp[c] += len(in_t & in_p)
            fp[c] += len(in_p - in_t)
            fn[c] += len(in_t - in_p)
    union = tp + fp + fn
    iou = np.array([tp[c] / union[c] if union[c] > 0 else math.nan for c in range(num_classes)])
    return iou, tp, union


def _pavpu_reference(targets, preds, ents, window, stride, threshold, ignore):
    """Explicit loop over the w x w windows (only whole windows, step ``stride``)."""
    counts = {"n_ac": 0, "n_au": 0, "n_ic": 0, "n_iu": 0}
    skipped = half = 0
    for t, p, e in zip(targets, preds, ents):
        h, w = t.shape
        for y in range(0, h - window + 1, stride):
            for x in range(0, w - window + 1, stride):
                tt = t[y:y + window, x:x + window]
                pp = p[y:y + window, x:x + window]
                valid = tt != ignore
                n_valid = int(valid.sum())
                if n_valid == 0:
                    skipped += 1
                    continue
                n_correct = int(((pp == tt) & valid).sum())
                accurate = 2 * n_correct >= n_valid
                half += 2 * n_correct == n_valid
                certain = e[y:y + window, x:x + window].astype(np.float64).mean() < threshold
                key = ("n_a" if accurate else "n_i") + ("c" if certain else "u")
                counts[key] += 1
    return counts, skipped, half


def test_iou_streaming_matches_set_counting():
    targets, preds, ents = _metric_data()
    iou_ref, tp, union = _iou_reference(targets, preds, CAMVID_CLASSES, CAMVID_VOID)
    assert union[10] == 0 and np.isnan(iou_ref[10])
    assert np.all(union[:10] > 0)

    streamed = iumask.SegmentationMetrics(CAMVID_CLASSES, ignore_index=CAMVID_VOID)
    for t, p, e in zip(targets, preds, ents):
        streamed.update(p, t, e)  # (H, W) numpy
    res = streamed.compute()
    iou = np.array(res["iou"], dtype=np.float64)
    assert np.isnan(iou[10])
    np.testing.assert_allclose(iou[:10], iou_ref[:10], rtol=1e-12)
    assert math.isclose(res["miou"], float(np.nanmean(iou_ref)), rel_tol=1e-12)
    assert math.isclose(res["miou"], float(np.mean(iou_ref[:10])), rel_tol=1e-12)
    valid_total = sum(int((t != CAMVID_VOID).sum()) for t in targets)
    assert math.isclose(res["pixel_accuracy"], tp.sum() / valid_total, rel_tol=1e-12)
    # mean entropy is over all pixels (labelled or not), like the u_th it is compared with
    ent_ref = math.fsum(float(x) for e in ents for x in e.ravel()) / sum(e.size for e in ents)
    assert math.isclose(res["mean_entropy"], ent_ref, rel_tol=1e-9)
    assert math.isnan(res["pavpu"])  # no threshold given: no PAvPU

    # one big (B, H, W) torch batch gives the same, and batches of mixed kinds too
    big = iumask.SegmentationMetrics(CAMVID_CLASSES, ignore_index=CAMVID_VOID)
    big.update(torch.from_numpy(np.stack(preds)), torch.from_numpy(np.stack(targets)),
               torch.from_numpy(np.stack(ents)))
    assert torch.equal(big.confusion, streamed.confusion)
    two = iumask.SegmentationMetrics(CAMVID_CLASSES, ignore_index=CAMVID_VOID)
    two.update(np.stack(preds[:2]), np.stack(targets[:2]).astype(np.int64), np.stack(ents[:2]))
    two.update(torch.from_numpy(np.stack(preds[2:])).long(), torch.from_numpy(np.stack(targets[2:])),
               torch.from_numpy(np.stack(ents[2:])))
    assert torch.equal(two.confusion, streamed.confusion)
    r_big, r_two = big.compute(), two.compute()
    for r in (r_big, r_two):
        np.testing.assert_array_equal(np.array(r["iou"]), iou)  # NaNs in the same places
        assert r["miou"] == res["miou"] and r["pixel_accuracy"] == res["pixel_accuracy"]
        assert math.isclose(r["mean_entropy"], res["mean_entropy"], rel_tol=1e-12)
    # the confusion matrix is (target, prediction) counts of valid pixels
    assert int(streamed.confusion.sum()) == valid_total
    assert np.array_equal(streamed.confusion.diag().numpy(), tp.astype(np.int64))

    # reset clears everything
    streamed.reset()
    assert int(streamed.confusion.sum()) == 0 and math.isnan(streamed.compute()["miou"])


def test_metrics_memory_does_not_grow():
    targets, preds, ents = _metric_data(count=3, height=90, width=120)
    m = iumask.SegmentationMetrics(CAMVID_CLASSES, ignore_index=CAMVID_VOID, pavpu_threshold=1.0)

    def footprint():
        out = {}
        for k, v in vars(m).items():
            if isinstance(v, (torch.Tensor, np.ndarray)):
                out[k] = tuple(v.shape)
            elif isinstance(v, (list, tuple, dict, set)) and k != "image_counts":  # per-image counts, by design
                out[k] = len(v)
        return out

    m.update(preds[0], targets[0], ents[0])
    before = footprint()
    for _ in range(10):
        for t, p, e in zip(targets, preds, ents):
            m.update(p, t, e)
    assert footprint() == before
    assert tuple(m.confusion.shape) == (CAMVID_CLASSES, CAMVID_CLASSES)
    total = int((targets[0] != CAMVID_VOID).sum()) + 10 * sum(int((t != CAMVID_VOID).sum()) for t in targets)
    assert int(m.confusion.sum()) == total


@pytest.mark.parametrize(
    "window,stride,size",
    [(4, None, None), (4, 1, (90, 120)), (3, 2, (90, 121)), (5, None, (93, 122))],
)
def test_pavpu_matches_patch_loop(window, stride, size):
    height, width = size if size else (None, None)
    targets, preds, ents = _metric_data(count=4 if size is None else 5, height=height, width=width, seed=window)
    mean_ent = float(np.mean([e.mean() for e in ents]))
    quantum = 1.0 / (64 * window * window)  # patch means are multiples of this
    threshold = (math.floor(mean_ent / quantum) + 0.5) * quantum
    m = iumask.SegmentationMetrics(CAMVID_CLASSES, ignore_index=CAMVID_VOID, pavpu_window=window,
                                   pavpu_threshold=threshold, pavpu_stride=stride)
    for t, p, e in zip(targets, preds, ents):
        m.update(torch.from_numpy(p), torch.from_numpy(t), torch.from_numpy(e))
    res = m.compute()
    ref, skipped, half = _pavpu_reference(targets, preds, ents, window, stride or window, threshold,
                                          CAMVID_VOID)
    assert skipped > 0  # fully-void patches exist and are skipped
    if window % 2 == 0:
        assert half > 0  # patches at exactly 50 % correct exist (counted accurate)
    assert all(v > 0 for v in ref.values()), ref
    assert res["pavpu_counts"] == ref
    n_ac, n_au, n_ic, n_iu = (ref[k] for k in ("n_ac", "n_au", "n_ic", "n_iu"))
    assert math.isclose(res["pavpu"], (n_ac + n_iu) / (n_ac + n_au + n_ic + n_iu), rel_tol=1e-12)
    assert math.isclose(res["p_accurate_given_certain"], n_ac / (n_ac + n_ic), rel_tol=1e-12)
    assert math.isclose(res["p_uncertain_given_inaccurate"], n_iu / (n_ic + n_iu), rel_tol=1e-12)
    assert res["pavpu_threshold"] == threshold


def test_pavpu_patch_rules_small():
    """Hand-made 4x4 patches: the accuracy boundary, skipped void patches, and certainty from the
    mean entropy over ALL pixels of the patch (ignored ones included; the implementation's
    behaviour)."""
    ign = 255
    t = np.zeros((4, 20), dtype=np.int64)
    p = np.zeros((4, 20), dtype=np.int64)
    e = np.zeros((4, 20), dtype=np.float32)
    # patch 0 (cols 0-3): 8 of 16 correct -> accurate (>= 0.5)
    p[:, 0:4].flat[:8] = 1
    # patch 1 (cols 4-7): 7 of 16 correct -> inaccurate
    p[:, 4:8].flat[:9] = 1
    # patch 2 (cols 8-11): all void -> skipped
    t[:, 8:12] = ign
    # patch 3 (cols 12-15): 2 valid pixels, 1 correct -> accurate; void pixels have high entropy
    t[:, 12:16] = ign
    t[0, 12:14] = [0, 0]
    p[0, 12] = 1
    e[:, 12:16] = 2.0
    e[0, 12:14] = 0.0  # mean over valid pixels 0 (< 1), over all pixels 1.75 (>= 1)
    # patch 4 (cols 16-19): all correct, mean entropy exactly the threshold -> uncertain (strict <)
    e[:, 16:20] = 1.0
    m = iumask.SegmentationMetrics(2, ignore_index=ign, pavpu_window=4, pavpu_threshold=1.0)
    m.update(p, t, e)
    counts = m.compute()["pavpu_counts"]
    assert counts == {"n_ac": 1, "n_au": 2, "n_ic": 1, "n_iu": 0}
    # trailing rows / columns that do not fill a whole window are not counted
    m2 = iumask.SegmentationMetrics(2, ignore_index=ign, pavpu_window=4, pavpu_threshold=1.0)
    m2.update(np.pad(p, ((0, 3), (0, 2))), np.pad(t, ((0, 3), (0, 2))), np.pad(e, ((0, 3), (0, 2))))
    assert m2.compute()["pavpu_counts"] == counts
    # no patch at all -> NaN, not an error
    m3 = iumask.SegmentationMetrics(2, ignore_index=ign, pavpu_window=4, pavpu_threshold=1.0)
    m3.update(t[:, 8:12], t[:, 8:12], e[:, 8:12])
    assert math.isnan(m3.compute()["pavpu"])


def test_metrics_bad_target_raises():
    m = iumask.SegmentationMetrics(CAMVID_CLASSES, ignore_index=255)
    t = np.zeros((6, 7), dtype=np.int64)
    p = np.zeros((6, 7), dtype=np.int64)
    for bad in (CAMVID_CLASSES, -1, 254):
        tb = t.copy()
        tb[2, 3] = bad
        with pytest.raises(ValueError):
            m.update(p, tb)
    assert int(m.confusion.sum()) == 0  # nothing was counted by the failed updates
    with pytest.raises(ValueError):
        m.update(p[:, :-1], t)
    # the ignore label itself is fine
    tb = t.copy()
    tb[2, 3] = 255
    m.update(p, tb)
    assert int(m.confusion.sum()) == 6 * 7 - 1


def test_metrics_bad_prediction_raises():
    m = iumask.SegmentationMetrics(3, ignore_index=255)
    t = np.array([[0, 1]])
    p = np.array([[3, 0]])  # 3 is not a class; currently counted as (target 1, pred 0)
    with pytest.raises(ValueError):
        m.update(p, t)
    m = iumask.SegmentationMetrics(3, ignore_index=255)
    with pytest.raises(ValueError):
        m.update(np.array([[-1, 0]]), np.array([[1, 1]]))  # currently counted as (0, 2)


# --------------------------------------------------------------------------------------------
# calibration: ECE, Brier, NLL (SegmentationMetrics.update(..., probs=...))
# --------------------------------------------------------------------------------------------

CALIBRATION_STATE = ("bin_counts", "bin_confidence", "bin_accuracy", "score_sums")


def _probs_from_prediction(pred: np.ndarray, rng: np.random.Generator, num_classes: int) -> np.ndarray:
    """(C, H, W) float32 probabilities: a softmax of noisy logits leaning towards ``pred`` with a
    per-pixel sharpness (confidences over the whole range), plus pixels with a confidence exactly on
    a float32 bin edge of torchmetrics (k/15 from torch.linspace) and pixels with confidence exactly 1
    (one-hot, right or wrong)."""
    h, w = pred.shape
    logits = rng.normal(0.0, 1.0, (num_classes, h, w))
    logits[pred, np.arange(h)[:, None], np.arange(w)[None, :]] += rng.uniform(0.0, 6.0, (h, w))
    logits *= rng.uniform(0.2, 3.0, (1, h, w))
    probs = torch.softmax(torch.from_numpy(logits), dim=0).float().numpy()
    edges = torch.linspace(0, 1, 16, dtype=torch.float32).numpy()
    flat = probs.reshape(num_classes, -1)
    picked = rng.choice(h * w, size=(h * w) // 20, replace=False)
    for j, i in enumerate(picked):
        top = int(rng.integers(0, num_classes))
        if j % 4 == 0:  # exactly 1
            flat[:, i] = 0.0
            flat[top, i] = 1.0
        else:  # exactly on an edge k/15 (k >= 2, so it stays the largest probability)
            edge = edges[2 + j % 13]
            flat[:, i] = (1.0 - edge) / (num_classes - 1)
            flat[top, i] = edge
    return probs


def _calibration_reference(probs: list[np.ndarray], targets: list[np.ndarray], num_classes: int, ignore: int,
                           batches: list[slice]) -> dict:
    """torchmetrics' MulticlassCalibrationError (streamed over the same batches) for the ECE
    (``ece``), and the same computed by torchmetrics' own binning function in float64 from the
    confidences and accuracies the metric collected (``ece64``: the metric itself sums its bins in
    float32, which costs ~1e-4 over 10^6 pixels); plain numpy loops over classes (float64) for
    Brier and NLL."""
    from torchmetrics.classification import MulticlassCalibrationError
    from torchmetrics.functional.classification.calibration_error import _ce_compute

    ece = MulticlassCalibrationError(num_classes=num_classes, n_bins=15, norm="l1", ignore_index=ignore)
    for s in batches:
        ece.update(torch.from_numpy(np.stack(probs[s])), torch.from_numpy(np.stack(targets[s]).astype(np.int64)))
    # the float32 edges it uses for float32 confidences, exactly, in float64
    edges = torch.linspace(0, 1, 16, dtype=torch.float32).double()
    ece64 = _ce_compute(torch.cat(ece.confidences).double(), torch.cat(ece.accuracies).double(), edges, norm="l1")
    brier = nll = 0.0
    pixels = 0
    for p, t in zip(probs, targets):
        valid = t != ignore
        p64 = p.astype(np.float64)
        per_pixel = np.zeros(t.shape)
        for c in range(num_classes):
            per_pixel += (p64[c] - (t == c)) ** 2
        brier += per_pixel[valid].sum()
        p_target = np.take_along_axis(p64, np.where(valid, t, 0)[None].astype(np.int64), axis=0)[0]
        nll += (-np.log(np.maximum(p_target[valid], 1e-12))).sum()
        pixels += int(valid.sum())
    return {"ece": float(ece.compute()), "ece64": float(ece64), "brier": brier / pixels, "nll": nll / pixels}


def _edge_counts(probs: list[np.ndarray], targets: list[np.ndarray], ignore: int) -> tuple[int, int]:
    """Valid pixels whose confidence is exactly on an inner bin edge, and exactly 1."""
    edges = torch.linspace(0, 1, 16, dtype=torch.float32).numpy()[1:-1]
    conf = np.concatenate([p.max(0)[t != ignore] for p, t in zip(probs, targets)])
    return int(np.isin(conf, edges).sum()), int((conf == 1.0).sum())


def _check_calibration_against_reference(targets, preds, probs, num_classes, ignore):
    batches = [slice(0, 1), slice(1, 3), slice(3, len(targets))]
    on_edge, at_one = _edge_counts(probs, targets, ignore)
    assert on_edge > 100 and at_one > 10  # the edge rules are exercised
    ref = _calibration_reference(probs, targets, num_classes, ignore, batches)

    m = iumask.SegmentationMetrics(num_classes, ignore_index=ignore)
    for s in batches:  # (B, ...) torch batches
        m.update(torch.from_numpy(np.stack(preds[s])), torch.from_numpy(np.stack(targets[s])),
                 probs=torch.from_numpy(np.stack(probs[s])))
    res = m.compute()
    single = iumask.SegmentationMetrics(num_classes, ignore_index=ignore)
    for p, t, pr in zip(preds, targets, probs):  # (H, W) / (C, H, W) numpy, one image at a time
        single.update(p, t, probs=pr)
    res_single = single.compute()
    diffs = {k: abs(res[k] - ref[k]) for k in ("ece", "brier", "nll")}
    diffs["ece64"] = abs(res["ece"] - ref["ece64"])
    # torchmetrics sums its bins in float32, iumask in float64
    assert diffs["ece"] <= 5e-4, (res["ece"], ref["ece"])
    assert diffs["ece64"] <= 1e-12, (res["ece"], ref["ece64"])
    assert diffs["brier"] <= 1e-9 and diffs["nll"] <= 1e-9, diffs
    for k in ("ece", "brier", "nll"):
        assert res_single[k] == pytest.approx(res[k], rel=1e-12, abs=1e-15)
    assert 0 < res["ece"] < 1 and 0 < res["brier"] < 2 and res["nll"] > 0
    valid_total = sum(int((t != ignore).sum()) for t in targets)
    assert int(m.calibration.bin_counts.sum()) == valid_total == int(m.calibration.score_sums[0])
    # the reliability diagram's bins give back the ECE: Σ pixels·|accuracy − confidence| / pixels
    bins = res["calibration_bins"]
    pixels = np.asarray(bins["pixels"], dtype=float)
    gap = np.nan_to_num(np.abs(np.asarray(bins["accuracy"], float) - np.asarray(bins["confidence"], float)))
    assert pixels.sum() == valid_total and len(bins["edges"]) == len(pixels) == 16
    assert (pixels * gap).sum() / pixels.sum() == pytest.approx(ref["ece64"], rel=1e-9, abs=1e-12)
    # the IoU part is unchanged by passing probs
    plain = iumask.SegmentationMetrics(num_classes, ignore_index=ignore)
    for p, t in zip(preds, targets):
        plain.update(p, t)
    assert torch.equal(plain.confusion, m.confusion)
    return diffs


def test_calibration_matches_torchmetrics_camvid():
    rng = np.random.default_rng(7)
    targets = []
    for label in camvid_labels(5):
        target = label.copy()
        h, w = target.shape
        target[h // 3:h // 3 + 12, w // 2:w // 2 + 16] = CAMVID_VOID
        targets.append(target)
    preds, probs = [], []
    for t in targets:
        probs.append(_probs_from_prediction(perturb_to_prediction(t, rng), rng, CAMVID_CLASSES))
        preds.append(probs[-1].argmax(0).astype(np.uint8))
    _check_calibration_against_reference(targets, preds, probs, CAMVID_CLASSES, CAMVID_VOID)


def _generated_labels(count: int, num_classes: int, ignore: int, rng: np.random.Generator, h=72, w=96):
    """Blocky label maps with rare classes and an ignore region."""
    labels = []
    for _ in range(count):
        label = np.full((h, w), int(rng.integers(0, 3)), dtype=np.uint8)
        for _ in range(20):
            rh, rw = int(rng.integers(2, h // 3)), int(rng.integers(2, w // 3))
            y, x = int(rng.integers(0, h - rh)), int(rng.integers(0, w - rw))
            label[y:y + rh, x:x + rw] = rng.integers(0, num_classes)
        label[rng.random((h, w)) < 0.02] = ignore
        label[: h // 8, : w // 5] = ignore
        labels.append(label)
    return labels


def test_calibration_matches_torchmetrics_generated():
    rng = np.random.default_rng(3)
    num_classes, ignore = 6, 255
    targets = _generated_labels(5, num_classes, ignore, rng)
    preds, probs = [], []
    for t in targets:
        probs.append(_probs_from_prediction(perturb_to_prediction(t, rng, num_classes), rng, num_classes))
        preds.append(probs[-1].argmax(0).astype(np.uint8))
    _check_calibration_against_reference(targets, preds, probs, num_classes, ignore)


def test_calibration_bin_edges_and_nan():
    """torchmetrics' binning: [k/15, (k+1)/15) with float32 edges, confidence 1 in a bin of its own;
    NaN without probabilities or valid pixels."""
    edges = torch.linspace(0, 1, 16, dtype=torch.float32)
    e9 = float(edges[9])  # 0.6 in float32 (a top-label confidence of 2 classes is >= 0.5)
    below = float(np.nextafter(np.float32(e9), np.float32(0)))
    conf = [e9, below, 1.0, 0.95]
    probs = torch.tensor([[c, 1 - c] for c in conf], dtype=torch.float32).T.reshape(2, 1, 4)
    target = torch.tensor([[0, 0, 1, 0]])  # the confidence-1 pixel is wrong
    m = iumask.SegmentationMetrics(2, ignore_index=255)
    m.update(probs.argmax(0), target, probs=probs)
    assert m.calibration.bin_counts.shape == (16,)
    assert m.calibration.bin_counts.tolist() == [0] * 8 + [1, 1] + [0] * 4 + [1, 1]
    # per-bin |acc - conf| weighted by share; the wrong confidence-1 pixel is not pooled with 0.95
    expected = (abs(1 - e9) + abs(1 - below) + 1.0 + abs(1 - np.float32(0.95))) / 4
    assert m.compute()["ece"] == pytest.approx(expected, rel=1e-7)

    from torchmetrics.functional.classification import multiclass_calibration_error
    ref = multiclass_calibration_error(probs.reshape(2, 4).T, target.reshape(4), 2, n_bins=15, norm="l1")
    assert m.compute()["ece"] == pytest.approx(float(ref), abs=1e-6)

    # p_target = 0 is clamped: -log(1e-12)
    assert m.compute()["nll"] == pytest.approx(
        float(np.mean([-np.log(e9), -np.log(below), -np.log(1e-12), -np.log(np.float32(0.95))])), rel=1e-6)

    no_probs = iumask.SegmentationMetrics(2, ignore_index=255)
    no_probs.update(target, target)
    all_ignored = iumask.SegmentationMetrics(2, ignore_index=255)
    all_ignored.update(target, torch.full_like(target, 255), probs=probs)
    for r in (no_probs.compute(), all_ignored.compute()):
        assert math.isnan(r["ece"]) and math.isnan(r["brier"]) and math.isnan(r["nll"])
    m.reset()
    assert all(float(getattr(m.calibration, k).abs().sum()) == 0 for k in CALIBRATION_STATE)
    assert math.isnan(m.compute()["ece"])
    with pytest.raises(ValueError):  # wrong number of classes
        m.update(target, target, probs=probs[:1])
    with pytest.raises(ValueError):  # class indices, not probabilities
        m.update(target, target, probs=torch.ones(2, 1, 4, dtype=torch.int64))


def test_calibration_memory_flat_and_summable():
    """The calibration state has a fixed size whatever the number of updates, and summing two
    metrics' state tensors (merge: what sync's all_reduce_sum does across ranks) gives the metrics of both halves."""
    rng = np.random.default_rng(5)
    num_classes, ignore = 5, 255
    targets = _generated_labels(6, num_classes, ignore, rng, h=40, w=56)
    probs = [_probs_from_prediction(perturb_to_prediction(t, rng, num_classes), rng, num_classes) for t in targets]
    preds = [p.argmax(0) for p in probs]

    m = iumask.SegmentationMetrics(num_classes, ignore_index=ignore)

    def footprint():
        state = {k: v for a in m.accumulators.values() for k, v in vars(a).items() if not k.startswith("_")}
        return {k: (tuple(v.shape), v.dtype) for k, v in state.items() if isinstance(v, torch.Tensor)} | {
            k: len(v) for k, v in state.items() if isinstance(v, (list, tuple, dict, set)) and k != "image_counts"}

    m.update(preds[0], targets[0], probs=probs[0])
    before = footprint()
    for _ in range(10):
        for p, t, pr in zip(preds, targets, probs):
            m.update(p, t, probs=pr)
    assert footprint() == before
    for k in CALIBRATION_STATE[:3]:
        assert getattr(m.calibration, k).shape == (16,) and getattr(m.calibration, k).dtype == torch.float64
    assert m.calibration.score_sums.shape == (3,) and m.calibration.score_sums.dtype == torch.float64

    whole = iumask.SegmentationMetrics(num_classes, ignore_index=ignore)
    half_a = iumask.SegmentationMetrics(num_classes, ignore_index=ignore)
    half_b = iumask.SegmentationMetrics(num_classes, ignore_index=ignore)
    for i, (p, t, pr) in enumerate(zip(preds, targets, probs)):
        whole.update(p, t, probs=pr)
        (half_a if i % 2 else half_b).update(p, t, probs=pr)
    half_a.merge(half_b)
    r_whole, r_sum = whole.compute(), half_a.compute()
    for k in ("ece", "brier", "nll", "miou"):
        assert r_sum[k] == pytest.approx(r_whole[k], rel=1e-12)
