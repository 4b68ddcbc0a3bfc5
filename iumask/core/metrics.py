"""Segmentation and uncertainty metrics (docs/method.md §8): IoU from one confusion matrix over the
split, PAvPU (Mukhoti & Gal 2018) from pooled patch counts, and, given class probabilities, the
calibration metrics ECE (from per-bin sums), Brier score and NLL (from running sums); and the
metrics that see small and rare objects and selective prediction (docs/method.md §8): mean class
accuracy, per-image mIoU and its worst 10 %, instance recall per class and size, and AURC, AUGRC and
risk at 80 % coverage from a fine confidence histogram. Streaming: memory does not grow with the
number of pixels (per image, three counts per class: intersection, union and labelled pixels)."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F

from iumask.core.instances import label_instances

# Instance sizes by absolute area in pixels at the scoring resolution, as COCO's: small < 32²,
# medium < 96², large from 96².
INSTANCE_SIZES = ("small", "medium", "large")
SMALL_INSTANCE_AREA = 32 * 32
LARGE_INSTANCE_AREA = 96 * 96
# Selective risk: pixels binned by confidence on u = log(1 − confidence) / log(1e-7) ∈ [0, 1]
# (fine near confidence 1, where a trained model puts most pixels; confidence exactly 1 and
# above 1 − 1e-7 share the last bin).
RISK_BINS = 1 << 16
_RISK_FLOOR = math.log(1e-7)
COVERAGE = 0.8
WORST_FRACTION = 0.1


def instance_recall_counts(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255,
                           connectivity: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth instances of one image (connected components of each class of ``target``, as
    the method's instances) that are found, i.e. at least half of their pixels predicted as their
    class: ``(found, total)``, each ``(C, 3)`` counts by class and size (small, medium, large: area in
    pixels below SMALL_INSTANCE_AREA, below LARGE_INSTANCE_AREA, or from it)."""
    found = np.zeros((num_classes, len(INSTANCE_SIZES)), np.int64)
    total = np.zeros_like(found)
    instances, instance_class = label_instances(target, num_classes, connectivity, ignore_index)
    count = len(instance_class) - 1
    if count == 0:
        return found, total
    flat = instances.ravel()
    area = np.bincount(flat, minlength=count + 1)[1:]
    hits = np.bincount(flat[(pred == target).ravel()], minlength=count + 1)[1:]
    size = np.digitize(area, [SMALL_INSTANCE_AREA, LARGE_INSTANCE_AREA])
    classes = instance_class[1:]
    np.add.at(total, (classes, size), 1)
    np.add.at(found, (classes, size), (2 * hits >= area).astype(np.int64))
    return found, total


IMAGE_COUNTS = ("intersection", "union", "label_pixels")


def image_class_counts(pred: np.ndarray, target: np.ndarray, num_classes: int,
                       ignore_index: int = 255) -> np.ndarray:
    """One image's ``(3, C)`` int64 counts over its valid pixels (IMAGE_COUNTS): per class the
    intersection (TP), the union (TP + FP + FN) and the labelled pixels (TP + FN). Summed over
    images they give the dataset-level IoU of :func:`iou_from_confusion`."""
    valid = target != ignore_index
    cm = np.bincount(target[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64),
                     minlength=num_classes ** 2).reshape(num_classes, num_classes)
    tp = np.diag(cm)
    labelled = cm.sum(1)
    return np.stack([tp, labelled + cm.sum(0) - tp, labelled]).astype(np.int64)


def image_miou(intersection, union, label_pixels, classes: str = "label") -> np.ndarray:
    """Per-image mIoU from ``(images, C)`` counts (:func:`image_class_counts`): the mean IoU over the
    classes present in the image's label (``classes="label"``, Wang et al.'s fine-grained mIoU) or
    in its label or its prediction (``"label_or_prediction"``); NaN for an image without valid pixels."""
    if classes not in ("label", "label_or_prediction"):
        raise ValueError(f"classes must be 'label' or 'label_or_prediction', got {classes!r}")
    intersection, union, label_pixels = (np.atleast_2d(np.asarray(a, np.float64))
                                         for a in (intersection, union, label_pixels))
    present = (label_pixels if classes == "label" else union) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(present, intersection / np.maximum(union, 1), 0.0)
        return np.where(label_pixels.sum(1) > 0, iou.sum(1) / present.sum(1), math.nan)


