"""Instances and instance uncertainty (docs/method.md §3).

An instance is a connected component of the pixels of one class. The instance uncertainty (IU) of
a pixel is the mean pixel uncertainty over its instance (paper eq. 7).

Why not the straightforward way: ``cv2.connectedComponents`` on the full-size mask of every class
and then one boolean mask per component costs ~19 full-size passes plus one per instance, about a
second for a 1024x2048 Cityscapes-like frame. Here ~22 ms (25 ms with 4-connectivity) on one
core, ~38x faster (benchmarks/bench_instance_uncertainty.py):

1. *Tile presence.* The image is cut into ``_TILE`` x ``_TILE`` tiles and we record which codes
   (classes, ignore, invalid) each tile holds: a LUT maps each label to one bit and the bits are
   OR-ed per tile (a ``bincount`` over (tile, code) keys costs 4x more).
2. *Cluster boxes.* Per class, the tiles holding it form clusters (8-connected on the tile grid).
   A component can't leave its cluster of touching tiles, so the bounding box of a cluster holds
   whole components of that class; boxes of one class that overlap are merged, so that every
   component lies in exactly one box.
3. *Labelling.* Per box: a ``compare`` mask and ``connectedComponents`` on the box only, then one
   masked ``add`` writes the labels, shifted past the instances numbered so far, into the
   instance map. Small classes cost little: the boxes add up to ~2.7x the image, not 19x.
4. *Means.* Per-instance sums and counts come from two ``bincount`` calls over the instance map.
   An instance is a long run of one id, and counting a run is a chain of dependent
   read-add-writes on one counter (latency-bound); giving each of ``_LANES`` neighbouring columns
   its own counters makes the chains independent and halves the time. A gather spreads the
   means over the pixels.

Memory traffic and allocation matter as much as the arithmetic at this speed: full-size
temporaries are handled in cache-sized bands of rows, work buffers are reused between calls
(:class:`_Scratch`), and instance_uncertainty's instance map is uint16 whenever the instances fit.

Results equal the straightforward way up to float32 rounding of the mean (sums are float64).
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Callable

import cv2
import numpy as np
import torch

# Tile side. Smaller tiles fit the boxes tighter (less area to label) but give more, smaller
# boxes (more per-call overhead) and a bigger tile grid to cluster. On Cityscapes-like frames
# 6 was slower and 8 to 16 about equal; 8 labels the least area.
_TILE = 8
# Independent counter copies per instance for the bincounts (see the module docstring).
_LANES = 8
# Up to this many codes, tile presence is a bitmask per tile (int32, one bit per code).
_MAX_BITMASK_CODES = 31
# Pixels per band of rows for the passes that would otherwise make full-size temporaries (in
# bands they stay in cache); the best sizes measured on 1024x2048 frames.
_PRESENCE_BAND_PIXELS = 1 << 18
_BAND_PIXELS = 1 << 16


class _Scratch(threading.local):
    """Per-thread work buffers kept between calls. A fresh full-size array costs a page fault
    per 4 KiB on first touch (~3 us each measured here: ~10 ms per 1024x2048 frame, a third of
    the time), so the per-box masks and labels, and the instance map that instance_uncertainty
    discards, reuse memory instead: at most ~5 bytes per pixel of the largest frame seen."""

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A C-contiguous array of ``shape`` and ``dtype``, contents undefined."""
        size = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.size < size or buffer.dtype != dtype:
            buffer = self.buffers[name] = np.empty(size, dtype=dtype)
        return buffer[:size].reshape(shape)


_scratch = _Scratch()


def _check_connectivity(connectivity: int) -> None:
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")


