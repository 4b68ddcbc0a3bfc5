"""Training losses: the one place the baseline, offline-weighted and online steps get theirs.

A loss is built from a :class:`~iumask.config.LossConfig` (the method, γ, the class weighting and
the methods' parameters), the class weights' values and the ignore index, and is called as
``loss(logits, label, iu)``. The methods are the registry :data:`iumask.core.LOSS_METHODS`
(cross-entropy, focal, ohem, recall, dice, lovasz): a new method is one
:func:`iumask.core.register_loss_method` call, and the CLI's ``--loss`` choices, config files and
experiment arms take it by name (docs/method.md §4, §7, §10).
"""

from __future__ import annotations

from typing import Callable

import torch

from iumask.config import LossConfig
from iumask.core import segmentation_loss

LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def build_loss(config: LossConfig, class_weight_values: list[float] | None, ignore_index: int,
               iu_weighted: bool) -> LossFn:
    """The loss of ``config`` (class weights as float32 values). With ``iu_weighted`` every call
    needs the batch's IU mask (a missing mask would silently train without it) and the method must
    take per-pixel weights; without, ``iu`` is ignored and γ is not used."""
    if iu_weighted:
        config.check_iu_weighting()
    weights = None if class_weight_values is None else torch.as_tensor(class_weight_values, dtype=torch.float32)
    exponent = config.exponent if iu_weighted else 0.0

    def loss(logits: torch.Tensor, label: torch.Tensor, iu: torch.Tensor | None = None) -> torch.Tensor:
        if iu_weighted and iu is None:
            raise ValueError("the IU-weighted loss needs the batch's IU mask")
        return segmentation_loss(logits, label, config.loss, config, ignore_index, weights,
                                 iu if iu_weighted else None, exponent)
    return loss


def ohem_note(config: LossConfig, sample: tuple[int, int]) -> str | None:
    """The warning when OHEM cannot select: with ``--ohem-min-kept`` at least the pixels of a
    training sample of ``sample`` (H, W), the (min_kept · B)-th smallest probability is the batch's
    largest, so every valid pixel but the most confident is kept, whatever the threshold, and the
    loss is plain cross-entropy; None when the loss is not OHEM or the minimum is below that."""
    pixels = int(sample[0]) * int(sample[1])
    if config.loss != "ohem" or config.ohem_min_kept < pixels:
        return None
    return (f"--ohem-min-kept {config.ohem_min_kept} is at least the {pixels} pixels of a training sample "
            f"({sample[1]}x{sample[0]}, WxH): OHEM keeps every pixel and trains as plain cross-entropy; "
            f"pass a smaller --ohem-min-kept (e.g. {max(1, pixels // 16)}, 1/16 of a sample, as mmsegmentation's "
            "100000 is for 512x1024 crops)")