def per_image_miou(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255,
                   classes: str = "label") -> float:
    """One image's mIoU (:func:`image_miou`: by default over the classes present in its label,
    valid pixels only); NaN for an image without valid pixels."""
    return float(image_miou(*image_class_counts(pred, target, num_classes, ignore_index)[:, None], classes)[0])


def worst_mean(values, fraction: float = WORST_FRACTION) -> float:
    """Mean of the lowest ``k = max(1, floor(fraction · n))`` of the n non-NaN values (Wang et al.'s
    worst-k images; NaN without values)."""
    values = sorted(float(v) for v in values if not math.isnan(v))
    if not values:
        return math.nan
    return float(np.mean(values[:max(1, math.floor(fraction * len(values)))]))


def risk_bin(confidence: torch.Tensor, bins: int = RISK_BINS) -> torch.Tensor:
    """The selective-risk histogram bin of each confidence (0 = least confident)."""
    u = torch.log1p(-confidence.double().clamp(0, 1)).clamp_min(_RISK_FLOOR) / _RISK_FLOOR
    return (u * bins).long().clamp_(0, bins - 1)


def selective_risk(counts, errors, coverage: float = COVERAGE) -> dict:
    """AURC, AUGRC and the risk at ``coverage`` (torch-uncertainty's definitions: pixels sorted by
    confidence, most confident first; risk(k) = errors among the first k / k, generalized risk =
    errors among the first k / n; the areas over coverage k/n; the risk at coverage c is risk(k)
    of the most confident k = ceil(c · n) pixels) from a confidence histogram: ``counts`` and
    ``errors`` per bin, bins in increasing confidence.

    The order of pixels inside a bin is unknown, so the errors are taken as spread evenly through
    it (the expected value for a random order of the bin's pixels). ``*_bound`` are upper bounds on
    the difference to the exact value of any order (errors first or last in every bin), plus 2/n
    for the difference between the sum over pixels and the integral; since the exact value lies in
    the metric's range (AURC and risk in [0, 1], AUGRC in [0, 1/2]), a bound is at most the
    largest distance from the estimate to an end of that range."""
    n_b = np.asarray(counts, np.float64)[::-1]  # most confident first
    e_b = np.asarray(errors, np.float64)[::-1]
    keep = n_b > 0
    n_b, e_b = n_b[keep], e_b[keep]
    n = n_b.sum()
    nan = math.nan
    if n < 2:
        return {"aurc": nan, "augrc": nan, "risk_at_80_coverage": nan, "aurc_bound": nan, "augrc_bound": nan,
                "risk_at_80_coverage_bound": nan}
    k1 = np.cumsum(n_b)
    k0 = k1 - n_b
    e1 = np.cumsum(e_b)
    e0 = e1 - e_b
    slope = e_b / n_b
    spread = e_b * (n_b - e_b) / 2  # area between the even spread and either extreme order in a bin
    # ∫ E(k)/k dk over each bin, E linear from e0 at k0 to e1 at k1 (the first bin: E/k = slope)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.where(k0 > 0, np.log(k1 / np.maximum(k0, 1)), 0.0)
        area = np.where(k0 > 0, slope * n_b + (e0 - slope * k0) * log_ratio, slope * n_b)
        # in the first bin E(k)/k of any order is within [0, 1] of the even spread's (none if all agree)
        first = np.where((e_b > 0) & (e_b < n_b), n_b, 0.0)
        aurc_bound = np.where(k0 > 0, spread / np.maximum(k0, 1), first).sum() / n + 2 / n
    aurc = area.sum() / n
    augrc = ((e0 + e1) / 2 * n_b).sum() / n ** 2
    augrc_bound = spread.sum() / n ** 2 + 2 / n
    k = math.ceil(coverage * n)
    b = int(np.searchsorted(k1, k))
    risk = (e0[b] + slope[b] * (k - k0[b])) / k
    risk_bound = e_b[b] * (n_b[b] - e_b[b]) / n_b[b] / k + 1 / k
    clamp = lambda bound, value, top: float(min(bound, max(value, top - value)))  # noqa: E731
    return {"aurc": float(aurc), "augrc": float(augrc), "risk_at_80_coverage": float(risk),
            "aurc_bound": clamp(aurc_bound, aurc, 1.0), "augrc_bound": clamp(augrc_bound, augrc, 0.5),
            "risk_at_80_coverage_bound": clamp(risk_bound, risk, 1.0)}


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