def _to_codes(segmentation, num_classes: int, ignore_index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Return ``(values, code_of_value)``. ``values`` is a map in which the pixels of class c hold
    c and all others a value >= C; ``code_of_value`` (for uint8 maps) maps every value to its
    code: ``0..C-1`` for classes, ``C`` for ignored pixels and ``C + 1`` for invalid labels (reported
    by the caller). int32 values (more than 254 classes) are already codes (table ``None``)."""
    seg = np.asarray(segmentation)
    if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(f"segmentation must be a 2-D integer array, got {seg.dtype} {seg.shape}")
    small = num_classes + 1 <= 255
    if seg.dtype == np.uint8 and small:
        table = np.full(256, num_classes + 1, dtype=np.uint8)
        table[:num_classes] = np.arange(num_classes)
        if 0 <= ignore_index <= 255:
            table[ignore_index] = num_classes
        if not 0 <= ignore_index < num_classes:
            return seg, table  # class pixels already hold their class: no pass over the image
        return cv2.LUT(seg, table), np.arange(256, dtype=np.uint8)
    codes = np.full(seg.shape, num_classes + 1, dtype=np.uint8 if small else np.int32)
    np.copyto(codes, seg, casting="unsafe", where=(seg >= 0) & (seg < num_classes))
    codes[seg == ignore_index] = num_classes
    return codes, (np.arange(256, dtype=np.uint8) if small else None)


def _raise_bad_values(segmentation, num_classes: int, ignore_index: int) -> None:
    values = np.unique(np.asarray(segmentation))
    bad = values[(values < 0) | ((values >= num_classes) & (values != ignore_index))]
    raise ValueError(
        f"label values {bad[:5].tolist()} are outside 0..{num_classes - 1} and are not the "
        f"ignore label {ignore_index}"
    )


# --------------------------------------------------------------------------------------------
# 1. tile presence


class _TilePresence:
    """Which codes each ``_TILE`` x ``_TILE`` tile holds."""

    def __init__(self, values: np.ndarray, code_of_value: np.ndarray | None, bins: int) -> None:
        if code_of_value is not None and bins <= _MAX_BITMASK_CODES:
            # One int32 per tile, bit k set where the tile holds code k.
            self._bits = _tile_bits(values, 1 << code_of_value.astype(np.int32))
            self._held = int(np.bitwise_or.reduce(self._bits, axis=None))
        else:
            # Many classes: a (tiles_y, tiles_x, bins) bool array from a bincount of
            # (tile, code) pairs (4x slower, but it's only for more than 29 classes).
            codes = values if code_of_value is None else cv2.LUT(values, code_of_value)
            height, width = codes.shape
            tiles_y, tiles_x = -(-height // _TILE), -(-width // _TILE)
            keys = _tile_numbers(height, width) * bins + codes
            self._table = (np.bincount(keys.ravel(), minlength=tiles_y * tiles_x * bins) > 0
                           ).reshape(tiles_y, tiles_x, bins)
            self._bits = None

    def holds(self, code: int) -> bool:
        """Whether any tile holds ``code``."""
        if self._bits is not None:
            return bool(self._held >> code & 1)
        return bool(self._table[:, :, code].any())

    def grid(self, code: int) -> np.ndarray:
        """uint8 tile map: 1 where the tile holds ``code``."""
        if self._bits is not None:
            return ((self._bits >> code) & 1).astype(np.uint8)
        return self._table[:, :, code].astype(np.uint8)


def _tile_bits(values: np.ndarray, bit_of_value: np.ndarray) -> np.ndarray:
    """``(tiles_y, tiles_x)`` int32: the OR over each tile of ``bit_of_value[values]``."""
    height, width = values.shape
    tiles_y, tiles_x = -(-height // _TILE), -(-width // _TILE)
    tiles = np.empty((tiles_y, tiles_x), dtype=np.int32)
    # Bands of whole tile rows, small enough for the per-pixel bits to stay in cache. The bits
    # buffer is zero-padded to whole tiles at the right and bottom edges (0 = no code).
    band = _TILE * max(1, _PRESENCE_BAND_PIXELS // (_TILE * _TILE * max(tiles_x, 1)))
    bits = np.zeros((band, tiles_x * _TILE), dtype=np.int32)
    rows = np.empty((band // _TILE, tiles_x * _TILE), dtype=np.int32)
    for y0 in range(0, height, band):
        n = min(band, height - y0)
        n_tiles = -(-n // _TILE)
        cv2.LUT(values[y0:y0 + n], bit_of_value, dst=bits[:n, :width])
        bits[n:n_tiles * _TILE] = 0
        # OR the _TILE rows of each tile row, then the _TILE columns of each tile: strided views
        # make a few large numpy ops (a reduction over a short axis is ~4x slower).
        acc = rows[:n_tiles]
        np.copyto(acc, bits[0:n_tiles * _TILE:_TILE])
        for i in range(1, _TILE):
            np.bitwise_or(acc, bits[i:n_tiles * _TILE:_TILE], out=acc)
        out = tiles[y0 // _TILE:y0 // _TILE + n_tiles]
        np.copyto(out, acc[:, 0::_TILE])
        for i in range(1, _TILE):
            np.bitwise_or(out, acc[:, i::_TILE], out=out)
    return tiles


@functools.lru_cache(maxsize=2)
def _tile_numbers(height: int, width: int) -> np.ndarray:
    """Per pixel, the number of its tile (row-major), int64 for ``bincount``."""
    tiles_x = -(-width // _TILE)
    index = (np.arange(height) // _TILE)[:, None] * tiles_x + (np.arange(width) // _TILE)[None, :]
    index.setflags(write=False)
    return index


# --------------------------------------------------------------------------------------------
# 2. cluster boxes


def _cluster_boxes(presence: _TilePresence, num_classes: int, height: int, width: int) -> np.ndarray:
    """``(n, 5)`` int array of ``(class, y0, y1, x0, x1)`` pixel boxes, disjoint within a class,
    each holding whole components of its class and every component in exactly one box."""
    boxes = [np.zeros((0, 5), dtype=np.int32)]
    for cls in range(num_classes):
        if not presence.holds(cls):
            continue
        # Grana's algorithm: its statistics pass is ~2x faster than the default's here.
        _, _, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(
            presence.grid(cls), 8, cv2.CV_32S, cv2.CCL_GRANA)
        x, y, w, h = stats[1:, :4].T
        boxes.append(_merge_overlapping(np.stack([np.full_like(x, cls), y, y + h, x, x + w], axis=1)))
    boxes = np.concatenate(boxes)
    boxes[:, 1:] *= _TILE  # tiles to pixels, clipped to the image
    np.minimum(boxes[:, 1:3], height, out=boxes[:, 1:3])
    np.minimum(boxes[:, 3:5], width, out=boxes[:, 3:5])
    return boxes


def _merge_overlapping(boxes: np.ndarray) -> np.ndarray:
    """Merge ``(class, y0, y1, x0, x1)`` boxes of one class until none overlap: every group of
    boxes connected by overlaps becomes its bounding box, repeated since those can overlap."""
    while len(boxes) > 1:
        _, y0, y1, x0, x1 = boxes.T
        overlap = (y0[:, None] < y1) & (y0 < y1[:, None]) & (x0[:, None] < x1) & (x0 < x1[:, None])
        if np.count_nonzero(overlap) == len(boxes):  # each box overlaps only itself
            break
        # Each box's group: propagate the smallest box number through overlaps until stable.
        group = np.arange(len(boxes))
        while True:
            smallest = np.where(overlap, group, len(boxes)).min(axis=1)
            if np.array_equal(smallest, group):
                break
            group = smallest
        order = np.argsort(group, kind="stable")
        starts = np.flatnonzero(np.diff(group[order], prepend=-1))
        b = boxes[order]
        boxes = np.stack([
            b[starts, 0],
            np.minimum.reduceat(b[:, 1], starts), np.maximum.reduceat(b[:, 2], starts),
            np.minimum.reduceat(b[:, 3], starts), np.maximum.reduceat(b[:, 4], starts),
        ], axis=1)
    return boxes


# --------------------------------------------------------------------------------------------
# 3. labelling


class _TooManyInstances(Exception):
    """The instance map's dtype (uint16) can't number all instances."""


def _label_boxes(values: np.ndarray, boxes: np.ndarray, connectivity: int, instances: np.ndarray):
    """Label every box's components into ``instances``, a zeroed int32 or uint16 map (it gets
    1..N on the N instances), and return the number of instances per box. Raises
    ``_TooManyInstances`` when a uint16 map can't hold them."""
    ltype, limit = (cv2.CV_16U, 0xFFFF) if instances.dtype == np.uint16 else (cv2.CV_32S, 2**31 - 1)
    # Most boxes are small and their cost is the calls, not the pixels: the loop is lean.
    areas = (boxes[:, 2] - boxes[:, 1]).astype(np.int64) * (boxes[:, 4] - boxes[:, 3])
    largest = int(areas.max()) if len(boxes) else 0
    mask_buffer = _scratch.get("mask", (largest,), np.uint8)
    labels_buffer = _scratch.get(f"labels_{instances.dtype}", (largest,), instances.dtype)
    per_box = []
    last = 0  # instances numbered so far
    for cls, y0, y1, x0, x1 in boxes.tolist():
        h, w = y1 - y0, x1 - x0
        box = values[y0:y1, x0:x1]
        region = instances[y0:y1, x0:x1]
        if w > 1:
            mask = cv2.compare(box, cls, cv2.CMP_EQ, mask_buffer[:h * w].reshape(h, w))
            labels = labels_buffer[:h * w].reshape(h, w)
            try:
                count, _ = cv2.connectedComponents(mask, labels, connectivity, ltype)
            except cv2.error as error:  # more provisional labels than uint16 holds
                raise _TooManyInstances from error
            if last + count - 1 > limit:
                raise _TooManyInstances
            # Only where the mask is set: other classes' instances share the box.
            cv2.add(labels, last, region, mask)
        else:
            # cv2's Python bindings take an (n <= 4, 1) array for a scalar: numpy does these.
            mask = box == cls
            count, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=connectivity,
                                                    ltype=cv2.CV_32S)
            if last + count - 1 > limit:
                raise _TooManyInstances
            region[mask] = labels[mask] + last
        per_box.append(count - 1)
        last += count - 1
    return np.array(per_box, dtype=np.int64)


