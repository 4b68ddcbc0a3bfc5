"""The experiment's statistics, from ``results.csv`` rows alone (no I/O, no models): mean ± std
over seeds per arm, the k rarest training classes' differences to the reference arm with
two-sided p-values from scipy (Welch's t-test and the paired t-test over seeds), and the tables
of ``report.md`` as plain rows.

Conventions (docs/experiments.md): std is the sample standard deviation (ddof = 1; "n/a" with
one seed); a class whose IoU is undefined in a run (absent from both label and prediction) is
left out of that arm's mean for that class; the paired test pairs runs with the same seed (same
initial weights and data order), over the seeds both arms have.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

RESULT_COLUMNS = ("arm", "encoder", "seed", "dataset", "split", "metric", "class", "value")
# Whole-split metrics of an evaluation result, in report order, with their labels.
SPLIT_METRICS = (("miou", "mIoU"), ("pixel_accuracy", "pixel acc."), ("pavpu", "PAvPU"),
                 ("p_accurate_given_certain", "p(acc|cert)"), ("p_uncertain_given_inaccurate", "p(unc|inacc)"),
                 ("ece", "ECE"), ("brier", "Brier"), ("nll", "NLL"), ("mean_entropy", "mean entropy"),
                 ("pavpu_threshold", "u_th"), ("mean_accuracy", "mAcc"), ("per_image_miou", "per-image mIoU"),
                 ("worst_10pct_miou", "worst-10 % mIoU"), ("instance_recall", "instance recall"),
                 ("instance_recall_small", "inst. recall small"), ("instance_recall_medium", "inst. recall medium"),
                 ("instance_recall_large", "inst. recall large"), ("aurc", "AURC"), ("augrc", "AUGRC"),
                 ("risk_at_80_coverage", "risk@80 % cov."), ("temperature", "T"), ("ece_scaled", "ECE at T"),
                 ("nll_scaled", "NLL at T"))
UNCERTAINTY_METRICS = ("pavpu", "p_accurate_given_certain", "p_uncertain_given_inaccurate", "ece", "brier", "nll",
                       "temperature", "ece_scaled", "nll_scaled")
LABELS = dict(SPLIT_METRICS)
# The overview ("which method?"): each arm's mean ± std, and for these its difference to the
# reference with Holm-adjusted paired p-values. rare_miou: mean IoU of the rarest training classes.
OVERVIEW = ("miou", "rare_miou", "mean_accuracy", "worst_10pct_miou", "instance_recall_small", "ece", "aurc")
OVERVIEW_TESTED = ("rare_miou", "mean_accuracy", "worst_10pct_miou", "instance_recall_small", "ece", "aurc")
LABELS["rare_miou"] = "rare-class mIoU"


def result_rows(arm: str, encoder: str, seed: int, dataset: str, split: str, result: dict) -> list[dict]:
    """One evaluation result (``iumask.stages.evaluate`` format) as ``results.csv`` rows: one per
    class IoU (metric ``iou``) and one per whole-split metric (class empty)."""
    base = {"arm": arm, "encoder": encoder, "seed": int(seed), "dataset": dataset, "split": split}
    # None: undefined (strict JSON's null for NaN, e.g. a class absent from labels and predictions)
    rows = [dict(base, metric="iou", **{"class": name}, value=math.nan if value is None else float(value))
            for name, value in zip(result["classes"], result["iou"])]
    rows += [dict(base, metric=key, **{"class": ""}, value=math.nan if result[key] is None else float(result[key]))
             for key, _ in SPLIT_METRICS if key in result]
    return rows


def _values(rows: list[dict], **where: Any) -> dict[int, float]:
    """{seed: value} of the rows matching ``where`` (NaN values left out)."""
    out = {}
    for row in rows:
        if all(row[k] == v for k, v in where.items()) and not math.isnan(float(row["value"])):
            out[int(row["seed"])] = float(row["value"])
    return out


def mean_std(values: list[float]) -> dict:
    """Mean and sample std (ddof 1; NaN with fewer than 2 values) and n."""
    n = len(values)
    return {"mean": float(np.mean(values)) if n else math.nan,
            "std": float(np.std(values, ddof=1)) if n >= 2 else math.nan, "n": n}


def compare(reference: dict[int, float], other: dict[int, float]) -> dict:
    """``other`` − ``reference`` (difference of means) with two-sided p-values: Welch's t-test over
    all runs, the paired t-test over the seeds both have (NaN with fewer than 2 runs or pairs, or
    when the test is undefined, e.g. no variance at all)."""
    from scipy import stats

    a, b = list(reference.values()), list(other.values())
    seeds = sorted(set(reference) & set(other))
    welch = paired = math.nan
    if len(a) >= 2 and len(b) >= 2:
        welch = float(stats.ttest_ind(b, a, equal_var=False).pvalue)
    if len(seeds) >= 2:
        paired = float(stats.ttest_rel([other[s] for s in seeds], [reference[s] for s in seeds]).pvalue)
    diff = float(np.mean(b) - np.mean(a)) if a and b else math.nan
    # The spread the paired test sees (sample std of the per-seed differences): what the power uses.
    paired_sd = float(np.std([other[s] - reference[s] for s in seeds], ddof=1)) if len(seeds) >= 2 else math.nan
    return {"difference": diff, "welch_p": welch, "paired_p": paired, "n_reference": len(a), "n": len(b),
            "pairs": len(seeds), "paired_sd": paired_sd}


def _rare_miou(rows: list[dict], arm: str, rare: list[str], scope: dict) -> dict[int, float]:
    """{seed: mean IoU over the rarest classes} (classes undefined in a run left out)."""
    per_class = [_values(rows, arm=arm, metric="iou", **{"class": name}, **scope) for name in rare]
    seeds = sorted({seed for values in per_class for seed in values})
    return {seed: float(np.mean([v[seed] for v in per_class if seed in v])) for seed in seeds}


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN stays NaN and is not counted):
    the i-th smallest of m becomes max over j ≤ i of min(1, (m − j + 1) · p_(j))."""
    known = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (len(known) - rank) * p))
        adjusted[i] = running
    return adjusted


