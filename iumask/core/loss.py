"""Uncertainty-weighted cross-entropy (docs/method.md §4) and class-weight baselines (§7)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F


def uncertainty_weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    iu: torch.Tensor | None = None,
    exponent: float = 2.0,
    ignore_index: int = 255,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σ_valid CE_p · w_{y_p} · (1 + IU_p)^γ / N_valid`` (paper eq. 8, γ = ``exponent``).

    Args:
        logits: ``(B, C, H, W)`` raw scores.
        target: ``(B, H, W)`` class indices; ``ignore_index`` pixels carry no loss and are not
            counted in ``N_valid`` (the authors' code divides by all pixels; see docs/method.md §4).
        iu: ``(B, H, W)`` instance-uncertainty mask, or None for plain (class-weighted) CE. It is
            a constant: no gradient flows into it.
        exponent: γ; 0 gives plain cross-entropy.
        class_weights: optional ``(C,)`` per-class weights (inverse or median frequency).

    With ``exponent=0`` and no class weights this equals
    ``F.cross_entropy(logits, target, ignore_index=ignore_index)``. With class weights the mean is
    over valid pixels (not over the sum of weights as in ``F.cross_entropy(weight=...)``), so the
    scale stays that of the unweighted loss. A batch with no valid pixel gives 0 (with zero
    gradient) where ``F.cross_entropy`` gives NaN, so one fully-ignored crop can't poison training.
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"logits must be (B, C, H, W) and target (B, H, W); got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    per_pixel = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    weights = valid.to(per_pixel.dtype)
    if class_weights is not None:
        class_weights = class_weights.to(device=per_pixel.device, dtype=per_pixel.dtype)
        weights = weights * class_weights[torch.where(valid, target, 0)]
    if iu is not None and exponent != 0:
        if iu.shape != target.shape:
            raise ValueError(f"iu must have the target's shape {tuple(target.shape)}, got {tuple(iu.shape)}")
        weights = weights * (1.0 + iu.detach().to(per_pixel.dtype)).pow(exponent)
    return (per_pixel * weights).sum() / valid.sum().clamp_min(1)


CLASS_WEIGHTINGS = ("none", "inverse", "median")


def class_weights(
    pixel_counts,
    method: str,
    pixels_in_images_containing=None,
) -> np.ndarray:
    """Per-class loss weights from training-label counts (docs/method.md §7).

    Args:
        pixel_counts: ``(C,)`` labelled pixels of each class (ignore label excluded).
        method: ``"none"`` (all 1), ``"inverse"`` (inverse class proportion,
            ``w_c = N / (C · n_c)``: the pixel-weighted mean weight is 1 when every class occurs) or
            ``"median"`` (median frequency balancing, Eigen & Fergus:
            ``freq_c = n_c / pixels of the images containing c``, ``w_c = median(freq) / freq_c``,
            the median over the classes that occur).
        pixels_in_images_containing: ``(C,)`` total pixels of the images that contain each class
            (needed by ``"median"``).

    Classes that never occur get weight 0 (they carry no loss anyway) and a warning.
    """
    counts = np.asarray(pixel_counts, dtype=np.float64)
    if method not in CLASS_WEIGHTINGS:
        raise ValueError(f"class weighting must be one of {', '.join(CLASS_WEIGHTINGS)}, got {method!r}")
    if method == "none":
        return np.ones_like(counts)
    present = counts > 0
    if not present.all():
        warnings.warn(f"classes {np.flatnonzero(~present).tolist()} never occur in the training labels; "
                      "their class weight is 0", stacklevel=2)
    weights = np.zeros_like(counts)
    if method == "inverse":
        weights[present] = counts.sum() / (len(counts) * counts[present])
    else:
        if pixels_in_images_containing is None:
            raise ValueError("median frequency balancing needs pixels_in_images_containing")
        freq = counts[present] / np.asarray(pixels_in_images_containing, dtype=np.float64)[present]
        weights[present] = np.median(freq) / freq
    return weights
