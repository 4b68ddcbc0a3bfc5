"""The peer imbalance methods (docs/method.md §10): focal, OHEM, recall, class-balanced
(effective-number) weights, CE + Dice and CE + Lovász, alone and combined with IU weighting and
class weights. Each equals a direct numpy computation on a real CamVid batch (labels downsampled,
void = ignore, seeded random logits); each trains through the CLI and changes the weights relative
to plain cross-entropy; region losses refuse an IU weight."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runner import TINY_TRAIN as TRAIN
from cli_runner import iumask
from testdata import CAMVID_CLASSES, CAMVID_VOID, camvid_labels, downsample

from iumask.config import LossConfig
from iumask.core import LOSS_METHODS, class_weights, instance_uncertainty, pixel_entropy, segmentation_loss
from iumask.errors import IumaskError


@pytest.fixture(scope="module")
def batch(camvid_dir):
    """(logits, target, iu) of two CamVid training labels at 90x120 with float64 logits."""
    labels = camvid_labels()[:2]
    target = torch.from_numpy(np.stack([downsample(lab, 90, 120) for lab in labels]).astype(np.int64))
    assert (target == CAMVID_VOID).any()
    logits = torch.randn(2, CAMVID_CLASSES, 90, 120, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64) * 2
    entropy = pixel_entropy(torch.softmax(logits, 1))
    iu = torch.from_numpy(np.stack([instance_uncertainty(t.numpy(), e.numpy(), CAMVID_CLASSES, 8, CAMVID_VOID)
                                    for t, e in zip(target, entropy)])).double()
    return logits, target, iu


def direct_terms(logits, target):
    """numpy: log p of every class, the valid mask, the true class's probability and CE per pixel."""
    z = logits.numpy()
    log_p = z - z.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    t = target.numpy()
    valid = t != CAMVID_VOID
    safe = np.where(valid, t, 0)
    log_py = np.take_along_axis(log_p, safe[:, None], 1)[:, 0]
    return valid, t, np.exp(log_py), -log_py, log_p


def mean_over_valid(values, valid):
    return float(np.where(valid, values, 0).sum() / valid.sum())


ALPHA = torch.linspace(0.5, 2.0, CAMVID_CLASSES, dtype=torch.float64)


@pytest.mark.parametrize("gamma", [0.0, 2.0, 0.5])
def test_focal_loss_is_the_softmax_focal_formula(batch, gamma):
    logits, target, iu = batch
    valid, t, p_y, ce, _ = direct_terms(logits, target)
    alpha = ALPHA.numpy()[np.where(valid, t, 0)]
    options = LossConfig(loss="focal", focal_gamma=gamma)
    for weight, with_iu in ((None, False), (ALPHA, False), (ALPHA, True)):
        got = segmentation_loss(logits, target, "focal", options, CAMVID_VOID, weight, iu if with_iu else None, 2.0)
        factor = (alpha if weight is not None else 1.0) * ((1 + iu.numpy()) ** 2 if with_iu else 1.0)
        expected = mean_over_valid((1 - p_y) ** gamma * ce * factor, valid)
        assert float(got) == pytest.approx(expected, rel=1e-9)
    if gamma == 0:  # focal with γ = 0 is cross-entropy
        assert float(segmentation_loss(logits, target, "focal", options, CAMVID_VOID)) == pytest.approx(
            float(F.cross_entropy(logits, target, ignore_index=CAMVID_VOID)), rel=1e-12)


@pytest.mark.parametrize("threshold, min_kept", [(0.7, 10), (0.7, 5000), (0.05, 100), (1.0, 0)])
def test_ohem_keeps_the_pixels_mmsegmentation_keeps(batch, threshold, min_kept):
    """Kept: valid pixels whose true-class probability is below max(threshold, the (min_kept·B)-th
    smallest probability); the loss is their CE summed over the valid pixels' count."""
    logits, target, iu = batch
    valid, _, p_y, ce, _ = direct_terms(logits, target)
    probs = np.sort(p_y[valid])
    cut = max(threshold, probs[min(min_kept * 2, probs.size - 1)])
    kept = valid & (p_y < cut)
    options = LossConfig(loss="ohem", ohem_threshold=threshold, ohem_min_kept=min_kept)
    got = segmentation_loss(logits, target, "ohem", options, CAMVID_VOID, None, iu, 1.5)
    assert float(got) == pytest.approx(mean_over_valid(ce * kept * (1 + iu.numpy()) ** 1.5, valid), rel=1e-9)
    assert 0 < kept.sum() <= valid.sum()


