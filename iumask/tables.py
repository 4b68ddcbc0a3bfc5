"""Tables on the terminal (rich): the ``iumask stats`` result, evaluation results (one column per
model, names told apart when alike) and ``iumask experiment --dry-run``'s plan.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

# --------------------------------------------------------------------------------------------
# tables


def statistics_table(result: dict) -> Table:
    """A rich table of :func:`iumask.stages.stats.write_statistics`' result: one row per class."""
    labels, masks = result["labels"], result.get("masks")
    per = labels["per_class"]
    title = (f"{result['dataset']['split']}: {labels['num_images']} images, "
             f"{labels['labelled_pixels']:,} labelled pixels ({labels['ignored_pixels']:,} ignored)")
    table = Table(title=title)
    table.add_column("class", no_wrap=True)
    for name in ("pixels %", "images", "instances", "mean inst. size"):
        table.add_column(name, justify="right")
    if masks is not None:
        table.add_column("pred. %", justify="right")
        table.add_column("mean IU", justify="right")
        table.add_column("mean entropy", justify="right")
    for c, name in enumerate(labels["class_names"]):
        mean_size = per["instance_size_mean"][c]
        row = [name, f"{100 * per['fraction'][c]:.2f}", str(per["images"][c]), str(per["instances"][c]),
               "—" if mean_size is None else f"{mean_size:,.0f}"]
        if masks is not None:
            mp = masks["per_class"]
            row += [f"{100 * mp['fraction'][c]:.2f}", _fmt(mp["mean_iu"][c]), _fmt(mp["mean_entropy"][c])]
        table.add_row(*row)
    instances = sum(per["instances"])
    sizes = sum(m * k for m, k in zip(per["instance_size_mean"], per["instances"]) if m is not None)
    total = ["[bold]all[/bold]", "100.00", str(labels["num_images"]), str(instances),
             f"{sizes / instances:,.0f}" if instances else "—"]
    if masks is not None:
        total += ["100.00", _fmt(masks["mean_iu"]), _fmt(masks["mean_entropy"])]
    table.add_row(*total)
    return table


def print_statistics(result: dict) -> None:
    """Print :func:`statistics_table` to stdout (progress goes to stderr); a pipe or file gets
    the width the table needs instead of 80 columns."""
    print_table(statistics_table(result), 130)


