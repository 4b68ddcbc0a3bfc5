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
                 ("risk_at_80_coverage", "risk@80 % cov."))
UNCERTAINTY_METRICS = ("pavpu", "p_accurate_given_certain", "p_uncertain_given_inaccurate", "ece", "brier", "nll")
LABELS = dict(SPLIT_METRICS)


def result_rows(arm: str, encoder: str, seed: int, dataset: str, split: str, result: dict) -> list[dict]:
    """One evaluation result (``iumask.stages.evaluate`` format) as ``results.csv`` rows: one per
    class IoU (metric ``iou``) and one per whole-split metric (class empty)."""
    base = {"arm": arm, "encoder": encoder, "seed": int(seed), "dataset": dataset, "split": split}
    rows = [dict(base, metric="iou", **{"class": name}, value=float(value))
            for name, value in zip(result["classes"], result["iou"])]
    rows += [dict(base, metric=key, **{"class": ""}, value=float(result[key]))
             for key, _ in SPLIT_METRICS if result.get(key) is not None]
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
    return {"difference": diff, "welch_p": welch, "paired_p": paired, "n_reference": len(a), "n": len(b),
            "pairs": len(seeds)}


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
            comparisons = {}
            for arm in arms:
                if arm == reference:
                    continue
                compared = {}
                for item in [r["class"] for r in rare] + ["miou"]:
                    where = dict(metric="miou") if item == "miou" else dict(metric="iou", **{"class": item})
                    compared[item] = compare(_values(rows, arm=reference, **where, **scope),
                                             _values(rows, arm=arm, **where, **scope))
                comparisons[arm] = compared
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
        header += [f"{arm} − {reference}", "Welch p", "paired p"]
    rows = []
    for item in [r["class"] for r in rare] + ["miou"]:
        share = next((f"{100 * r['share']:.2f} %" for r in rare if r["class"] == item), "")
        key = "miou" if item == "miou" else f"iou/{item}"
        row = ["**mIoU**" if item == "miou" else item, share, fmt_mean_std(group["metrics"][key][reference])]
        for arm in others:
            c = group["comparisons"][arm][item]
            row += [fmt_signed(c["difference"]), fmt_p(c["welch_p"]), fmt_p(c["paired_p"])]
        rows.append(row)
    return header, rows


def uncertainty_table(group: dict, arms: list[str]) -> tuple[list[str], list[list[str]]]:
    """The paper's Table 3 and calibration: one row per arm."""
    header = ["arm", *(LABELS[k] for k in UNCERTAINTY_METRICS)]
    rows = [[arm, *(fmt_mean_std(group["metrics"][k][arm]) for k in UNCERTAINTY_METRICS)] for arm in arms]
    return header, rows
