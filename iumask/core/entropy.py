"""Pixel uncertainty: the entropy of a predictive distribution (docs/method.md §2)."""

from __future__ import annotations

import math

import numpy as np
import torch

# p is clamped away from 0 so that 0 · ln 0 contributes 0 instead of NaN.
_EPS = 1e-12


def pixel_entropy(probs, normalize: bool = False):
    """Entropy ``-Σ_c p_c ln p_c`` of class probabilities over the class axis.

    Args:
        probs: ``(B, C, H, W)`` probabilities (a torch tensor or a numpy array), e.g. the
            ensemble's averaged softmax.
        normalize: divide by ``ln C`` so that the range is ``[0, 1]`` instead of ``[0, ln C]``
            (the authors' code does not normalise; default off).

    Returns:
        ``(B, H, W)`` entropy, natural log, of the same kind (tensor or array) as ``probs``.
    """
    if probs.ndim != 4:
        raise ValueError(f"probs must be (B, C, H, W), got shape {tuple(probs.shape)}")
    num_classes = probs.shape[1]
    if isinstance(probs, torch.Tensor):
        entropy = -(probs * probs.clamp_min(_EPS).log()).sum(dim=1)
    else:
        probs = np.asarray(probs)
        entropy = -(probs * np.log(np.maximum(probs, _EPS))).sum(axis=1)
    if normalize:
        entropy = entropy / math.log(num_classes)
    return entropy


def top_class(scores: torch.Tensor) -> torch.Tensor:
    """The class of highest score (probability or logit) of every pixel: ``(B, C, H, W)`` ->
    ``(B, H, W)`` int64, the first class on ties, as ``argmax(1)``. ``max(1).indices`` gives the
    same answer ten times faster on a CPU (9.2 vs 0.8 ms for 4 x 11 x 96 x 128 here), as argmax
    reduces over the strided class axis slowly."""
    return scores.max(dim=1).indices


def mean_softmax(logits_list):
    """Equal-weight average of the members' softmax: the ensemble's predictive distribution p̄."""
    probs = None
    for logits in logits_list:
        member = torch.softmax(logits.float(), dim=1)
        probs = member if probs is None else probs + member
    return probs / len(logits_list)
