"""What a study can resolve (issue 27 §1-2), against independent computations: the paired t-test's
power, minimum detectable effect and seeds needed against statsmodels' ``TTestPower``; the bootstrap
intervals of Δ mIoU against ``scipy.stats.bootstrap`` and a per-resample loop, on per-image counts of
real CamVid labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from testdata import load_camvid_labels, skip_without_camvid

from iumask.experiment.bootstrap import add_bootstrap, image_draws, paired_intervals, resampled_miou
from iumask.experiment.significance import (
    add_holm,
    add_power,
    compare,
    minimum_detectable_effect,
    paired_power,
    seeds_needed,
)

statsmodels_power = pytest.importorskip("statsmodels.stats.power")


@pytest.mark.parametrize("effect, n, alpha", [(0.5, 5, 0.05), (1.2, 3, 0.05 / 8), (2.0, 2, 0.05), (0.3, 40, 0.01),
                                              (-0.8, 10, 0.0125)])
def test_power_matches_statsmodels(effect, n, alpha):
    expected = statsmodels_power.TTestPower().power(effect_size=effect, nobs=n, alpha=alpha,
                                                    alternative="two-sided")
    assert paired_power(effect, n, alpha) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def one_sided_power(effect: float, n: int, alpha: float) -> float:
    return statsmodels_power.TTestPower().power(effect_size=effect, nobs=n, alpha=alpha / 2, alternative="larger")


@pytest.mark.parametrize("sd, n, alpha", [(0.01, 3, 0.05 / 8), (0.02, 5, 0.05 / 8), (0.005, 5, 0.05),
                                          (0.03, 12, 0.01)])
def test_minimum_detectable_effect_matches_statsmodels(sd, n, alpha):
    """statsmodels' power is exactly 80 % at the MDE. Its two-sided power is NaN where scipy loses the far
    tail (e.g. n = 3 at α = 0.05/8, so its solve_power stops at 0.7988), so the oracle is its one-sided
    power at α/2: the two-sided power less a far tail below 1e-6 here."""
    mde = minimum_detectable_effect(sd, n, alpha)
    assert one_sided_power(mde / sd, n, alpha) == pytest.approx(0.8, abs=1e-6)
    assert one_sided_power(0.99 * mde / sd, n, alpha) < 0.8


@pytest.mark.parametrize("difference, sd, alpha", [(0.01, 0.01, 0.05 / 8), (0.013, 0.02, 0.05 / 8),
                                                   (-0.02, 0.01, 0.05), (0.05, 0.01, 0.01)])
def test_seeds_needed_is_the_first_n_with_80_percent_power(difference, sd, alpha):
    expected = next((n for n in range(2, 51) if one_sided_power(abs(difference) / sd, n, alpha) >= 0.8), None)
    assert seeds_needed(difference, sd, alpha) == expected
    assert expected is not None  # cases chosen to be resolvable within 50 seeds


def test_seeds_needed_beyond_fifty_and_undefined_cases():
    assert seeds_needed(0.001, 0.05, 0.05 / 8) == math.inf  # d_z = 0.02: thousands of seeds
    assert seeds_needed(0.0, 0.01, 0.05) == math.inf  # no difference: no number of seeds detects it
    assert math.isnan(seeds_needed(math.nan, 0.01, 0.05))
    assert math.isnan(seeds_needed(0.01, 0.0, 0.05))  # no spread: the t-test is undefined
    assert math.isnan(minimum_detectable_effect(math.nan, 3, 0.05))
    assert math.isnan(minimum_detectable_effect(0.01, 1, 0.05))
    assert math.isnan(minimum_detectable_effect(0.0, 5, 0.05))


def test_add_power_uses_the_observed_paired_sd_at_holms_strictest_level():
    """Three arms against a reference over 5 seeds: each comparison's MDE and seeds needed at α/3 from
    the std of its own per-seed differences (recomputed here), NaN-p arms not counted in m."""
    rng = np.random.default_rng(3)
    reference = {s: float(v) for s, v in enumerate(rng.normal(0.5, 0.02, 5))}
    arms = {"a": {s: v + 0.01 + rng.normal(0, 0.004) for s, v in reference.items()},
            "b": {s: v - 0.003 + rng.normal(0, 0.01) for s, v in reference.items()},
            "c": {s: v + 0.02 + rng.normal(0, 0.002) for s, v in reference.items()},
            "one-seed": {0: reference[0] + 0.1}}
    comparisons = {arm: {"miou": compare(reference, values)} for arm, values in arms.items()}
    add_holm(comparisons)
    add_power(comparisons)
    for arm in ("a", "b", "c"):
        c = comparisons[arm]["miou"]
        sd = float(np.std([arms[arm][s] - reference[s] for s in reference], ddof=1))
        assert c["alpha_holm"] == pytest.approx(0.05 / 3)
        assert one_sided_power(c["mde"] / sd, 5, 0.05 / 3) == pytest.approx(0.8, abs=1e-6)
        assert c["seeds_needed"] == seeds_needed(c["difference"], sd, 0.05 / 3)
    assert math.isnan(comparisons["one-seed"]["miou"]["mde"])
    assert comparisons["one-seed"]["miou"]["seeds_needed"] is None
    assert comparisons["one-seed"]["miou"]["seeds_needed_beyond"] is None


# ----------------------------------------------------------------------------- bootstrap


def image_counts(prediction: np.ndarray, label: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (images, classes) intersection and union, written out with numpy (255 ignored)."""
    inter = np.zeros((len(label), classes), np.int64)
    union = np.zeros((len(label), classes), np.int64)
    for i, (p, t) in enumerate(zip(prediction, label)):
        valid = t != 255
        for c in range(classes):
            inter[i, c] = np.sum((p == c) & (t == c) & valid)
            union[i, c] = np.sum(((p == c) | (t == c)) & valid)
    return inter, union


