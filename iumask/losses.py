"""Training losses by name: the one place the baseline, offline-weighted and online steps get theirs.

A loss is built from a :class:`~iumask.config.LossConfig` (γ and the class weighting), the class
weights' values and the ignore index, and is called as ``loss(logits, label, iu)``. Class weights
combine with either loss (docs/method.md §4, §7). A new loss is one :func:`register_loss` entry.
"""

from __future__ import annotations

from typing import Callable

import torch

from iumask.config import LossConfig
from iumask.core import uncertainty_weighted_cross_entropy

LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
LossFactory = Callable[[LossConfig, "torch.Tensor | None", int], LossFn]
LOSSES: dict[str, LossFactory] = {}


def register_loss(name: str) -> Callable[[LossFactory], LossFactory]:
    def add(factory: LossFactory) -> LossFactory:
        LOSSES[name] = factory
        return factory
    return add


@register_loss("cross-entropy")
def cross_entropy(config: LossConfig, class_weights: torch.Tensor | None, ignore_index: int) -> LossFn:
    """Plain (optionally class-weighted) cross-entropy: the baseline's loss; ``iu`` is ignored."""
    def loss(logits: torch.Tensor, label: torch.Tensor, iu: torch.Tensor | None = None) -> torch.Tensor:
        return uncertainty_weighted_cross_entropy(logits, label, None, 0.0, ignore_index, class_weights)
    return loss


@register_loss("iu-weighted")
def iu_weighted(config: LossConfig, class_weights: torch.Tensor | None, ignore_index: int) -> LossFn:
    """CE · (1 + IU)^γ with the batch's IU mask, which it requires (a missing mask would silently
    train plain cross-entropy)."""
    def loss(logits: torch.Tensor, label: torch.Tensor, iu: torch.Tensor | None) -> torch.Tensor:
        if iu is None:
            raise ValueError("the IU-weighted loss needs the batch's IU mask")
        return uncertainty_weighted_cross_entropy(logits, label, iu, config.exponent, ignore_index, class_weights)
    return loss


def build_loss(name: str, config: LossConfig, class_weight_values: list[float] | None, ignore_index: int) -> LossFn:
    """The registered loss ``name`` with these settings (class weights as float32 values)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; registered: {', '.join(LOSSES)}")
    weights = None if class_weight_values is None else torch.as_tensor(class_weight_values, dtype=torch.float32)
    return LOSSES[name](config, weights, ignore_index)
