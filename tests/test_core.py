"""The numerical core (iumask/core) against independent, slower reference implementations.

Real data: CamVid label maps (SegNet 11-class version, 360x480, 11 = void). They are looked up at
``<repo>/../shared/data/camvid`` or at ``$IUMASK_CAMVID``; the tests that need them are skipped
when they are absent. Generated label maps cover the edge cases (tile boundaries, nesting,
diagonal contacts, dtypes, errors).

The references deliberately use other algorithms than the implementation:
- connected components: a pure-Python BFS flood fill (downsampled maps), a vectorised union-find
  with pointer jumping (full resolution), and per-class ``cv2.connectedComponents`` on the whole
  image with one boolean mask per component (no tiling);
- entropy, cross-entropy: per-pixel loops with ``math.log`` / a hand-written log-softmax;
- metrics: per-class set counting and explicit loops over patches.
"""

from __future__ import annotations

import math
import os
from collections import deque
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import iumask

CAMVID_CLASSES = 11
CAMVID_VOID = 11


# --------------------------------------------------------------------------------------------
# CamVid
# --------------------------------------------------------------------------------------------

def camvid_root() -> Path:
    env = os.environ.get("IUMASK_CAMVID")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camvid"


@lru_cache(maxsize=None)
def _camvid_labels(count: int) -> tuple[np.ndarray, ...]:
    folder = camvid_root() / "trainannot"
    files = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if len(files) < count:
        return ()
    picks = np.linspace(0, len(files) - 1, count).round().astype(int)  # spread over sequences
    labels = []
    for i in picks:
        label = cv2.imread(str(files[i]), cv2.IMREAD_UNCHANGED)
        assert label is not None and label.dtype == np.uint8 and label.ndim == 2, files[i]
        assert label.max() <= CAMVID_VOID
        labels.append(label)
    return tuple(labels)


def camvid_labels(count: int = 5) -> list[np.ndarray]:
    labels = _camvid_labels(count)
    if not labels:
        pytest.skip(
            f"CamVid labels not found under {camvid_root() / 'trainannot'} "
            "(set IUMASK_CAMVID to the camvid folder holding trainannot/)"
        )
    return [label.copy() for label in labels]


def downsample(label: np.ndarray, height: int, width: int) -> np.ndarray:
    return cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)


def perturb_to_prediction(label: np.ndarray, rng: np.random.Generator, num_classes: int = 11) -> np.ndarray:
    """A plausible 'prediction' from a ground-truth map: shifted, with wrong-class rectangles,
    salt noise, and no void (void pixels get random classes)."""
    h, w = label.shape
    pred = np.roll(label, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), axis=(0, 1)).copy()
    for _ in range(12):
        rh, rw = int(rng.integers(2, h // 6)), int(rng.integers(2, w // 6))
        y, x = int(rng.integers(0, h - rh)), int(rng.integers(0, w - rw))
        pred[y:y + rh, x:x + rw] = rng.integers(0, num_classes)
    noise = rng.random(label.shape) < 0.01
    pred[noise] = rng.integers(0, num_classes, int(noise.sum()))
    void = pred >= num_classes
    pred[void] = rng.integers(0, num_classes, int(void.sum()))
    return pred.astype(np.uint8)


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


def random_entropy(shape, rng, num_classes=11):
    return (rng.random(shape) * math.log(num_classes)).astype(np.float32)


def check_iu_against_references(seg, entropy, num_classes, ignore_index, connectivity, bfs=True):
    """Compare instance_uncertainty / label_instances with the union-find reference (always),
    the BFS reference (when ``bfs``) and the per-class cv2 reference."""
    valid = (seg != ignore_index)
    iu = iumask.instance_uncertainty(seg, entropy, num_classes, connectivity=connectivity,
                                     ignore_index=ignore_index)
    assert iu.shape == seg.shape and iu.dtype == np.float32
    instances, inst_class = iumask.label_instances(seg, num_classes, connectivity=connectivity,
                                                   ignore_index=ignore_index)

    uf = union_find_components(seg, valid, connectivity)
    np.testing.assert_allclose(iu, component_means(uf, entropy), rtol=1e-5, atol=1e-6)
    assert same_partition(instances, uf, valid)
    assert np.all(iu[~valid] == 0)
    assert np.all(instances[~valid] == 0)
    n = len(inst_class) - 1
    assert inst_class[0] == -1
    assert sorted(np.unique(instances[valid]).tolist()) == list(range(1, n + 1))
    assert np.array_equal(inst_class[instances[valid]], seg[valid].astype(np.int64))
    ref_count = len(np.unique(uf[valid]))
    assert n == ref_count

    ref_cv2, per_class = cv2_fullres_instance_uncertainty(seg, entropy, num_classes, connectivity,
                                                          ignore_index)
    np.testing.assert_allclose(iu, ref_cv2, rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.bincount(inst_class[1:], minlength=num_classes), per_class)

    if bfs:
        ref_bfs, bfs_labels, bfs_classes = bfs_instance_uncertainty(seg, entropy, valid, connectivity)
        np.testing.assert_allclose(iu, ref_bfs, rtol=1e-5, atol=1e-6)
        assert same_partition(instances, bfs_labels, valid)
        assert np.array_equal(np.bincount(inst_class[1:], minlength=num_classes),
                              np.bincount(np.array(bfs_classes, dtype=np.int64), minlength=num_classes))
    # constant within every instance
    for k in np.unique(instances[valid])[:200]:
        vals = iu[instances == k]
        assert vals.min() == vals.max()
    return iu, instances, inst_class


# --------------------------------------------------------------------------------------------
# 1. pixel_entropy
# --------------------------------------------------------------------------------------------

def _entropy_loop(probs: np.ndarray) -> np.ndarray:
    b, c, h, w = probs.shape
    out = np.zeros((b, h, w))
    for i in range(b):
        for y in range(h):
            for x in range(w):
                out[i, y, x] = -sum(p * math.log(p) for p in probs[i, :, y, x].tolist() if p > 0)
    return out


def _softmax_loop(logits: np.ndarray) -> np.ndarray:
    probs = np.zeros_like(logits, dtype=np.float64)
    b, c, h, w = logits.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                z = logits[i, :, y, x].tolist()
                m = max(z)
                e = [math.exp(v - m) for v in z]
                s = sum(e)
                probs[i, :, y, x] = [v / s for v in e]
    return probs


def test_pixel_entropy_matches_loop_numpy_and_torch():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(2, 11, 9, 13))
    probs = _softmax_loop(logits)
    ref = _entropy_loop(probs)

    ent_np = iumask.pixel_entropy(probs)
    assert isinstance(ent_np, np.ndarray) and ent_np.shape == (2, 9, 13)
    np.testing.assert_allclose(ent_np, ref, rtol=1e-10, atol=1e-12)

    probs_t = torch.from_numpy(probs)
    ent_t = iumask.pixel_entropy(probs_t)
    assert isinstance(ent_t, torch.Tensor) and ent_t.dtype == torch.float64
    np.testing.assert_allclose(ent_t.numpy(), ref, rtol=1e-10, atol=1e-12)

    # float32 in, float32 out, both kinds agree
    ent32_np = iumask.pixel_entropy(probs.astype(np.float32))
    ent32_t = iumask.pixel_entropy(probs_t.float())
    assert ent32_np.dtype == np.float32 and ent32_t.dtype == torch.float32
    np.testing.assert_allclose(ent32_np, ent32_t.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ent32_np, ref, rtol=1e-5, atol=1e-5)

    # torch softmax of the same logits gives the same entropy
    ent_sm = iumask.pixel_entropy(torch.softmax(torch.from_numpy(logits), dim=1))
    np.testing.assert_allclose(ent_sm.numpy(), ref, rtol=1e-9, atol=1e-12)

    # normalize divides by ln C
    norm = iumask.pixel_entropy(probs, normalize=True)
    np.testing.assert_allclose(norm, ref / math.log(11), rtol=1e-10)
    assert norm.max() <= 1.0 and ref.max() > 1.0  # the normalised range is [0, 1]


def test_pixel_entropy_special_distributions():
    c = 7
    onehot = np.zeros((1, c, 3, 4))
    onehot[0, 2] = 1.0
    for probs in (onehot, torch.from_numpy(onehot)):
        ent = iumask.pixel_entropy(probs)
        assert not np.isnan(np.asarray(ent)).any()
        assert np.all(np.asarray(ent) == 0)

    uniform = np.full((2, c, 3, 4), 1.0 / c)
    for probs in (uniform, torch.from_numpy(uniform)):
        np.testing.assert_allclose(np.asarray(iumask.pixel_entropy(probs)), math.log(c), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(iumask.pixel_entropy(probs, normalize=True)), 1.0, rtol=1e-12)

    # exact zeros among non-trivial probabilities: no NaN, zeros contribute nothing
    probs = np.zeros((1, c, 1, 2))
    probs[0, :2, 0, 0] = 0.5
    probs[0, [1, 3, 5], 0, 1] = [0.2, 0.3, 0.5]
    for p in (probs, torch.from_numpy(probs), probs.astype(np.float32), torch.from_numpy(probs).float()):
        ent = np.asarray(iumask.pixel_entropy(p), dtype=np.float64)
        assert not np.isnan(ent).any()
        np.testing.assert_allclose(ent[0, 0, 0], math.log(2), rtol=1e-6)
        np.testing.assert_allclose(ent[0, 0, 1], -sum(q * math.log(q) for q in (0.2, 0.3, 0.5)), rtol=1e-6)

    # gradient through torch entropy is finite even with zeros
    t = torch.from_numpy(probs).requires_grad_(True)
    iumask.pixel_entropy(t).sum().backward()
    assert torch.isfinite(t.grad).all()

    with pytest.raises(ValueError):
        iumask.pixel_entropy(np.full((c, 3, 4), 1.0 / c))


def test_mean_softmax_is_equal_weight_average():
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 5, 4, 6, generator=gen) * 2 for _ in range(3)]
    ref = sum(torch.softmax(x, 1) for x in logits) / 3
    out = iumask.mean_softmax(logits)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(out.sum(1), torch.ones(2, 4, 6), atol=1e-6)


