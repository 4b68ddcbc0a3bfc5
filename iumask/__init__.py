"""iumask: instance-wise uncertainty masks and uncertainty-weighted training for semantic
segmentation (Almeida, Dutra, Renna 2024, arXiv 2407.12609).

The numerical core is importable from here for use in your own training loops::

    import iumask
    probs = iumask.mean_softmax([model(x) for model in ensemble])
    entropy = iumask.pixel_entropy(probs)
    iu = iumask.instance_uncertainty_batch(probs.argmax(1), entropy, num_classes)
    loss = iumask.uncertainty_weighted_cross_entropy(logits, target, iu, exponent=2.0)

Its names are imported on first use, so ``import iumask`` (and the CLI's start) does not import torch.
"""

from __future__ import annotations

from typing import Any

from iumask import core

__version__ = "0.1.0"
__all__ = core.__all__


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(core, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