def _instance_map(segmentation, num_classes: int, connectivity: int, ignore_index: int,
                  work_buffer: bool = False):
    """Return ``(instances, classes)``: a map with 0 on ignored pixels and 1..N on the N
    instances, and each instance's class (``classes[0] = -1``). The map is a new int32 array,
    or with ``work_buffer`` a reused one (see _Scratch), uint16 while the instances fit: that
    halves the memory traffic of labelling, means and take, ~20% of the time."""
    _check_connectivity(connectivity)
    values, code_of_value = _to_codes(segmentation, num_classes, ignore_index)
    height, width = values.shape
    presence = _TilePresence(values, code_of_value, num_classes + 2)
    if presence.holds(num_classes + 1):
        _raise_bad_values(segmentation, num_classes, ignore_index)
    boxes = _cluster_boxes(presence, num_classes, height, width)
    if not work_buffer:
        return _labelled(values, boxes, connectivity, np.empty((height, width), dtype=np.int32))
    try:
        instances = _scratch.get("instances_uint16", (height, width), np.uint16)
        return _labelled(values, boxes, connectivity, instances)
    except _TooManyInstances:
        instances = _scratch.get("instances_int32", (height, width), np.int32)
        return _labelled(values, boxes, connectivity, instances)


def _labelled(values: np.ndarray, boxes: np.ndarray, connectivity: int, instances: np.ndarray):
    """Zero ``instances``, label the boxes into it and return ``(instances, classes)``."""
    instances.fill(0)
    per_box = _label_boxes(values, boxes, connectivity, instances)
    return instances, _instance_classes(boxes, per_box)


