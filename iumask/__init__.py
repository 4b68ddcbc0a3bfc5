"""iumask: instance-wise uncertainty masks and uncertainty-weighted training for semantic
segmentation (Almeida, Dutra, Renna 2024, arXiv 2407.12609).

The numerical core is importable from here for use in your own training loops::

    import iumask
    probs = iumask.mean_softmax([model(x) for model in ensemble])
    entropy = iumask.pixel_entropy(probs)
    iu = iumask.instance_uncertainty_batch(probs.argmax(1), entropy, num_classes)
    loss = iumask.uncertainty_weighted_cross_entropy(logits, target, iu, exponent=2.0)
"""

from iumask import core
from iumask.core import *  # noqa: F403  (the public API is the core's)

__version__ = "0.1.0"
__all__ = core.__all__
