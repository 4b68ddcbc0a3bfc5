"""Segmentation and uncertainty metrics (docs/method.md §8): IoU from one confusion matrix over the
split, PAvPU (Mukhoti & Gal 2018) from pooled patch counts, and, given class probabilities, the
calibration metrics ECE (from per-bin sums), Brier score and NLL (from running sums). Streaming:
memory does not grow with the number of images."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


class SegmentationMetrics:
    """Accumulates a confusion matrix and PAvPU patch counts over batches.

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

    Calibration (only from batches whose ``probs`` are given, over valid pixels): the ECE is
    top-label and L1, as torchmetrics' ``MulticlassCalibrationError(n_bins=15, norm="l1")``: the
    confidence is the largest class probability, the pixel is correct when that class is the
    target; bin ``k`` holds confidences in ``[k/n, (k+1)/n)`` (float32 edges from
    ``torch.linspace``, a confidence exactly on an edge goes to the bin above it), and, as there,
    a confidence of exactly 1 gets a bin of its own (``n + 1`` bins in all); ECE =
    Σ_bins |Σ correct − Σ confidence| / pixels. Brier = mean of Σ_c (p_c − y_c)², NLL = mean of
    −log max(p_target, 1e-12). The state is per-bin counts, confidence and correct sums, and the
    Brier/NLL sums (float64 tensors that can be summed across processes like ``confusion``).
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
    ):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.pavpu_window = pavpu_window
        self.pavpu_stride = pavpu_stride or pavpu_window
        self.pavpu_threshold = pavpu_threshold
        self.accuracy_threshold = accuracy_threshold
        if ece_bins < 1:
            raise ValueError(f"ece_bins must be at least 1, got {ece_bins}")
        self.ece_bins = ece_bins
        # float32 edges, as torchmetrics builds them for float32 confidences
        self._bin_edges = torch.linspace(0, 1, ece_bins + 1, dtype=torch.float32)
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        # n_ac, n_au, n_ic, n_iu
        self.patch_counts = torch.zeros(4, dtype=torch.int64)
        self.entropy_sum = 0.0
        self.entropy_pixels = 0
        # per confidence bin (ece_bins + 1, the last for confidence 1): pixels, Σ confidence, Σ correct
        self.bin_counts = torch.zeros(self.ece_bins + 1, dtype=torch.float64)
        self.bin_confidence = torch.zeros(self.ece_bins + 1, dtype=torch.float64)
        self.bin_accuracy = torch.zeros(self.ece_bins + 1, dtype=torch.float64)
        # valid pixels with probabilities, Σ Brier, Σ NLL
        self.score_sums = torch.zeros(3, dtype=torch.float64)

    def update(self, pred, target, entropy=None, probs=None) -> None:
        """Add a batch: ``pred`` and ``target`` ``(B, H, W)`` (or ``(H, W)``) class indices,
        ``entropy`` the matching pixel uncertainty (needed for PAvPU), ``probs`` the class
        probabilities ``(B, C, H, W)`` (or ``(C, H, W)``; needed for ECE, Brier and NLL; the ECE
        takes its top label from ``probs``, like torchmetrics, not from ``pred``)."""
        pred, target = _as_tensor(pred).long().cpu(), _as_tensor(target).long().cpu()
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} differs from target {tuple(target.shape)}")
        if pred.ndim == 2:
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
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).view(
            self.num_classes, self.num_classes
        )
        if entropy is not None:
            entropy = _as_tensor(entropy).float().cpu()
            self.entropy_sum += float(entropy.double().sum())
            self.entropy_pixels += entropy.numel()
            if self.pavpu_threshold is not None:
                self.patch_counts += self._patch_counts(pred == target, valid, entropy)
        if probs is not None:
            self._add_calibration(probs, target, valid)

    def _add_calibration(self, probs, target, valid) -> None:
        """Per-bin and Brier/NLL sums of the valid pixels, computed on ``probs``' device."""
        device = probs.device
        valid = valid.to(device)
        p = probs.movedim(1, -1)[valid]  # (N, C), a copy
        if p.shape[0] == 0:
            return
        if p.dtype != torch.float64:
            p = p.float()
        t = target.to(device)[valid]
        rows = torch.arange(p.shape[0], device=device)
        confidence, top = p.max(dim=1)
        correct = (top == t).double()
        bins = torch.bucketize(confidence.float(), self._bin_edges.to(device), right=True) - 1
        n = self.ece_bins + 1
        self.bin_counts += torch.bincount(bins, minlength=n).double().cpu()
        self.bin_confidence += torch.bincount(bins, weights=confidence.double(), minlength=n).cpu()
        self.bin_accuracy += torch.bincount(bins, weights=correct, minlength=n).cpu()
        nll = -torch.log(p[rows, t].double().clamp_min(1e-12)).sum()
        p[rows, t] -= 1  # p - one_hot(target)
        brier = torch.sum(p * p, dtype=torch.float64)
        self.score_sums += torch.tensor([float(rows.numel()), float(brier), float(nll)], dtype=torch.float64)

    def _patch_counts(self, correct, valid, entropy) -> torch.Tensor:
        w, s = self.pavpu_window, self.pavpu_stride
        if min(correct.shape[-2:]) < w:  # every patch would overhang an edge: none is scored
            return torch.zeros(4, dtype=torch.int64)
        pool = lambda x: F.avg_pool2d(x[:, None].float(), w, stride=s)[:, 0]  # noqa: E731
        valid_frac = pool(valid)
        has_valid = valid_frac > 0
        accuracy = pool(correct & valid) / valid_frac.clamp_min(1e-12)
        accurate = accuracy >= self.accuracy_threshold
        certain = pool(entropy) < self.pavpu_threshold
        ac = (accurate & certain & has_valid).sum()
        au = (accurate & ~certain & has_valid).sum()
        ic = (~accurate & certain & has_valid).sum()
        iu = (~accurate & ~certain & has_valid).sum()
        return torch.stack([ac, au, ic, iu])

    def compute(self) -> dict:
        """Per-class IoU (NaN for a class absent from both target and prediction), mIoU over the
        others, pixel accuracy, mean entropy (over all pixels), PAvPU with its two conditional
        probabilities, and ECE, Brier score and NLL (NaN without probabilities or valid pixels)."""
        cm = self.confusion.double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.tensor(math.nan, dtype=torch.float64))
        present = ~torch.isnan(iou)
        total = cm.sum()
        n_ac, n_au, n_ic, n_iu = (int(v) for v in self.patch_counts)
        patches = n_ac + n_au + n_ic + n_iu
        nan = math.nan
        scored, brier_sum, nll_sum = (float(v) for v in self.score_sums)
        ece = float((self.bin_accuracy - self.bin_confidence).abs().sum()) / scored if scored else nan
        return {
            "iou": iou.tolist(),
            "miou": float(iou[present].mean()) if present.any() else nan,
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else nan,
            "mean_entropy": self.entropy_sum / self.entropy_pixels if self.entropy_pixels else nan,
            "pavpu": (n_ac + n_iu) / patches if patches else nan,
            "p_accurate_given_certain": n_ac / (n_ac + n_ic) if n_ac + n_ic else nan,
            "p_uncertain_given_inaccurate": n_iu / (n_ic + n_iu) if n_ic + n_iu else nan,
            "pavpu_counts": {"n_ac": n_ac, "n_au": n_au, "n_ic": n_ic, "n_iu": n_iu},
            "pavpu_threshold": self.pavpu_threshold,
            "ece": ece,
            "brier": brier_sum / scored if scored else nan,
            "nll": nll_sum / scored if scored else nan,
            # the reliability diagram's data: per confidence bin (the last holds confidence 1)
            # pixels, mean confidence and accuracy (NaN for an empty bin)
            "calibration_bins": self._reliability(),
        }

    def _reliability(self) -> dict:
        counts = self.bin_counts
        mean = lambda sums: torch.where(counts > 0, sums / counts.clamp_min(1), math.nan).tolist()  # noqa: E731
        return {"edges": self._bin_edges.double().tolist(), "pixels": [int(c) for c in counts.tolist()],
                "confidence": mean(self.bin_confidence), "accuracy": mean(self.bin_accuracy)}