def add_holm(comparisons: dict[str, dict[str, dict]]) -> None:
    """Add ``welch_p_holm`` and ``paired_p_holm`` to ``comparisons[arm][item]``: each item's tests of
    all arms against the reference form one family (one question: does any method change it?)."""
    arms = list(comparisons)
    items = {item for arm in arms for item in comparisons[arm]}
    for item in items:
        for test in ("welch_p", "paired_p"):
            family = [arm for arm in arms if item in comparisons[arm]]
            for arm, value in zip(family, holm([comparisons[arm][item][test] for arm in family])):
                comparisons[arm][item][f"{test}_holm"] = value


# ----------------------------------------------------------------------------- power

POWER = 0.8
ALPHA = 0.05
MAX_SEEDS = 50  # "seeds needed" beyond this is reported as more than MAX_SEEDS


def paired_power(effect: float, n: int, alpha: float) -> float:
    """Power of the two-sided paired t-test over ``n`` pairs at level ``alpha`` for a standardized
    effect ``effect`` = Δ / sd of the differences (Cohen's d_z): the probability that the
    noncentral t (df n − 1, noncentrality d_z·√n) falls beyond either critical value."""
    from scipy import stats

    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)
    shift = abs(effect) * math.sqrt(n)  # symmetric: the far tail of -shift is the near tail of +shift
    far = float(stats.nct.sf(critical, df, -shift))
    # The far tail is below 1e-10 wherever scipy's series loses it to NaN (large shifts).
    return float(stats.nct.sf(critical, df, shift)) + (0.0 if math.isnan(far) else far)


def minimum_detectable_effect(sd: float, n: int, alpha: float, power: float = POWER) -> float:
    """The smallest |Δ| the two-sided paired t-test over ``n`` pairs detects with ``power`` at level
    ``alpha``, when the per-pair differences have standard deviation ``sd`` (NaN for n < 2 or an
    undefined sd)."""
    from scipy import optimize

    if n < 2 or not math.isfinite(sd) or sd <= 0 or not 0 < alpha < 1:
        return math.nan  # no spread at all: the t-test itself is undefined
    high = 1.0
    while paired_power(high, n, alpha) < power:
        high *= 2
    effect = optimize.brentq(lambda d: paired_power(d, n, alpha) - power, 0.0, high, xtol=1e-10)
    return float(effect * sd)


def seeds_needed(difference: float, sd: float, alpha: float, power: float = POWER,
                 most: int = MAX_SEEDS) -> float:
    """The fewest seeds (pairs, from 2) at which the two-sided paired t-test at ``alpha`` detects a true
    difference ``difference`` with ``power``, if the differences keep standard deviation ``sd``;
    ``math.inf`` when more than ``most`` would be needed (Δ = 0 included); NaN when undefined (Δ or sd
    undefined, or no spread at all, where the t-test is undefined)."""
    if not (math.isfinite(difference) and math.isfinite(sd)) or sd <= 0:
        return math.nan
    effect = abs(difference) / sd
    return next((n for n in range(2, most + 1) if paired_power(effect, n, alpha) >= power), math.inf)


