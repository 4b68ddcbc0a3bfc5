"""Segmentation and uncertainty metrics (docs/method.md §8): IoU from one confusion matrix over the
split, and PAvPU (Mukhoti & Gal 2018) from pooled patch counts. Streaming: memory does not grow
with the number of images."""

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
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        pavpu_window: int = 4,
        pavpu_threshold: float | None = None,
        pavpu_stride: int | None = None,
        accuracy_threshold: float = 0.5,
    ):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.pavpu_window = pavpu_window
        self.pavpu_stride = pavpu_stride or pavpu_window
        self.pavpu_threshold = pavpu_threshold
        self.accuracy_threshold = accuracy_threshold
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        # n_ac, n_au, n_ic, n_iu
        self.patch_counts = torch.zeros(4, dtype=torch.int64)
        self.entropy_sum = 0.0
        self.entropy_pixels = 0

    def update(self, pred, target, entropy=None) -> None:
        """Add a batch: ``pred`` and ``target`` ``(B, H, W)`` (or ``(H, W)``) class indices,
        ``entropy`` the matching pixel uncertainty (needed for PAvPU)."""
        pred, target = _as_tensor(pred).long().cpu(), _as_tensor(target).long().cpu()
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} differs from target {tuple(target.shape)}")
        if pred.ndim == 2:
            pred, target = pred[None], target[None]
            entropy = None if entropy is None else _as_tensor(entropy)[None]
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

    def _patch_counts(self, correct, valid, entropy) -> torch.Tensor:
        w, s = self.pavpu_window, self.pavpu_stride
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
        others, pixel accuracy, mean entropy (over all pixels), and PAvPU with its two
        conditional probabilities."""
        cm = self.confusion.double()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.tensor(math.nan, dtype=torch.float64))
        present = ~torch.isnan(iou)
        total = cm.sum()
        n_ac, n_au, n_ic, n_iu = (int(v) for v in self.patch_counts)
        patches = n_ac + n_au + n_ic + n_iu
        nan = math.nan
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
        }