# ----------------------------------------------------------------------------- pure functions


def iou_from_confusion(confusion: torch.Tensor) -> dict:
    """Per-class IoU (NaN for a class absent from both target and prediction), mIoU over the others,
    pixel accuracy, per-class accuracy (recall; NaN for a class without labelled pixels) and their
    mean (mAcc), from a ``(C, C)`` confusion matrix (rows: target, columns: prediction)."""
    cm = confusion.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.tensor(math.nan, dtype=torch.float64))
    present = ~torch.isnan(iou)
    total = cm.sum()
    labelled = cm.sum(1)
    accuracy = torch.where(labelled > 0, tp / labelled.clamp_min(1), math.nan)
    return {
        "iou": iou.tolist(),
        "miou": float(iou[present].mean()) if present.any() else math.nan,
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else math.nan,
        "class_accuracy": accuracy.tolist(),
        "mean_accuracy": float(accuracy[labelled > 0].mean()) if (labelled > 0).any() else math.nan,
    }


def pavpu_patch_counts(correct: torch.Tensor, valid: torch.Tensor, entropy: torch.Tensor, threshold: float,
                       window: int = 4, stride: int | None = None, accuracy_threshold: float = 0.5) -> torch.Tensor:
    """PAvPU's patch counts ``[n_ac, n_au, n_ic, n_iu]`` of a batch ``(B, H, W)`` (docs/method.md §8):
    ``window``² patches at ``stride`` (default ``window``) that fit inside the image; a patch is
    accurate when correct / valid pixels ≥ ``accuracy_threshold`` (patches without valid pixels are
    skipped) and certain when its mean entropy (over all its pixels) is below ``threshold``."""
    stride = stride or window
    if min(correct.shape[-2:]) < window:  # every patch would overhang an edge: none is scored
        return torch.zeros(4, dtype=torch.int64)
    pool = lambda x: F.avg_pool2d(x[:, None].float(), window, stride=stride)[:, 0]  # noqa: E731
    valid_frac = pool(valid)
    has_valid = valid_frac > 0
    accurate = pool(correct & valid) / valid_frac.clamp_min(1e-12) >= accuracy_threshold
    certain = pool(entropy) < threshold
    return torch.stack([(accurate & certain & has_valid).sum(), (accurate & ~certain & has_valid).sum(),
                        (~accurate & certain & has_valid).sum(), (~accurate & ~certain & has_valid).sum()])


def pavpu_from_counts(counts) -> dict:
    """PAvPU = (n_ac + n_iu) / patches, p(accurate | certain) and p(uncertain | inaccurate) from
    ``[n_ac, n_au, n_ic, n_iu]`` (NaN where a denominator is 0)."""
    n_ac, n_au, n_ic, n_iu = (int(v) for v in counts)
    patches = n_ac + n_au + n_ic + n_iu
    return {"pavpu": (n_ac + n_iu) / patches if patches else math.nan,
            "p_accurate_given_certain": n_ac / (n_ac + n_ic) if n_ac + n_ic else math.nan,
            "p_uncertain_given_inaccurate": n_iu / (n_ic + n_iu) if n_ic + n_iu else math.nan,
            "pavpu_counts": {"n_ac": n_ac, "n_au": n_au, "n_ic": n_ic, "n_iu": n_iu}}


def top_label(probs: torch.Tensor, target: torch.Tensor, valid: torch.Tensor):
    """The valid pixels of a ``(B, C, H, W)`` batch as ``(p, t, confidence, correct)``: their class
    probabilities ``(N, C)`` (float32 or float64, a copy), targets, largest probability, and
    whether that class is the target (float64); on ``probs``' device."""
    device = probs.device
    valid = valid.to(device)
    p = probs.movedim(1, -1)[valid]
    if p.dtype != torch.float64:
        p = p.float()
    t = target.to(device)[valid]
    confidence, top = p.max(dim=1) if p.shape[0] else (p.new_zeros(0), t)
    return p, t, confidence, (top == t).double()


