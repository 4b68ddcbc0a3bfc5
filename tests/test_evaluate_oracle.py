"""``evaluate`` and ``make-masks`` against an independent recomputation.

A tiny ensemble (two MobileNetV2 members, 2 epochs at a high learning rate, so that it is
confident in places and its entropy varies) is trained at a reduced ``--size`` 32x48 on
64x96 synthetic images. The test then loads the members with ``load_member``, runs them itself over
the split's images (read from the PNG files here), and computes the confusion matrix, per-class IoU,
mIoU, pixel accuracy, mean entropy and PAvPU with plain numpy loops, following the definitions of
``iumask/core/metrics.py`` and the README:

* native resolution (labels at their own size, logits upsampled bilinearly), one member and the
  ensemble (mean softmax), ``inference="resize"``;
* ``inference="slide"``: windows of the training size, overlap 1/3, softmax averaged;
* ``resolution="train"``: images resized (bilinear) and labels resized (nearest, pixel centres) to
  the training size;
* the default PAvPU threshold: the training-set mean entropy at the training size;
* ``make-masks --instances-from label --connectivity 4``: the stored prediction and entropy equal
  the recomputed ones, and the stored IU equals the mean of the stored entropy over every
  4-connected component of the (resized) label, 0 on ignore-label pixels.

Plus generated-data twins (always run) of the metric reference tests of ``test_metrics.py`` that skip
without CamVid, with the CamVid version alongside (skipped when the data is absent).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from reference import entropy_np, instance_means
from testdata import camvid_labels, downsample, ids_of, read_label

import iumask
from iumask.config import DataConfig, EvalConfig
from iumask.model import Model
from iumask.models import load_member
from iumask.stages import evaluate as evaluate_stage
from iumask.store import MaskStore

NUM_CLASSES = 10
IGNORE = 255
NATIVE = (64, 96)
SIZE = (32, 48)  # training size (H, W)
MEMBERS = ("mobilenet_v2", "mobilenet_v2-2")

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# independent helpers
# --------------------------------------------------------------------------------------------

def read_rgb(root: Path, split: str, image_id: str) -> np.ndarray:
    bgr = cv2.imread(str(root / "images" / split / f"{image_id}.png"), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(bgr[..., ::-1])


def evaluate(models, root, split, device="cpu", **options):
    """The evaluate stage with the options spelled as on the command line."""
    return evaluate_stage.evaluate([Model.resolve(m) for m in models], DataConfig(root), EvalConfig(split, **options),
                                   device)


def to_input(rgb: np.ndarray, manifest: dict) -> torch.Tensor:
    """(1, 3, H, W) float32 normalised with the manifest's mean/std."""
    norm = manifest["normalization"]
    x = (rgb.astype(np.float32) / 255.0 - np.asarray(norm["mean"], np.float32)) / np.asarray(norm["std"], np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


def nearest_resize(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour at pixel centres: output pixel i takes input pixel floor((i + 0.5) · in / out)."""
    h, w = label.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return label[rows[:, None], cols[None, :]]


@torch.no_grad()
def run_members(models, x: torch.Tensor) -> list[torch.Tensor]:
    assert x.shape[-2] % 16 == 0 and x.shape[-1] % 16 == 0  # no padding involved
    return [m(x).float() for m in models]


def softmax_mean(logits: list[torch.Tensor]) -> np.ndarray:
    return np.mean([torch.softmax(z, 1).numpy().astype(np.float64) for z in logits], axis=0)


def probs_resize(models, x: torch.Tensor) -> np.ndarray:
    """Image resized (bilinear) to the training size, logits upsampled (bilinear) back, softmax averaged."""
    small = F.interpolate(x, size=SIZE, mode="bilinear", align_corners=False)
    return softmax_mean([F.interpolate(z, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
                         for z in run_members(models, small)])


def window_starts(length: int, window: int) -> list[int]:
    """Windows overlapping by (at least) a third, the last one flush with the end."""
    if length <= window:
        return [0]
    stride = (2 * window) // 3
    starts, s = [], 0
    while s + window < length:
        starts.append(s)
        s += stride
    return starts + [length - window]


def probs_slide(models, x: torch.Tensor) -> np.ndarray:
    h, w = x.shape[-2:]
    total = np.zeros((x.shape[0], NUM_CLASSES, h, w))
    count = np.zeros((h, w))
    for y in window_starts(h, SIZE[0]):
        for x0 in window_starts(w, SIZE[1]):
            crop = x[..., y:y + SIZE[0], x0:x0 + SIZE[1]]
            total[..., y:y + SIZE[0], x0:x0 + SIZE[1]] += softmax_mean(run_members(models, crop))
            count[y:y + SIZE[0], x0:x0 + SIZE[1]] += 1
    assert count.min() >= 1 and count.max() > 1  # windows overlap
    return total / count


def patch_means(ents, window, stride):
    return np.array([e[y:y + window, x:x + window].mean()
                     for e in ents
                     for y in range(0, e.shape[0] - window + 1, stride)
                     for x in range(0, e.shape[1] - window + 1, stride)])


def threshold_between(ents, window, stride) -> float:
    """A threshold near the median patch mean entropy, in a gap between patch means (no ties)."""
    values = np.unique(patch_means(ents, window, stride))
    mid = len(values) // 2
    for k in sorted(range(1, len(values)), key=lambda k: abs(k - mid)):
        if values[k] - values[k - 1] > 1e-4:
            return float((values[k] + values[k - 1]) / 2)
    raise AssertionError("no gap between patch means")


def reference_metrics(preds, targets, ents, num_classes, ignore, window=4, stride=None, threshold=None) -> dict:
    """Confusion matrix, IoU (NaN when TP+FP+FN = 0), mIoU over the others, pixel accuracy, mean
    entropy over all pixels, and PAvPU from an explicit loop over whole w x w patches (step
    ``stride``): skipped without valid pixels, accurate when correct/valid >= 0.5, certain when
    the mean entropy over all its pixels < threshold."""
    stride = stride or window
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    counts = {"n_ac": 0, "n_au": 0, "n_ic": 0, "n_iu": 0}
    entropy_sum, entropy_pixels = 0.0, 0
    for p, t, e in zip(preds, targets, ents):
        assert p.shape == t.shape == e.shape
        valid = t != ignore
        np.add.at(confusion, (t[valid].astype(np.int64), p[valid].astype(np.int64)), 1)
        entropy_sum += float(e.astype(np.float64).sum())
        entropy_pixels += e.size
        if threshold is None:
            continue
        for y in range(0, t.shape[0] - window + 1, stride):
            for x in range(0, t.shape[1] - window + 1, stride):
                v = valid[y:y + window, x:x + window]
                if not v.any():
                    continue
                correct = ((p[y:y + window, x:x + window] == t[y:y + window, x:x + window]) & v).sum()
                accurate = correct / v.sum() >= 0.5
                certain = e[y:y + window, x:x + window].astype(np.float64).mean() < threshold
                counts[("n_a" if accurate else "n_i") + ("c" if certain else "u")] += 1
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = np.array([tp[c] / union[c] if union[c] else math.nan for c in range(num_classes)])
    n = sum(counts.values())
    return {
        "confusion": confusion, "iou": iou,
        "miou": float(np.nanmean(iou)) if not np.isnan(iou).all() else math.nan,
        "pixel_accuracy": float(tp.sum() / confusion.sum()),
        "mean_entropy": entropy_sum / entropy_pixels,
        "pavpu_counts": counts,
        "pavpu": (counts["n_ac"] + counts["n_iu"]) / n if n else math.nan,
        "p_accurate_given_certain": counts["n_ac"] / max(counts["n_ac"] + counts["n_ic"], 1),
        "p_uncertain_given_inaccurate": counts["n_iu"] / max(counts["n_ic"] + counts["n_iu"], 1),
    }


def ambiguous_pixels(probs: list[np.ndarray]) -> int:
    """Pixels whose two most likely classes are within 1e-5: float rounding (e.g. batch size) may
    flip their argmax, so comparisons allow them either way (there are none on most machines)."""
    total = 0
    for p in probs:
        top = np.sort(p, axis=0)[-2:]
        total += int((top[1] - top[0] < 1e-5).sum())
    return total


def assert_same_metrics(result: dict, ref: dict, ambiguous: int = 0, window: int = 4,
                        stride: int | None = None) -> None:
    """Equal (exactly, up to float formatting) when no pixel is ambiguous; otherwise within what
    ``ambiguous`` flipped pixels can change."""
    iou = np.array(result["iou"], dtype=np.float64)
    confusion = ref["confusion"]
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    # a flipped pixel changes a class's TP + FP + FN by at most 1 and its TP by at most 1
    slack = np.where(union > ambiguous, 2.0 * ambiguous / np.maximum(union - ambiguous, 1), 1.0)
    np.testing.assert_array_equal(np.isnan(iou), np.isnan(ref["iou"]))
    present = ~np.isnan(iou)
    assert np.all(np.abs(iou[present] - ref["iou"][present]) <= slack[present] + 1e-12 * ref["iou"][present])
    assert result["miou"] == pytest.approx(ref["miou"], rel=1e-12, abs=float(slack[present].mean()) if ambiguous else 0)
    assert result["pixel_accuracy"] == pytest.approx(ref["pixel_accuracy"], rel=1e-12,
                                                     abs=ambiguous / confusion.sum())
    assert result["mean_entropy"] == pytest.approx(ref["mean_entropy"], rel=1e-5)
    if result.get("pavpu_threshold") is not None:
        per_pixel = math.ceil(window / (stride or window)) ** 2  # patches a pixel belongs to
        diff = sum(abs(result["pavpu_counts"][k] - ref["pavpu_counts"][k]) for k in ref["pavpu_counts"])
        assert diff <= 2 * ambiguous * per_pixel, (result["pavpu_counts"], ref["pavpu_counts"])
        n = sum(ref["pavpu_counts"].values())
        for key in ("pavpu", "p_accurate_given_certain", "p_uncertain_given_inaccurate"):
            assert result[key] == pytest.approx(ref[key], rel=1e-12, abs=2 * ambiguous * per_pixel / n * 4), key


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(make_synthetic):
    root = make_synthetic("eval-oracle", num_train=4, num_val=3, height=NATIVE[0], width=NATIVE[1], seed=2)
    assert any((read_label(root, "val", i) == IGNORE).any() for i in ids_of(root, "val"))
    return root


@pytest.fixture(scope="module")
def ensemble(data, tmp_path_factory, cli):
    out = tmp_path_factory.mktemp("eval-oracle") / "baseline"
    cli("train-baseline", "--data", data, "--out", out, "--encoder", MEMBERS[0], "--encoder", MEMBERS[0],
        "--size", f"{SIZE[0]}x{SIZE[1]}", "--epochs", "2", "--batch-size", "4", "--lr", "5e-2",
        "--backbone-lr-factor", "1", "--no-augment", "--device", "cpu")
    return out


@pytest.fixture(scope="module")
def members(ensemble):
    loaded = [load_member(ensemble / name, "cpu") for name in MEMBERS]
    for model, manifest in loaded:
        assert not model.training and manifest["image_size"] == list(SIZE)
    return [m for m, _ in loaded], loaded[0][1]


def val_split(data, manifest, resolution="native"):
    """Model inputs and targets of the val split: native size, or resized to the training size."""
    inputs, targets = [], []
    for image_id in ids_of(data, "val"):
        rgb, label = read_rgb(data, "val", image_id), read_label(data, "val", image_id)
        assert rgb.shape[:2] == label.shape == NATIVE
        if resolution == "train":
            rgb = cv2.resize(rgb, (SIZE[1], SIZE[0]), interpolation=cv2.INTER_LINEAR)
            label = nearest_resize(label, SIZE)
        inputs.append(to_input(rgb, manifest))
        targets.append(label)
    return inputs, targets


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_evaluate_native_resolution_member_and_ensemble(data, ensemble, members):
    models, manifest = members
    inputs, targets = val_split(data, manifest)
    single = [probs_resize(models[:1], x)[0] for x in inputs]
    both = [probs_resize(models, x)[0] for x in inputs]
    assert max(np.abs(a - b).max() for a, b in zip(single, both)) > 1e-2  # the second member matters
    for path, probs in ((ensemble / MEMBERS[0], single), (ensemble / "ensemble.json", both)):
        preds = [p.argmax(0) for p in probs]
        ents = [entropy_np(p[None])[0] for p in probs]
        threshold = threshold_between(ents, 4, 4)
        ref = reference_metrics(preds, targets, ents, NUM_CLASSES, IGNORE, 4, None, threshold)
        assert ref["confusion"].sum() == sum(int((t != IGNORE).sum()) for t in targets)  # native pixels
        assert all(ref["pavpu_counts"].values()) and (ref["iou"] > 0).sum() >= 2  # not a trivial model
        (result,) = evaluate([path], data, "val", pavpu_threshold=threshold, device="cpu")
        assert result["resolution"] == "native" and result["image_size"] == list(SIZE)
        assert result["pavpu_threshold"] == threshold
        assert_same_metrics(result, ref, ambiguous_pixels(probs))


@pytest.mark.slow
def test_evaluate_slide_inference(data, ensemble, members):
    models, manifest = members
    inputs, targets = val_split(data, manifest)
    probs = [probs_slide(models, x)[0] for x in inputs]
    resized = [probs_resize(models, x)[0] for x in inputs]
    assert max(np.abs(a - b).max() for a, b in zip(probs, resized)) > 1e-2  # the two modes differ
    preds, ents = [p.argmax(0) for p in probs], [entropy_np(p[None])[0] for p in probs]
    threshold = threshold_between(ents, 3, 2)
    ref = reference_metrics(preds, targets, ents, NUM_CLASSES, IGNORE, 3, 2, threshold)
    (result,) = evaluate([ensemble / "ensemble.json"], data, "val", pavpu_threshold=threshold, pavpu_window=3,
                         pavpu_stride=2, inference="slide", device="cpu")
    assert result["inference"] == "slide"
    assert_same_metrics(result, ref, ambiguous_pixels(probs), 3, 2)


@pytest.mark.slow
def test_evaluate_train_resolution(data, ensemble, members):
    models, manifest = members
    inputs, targets = val_split(data, manifest, resolution="train")
    probs = [softmax_mean(run_members(models, x))[0] for x in inputs]
    preds, ents = [p.argmax(0) for p in probs], [entropy_np(p[None])[0] for p in probs]
    threshold = threshold_between(ents, 5, 5)
    ref = reference_metrics(preds, targets, ents, NUM_CLASSES, IGNORE, 5, None, threshold)
    assert ref["confusion"].sum() == sum(int((t != IGNORE).sum()) for t in targets)
    (result,) = evaluate([ensemble / "ensemble.json"], data, "val", pavpu_threshold=threshold, pavpu_window=5,
                         resolution="train", device="cpu")
    assert result["resolution"] == "train"
    assert_same_metrics(result, ref, ambiguous_pixels(probs), 5)


@pytest.mark.slow
def test_evaluate_default_threshold_is_training_mean_entropy(data, ensemble, members):
    models, manifest = members
    total, pixels = 0.0, 0
    for image_id in ids_of(data, "train"):
        rgb = cv2.resize(read_rgb(data, "train", image_id), (SIZE[1], SIZE[0]), interpolation=cv2.INTER_LINEAR)
        entropy = entropy_np(softmax_mean(run_members(models, to_input(rgb, manifest))))
        total, pixels = total + entropy.sum(), pixels + entropy.size
    (result,) = evaluate([ensemble / "ensemble.json"], data, "val", device="cpu")
    assert result["pavpu_threshold"] == pytest.approx(total / pixels, rel=1e-5)


@pytest.mark.slow
def test_cached_evaluate_recomputes_when_options_or_data_change(data, ensemble, tmp_path, capsys):
    """``cached_evaluate`` reuses a results file only for the same weights, data and options: another
    PAvPU window, or an edited label file, evaluates again (a stale hit would report the results of
    other options, or of the data before the edit)."""
    root = tmp_path / "data"
    shutil.copytree(data, root)  # the module's data stays as it is
    model, results_file = [ensemble / MEMBERS[0]], tmp_path / "evaluation.json"
    threshold = 0.5  # given, so that the shared ensemble's manifest gets no cached threshold

    def cached(window: int) -> tuple[dict, bool]:
        capsys.readouterr()
        (result,) = evaluate_stage.cached_evaluate([Model.resolve(m) for m in model], DataConfig(root), EvalConfig(
            "val", pavpu_threshold=threshold, pavpu_window=window), results_file, "cpu")
        return result, "cache hit" in capsys.readouterr().err

    def same(a: dict, b: dict) -> bool:  # NaN (a class absent from the split) equals NaN here
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)

    first, hit = cached(4)
    assert not hit
    again, hit = cached(4)
    assert hit and same(again, first)  # the cache does serve the same evaluation

    wider, hit = cached(8)
    assert not hit, "another --pavpu-window was answered from the cache"
    (fresh,) = evaluate(model, root, "val", pavpu_threshold=threshold, pavpu_window=8)
    assert same(wider, fresh) and wider["pavpu"] != first["pavpu"]

    image_id = ids_of(root, "val")[0]
    label = read_label(root, "val", image_id)
    top = label[: label.shape[0] // 2]
    top[top != IGNORE] = (top[top != IGNORE] + 1) % NUM_CLASSES  # every labelled pixel of the top half changes
    Image.fromarray(label).save(root / "labels" / "val" / f"{image_id}.png")
    edited, hit = cached(8)
    assert not hit, "an edited label file was answered from the cache"
    (fresh,) = evaluate(model, root, "val", pavpu_threshold=threshold, pavpu_window=8)
    assert same(edited, fresh) and edited["miou"] != wider["miou"]


@pytest.mark.slow
def test_make_masks_instances_from_label(data, ensemble, members, tmp_path, cli):
    models, manifest = members
    path = tmp_path / "label.zarr"
    cli("make-masks", "--ensemble", ensemble / "ensemble.json", "--data", data, "--store", path,
        "--instances-from", "label", "--connectivity", "4", "--device", "cpu")
    store = MaskStore.open(path)
    assert store.identity["options"]["instances_from"] == "label"
    assert store.identity["options"]["connectivity"] == 4
    assert store.identity["options"]["image_size"] == list(SIZE)
    ids = ids_of(data, "train")
    assert store.image_ids == ids and store.completed().all()
    differs_8, differs_prediction, means = 0.0, 0.0, []
    for image_id in ids:
        stored = store.read(store.index_of(image_id))
        rgb = cv2.resize(read_rgb(data, "train", image_id), (SIZE[1], SIZE[0]), interpolation=cv2.INTER_LINEAR)
        probs = softmax_mean(run_members(models, to_input(rgb, manifest)))
        entropy = entropy_np(probs)[0]
        mismatch = stored["prediction"] != probs[0].argmax(0)
        assert mismatch.sum() <= ambiguous_pixels(list(probs))
        half_ulp = lambda x: np.spacing(np.abs(x).astype(np.float16)).astype(np.float64) / 2 + 1e-6  # noqa: E731
        assert np.all(np.abs(stored["entropy"] - entropy) <= half_ulp(entropy))  # float16 store
        means.append(entropy.mean())

        label = nearest_resize(read_label(data, "train", image_id), SIZE)
        assert (label == IGNORE).any()
        # IU: the mean entropy over each 4-connected component of one class of the label; 0 on void.
        expected = instance_means(label, entropy, 4, IGNORE)
        assert np.all(np.abs(stored["instance_uncertainty"] - expected) <= half_ulp(expected))
        assert np.all(stored["instance_uncertainty"][label == IGNORE] == 0)
        # the same from the stored (float16) entropy, as a user of the store would check it
        np.testing.assert_allclose(stored["instance_uncertainty"],
                                   instance_means(label, stored["entropy"], 4, IGNORE), rtol=0, atol=2e-3)
        # What other choices would give, so that the comparison above tells them apart.
        differs_8 = max(differs_8, np.abs(instance_means(label, entropy, 8, IGNORE) - expected).max())
        from_prediction = instance_means(stored["prediction"], entropy, 4, IGNORE)
        differs_prediction = max(differs_prediction, np.abs(from_prediction - expected).max())
    assert differs_prediction > 0.05
    assert differs_8 > 0.01
    assert store.attrs["mean_entropy"] == pytest.approx(float(np.mean(means)), rel=1e-3)


# --------------------------------------------------------------------------------------------
# generated-data twins of the metric reference tests (and their CamVid versions)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["generated", "camvid"])
def metric_data(request, make_synthetic):
    """Targets (one class removed, a void block punched in), predictions perturbed from them and
    entropies quantised to multiples of 1/64 (exact patch means), at 61x83 (not a multiple of any
    window): from synthetic scenes (ignore 255) or downsampled CamVid labels (ignore 11)."""
    h, w = 61, 83
    if request.param == "generated":
        root = make_synthetic("metric-ref", num_train=4, num_val=1, height=h, width=w, seed=5)
        labels = [read_label(root, "train", i) for i in ids_of(root, "train")]
        num_classes, ignore = NUM_CLASSES, IGNORE
    else:
        labels = [downsample(label, h, w) for label in camvid_labels(4)]
        num_classes, ignore = 11, 11
    rng = np.random.default_rng(0)
    removed = num_classes - 1
    targets, preds, ents = [], [], []
    for label in labels:
        target = label.astype(np.int64)
        target[target == removed] = ignore
        target[h // 3:h // 3 + 9, w // 2:w // 2 + 13] = ignore
        pred = np.roll(label.astype(np.int64), (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
        for _ in range(8):
            y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
            pred[y:y + int(rng.integers(2, 9)), x:x + int(rng.integers(2, 9))] = rng.integers(0, num_classes)
        noise = rng.random(pred.shape) < 0.02
        pred[noise] = rng.integers(0, num_classes, int(noise.sum()))
        pred[(pred == ignore) | (pred >= num_classes)] = 0
        pred[pred == removed] = removed - 1
        targets.append(target)
        preds.append(pred)
        ents.append((rng.integers(0, 150, target.shape) / 64.0).astype(np.float32))
    return targets, preds, ents, num_classes, ignore


@pytest.mark.parametrize("window,stride", [(4, None), (4, 1), (3, 2), (5, None)])
def test_metrics_match_reference(metric_data, window, stride):
    targets, preds, ents, num_classes, ignore = metric_data
    quantum = 1.0 / (64 * window * window)  # patch means are multiples of this
    mean = float(np.mean([e.mean() for e in ents]))
    threshold = (math.floor(mean / quantum) + 0.5) * quantum
    ref = reference_metrics(preds, targets, ents, num_classes, ignore, window, stride, threshold)
    assert np.isnan(ref["iou"][num_classes - 1]) and (~np.isnan(ref["iou"])).sum() >= 4
    assert all(ref["pavpu_counts"].values())
    streamed = iumask.SegmentationMetrics(num_classes, ignore_index=ignore, pavpu_window=window,
                                          pavpu_threshold=threshold, pavpu_stride=stride)
    for p, t, e in zip(preds, targets, ents):
        streamed.update(p, t, e)
    result = streamed.compute()
    np.testing.assert_array_equal(streamed.confusion.numpy(), ref["confusion"])
    assert_same_metrics(result, ref)
    # one (B, H, W) batch of tensors gives the same
    batched = iumask.SegmentationMetrics(num_classes, ignore_index=ignore, pavpu_window=window,
                                         pavpu_threshold=threshold, pavpu_stride=stride)
    batched.update(torch.from_numpy(np.stack(preds)), torch.from_numpy(np.stack(targets)),
                   torch.from_numpy(np.stack(ents)))
    assert batched.compute()["pavpu_counts"] == ref["pavpu_counts"]
    assert torch.equal(batched.confusion, streamed.confusion)


def test_metrics_patch_accuracy_counts_valid_pixels_only(metric_data):
    """Patches three quarters void: accuracy is over their valid pixels (an implementation dividing
    by all pixels, or counting void as wrong, finds them inaccurate)."""
    targets, preds, ents, num_classes, ignore = metric_data
    t, p = targets[0].copy(), preds[0].copy()
    keep = np.arange(t.shape[1]) % 4 == 3
    t[:, ~keep] = ignore  # every 4x4 patch has at most 4 valid pixels
    p[:, keep] = t[:, keep]  # and is right on all of them
    m = iumask.SegmentationMetrics(num_classes, ignore_index=ignore, pavpu_window=4, pavpu_threshold=1.0)
    m.update(p, t, ents[0])
    ref = reference_metrics([p], [t], [ents[0]], num_classes, ignore, 4, None, 1.0)
    assert ref["pavpu_counts"]["n_ic"] == ref["pavpu_counts"]["n_iu"] == 0
    assert m.compute()["pavpu_counts"] == ref["pavpu_counts"]


# --------------------------------------------------------------------------------------------
# temperature scaling and the per-image counts
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_evaluate_temperature_scaled_calibration_is_of_the_scaled_probabilities(data, ensemble, members):
    """``--temperature-scale``: ECE, NLL and Brier after T are those of softmax(log p̄ / T), scaled
    here in float64 and scored by torchmetrics (ECE) and numpy; they differ from the unscaled ones."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    models, manifest = members
    inputs, targets = val_split(data, manifest)
    (result,) = evaluate([ensemble / "ensemble.json"], data, "val", pavpu_threshold=0.5, temperature_split="val")
    t = result["temperature"]
    assert not math.isclose(t, 1.0, rel_tol=1e-2)
    p = np.concatenate([probs_resize(models, x)[0].reshape(NUM_CLASSES, -1) for x in inputs], axis=1).T
    y = np.concatenate([target.ravel() for target in targets]).astype(np.int64)
    valid = y != IGNORE
    p, y = p[valid], y[valid]
    assert result["temperature_pixels"] == result["temperature_split_pixels"] == y.size  # < 2 M: all of them
    logp = np.log(np.maximum(p, 1e-12)) / t
    q = np.exp(logp - logp.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    rows = np.arange(y.size)
    for probs, suffix in ((p, ""), (q, "_scaled")):
        nll = -np.log(np.maximum(probs[rows, y], 1e-12)).mean()
        onehot = np.eye(NUM_CLASSES)[y]
        brier = ((probs - onehot) ** 2).sum(1).mean()
        ece = float(multiclass_calibration_error(torch.from_numpy(probs).float(), torch.from_numpy(y), NUM_CLASSES,
                                                 n_bins=15, norm="l1"))
        assert result[f"nll{suffix}"] == pytest.approx(nll, rel=1e-4), suffix
        assert result[f"brier{suffix}"] == pytest.approx(brier, rel=1e-4), suffix
        assert result[f"ece{suffix}"] == pytest.approx(ece, rel=1e-3, abs=1e-5), suffix
    for key in ("ece", "nll", "brier"):  # a temperature ≠ 1 changes every one of them
        assert abs(result[f"{key}_scaled"] - result[key]) > 1e-4, key


@pytest.mark.slow
def test_evaluate_writes_per_image_counts_beside_the_results(data, ensemble, members, tmp_path, capsys):
    """The images file: per image (in the split's order) intersection, union and labelled pixels per
    class, equal to counts made here from the members' own predictions, summing to the results'
    IoU exactly; one set per entry in results order after a merge; and a results file whose images
    file is missing, replaced, or that an earlier version wrote is evaluated again."""
    models, manifest = members
    inputs, targets = val_split(data, manifest)
    preds = [probs_resize(models, x)[0].argmax(0) for x in inputs]
    ambiguous = ambiguous_pixels([probs_resize(models, x)[0] for x in inputs])
    results_file = tmp_path / "evaluation.json"
    options = EvalConfig("val", pavpu_threshold=0.5)

    def cached() -> tuple[dict, bool]:
        capsys.readouterr()
        (result,) = evaluate_stage.cached_evaluate([Model.resolve(ensemble / "ensemble.json")], DataConfig(data),
                                                   options, results_file, "cpu")
        return result, "cache hit" in capsys.readouterr().err

    result, hit = cached()
    assert not hit and json.loads(json.dumps(result)) == json.loads(results_file.read_text())["results"][0]
    (counts,) = evaluate_stage.read_image_counts(results_file)
    assert counts["images"].tolist() == ids_of(data, "val")
    assert counts["intersection"].shape == counts["union"].shape == (3, NUM_CLASSES)
    assert counts["intersection"].dtype == counts["union"].dtype == np.int64
    if ambiguous == 0:
        for i, (pred, target) in enumerate(zip(preds, targets)):
            valid = target != IGNORE
            for c in range(NUM_CLASSES):
                t, p = (target == c) & valid, (pred == c) & valid
                assert counts["intersection"][i, c] == (t & p).sum() and counts["union"][i, c] == (t | p).sum()
                assert counts["label_pixels"][i, c] == t.sum()
    union = counts["union"].sum(0)
    iou = [None if u == 0 else i / u for i, u in zip(counts["intersection"].sum(0).tolist(), union.tolist())]
    assert iou == result["iou"]  # exactly

    assert cached()[1]  # a cache hit with its images file
    images = evaluate_stage.images_path(results_file)
    images.unlink()
    assert not cached()[1] and images.is_file()  # missing: evaluated again, and the file is back
    images.write_bytes(images.read_bytes() + b"\0")
    assert evaluate_stage.read_image_counts(results_file) is None and not cached()[1]  # not the JSON's file
    old = json.loads(results_file.read_text())  # as the previous version wrote it
    del old["images"], old["identity"]["metrics_version"]
    results_file.write_text(json.dumps(old))
    images.unlink()
    assert evaluate_stage.read_image_counts(results_file) is None and not cached()[1]

    # a merge keeps one set of counts per entry, in the results' order
    member = evaluate([ensemble / MEMBERS[0]], data, "val", pavpu_threshold=0.5)
    merged, kept, replaced = evaluate_stage.merge_results(results_file, member)
    assert (kept, replaced) == (1, 0)
    evaluate_stage.write_results(merged, results_file)
    stored = json.loads(results_file.read_text())["results"]
    both = evaluate_stage.read_image_counts(results_file)
    assert [r["model"] for r in stored] == [result["model"], member[0]["model"]]
    assert np.array_equal(both[0]["union"], counts["union"])
    assert np.array_equal(both[1]["union"], member[0].image_counts["union"])
    assert not np.array_equal(both[0]["intersection"], both[1]["intersection"])  # two models, two sets
