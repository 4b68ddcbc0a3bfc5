"""Presentation of :mod:`iumask.stats` results: rich tables, and pictures (the paper's Figures 1,
2 and 4) drawn with OpenCV.

* :func:`statistics_table` and :func:`print_statistics` show the ``iumask stats`` result.
* :func:`class_histogram_png` and :func:`mask_gallery_png` draw PNGs.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from iumask.artifacts import atomic_write, describe_os_error
from iumask.data.folder import resize_label
from iumask.errors import IumaskError

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BLACK = (0, 0, 0)
_WHITE = (255, 255, 255)
_GREY = (110, 110, 110)
_LIGHT = (225, 225, 225)


# --------------------------------------------------------------------------------------------
# drawing helpers


def _text_size(text: str, scale: float, thickness: int = 1) -> tuple[int, int, int]:
    (w, h), base = cv2.getTextSize(text, _FONT, scale, thickness)
    return w, h, base


def _put(img: np.ndarray, text: str, x: int, y: int, scale: float, color=_BLACK, thickness: int = 1) -> None:
    """Text with its baseline at y."""
    cv2.putText(img, _ascii(text), (int(x), int(y)), _FONT, scale, color, thickness, cv2.LINE_AA)


def _ascii(text: str) -> str:
    # Hershey fonts draw ASCII only.
    return text.encode("ascii", "replace").decode("ascii")


def _vertical_text(text: str, scale: float, color=_BLACK, background=_WHITE) -> np.ndarray:
    """``text`` written bottom to top (rotated 90 degrees counter-clockwise) on ``background``."""
    text = _ascii(text)
    w, h, base = _text_size(text, scale)
    tile = np.full((h + base + 4, w + 4, 3), background, dtype=np.uint8)
    cv2.putText(tile, text, (2, h + 2), _FONT, scale, color, 1, cv2.LINE_AA)
    return cv2.rotate(tile, cv2.ROTATE_90_COUNTERCLOCKWISE)


def _paste(canvas: np.ndarray, tile: np.ndarray, x: int, y: int) -> None:
    h = max(0, min(tile.shape[0], canvas.shape[0] - y))
    w = max(0, min(tile.shape[1], canvas.shape[1] - x))
    canvas[y:y + h, x:x + w] = tile[:h, :w]


def _compact(value: float) -> str:
    """1234567 -> '1.2M', 45000 -> '45k', 512 -> '512'."""
    value = float(value)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= div:
            v = value / div
            return f"{v:.0f}{unit}" if v >= 100 or v == int(v) else f"{v:.1f}{unit}"
    return f"{value:.0f}" if value == int(value) else f"{value:.2g}"


def _bgr(rgb) -> tuple[int, int, int]:
    return int(rgb[2]), int(rgb[1]), int(rgb[0])


def _write_png(path: str | Path, image: np.ndarray) -> Path:
    """Encode ``image`` and write it atomically (:func:`iumask.artifacts.atomic_write`): a failed
    write (full disk, read-only folder) leaves no truncated PNG and no temporary file, and is a
    one-line IumaskError naming the path."""
    path = Path(path)
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise IumaskError(f"{path}: cannot encode the PNG")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IumaskError(describe_os_error(exc, path.parent)) from None
    with atomic_write(path) as tmp:
        tmp.write_bytes(buf.tobytes())
    return path


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
    """Bar chart of the pixels per class of :func:`iumask.stats.label_statistics` ``stats`` (the paper's
    Figure 4): bars in the class colours (``classes``: a ClassInfo), largest first when ``sort``,
    on a log scale when ``log_scale``, class names written vertically below the bars and each
    class's share of labelled pixels above its bar. Returns ``path``."""
    counts = np.asarray(stats["per_class"]["pixels"], dtype=np.float64)
    fractions = stats["per_class"]["fraction"]
    names = list(classes.names)
    if len(names) != len(counts):
        raise IumaskError(f"statistics hold {len(counts)} classes but the class list has {len(names)}")
    palette = classes.palette()
    order = np.argsort(-counts, kind="stable") if sort else np.arange(len(counts))

    gap = max(4, bar_width // 4)
    label_scale, small = 0.45, 0.35
    name_tiles = [_vertical_text(names[c], label_scale) for c in order]
    names_h = max(t.shape[0] for t in name_tiles) + 8

    lo, hi, ticks = _axis(counts, log_scale)

    def y_of(v: float) -> float:
        if log_scale:
            return (np.log10(v) - np.log10(lo)) / (np.log10(hi) - np.log10(lo)) if v > 0 else 0.0
        return (v - lo) / (hi - lo)

    tick_w = max(_text_size(_tick_text(t, log_scale), label_scale)[0] for t in ticks)
    left, right, top = tick_w + 36, 16, 80
    width = max(left + len(counts) * (bar_width + gap) + gap + right, 360)
    height = top + plot_height + names_h + 8
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    x0, x1, y_base = left, width - right, top + plot_height

    title = f"pixels per class ({'log' if log_scale else 'linear'} scale)"
    subtitle = (f"{stats['num_images']} images, {_compact(stats['labelled_pixels'])} labelled pixels, "
                f"{_compact(stats['ignored_pixels'])} ignored")
    _put(img, title, left, 24, 0.6, thickness=1)
    _put(img, subtitle, left, 46, 0.42, _GREY)
    _put(img, "numbers above the bars: % of labelled pixels", left, 64, 0.42, _GREY)

    for t in ticks:
        y = int(round(y_base - y_of(t) * plot_height))
        cv2.line(img, (x0, y), (x1, y), _LIGHT, 1)
        text = _tick_text(t, log_scale)
        w, h, _ = _text_size(text, label_scale)
        _put(img, text, x0 - 6 - w, y + h // 2, label_scale)
    ylabel = _vertical_text("pixels", label_scale)
    _paste(img, ylabel, 4, top + (plot_height - ylabel.shape[0]) // 2)

    for k, c in enumerate(order):
        bx = x0 + gap + k * (bar_width + gap)
        v = counts[c]
        if v > 0:
            by = int(round(y_base - max(y_of(v), 0.0) * plot_height))
            by = min(by, y_base - 1)
            cv2.rectangle(img, (bx, by), (bx + bar_width - 1, y_base), _bgr(palette[c]), -1)
            cv2.rectangle(img, (bx, by), (bx + bar_width - 1, y_base), (60, 60, 60), 1)
        else:
            by = y_base
        pct = f"{100 * fractions[c]:.1f}" if fractions[c] >= 0.001 else f"{100 * fractions[c]:.2f}"
        w, _, _ = _text_size(pct, small)
        if w <= bar_width + gap - 2:
            _put(img, pct, bx + (bar_width - w) // 2, by - 4, small, _GREY)
        tile = name_tiles[k]
        _paste(img, tile, bx + (bar_width - tile.shape[1]) // 2, y_base + 6)
    cv2.line(img, (x0, top), (x0, y_base), _BLACK, 1)
    cv2.line(img, (x0, y_base), (x1, y_base), _BLACK, 1)
    return _write_png(path, img)


def _axis(counts: np.ndarray, log_scale: bool) -> tuple[float, float, list[float]]:
    positive = counts[counts > 0]
    if log_scale:
        if len(positive) == 0:
            return 1.0, 10.0, [1.0, 10.0]
        lo_exp = int(np.floor(np.log10(positive.min())))
        hi_exp = max(int(np.ceil(np.log10(positive.max()))), lo_exp + 1)
        return 10.0 ** lo_exp, 10.0 ** hi_exp, [10.0 ** e for e in range(lo_exp, hi_exp + 1)]
    top = float(counts.max()) if len(counts) else 0.0
    if top <= 0:
        return 0.0, 1.0, [0.0, 1.0]
    raw = top / 5
    mag = 10 ** np.floor(np.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    hi = step * np.ceil(top / step)
    return 0.0, float(hi), [float(step * i) for i in range(int(round(hi / step)) + 1)]


def _tick_text(value: float, log_scale: bool) -> str:
    if log_scale:
        return f"1e{int(round(np.log10(value)))}"
    return _compact(value)


# --------------------------------------------------------------------------------------------
# mask gallery (Figures 1 and 2)


def mask_gallery_png(
    dataset,
    store,
    path: str | Path,
    count: int = 4,
    size: tuple[int, int] | None = None,
    colormap: int = cv2.COLORMAP_INFERNO,
) -> Path:
    """A few training images (evenly spread over the dataset), one per row, beside their label
    (palette colours), pixel entropy and IU mask, like the paper's Figures 1 and 2.

    Entropy and IU share one colour scale (0 to the largest entropy shown) drawn as a colour
    bar under the rows, with a legend of the class colours. ``size`` (H, W) is the size of each
    tile; by default tiles are 256 pixels wide with the aspect ratio of the store's images.
    Images are matched to the store by id. Returns ``path``.
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
        rows.append((dataset.ids[i], image, label, arrays["entropy"], arrays["instance_uncertainty"]))

    if size is None:
        h0, w0 = rows[0][1].shape[:2]
        tile_w = 256
        tile_h = max(16, int(round(tile_w * h0 / w0)))
    else:
        tile_h, tile_w = int(size[0]), int(size[1])
    vmax = max(float(np.max(r[3], initial=0.0)) for r in rows)
    vmax = max(vmax, max(float(np.max(r[4], initial=0.0)) for r in rows))
    vmax = vmax if vmax > 0 else 1.0
    palette = dataset.classes.palette()
    normalized = bool((store.identity.get("options") or {}).get("normalize"))

    pad, head, title_h = 6, 26, 40
    columns = ("image", "label", "pixel entropy", "instance uncertainty (IU)")
    width = pad + len(columns) * (tile_w + pad)
    legend = _class_legend(dataset.classes, width - 2 * pad)
    bar_h = 56
    height = title_h + head + len(rows) * (tile_h + pad) + bar_h + legend.shape[0] + pad
    img = np.full((height, width, 3), 255, dtype=np.uint8)

    _put(img, f"entropy and IU masks of {len(rows)} training images ({store.path.name})", pad, 26, 0.55)
    for k, name in enumerate(columns):
        w, _, _ = _text_size(name, 0.45)
        _put(img, name, pad + k * (tile_w + pad) + (tile_w - w) // 2, title_h + head - 8, 0.45)
    for r, (image_id, image, label, entropy, iu) in enumerate(rows):
        y = title_h + head + r * (tile_h + pad)
        tiles = (
            cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), (tile_w, tile_h), interpolation=cv2.INTER_AREA),
            _colorize_label(label, palette, (tile_h, tile_w)),
            _colorize(entropy, vmax, colormap, (tile_h, tile_w)),
            _colorize(iu, vmax, colormap, (tile_h, tile_w)),
        )
        for k, tile in enumerate(tiles):
            _paste(img, tile, pad + k * (tile_w + pad), y)
        x = pad + 4
        _put(img, image_id, x + 1, y + 15, 0.4, _BLACK, 2)
        _put(img, image_id, x, y + 14, 0.4, _WHITE)

    # Colour bar under the two mask columns.
    y = title_h + head + len(rows) * (tile_h + pad) + 8
    bx0, bx1 = pad + 2 * (tile_w + pad), width - pad
    ramp = np.linspace(0, 255, bx1 - bx0).astype(np.uint8)[None, :].repeat(14, axis=0)
    _paste(img, cv2.applyColorMap(ramp, colormap), bx0, y)
    cv2.rectangle(img, (bx0, y), (bx1 - 1, y + 13), _GREY, 1)
    for frac in (0.0, 0.5, 1.0):
        text = f"{frac * vmax:.2f}"
        w, h, _ = _text_size(text, 0.4)
        tx = int(bx0 + frac * (bx1 - bx0 - 1))
        cv2.line(img, (tx, y + 14), (tx, y + 18), _GREY, 1)
        _put(img, text, min(max(tx - w // 2, bx0), bx1 - w), y + 20 + h, 0.4)
    unit = "normalised entropy" if normalized else "entropy (nats)"
    _put(img, f"colour scale: {unit}, same for all rows and both columns", pad, y + 12, 0.4, _GREY)
    _paste(img, legend, pad, y + bar_h - 8)
    return _write_png(path, img)


def _colorize(values: np.ndarray, vmax: float, colormap: int, shape: tuple[int, int]) -> np.ndarray:
    scaled = np.clip(np.nan_to_num(values, nan=0.0) / vmax * 255.0, 0, 255).round().astype(np.uint8)
    scaled = cv2.resize(scaled, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return cv2.applyColorMap(scaled, colormap)


def _colorize_label(label: np.ndarray, palette: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Label values to BGR palette colours; values beyond the palette (16-bit ignore) are black."""
    index = np.where(label < len(palette), label, 0).astype(np.intp)
    rgb = palette[index]
    rgb[label >= len(palette)] = 0
    rgb = cv2.resize(rgb, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def _class_legend(classes, width: int) -> np.ndarray:
    """Colour swatches with class names, flowing over as many lines as needed."""
    palette = classes.palette()
    scale, swatch, line_h = 0.4, 12, 20
    items = [(name, _bgr(palette[c])) for c, name in enumerate(classes.names)]
    items.append(("ignored", (0, 0, 0)))
    x, lines, placed = 0, 0, []
    for name, color in items:
        w = swatch + 4 + _text_size(name, scale)[0] + 14
        if x > 0 and x + w > width:
            x, lines = 0, lines + 1
        placed.append((x, lines, name, color))
        x += w
    legend = np.full(((lines + 1) * line_h, max(width, 1), 3), 255, dtype=np.uint8)
    for x, line, name, color in placed:
        y = line * line_h + 4
        cv2.rectangle(legend, (x, y), (x + swatch - 1, y + swatch - 1), color, -1)
        cv2.rectangle(legend, (x, y), (x + swatch - 1, y + swatch - 1), _GREY, 1)
        _put(legend, name, x + swatch + 4, y + swatch - 1, scale)
    return legend

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
    out = Console()
    if not out.is_terminal:
        out = Console(width=max(out.width, 130))
    out.print(statistics_table(result))


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"