# ----------------------------------------------------------------------------- accumulators


class Accumulator:
    """Streamed state the torchmetrics way: each state is declared with :meth:`add_state` and how it
    reduces (``"sum"``: tensors added; ``"cat"``: lists concatenated), so :meth:`merge` (another
    accumulator of other data) and :meth:`sync` (every process's, e.g. under torchrun) give the
    state of all the data, and :meth:`compute` the metrics of it."""

    def __init__(self):
        self._reductions: dict[str, str] = {}
        self._defaults: dict = {}

    def add_state(self, name: str, default, reduce: str) -> None:
        if reduce not in ("sum", "cat"):
            raise ValueError(f"reduce must be 'sum' or 'cat', got {reduce!r}")
        self._reductions[name], self._defaults[name] = reduce, default
        self._reset_state(name)

    def _reset_state(self, name: str) -> None:
        default = self._defaults[name]
        setattr(self, name, default.clone() if self._reductions[name] == "sum" else list(default))

    def reset(self) -> None:
        for name in self._reductions:
            self._reset_state(name)

    def merge(self, other: "Accumulator") -> None:
        """Add ``other``'s state (an accumulator of the same kind over other data) to this one."""
        for name, reduce in self._reductions.items():
            if reduce == "sum":
                getattr(self, name).add_(getattr(other, name))
            else:
                getattr(self, name).extend(getattr(other, name))

    def sync(self, all_reduce_sum, all_gather_object) -> None:
        """Reduce the state over processes with the given collectives (``all_reduce_sum(tensor)``
        in place; ``all_gather_object(value) -> [value of rank 0, ...]``), e.g. those of
        :mod:`iumask.distributed`. Afterwards every process holds the state of all the data."""
        for name, reduce in self._reductions.items():
            if reduce == "sum":
                all_reduce_sum(getattr(self, name))
            else:
                setattr(self, name, [v for part in all_gather_object(getattr(self, name)) for v in part])

    def compute(self) -> dict:
        raise NotImplementedError


class ConfusionMatrix(Accumulator):
    """IoU, mIoU, pixel accuracy and mAcc (:func:`iou_from_confusion`) from one confusion matrix."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.add_state("confusion", torch.zeros(num_classes, num_classes, dtype=torch.int64), "sum")

    def update(self, pred, target) -> None:
        """Add ``pred`` and ``target`` class ids of the same shape (tensors or arrays); refuses
        values outside 0..C−1 (the target's ignore label aside)."""
        pred, target = _as_tensor(pred).long().cpu(), _as_tensor(target).long().cpu()
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} differs from target {tuple(target.shape)}")
        valid = target != self.ignore_index
        bad = valid & ((target < 0) | (target >= self.num_classes))
        if bad.any():
            raise ValueError(
                f"target values {target[bad].unique()[:5].tolist()} are outside 0..{self.num_classes - 1} "
                f"and are not the ignore label {self.ignore_index}"
            )
        bad = valid & ((pred < 0) | (pred >= self.num_classes))
        if bad.any():
            raise ValueError(f"pred values {pred[bad].unique()[:5].tolist()} are outside 0..{self.num_classes - 1}")
        index = target[valid] * self.num_classes + pred[valid]
        self.confusion += torch.bincount(index, minlength=self.num_classes ** 2).view(self.num_classes,
                                                                                        self.num_classes)

    def compute(self) -> dict:
        return iou_from_confusion(self.confusion)


class MeanEntropy(Accumulator):
    """Mean pixel entropy over all pixels (labelled or not)."""

    def __init__(self):
        super().__init__()
        self.add_state("entropy_sums", torch.zeros(2, dtype=torch.float64), "sum")  # Σ entropy, pixels

    def update(self, entropy: torch.Tensor) -> None:
        self.entropy_sums += torch.tensor([float(entropy.double().sum()), entropy.numel()], dtype=torch.float64)

    def compute(self) -> dict:
        total, pixels = (float(v) for v in self.entropy_sums)
        return {"mean_entropy": total / pixels if pixels else math.nan}


