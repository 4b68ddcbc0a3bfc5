"""The peer imbalance methods (docs/method.md §10): focal, OHEM, recall, class-balanced
(effective-number) weights, CE + Dice and CE + Lovász, alone and combined with IU weighting and
class weights. Each equals a direct numpy computation on a real CamVid batch (labels downsampled,
void = ignore, seeded random logits); each trains through the CLI and changes the weights relative
to plain cross-entropy; region losses refuse an IU weight."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runner import TINY_TRAIN as TRAIN
from cli_runner import iumask
from testdata import CAMVID_CLASSES, CAMVID_VOID, camvid_labels, downsample

from iumask.config import LossConfig
from iumask.core import LOSS_METHODS, class_weights, instance_uncertainty, pixel_entropy, segmentation_loss
from iumask.core.loss import ohem_selection
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


# ----------------------------------------------------------------------------- pinned behaviour (issue 26 §3)


def mmseg_ohem_weights(logits: np.ndarray, target: np.ndarray, ignore: int, thresh: float,
                       min_kept: int) -> np.ndarray:
    """mmsegmentation's ``OHEMPixelSampler.sample`` with ``thresh``, transcribed in numpy: the batch
    keeps ``min_kept`` per image (``batch_kept = min_kept * B``); the cut is
    ``max(sorted valid probabilities[min(batch_kept, n - 1)], thresh)`` and a valid pixel is kept
    when its true-class probability is strictly below it."""
    batch_kept = min_kept * target.shape[0]
    valid = target != ignore
    z = logits - logits.max(1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    seg_prob = np.take_along_axis(prob, np.where(valid, target, 0)[:, None], 1)[:, 0]
    sort_prob = np.sort(seg_prob[valid])
    min_threshold = sort_prob[min(batch_kept, sort_prob.size - 1)] if sort_prob.size else 0.0
    threshold = max(min_threshold, thresh)
    weight = np.zeros(target.shape)
    weight[valid] = (seg_prob[valid] < threshold).astype(float)
    return weight


def test_ohem_minimum_is_per_image_times_batch_and_decides_on_a_confident_batch():
    """Every valid pixel is confident (true-class probability > 0.8 > the 0.7 threshold), so the
    threshold keeps none and the minimum decides: exactly min_kept · B pixels (strict comparison,
    distinct probabilities), chosen over the whole batch (here all from the least confident image),
    as mmsegmentation keeps them. Wrong code fails: a minimum not times B keeps 10, ``<=`` keeps 31,
    a per-image minimum keeps 10 in each image, min() for max() keeps none."""
    rng = np.random.default_rng(26)
    batch, classes, size, ignore, min_kept = 3, 4, 8, 255, 10
    target = rng.integers(0, classes, (batch, size, size))
    target[:, 0, :2] = ignore
    margin = rng.uniform(5.0, 9.0, target.shape)
    margin[0] -= 2.5  # image 0 is the least confident
    logits = np.zeros((batch, classes, size, size))
    np.put_along_axis(logits, np.where(target == ignore, 0, target)[:, None], margin[:, None], 1)
    t_logits, t_target = torch.from_numpy(logits), torch.from_numpy(target)
    valid, _, prob, ce, _ = direct_terms_for(t_logits, t_target, ignore)
    assert prob[valid].min() > 0.8 and np.unique(prob[valid]).size == valid.sum()

    expected = mmseg_ohem_weights(logits, target, ignore, 0.7, min_kept)
    got = ohem_selection(t_logits, t_target, ignore, 0.7, min_kept).numpy()
    np.testing.assert_array_equal(got, expected)
    assert got.sum() == min_kept * batch == 30
    assert got[0].sum() == 30 and got[1:].sum() == 0
    options = LossConfig(loss="ohem", ohem_threshold=0.7, ohem_min_kept=min_kept)
    loss = segmentation_loss(t_logits, t_target, "ohem", options, ignore)
    assert float(loss) == pytest.approx(mean_over_valid(ce * expected, valid), rel=1e-12)


def direct_terms_for(logits, target, ignore):
    """:func:`direct_terms` for any ignore label."""
    z = logits.numpy()
    log_p = z - z.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    t = target.numpy()
    valid = t != ignore
    log_py = np.take_along_axis(log_p, np.where(valid, t, 0)[:, None], 1)[:, 0]
    return valid, t, np.exp(log_py), -log_py, log_p


def test_ohem_with_a_minimum_of_a_whole_sample_is_plain_cross_entropy_and_says_so():
    """With --ohem-min-kept at least a sample's pixels, the weights are bitwise plain CE's (the
    threshold above every probability), which the note says before training; a smaller minimum,
    or another loss, gets no note."""
    from iumask.losses import ohem_note

    logits = torch.randn(2, 5, 12, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.1
    target = torch.randint(0, 5, (2, 12, 16), generator=torch.Generator().manual_seed(1))
    options = LossConfig(loss="ohem", ohem_min_kept=12 * 16)
    assert torch.equal(segmentation_loss(logits, target, "ohem", options, 255),
                       segmentation_loss(logits, target, "cross-entropy", options, 255))
    note = ohem_note(options, (12, 16))
    assert note == ("--ohem-min-kept 192 is at least the 192 pixels of a training sample (16x12, WxH): OHEM keeps "
                    "every pixel and trains as plain cross-entropy; pass a smaller --ohem-min-kept (e.g. 12, 1/16 of "
                    "a sample, as mmsegmentation's 100000 is for 512x1024 crops)")
    assert ohem_note(LossConfig(loss="ohem", ohem_min_kept=191), (12, 16)) is None
    assert ohem_note(LossConfig(loss="ohem"), (315, 316)) is not None  # the default, under 316 x 316
    assert ohem_note(LossConfig(loss="ohem"), (317, 316)) is None
    assert ohem_note(LossConfig(loss="focal", ohem_min_kept=10**9), (12, 16)) is None


def test_effective_number_weights_sum_to_c_when_classes_are_absent():
    """Absent classes weigh 0 and the present ones share the sum C (not the number of present
    classes), in the ratios of (1 − β)/(1 − β^n)."""
    counts = np.array([1000, 0, 5_000_000, 0, 30])
    beta = 0.9999
    weights = class_weights(counts, "effective-number", beta=beta, warn=lambda message: None)
    assert weights.sum() == pytest.approx(5, rel=1e-12)
    assert weights[1] == weights[3] == 0
    raw = np.array([(1 - beta) / (1 - beta ** n) for n in counts[[0, 2, 4]]])
    np.testing.assert_allclose(weights[[0, 2, 4]], raw * 5 / raw.sum(), rtol=1e-9)


def test_class_weights_report_an_absent_class_through_the_callback_only():
    told = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Python warning would fail here
        class_weights([10, 0, 30], "effective-number", warn=told.append)
    assert told == ["classes [1] never occur in the training labels; their class weight is 0"]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_cli_warnings_are_one_line_each_and_no_python_warning_escapes(make_synthetic, tmp_path, capfd):
    """A class absent from the training labels under effective-number weights gave a raw Python
    UserWarning (file, line number, source line); OHEM whose minimum covers a whole 32x32 sample
    said nothing. Each is now one ``warning:`` line, before training."""
    root = make_synthetic("absent-class")
    classes = json.loads((root / "classes.json").read_text())
    classes["names"].append("unused")
    if "colors" in classes:
        classes["colors"].append([1, 2, 3])
    (root / "classes.json").write_text(json.dumps(classes))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        iumask("train-baseline", "--data", root, "--out", tmp_path / "out", *TRAIN,
               "--class-weights", "effective-number", "--loss", "ohem")
    assert not [w for w in caught if "iumask" in str(w.filename)], [str(w.message) for w in caught]
    err = capfd.readouterr().err
    assert "UserWarning" not in err and "warnings.warn" not in err, err
    absent = [line for line in err.splitlines() if "never occur" in line]
    assert absent == ["warning: classes [10] never occur in the training labels; their class weight is 0"], err
    ohem = [line for line in err.splitlines() if "--ohem-min-kept" in line]
    assert len(ohem) == 1 and ohem[0].startswith("warning: --ohem-min-kept 100000 is at least the 1024 pixels"), err
