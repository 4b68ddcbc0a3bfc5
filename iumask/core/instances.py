"""Instances and instance uncertainty (method.md §3).

An instance is a connected component of the pixels of one class. The instance uncertainty (IU) of
a pixel is the mean pixel uncertainty over its instance (paper eq. 7).

Speed: the straightforward way runs ``cv2.connectedComponents`` on the full-size mask of every
class, then one boolean mask per component. Here the image is cut into tiles and, per class, only
the boxes around the clusters of tiles that hold the class are labelled: a component can't leave
its cluster of touching tiles, so boxes that contain whole clusters (merged where they overlap)
contain whole components and nothing else of that class. Small classes then cost little, and the
per-instance means come from one ``bincount`` over the image.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import torch

_TILE = 32


def _check_connectivity(connectivity: int) -> None:
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")


def _to_codes(segmentation, num_classes: int, ignore_index: int) -> np.ndarray:
    """Map labels to codes ``0..C-1`` for classes and ``C`` for ignored pixels; any other value
    becomes ``C + 1`` (reported by the caller). uint8 whenever the codes fit (fast cv2 paths)."""
    seg = np.asarray(segmentation)
    if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(f"segmentation must be a 2-D integer array, got {seg.dtype} {seg.shape}")
    small = num_classes + 1 <= 255
    if seg.dtype == np.uint8 and small:
        table = np.full(256, num_classes + 1, dtype=np.uint8)
        table[:num_classes] = np.arange(num_classes)
        if 0 <= ignore_index <= 255:
            table[ignore_index] = num_classes
        return cv2.LUT(seg, table)
    codes = np.where((seg >= 0) & (seg < num_classes), seg, num_classes + 1)
    codes[seg == ignore_index] = num_classes
    return codes.astype(np.uint8 if small else np.int32)


def _raise_bad_values(segmentation, num_classes: int, ignore_index: int) -> None:
    values = np.unique(np.asarray(segmentation))
    bad = values[(values < 0) | ((values >= num_classes) & (values != ignore_index))]
    raise ValueError(
        f"label values {bad[:5].tolist()} are outside 0..{num_classes - 1} and are not the "
        f"ignore label {ignore_index}"
    )


@functools.lru_cache(maxsize=8)
def _tile_index(height: int, width: int, bins: int) -> tuple[np.ndarray, int, int]:
    """Per pixel: its tile's number times ``bins`` (so that ``+ code`` is a (tile, code) bin)."""
    tiles_y, tiles_x = -(-height // _TILE), -(-width // _TILE)
    rows = (np.arange(height) // _TILE)[:, None] * tiles_x
    index = (rows + (np.arange(width) // _TILE)[None, :]) * bins
    index = index.astype(np.int32)
    index.setflags(write=False)
    return index, tiles_y, tiles_x


def _merge_overlapping(boxes: np.ndarray) -> np.ndarray:
    """Merge ``(y0, y1, x0, x1)`` boxes until none overlap."""
    boxes = [tuple(int(v) for v in box) for box in boxes]
    merged = True
    while merged and len(boxes) > 1:
        merged = False
        b = np.array(boxes)
        y0, y1, x0, x1 = b[:, :1], b[:, 1:2], b[:, 2:3], b[:, 3:]
        overlap = (y0 < y1.T) & (y0.T < y1) & (x0 < x1.T) & (x0.T < x1)
        np.fill_diagonal(overlap, False)
        if overlap.any():
            i, j = np.argwhere(overlap)[0]
            boxes[i] = (min(y0[i, 0], y0[j, 0]), max(y1[i, 0], y1[j, 0]),
                        min(x0[i, 0], x0[j, 0]), max(x1[i, 0], x1[j, 0]))
            del boxes[j]
            merged = True
    return boxes


def _instance_map(segmentation, num_classes: int, connectivity: int, ignore_index: int):
    """Return ``(instances, classes)``: an int32 map with 0 on ignored pixels and 1..N on the N
    instances, and each instance's class (``classes[0] = -1``)."""
    _check_connectivity(connectivity)
    codes = _to_codes(segmentation, num_classes, ignore_index)
    height, width = codes.shape
    bins = num_classes + 2
    tile_index, tiles_y, tiles_x = _tile_index(height, width, bins)
    keys = (tile_index + codes).ravel()
    present = np.bincount(keys, minlength=tiles_y * tiles_x * bins) > 0
    present = present.reshape(tiles_y, tiles_x, bins)
    if present[:, :, num_classes + 1].any():
        _raise_bad_values(segmentation, num_classes, ignore_index)

    instances = np.zeros((height, width), dtype=np.int32)
    classes = [-1]
    for cls in range(num_classes):
        grid = present[:, :, cls]
        if not grid.any():
            continue
        _, _, stats, _ = cv2.connectedComponentsWithStats(grid.view(np.uint8), connectivity=8)
        x, y, w, h = (stats[1:, i] * _TILE for i in range(4))
        boxes = np.stack([y, np.minimum(y + h, height), x, np.minimum(x + w, width)], axis=1)
        for y0, y1, x0, x1 in _merge_overlapping(boxes):
            mask = cv2.compare(codes[y0:y1, x0:x1], cls, cv2.CMP_EQ)
            count, labels = cv2.connectedComponents(mask, connectivity=connectivity, ltype=cv2.CV_32S)
            if len(classes) > 1:  # number this box's instances after those found before
                cv2.add(labels, len(classes) - 1, dst=labels, mask=mask)
            region = instances[y0:y1, x0:x1]
            cv2.add(region, labels, dst=region)
            classes.extend([cls] * (count - 1))
    return instances, np.array(classes)


def label_instances(segmentation, num_classes: int, connectivity: int = 8, ignore_index: int = 255):
    """Label every instance (connected component of one class) of a label map.

    Returns:
        ``(instances, instance_class)``: an int32 ``(H, W)`` map with ``0`` on ignored pixels and
        ``1..N`` on the N instances (in no meaningful order), and an ``(N + 1,)`` array giving
        each instance's class (``-1`` at index 0).
    """
    return _instance_map(segmentation, num_classes, connectivity, ignore_index)


def instance_uncertainty(
    segmentation,
    entropy,
    num_classes: int,
    connectivity: int = 8,
    ignore_index: int = 255,
) -> np.ndarray:
    """Instance-uncertainty map: each pixel gets the mean ``entropy`` over its instance.

    Args:
        segmentation: ``(H, W)`` integer label map (the ensemble's prediction or the ground truth).
        entropy: ``(H, W)`` float pixel uncertainty (see :func:`iumask.pixel_entropy`).
        num_classes: number of classes C; labels must be in ``0..C-1`` or ``ignore_index``.
        connectivity: 8 (default, as ``cv2.connectedComponents``) or 4.
        ignore_index: pixels with this label belong to no instance and get 0.

    Returns:
        ``(H, W)`` float32 IU map.
    """
    entropy = np.asarray(entropy)
    if entropy.shape != np.shape(segmentation):
        raise ValueError(
            f"entropy shape {entropy.shape} differs from segmentation shape {np.shape(segmentation)}"
        )
    instances, classes = _instance_map(segmentation, num_classes, connectivity, ignore_index)
    flat = instances.ravel().astype(np.int64)  # bincount wants intp; one cast, not two
    sums = np.bincount(flat, weights=entropy.ravel().astype(np.float64), minlength=len(classes))
    counts = np.bincount(flat, minlength=len(classes))
    means = (sums / np.maximum(counts, 1)).astype(np.float32)
    means[0] = 0.0  # ignored pixels
    return np.take(means, instances)


def instance_uncertainty_batch(
    segmentation: torch.Tensor,
    entropy: torch.Tensor,
    num_classes: int,
    connectivity: int = 8,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Batched :func:`instance_uncertainty` for ``(B, H, W)`` tensors (online training calls it
    every step). Returns a float32 ``(B, H, W)`` tensor on ``entropy``'s device, no gradient."""
    if segmentation.shape != entropy.shape or segmentation.ndim != 3:
        raise ValueError(
            f"segmentation and entropy must both be (B, H, W), got {tuple(segmentation.shape)} "
            f"and {tuple(entropy.shape)}"
        )
    seg = segmentation.detach()
    if seg.dtype != torch.uint8 and seg.numel() and 0 <= int(seg.min()) and int(seg.max()) <= 255:
        seg = seg.to(torch.uint8)  # argmax maps are int64; uint8 takes the fast cv2 paths
    seg = seg.cpu().numpy()
    ent = entropy.detach().float().cpu().numpy()
    maps = [instance_uncertainty(s, e, num_classes, connectivity, ignore_index) for s, e in zip(seg, ent)]
    return torch.from_numpy(np.stack(maps)).to(entropy.device)