class PAvPU(Accumulator):
    """Patch accuracy vs patch uncertainty (Mukhoti & Gal 2018) from pooled patch counts
    (:func:`pavpu_patch_counts`, :func:`pavpu_from_counts`)."""

    def __init__(self, threshold: float, window: int = 4, stride: int | None = None,
                 accuracy_threshold: float = 0.5):
        super().__init__()
        self.threshold, self.window, self.stride = threshold, window, stride or window
        self.accuracy_threshold = accuracy_threshold
        self.add_state("patch_counts", torch.zeros(4, dtype=torch.int64), "sum")  # n_ac, n_au, n_ic, n_iu

    def update(self, pred: torch.Tensor, target: torch.Tensor, entropy: torch.Tensor, ignore_index: int) -> None:
        self.patch_counts += pavpu_patch_counts(pred == target, target != ignore_index, entropy, self.threshold,
                                                self.window, self.stride, self.accuracy_threshold)

    def compute(self) -> dict:
        return {**pavpu_from_counts(self.patch_counts), "pavpu_threshold": self.threshold}


class Calibration(Accumulator):
    """Top-label ECE (equal-width bins, as torchmetrics' ``MulticlassCalibrationError(norm="l1")``),
    Brier score and NLL of the valid pixels, from per-bin and running sums (see
    :class:`SegmentationMetrics`)."""

    def __init__(self, ece_bins: int = 15):
        super().__init__()
        if ece_bins < 1:
            raise ValueError(f"ece_bins must be at least 1, got {ece_bins}")
        self.ece_bins = ece_bins
        # float32 edges, as torchmetrics builds them for float32 confidences
        self.bin_edges = torch.linspace(0, 1, ece_bins + 1, dtype=torch.float32)
        # per confidence bin (ece_bins + 1, the last for confidence 1): pixels, Σ confidence, Σ correct
        for name in ("bin_counts", "bin_confidence", "bin_accuracy"):
            self.add_state(name, torch.zeros(ece_bins + 1, dtype=torch.float64), "sum")
        self.add_state("score_sums", torch.zeros(3, dtype=torch.float64), "sum")  # pixels, Σ Brier, Σ NLL

    def update_pixels(self, p: torch.Tensor, t: torch.Tensor, confidence: torch.Tensor, correct: torch.Tensor) -> None:
        """Add valid pixels given as :func:`top_label` returns them (``p`` is modified)."""
        if p.shape[0] == 0:
            return
        bins = torch.bucketize(confidence.float(), self.bin_edges.to(p.device), right=True) - 1
        n = self.ece_bins + 1
        self.bin_counts += torch.bincount(bins, minlength=n).double().cpu()
        self.bin_confidence += torch.bincount(bins, weights=confidence.double(), minlength=n).cpu()
        self.bin_accuracy += torch.bincount(bins, weights=correct, minlength=n).cpu()
        rows = torch.arange(p.shape[0], device=p.device)
        nll = -torch.log(p[rows, t].double().clamp_min(1e-12)).sum()
        p[rows, t] -= 1  # p - one_hot(target)
        brier = torch.sum(p * p, dtype=torch.float64)
        self.score_sums += torch.tensor([float(rows.numel()), float(brier), float(nll)], dtype=torch.float64)

    def compute(self) -> dict:
        scored, brier_sum, nll_sum = (float(v) for v in self.score_sums)
        ece = float((self.bin_accuracy - self.bin_confidence).abs().sum()) / scored if scored else math.nan
        counts = self.bin_counts
        mean = lambda sums: torch.where(counts > 0, sums / counts.clamp_min(1), math.nan).tolist()  # noqa: E731
        return {"ece": ece, "brier": brier_sum / scored if scored else math.nan,
                "nll": nll_sum / scored if scored else math.nan,
                # the reliability diagram's data: per confidence bin (the last holds confidence 1)
                # pixels, mean confidence and accuracy (NaN for an empty bin)
                "calibration_bins": {"edges": self.bin_edges.double().tolist(),
                                     "pixels": [int(c) for c in counts.tolist()],
                                     "confidence": mean(self.bin_confidence), "accuracy": mean(self.bin_accuracy)}}