# --------------------------------------------------------------------------------------------
# 2. instance uncertainty on CamVid
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("connectivity", [4, 8])
def test_instance_uncertainty_camvid_ground_truth(connectivity):
    rng = np.random.default_rng(10 + connectivity)
    for label in camvid_labels():
        assert (label == CAMVID_VOID).any()  # the ignore path is exercised
        entropy = random_entropy(label.shape, rng)
        # full resolution: union-find + per-class cv2
        check_iu_against_references(label, entropy, CAMVID_CLASSES, CAMVID_VOID, connectivity, bfs=False)
        # downsampled: also the pure-Python BFS
        small = downsample(label, 90, 120)
        check_iu_against_references(small, random_entropy(small.shape, rng), CAMVID_CLASSES,
                                    CAMVID_VOID, connectivity, bfs=True)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_instance_uncertainty_camvid_predictions(connectivity):
    rng = np.random.default_rng(20 + connectivity)
    for label in camvid_labels():
        pred = perturb_to_prediction(label, rng)
        entropy = random_entropy(pred.shape, rng)
        iu, instances, _ = check_iu_against_references(pred, entropy, CAMVID_CLASSES, 255,
                                                       connectivity, bfs=False)
        assert np.all(instances > 0)  # a prediction has no ignored pixels
        small = downsample(pred, 90, 120)
        check_iu_against_references(small, random_entropy(small.shape, rng), CAMVID_CLASSES, 255,
                                    connectivity, bfs=True)


def test_camvid_connectivity_changes_instance_count():
    label = camvid_labels()[0]
    n4 = len(iumask.label_instances(label, CAMVID_CLASSES, 4, CAMVID_VOID)[1]) - 1
    n8 = len(iumask.label_instances(label, CAMVID_CLASSES, 8, CAMVID_VOID)[1]) - 1
    assert n4 > n8 > 0