def _instance_classes(boxes: np.ndarray, per_box: np.ndarray) -> np.ndarray:
    """Each instance's class (``-1`` first, for the ignored pixels)."""
    return np.concatenate([[-1], np.repeat(boxes[:, 0], per_box)]).astype(np.int64)


# --------------------------------------------------------------------------------------------
# 4. means


def _instance_means(instances: np.ndarray, entropy: np.ndarray, count: int) -> np.ndarray:
    """float32 mean entropy of instances ``0..count-1`` (0 for instance 0, the ignored pixels)."""
    height, width = instances.shape
    # Lanes pay off for long runs of one id; with very many instances they would only cost
    # memory (and keys must fit int32).
    lanes = _LANES if _LANES * count <= max(instances.size // 16, 1) else 1
    # torch.bincount takes int16 or int32 keys as they are (numpy's casts them to int64 first);
    # int16 keys, when they fit, make both bincounts ~25% faster.
    if instances.dtype == np.uint16 and lanes * count <= 1 << 15:
        ids, key_dtype = instances.view(np.int16), np.int16
    else:
        ids, key_dtype = instances, np.int32
    lane_offsets = ((np.arange(width) % lanes) * count).astype(key_dtype)  # key = id + offset
    sums = np.zeros(lanes * count, dtype=np.float64)
    counts = np.zeros(lanes * count, dtype=np.int64)
    # Bands of rows, so that keys and float64 weights stay in cache.
    band = max(1, _BAND_PIXELS // max(width, 1))
    for y0 in range(0, height, band):
        keys = torch.from_numpy((ids[y0:y0 + band] + lane_offsets).reshape(-1))
        weights = torch.from_numpy(entropy[y0:y0 + band].astype(np.float64).reshape(-1))
        sums += torch.bincount(keys, weights, minlength=lanes * count).numpy()
        counts += torch.bincount(keys, minlength=lanes * count).numpy()
    sums = sums.reshape(lanes, count).sum(axis=0)
    counts = counts.reshape(lanes, count).sum(axis=0)
    means = (sums / np.maximum(counts, 1)).astype(np.float32)
    means[0] = 0.0  # ignored pixels
    return means


def _gather(means: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """``means[instances]``: torch.index_select takes int32 indices (np.take casts them to
    intp first, 1.5x slower); in bands, so the int32 copy of the uint16 map stays in cache."""
    out = np.empty(instances.shape, dtype=means.dtype)
    table, flat = torch.from_numpy(means), torch.from_numpy(out).view(-1)
    height, width = instances.shape
    band = max(1, _BAND_PIXELS // max(width, 1))
    for y0 in range(0, height, band):
        index = torch.from_numpy(instances[y0:y0 + band].astype(np.int32, copy=False).reshape(-1))
        torch.index_select(table, 0, index, out=flat[y0 * width:y0 * width + index.numel()])
    return out


# --------------------------------------------------------------------------------------------
# public API


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
    # The instance map is a work buffer here; label_instances returns a new one.
    instances, classes = _instance_map(segmentation, num_classes, connectivity, ignore_index,
                                       work_buffer=True)
    means = _instance_means(instances, entropy, len(classes))
    return _gather(means, instances)


def instance_uncertainty_batch(
    segmentation: torch.Tensor,
    entropy: torch.Tensor,
    num_classes: int,
    connectivity: int = 8,
    ignore_index: int = 255,
    map_fn: Callable = map,
) -> torch.Tensor:
    """Batched :func:`instance_uncertainty` for ``(B, H, W)`` tensors (online training calls it
    every step). Returns a float32 ``(B, H, W)`` tensor on ``entropy``'s device, no gradient.
    ``map_fn`` maps the per-image function over the images: e.g. a thread pool's ``map`` to do the
    images in parallel (OpenCV and numpy release the GIL); the result is the same."""
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
    maps = list(map_fn(lambda s, e: instance_uncertainty(s, e, num_classes, connectivity, ignore_index), seg, ent))
    return torch.from_numpy(np.stack(maps)).to(entropy.device)
