"""Uncertainty-weighted cross-entropy (docs/method.md §4) and class-weight baselines (§7).

torch is imported inside the functions that compute a loss, and numpy inside
:func:`class_weights`, so the registry of loss methods (:data:`LOSS_METHODS`: names, summaries,
parameters) is read without either: the CLI lists the methods in its ``--help`` without them, and
:func:`class_weights` runs without torch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import numpy as np
    import torch


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
    import torch.nn.functional as F

    _check_shapes(logits, target)
    per_pixel = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    return weighted_pixel_mean(per_pixel, target, ignore_index, class_weights, iu, exponent)


def _check_shapes(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"logits must be (B, C, H, W) and target (B, H, W); got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )


def weighted_pixel_mean(
    per_pixel: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    class_weights: torch.Tensor | None = None,
    iu: torch.Tensor | None = None,
    exponent: float = 0.0,
    pixel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σ_valid ℓ_p · w_{y_p} · (1 + IU_p)^γ · s_p / N_valid``: a per-pixel loss map ``ℓ`` times the
    class weight of each pixel's label, the IU factor and a method's own per-pixel weight ``s``
    (e.g. OHEM's 0/1 selection), averaged over the valid (not ignored) pixels; 0 for a batch
    without valid pixels. Every weight is a constant (no gradient flows into it)."""
    import torch

    valid = target != ignore_index
    weights = valid.to(per_pixel.dtype)
    if class_weights is not None:
        class_weights = class_weights.to(device=per_pixel.device, dtype=per_pixel.dtype)
        weights = weights * class_weights[torch.where(valid, target, 0)]
    if iu is not None and exponent != 0:
        if iu.shape != target.shape:
            raise ValueError(f"iu must have the target's shape {tuple(target.shape)}, got {tuple(iu.shape)}")
        weights = weights * (1.0 + iu.detach().to(per_pixel.dtype)).pow(exponent)
    if pixel_weights is not None:
        weights = weights * pixel_weights.detach().to(per_pixel.dtype)
    return (per_pixel * weights).sum() / valid.sum().clamp_min(1)


# ----------------------------------------------------------------------------- peer methods (per-pixel terms)


def focal_loss_map(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                   gamma: float = 2.0) -> torch.Tensor:
    """Softmax focal loss per pixel (Lin et al. 2017, over the C classes, not one-vs-rest sigmoids):
    ``−(1 − p_y)^γ · log p_y``, 0 at ignored pixels; γ = 0 is cross-entropy. Its class α is the
    class weighting, applied by :func:`weighted_pixel_mean`."""
    import torch
    import torch.nn.functional as F

    _check_shapes(logits, target)
    valid = target != ignore_index
    log_p = F.log_softmax(logits, dim=1).gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
    focal = -(1.0 - log_p.exp()).clamp_min(0).pow(gamma) * log_p
    return torch.where(valid, focal, torch.zeros_like(focal))


def ohem_selection(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, threshold: float = 0.7,
                   min_kept: int = 100_000) -> torch.Tensor:
    """OHEM's pixel selection as mmsegmentation's ``OhemPixelSampler`` (with ``thresh``): 1 for the
    valid pixels whose softmax probability of their true class is below ``max(threshold, the
    (min_kept · B)-th smallest such probability)``, i.e. the hard pixels, at least ``min_kept`` per
    image where there are that many; 0 elsewhere. No gradient."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        valid = target != ignore_index
        prob = F.softmax(logits, dim=1).gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
        selected = torch.zeros_like(prob)
        valid_prob = prob[valid]
        if valid_prob.numel() == 0:
            return selected
        sorted_prob = valid_prob.sort().values
        kth = sorted_prob[min(min_kept * target.shape[0], sorted_prob.numel() - 1)]
        cut = torch.maximum(kth, torch.tensor(threshold, dtype=kth.dtype, device=kth.device))
        selected[valid] = (valid_prob < cut).to(selected.dtype)
        return selected


def batch_recall_weights(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Recall loss weights (Tian et al., ICRA 2022): per class ``1 − recall_c`` of the batch's argmax
    prediction, i.e. false negatives / ground-truth pixels of c in this batch, over valid pixels only
    (the reference code counts the ignore label as a class); 1 for a class absent from the batch
    (it carries no loss there). Returns ``(C,)``; no gradient."""
    import torch

    from iumask.core.entropy import top_class

    with torch.no_grad():
        num_classes = logits.shape[1]
        valid = target != ignore_index
        truth = target[valid]
        missed = truth[top_class(logits)[valid] != truth]
        ground = torch.bincount(truth, minlength=num_classes).double()
        false_neg = torch.bincount(missed, minlength=num_classes).double()
        return torch.where(ground > 0, false_neg / ground.clamp_min(1), torch.ones_like(ground)).to(logits.dtype)