def corrupted(labels: np.ndarray, rng: np.random.Generator, rate: float) -> np.ndarray:
    """A "prediction": the label with a share ``rate`` of its 8x8 blocks set to a random class."""
    out = labels.copy()
    n, h, w = labels.shape
    blocks = rng.random((n, h // 8, w // 8)) < rate
    values = rng.integers(0, 11, (n, h // 8, w // 8))
    full = np.kron(blocks, np.ones((8, 8), bool))[:, :h, :w]
    out[:, :full.shape[1], :full.shape[2]][full] = np.kron(values, np.ones((8, 8), int))[:, :h, :w][full]
    return out


@pytest.fixture(scope="module")
def camvid_runs():
    """Per-image counts of two arms × three seeds on 40 real CamVid labels (2x downscaled)."""
    skip_without_camvid(40)
    labels = np.stack([label[::2, ::2] for label in load_camvid_labels(40)])
    rng = np.random.default_rng(7)
    runs = {}
    for arm, rate in (("regular", 0.30), ("other", 0.25)):
        for seed in range(3):
            runs[(arm, seed)] = image_counts(corrupted(labels, rng, rate), labels, 11)
    return runs


def dataset_miou(inter: np.ndarray, union: np.ndarray, classes=None) -> float:
    cols = slice(None) if classes is None else classes
    i, u = inter[:, cols].sum(0), union[:, cols].sum(0)
    return float(np.mean(i[u > 0] / u[u > 0]))


def test_resampled_miou_is_the_dataset_miou_of_each_resample(camvid_runs):
    inter, union = camvid_runs[("regular", 0)]
    draws = image_draws(len(inter), 50, seed=1)
    got = resampled_miou(inter, union, draws)
    for b in range(50):
        chosen = np.repeat(np.arange(len(inter)), draws[b].astype(int))
        assert got[b] == pytest.approx(dataset_miou(inter[chosen], union[chosen]), rel=1e-12)
    rare = [2, 6, 9]
    got = resampled_miou(inter, union, draws, rare)
    chosen = np.repeat(np.arange(len(inter)), draws[0].astype(int))
    assert got[0] == pytest.approx(dataset_miou(inter[chosen], union[chosen], rare), rel=1e-12)


def test_image_interval_matches_scipy_bootstrap(camvid_runs):
    """The paired bootstrap over images (seeds fixed) against scipy.stats.bootstrap resampling the
    image indices itself (paired: one index array drives both arms and every seed)."""
    n = len(camvid_runs[("regular", 0)][0])

    def delta(indices, axis=-1):
        indices = np.asarray(indices, int)
        return np.mean([dataset_miou(camvid_runs[("other", s)][0][indices], camvid_runs[("other", s)][1][indices])
                        - dataset_miou(camvid_runs[("regular", s)][0][indices],
                                       camvid_runs[("regular", s)][1][indices]) for s in range(3)])

    reference = scipy_interval = stats.bootstrap((np.arange(n),), delta, vectorized=False, n_resamples=4000,
                                                 method="percentile", random_state=np.random.default_rng(0))
    draws = image_draws(n, 4000, seed=0)
    whole = np.ones((1, n))
    resampled = {arm: {s: resampled_miou(*camvid_runs[(arm, s)], draws) for s in range(3)}
                 for arm in ("regular", "other")}
    full = {arm: {s: float(resampled_miou(*camvid_runs[(arm, s)], whole)[0]) for s in range(3)}
            for arm in ("regular", "other")}
    got = paired_intervals(resampled["regular"], resampled["other"], full["regular"], full["other"], seed=0)
    low, high = reference.confidence_interval
    width = high - low
    assert width > 0.005  # a real interval, not a degenerate one
    # Two independent Monte Carlo draws of 4000: the ends agree to a few % of the width.
    assert got["images"][0] == pytest.approx(low, abs=0.08 * width)
    assert got["images"][1] == pytest.approx(high, abs=0.08 * width)
    assert got["difference"] == pytest.approx(delta(np.arange(n)), rel=1e-12)
    assert scipy_interval is reference


def test_two_level_interval_by_loop(camvid_runs):
    """Seeds drawn with replacement then images: the vectorised interval equals a loop over resamples
    with the same draws, and it is at least as wide as the images-only one here (seeds vary)."""
    n = len(camvid_runs[("regular", 0)][0])
    draws = image_draws(n, 300, seed=5)
    resampled = {arm: {s: resampled_miou(*camvid_runs[(arm, s)], draws) for s in range(3)}
                 for arm in ("regular", "other")}
    full = {arm: {s: 0.0 for s in range(3)} for arm in ("regular", "other")}
    got = paired_intervals(resampled["regular"], resampled["other"], full["regular"], full["other"], seed=11)
    rng = np.random.default_rng(11)
    seed_draws = rng.multinomial(3, np.full(3, 1 / 3), size=300)
    values = []
    for b in range(300):
        chosen_seeds = np.repeat(np.arange(3), seed_draws[b])
        values.append(np.mean([resampled["other"][s][b] - resampled["regular"][s][b] for s in chosen_seeds]))
    assert got["seeds_and_images"] == pytest.approx(list(np.percentile(values, [2.5, 97.5])), rel=1e-12)


def test_add_bootstrap_fills_the_summary_and_notes_missing_counts(camvid_runs):
    names = np.array([f"image{i}" for i in range(len(camvid_runs[("regular", 0)][0]))])
    counts = {(arm, "enc", s, "camvid", "test"): {"intersection": i, "union": u, "images": names}
              for (arm, s), (i, u) in camvid_runs.items()}
    classes = [f"c{k}" for k in range(11)]
    summary = {"classes": classes, "reference": "regular", "rare_classes": [{"class": "c2"}, {"class": "c9"}],
               "groups": [{"dataset": "camvid", "split": "test", "encoder": "enc",
                           "seeds": {"regular": [0, 1, 2], "other": [0, 1, 2]},
                           "comparisons": {"other": {"miou": {}, "rare_miou": {}}}}]}
    add_bootstrap(summary, counts, resamples=200, seed=0)
    boot = summary["groups"][0]["comparisons"]["other"]["miou"]["bootstrap"]
    expected = np.mean([dataset_miou(*camvid_runs[("other", s)]) - dataset_miou(*camvid_runs[("regular", s)])
                        for s in range(3)])
    assert boot["difference"] == pytest.approx(expected, rel=1e-12) and boot["resamples"] == 200
    assert boot["images"][0] < boot["difference"] < boot["images"][1]
    rare = summary["groups"][0]["comparisons"]["other"]["rare_miou"]["bootstrap"]
    assert rare["difference"] == pytest.approx(np.mean(
        [dataset_miou(*camvid_runs[("other", s)], [2, 9]) - dataset_miou(*camvid_runs[("regular", s)], [2, 9])
         for s in range(3)]), rel=1e-12)
    # Same seed: the same intervals; a run without counts: a note, no interval.
    again = {"classes": classes, "reference": "regular", "rare_classes": summary["rare_classes"],
             "groups": [dict(summary["groups"][0], comparisons={"other": {"miou": {}, "rare_miou": {}}})]}
    add_bootstrap(again, counts, resamples=200, seed=0)
    assert again["groups"][0]["comparisons"]["other"]["miou"]["bootstrap"] == boot
    del counts[("other", "enc", 1, "camvid", "test")]
    summary["groups"][0]["comparisons"] = {"other": {"miou": {}, "rare_miou": {}}}
    add_bootstrap(summary, counts, resamples=200, seed=0)
    assert "bootstrap" not in summary["groups"][0]["comparisons"]["other"]["miou"]
    assert "no per-image counts" in summary["groups"][0]["bootstrap_note"]


def test_bootstrap_edge_cases_by_hand():
    """Hand cases: a resample where no selected class has union pixels is NaN (not 0); with one class
    defined the mIoU is that class's IoU; only the seeds both arms have are paired; the confidence
    level is the one asked for; no common seed gives NaN intervals."""
    from iumask.experiment.bootstrap import percentile_interval

    inter = np.array([[2, 0, 0], [1, 0, 3]])
    union = np.array([[4, 0, 0], [2, 0, 6]])
    draws = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    # draw 0: image 0 twice: class 0 IoU 4/8, class 2 undefined; draw 2: image 1 twice
    got = resampled_miou(inter, union, draws, [0])
    assert got.tolist() == [0.5, 0.5, 0.5]
    got = resampled_miou(inter, union, draws, [2])
    assert math.isnan(got[0]) and got[1] == 0.5 and got[2] == 0.5
    assert np.isnan(resampled_miou(inter, union, draws, [1])).all()
    assert resampled_miou(inter, union, draws)[1] == pytest.approx((3 / 6 + 3 / 6) / 2)
    values = np.linspace(0.0, 1.0, 101)
    assert percentile_interval(values, 0.9) == pytest.approx([0.05, 0.95])
    assert percentile_interval(np.array([0.3]), 0.95) == [0.3, 0.3]
    assert all(math.isnan(v) for v in percentile_interval(np.array([np.nan])))
    ref = {0: np.array([0.1, 0.2]), 1: np.array([0.3, 0.3])}
    other = {1: np.array([0.5, 0.6]), 2: np.array([0.9, 0.9])}
    out = paired_intervals(ref, other, {0: 0.1, 1: 0.3}, {1: 0.55, 2: 0.9}, confidence=0.5)
    assert out["pairs"] == 1 and out["difference"] == pytest.approx(0.25) and out["confidence"] == 0.5
    assert out["images"] == pytest.approx([0.2 + 0.25 * 0.1, 0.2 + 0.75 * 0.1])
    assert all(math.isnan(v) for v in out["seeds_and_images"])  # one pair: no spread over seeds to resample
    none = paired_intervals(ref, {5: np.array([0.1, 0.1])}, {0: 0.1, 1: 0.3}, {5: 0.1})
    assert none["pairs"] == 0 and math.isnan(none["difference"])
    assert all(math.isnan(v) for v in none["images"] + none["seeds_and_images"])


def test_add_bootstrap_per_group_rare_columns_seed_and_names(camvid_runs):
    """Two groups (two datasets): the first lacks a run's counts, the second is complete, so the note
    is the first's only; the rare-class intervals come from the rare columns' resamples; another
    bootstrap seed gives other intervals; runs scored on other images get a note, no interval."""
    n = len(camvid_runs[("regular", 0)][0])
    names = np.array([f"image{i}" for i in range(n)])
    counts = {}
    for dataset in ("a", "b"):
        for (arm, s), (i, u) in camvid_runs.items():
            counts[(arm, "enc", s, dataset, "test")] = {"intersection": i, "union": u, "images": names}
    del counts[("regular", "enc", 2, "a", "test")]

    def summary_of():
        group = {"split": "test", "encoder": "enc", "seeds": {"regular": [0, 1, 2], "other": [0, 1, 2]}}
        return {"classes": [f"c{k}" for k in range(11)], "reference": "regular",
                "rare_classes": [{"class": "c2"}, {"class": "c9"}],
                "groups": [dict(group, dataset=d, comparisons={"other": {"miou": {}, "rare_miou": {}}})
                           for d in ("a", "b")]}

    summary = summary_of()
    add_bootstrap(summary, counts, resamples=300, seed=4)
    first, second = summary["groups"]
    assert "no per-image counts" in first["bootstrap_note"] and "bootstrap_note" not in second
    draws = image_draws(n, 300, seed=4)
    resampled = {arm: {s: resampled_miou(*camvid_runs[(arm, s)], draws, [2, 9]) for s in range(3)}
                 for arm in ("regular", "other")}
    full = {arm: {s: dataset_miou(*camvid_runs[(arm, s)], [2, 9]) for s in range(3)} for arm in ("regular", "other")}
    expected = paired_intervals(resampled["regular"], resampled["other"], full["regular"], full["other"], seed=4)
    got = second["comparisons"]["other"]["rare_miou"]["bootstrap"]
    assert got["images"] == pytest.approx(expected["images"], rel=1e-12)
    assert got["seeds_and_images"] == pytest.approx(expected["seeds_and_images"], rel=1e-12)
    other_seed = summary_of()
    add_bootstrap(other_seed, counts, resamples=300, seed=5)
    assert other_seed["groups"][1]["comparisons"]["other"]["miou"]["bootstrap"]["images"] != \
        second["comparisons"]["other"]["miou"]["bootstrap"]["images"]
    counts[("other", "enc", 1, "b", "test")] = dict(counts[("other", "enc", 1, "b", "test")], images=names[::-1])
    renamed = summary_of()
    add_bootstrap(renamed, counts, resamples=300, seed=4)
    assert renamed["groups"][1]["bootstrap_note"] == "the runs were scored on different test images"
    assert "bootstrap" not in renamed["groups"][1]["comparisons"]["other"]["miou"]
