"""What ``iumask experiment`` writes once its runs are evaluated: ``results.csv`` (every number),
``summary.json`` and ``report.md`` (computed from those rows by :mod:`iumask.experiment.significance`)
and ``figures/``; and the rich table on the terminal (``report.md``'s first table).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from rich.table import Table

from iumask.experiment.significance import (
    RESULT_COLUMNS,
    detect_table,
    iou_table,
    overview_table,
    rare_table,
    uncertainty_table,
)
from iumask.figures import class_histogram_png, iou_bars_png, mask_gallery_png, reliability_png
from iumask.files import atomic_write, write_bytes_atomic, write_json_atomic
from iumask.tables import print_table

RESULTS_FILE = "results.csv"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
FIGURES_DIR = "figures"


def write_results_csv(path: Path, rows: list[dict]) -> Path:
    """One row per (arm, encoder, seed, dataset, split, metric, class); values with full precision
    (``repr``), so the report can be recomputed from this file alone."""
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(RESULT_COLUMNS)
        for row in rows:
            writer.writerow([row[c] if c != "value" else repr(float(row[c])) for c in RESULT_COLUMNS])
    return path


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    lines = [line(header), "|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|"]
    lines += [line(row) for row in rows]
    return "\n".join(lines)


def _group_title(group: dict) -> str:
    return f"{group['dataset']} {group['split']}, {group['encoder']}"


def _slug(group: dict) -> str:
    return f"{group['dataset']}-{group['split']}-{group['encoder']}"


def report_markdown(summary: dict, figures: dict[str, str]) -> str:
    """``report.md``: per evaluation and encoder the IoU table, the rarest classes' tests and the
    uncertainty table, with the figures' links."""
    arms, reference, classes, rare = summary["arms"], summary["reference"], summary["classes"], summary["rare_classes"]
    out = [f"# Experiment {summary['experiment']}", ""]
    out.append(f"{summary['training_runs']} trained models; arms: {', '.join(arms)} (reference: {reference}). "
               "Cells are mean ± sample std (ddof 1) over seeds; a class whose IoU is undefined in a run "
               "(absent from its labels and predictions) is left out of that mean. p-values are two-sided, "
               "from scipy: Welch's t-test over all runs, and the paired t-test over runs with the same "
               "seed (same initial weights and data order); n/a with fewer than 2 runs or pairs, or when the "
               "runs do not vary at all. In parentheses: Holm's adjustment over the arms compared with the "
               "reference (each class or metric is one family).")
    out.append("")
    for group in summary["groups"]:
        seeds = ", ".join(f"{arm}: {len(s)}" for arm, s in group["seeds"].items())
        out += [f"## {_group_title(group)}", "", f"Seeds per arm: {seeds}.", ""]
        out += ["### Which method? Overview", "",
                f"Mean ± std over seeds; Δ is the difference to {reference} with the paired t-test's p-value "
                "over seeds, Holm-adjusted over the arms compared (one family per column). rare-class mIoU: "
                f"mean IoU of the {len(rare)} rarest training classes; worst-10 % mIoU: mean of the per-image "
                "mIoU (over the classes in the image's label, Wang et al.) of the worst max(1, ⌊n/10⌋) images; "
                "instance recall small: share of small ground-truth instances (under 32² pixels at the "
                "resolution the labels are scored at, COCO's bin) with at least half their pixels found; "
                "AURC: area under the risk-coverage curve of the pixels' confidence. "
                "Training minutes: the run's epochs (for offline IU arms plus the mask ensemble, trained "
                "once and shared by all of them).", "",
                _markdown(*overview_table(group, arms, summary.get("cost"))), ""]
        out += ["### What these seeds can detect", "",
                f"Next to Δ and its Holm-adjusted paired p: the minimum detectable effect (MDE), the smallest |Δ| "
                f"the paired t-test over these seeds detects with 80 % power, and the seeds it would take to "
                f"detect the observed Δ with 80 % power; both at Holm's strictest level α/m (α = 0.05, m the arms "
                f"tested) and from the observed std of the per-seed differences, which they assume is the true "
                f"one (docs/experiments.md). For mIoU and rare-class mIoU, 95 % percentile bootstrap intervals "
                f"of Δ averaged over seeds: over test images (the same resample for both arms, dataset-level IoU "
                f"recomputed from the resampled counts; the seeds fixed), and over seeds, then test images (the "
                f"interval to quote).{_bootstrap_note(group)}", "",
                _markdown(*detect_table(group, arms, reference)), ""]
        out += ["### Per-class IoU and mIoU", "", _markdown(*iou_table(group, arms, classes)), ""]
        bars = figures.get("bars", {}).get(_slug(group))
        if bars:
            out += [f"![per-class IoU]({bars})", ""]
        out += [f"### The {len(rare)} rarest training classes: difference to {reference}", "",
                _markdown(*rare_table(group, arms, reference, rare)), ""]
        out += ["### Uncertainty quality and calibration", "",
                "PAvPU with p(accurate | certain) and p(uncertain | inaccurate) (threshold: each model's "
                "training-set mean entropy), expected calibration error (15 bins, top label), Brier score "
                "and negative log-likelihood per pixel.", "", _markdown(*uncertainty_table(group, arms)), ""]
        reliability = figures.get("reliability", {}).get(_slug(group))
        if reliability:
            out += [f"![reliability]({reliability})", ""]
    if figures.get("histogram"):
        out += ["## Training data", "", f"![class histogram]({figures['histogram']})", ""]
    if figures.get("masks"):
        out += [f"![IU masks]({figures['masks']})", ""]
    return "\n".join(out).rstrip() + "\n"


