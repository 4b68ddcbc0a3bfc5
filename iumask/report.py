"""Presentation: rich tables of :mod:`iumask.dataset_stats` results, and pictures drawn with matplotlib
(Agg, no display): the class histogram and mask gallery of ``iumask stats`` (the paper's Figures
4, 1 and 2), training curves, and the per-epoch training log (``metrics.csv``, TensorBoard).

* :func:`statistics_table` and :func:`print_statistics` show the ``iumask stats`` result.
* :func:`class_histogram_png` and :func:`mask_gallery_png` draw PNGs.
* :func:`write_metrics_csv` and :func:`training_curves_png` write a member's training log from the
  engine's epoch records; :class:`TensorBoardLog` sends them (and a few validation images) to
  TensorBoard.

Every file is written through :func:`iumask.artifacts.atomic_write`. matplotlib is imported when
a picture is drawn, not with this module.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from iumask.artifacts import write_bytes_atomic
from iumask.data.folder import resize_label
from iumask.errors import IumaskError

METRICS_FILE = "metrics.csv"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_FIX = "pip install iumask[tensorboard]"
_DPI = 100
_GREY = "#6e6e6e"


# --------------------------------------------------------------------------------------------
# helpers


def _compact(value: float) -> str:
    """1234567 -> '1.2M', 45000 -> '45k', 512 -> '512'."""
    value = float(value)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= div:
            v = value / div
            return f"{v:.0f}{unit}" if v >= 100 or v == int(v) else f"{v:.1f}{unit}"
    return f"{value:.0f}" if value == int(value) else f"{value:.2g}"


def _figure(width_px: int, height_px: int):
    """A matplotlib figure of exactly ``width_px`` × ``height_px`` pixels, on the Agg canvas (no
    pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / _DPI, height_px / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, path: str | Path) -> Path:
    """Render ``fig`` to PNG in memory (a deterministic file: no timestamp), then write it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return write_bytes_atomic(path, buffer.getvalue())


def _rgb(color) -> tuple[float, float, float]:
    return tuple(int(c) / 255.0 for c in color[:3])


# --------------------------------------------------------------------------------------------
# class histogram (Figure 4)


def class_histogram_png(
    stats: dict,
    classes,
    path: str | Path,
    log_scale: bool = True,
    sort: bool = True,
    bar_width: int = 34,
    plot_height: int = 320,
) -> Path:
    """Bar chart of the pixels per class of :func:`iumask.dataset_stats.label_statistics` ``stats`` (the paper's
    Figure 4): bars in the class colours (``classes``: a ClassInfo), largest first when ``sort``,
    on a log scale when ``log_scale``, class names under the bars and each class's share of
    labelled pixels above its bar. ``bar_width`` (pixels per class) and ``plot_height`` set the
    picture's size. Returns ``path``."""
    counts = np.asarray(stats["per_class"]["pixels"], dtype=np.float64)
    fractions = stats["per_class"]["fraction"]
    names = list(classes.names)
    if len(names) != len(counts):
        raise IumaskError(f"statistics hold {len(counts)} classes but the class list has {len(names)}")
    palette = classes.palette()
    order = np.argsort(-counts, kind="stable") if sort else np.arange(len(counts))
    longest = max((len(n) for n in names), default=1)
    names_h = 30 + 7 * min(longest, 30)  # vertical class names
    width = max(110 + len(counts) * (bar_width + max(4, bar_width // 4)), 360)
    height = 100 + plot_height + names_h
    fig = _figure(width, height)
    ax = fig.add_axes((80 / width, names_h / height, (width - 100) / width, plot_height / height))
    x = np.arange(len(order))
    values = counts[order]
    shown = np.where(values > 0, values, np.nan) if log_scale else values
    bars = ax.bar(x, shown, width=0.8, color=[_rgb(palette[c]) for c in order], edgecolor="#3c3c3c",
                  linewidth=0.6, zorder=2)
    if log_scale:
        ax.set_yscale("log")
        positive = values[values > 0]
        if len(positive):
            # At least half a decade below the smallest bar, so that every bar shows.
            ax.set_ylim(10.0 ** math.floor(math.log10(positive.min() / 3)),
                        10.0 ** max(math.ceil(math.log10(positive.max())) + 0.3, 1))
    else:
        ax.set_ylim(0, max(float(values.max(initial=0)) * 1.12, 1.0))
    for bar, c in zip(bars, order):
        f = fractions[c]
        pct = f"{100 * f:.1f}" if f >= 0.001 else f"{100 * f:.2f}"
        top = counts[c] if counts[c] > 0 else ax.get_ylim()[0]
        ax.annotate(pct, (bar.get_x() + bar.get_width() / 2, top), xytext=(0, 2), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7, color=_GREY)
    ax.set_xticks(x, [names[c] for c in order], rotation=90, fontsize=8)
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.set_ylabel(f"pixels ({'log' if log_scale else 'linear'} scale)", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="y", color="#e1e1e1", linewidth=0.8, zorder=0)
    ax.set_axisbelow(True)
    fig.text(80 / width, 1 - 22 / height, "pixels per class", fontsize=12, va="baseline")
    fig.text(80 / width, 1 - 42 / height,
             f"{stats['num_images']} images, {_compact(stats['labelled_pixels'])} labelled pixels, "
             f"{_compact(stats['ignored_pixels'])} ignored", fontsize=8, color=_GREY, va="baseline")
    fig.text(80 / width, 1 - 58 / height, "numbers above the bars: % of labelled pixels", fontsize=8, color=_GREY,
             va="baseline")
    return _save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# mask gallery (Figures 1 and 2)


def mask_gallery_png(
    dataset,
    store,
    path: str | Path,
    count: int = 4,
    size: tuple[int, int] | None = None,
    colormap: str = "inferno",
    predictors: tuple[tuple[str, Callable[[int], np.ndarray]], ...] = (),
) -> Path:
    """A few training images (evenly spread over the dataset), one per row, beside their label
    (class colours), pixel entropy and IU mask, like the paper's Figures 1 and 2. ``predictors``
    add a column each between label and entropy: (title, function of the dataset index giving a
    class map at the store's image size), e.g. the ensemble members' predictions.

    Entropy and IU share one colour scale (0 to the largest value shown), each column with its own
    colour bar underneath, and a legend names the class colours. ``size`` (H, W) is the size of
    each tile in pixels; by default tiles are 256 pixels wide with the aspect ratio of the store's
    images. Images are matched to the store by id. Returns ``path``.
    """
    n = len(dataset.ids)
    if n == 0 or count < 1:
        raise IumaskError("the mask gallery needs at least one image")
    picks = sorted(set(np.linspace(0, n - 1, min(count, n)).round().astype(int).tolist()))
    rows = []
    for i in picks:
        arrays = store.read(store.index_of(dataset.ids[i]))
        shape = arrays["entropy"].shape
        image = dataset.read_image(i)
        label = dataset.read_label(i)
        if image.shape[:2] != shape:
            image = cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
            label = resize_label(label, shape)
        predictions = [predict(i) for _, predict in predictors]
        rows.append((dataset.ids[i], image, label, predictions, arrays["entropy"], arrays["instance_uncertainty"]))

    if size is None:
        h0, w0 = rows[0][1].shape[:2]
        tile_w = 256
        tile_h = max(16, int(round(tile_w * h0 / w0)))
    else:
        tile_h, tile_w = int(size[0]), int(size[1])
    vmax = max(max(float(np.nanmax(r[4], initial=0.0)), float(np.nanmax(r[5], initial=0.0))) for r in rows)
    vmax = vmax if vmax > 0 else 1.0
    classes = dataset.classes
    palette = classes.palette()
    unit = "normalised" if (store.identity.get("options") or {}).get("normalize") else "nats"

    pad, title_h, head, bar_h = 6, 40, 26, 62
    columns = ("image", "label", *(name for name, _ in predictors), "pixel entropy", "instance uncertainty (IU)")
    heat = len(columns) - 2  # the first of the two mask columns
    width = pad + len(columns) * (tile_w + pad)
    legend_names = [*classes.names, "ignored"]
    column_w = 34 + 6 * max(len(name) for name in legend_names)
    ncols = max(1, min(len(legend_names), (width - 2 * pad) // column_w))
    legend_h = 18 * math.ceil(len(legend_names) / ncols) + 8
    top_rows = title_h + head
    height = top_rows + len(rows) * (tile_h + pad) + bar_h + legend_h + pad
    fig = _figure(width, height)

    def axes(x: float, y: float, w: float, h: float):
        return fig.add_axes((x / width, 1 - (y + h) / height, w / width, h / height))

    fig.text(pad / width, 1 - 24 / height, f"entropy and IU masks of {len(rows)} training images "
             f"({store.path.name})", fontsize=11, va="baseline")
    for k, name in enumerate(columns):
        fig.text((pad + k * (tile_w + pad) + tile_w / 2) / width, 1 - (top_rows - 8) / height, name,
                 fontsize=9, ha="center", va="baseline")
    from matplotlib import patheffects

    outline = [patheffects.withStroke(linewidth=2, foreground="black")]
    mappable = None
    for r, (image_id, image, label, predictions, entropy, iu) in enumerate(rows):
        y = top_rows + r * (tile_h + pad)
        tiles = (image, _label_colors(label, palette), *(_label_colors(p, palette) for p in predictions))
        for k in range(len(columns)):
            ax = axes(pad + k * (tile_w + pad), y, tile_w, tile_h)
            ax.set_axis_off()
            if k < heat:
                ax.imshow(tiles[k], interpolation="nearest", aspect="auto")
            else:
                values = np.nan_to_num(entropy if k == heat else iu, nan=0.0)
                mappable = ax.imshow(values, cmap=colormap, vmin=0.0, vmax=vmax, interpolation="nearest",
                                     aspect="auto")
        fig.text((pad + 4) / width, 1 - (y + 14) / height, image_id, fontsize=8, color="white",
                 va="baseline", path_effects=outline)

    y = top_rows + len(rows) * (tile_h + pad) + 4
    for k, what in ((heat, "pixel entropy"), (heat + 1, "IU (mean entropy of the instance)")):
        cax = axes(pad + k * (tile_w + pad), y, tile_w, 12)
        bar = fig.colorbar(mappable, cax=cax, orientation="horizontal")
        bar.set_ticks([0.0, vmax / 2, vmax], labels=[f"{v:.2f}" for v in (0.0, vmax / 2, vmax)])
        bar.ax.tick_params(labelsize=7)
        ticks = bar.ax.get_xticklabels()
        ticks[0].set_horizontalalignment("left")
        ticks[-1].set_horizontalalignment("right")
        bar.set_label(f"{what} ({unit})", fontsize=8)
    fig.text(pad / width, 1 - (y + 10) / height, "same colour scale in both mask columns",
             fontsize=8, color=_GREY, va="baseline")
    fig.text(pad / width, 1 - (y + 24) / height, "and all rows", fontsize=8, color=_GREY, va="baseline")

    from matplotlib.patches import Patch

    handles = [Patch(facecolor=_rgb(palette[c]), edgecolor=_GREY, label=name)
               for c, name in enumerate(classes.names)]
    handles.append(Patch(facecolor=(0, 0, 0), edgecolor=_GREY, label="ignored"))
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(pad / width, 1 - (y + bar_h - 4) / height),
               ncol=ncols, fontsize=8, frameon=False, handlelength=1.2, handleheight=1.0, borderaxespad=0.0,
               borderpad=0.0, columnspacing=1.0, labelspacing=0.4)
    return _save_figure(fig, path)


def _label_colors(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Label values to RGB palette colours; values beyond the palette (16-bit ignore) are black."""
    index = np.where(label < len(palette), label, 0).astype(np.intp)
    rgb = palette[index]
    rgb[label >= len(palette)] = 0
    return rgb


# --------------------------------------------------------------------------------------------
# training log


def _lr_names(count: int) -> list[str]:
    # iumask's optimizers have two groups: the encoder and the rest (decoder and head).
    return ["lr_encoder", "lr_decoder"] if count == 2 else [f"lr_{i}" for i in range(count)]


def _cell(value) -> str:
    return "" if value is None else repr(float(value))


def write_metrics_csv(path: str | Path, records: list[dict], class_names: list[str]) -> Path:
    """``metrics.csv``: one row per epoch of the engine's records (see
    :data:`iumask.engine.EpochCallback`): epoch, global step, mean training loss, learning rates
    at the end of the epoch, validation mIoU (and the ensemble's, for members trained together),
    per-class validation IoU (``iou_<class>``, ``nan`` for a class absent from the split and the
    predictions) and the epoch's seconds. Floats are written exactly (``repr``)."""
    lr_count = len(records[0]["lr"]) if records else 2
    ensemble = any(r.get("ensemble_val_miou") is not None for r in records)
    header = ["epoch", "step", "loss", *_lr_names(lr_count), "val_miou", *(["ensemble_val_miou"] if ensemble else []),
              *(f"iou_{name}" for name in class_names), "seconds"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in records:
        writer.writerow([r["epoch"], r["step"], _cell(r["loss"]), *map(_cell, r["lr"]), _cell(r["val_miou"]),
                         *([_cell(r["ensemble_val_miou"])] if ensemble else []), *map(_cell, r["val_iou"]),
                         f"{r['seconds']:.3f}"])
    return write_bytes_atomic(path, buffer.getvalue().encode())


def training_curves_png(path: str | Path, records: list[dict], title: str) -> Path:
    """``curves.png``: mean training loss (left) and validation mIoU (right; the ensemble's too for
    members trained together) by epoch."""
    fig = _figure(900, 340)
    loss_ax, miou_ax = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in records]
    marker = "o" if len(records) <= 30 else None
    loss_ax.plot(epochs, [r["loss"] for r in records], marker=marker, markersize=3, color="#1f77b4")
    loss_ax.set_title("training loss (mean over the epoch)", fontsize=10)
    miou_ax.plot(epochs, [r["val_miou"] for r in records], marker=marker, markersize=3, color="#2ca02c",
                 label="this member")
    if any(r.get("ensemble_val_miou") is not None for r in records):
        miou_ax.plot(epochs, [r["ensemble_val_miou"] for r in records], marker=marker, markersize=3,
                     color="#d62728", label="ensemble (mean softmax)")
        miou_ax.legend(fontsize=8, loc="lower right")
    miou_ax.set_title("validation mIoU", fontsize=10)
    miou_ax.set_ylim(0, 1)
    for ax in (loss_ax, miou_ax):
        ax.set_xlabel("epoch", fontsize=9)
        ax.grid(color="#e1e1e1", linewidth=0.8)
        ax.tick_params(labelsize=8)
        if epochs:
            ax.set_xlim(0.5, max(epochs) + 0.5)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# experiment figures


_ARM_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def iou_bars_png(path: str | Path, classes: list[str], arms: list[str], means: np.ndarray, stds: np.ndarray,
                 title: str) -> Path:
    """Per-class IoU bars, one colour per arm, with ± std error bars (``means``, ``stds``: arms ×
    (classes + mIoU), NaN where undefined); the last group is the mIoU."""
    groups = [*classes, "mIoU"]
    fig = _figure(max(700, 70 * len(groups) * max(1, len(arms)) // 2 + 160), 380)
    ax = fig.subplots()
    width = 0.8 / max(len(arms), 1)
    x = np.arange(len(groups))
    for k, arm in enumerate(arms):
        errors = np.nan_to_num(stds[k], nan=0.0)
        ax.bar(x - 0.4 + width * (k + 0.5), np.nan_to_num(means[k], nan=0.0), width, yerr=errors, capsize=2,
               color=_ARM_COLOURS[k % len(_ARM_COLOURS)], label=arm, error_kw={"elinewidth": 0.8})
    ax.set_xticks(x, groups, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("IoU (mean ± std over seeds)", fontsize=9)
    ax.set_ylim(0, 1)
    ax.axvline(len(classes) - 0.5, color=_GREY, linewidth=0.8, linestyle=":")
    ax.grid(axis="y", color="#e1e1e1", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, ncols=min(len(arms), 4), loc="upper right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def reliability_png(path: str | Path, panels: list[tuple[str, dict]], title: str) -> Path:
    """Reliability diagrams, one panel per (name, bins): the accuracy of each equal-width
    confidence bin (``bins``: ``edges`` (n + 1), ``pixels`` and ``accuracy`` (n each)), the
    diagonal for perfect calibration and the share of pixels per bin."""
    n = max(len(panels), 1)
    fig = _figure(270 * n + 40, 330)
    axes = np.atleast_1d(fig.subplots(1, n, sharey=True))
    for ax, (name, bins) in zip(axes, panels):
        edges = np.asarray(bins["edges"], dtype=float)
        pixels = np.asarray(bins["pixels"], dtype=float)
        accuracy = np.asarray([np.nan if v is None else v for v in bins["accuracy"]], dtype=float)
        centres, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        ax.bar(centres, np.nan_to_num(accuracy, nan=0.0), widths, color="#4c72b0", edgecolor="white",
               linewidth=0.5, label="accuracy")
        ax.plot([0, 1], [0, 1], color="#c44e52", linewidth=1, linestyle="--", label="perfect calibration")
        share = pixels / pixels.sum() if pixels.sum() else pixels
        ax.bar(centres, share, widths * 0.5, color=_GREY, alpha=0.6, label="share of pixels")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top class)", fontsize=9)
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("accuracy", fontsize=9)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save_figure(fig, path)


def require_tensorboard() -> None:
    """Fail before training starts when ``--tensorboard`` is given without the package."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise IumaskError(f"--tensorboard needs the tensorboard package: {TENSORBOARD_FIX}") from None


def heat_rgb(values: np.ndarray, vmax: float, colormap: str = "inferno") -> np.ndarray:
    """``values`` in [0, vmax] as an RGB uint8 heat map (NaN as 0)."""
    from matplotlib import colormaps

    scaled = np.clip(np.nan_to_num(values, nan=0.0) / (vmax if vmax > 0 else 1.0), 0.0, 1.0)
    return (colormaps[colormap](scaled)[..., :3] * 255).round().astype(np.uint8)


class TensorBoardLog:
    """One member's TensorBoard events in ``log_dir``: per epoch the loss, learning rates,
    validation mIoU (the ensemble's too) and per-class IoU, and a few validation images as rows of
    image | prediction | pixel entropy | IU (entropy and IU on the fixed scale [0, ln C]).

    The writer opens at the first epoch logged with ``purge_step`` set to it, so events a killed
    run wrote after its last checkpoint are dropped on resume."""

    def __init__(self, log_dir: Path, class_names: list[str], palette: np.ndarray):
        self.log_dir, self.class_names, self.palette = Path(log_dir), list(class_names), palette
        self.writer = None

    def log(self, record: dict, images: list[dict] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        epoch = record["epoch"]
        if self.writer is None:
            self.writer = SummaryWriter(str(self.log_dir), purge_step=epoch)
        w = self.writer
        w.add_scalar("train/loss", record["loss"], epoch)
        for name, lr in zip(_lr_names(len(record["lr"])), record["lr"]):
            w.add_scalar(f"train/{name}", lr, epoch)
        w.add_scalar("val/miou", record["val_miou"], epoch)
        if record.get("ensemble_val_miou") is not None:
            w.add_scalar("val/ensemble_miou", record["ensemble_val_miou"], epoch)
        for name, iou in zip(self.class_names, record["val_iou"]):
            if not math.isnan(iou):
                w.add_scalar(f"val_iou/{name}", iou, epoch)
        w.add_scalar("train/seconds_per_epoch", record["seconds"], epoch)
        vmax = math.log(max(len(self.class_names), 2))
        for k, sample in enumerate(images or []):
            row = np.concatenate([sample["image"], _label_colors(sample["prediction"], self.palette),
                                  heat_rgb(sample["entropy"], vmax), heat_rgb(sample["iu"], vmax)], axis=1)
            w.add_image(f"val/{k}: image | prediction | entropy | IU", row, epoch, dataformats="HWC")
        w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


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
