"""Every copy between host and accelerator goes through this module, so a review sees them all.

* :func:`to_device`: a tensor (or the tensors of a batch dict) to the device; non-blocking from
  pinned memory (the loaders pin on CUDA), so the copy overlaps the previous batch's compute.
* :func:`to_host`: a result back to the host as numpy, after narrowing it *on the device* to what
  the host needs (``dtype``): e.g. uint8 class ids and float16 entropy for the mask store, so the
  copy moves 1-2 bytes per pixel instead of 8.
* :func:`host_tensor`: the same as a CPU tensor (for metrics that stream on the host).

Outside this module, only models move as a whole (``model.to(device)``, ``.cpu()`` before saving),
the temperature fit gathers its sample of log-probabilities, ``distributed.all_reduce_sum`` stages
a tensor through the GPU for NCCL, and the pure core fetches what its host algorithms need
(OpenCV's connected components in ``core.instances``, the confusion matrix and PAvPU patch counts
in ``core.metrics``).
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(value, device: torch.device):
    """``value`` (a tensor, or a dict whose tensors are moved) on ``device``."""
    if isinstance(value, dict):
        return {k: to_device(v, device) if torch.is_tensor(v) else v for k, v in value.items()}
    return value.to(device, non_blocking=torch.device(device).type == "cuda")


def host_tensor(value: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` as a CPU tensor, converted to ``dtype`` before it leaves the device."""
    if dtype is not None and value.dtype != dtype:
        value = value.to(dtype)
    return value.cpu()


def to_host(value: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """``value`` as a numpy array on the host, converted to ``dtype`` on the device first."""
    return host_tensor(value, dtype).numpy()


def class_id_dtype(num_classes: int) -> torch.dtype:
    """The narrowest dtype for class ids 0..num_classes-1 that numpy shares: uint8 up to 256
    classes, else int32 (torch has no uint16 arithmetic on every device)."""
    return torch.uint8 if num_classes <= 256 else torch.int32
