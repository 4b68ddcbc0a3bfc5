"""Slow, independent reference implementations the tests compare iumask against (one definition
each, shared by the test files). Nothing here imports iumask.

They deliberately use other algorithms than the implementation:
- connected components: a pure-Python BFS flood fill (downsampled maps), a vectorised union-find
  with pointer jumping (full resolution), and per-class ``cv2.connectedComponents`` on the whole
  image with one boolean mask per component (no tiling);
- instance uncertainty: the mean entropy over each BFS component (``instance_means``), or with
  ``math.fsum`` (``bfs_instance_uncertainty``);
- entropy: plain numpy on float64 probabilities.
"""

from __future__ import annotations

import math
from collections import deque

import cv2
import numpy as np

# --------------------------------------------------------------------------------------------
# Reference connected components
# --------------------------------------------------------------------------------------------

def _neighbour_offsets(connectivity: int):
    four = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    return four if connectivity == 4 else four + [(-1, -1), (-1, 1), (1, -1), (1, 1)]


def bfs_components(seg: np.ndarray, valid: np.ndarray, connectivity: int):
    """Pure-Python BFS flood fill. Returns (labels with -1 on invalid pixels, per-component
    class list)."""
    h, w = seg.shape
    s = seg.tolist()
    v = valid.tolist()
    labels = [[-1] * w for _ in range(h)]
    classes = []
    offsets = _neighbour_offsets(connectivity)
    for y0 in range(h):
        for x0 in range(w):
            if not v[y0][x0] or labels[y0][x0] != -1:
                continue
            comp = len(classes)
            cls = s[y0][x0]
            classes.append(cls)
            labels[y0][x0] = comp
            queue = deque([(y0, x0)])
            while queue:
                y, x = queue.popleft()
                for dy, dx in offsets:
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and v[ny][nx] and labels[ny][nx] == -1 and s[ny][nx] == cls:
                        labels[ny][nx] = comp
                        queue.append((ny, nx))
    return np.array(labels, dtype=np.int64), classes


def union_find_components(seg: np.ndarray, valid: np.ndarray, connectivity: int) -> np.ndarray:
    """Vectorised union-find (hook larger root onto smaller, full pointer jumping) over the
    edges between equal-class valid neighbours. Returns labels (a root pixel index) with -1 on
    invalid pixels."""
    h, w = seg.shape
    idx = np.arange(h * w).reshape(h, w)
    offsets = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if connectivity == 8 else [])
    a_parts, b_parts = [], []
    for dy, dx in offsets:
        ys, yd = slice(0, h - dy), slice(dy, h)
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        same = valid[ys, xs] & valid[yd, xd] & (seg[ys, xs] == seg[yd, xd])
        a_parts.append(idx[ys, xs][same])
        b_parts.append(idx[yd, xd][same])
    a, b = np.concatenate(a_parts), np.concatenate(b_parts)
    parent = np.arange(h * w)
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(ra, rb)[differ], np.minimum(ra, rb)[differ])
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    labels = parent.reshape(h, w).copy()
    labels[~valid] = -1
    return labels


def component_means(labels: np.ndarray, entropy: np.ndarray) -> np.ndarray:
    """Per-pixel mean of ``entropy`` over its component (labels < 0 -> 0), float64."""
    out = np.zeros(labels.shape, dtype=np.float64)
    valid = labels >= 0
    uniq, inverse = np.unique(labels[valid], return_inverse=True)
    sums = np.zeros(len(uniq))
    counts = np.zeros(len(uniq))
    np.add.at(sums, inverse, entropy[valid].astype(np.float64))
    np.add.at(counts, inverse, 1)
    out[valid] = (sums / counts)[inverse]
    return out


def bfs_instance_uncertainty(seg, entropy, valid, connectivity):
    """Flood fill + per-component mean with math.fsum."""
    labels, classes = bfs_components(seg, valid, connectivity)
    values = {}
    flat_l, flat_e = labels.ravel().tolist(), entropy.astype(np.float64).ravel().tolist()
    for lab, e in zip(flat_l, flat_e):
        if lab >= 0:
            values.setdefault(lab, []).append(e)
    means = {lab: math.fsum(v) / len(v) for lab, v in values.items()}
    out = np.array([means[lab] if lab >= 0 else 0.0 for lab in flat_l]).reshape(seg.shape)
    return out, labels, classes


def cv2_fullres_instance_uncertainty(seg, entropy, num_classes, connectivity, ignore_index):
    """Per class cv2.connectedComponents on the whole image, one boolean mask per component."""
    out = np.zeros(seg.shape, dtype=np.float64)
    counts = np.zeros(num_classes, dtype=np.int64)
    for cls in range(num_classes):
        if cls == ignore_index:
            continue
        mask = (seg == cls).astype(np.uint8)
        n, lab = cv2.connectedComponents(mask, connectivity=connectivity)
        counts[cls] = n - 1
        for k in range(1, n):
            comp = lab == k
            out[comp] = entropy[comp].astype(np.float64).mean()
    return out, counts


def same_partition(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> bool:
    """Two labelings define the same partition of the valid pixels."""
    la, lb = a[valid].astype(np.int64), b[valid].astype(np.int64)
    pairs = np.unique(np.stack([la, lb], axis=1), axis=0)
    return len(pairs) == len(np.unique(la)) == len(np.unique(lb))



def instance_means(seg: np.ndarray, entropy: np.ndarray, connectivity: int, ignore: int) -> np.ndarray:
    """Each valid pixel: mean entropy (float64) over its connected component of one class (BFS);
    0 on ignored pixels."""
    labels, _ = bfs_components(seg, seg != ignore, connectivity)
    return component_means(labels, entropy)


# --------------------------------------------------------------------------------------------
# Reference entropy
# --------------------------------------------------------------------------------------------

def entropy_np(probs: np.ndarray) -> np.ndarray:
    """Entropy over axis 1 of (B, C, H, W) probabilities, in float64 (0 · log 0 = 0)."""
    p = probs.astype(np.float64)
    return -(p * np.log(np.maximum(p, 1e-12))).sum(axis=1)
