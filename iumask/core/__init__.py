"""The numerical core: pure functions on arrays and tensors, no file I/O.

Its names are imported on first use (``iumask.core.pixel_entropy`` imports
:mod:`iumask.core.entropy` then), so reading the loss registry (:data:`LOSS_METHODS`, for the
CLI's ``--help``) or :mod:`iumask` itself does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# Each public name and the module of the core that defines it.
_DEFINED_IN = {
    "CLASS_WEIGHTINGS": "loss",
    "LOSS_METHODS": "loss",
    "LossMethod": "loss",
    "register_loss_method": "loss",
    "segmentation_loss": "loss",
    "class_weights": "loss",
    "uncertainty_weighted_cross_entropy": "loss",
    "SegmentationMetrics": "metrics",
    "instance_uncertainty": "instances",
    "instance_uncertainty_batch": "instances",
    "label_instances": "instances",
    "mean_softmax": "entropy",
    "pixel_entropy": "entropy",
    "top_class": "entropy",
}
__all__ = list(_DEFINED_IN)


def __getattr__(name: str) -> Any:
    if name not in _DEFINED_IN:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_DEFINED_IN[name]}"), name)
    globals()[name] = value  # the next lookup is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