def test_recall_loss_weights_each_class_by_its_batch_miss_rate(batch):
    """w_c = false negatives / ground-truth pixels of c in the batch, ignored pixels counted nowhere
    (the reference code maps them to a real class)."""
    logits, target, iu = batch
    valid, t, _, ce, log_p = direct_terms(logits, target)
    prediction = log_p.argmax(1)
    weight = np.ones(CAMVID_CLASSES)
    for c in range(CAMVID_CLASSES):
        truth = valid & (t == c)
        if truth.any():
            weight[c] = (truth & (prediction != c)).sum() / truth.sum()
    per_pixel = weight[np.where(valid, t, 0)] * ce
    options = LossConfig(loss="recall")
    assert float(segmentation_loss(logits, target, "recall", options, CAMVID_VOID)) == pytest.approx(
        mean_over_valid(per_pixel, valid), rel=1e-9)
    with_all = segmentation_loss(logits, target, "recall", options, CAMVID_VOID, ALPHA, iu, 2.0)
    expected = mean_over_valid(per_pixel * ALPHA.numpy()[np.where(valid, t, 0)] * (1 + iu.numpy()) ** 2, valid)
    assert float(with_all) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("method", ["dice", "lovasz"])
def test_region_losses_are_cross_entropy_plus_smp_and_refuse_iu(batch, method):
    from segmentation_models_pytorch.losses import DiceLoss, LovaszLoss

    logits, target, iu = batch
    valid, t, _, ce, _ = direct_terms(logits, target)
    region = (DiceLoss if method == "dice" else LovaszLoss)("multiclass", ignore_index=CAMVID_VOID)
    options = LossConfig(loss=method)
    got = segmentation_loss(logits, target, method, options, CAMVID_VOID, ALPHA)
    expected = mean_over_valid(ce * ALPHA.numpy()[np.where(valid, t, 0)], valid) + float(region(logits.float(), target))
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # the ignored pixels' logits do not matter
    changed = torch.where(torch.from_numpy(valid)[:, None], logits, logits * 5 + 3)
    assert float(segmentation_loss(changed, target, method, options, CAMVID_VOID, ALPHA)) == pytest.approx(
        float(got), rel=1e-6)
    with pytest.raises(ValueError, match="cannot be IU-weighted"):
        segmentation_loss(logits, target, method, options, CAMVID_VOID, None, iu, 2.0)
    with pytest.raises(IumaskError, match="region loss takes no per-pixel weight"):
        LossConfig(exponent=2.0, loss=method).check_iu_weighting()


def test_effective_number_weights_on_camvid_pixel_counts(camvid_dir):
    """w_c = (1 − β)/(1 − β^{n_c}) normalised to sum to C, on CamVid's training pixel counts (a class
    count computed here with one mask per class); β = 0 gives equal weights, β → 1 approaches the
    normalised inverse frequencies, and the default lies between."""
    import cv2
    from testdata import camvid_label_files

    counts = np.zeros(CAMVID_CLASSES)
    for path in camvid_label_files():
        label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        counts += [(label == c).sum() for c in range(CAMVID_CLASSES)]
    for beta in (0.999999, 0.9999, 0.99999999):
        raw = np.array([(1 - beta) / (1 - beta ** int(n)) for n in counts])
        expected = raw * CAMVID_CLASSES / raw.sum()
        np.testing.assert_allclose(class_weights(counts, "effective-number", beta=beta), expected, rtol=1e-9)
    np.testing.assert_allclose(class_weights(counts, "effective-number", beta=0.0), np.ones(CAMVID_CLASSES))
    inverse = (1 / counts) * CAMVID_CLASSES / (1 / counts).sum()
    np.testing.assert_allclose(class_weights(counts, "effective-number", beta=1 - 1e-12), inverse, rtol=1e-4)
    default = class_weights(counts, "effective-number")
    spread = default.max() / default.min()
    assert 2 < spread < inverse.max() / inverse.min()  # rarer classes weigh more, less than inverse


def test_bad_loss_options_are_one_line_errors():
    for options, needle in (({"loss": "hinge"}, "--loss must be one of cross-entropy, focal"),
                            ({"focal_gamma": -1}, "--focal-gamma"), ({"ohem_threshold": 0}, "--ohem-threshold"),
                            ({"ohem_min_kept": -3}, "--ohem-min-kept"),
                            ({"effective_number_beta": 1.0}, "--effective-number-beta")):
        with pytest.raises(IumaskError, match=needle):
            LossConfig(**options)