def test_instance_uncertainty_batch_camvid():
    labels = camvid_labels()[:3]
    rng = np.random.default_rng(3)
    seg = torch.from_numpy(np.stack(labels).astype(np.int64))
    ent = torch.from_numpy(np.stack([random_entropy(l.shape, rng) for l in labels]).astype(np.float64))
    ent.requires_grad_(True)
    for connectivity in (4, 8):
        out = iumask.instance_uncertainty_batch(seg, ent, CAMVID_CLASSES, connectivity, CAMVID_VOID)
        assert isinstance(out, torch.Tensor)
        assert out.dtype == torch.float32 and out.device == ent.device and out.shape == seg.shape
        assert not out.requires_grad
        for i, label in enumerate(labels):
            single = iumask.instance_uncertainty(label, ent[i].detach().numpy(), CAMVID_CLASSES,
                                                 connectivity, CAMVID_VOID)
            np.testing.assert_allclose(out[i].numpy(), single, rtol=1e-6, atol=1e-7)
            ref, _ = cv2_fullres_instance_uncertainty(label, ent[i].detach().numpy(), CAMVID_CLASSES,
                                                      connectivity, CAMVID_VOID)
            np.testing.assert_allclose(out[i].numpy(), ref, rtol=1e-5, atol=1e-6)
    # values > 255 in an int64 batch (ignore_index 255 and a large class count)
    seg2 = seg.clone()
    seg2[seg2 == CAMVID_VOID] = 255
    seg2[0, :5, :5] = 300
    out = iumask.instance_uncertainty_batch(seg2, ent.detach(), 400, 8, 255)
    single = iumask.instance_uncertainty(seg2[0].numpy(), ent[0].detach().numpy(), 400, 8, 255)
    np.testing.assert_allclose(out[0].numpy(), single, rtol=1e-6)
    with pytest.raises(ValueError):
        iumask.instance_uncertainty_batch(seg[0], ent[0].detach(), CAMVID_CLASSES, 8, CAMVID_VOID)
    with pytest.raises(ValueError):
        iumask.instance_uncertainty_batch(seg, ent[:, :-1].detach(), CAMVID_CLASSES, 8, CAMVID_VOID)


# --------------------------------------------------------------------------------------------
# 2. instance uncertainty: generated edge cases
# --------------------------------------------------------------------------------------------

def test_diagonal_contact_4_vs_8():
    seg = np.array([[1, 0],
                    [0, 1]], dtype=np.uint8)
    ent = np.array([[1.0, 2.0],
                    [4.0, 8.0]], dtype=np.float32)
    iu8 = iumask.instance_uncertainty(seg, ent, 2, connectivity=8)
    iu4 = iumask.instance_uncertainty(seg, ent, 2, connectivity=4)
    np.testing.assert_allclose(iu8, [[4.5, 3.0], [3.0, 4.5]])
    np.testing.assert_allclose(iu4, ent)
    assert len(iumask.label_instances(seg, 2, 8)[1]) - 1 == 2
    assert len(iumask.label_instances(seg, 2, 4)[1]) - 1 == 4
    # default connectivity is 8
    np.testing.assert_array_equal(iumask.instance_uncertainty(seg, ent, 2), iu8)
    with pytest.raises(ValueError):
        iumask.instance_uncertainty(seg, ent, 2, connectivity=6)


