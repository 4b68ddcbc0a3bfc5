"""The loss a real training step uses, against an independent recomputation.

* One real training step (4 training images, batch size 4, 1 epoch: exactly one optimizer step, so
  the recorded history loss is that step's loss) of ``train-baseline --class-weights inverse``,
  ``train-weighted --class-weights median`` (masks from a real ``make-masks`` store) and
  ``train-weighted --online --class-weights median`` (two members; once more with ``--normalize``),
  all through the CLI with ``--no-augment``. Each step is replayed here from the same initial
  model: same seeds, same batch order (the engine's :class:`EpochBatchSampler`), same dropout RNG
  stream (the engine seeds ``seed_everything(seed)`` right before the loop; DeepLabV3+'s ASPP
  dropout draws from it), images and labels read from the PNG files by this test. The recorded loss must equal
  ``uncertainty_weighted_cross_entropy`` (and a numpy reference of the formula) with the store's
  mask / the batch's online mask and the independently computed class weights, and must differ
  from plain cross-entropy and from the loss without class weights.
* The class weights recorded in the manifests are checked against counts made here with numpy
  over the label PNGs (inverse class proportion and median frequency balancing as defined in
  ``iumask.core.class_weights`` and the README). One class is removed from the training labels so
  that "a class that never occurs gets 0" and "C counts every class" are exercised.
* Generated-data twins (always run) of the loss reference tests of ``test_loss.py`` that skip
  without CamVid, with the CamVid version alongside (skipped when the data is absent).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from reference import entropy_np, instance_means
from testdata import camvid_labels, downsample, ids_of, read_label

import iumask
from iumask.config import MaskConfig
from iumask.engine import EpochBatchSampler, seed_everything
from iumask.models import build_model
from iumask.stages.train import online_masks
from iumask.store import MaskStore

NUM_CLASSES = 10
IGNORE = 255
REMOVED_CLASS = 8  # bicycle pixels are relabelled as person (7): class 8 never occurs in training
SEED = 3
EXPONENT = 2.0
COMMON = ["--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--backbone-lr-factor", "1", "--seed", str(SEED),
          "--device", "cpu", "--no-augment"]

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# independent helpers (numpy / PIL / cv2, nothing from iumask)
# --------------------------------------------------------------------------------------------

def read_image(root: Path, split: str, image_id: str, mean, std) -> np.ndarray:
    """(3, H, W) float32, RGB scaled to [0, 1] and normalised with the manifest's mean/std."""
    bgr = cv2.imread(str(root / "images" / split / f"{image_id}.png"), cv2.IMREAD_COLOR)
    rgb = np.ascontiguousarray(bgr[..., ::-1]).astype(np.float32) / 255.0
    rgb = (rgb - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return rgb.transpose(2, 0, 1).copy()


def count_labels(root: Path, split: str, num_classes: int, ignore: int):
    """Per class: labelled pixels, and all pixels (ignored ones too) of the images containing it."""
    pixels = np.zeros(num_classes, dtype=np.int64)
    in_images = np.zeros(num_classes, dtype=np.int64)
    for image_id in ids_of(root, split):
        label = read_label(root, split, image_id)
        for c in range(num_classes):
            n = int(np.count_nonzero(label == c))
            pixels[c] += n
            if n:
                in_images[c] += label.shape[0] * label.shape[1]
        assert np.all((label < num_classes) | (label == ignore))
    return pixels, in_images


def inverse_weights(pixels: np.ndarray) -> np.ndarray:
    """w_c = N / (C · n_c), C all classes; 0 for a class that never occurs."""
    out = np.zeros(len(pixels))
    for c, n in enumerate(pixels):
        if n:
            out[c] = pixels.sum() / (len(pixels) * n)
    return out


def median_weights(pixels: np.ndarray, in_images: np.ndarray) -> np.ndarray:
    """freq_c = n_c / pixels of the images containing c; w_c = median(freq) / freq_c over the
    classes that occur; 0 for the others."""
    freq = {c: pixels[c] / in_images[c] for c in range(len(pixels)) if pixels[c]}
    values = sorted(freq.values())
    k = len(values)
    median = values[k // 2] if k % 2 else (values[k // 2 - 1] + values[k // 2]) / 2
    return np.array([median / freq[c] if c in freq else 0.0 for c in range(len(pixels))])


def loss_reference(logits, target, iu, gamma, ignore, class_weights=None) -> float:
    """Σ_valid CE_p · w_{y_p} · (1 + IU_p)^γ / N_valid in float64 numpy (own log-softmax)."""
    z = np.asarray(logits.detach().double().numpy() if torch.is_tensor(logits) else logits, dtype=np.float64)
    t = np.asarray(target.numpy() if torch.is_tensor(target) else target).astype(np.int64)
    valid = t != ignore
    zmax = z.max(axis=1, keepdims=True)
    lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
    safe = np.where(valid, t, 0)
    ce = lse - np.take_along_axis(z, safe[:, None], axis=1)[:, 0]
    weight = np.ones_like(ce) if class_weights is None else np.asarray(class_weights, dtype=np.float64)[safe]
    if iu is not None:
        u = np.asarray(iu.numpy() if torch.is_tensor(iu) else iu, dtype=np.float64)
        weight = weight * (1.0 + u) ** gamma
    return float((ce * weight)[valid].sum() / max(int(valid.sum()), 1))


# --------------------------------------------------------------------------------------------
# fixtures: data and one-step trainings
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("IUMASK_CACHE", str(tmp_path_factory.mktemp("label-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def data(make_synthetic):
    root = make_synthetic("loss-oracle", num_train=4, num_val=2, height=64, width=64, seed=1)
    for path in sorted((root / "labels" / "train").glob("*.png")):
        label = np.array(Image.open(path))
        label[label == REMOVED_CLASS] = REMOVED_CLASS - 1
        Image.fromarray(label).save(path)
    pixels, in_images = count_labels(root, "train", NUM_CLASSES, IGNORE)
    assert pixels[REMOVED_CLASS] == 0 and (np.delete(pixels, REMOVED_CLASS) > 0).all()
    # Ignored pixels exist, so counting them or not in the median's denominator makes a difference.
    labelled_in_images = np.zeros(NUM_CLASSES, dtype=np.int64)
    for image_id in ids_of(root, "train"):
        label = read_label(root, "train", image_id)
        for c in range(NUM_CLASSES):
            if (label == c).any():
                labelled_in_images[c] += int((label != IGNORE).sum())
    assert (labelled_in_images < in_images)[pixels > 0].all()
    return root


@pytest.fixture(scope="module")
def baseline(data, cache_env, tmp_path_factory, cli):
    out = tmp_path_factory.mktemp("loss-oracle") / "baseline"
    cli("train-baseline", "--data", data, "--out", out, "--encoder", "mobilenet_v2", "--class-weights", "inverse",
        *COMMON)
    return out


@pytest.fixture(scope="module")
def store(data, baseline, tmp_path_factory, cli):
    path = tmp_path_factory.mktemp("loss-oracle") / "masks.zarr"
    cli("make-masks", "--ensemble", baseline, "--data", data, "--store", path, "--device", "cpu")
    return path


@pytest.fixture(scope="module")
def weighted(data, store, cache_env, tmp_path_factory, cli):
    out = tmp_path_factory.mktemp("loss-oracle") / "weighted"
    cli("train-weighted", "--data", data, "--store", store, "--out", out, "--encoder", "mobilenet_v2",
        "--exponent", str(EXPONENT), "--class-weights", "median", *COMMON)
    return out


@pytest.fixture(scope="module")
def online(data, cache_env, tmp_path_factory, cli):
    out = tmp_path_factory.mktemp("loss-oracle") / "online"
    cli("train-weighted", "--online", "--data", data, "--out", out, "--encoder", "mobilenet_v2",
        "--encoder", "mobilenet_v2", "--exponent", str(EXPONENT), "--class-weights", "median", *COMMON)
    return out


@pytest.fixture(scope="module")
def online_normalized(data, cache_env, tmp_path_factory, cli):
    """The ``online`` training with ``--normalize``: the masks' entropy divided by ln C."""
    out = tmp_path_factory.mktemp("loss-oracle") / "online-normalized"
    cli("train-weighted", "--online", "--normalize", "--data", data, "--out", out, "--encoder", "mobilenet_v2",
        "--encoder", "mobilenet_v2", "--exponent", str(EXPONENT), "--class-weights", "median", *COMMON)
    return out


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def first_batch(root: Path, manifest: dict, loop_seed: int):
    """The ids, images and labels of the run's only batch, in the engine's order."""
    ids = ids_of(root, "train")
    batch_size = manifest["train_options"]["batch_size"]
    batches = list(EpochBatchSampler(len(ids), batch_size, loop_seed, epoch=0))
    assert len(batches) == 1 and sorted(batches[0]) == list(range(len(ids)))  # one step sees every image
    order = [ids[i] for i in batches[0]]
    norm = manifest["normalization"]
    images = torch.from_numpy(np.stack([read_image(root, "train", i, norm["mean"], norm["std"]) for i in order]))
    labels = torch.from_numpy(np.stack([read_label(root, "train", i) for i in order]).astype(np.int64))
    return order, images, labels


def replay_logits(encoders_and_seeds: list[tuple[str, int]], loop_seed: int, images: torch.Tensor):
    """The first step's logits of freshly initialised members (member k built right after
    ``seed_everything(init seed k)``), in train mode, with the loop's RNG state
    (``seed_everything(loop_seed)``), members run in order as the engine does."""
    models = []
    for encoder, init_seed in encoders_and_seeds:
        seed_everything(init_seed)
        models.append(build_model(encoder, NUM_CLASSES).train())
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)  # as the engine on CPU
    try:
        seed_everything(loop_seed)
        with torch.no_grad():
            return [model(images).float() for model in models]  # 64x64: no padding needed
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def assert_loss(recorded: float, expected: float, **others: float) -> None:
    """``recorded`` equals ``expected`` and is far from each of ``others`` (wrong wirings). The
    replay is bitwise exact on CPU; if ``recorded`` matches none of the values, the replay (seeds,
    batch order, dropout RNG) no longer follows the engine rather than the loss being wrong."""
    assert recorded == pytest.approx(expected, rel=1e-6), (recorded, expected, others)
    for name, value in others.items():
        assert abs(value - expected) > 1e-2 * abs(expected), f"test cannot tell the loss from {name}"
        assert recorded != pytest.approx(value, rel=1e-3), f"training used {name}: {recorded} vs {value}"


# --------------------------------------------------------------------------------------------
# class weights through the pipeline
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_manifest_class_weights_match_independent_counts(data, baseline, weighted, online):
    pixels, in_images = count_labels(data, "train", NUM_CLASSES, IGNORE)
    inverse, median = inverse_weights(pixels), median_weights(pixels, in_images)
    assert inverse[REMOVED_CLASS] == 0 and median[REMOVED_CLASS] == 0
    assert len(np.unique(median[median > 0])) > 3 and np.isclose(np.median(median[median > 0]), 1.0)
    recorded = manifest_of(baseline / "mobilenet_v2")["loss"]
    assert recorded["class_weights"] == "inverse"
    np.testing.assert_allclose(recorded["class_weight_values"], inverse, rtol=1e-12, atol=0)
    for folder in (weighted / "mobilenet_v2", online / "mobilenet_v2", online / "mobilenet_v2-2"):
        recorded = manifest_of(folder)["loss"]
        assert recorded["class_weights"] == "median" and recorded["exponent"] == EXPONENT
        np.testing.assert_allclose(recorded["class_weight_values"], median, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------
# one real step: the loss that was trained on
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_baseline_step_loss_uses_inverse_class_weights(data, baseline):
    manifest = manifest_of(baseline / "mobilenet_v2")
    seed = manifest["train_options"]["seed"]
    assert seed == SEED and len(manifest["history"]) == 1
    _, images, labels = first_batch(data, manifest, seed)
    (logits,) = replay_logits([("mobilenet_v2", seed)], seed, images)
    pixels, _ = count_labels(data, "train", NUM_CLASSES, IGNORE)
    weights = inverse_weights(pixels)
    expected = iumask.uncertainty_weighted_cross_entropy(
        logits, labels, None, exponent=0.0, ignore_index=IGNORE,
        class_weights=torch.tensor(weights, dtype=torch.float32)).item()
    assert expected == pytest.approx(loss_reference(logits, labels, None, 0.0, IGNORE, weights), rel=1e-5)
    assert_loss(manifest["history"][0]["loss"], expected,
                plain_cross_entropy=F.cross_entropy(logits, labels, ignore_index=IGNORE).item())


@pytest.mark.slow
def test_weighted_step_loss_uses_store_masks_and_median_weights(data, store, weighted):
    manifest = manifest_of(weighted / "mobilenet_v2")
    seed = manifest["train_options"]["seed"]
    assert seed == SEED and len(manifest["history"]) == 1
    order, images, labels = first_batch(data, manifest, seed)
    masks = MaskStore.open(store)
    iu = torch.from_numpy(np.stack([masks.read_iu(masks.index_of(i)) for i in order]))
    assert iu.shape == labels.shape and float(iu.max()) > 0.3  # masks that change the loss
    (logits,) = replay_logits([("mobilenet_v2", seed)], seed, images)
    pixels, in_images = count_labels(data, "train", NUM_CLASSES, IGNORE)
    weights = median_weights(pixels, in_images)
    cw = torch.tensor(weights, dtype=torch.float32)
    expected = iumask.uncertainty_weighted_cross_entropy(logits, labels, iu, EXPONENT, IGNORE, cw).item()
    assert expected == pytest.approx(loss_reference(logits, labels, iu, EXPONENT, IGNORE, weights), rel=1e-5)
    assert_loss(
        manifest["history"][0]["loss"], expected,
        no_iu_mask=iumask.uncertainty_weighted_cross_entropy(logits, labels, None, EXPONENT, IGNORE, cw).item(),
        no_class_weights=iumask.uncertainty_weighted_cross_entropy(logits, labels, iu, EXPONENT, IGNORE).item(),
        plain_cross_entropy=F.cross_entropy(logits, labels, ignore_index=IGNORE).item(),
    )


@pytest.mark.slow
@pytest.mark.parametrize("normalize", [False, True], ids=["entropy", "normalized-entropy"])
def test_online_step_loss_uses_the_batch_online_masks(data, normalize, request):
    """The recorded loss of a real online step equals the loss with the batch's mask computed here
    (entropy in nats, or with ``--normalize`` divided by ln C, docs/method.md), not any other mask."""
    online = request.getfixturevalue("online_normalized" if normalize else "online")
    names = ["mobilenet_v2", "mobilenet_v2-2"]
    manifests = [manifest_of(online / n) for n in names]
    seed = manifests[0]["train_options"]["seed"]
    assert seed == SEED and [m["init_seed"] for m in manifests] == [SEED, SEED + 1]
    assert manifests[0]["online_masks"] == {"instances_from": "prediction", "connectivity": 8, "normalize": normalize}
    _, images, labels = first_batch(data, manifests[0], seed)
    logits = replay_logits([("mobilenet_v2", SEED), ("mobilenet_v2", SEED + 1)], seed, images)

    # The batch's mask, computed here: the members' mean softmax, its entropy (over ln C when
    # normalised), averaged over the 8-connected instances of its argmax.
    probs = ((torch.softmax(logits[0], 1) + torch.softmax(logits[1], 1)) / 2).numpy()
    entropy, prediction = entropy_np(probs), probs.argmax(1)

    def mask(scale: float) -> np.ndarray:
        return np.stack([instance_means(p, e / scale, 8, IGNORE) for p, e in zip(prediction, entropy)])

    scale = math.log(NUM_CLASSES) if normalize else 1.0
    mine = mask(scale)
    # ... and by the real online step's mask function (the same instances, the same means).
    iu = online_masks(logits, labels, MaskConfig("prediction", 8, normalize), NUM_CLASSES, IGNORE)
    np.testing.assert_allclose(iu.numpy(), mine, rtol=1e-5, atol=1e-5,
                               err_msg=f"online mask with normalize={normalize} is not the entropy / {scale:.4f}")
    assert float(iu.max()) * scale > 0.3
    # the mask with the other choice of normalisation, which the recorded loss must not match
    other_iu = torch.from_numpy(mask(1.0 if normalize else math.log(NUM_CLASSES)))

    pixels, in_images = count_labels(data, "train", NUM_CLASSES, IGNORE)
    weights = median_weights(pixels, in_images)
    cw = torch.tensor(weights, dtype=torch.float32)
    for manifest, member_logits in zip(manifests, logits):
        expected = iumask.uncertainty_weighted_cross_entropy(member_logits, labels, iu, EXPONENT, IGNORE, cw).item()
        assert expected == pytest.approx(loss_reference(member_logits, labels, mine, EXPONENT, IGNORE, weights),
                                         rel=1e-5)
        assert_loss(
            manifest["history"][0]["loss"], expected,
            no_iu_mask=iumask.uncertainty_weighted_cross_entropy(member_logits, labels, None, EXPONENT, IGNORE,
                                                                 cw).item(),
            no_class_weights=iumask.uncertainty_weighted_cross_entropy(member_logits, labels, iu, EXPONENT,
                                                                       IGNORE).item(),
            **{f"normalize={not normalize}": iumask.uncertainty_weighted_cross_entropy(
                member_logits, labels, other_iu, EXPONENT, IGNORE, cw).item()},
        )


# --------------------------------------------------------------------------------------------
# generated-data twins of the loss reference tests (and their CamVid versions)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["generated", "camvid"])
def targets(request, make_synthetic):
    """(targets (B, H, W) int64, num_classes, ignore): synthetic scene labels (ignore 255) or
    downsampled CamVid labels (ignore 11; skipped when CamVid is absent)."""
    if request.param == "generated":
        root = make_synthetic("loss-ref", num_train=2, num_val=1, height=37, width=53, seed=7)
        labels = [read_label(root, "train", i) for i in ids_of(root, "train")]
        num_classes, ignore = NUM_CLASSES, IGNORE
    else:
        labels = [downsample(label, 37, 53) for label in camvid_labels(2)]  # the first and the last
        num_classes, ignore = 11, 11
    target = torch.from_numpy(np.stack(labels).astype(np.int64))
    assert (target == ignore).any() and (target != ignore).any()
    return target, num_classes, ignore


def _inputs(targets, seed):
    target, num_classes, ignore = targets
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(target.shape[0], num_classes, *target.shape[1:], generator=gen, dtype=torch.float64) * 2
    entropy = entropy_np(torch.softmax(logits, 1).numpy())
    iu = np.stack([instance_means(t.numpy(), e, 8, ignore) for t, e in zip(target, entropy)])
    assert iu.max() > 0.5 and np.all(iu[target.numpy() == ignore] == 0)
    return logits, target, torch.from_numpy(iu), num_classes, ignore


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.5])
def test_loss_matches_reference(targets, gamma):
    logits, target, iu, num_classes, ignore = _inputs(targets, seed=int(gamma * 10))
    weights = torch.linspace(0.2, 5.0, num_classes, dtype=torch.float64)
    for cw in (None, weights):
        out = iumask.uncertainty_weighted_cross_entropy(logits, target, iu, gamma, ignore, cw)
        ref = loss_reference(logits, target, iu.numpy(), gamma, ignore, None if cw is None else cw.numpy())
        assert out.dim() == 0 and math.isclose(float(out), ref, rel_tol=1e-10)
    plain = F.cross_entropy(logits, target, ignore_index=ignore)
    assert torch.allclose(iumask.uncertainty_weighted_cross_entropy(logits, target, None, ignore_index=ignore),
                          plain, rtol=1e-12, atol=0)
    weighted = iumask.uncertainty_weighted_cross_entropy(logits, target, iu, gamma, ignore)
    if gamma == 0.0:
        assert torch.allclose(weighted, plain, rtol=1e-12, atol=0)
    else:
        assert weighted > plain * 1.2
    if gamma == 2.0:  # the default exponent
        assert float(iumask.uncertainty_weighted_cross_entropy(logits, target, iu, ignore_index=ignore)) == float(
            iumask.uncertainty_weighted_cross_entropy(logits, target, iu, 2.0, ignore))
    # class weights: mean over valid pixels, not torch's mean over the sum of weights
    valid = target != ignore
    ours = iumask.uncertainty_weighted_cross_entropy(logits, target, None, 0.0, ignore, weights)
    torch_weighted = F.cross_entropy(logits, target, weight=weights, ignore_index=ignore)
    assert math.isclose(float(ours), float(torch_weighted) * float(weights[target[valid]].sum()) / int(valid.sum()),
                        rel_tol=1e-10)


@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_loss_gradient_matches_analytic(targets, gamma):
    """d/dz of Σ CE·w·(1+IU)^γ / N = (softmax - onehot) · w·(1+IU)^γ / N on valid pixels, 0 elsewhere;
    no gradient into the mask."""
    logits, target, iu, num_classes, ignore = _inputs(targets, seed=40 + int(gamma))
    weights = torch.linspace(0.5, 2.0, num_classes, dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    u = iu.clone().requires_grad_(True)
    iumask.uncertainty_weighted_cross_entropy(x, target, u, gamma, ignore, weights).backward()
    assert u.grad is None
    z = logits.numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    t = target.numpy()
    valid = t != ignore
    safe = np.where(valid, t, 0)
    onehot = np.eye(num_classes)[safe].transpose(0, 3, 1, 2)
    scale = np.where(valid, weights.numpy()[safe] * (1 + iu.numpy()) ** gamma, 0.0) / valid.sum()
    np.testing.assert_allclose(x.grad.numpy(), (p - onehot) * scale[:, None], rtol=1e-8, atol=1e-15)
    assert np.all(x.grad.numpy()[np.broadcast_to(~valid[:, None], x.grad.shape)] == 0)


def test_loss_all_ignored_is_zero(targets):
    target, num_classes, ignore = targets
    logits = torch.randn(target.shape[0], num_classes, *target.shape[1:], requires_grad=True)
    out = iumask.uncertainty_weighted_cross_entropy(logits, torch.full_like(target, ignore),
                                                    torch.rand(target.shape), 2.0, ignore)
    assert float(out.detach()) == 0.0
    out.backward()
    assert torch.all(logits.grad == 0)