# ----------------------------------------------------------------------------- through the CLI



@pytest.fixture(scope="module")
def tiny(tiny_baseline, tmp_path_factory):
    return tiny_baseline(tmp_path_factory.mktemp("peer-losses"))


@pytest.fixture(scope="module")
def data(tiny):
    return tiny[0]


@pytest.fixture(scope="module")
def plain(tiny):
    """The manifest of the tiny baseline: plain cross-entropy with TRAIN's options."""
    return json.loads((tiny[1] / "mobilenet_v2" / "manifest.json").read_text())


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("args", [["--loss", "focal"],
                                  ["--loss", "ohem", "--ohem-threshold", "0.1", "--ohem-min-kept", "100"],
                                  ["--loss", "recall"], ["--loss", "dice"], ["--loss", "lovasz"],
                                  ["--class-weights", "effective-number"]])
def test_each_method_trains_and_changes_the_weights(data, plain, tmp_path, args):
    out = tmp_path / "out"
    iumask("train-baseline", "--data", data, "--out", out, *TRAIN, *args)
    manifest = json.loads((out / "mobilenet_v2" / "manifest.json").read_text())
    assert manifest["weights_sha256"] != plain["weights_sha256"]
    loss = manifest["loss"]
    assert loss.get("method", "cross-entropy") == (args[1] if args[0] == "--loss" else "cross-entropy")
    if args[0] == "--class-weights":
        assert loss["effective_number_beta"] == 0.999999 and len(loss["class_weight_values"]) == 10
    assert "method" not in plain["loss"]  # models of earlier versions keep their identity


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_iu_combines_with_a_peer_loss_and_region_losses_are_refused(data, tmp_path, capsys):
    out = tmp_path / "online"
    iumask("train-weighted", "--online", "--data", data, "--out", out, *TRAIN, "--size", "32x32",
           "--loss", "focal", "--class-weights", "inverse")
    loss = json.loads((out / "mobilenet_v2" / "manifest.json").read_text())["loss"]
    assert loss["method"] == "focal" and loss["focal_gamma"] == 2.0 and loss["exponent"] == 2.0
    capsys.readouterr()
    iumask("train-weighted", "--online", "--data", data, "--out", tmp_path / "dice", *TRAIN, "--size", "32x32",
           "--loss", "dice", expect=2)
    assert "a region loss takes no per-pixel weight" in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "dice").exists()


def test_help_and_experiment_spec_take_every_registered_method(tmp_path, capsys, make_synthetic):
    for command in ("train-baseline", "train-weighted", "run"):
        capsys.readouterr()
        iumask(command, "--help")
        text = capsys.readouterr().out
        assert all(name in text for name in LOSS_METHODS), command
    from iumask.experiment.spec import load_spec

    data = make_synthetic("peer-spec")
    base = f'name = "x"\nencoders = ["mobilenet_v2"]\nseeds = [0]\n[data]\nroot = "{data}"\n'
    spec = tmp_path / "spec.toml"
    spec.write_text(base + '[[arms]]\nname = "focal"\nloss = "focal"\nfocal_gamma = 1.0\nclass_weights = '
                    '"effective-number"\n[[arms]]\nname = "iu-ohem"\niu = "online"\nloss = "ohem"\n'
                    '[[evaluations]]\nsplit = "val"\n')
    arms = load_spec(spec).arms
    assert (arms[0].loss.loss, arms[0].loss.focal_gamma, arms[0].loss.class_weights) == (
        "focal", 1.0, "effective-number")
    assert (arms[1].loss.loss, arms[1].loss.exponent) == ("ohem", 2.0)
    spec.write_text(base + '[[arms]]\nname = "d"\niu = "online"\nloss = "lovasz"\n[[evaluations]]\nsplit = "val"\n')
    with pytest.raises(IumaskError, match=r"\[arms #1\].*region loss takes no per-pixel weight"):
        load_spec(spec)


def test_run_refuses_a_region_loss_with_iu_before_training(data, tmp_path, capsys):
    """run's weighted stage would refuse Dice with IU: the whole run stops before the baseline trains."""
    capsys.readouterr()
    iumask("run", "--data", data, "--out", tmp_path / "run", *TRAIN, "--loss", "dice", expect=2)
    assert "a region loss takes no per-pixel weight" in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "run" / "baseline").exists()