@pytest.mark.parametrize("block", [1, 2, 5, 32])
def test_checkerboard(block):
    h, w = 8 * block + 3, 6 * block + 1  # partial blocks at the far edges
    yy, xx = np.indices((h, w))
    seg = (((yy // block) + (xx // block)) % 2).astype(np.uint8)
    rng = np.random.default_rng(block)
    ent = random_entropy(seg.shape, rng)
    # 8-connectivity: blocks of one class touch diagonally and join; the two classes cross at
    # every corner but stay apart: exactly one instance per class
    iu8, inst8, cls8 = check_iu_against_references(seg, ent, 2, 255, 8, bfs=True)
    assert len(cls8) - 1 == 2
    for c in (0, 1):
        np.testing.assert_allclose(iu8[seg == c], ent[seg == c].astype(np.float64).mean(), rtol=1e-5)
    # 4-connectivity: every block is its own instance
    iu4, inst4, cls4 = check_iu_against_references(seg, ent, 2, 255, 4, bfs=True)
    n_blocks = (-(-h // block)) * (-(-w // block))
    assert len(cls4) - 1 == n_blocks


def test_single_class_and_all_ignore():
    rng = np.random.default_rng(5)
    seg = np.full((70, 101), 3, dtype=np.uint8)
    ent = random_entropy(seg.shape, rng)
    for conn in (4, 8):
        iu = iumask.instance_uncertainty(seg, ent, 5, conn)
        np.testing.assert_allclose(iu, ent.astype(np.float64).mean(), rtol=1e-6)
        inst, cls = iumask.label_instances(seg, 5, conn)
        assert cls.tolist() == [-1, 3] and np.all(inst == 1)

    empty = np.full((70, 101), 255, dtype=np.uint8)
    for conn in (4, 8):
        iu = iumask.instance_uncertainty(empty, ent, 5, conn)
        assert iu.dtype == np.float32 and np.all(iu == 0)
        inst, cls = iumask.label_instances(empty, 5, conn)
        assert cls.tolist() == [-1] and np.all(inst == 0)

    # a single row / column, and tiny images
    for shape in [(1, 77), (77, 1), (1, 2), (2, 1), (2, 2), (3, 5)]:
        s = (np.arange(np.prod(shape)) // 5 % 3).reshape(shape).astype(np.uint8)
        e = random_entropy(shape, rng)
        check_iu_against_references(s, e, 3, 255, 8, bfs=True)
        check_iu_against_references(s, e, 3, 255, 4, bfs=True)


def test_border_components():
    # components that run along every border, in a size that is not a multiple of the tiles
    h, w = 65, 97
    seg = np.zeros((h, w), dtype=np.uint8)
    seg[0, :] = 1          # top row
    seg[:, -1] = 2         # right column (touches class 1 at the corner)
    seg[-1, 1:] = 1        # bottom row, separate from the top row of class 1
    seg[1:-1, 0] = 2       # left column
    seg[-1, 0] = 3         # one corner pixel
    seg[32:34, 32:34] = 1  # a block that straddles four tiles
    seg[31, 31] = 1        # diagonal contact with that block across a tile corner
    rng = np.random.default_rng(7)
    ent = random_entropy(seg.shape, rng)
    for conn in (4, 8):
        check_iu_against_references(seg, ent, 4, 255, conn, bfs=True)
    _, cls8 = iumask.label_instances(seg, 4, 8)
    _, cls4 = iumask.label_instances(seg, 4, 4)
    assert np.bincount(cls8[1:], minlength=4).tolist() == [1, 3, 2, 1]
    assert np.bincount(cls4[1:], minlength=4).tolist() == [1, 4, 2, 1]


@pytest.mark.parametrize("shape", [(33, 33), (513, 513), (1, 1)])
def test_one_pixel_corner_box(shape):
    h, w = shape
    seg = np.zeros(shape, dtype=np.uint8)
    seg[h - 1, w - 1] = 1
    ent = np.full(shape, 0.5, dtype=np.float32)
    ent[h - 1, w - 1] = 2.0
    iu = iumask.instance_uncertainty(seg, ent, 2)
    assert iu[h - 1, w - 1] == 2.0


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16, np.int16])
def test_dtypes_agree_with_uint8(dtype):
    label = downsample(camvid_labels()[1], 180, 240) if _camvid_labels(5) else None
    if label is None:
        rng = np.random.default_rng(0)
        label = rng.integers(0, 12, (180, 240)).astype(np.uint8)
    rng = np.random.default_rng(8)
    ent = random_entropy(label.shape, rng)
    for conn in (4, 8):
        ref = iumask.instance_uncertainty(label, ent, CAMVID_CLASSES, conn, CAMVID_VOID)
        out = iumask.instance_uncertainty(label.astype(dtype), ent, CAMVID_CLASSES, conn, CAMVID_VOID)
        np.testing.assert_array_equal(out, ref)
        inst_ref, cls_ref = iumask.label_instances(label, CAMVID_CLASSES, conn, CAMVID_VOID)
        inst, cls = iumask.label_instances(label.astype(dtype), CAMVID_CLASSES, conn, CAMVID_VOID)
        assert same_partition(inst, inst_ref, label != CAMVID_VOID)
        assert np.array_equal(np.bincount(cls[1:], minlength=11), np.bincount(cls_ref[1:], minlength=11))
    # the same with a torch tensor input and a float64 entropy
    out = iumask.instance_uncertainty(torch.from_numpy(label.astype(np.int64)), ent.astype(np.float64),
                                      CAMVID_CLASSES, 8, CAMVID_VOID)
    np.testing.assert_allclose(out, iumask.instance_uncertainty(label, ent, CAMVID_CLASSES, 8, CAMVID_VOID),
                               rtol=1e-6)


def test_bad_inputs_raise():
    ent = np.zeros((10, 12), dtype=np.float32)
    seg = np.zeros((10, 12), dtype=np.uint8)
    bad = seg.copy()
    bad[3, 4] = 12  # neither a class (0..10) nor the ignore label 11
    with pytest.raises(ValueError):
        iumask.instance_uncertainty(bad, ent, 11, ignore_index=11)
    with pytest.raises(ValueError):
        iumask.label_instances(bad, 11, ignore_index=11)
    with pytest.raises(ValueError):
        iumask.instance_uncertainty(bad.astype(np.int64), ent, 11, ignore_index=11)
    neg = seg.astype(np.int32)
    neg[0, 0] = -1
    with pytest.raises(ValueError):
        iumask.instance_uncertainty(neg, ent, 11)
    big = seg.astype(np.int64)
    big[9, 11] = 300
    with pytest.raises(ValueError):
        iumask.instance_uncertainty(big, ent, 11)
    at_c = seg.copy()
    at_c[5, 5] = 11  # == num_classes with ignore_index 255
    with pytest.raises(ValueError):
        iumask.instance_uncertainty(at_c, ent, 11)
    with pytest.raises(ValueError):  # non-2D
        iumask.instance_uncertainty(np.zeros((2, 10, 12), np.uint8), np.zeros((2, 10, 12)), 11)
    with pytest.raises(ValueError):
        iumask.label_instances(np.zeros(12, np.uint8), 11)
    with pytest.raises(ValueError):  # shape mismatch
        iumask.instance_uncertainty(seg, ent[:, :-1], 11)
    with pytest.raises(ValueError):  # non-integer labels
        iumask.instance_uncertainty(seg.astype(np.float32), ent, 11)
    # the same map with the ignore label where the bad value was is fine
    ok = bad.copy()
    ok[3, 4] = 11
    assert iumask.instance_uncertainty(ok, ent, 11, ignore_index=11)[3, 4] == 0


# --- stress the 32x32 tiling -----------------------------------------------------------------

def _snake(h, w, pitch=4):
    """Class 1: a one-pixel boustrophedon path covering the whole image (one component that
    crosses every tile); class 0 in between; a few class-2 pixels sprinkled on class 0."""
    seg = np.zeros((h, w), dtype=np.uint8)
    rows = list(range(0, h, pitch))
    for k, r in enumerate(rows):
        seg[r, :] = 1
        if k + 1 < len(rows):
            col = w - 1 if k % 2 == 0 else 0
            seg[r:rows[k + 1] + 1, col] = 1
    return seg


def _rings(h, w, step=3):
    """Concentric rectangular rings of class 1 (each its own component, every bounding box
    contains all inner rings) on class 0, with class-1 islands in the gaps."""
    seg = np.zeros((h, w), dtype=np.uint8)
    k = 0
    while 2 * k < min(h, w):
        seg[k, k:w - k] = 1
        seg[h - 1 - k, k:w - k] = 1
        seg[k:h - k, k] = 1
        seg[k:h - k, w - 1 - k] = 1
        k += step
    return seg


def _u_shapes(h, w, rng):
    """Large U shapes of class 1 whose boxes hold other class-1 components, nested U's, and
    class-2 blobs."""
    seg = np.zeros((h, w), dtype=np.uint8)
    t = 3
    # outer U spanning the whole image, open at the top
    seg[:, :t] = 1
    seg[:, -t:] = 1
    seg[-t:, :] = 1
    # inner U, upside down, not touching the outer one
    seg[10:10 + t, 10:w - 10] = 1
    seg[10:h - 10, 10:10 + t] = 1
    seg[10:h - 10, w - 10 - t:w - 10] = 1
    # islands of class 1 inside both boxes, some across tile boundaries
    for _ in range(25):
        y, x = int(rng.integers(20, h - 25)), int(rng.integers(20, w - 25))
        seg[y:y + int(rng.integers(1, 5)), x:x + int(rng.integers(1, 5))] = 1
    # class 2 blobs and one-pixel class-2 lines exactly on tile boundaries
    for _ in range(15):
        y, x = int(rng.integers(0, h - 6)), int(rng.integers(0, w - 6))
        seg[y:y + 5, x:x + 5] = 2
    seg[31:33, :] = np.where(seg[31:33, :] == 0, 2, seg[31:33, :])
    seg[:, 63:65] = np.where(seg[:, 63:65] == 0, 3, seg[:, 63:65])
    return seg


def _diagonals(h, w):
    """Class 1 on the main diagonal (through tile corners: (31,31)->(32,32)), class 2 on the
    anti-diagonal crossing it, class 0 elsewhere (joined across the diagonal under 8-conn)."""
    seg = np.zeros((h, w), dtype=np.uint8)
    n = min(h, w)
    i = np.arange(n)
    seg[i, i] = 1
    seg[i, n - 1 - i] = 2
    # a staircase of class 3 touching only at corners, across many tiles
    j = np.arange(0, n - 1, 2)
    seg[j, np.minimum(j + 40, w - 1)] = 3
    return seg


def _blobs(h, w, rng, low, num_classes, salt):
    small = rng.integers(0, num_classes, (low[0], low[1])).astype(np.uint8)
    seg = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    noise = rng.random((h, w)) < salt
    seg[noise] = rng.integers(0, num_classes, int(noise.sum()))
    return seg


@pytest.mark.parametrize("connectivity", [4, 8])
def test_tiling_stress_generated_maps(connectivity):
    rng = np.random.default_rng(100 + connectivity)
    h, w = 257, 389  # not a multiple of 32
    maps = {
        "small blobs": (_blobs(h, w, rng, (90, 130), 6, 0.03), 6),
        "large regions": (_blobs(h, w, rng, (3, 4), 4, 0.0), 4),
        "large + salt": (_blobs(h, w, rng, (5, 7), 4, 0.002), 4),
        "snake": (_snake(h, w), 3),
        "rings": (_rings(h, w), 3),
        "u shapes": (_u_shapes(h, w, rng), 4),
        "diagonals": (_diagonals(h, w), 4),
    }
    for name, (seg, num_classes) in maps.items():
        ent = random_entropy(seg.shape, rng)
        iu, inst, cls = check_iu_against_references(seg, ent, num_classes, 255, connectivity, bfs=False)
        # with an ignore label punched in
        seg_ign = seg.copy()
        seg_ign[rng.random(seg.shape) < 0.05] = 255
        seg_ign[100:140, 50:300] = 255
        check_iu_against_references(seg_ign, ent, num_classes, 255, connectivity, bfs=False)
        if name == "snake":
            assert np.bincount(cls[1:], minlength=3)[1] == 1  # one component through all tiles
        if name == "rings":
            assert np.bincount(cls[1:], minlength=3)[1] == len(range(0, (min(h, w) + 1) // 2, 3))

    # BFS (a third algorithm) on smaller non-multiple-of-32 maps with the same structures
    h, w = 97, 131
    for seg, num_classes in [(_snake(h, w, 3), 3), (_rings(h, w, 2), 3), (_u_shapes(h, w, rng), 4),
                             (_diagonals(h, w), 4), (_blobs(h, w, rng, (40, 50), 5, 0.05), 5)]:
        check_iu_against_references(seg, random_entropy(seg.shape, rng), num_classes, 255,
                                    connectivity, bfs=True)


def test_diagonal_lines_connectivity_counts():
    seg = _diagonals(100, 100)
    _, cls8 = iumask.label_instances(seg, 4, 8)
    _, cls4 = iumask.label_instances(seg, 4, 4)
    c8 = np.bincount(cls8[1:], minlength=4)
    c4 = np.bincount(cls4[1:], minlength=4)
    assert c8[1] == 1 and c8[2] == 1          # each diagonal is one instance under 8-conn
    assert c4[1] >= 99 and c4[2] >= 99        # and falls apart into pixels under 4-conn
    assert c8[0] == 1                          # background joins across the diagonals (8-conn)
    assert c4[0] == 4                          # and stays in four quadrants (4-conn)


def test_many_classes_int32_codes():
    """More than 254 classes: the non-uint8 code path."""
    rng = np.random.default_rng(11)
    seg = rng.integers(0, 300, (40, 30))[
        (np.arange(131) * 40 // 131)[:, None], (np.arange(97) * 30 // 97)[None, :]
    ].astype(np.int32)
    seg[rng.random(seg.shape) < 0.02] = -1
    ent = random_entropy(seg.shape, rng)
    for conn in (4, 8):
        valid = seg != -1
        iu = iumask.instance_uncertainty(seg, ent, 300, conn, ignore_index=-1)
        uf = union_find_components(seg, valid, conn)
        np.testing.assert_allclose(iu, component_means(uf, ent), rtol=1e-5, atol=1e-6)
        inst, cls = iumask.label_instances(seg, 300, conn, ignore_index=-1)
        assert same_partition(inst, uf, valid)
        assert np.array_equal(cls[inst[valid]], seg[valid])


# --------------------------------------------------------------------------------------------
# 3. uncertainty-weighted cross-entropy
# --------------------------------------------------------------------------------------------

def _camvid_targets(height, width, count=2):
    labels = camvid_labels()[:count]
    return torch.from_numpy(np.stack([downsample(l, height, width) for l in labels]).astype(np.int64))


def _loss_inputs(height=45, width=60, seed=0):
    target = _camvid_targets(height, width)
    assert (target == CAMVID_VOID).any()
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(target.shape[0], CAMVID_CLASSES, height, width, generator=gen,
                         dtype=torch.float64) * 2
    entropy = iumask.pixel_entropy(torch.softmax(logits, 1))
    iu = torch.from_numpy(np.stack([
        iumask.instance_uncertainty(t.numpy(), e.numpy(), CAMVID_CLASSES, 8, CAMVID_VOID)
        for t, e in zip(target, entropy)
    ])).double()
    assert iu.max() > 0.5
    return logits, target, iu


def _loss_loop(logits, target, iu, gamma, ignore, class_weights=None):
    """Σ_valid CE · w_y · (1 + IU)^γ / N_valid with a hand-written log-softmax, pixel by pixel."""
    b, c, h, w = logits.shape
    z = logits.detach().double().numpy()
    total, n_valid = 0.0, 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                t = int(target[i, y, x])
                if t == ignore:
                    continue
                row = z[i, :, y, x].tolist()
                m = max(row)
                lse = m + math.log(sum(math.exp(v - m) for v in row))
                ce = lse - row[t]
                weight = 1.0 if class_weights is None else float(class_weights[t])
                u = 0.0 if iu is None else float(iu[i, y, x])
                total += ce * weight * (1.0 + u) ** gamma
                n_valid += 1
    return total / n_valid


def _loss_autograd_ref(logits, target, iu, gamma, ignore, class_weights=None):
    """The same formula, vectorised, with a hand-written log-softmax (for the gradient)."""
    shifted = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_probs = shifted - shifted.exp().sum(dim=1, keepdim=True).log()
    valid = target != ignore
    safe = torch.where(valid, target, torch.zeros_like(target))
    ce = -log_probs.gather(1, safe[:, None])[:, 0]
    weight = valid.double()
    if class_weights is not None:
        weight = weight * class_weights.double()[safe]
    if iu is not None:
        weight = weight * (1.0 + iu.detach().double()) ** gamma
    return (ce * weight).sum() / valid.sum()


def test_loss_plain_equals_cross_entropy():
    logits, target, iu = _loss_inputs()
    ref = F.cross_entropy(logits, target, ignore_index=CAMVID_VOID)
    for out in (
        iumask.uncertainty_weighted_cross_entropy(logits, target, None, ignore_index=CAMVID_VOID),
        iumask.uncertainty_weighted_cross_entropy(logits, target, iu, exponent=0.0, ignore_index=CAMVID_VOID),
        iumask.uncertainty_weighted_cross_entropy(logits, target, torch.zeros_like(iu), exponent=2.0,
                                                  ignore_index=CAMVID_VOID),
    ):
        assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    # the default ignore_index is 255
    t255 = target.clone()
    t255[t255 == CAMVID_VOID] = 255
    out = iumask.uncertainty_weighted_cross_entropy(logits, t255, None)
    assert torch.allclose(out, F.cross_entropy(logits, t255, ignore_index=255), rtol=1e-12)
    # and the weighting actually changes the value when IU > 0
    weighted = iumask.uncertainty_weighted_cross_entropy(logits, target, iu, ignore_index=CAMVID_VOID)
    assert weighted > ref * 1.5


@pytest.mark.parametrize("gamma", [1.0, 2.0, 3.5])
def test_loss_matches_loop(gamma):
    logits, target, iu = _loss_inputs(24, 32, seed=int(gamma * 10))
    out = iumask.uncertainty_weighted_cross_entropy(logits, target, iu, exponent=gamma,
                                                    ignore_index=CAMVID_VOID)
    ref = _loss_loop(logits, target, iu, gamma, CAMVID_VOID)
    assert out.dim() == 0
    assert math.isclose(float(out), ref, rel_tol=1e-10)
    # the default exponent is 2
    if gamma == 2.0:
        default = iumask.uncertainty_weighted_cross_entropy(logits, target, iu, ignore_index=CAMVID_VOID)
        assert math.isclose(float(default), ref, rel_tol=1e-10)


def test_loss_class_weights_mean_over_valid_pixels():
    logits, target, iu = _loss_inputs(24, 32, seed=3)
    weights = torch.linspace(0.2, 5.0, CAMVID_CLASSES, dtype=torch.float64)
    for gamma, mask in ((0.0, None), (2.0, iu)):
        out = iumask.uncertainty_weighted_cross_entropy(logits, target, mask, exponent=gamma,
                                                        ignore_index=CAMVID_VOID, class_weights=weights)
        ref = _loss_loop(logits, target, mask, gamma, CAMVID_VOID, weights)
        assert math.isclose(float(out), ref, rel_tol=1e-10)
    # not torch's weighted mean (which divides by the sum of the weights)
    torch_weighted = F.cross_entropy(logits, target, weight=weights, ignore_index=CAMVID_VOID)
    plain_weighted = iumask.uncertainty_weighted_cross_entropy(logits, target, None,
                                                               ignore_index=CAMVID_VOID, class_weights=weights)
    assert not math.isclose(float(torch_weighted), float(plain_weighted), rel_tol=1e-3)
    valid = target != CAMVID_VOID
    assert math.isclose(float(plain_weighted),
                        float(torch_weighted) * float(weights[target[valid]].sum()) / int(valid.sum()),
                        rel_tol=1e-10)
    # uniform weights scale the loss
    const = torch.full((CAMVID_CLASSES,), 3.0, dtype=torch.float64)
    scaled = iumask.uncertainty_weighted_cross_entropy(logits, target, iu, ignore_index=CAMVID_VOID,
                                                       class_weights=const)
    base = iumask.uncertainty_weighted_cross_entropy(logits, target, iu, ignore_index=CAMVID_VOID)
    assert math.isclose(float(scaled), 3 * float(base), rel_tol=1e-12)
    # float32 weights with float64 logits work
    out32 = iumask.uncertainty_weighted_cross_entropy(logits, target, iu, ignore_index=CAMVID_VOID,
                                                      class_weights=weights.float())
    ref = _loss_loop(logits, target, iu, 2.0, CAMVID_VOID, weights.float().double())
    assert math.isclose(float(out32), ref, rel_tol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 2.0, 3.5])
def test_loss_gradients(gamma):
    logits, target, iu = _loss_inputs(45, 60, seed=7)
    weights = torch.linspace(0.5, 2.0, CAMVID_CLASSES, dtype=torch.float64)
    for cw in (None, weights):
        x1 = logits.clone().requires_grad_(True)
        u1 = iu.clone().requires_grad_(True)
        out = iumask.uncertainty_weighted_cross_entropy(x1, target, u1, exponent=gamma,
                                                        ignore_index=CAMVID_VOID, class_weights=cw)
        out.backward()
        assert u1.grad is None  # the mask is a constant
        x2 = logits.clone().requires_grad_(True)
        ref = _loss_autograd_ref(x2, target, iu, gamma, CAMVID_VOID, cw)
        ref.backward()
        assert torch.allclose(out.detach(), ref.detach(), rtol=1e-10)
        assert torch.allclose(x1.grad, x2.grad, rtol=1e-8, atol=1e-14)
        # ignored pixels get no gradient
        ignored = (target == CAMVID_VOID)[:, None].expand_as(x1.grad)
        assert torch.all(x1.grad[ignored] == 0)
        assert x1.grad.abs().sum() > 0


def test_loss_all_ignored_and_shape_errors():
    logits = torch.randn(1, 3, 4, 5, requires_grad=True)
    target = torch.full((1, 4, 5), 255, dtype=torch.int64)
    out = iumask.uncertainty_weighted_cross_entropy(logits, target, torch.rand(1, 4, 5))
    assert torch.isfinite(out) and float(out.detach()) == 0.0
    out.backward()
    assert torch.all(logits.grad == 0)
    with pytest.raises(ValueError):
        iumask.uncertainty_weighted_cross_entropy(logits, target[0], None)
    with pytest.raises(ValueError):
        iumask.uncertainty_weighted_cross_entropy(logits, target, torch.rand(1, 4, 4))


# --------------------------------------------------------------------------------------------
# 4. SegmentationMetrics
# --------------------------------------------------------------------------------------------

def _metric_data(count=5, height=None, width=None, seed=0):
    """CamVid targets (void 11), predictions made by perturbing them, and entropies quantised to
    multiples of 1/64 (so that patch means are exact in float32 and thresholds avoid ties).
    Class 10 is removed from both (-> a class with TP+FP+FN = 0), and a void block is punched in."""
    rng = np.random.default_rng(seed)
    targets, preds, ents = [], [], []
    for label in camvid_labels(count):
        if height is not None:
            label = downsample(label, height, width)
        target = label.copy()
        target[target == 10] = CAMVID_VOID
        h, w = target.shape
        target[h // 3:h // 3 + 12, w // 2:w // 2 + 16] = CAMVID_VOID
        pred = perturb_to_prediction(label, rng)
        pred[pred == 10] = 9
        ent = (rng.integers(0, 150, target.shape) / 64.0).astype(np.float32)
        targets.append(target)
        preds.append(pred)
        ents.append(ent)
    return targets, preds, ents


def _iou_reference(targets, preds, num_classes, ignore):
    tp = np.zeros(num_classes)
    fp = np.zeros(num_classes)
    fn = np.zeros(num_classes)
    for t, p in zip(targets, preds):
        valid = t != ignore
        for c in range(num_classes):
            in_t = set(np.flatnonzero((t == c) & valid).tolist())
            in_p = set(np.flatnonzero((p == c) & valid).tolist())
            tp[c] += len(in_t & in_p)
            fp[c] += len(in_p - in_t)
            fn[c] += len(in_t - in_p)
    union = tp + fp + fn
    iou = np.array([tp[c] / union[c] if union[c] > 0 else math.nan for c in range(num_classes)])
    return iou, tp, union


def _pavpu_reference(targets, preds, ents, window, stride, threshold, ignore):
    """Explicit loop over the w x w windows (only whole windows, step ``stride``)."""
    counts = {"n_ac": 0, "n_au": 0, "n_ic": 0, "n_iu": 0}
    skipped = half = 0
    for t, p, e in zip(targets, preds, ents):
        h, w = t.shape
        for y in range(0, h - window + 1, stride):
            for x in range(0, w - window + 1, stride):
                tt = t[y:y + window, x:x + window]
                pp = p[y:y + window, x:x + window]
                valid = tt != ignore
                n_valid = int(valid.sum())
                if n_valid == 0:
                    skipped += 1
                    continue
                n_correct = int(((pp == tt) & valid).sum())
                accurate = 2 * n_correct >= n_valid
                half += 2 * n_correct == n_valid
                certain = e[y:y + window, x:x + window].astype(np.float64).mean() < threshold
                key = ("n_a" if accurate else "n_i") + ("c" if certain else "u")
                counts[key] += 1
    return counts, skipped, half


def test_iou_streaming_matches_set_counting():
    targets, preds, ents = _metric_data()
    iou_ref, tp, union = _iou_reference(targets, preds, CAMVID_CLASSES, CAMVID_VOID)
    assert union[10] == 0 and np.isnan(iou_ref[10])
    assert np.all(union[:10] > 0)

    streamed = iumask.SegmentationMetrics(CAMVID_CLASSES, ignore_index=CAMVID_VOID)
    for t, p, e in zip(targets, preds, ents):
        streamed.update(p, t, e)  # (H, W) numpy
    res = streamed.compute()
    iou = np.array(res["iou"], dtype=np.float64)
    assert np.isnan(iou[10])
    np.testing.assert_allclose(iou[:10], iou_ref[:10], rtol=1e-12)
    assert math.isclose(res["miou"], float(np.nanmean(iou_ref)), rel_tol=1e-12)
    assert math.isclose(res["miou"], float(np.mean(iou_ref[:10])), rel_tol=1e-12)
    valid_total = sum(int((t != CAMVID_VOID).sum()) for t in targets)
    assert math.isclose(res["pixel_accuracy"], tp.sum() / valid_total, rel_tol=1e-12)
    # mean entropy is over all pixels (labelled or not), like the u_th it is compared with
    ent_ref = math.fsum(float(x) for e in ents for x in e.ravel()) / sum(e.size for e in ents)
    assert math.isclose(res["mean_entropy"], ent_ref, rel_tol=1e-9)
    assert math.isnan(res["pavpu"])  # no threshold given: no PAvPU

    # one big (B, H, W) torch batch gives the same, and batches of mixed kinds too
    big = iumask.SegmentationMetrics(CAMVID_CLASSES, ignore_index=CAMVID_VOID)
    big.update(torch.from_numpy(np.stack(preds)), torch.from_numpy(np.stack(targets)),
               torch.from_numpy(np.stack(ents)))
    assert torch.equal(big.confusion, streamed.confusion)
    two = iumask.SegmentationMetrics(CAMVID_CLASSES, ignore_index=CAMVID_VOID)
    two.update(np.stack(preds[:2]), np.stack(targets[:2]).astype(np.int64), np.stack(ents[:2]))
    two.update(torch.from_numpy(np.stack(preds[2:])).long(), torch.from_numpy(np.stack(targets[2:])),
               torch.from_numpy(np.stack(ents[2:])))
    assert torch.equal(two.confusion, streamed.confusion)
    r_big, r_two = big.compute(), two.compute()
    for r in (r_big, r_two):
        np.testing.assert_array_equal(np.array(r["iou"]), iou)  # NaNs in the same places
        assert r["miou"] == res["miou"] and r["pixel_accuracy"] == res["pixel_accuracy"]
        assert math.isclose(r["mean_entropy"], res["mean_entropy"], rel_tol=1e-12)
    # the confusion matrix is (target, prediction) counts of valid pixels
    assert int(streamed.confusion.sum()) == valid_total
    assert np.array_equal(streamed.confusion.diag().numpy(), tp.astype(np.int64))

    # reset clears everything
    streamed.reset()
    assert int(streamed.confusion.sum()) == 0 and math.isnan(streamed.compute()["miou"])


def test_metrics_memory_does_not_grow():
    targets, preds, ents = _metric_data(count=3, height=90, width=120)
    m = iumask.SegmentationMetrics(CAMVID_CLASSES, ignore_index=CAMVID_VOID, pavpu_threshold=1.0)

    def footprint():
        out = {}
        for k, v in vars(m).items():
            if isinstance(v, (torch.Tensor, np.ndarray)):
                out[k] = tuple(v.shape)
            elif isinstance(v, (list, tuple, dict, set)):
                out[k] = len(v)
        return out

    m.update(preds[0], targets[0], ents[0])
    before = footprint()
    for _ in range(10):
        for t, p, e in zip(targets, preds, ents):
            m.update(p, t, e)
    assert footprint() == before
    assert tuple(m.confusion.shape) == (CAMVID_CLASSES, CAMVID_CLASSES)
    total = int((targets[0] != CAMVID_VOID).sum()) + 10 * sum(int((t != CAMVID_VOID).sum()) for t in targets)
    assert int(m.confusion.sum()) == total


@pytest.mark.parametrize(
    "window,stride,size",
    [(4, None, None), (4, 1, (90, 120)), (3, 2, (90, 121)), (5, None, (93, 122))],
)
def test_pavpu_matches_patch_loop(window, stride, size):
    height, width = size if size else (None, None)
    targets, preds, ents = _metric_data(count=4 if size is None else 5, height=height, width=width, seed=window)
    mean_ent = float(np.mean([e.mean() for e in ents]))
    quantum = 1.0 / (64 * window * window)  # patch means are multiples of this
    threshold = (math.floor(mean_ent / quantum) + 0.5) * quantum
    m = iumask.SegmentationMetrics(CAMVID_CLASSES, ignore_index=CAMVID_VOID, pavpu_window=window,
                                   pavpu_threshold=threshold, pavpu_stride=stride)
    for t, p, e in zip(targets, preds, ents):
        m.update(torch.from_numpy(p), torch.from_numpy(t), torch.from_numpy(e))
    res = m.compute()
    ref, skipped, half = _pavpu_reference(targets, preds, ents, window, stride or window, threshold,
                                          CAMVID_VOID)
    assert skipped > 0  # fully-void patches exist and are skipped
    if window % 2 == 0:
        assert half > 0  # patches at exactly 50 % correct exist (counted accurate)
    assert all(v > 0 for v in ref.values()), ref
    assert res["pavpu_counts"] == ref
    n_ac, n_au, n_ic, n_iu = (ref[k] for k in ("n_ac", "n_au", "n_ic", "n_iu"))
    assert math.isclose(res["pavpu"], (n_ac + n_iu) / (n_ac + n_au + n_ic + n_iu), rel_tol=1e-12)
    assert math.isclose(res["p_accurate_given_certain"], n_ac / (n_ac + n_ic), rel_tol=1e-12)
    assert math.isclose(res["p_uncertain_given_inaccurate"], n_iu / (n_ic + n_iu), rel_tol=1e-12)
    assert res["pavpu_threshold"] == threshold


def test_pavpu_patch_rules_small():
    """Hand-made 4x4 patches: the accuracy boundary, skipped void patches, and certainty from the
    mean entropy over ALL pixels of the patch (ignored ones included; the implementation's
    behaviour)."""
    ign = 255
    t = np.zeros((4, 20), dtype=np.int64)
    p = np.zeros((4, 20), dtype=np.int64)
    e = np.zeros((4, 20), dtype=np.float32)
    # patch 0 (cols 0-3): 8 of 16 correct -> accurate (>= 0.5)
    p[:, 0:4].flat[:8] = 1
    # patch 1 (cols 4-7): 7 of 16 correct -> inaccurate
    p[:, 4:8].flat[:9] = 1
    # patch 2 (cols 8-11): all void -> skipped
    t[:, 8:12] = ign
    # patch 3 (cols 12-15): 2 valid pixels, 1 correct -> accurate; void pixels have high entropy
    t[:, 12:16] = ign
    t[0, 12:14] = [0, 0]
    p[0, 12] = 1
    e[:, 12:16] = 2.0
    e[0, 12:14] = 0.0  # mean over valid pixels 0 (< 1), over all pixels 1.75 (>= 1)
    # patch 4 (cols 16-19): all correct, mean entropy exactly the threshold -> uncertain (strict <)
    e[:, 16:20] = 1.0
    m = iumask.SegmentationMetrics(2, ignore_index=ign, pavpu_window=4, pavpu_threshold=1.0)
    m.update(p, t, e)
    counts = m.compute()["pavpu_counts"]
    assert counts == {"n_ac": 1, "n_au": 2, "n_ic": 1, "n_iu": 0}
    # trailing rows / columns that do not fill a whole window are not counted
    m2 = iumask.SegmentationMetrics(2, ignore_index=ign, pavpu_window=4, pavpu_threshold=1.0)
    m2.update(np.pad(p, ((0, 3), (0, 2))), np.pad(t, ((0, 3), (0, 2))), np.pad(e, ((0, 3), (0, 2))))
    assert m2.compute()["pavpu_counts"] == counts
    # no patch at all -> NaN, not an error
    m3 = iumask.SegmentationMetrics(2, ignore_index=ign, pavpu_window=4, pavpu_threshold=1.0)
    m3.update(t[:, 8:12], t[:, 8:12], e[:, 8:12])
    assert math.isnan(m3.compute()["pavpu"])


def test_metrics_bad_target_raises():
    m = iumask.SegmentationMetrics(CAMVID_CLASSES, ignore_index=255)
    t = np.zeros((6, 7), dtype=np.int64)
    p = np.zeros((6, 7), dtype=np.int64)
    for bad in (CAMVID_CLASSES, -1, 254):
        tb = t.copy()
        tb[2, 3] = bad
        with pytest.raises(ValueError):
            m.update(p, tb)
    assert int(m.confusion.sum()) == 0  # nothing was counted by the failed updates
    with pytest.raises(ValueError):
        m.update(p[:, :-1], t)
    # the ignore label itself is fine
    tb = t.copy()
    tb[2, 3] = 255
    m.update(p, tb)
    assert int(m.confusion.sum()) == 6 * 7 - 1


def test_metrics_bad_prediction_raises():
    m = iumask.SegmentationMetrics(3, ignore_index=255)
    t = np.array([[0, 1]])
    p = np.array([[3, 0]])  # 3 is not a class; currently counted as (target 1, pred 0)
    with pytest.raises(ValueError):
        m.update(p, t)
    m = iumask.SegmentationMetrics(3, ignore_index=255)
    with pytest.raises(ValueError):
        m.update(np.array([[-1, 0]]), np.array([[1, 1]]))  # currently counted as (0, 2)
