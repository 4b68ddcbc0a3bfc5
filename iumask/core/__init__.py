"""The numerical core: pure functions on arrays and tensors, no file I/O."""

from iumask.core.entropy import mean_softmax, pixel_entropy, top_class
from iumask.core.instances import instance_uncertainty, instance_uncertainty_batch, label_instances
from iumask.core.loss import (
    CLASS_WEIGHTINGS,
    LOSS_METHODS,
    LossMethod,
    class_weights,
    register_loss_method,
    segmentation_loss,
    uncertainty_weighted_cross_entropy,
)
from iumask.core.metrics import SegmentationMetrics

__all__ = [
    "CLASS_WEIGHTINGS",
    "LOSS_METHODS",
    "LossMethod",
    "register_loss_method",
    "segmentation_loss",
    "class_weights",
    "SegmentationMetrics",
    "instance_uncertainty",
    "instance_uncertainty_batch",
    "label_instances",
    "mean_softmax",
    "pixel_entropy",
    "top_class",
    "uncertainty_weighted_cross_entropy",
]
