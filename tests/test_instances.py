"""iumask.core.instances (``instance_uncertainty``, ``instance_uncertainty_batch``,
``label_instances``) against the independent connected-component references of ``reference.py``
(BFS flood fill, union-find, per-class ``cv2.connectedComponents`` without tiling).

Real data: CamVid label maps (see ``testdata.py``; those tests are skipped without them). Generated
label maps cover the edge cases (tile boundaries, nesting, diagonal contacts, dtypes, errors).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from reference import (
    bfs_instance_uncertainty,
    component_means,
    cv2_fullres_instance_uncertainty,
    same_partition,
    union_find_components,
)
from testdata import (
    CAMVID_CLASSES,
    CAMVID_VOID,
    camvid_labels,
    downsample,
    load_camvid_labels,
    perturb_to_prediction,
)

import iumask

# --------------------------------------------------------------------------------------------
# checking an instance-uncertainty map against every reference
# --------------------------------------------------------------------------------------------

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
# instance uncertainty on CamVid
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
    ent = torch.from_numpy(np.stack([random_entropy(lab.shape, rng) for lab in labels]).astype(np.float64))
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
# instance uncertainty: generated edge cases
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
    label = downsample(camvid_labels()[1], 180, 240) if load_camvid_labels(5) else None
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