class SelectiveRisk(Accumulator):
    """AURC, AUGRC and risk at 80 % coverage (:func:`selective_risk`) from a confidence histogram
    of the valid pixels (:func:`risk_bin`): pixels and errors per bin."""

    def __init__(self):
        super().__init__()
        self.add_state("risk_counts", torch.zeros(RISK_BINS, dtype=torch.float64), "sum")
        self.add_state("risk_errors", torch.zeros(RISK_BINS, dtype=torch.float64), "sum")

    def update_pixels(self, confidence: torch.Tensor, correct: torch.Tensor) -> None:
        risk = risk_bin(confidence)
        self.risk_counts += torch.bincount(risk, minlength=RISK_BINS).double().cpu()
        self.risk_errors += torch.bincount(risk, weights=1 - correct, minlength=RISK_BINS).cpu()

    def compute(self) -> dict:
        return selective_risk(self.risk_counts.numpy(), self.risk_errors.numpy())


class InstanceRecall(Accumulator):
    """Ground-truth instances found, per class and size (:func:`instance_recall_counts`)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, connectivity: int = 8):
        super().__init__()
        self.num_classes, self.ignore_index, self.connectivity = num_classes, ignore_index, connectivity
        self.add_state("instances_found", torch.zeros(num_classes, len(INSTANCE_SIZES), dtype=torch.int64), "sum")
        self.add_state("instances_total", torch.zeros(num_classes, len(INSTANCE_SIZES), dtype=torch.int64), "sum")

    def update_image(self, pred: np.ndarray, target: np.ndarray) -> None:
        found, total = instance_recall_counts(pred, target, self.num_classes, self.ignore_index, self.connectivity)
        self.instances_found += torch.from_numpy(found)
        self.instances_total += torch.from_numpy(total)

    def compute(self) -> dict:
        found, total = self.instances_found.double(), self.instances_total.double()
        ratio = lambda f, t: float(f / t) if t > 0 else math.nan  # noqa: E731
        return {
            "instance_recall": ratio(found.sum(), total.sum()),
            **{f"instance_recall_{size}": ratio(found[:, i].sum(), total[:, i].sum())
               for i, size in enumerate(INSTANCE_SIZES)},
            "instance_recall_per_class": [ratio(f, t) for f, t in zip(found.sum(1), total.sum(1))],
            "instance_counts": {"found": self.instances_found.tolist(), "total": self.instances_total.tolist(),
                                "sizes": list(INSTANCE_SIZES)},
        }


class PerImageIoU(Accumulator):
    """Per-image counts (:func:`image_class_counts`) of every image, kept in image order
    (:meth:`counts`), and from them the mean over images of each image's mIoU and the mean of the
    worst 10 % (:func:`image_miou`, :func:`worst_mean`): over the classes of the label (Wang et al.,
    ``per_image_miou``, ``worst_10pct_miou``) and over those of the label or the prediction
    (``*_label_or_prediction``)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.add_state("image_counts", [], "cat")  # (image id or None, (3, C) counts) per image

    def update_image(self, pred: np.ndarray, target: np.ndarray, image_id: int | None = None) -> None:
        self.image_counts.append((image_id, image_class_counts(pred, target, self.num_classes, self.ignore_index)))

    def counts(self) -> dict[str, np.ndarray]:
        """``{"intersection", "union", "label_pixels"}``, each ``(images, C)`` int64, and ``"image_ids"``
        (-1 where none was given): sorted by image id when every image has one (the order of the
        images after :meth:`sync` over processes that shared them), else in the order added."""
        entries = self.image_counts
        if entries and all(i is not None for i, _ in entries):
            entries = sorted(entries, key=lambda entry: entry[0])
        stacked = np.stack([c for _, c in entries]) if entries else np.zeros((0, 3, self.num_classes), np.int64)
        return {**{name: stacked[:, k] for k, name in enumerate(IMAGE_COUNTS)},
                "image_ids": np.array([-1 if i is None else i for i, _ in entries], np.int64)}

    def compute(self) -> dict:
        counts = self.counts()
        out = {}
        for classes, suffix in (("label", ""), ("label_or_prediction", "_label_or_prediction")):
            miou = image_miou(*(counts[name] for name in IMAGE_COUNTS), classes)
            miou = miou[~np.isnan(miou)]
            out[f"per_image_miou{suffix}"] = float(miou.mean()) if miou.size else math.nan
            out[f"worst_10pct_miou{suffix}"] = worst_mean(miou)
        return {**out, "images_scored": int((counts["label_pixels"].sum(1) > 0).sum())}


