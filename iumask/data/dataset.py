"""The torch Dataset over any dataset format: training and inference samples of a
:class:`~iumask.data.folder.PairedDataset`, resized, augmented and with uncertainty masks, as tensors.

Apart from :mod:`iumask.data.folder` so that reading a dataset (``iumask check-data``) does not
import torch.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import cv2
import numpy as np
import torch

from iumask.data.folder import IMAGENET_MEAN, IMAGENET_STD, PairedDataset, resize_label
from iumask.errors import DataError

MaskFn = Callable[[int], np.ndarray]
TransformFn = Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]]


class SegmentationDataset(torch.utils.data.Dataset):
    """Training samples from a :class:`PairedDataset` (any format), optionally resized and with uncertainty masks.

    ``size`` is (H, W). ``masks(index)`` gives a float32 (H, W) mask at the resized size.
    ``transform(sample, rng)`` maps ``{"image", "label"[, "iu"][, "valid"]}`` numpy arrays to the
    same keys, after resizing. ``rng`` is seeded from ``(seed, epoch, index)``, so a sample's
    augmentation depends only on those: the same in every worker process, and again after a resume.
    ``valid_mask``: add ``"valid"`` (bool, False where augmentation padded outside the image), for
    code that must tell padding from unlabelled pixels (online instances).
    """

    def __init__(
        self,
        folder: PairedDataset,
        size: tuple[int, int] | None = None,
        masks: MaskFn | None = None,
        transform: TransformFn | None = None,
        seed: int = 0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        valid_mask: bool = False,
    ) -> None:
        self.folder = folder
        self.valid_mask = valid_mask
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.masks = masks
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.folder)

    def set_epoch(self, epoch: int) -> None:
        """Draw other augmentations in the next epoch (call before iterating)."""
        self.epoch = epoch

    def sample_shape(self, i: int) -> tuple[int, int]:
        """(H, W) of sample ``i``: ``size`` if given, else the image's own shape."""
        return self.size if self.size is not None else self.folder.image_shape(i)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self._load_arrays(i)
        if self.transform is not None:
            sample = self.transform(sample, np.random.default_rng([self.seed, self.epoch, i]))
        return self._to_tensors(sample, i)

    def _load_arrays(self, i: int) -> dict[str, np.ndarray]:
        image = self.folder.read_image(i)
        label = self.folder.read_label(i)
        if self.size is not None and image.shape[:2] != self.size:
            h, w = self.size
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
            label = resize_label(label, self.size)
        sample = {"image": image, "label": label}
        if self.masks is not None:
            sample["iu"] = self._load_mask(i, label.shape)
        if self.valid_mask:
            sample["valid"] = np.ones(label.shape, dtype=np.uint8)
        return sample

    def _load_mask(self, i: int, shape: tuple[int, ...]) -> np.ndarray:
        mask = np.asarray(self.masks(i), dtype=np.float32)
        if mask.shape != shape:
            raise DataError(
                f"{self.folder.image_paths[i]}: uncertainty mask is {tuple(mask.shape)} but the training sample "
                f"is {tuple(shape)}; the mask store was made at another size, rebuild it at this size"
            )
        return mask

    def _to_tensors(self, sample: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        image = (sample["image"].astype(np.float32) / 255.0 - self.mean) / self.std
        out: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "label": torch.from_numpy(np.ascontiguousarray(sample["label"]).astype(np.int64)),
            "index": int(i),
        }
        if "iu" in sample:
            out["iu"] = torch.from_numpy(np.ascontiguousarray(sample["iu"], dtype=np.float32))
        if "valid" in sample:
            out["valid"] = torch.from_numpy(np.ascontiguousarray(sample["valid"]).astype(bool))
        return out


def shape_batches(indices: Iterable[int], shape_of: Callable[[int], tuple], size: int) -> list[list[int]]:
    """``indices`` in batches of at most ``size`` images of one shape (images of one shape stack into
    one tensor): grouped by ``shape_of(i)``, groups in the order of their first image and images in
    the given order, each group cut into runs of ``size``. The batching of make-masks, evaluate,
    predict and training's validation; with one shape it is ``size`` consecutive images at a time."""
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        groups.setdefault(tuple(shape_of(i)), []).append(i)
    return [group[k:k + size] for group in groups.values() for k in range(0, len(group), size)]