def _bootstrap_note(group: dict) -> str:
    note = group.get("bootstrap_note")
    return f" No bootstrap interval here: {note}." if note else ""


def print_first_table(summary: dict) -> None:
    """The rich table of ``report.md``'s first table."""
    if not summary["groups"]:
        return
    group = summary["groups"][0]
    header, rows = iou_table(group, summary["arms"], summary["classes"])
    table = Table(title=f"per-class IoU, mean ± std over seeds: {_group_title(group)}")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*(cell.replace("**", "") for cell in row))
    print_table(table, 20 + 18 * len(summary["arms"]))


def merged_bins(results: list[dict]) -> dict | None:
    """The calibration bins of several evaluations pooled (pixels and correct pixels summed; the bin
    of confidence exactly 1 folded into the last one): ``edges``, ``pixels`` and ``accuracy``."""
    found = [r["calibration_bins"] for r in results if r.get("calibration_bins")]
    if not found:
        return None
    edges = found[0]["edges"]
    n = len(edges) - 1
    pixels, correct = np.zeros(n), np.zeros(n)
    for bins in found:
        count = np.asarray(bins["pixels"], dtype=float)
        accuracy = np.asarray([np.nan if v is None else v for v in bins["accuracy"]], dtype=float)
        hits = np.where(count > 0, count * np.nan_to_num(accuracy), 0.0)
        pixels += np.concatenate([count[:n - 1], [count[n - 1:].sum()]])
        correct += np.concatenate([hits[:n - 1], [hits[n - 1:].sum()]])
    accuracy = np.where(pixels > 0, correct / np.maximum(pixels, 1), np.nan)
    return {"edges": edges, "pixels": pixels.tolist(), "accuracy": accuracy.tolist()}


def write_report(out: Path, summary: dict, rows: list[dict], results: dict, label_stats: dict, train_folder,
                 store=None, predictors: tuple = ()) -> None:
    """results.csv, summary.json, report.md and figures/ into ``out``; the first table on the
    terminal. ``results``: the evaluation results by (arm, encoder, seed, dataset, split) (their
    reliability bins); ``store`` (a mask store of the training split) and ``predictors`` (see
    :func:`iumask.report.mask_gallery_png`) make the figure of masks."""
    figures_dir = out / FIGURES_DIR
    figures_dir.mkdir(parents=True, exist_ok=True)
    figures: dict = {"bars": {}, "reliability": {}}
    arms, classes = summary["arms"], summary["classes"]
    for group in summary["groups"]:
        slug = _slug(group)
        metrics = group["metrics"]
        keys = [f"iou/{c}" for c in classes] + ["miou"]
        means = np.array([[metrics[k][arm]["mean"] for k in keys] for arm in arms], dtype=float)
        stds = np.array([[metrics[k][arm]["std"] for k in keys] for arm in arms], dtype=float)
        name = f"iou-{slug}.png"
        iou_bars_png(figures_dir / name, classes, arms, means, stds, f"per-class IoU: {_group_title(group)}")
        figures["bars"][slug] = f"{FIGURES_DIR}/{name}"
        panels = []
        for arm in arms:
            bins = merged_bins([r for key, r in results.items()
                                if key[0] == arm and key[1] == group["encoder"] and key[3:] == (group["dataset"],
                                                                                                group["split"])])
            if bins:
                panels.append((arm, bins))
        if panels:
            name = f"reliability-{slug}.png"
            reliability_png(figures_dir / name, panels, f"reliability (all seeds): {_group_title(group)}")
            figures["reliability"][slug] = f"{FIGURES_DIR}/{name}"
    class_histogram_png(label_stats, train_folder.classes, figures_dir / "class_histogram.png")
    figures["histogram"] = f"{FIGURES_DIR}/class_histogram.png"
    if store is not None:
        mask_gallery_png(train_folder, store, figures_dir / "masks.png", predictors=predictors)
        figures["masks"] = f"{FIGURES_DIR}/masks.png"
    write_results_csv(out / RESULTS_FILE, rows)
    write_json_atomic(out / SUMMARY_FILE, dict(summary, figures=figures))
    write_bytes_atomic(out / REPORT_FILE, report_markdown(summary, figures).encode())
    print_first_table(summary)
