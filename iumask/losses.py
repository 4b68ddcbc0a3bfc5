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
