"""Pictures drawn with matplotlib (Agg, no display, no pyplot state): the class histogram and mask
gallery of ``iumask stats`` (the paper's Figures 4, 1 and 2), a member's training curves, the
experiment's per-class IoU bars and reliability diagrams, and heat maps for TensorBoard images.

Every PNG is rendered in memory and written through :func:`iumask.files.write_bytes_atomic`.
matplotlib is imported when a picture is drawn, not with this module.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from iumask.data.folder import resize_label
from iumask.errors import IumaskError
from iumask.files import write_bytes_atomic

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
        tiles = (image, label_colors(label, palette), *(label_colors(p, palette) for p in predictions))
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


def label_colors(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Label values to RGB palette colours; values beyond the palette (16-bit ignore) are black."""
    index = np.where(label < len(palette), label, 0).astype(np.intp)
    rgb = palette[index]
    rgb[label >= len(palette)] = 0
    return rgb


# --------------------------------------------------------------------------------------------
# training curves


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


# One colour per arm (seaborn's "deep" palette); ten, so the nine arms of the CamVid study are all
# told apart (with eight, the ninth repeated the first's blue).
ARM_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
               "#ccb974", "#64b5cd")


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
               color=ARM_COLOURS[k % len(ARM_COLOURS)], label=arm, error_kw={"elinewidth": 0.8})
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


RELIABILITY_COLUMNS = 5


def reliability_png(path: str | Path, panels: list[tuple[str, dict]], title: str) -> Path:
    """Reliability diagrams, one panel per (name, bins): the accuracy of each equal-width
    confidence bin (``bins``: ``edges`` (n + 1), ``pixels`` and ``accuracy`` (n each)) and the
    diagonal for perfect calibration, above the share of pixels per bin on its own axis."""
    n = max(len(panels), 1)
    # At most RELIABILITY_COLUMNS panels a row (nine arms in one row were 2500 pixels wide).
    columns = min(n, RELIABILITY_COLUMNS)
    rows = -(-n // columns)
    fig = _figure(270 * columns + 40, 420 * rows)
    # The share of pixels per bin on its own axis under each diagram: drawn on the accuracy axis it
    # hid behind the accuracy bars and had no scale.
    grid = np.asarray(fig.subplots(2 * rows, columns, sharex="col", gridspec_kw={"height_ratios": [3, 1] * rows}),
                      dtype=object).reshape(2 * rows, columns)
    for index in range(len(panels), rows * columns):  # the empty places of the last row
        grid[2 * (index // columns)][index % columns].axis("off")
        grid[2 * (index // columns) + 1][index % columns].axis("off")
    for index, (name, bins) in enumerate(panels):
        ax, share_ax = grid[2 * (index // columns)][index % columns], grid[2 * (index // columns) + 1][index % columns]
        edges = np.asarray(bins["edges"], dtype=float)
        pixels = np.asarray(bins["pixels"], dtype=float)
        accuracy = np.asarray([np.nan if v is None else v for v in bins["accuracy"]], dtype=float)
        centres, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        ax.bar(centres, np.nan_to_num(accuracy, nan=0.0), widths, color="#4c72b0", edgecolor="white",
               linewidth=0.5, label="accuracy")
        ax.plot([0, 1], [0, 1], color="#c44e52", linewidth=1, linestyle="--", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=8)
        share = pixels / pixels.sum() if pixels.sum() else pixels
        share_ax.bar(centres, share, widths, color=_GREY, edgecolor="white", linewidth=0.5)
        share_ax.set_ylim(0, max(float(share.max(initial=0.0)) * 1.1, 0.01))
        share_ax.set_xlabel("confidence (top class)", fontsize=9)
        share_ax.tick_params(labelsize=8)
    for row in range(rows):
        grid[2 * row][0].set_ylabel("accuracy", fontsize=9)
        grid[2 * row + 1][0].set_ylabel("share of pixels", fontsize=9)
    grid[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save_figure(fig, path)



def heat_rgb(values: np.ndarray, vmax: float, colormap: str = "inferno") -> np.ndarray:
    """``values`` in [0, vmax] as an RGB uint8 heat map (NaN as 0)."""
    from matplotlib import colormaps

    scaled = np.clip(np.nan_to_num(values, nan=0.0) / (vmax if vmax > 0 else 1.0), 0.0, 1.0)
    return (colormaps[colormap](scaled)[..., :3] * 255).round().astype(np.uint8)

