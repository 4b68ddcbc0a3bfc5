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
            elif isinstance(v, (list, tuple, dict, set)):
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