def _fmt(value: float | None, digits: int = 4) -> str:
    """A table cell: ``—`` for a missing or NaN value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


# ----------------------------------------------------------------------------- evaluation results


# What tells two results apart when their display names are alike, in the order tried.
DISTINGUISHING_KEYS = ("path", "data", "split", "resolution", "inference")


def result_labels(results: list[dict]) -> list[str]:
    """A distinct label per result: its display name (``model``), and where several results share
    one, what tells them apart (the shortest distinguishing tail of the model's or data's path,
    the split, the resolution, the inference), e.g. ``baseline ensemble [run1]``."""
    labels = [str(r.get("model")) for r in results]
    for key in DISTINGUISHING_KEYS:
        groups: dict[str, list[int]] = {}
        for i, label in enumerate(labels):
            groups.setdefault(label, []).append(i)
        for members in groups.values():
            values = [results[i].get(key) for i in members]
            if len(members) < 2 or len({str(v) for v in values}) < 2:
                continue
            tags = _path_tails(values) if key in ("path", "data") else [f"{key} {v}" for v in values]
            for i, tag in zip(members, tags):
                labels[i] += f" [{tag}]"
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):  # entries alike in everything: numbered
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label} #{seen[label]}"
    return labels


def _path_tails(paths: list) -> list[str]:
    """The shortest tails (last folders) that tell ``paths`` apart (an ensemble.json by its folder)."""
    parts = [Path(str(p)).parent.parts if str(p).endswith(".json") else Path(str(p)).parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        tails = ["/".join(p[-k:]) for p in parts]
        if len(set(tails)) == len(set(map(str, paths))):
            return tails
    return [str(p) for p in paths]


def print_results(results: list[dict], compare: bool = False) -> None:
    """One column per model, one row per class IoU and summary metric. With ``compare`` (``iumask
    run``), each IU-weighted model stands beside the baseline model of the same name, followed by
    a column of their differences (weighted − baseline)."""
    columns: list[tuple[str, Callable[[str], float | None], bool]] = []
    labels = result_labels(results)  # no two columns under one heading
    placed = set()
    for i, r in enumerate(results):
        if i in placed:
            continue
        placed.add(i)
        columns.append((escape(labels[i]).replace(" ", "\n", 1), lambda key, r=r: r.get(key), False))
        stage, _, name = r["model"].partition(" ")
        partner = next((j for j, o in enumerate(results) if compare and j not in placed and stage.startswith("baseline")
                        and o["model"].partition(" ")[2] == name), None)
        if partner is not None:
            placed.add(partner)
            other = results[partner]
            columns.append((escape(labels[partner]).replace(" ", "\n", 1), lambda key, r=other: r.get(key), False))
            columns.append((f"Δ\n{name}", lambda key, a=r, b=other: _difference(b.get(key), a.get(key)), True))
    table = Table(title="per-class IoU, mIoU and PAvPU" + (" (Δ: IU-weighted − baseline)" if compare else ""),
                  show_lines=False)
    table.add_column("metric", no_wrap=True)
    for title, _, _ in columns:
        table.add_column(title, justify="right")

    def cell(value, signed: bool) -> str:
        if signed and value is not None and not math.isnan(value):
            return f"{value:+.3f}"
        return _fmt(value, 3)

    for c, name in enumerate(results[0]["classes"]):
        table.add_row(f"IoU {name}", *(cell(_class_value(get, c), signed) for _, get, signed in columns))
    for key, label in (("miou", "mIoU"), ("pixel_accuracy", "pixel acc."), ("pavpu", "PAvPU"),
                       ("p_accurate_given_certain", "p(acc|cert)"),
                       ("p_uncertain_given_inaccurate", "p(unc|inacc)"), ("pavpu_threshold", "u_th"),
                       ("ece", "ECE"), ("brier", "Brier"), ("nll", "NLL"), ("mean_accuracy", "mAcc"),
                       ("worst_10pct_miou", "worst-10% mIoU"), ("instance_recall_small", "inst. rec. small"),
                       ("aurc", "AURC"), *([("temperature", "T"), ("ece_scaled", "ECE at T"),
                                            ("nll_scaled", "NLL at T")] if "temperature" in results[0] else [])):
        table.add_row(f"[bold]{label}[/bold]" if key == "miou" else label,
                      *(cell(get(key), signed) for _, get, signed in columns))
    print_table(table, 20 + sum(max(12, *map(len, title.split("\n"))) + 3 for title, _, _ in columns))


def print_table(table: Table, width: int) -> None:
    """Print a results table to stdout (progress goes to stderr). A table is read whole, so when
    stdout is a file or a pipe it gets ``width`` columns (what it needs) instead of 80."""
    out = Console()
    if not out.is_terminal:
        out = Console(width=max(out.width, width))
    out.print(table)


def _difference(a, b):
    """a − b for numbers and element-wise for lists (per-class IoU); None where either is missing."""
    if isinstance(a, list) and isinstance(b, list):
        return [_difference(x, y) for x, y in zip(a, b)]
    if a is None or b is None or isinstance(a, (dict, str)) or isinstance(b, (dict, str)):
        return None
    return float(a) - float(b)


def _class_value(get: Callable[[str], object], c: int):
    values = get("iou")
    return values[c] if isinstance(values, list) else None


def print_plan(steps: list[tuple[str, str, str]], training_runs: int, out: Path) -> None:
    """``iumask experiment --dry-run``: every step with its status, then the counts."""
    table = Table(title=f"experiment plan: {out}")
    for name in ("step", "what", "status"):
        table.add_column(name)
    for step, what, status in steps:
        colour = "green" if status == "done" else ("yellow" if status.startswith("partial") else "white")
        table.add_row(step, what, f"[{colour}]{status}[/{colour}]")
    Console(width=max(Console().width, 110)).print(table)
    trainings = [s for s in steps if s[0] == "train"]
    done = sum(s[2] == "done" for s in trainings)
    evaluations = sum(s[0] == "evaluate" and s[2] != "done" for s in steps)
    Console().print(f"{training_runs} models trained in {len(trainings)} training runs: {done} done, "
                    f"{len(trainings) - done} to go; {evaluations} evaluations to go", highlight=False)
