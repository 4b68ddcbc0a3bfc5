"""How much the choice of test images moves a comparison: bootstrap intervals of Δ mIoU from each
run's per-image intersection and union counts (pure numpy, no I/O).

A resample draws the test images with replacement (the same draw for both arms and every seed:
the test set is one random factor shared by all runs), sums each class's intersection and union
over the drawn images and recomputes the dataset-level IoU from those sums, exactly as evaluate
computes it on the whole split (a class with no union pixels in the draw is left out of the mean,
as a class absent from labels and predictions is). Two intervals of Δ = other − reference,
averaged over the seeds both arms have:

* ``images``: the paired bootstrap over test images only, with the seeds fixed (how much the
  test images move Δ for these trained models);
* ``seeds_and_images``: a two-level bootstrap, the seeds drawn with replacement, then the images
  (how much a new set of seeds and a new test set would move it): the interval to quote; none with
  fewer than two paired seeds.

Percentile intervals; vectorised as one matrix product of the resample counts per run.
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 10_000
CONFIDENCE = 0.95


def image_draws(images: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, images) counts: how often each image is drawn in each resample of ``images``
    images with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(images, np.full(images, 1.0 / images), size=resamples).astype(np.float64)


def resampled_miou(intersection: np.ndarray, union: np.ndarray, draws: np.ndarray,
                   classes: list[int] | None = None) -> np.ndarray:
    """The dataset-level mIoU (over ``classes``, default all) of each resample: ``intersection`` and
    ``union`` are (images, classes) counts, ``draws`` the (resamples, images) counts of
    :func:`image_draws`. Classes whose union is 0 in a resample are left out of its mean (NaN when
    none is left)."""
    columns = slice(None) if classes is None else list(classes)
    inter = draws @ np.asarray(intersection, dtype=np.float64)[:, columns]
    uni = draws @ np.asarray(union, dtype=np.float64)[:, columns]
    defined = uni > 0
    iou = np.where(defined, inter / np.where(defined, uni, 1.0), 0.0)
    count = defined.sum(axis=1)
    return np.where(count > 0, iou.sum(axis=1) / np.maximum(count, 1), np.nan)


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> list[float]:
    """The central ``confidence`` percentile interval of ``values`` (NaN draws left out)."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return [math.nan, math.nan]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def paired_intervals(reference: dict[int, np.ndarray], other: dict[int, np.ndarray], full_reference: dict[int, float],
                     full_other: dict[int, float], seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """Bootstrap intervals of Δ = other − reference averaged over the seeds both have.

    ``reference`` and ``other``: {seed: the resampled metric of that run, one value per resample of the
    same :func:`image_draws`}; ``full_*``: {seed: the metric on the whole test set}. Returns the point
    estimate ``difference`` (mean over paired seeds of the full-set Δ), ``images`` (seeds fixed) and
    ``seeds_and_images`` (seeds drawn with replacement, ``seed`` seeding that draw) intervals."""
    seeds = sorted(set(reference) & set(other))
    out = {"difference": math.nan, "images": [math.nan, math.nan], "seeds_and_images": [math.nan, math.nan],
           "pairs": len(seeds), "confidence": confidence}
    if not seeds:
        return out
    deltas = np.stack([other[s] - reference[s] for s in seeds])  # (seeds, resamples)
    out["difference"] = float(np.mean([full_other[s] - full_reference[s] for s in seeds]))
    out["images"] = percentile_interval(deltas.mean(axis=0), confidence)
    if len(seeds) < 2:  # one seed says nothing of how seeds vary: no two-level interval
        return out
    rng = np.random.default_rng(seed)
    seed_draws = rng.multinomial(len(seeds), np.full(len(seeds), 1.0 / len(seeds)), size=deltas.shape[1])
    out["seeds_and_images"] = percentile_interval((seed_draws * deltas.T).sum(axis=1) / len(seeds), confidence)
    return out


# The overview items with a bootstrap interval: dataset-level IoU recomputed from resampled counts.
BOOTSTRAPPED = ("miou", "rare_miou")


def add_bootstrap(summary: dict, counts: dict, resamples: int = RESAMPLES, seed: int = 0,
                  confidence: float = CONFIDENCE) -> None:
    """Add ``bootstrap`` (see :func:`paired_intervals`, with ``resamples``) to each
    ``summary["groups"][…]["comparisons"][arm][item]`` of :data:`BOOTSTRAPPED`. ``counts``: the
    per-image counts by (arm, encoder, seed, dataset, split), each a dict with ``intersection``,
    ``union`` ((images, classes) arrays) and ``images`` (names). A group whose runs lack counts, or
    were scored on different images, gets none (``bootstrap_note`` says why)."""
    classes = summary["classes"]
    rare = [classes.index(r["class"]) for r in summary["rare_classes"]]
    for group in summary["groups"]:
        scope = (group["dataset"], group["split"])
        runs = {(key[0], key[2]): value for key, value in counts.items()
                if key[1] == group["encoder"] and key[3:] == scope}
        evaluated = {(arm, s) for arm, seeds in group["seeds"].items() for s in seeds}
        if not evaluated or not evaluated <= set(runs):
            group["bootstrap_note"] = "no per-image counts for some runs (evaluated before iumask kept them)"
            continue
        names = [list(runs[key]["images"]) for key in sorted(evaluated)]
        if any(n != names[0] for n in names):
            group["bootstrap_note"] = "the runs were scored on different test images"
            continue
        draws = image_draws(len(names[0]), resamples, seed)
        whole = np.ones((1, len(names[0])))
        for item, columns in (("miou", None), ("rare_miou", rare)):
            resampled, full = {}, {}
            for arm, s in evaluated:
                inter, uni = runs[(arm, s)]["intersection"], runs[(arm, s)]["union"]
                resampled.setdefault(arm, {})[s] = resampled_miou(inter, uni, draws, columns)
                full.setdefault(arm, {})[s] = float(resampled_miou(inter, uni, whole, columns)[0])
            reference = summary["reference"]
            for arm, compared in group["comparisons"].items():
                if item in compared and arm in resampled and reference in resampled:
                    compared[item]["bootstrap"] = dict(
                        paired_intervals(resampled[reference], resampled[arm], full[reference], full[arm], seed,
                                         confidence), resamples=resamples)