def add_power(comparisons: dict[str, dict[str, dict]], alpha: float = ALPHA, power: float = POWER) -> None:
    """Add ``mde`` (minimum detectable effect), ``seeds_needed`` and ``alpha_holm`` to each
    ``comparisons[arm][item]``: at Holm's strictest level α/m, m the tests of the item's family (the
    level the family's smallest p-value must pass), from the observed sd of the paired differences."""
    arms = list(comparisons)
    for item in {item for arm in arms for item in comparisons[arm]}:
        family = [arm for arm in arms if item in comparisons[arm]]
        tested = sum(not math.isnan(comparisons[arm][item]["paired_p"]) for arm in family)
        level = alpha / max(tested, 1)
        for arm in family:
            c = comparisons[arm][item]
            c["alpha_holm"] = level
            c["mde"] = minimum_detectable_effect(c["paired_sd"], c["pairs"], level, power)
            needed = seeds_needed(c["difference"], c["paired_sd"], level, power)
            # JSON: a number of seeds, or null with seeds_needed_beyond (more than MAX_SEEDS) or not (undefined)
            c["seeds_needed"] = int(needed) if math.isfinite(needed) else None
            c["seeds_needed_beyond"] = MAX_SEEDS if needed == math.inf else None


def rarest_classes(pixels: dict[str, int], k: int) -> list[dict]:
    """The ``k`` classes with the smallest pixel share of the training split (ties by name)."""
    total = sum(pixels.values())
    order = sorted(pixels, key=lambda name: (pixels[name], name))
    return [{"class": name, "pixels": int(pixels[name]), "share": pixels[name] / total if total else math.nan}
            for name in order[:k]]


def summarize(rows: list[dict], arms: list[str], reference: str, classes: list[str],
              rare: list[dict]) -> dict:
    """Everything ``report.md`` shows, per (dataset, split) and encoder, computed from ``rows``."""
    groups = []
    for dataset, split in dict.fromkeys((r["dataset"], r["split"]) for r in rows):
        for encoder in dict.fromkeys(r["encoder"] for r in rows if (r["dataset"], r["split"]) == (dataset, split)):
            scope = dict(dataset=dataset, split=split, encoder=encoder)
            table: dict[str, dict] = {}
            for name in classes:
                table[f"iou/{name}"] = {arm: mean_std(list(_values(rows, arm=arm, metric="iou", **{"class": name},
                                                                   **scope).values())) for arm in arms}
            for key, _ in SPLIT_METRICS:
                table[key] = {arm: mean_std(list(_values(rows, arm=arm, metric=key, **scope).values()))
                              for arm in arms}
            rare_miou = {arm: _rare_miou(rows, arm, [r["class"] for r in rare], scope) for arm in arms}
            table["rare_miou"] = {arm: mean_std(list(rare_miou[arm].values())) for arm in arms}
            comparisons = {}
            for arm in arms:
                if arm == reference:
                    continue
                compared = {}
                for item in [r["class"] for r in rare] + ["miou", *OVERVIEW_TESTED]:
                    if item == "rare_miou":
                        compared[item] = compare(rare_miou[reference], rare_miou[arm])
                        continue
                    where = dict(metric=item) if item in LABELS else dict(metric="iou", **{"class": item})
                    compared[item] = compare(_values(rows, arm=reference, **where, **scope),
                                             _values(rows, arm=arm, **where, **scope))
                comparisons[arm] = compared
            add_holm(comparisons)
            add_power(comparisons)
            seeds = {arm: sorted(_values(rows, arm=arm, metric="miou", **scope)) for arm in arms}
            groups.append({**scope, "seeds": seeds, "metrics": table, "comparisons": comparisons})
    return {"arms": arms, "reference": reference, "classes": classes, "rare_classes": rare, "groups": groups}


# ----------------------------------------------------------------------------- table rows


def fmt_mean_std(cell: dict, digits: int = 3) -> str:
    if cell["n"] == 0 or math.isnan(cell["mean"]):
        return "—"
    if math.isnan(cell["std"]):
        return f"{cell['mean']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def fmt_p_holm(comparison: dict, test: str) -> str:
    """``raw (Holm)``, e.g. ``0.014 (0.056)``."""
    raw, adjusted = comparison[test], comparison.get(f"{test}_holm", math.nan)
    return fmt_p(raw) if math.isnan(adjusted) else f"{fmt_p(raw)} ({fmt_p(adjusted)})"