CLASS_WEIGHTINGS = ("none", "inverse", "median", "effective-number")
# Cui et al.'s β for pixel counts: 1/(1 − β) = 10⁶ pixels is where a class's effective number stops
# growing, between CamVid's rarest (~0.2 M labelled pixels at 360x480) and commonest (~16 M) classes.
DEFAULT_EFFECTIVE_NUMBER_BETA = 0.999999


def class_weights(
    pixel_counts,
    method: str,
    pixels_in_images_containing=None,
    beta: float = DEFAULT_EFFECTIVE_NUMBER_BETA,
    warn: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Per-class loss weights from training-label counts (docs/method.md §7).

    Args:
        pixel_counts: ``(C,)`` labelled pixels of each class (ignore label excluded).
        method: ``"none"`` (all 1), ``"inverse"`` (inverse class proportion,
            ``w_c = N / (C · n_c)``: the pixel-weighted mean weight is 1 when every class occurs) or
            ``"median"`` (median frequency balancing, Eigen & Fergus:
            ``freq_c = n_c / pixels of the images containing c``, ``w_c = median(freq) / freq_c``,
            the median over the classes that occur).
            ``"effective-number"`` (class-balanced weights, Cui et al. 2019:
            ``w_c = (1 − β) / (1 − β^{n_c})``, normalised to sum to C).
        pixels_in_images_containing: ``(C,)`` total pixels of the images that contain each class
            (needed by ``"median"``).
        beta: β of ``"effective-number"``, in [0, 1): 0 gives all-equal weights, β → 1 inverse
            class frequency.

    Classes that never occur get weight 0 (they carry no loss anyway) and a warning: one line
    through ``warn`` (the CLI's, :func:`iumask.progress.warn`), or a Python ``UserWarning`` for
    library callers that pass none.
    """
    import numpy as np

    counts = np.asarray(pixel_counts, dtype=np.float64)
    if method not in CLASS_WEIGHTINGS:
        raise ValueError(f"class weighting must be one of {', '.join(CLASS_WEIGHTINGS)}, got {method!r}")
    if method == "none":
        return np.ones_like(counts)
    present = counts > 0
    if not present.all():
        message = (f"classes {np.flatnonzero(~present).tolist()} never occur in the training labels; "
                   "their class weight is 0")
        if warn is not None:
            warn(message)
        else:
            warnings.warn(message, stacklevel=2)
    weights = np.zeros_like(counts)
    if method == "inverse":
        weights[present] = counts.sum() / (len(counts) * counts[present])
    elif method == "effective-number":
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        # 1 − β^n as −expm1(n·log1p(−(1 − β))): exact for β within 1e-12 of 1 and n in the 10⁸s
        effective = -np.expm1(counts[present] * np.log1p(-(1.0 - beta))) / (1.0 - beta) if beta > 0 else 1.0
        weights[present] = 1.0 / effective
        weights *= len(counts) / weights.sum()
    else:
        if pixels_in_images_containing is None:
            raise ValueError("median frequency balancing needs pixels_in_images_containing")
        freq = counts[present] / np.asarray(pixels_in_images_containing, dtype=np.float64)[present]
        weights[present] = np.median(freq) / freq
    return weights


# ----------------------------------------------------------------------------- the registry of loss methods


@dataclass(frozen=True)
class LossMethod:
    """A training loss by name. A *per-pixel* method gives ``(loss map ℓ, pixel weights s or None)``
    from ``(logits, target, ignore_index, options)``, combined by :func:`weighted_pixel_mean` with
    class weights and the IU factor; a *region* method gives a scalar added to the class-weighted
    cross-entropy (CE + region loss, as they are used in practice) and takes no per-pixel weight.
    ``options`` is any object with the methods' parameters as attributes (a
    :class:`~iumask.config.LossConfig`); ``parameters`` names those this method reads (recorded in
    a model's identity)."""

    name: str
    summary: str
    pixel: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None
    region: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
    parameters: tuple[str, ...] = ()

    @property
    def takes_pixel_weights(self) -> bool:
        return self.region is None


LOSS_METHODS: dict[str, LossMethod] = {}


def register_loss_method(method: LossMethod) -> LossMethod:
    """Add a method: its name becomes valid for ``--loss``, config files and experiment arms."""
    if (method.pixel is None) == (method.region is None):
        raise ValueError(f"loss method {method.name!r} needs exactly one of pixel= or region=")
    LOSS_METHODS[method.name] = method
    return method


def _cross_entropy_map(logits, target, ignore_index):
    import torch.nn.functional as F

    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")


register_loss_method(LossMethod(
    "cross-entropy", "cross-entropy (the paper's loss)",
    pixel=lambda logits, target, ignore_index, options: (_cross_entropy_map(logits, target, ignore_index), None)))
register_loss_method(LossMethod(
    "focal", "softmax focal loss (Lin et al. 2017), --focal-gamma; class weights are its α",
    pixel=lambda logits, target, ignore_index, options: (
        focal_loss_map(logits, target, ignore_index, options.focal_gamma), None),
    parameters=("focal_gamma",)))
register_loss_method(LossMethod(
    "ohem", "cross-entropy over the hard pixels (mmsegmentation's OHEM), --ohem-threshold, --ohem-min-kept",
    pixel=lambda logits, target, ignore_index, options: (
        _cross_entropy_map(logits, target, ignore_index),
        ohem_selection(logits, target, ignore_index, options.ohem_threshold, options.ohem_min_kept)),
    parameters=("ohem_threshold", "ohem_min_kept")))


def _recall_pixel(logits, target, ignore_index, options):
    import torch

    weights = batch_recall_weights(logits, target, ignore_index)[torch.where(target != ignore_index, target, 0)]
    return _cross_entropy_map(logits, target, ignore_index), weights


register_loss_method(LossMethod(
    "recall", "cross-entropy weighted by 1 − the batch's recall of each class (Tian et al. 2022)",
    pixel=_recall_pixel))


def _smp_region_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    def region(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
        from segmentation_models_pytorch.losses import DiceLoss, LovaszLoss

        loss = (DiceLoss if kind == "dice" else LovaszLoss)("multiclass", ignore_index=ignore_index)
        return loss(logits.float(), target)  # smp's Lovász needs float32
    return region


register_loss_method(LossMethod("dice", "cross-entropy + Dice loss (segmentation-models-pytorch)",
                                region=_smp_region_loss("dice")))
register_loss_method(LossMethod("lovasz", "cross-entropy + Lovász-softmax loss (segmentation-models-pytorch)",
                                region=_smp_region_loss("lovasz")))


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, method: str, options, ignore_index: int = 255,
                      class_weights: torch.Tensor | None = None, iu: torch.Tensor | None = None,
                      exponent: float = 0.0) -> torch.Tensor:
    """The loss of ``method`` (a :data:`LOSS_METHODS` name) on a batch: for a per-pixel method
    ``Σ_valid ℓ_p · s_p · w_{y_p} · (1 + IU_p)^γ / N_valid``; for a region method the class-weighted
    CE plus the region loss (an IU mask with γ ≠ 0 is refused: it has no per-pixel term to weight)."""
    _check_shapes(logits, target)
    spec = LOSS_METHODS[method]
    if spec.region is not None:
        if iu is not None and exponent != 0:
            raise ValueError(f"the {method} loss takes no per-pixel weight, so it cannot be IU-weighted")
        ce = weighted_pixel_mean(_cross_entropy_map(logits, target, ignore_index), target, ignore_index,
                                 class_weights)
        return ce + spec.region(logits, target, ignore_index)
    per_pixel, pixel_weights = spec.pixel(logits, target, ignore_index, options)
    return weighted_pixel_mean(per_pixel, target, ignore_index, class_weights, iu, exponent, pixel_weights)