class SegmentationMetrics:
    """All of iumask's evaluation metrics over batches: a collection of the accumulators above,
    fed by one :meth:`update`, reduced together (:meth:`merge`, :meth:`sync`) and computed into one
    dict (the keys of results.json).

    Args:
        num_classes: C.
        ignore_index: label excluded from every count.
        pavpu_window: patch side w (4 by default).
        pavpu_threshold: u_th; a patch is certain when its mean entropy is below it. When None,
            PAvPU is not computed (pass the training-set mean entropy, docs/method.md §8).
        pavpu_stride: patch stride; ``None`` means ``pavpu_window`` (non-overlapping patches).
            The authors' code used stride 1 (dense windows) and counted ignored pixels as wrong;
            here a patch's accuracy is over its valid pixels only (a patch with none is skipped),
            whatever the stride. Its certainty is the mean entropy over all its pixels: the
            model's uncertainty exists whether or not a pixel is labelled, and the threshold
            (the training-set mean entropy) is a mean over all pixels too. Patches that would
            overhang the bottom or right edge are left out.
        accuracy_threshold: a patch is accurate when correct / valid pixels ≥ this (0.5).
        ece_bins: number of equal-width confidence bins of the expected calibration error (15).
        instance_connectivity: connectivity of the ground-truth instances of instance recall.

    Calibration (only from batches whose ``probs`` are given, over valid pixels): the ECE is
    top-label and L1, as torchmetrics' ``MulticlassCalibrationError(n_bins=15, norm="l1")``: the
    confidence is the largest class probability, the pixel is correct when that class is the
    target; bin ``k`` holds confidences in ``[k/n, (k+1)/n)`` (float32 edges from
    ``torch.linspace``, a confidence exactly on an edge goes to the bin above it), and, as there,
    a confidence of exactly 1 gets a bin of its own (``n + 1`` bins in all); ECE =
    Σ_bins |Σ correct − Σ confidence| / pixels. Brier = mean of Σ_c (p_c − y_c)², NLL = mean of
    −log max(p_target, 1e-12).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        pavpu_window: int = 4,
        pavpu_threshold: float | None = None,
        pavpu_stride: int | None = None,
        accuracy_threshold: float = 0.5,
        ece_bins: int = 15,
        instance_connectivity: int = 8,
    ):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion_matrix = ConfusionMatrix(num_classes, ignore_index)
        self.mean_entropy = MeanEntropy()
        self.pavpu = PAvPU(pavpu_threshold, pavpu_window, pavpu_stride, accuracy_threshold) \
            if pavpu_threshold is not None else None
        self.calibration = Calibration(ece_bins)
        self.selective_risk = SelectiveRisk()
        self.instance_recall = InstanceRecall(num_classes, ignore_index, instance_connectivity)
        self.per_image = PerImageIoU(num_classes, ignore_index)

    ACCUMULATORS = ("confusion_matrix", "mean_entropy", "pavpu", "calibration", "selective_risk",
                    "instance_recall", "per_image")

    @property
    def accumulators(self) -> dict[str, Accumulator]:
        """The accumulators present, by attribute name (PAvPU only with a threshold)."""
        return {name: getattr(self, name) for name in self.ACCUMULATORS if getattr(self, name) is not None}

    @property
    def confusion(self) -> torch.Tensor:
        """The (C, C) confusion matrix so far (rows: target, columns: prediction)."""
        return self.confusion_matrix.confusion

    def reset(self) -> None:
        for accumulator in self.accumulators.values():
            accumulator.reset()

    def merge(self, other: "SegmentationMetrics") -> None:
        """Add ``other``'s state, accumulator by accumulator of the same name. One that only ``other``
        has (PAvPU, given a threshold there only) is taken over as a copy: it holds all the data
        that was scored with it."""
        for name, theirs in other.accumulators.items():
            mine = getattr(self, name)
            if mine is None:
                setattr(self, name, copy.deepcopy(theirs))
            else:
                mine.merge(theirs)

    def sync(self, all_reduce_sum, all_gather_object) -> None:
        """Every state reduced over processes (see :meth:`Accumulator.sync`)."""
        for accumulator in self.accumulators.values():
            accumulator.sync(all_reduce_sum, all_gather_object)

    def image_counts(self) -> dict[str, np.ndarray]:
        """Per scored image, in image order: intersection, union and labelled pixels per class
        (``(images, C)`` int64 each) and the image ids (:meth:`PerImageIoU.counts`)."""
        return self.per_image.counts()

    def update(self, pred, target, entropy=None, probs=None, image_ids=None) -> None:
        """Add a batch: ``pred`` and ``target`` ``(B, H, W)`` (or ``(H, W)``) class indices,
        ``entropy`` the matching pixel uncertainty (needed for PAvPU), ``probs`` the class
        probabilities ``(B, C, H, W)`` (or ``(C, H, W)``; needed for ECE, Brier and NLL; the ECE
        takes its top label from ``probs``, like torchmetrics, not from ``pred``); ``image_ids``
        the images' indices in the split (B ints, or one for one image), the order of
        :meth:`image_counts`."""
        pred, target = _as_tensor(pred).long().cpu(), _as_tensor(target).long().cpu()
        if pred.ndim == 2 and pred.shape == target.shape:
            pred, target = pred[None], target[None]
            entropy = None if entropy is None else _as_tensor(entropy)[None]
            probs = None if probs is None else _as_tensor(probs)[None]
        if probs is not None:
            probs = _as_tensor(probs)
            expected = (target.shape[0], self.num_classes, *target.shape[1:])
            if tuple(probs.shape) != expected:
                raise ValueError(f"probs shape {tuple(probs.shape)} is not (B, C, H, W) = {expected}")
            if not probs.is_floating_point():
                raise ValueError(f"probs must be floating point probabilities, got {probs.dtype}")
        self.confusion_matrix.update(pred, target)  # first: it checks the class ids
        valid = target != self.ignore_index
        if image_ids is None:
            image_ids = [None] * len(pred)
        elif isinstance(image_ids, int):
            image_ids = [image_ids]
        for p, t, i in zip(pred.numpy(), target.numpy(), [None if i is None else int(i) for i in image_ids]):
            self.instance_recall.update_image(p, t)
            self.per_image.update_image(p, t, i)
        if entropy is not None:
            entropy = _as_tensor(entropy).float().cpu()
            self.mean_entropy.update(entropy)
            if self.pavpu is not None:
                self.pavpu.update(pred, target, entropy, self.ignore_index)
        if probs is not None:
            p, t, confidence, correct = top_label(probs, target, valid)
            self.selective_risk.update_pixels(confidence, correct)
            self.calibration.update_pixels(p, t, confidence, correct)

    def compute(self) -> dict:
        """Every accumulator's metrics in one dict: IoU, mIoU, pixel accuracy, mAcc, mean entropy,
        PAvPU (NaN without a threshold), ECE, Brier, NLL, instance recall, per-image and worst-10 %
        mIoU, AURC, AUGRC and risk at 80 % coverage (NaN where undefined)."""
        out = {}
        for accumulator in self.accumulators.values():
            out.update(accumulator.compute())
        if self.pavpu is None:
            out.update(pavpu_from_counts([0, 0, 0, 0]), pavpu_threshold=None)
        return out


def fit_temperature(log_probs: torch.Tensor, target: torch.Tensor, low: float = 0.05, high: float = 20.0) -> float:
    """Post-hoc temperature scaling (Guo et al. 2017): the T in [low, high] minimising the NLL of
    ``softmax(log_probs / T)`` on ``(N, C)`` log-probabilities (an ensemble's log p̄, or a model's
    log-softmax) with ``(N,)`` labels, by a bounded scalar search on log T (scipy)."""
    from scipy.optimize import minimize_scalar

    z, y = log_probs.double(), target.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(z / math.exp(log_t), y))

    found = minimize_scalar(nll, bounds=(math.log(low), math.log(high)), method="bounded",
                            options={"xatol": 1e-6})
    return float(math.exp(found.x))


def scale_temperature(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(log p / T)`` over dimension 1 (probabilities clamped at 1e-12 before the log)."""
    return torch.softmax(torch.log(probs.double().clamp_min(1e-12)) / temperature, 1).to(probs.dtype)