def overview_table(group: dict, arms: list[str], cost: dict | None = None) -> tuple[list[str], list[list[str]]]:
    """Which method? One row per arm: the overview metrics (mean ± std), for the tested ones the
    difference to the reference with the Holm-adjusted paired p-value, and the training cost."""
    header = ["arm"]
    for key in OVERVIEW:
        header += [LABELS[key]] + (["Δ (paired p, Holm)"] if key in ("miou", *OVERVIEW_TESTED) else [])
    if cost:
        header.append("training min per run")
    rows = []
    for arm in arms:
        row = [arm]
        for key in OVERVIEW:
            row.append(fmt_mean_std(group["metrics"][key][arm]))
            if key in ("miou", *OVERVIEW_TESTED):
                c = group["comparisons"].get(arm, {}).get(key)
                holm_p = math.nan if c is None else c.get("paired_p_holm", math.nan)
                row.append("—" if c is None else f"{fmt_signed(c['difference'])} ({fmt_p(holm_p)})")
        if cost:
            row.append(_cost_cell(cost, arm))
        rows.append(row)
    return header, rows


def _cost_cell(cost: dict, arm: str) -> str:
    runs = cost.get("runs", {}).get(arm)
    if not runs:
        return "—"
    text = fmt_mean_std(mean_std([s / 60 for s in runs]), 1)
    extra = cost.get("ensemble_s") if arm in cost.get("uses_ensemble", []) else None
    return text + (f" + ensemble {extra / 60:.0f}" if extra else "")


def fmt_signed(value: float, digits: int = 3) -> str:
    return "—" if math.isnan(value) else f"{value:+.{digits}f}"


def iou_table(group: dict, arms: list[str], classes: list[str]) -> tuple[list[str], list[list[str]]]:
    """The paper's Table 1: per-class IoU and mIoU, mean ± std over seeds, one column per arm."""
    header = ["class", *arms]
    rows = [[name, *(fmt_mean_std(group["metrics"][f"iou/{name}"][arm]) for arm in arms)] for name in classes]
    rows.append(["**mIoU**", *(fmt_mean_std(group["metrics"]["miou"][arm]) for arm in arms)])
    return header, rows


def rare_table(group: dict, arms: list[str], reference: str, rare: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The rarest classes (and mIoU): each arm's difference to the reference arm with Welch's and
    the paired t-test's p-values."""
    others = [a for a in arms if a != reference]
    header = ["class", "pixel share", f"{reference} IoU"]
    for arm in others:
        header += [f"{arm} − {reference}", "Welch p (Holm)", "paired p (Holm)"]
    rows = []
    for item in [r["class"] for r in rare] + ["miou"]:
        share = next((f"{100 * r['share']:.2f} %" for r in rare if r["class"] == item), "")
        key = "miou" if item == "miou" else f"iou/{item}"
        row = ["**mIoU**" if item == "miou" else item, share, fmt_mean_std(group["metrics"][key][reference])]
        for arm in others:
            c = group["comparisons"][arm][item]
            row += [fmt_signed(c["difference"]), fmt_p_holm(c, "welch_p"), fmt_p_holm(c, "paired_p")]
        rows.append(row)
    return header, rows


def uncertainty_table(group: dict, arms: list[str]) -> tuple[list[str], list[list[str]]]:
    """The paper's Table 3 and calibration: one row per arm."""
    header = ["arm", *(LABELS[k] for k in UNCERTAINTY_METRICS)]
    rows = [[arm, *(fmt_mean_std(group["metrics"][k][arm]) for k in UNCERTAINTY_METRICS)] for arm in arms]
    return header, rows


def fmt_interval(interval: list[float] | None, digits: int = 3) -> str:
    if not interval or any(v is None or math.isnan(v) for v in interval):
        return "—"
    return f"[{interval[0]:+.{digits}f}, {interval[1]:+.{digits}f}]"


def detect_table(group: dict, arms: list[str], reference: str) -> tuple[list[str], list[list[str]]]:
    """What the study can resolve: per compared metric and arm, Δ with its Holm-adjusted paired p,
    the minimum detectable effect and the seeds that would detect Δ (80 % power at Holm's α/m), and
    for mIoU and rare-class mIoU the bootstrap intervals of Δ (test images; seeds and test images)."""
    header = ["metric", "arm", "Δ", "paired p (Holm)", "MDE (80 % power)", "seeds to detect Δ",
              "95 % CI, test images", "95 % CI, seeds and test images"]
    rows = []
    for key in ("miou", *OVERVIEW_TESTED):
        for arm in arms:
            c = group["comparisons"].get(arm, {}).get(key)
            if arm == reference or c is None:
                continue
            needed, beyond = c.get("seeds_needed"), c.get("seeds_needed_beyond")
            mde = c.get("mde", math.nan)
            boot = c.get("bootstrap") or {}
            rows.append([LABELS[key], arm, fmt_signed(c["difference"]), fmt_p(c.get("paired_p_holm", math.nan)),
                         "n/a" if mde is None or math.isnan(mde) else f"{mde:.3f}",
                         str(needed) if needed is not None else f"more than {beyond}" if beyond else "n/a",
                         fmt_interval(boot.get("images")), fmt_interval(boot.get("seeds_and_images"))])
    return header, rows
