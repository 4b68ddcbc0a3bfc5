"""Dataset and mask-store statistics: class frequencies, instance counts and sizes, per-class
uncertainty, and pictures of them (the paper's Figures 1, 2 and 4), drawn with OpenCV.

* :func:`label_statistics` counts over a dataset's labels (pure counting, JSON-able output);
  class-weight computation (e.g. median frequency balancing) reads its per-class
  ``pixels`` and ``pixels_in_images_containing``.
* :func:`cached_label_statistics` computes that once per dataset content and options and keeps
  it in a JSON cache outside the dataset folder (which may be read-only).
* :func:`mask_statistics` gives per-class mean IU and entropy of a mask store.
* :func:`class_histogram_png` and :func:`mask_gallery_png` draw PNGs.
* :func:`write_statistics` is the ``iumask stats`` command.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from iumask.core import label_instances
from iumask.data.folder import resize_label
from iumask.errors import IumaskError
from iumask.progress import console, progress_bar

STATS_FORMAT_VERSION = 1
CACHE_ENV = "IUMASK_CACHE"
CACHE_SUBDIR = "label-statistics"
STATS_FILE = "stats.json"
HISTOGRAM_FILE = "class_histogram.png"
GALLERY_FILE = "masks.png"
STORE_FIX = "run iumask make-masks on this dataset"

# Instance sizes go into log2 bins: bin k holds sizes in [2^k, 2^(k+1)). 63 bins cover int64.
_SIZE_BINS = 63

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BLACK = (0, 0, 0)
_WHITE = (255, 255, 255)
_GREY = (110, 110, 110)
_LIGHT = (225, 225, 225)


# --------------------------------------------------------------------------------------------
# label statistics


def label_statistics(dataset, connectivity: int = 8, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Count class pixels, images and instances over every label of ``dataset``.

    ``dataset`` has the :class:`~iumask.data.folder.FolderDataset` interface (``ids``,
    ``classes``, ``read_label(i)``). ``size`` (H, W) resizes labels with nearest neighbour first
    (as training at that size does). Instances are the connected components of one class
    (:func:`iumask.label_instances`, ``connectivity`` 8 or 4); ignored pixels belong to none.

    Returns a JSON-able dict (plain lists and numbers). Per class, in ``per_class`` (lists of C
    entries, class order of ``classes.json``):

    * ``pixels``: labelled pixels of the class; ``fraction``: ``pixels`` / all labelled pixels
    * ``images``: images containing the class
    * ``pixels_in_images_containing``: labelled pixels of the images containing the class, and
      ``total_pixels_in_images_containing`` the same counting ignored pixels too (median
      frequency balancing: ``freq_c = pixels_c / pixels_in_images_containing_c``)
    * ``instances``; ``instance_size_mean``, ``_median``, ``_min``, ``_max`` (``None`` without
      instances); ``instance_size_histogram``: counts per log2 bin, bin k holding sizes in
      ``[2^k, 2^(k+1))`` (lower edges in the top-level ``instance_size_bins``)

    and over the dataset ``num_images``, ``total_pixels``, ``ignored_pixels``, ``labelled_pixels``.
    """
    if connectivity not in (4, 8):
        raise IumaskError(f"connectivity must be 4 or 8, got {connectivity}")
    classes = dataset.classes
    num_classes, ignore = classes.num_classes, classes.ignore_index
    pixels = np.zeros(num_classes, dtype=np.int64)
    images = np.zeros(num_classes, dtype=np.int64)
    in_images = np.zeros(num_classes, dtype=np.int64)
    total_in_images = np.zeros(num_classes, dtype=np.int64)
    histogram = np.zeros((num_classes, _SIZE_BINS), dtype=np.int64)
    sizes_parts, classes_parts = [], []
    total = 0
    n = len(dataset.ids)
    with progress_bar() as progress:
        task = progress.add_task("label statistics", total=n, info="")
        for i in range(n):
            label = _resized_label(dataset.read_label(i), size)
            counts = _class_counts(label, num_classes)
            labelled = int(counts.sum())
            present = counts > 0
            pixels += counts
            images += present
            in_images += np.where(present, labelled, 0)
            total_in_images += np.where(present, label.size, 0)
            total += label.size

            instances, instance_class = label_instances(label, num_classes, connectivity, ignore)
            sizes = np.bincount(instances.ravel(), minlength=len(instance_class))[1:]
            owner = np.asarray(instance_class[1:], dtype=np.int64)
            bins = np.frexp(sizes.astype(np.float64))[1] - 1  # floor(log2(size)), exact
            histogram += np.bincount(owner * _SIZE_BINS + bins,
                                     minlength=num_classes * _SIZE_BINS).reshape(num_classes, _SIZE_BINS)
            sizes_parts.append(sizes.astype(np.int64))
            classes_parts.append(owner)
            progress.update(task, advance=1)

    sizes = np.concatenate(sizes_parts) if sizes_parts else np.zeros(0, dtype=np.int64)
    owners = np.concatenate(classes_parts) if classes_parts else np.zeros(0, dtype=np.int64)
    order = np.argsort(owners, kind="stable")
    by_class = np.split(sizes[order], np.cumsum(np.bincount(owners, minlength=num_classes))[:-1])
    used_bins = max(1, int(np.flatnonzero(histogram.any(axis=0)).max(initial=-1)) + 1)
    labelled_total = int(pixels.sum())

    def size_stat(fn):
        return [None if len(s) == 0 else _py(fn(s)) for s in by_class]

    return {
        "format_version": STATS_FORMAT_VERSION,
        "num_images": n,
        "num_classes": num_classes,
        "class_names": list(classes.names),
        "ignore_index": ignore,
        "connectivity": connectivity,
        "size": None if size is None else [int(size[0]), int(size[1])],
        "total_pixels": int(total),
        "ignored_pixels": int(total - labelled_total),
        "labelled_pixels": labelled_total,
        "instance_size_bins": [1 << k for k in range(used_bins)],
        "per_class": {
            "pixels": pixels.tolist(),
            "fraction": (pixels / labelled_total if labelled_total else np.zeros(num_classes)).tolist(),
            "images": images.tolist(),
            "pixels_in_images_containing": in_images.tolist(),
            "total_pixels_in_images_containing": total_in_images.tolist(),
            "instances": [len(s) for s in by_class],
            "instance_size_mean": size_stat(lambda s: float(s.mean())),
            "instance_size_median": size_stat(lambda s: float(np.median(s))),
            "instance_size_min": size_stat(lambda s: int(s.min())),
            "instance_size_max": size_stat(lambda s: int(s.max())),
            "instance_size_histogram": histogram[:, :used_bins].tolist(),
        },
    }


def _resized_label(label: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    return label if size is None else resize_label(label, size)


def _class_counts(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels of each class 0..C-1 (other values, i.e. the ignore label, are not counted)."""
    values = label.ravel()
    if label.dtype == np.uint8:  # no masking pass: every value counts, then all but the classes are cut
        return np.bincount(values, minlength=max(256, num_classes))[:num_classes].astype(np.int64)
    return np.bincount(values[values < num_classes], minlength=num_classes)[:num_classes].astype(np.int64)


def _py(value):
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------------------------
# cache


def default_cache_dir() -> Path:
    """``$IUMASK_CACHE`` if set, else ``~/.cache/iumask``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "iumask"


def cached_label_statistics(
    dataset,
    cache_dir: str | Path | None = None,
    connectivity: int = 8,
    size: tuple[int, int] | None = None,
    fingerprint: str | None = None,
    refresh: bool = False,
) -> dict[str, Any]:
    """:func:`label_statistics`, computed once per dataset content and options.

    The result is cached as JSON in ``<cache_dir>/label-statistics/`` (``cache_dir`` defaults
    to :func:`default_cache_dir`), keyed by ``dataset.fingerprint()`` (which changes when any
    image, label or classes.json changes) and the options. Pass ``fingerprint`` if already known.
    A cache that cannot be written only costs a warning; ``refresh`` recomputes.
    """
    key = {
        "format_version": STATS_FORMAT_VERSION,
        "dataset_fingerprint": fingerprint or dataset.fingerprint(),
        "connectivity": int(connectivity),
        "size": None if size is None else [int(size[0]), int(size[1])],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / CACHE_SUBDIR / f"{digest}.json"
    if not refresh:
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(cached, dict) and cached.get("key") == key and isinstance(cached.get("stats"), dict):
                return cached["stats"]
        except (OSError, ValueError):
            pass  # missing, unreadable or corrupt: recompute
    stats = label_statistics(dataset, connectivity=connectivity, size=size)
    try:
        _write_json(path, {"key": key, "stats": stats})
    except OSError as exc:
        console.print(f"[yellow]warning:[/yellow] cannot cache label statistics in {path.parent} "
                      f"({exc.strerror or exc}); set {CACHE_ENV} to a writable folder", highlight=False)
    return stats


def _write_json(path: Path, data: Any) -> None:
    """Atomic write with a unique temporary name (concurrent writers of one cache entry are safe)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# mask statistics


def mask_statistics(store) -> dict[str, Any]:
    """Per-class mean IU and mean entropy of a :class:`~iumask.store.MaskStore`.

    A pixel's class is the store's ``prediction`` (the ensemble's argmax; the store keeps it
    also when the IU was made from labels). Per class (``per_class``, C entries): ``pixels``,
    ``fraction``, ``mean_iu``, ``mean_entropy`` (``None`` for a class never predicted);
    overall ``mean_entropy``, ``mean_iu``, ``max_entropy``, ``max_iu``. Every image must be complete.
    """
    identity = store.identity
    names = list(identity["class_names"])
    num_classes = len(names)
    pixels = np.zeros(num_classes, dtype=np.int64)
    iu_sum = np.zeros(num_classes, dtype=np.float64)
    entropy_sum = np.zeros(num_classes, dtype=np.float64)
    total = 0
    total_iu = total_entropy = 0.0
    max_iu = max_entropy = 0.0
    with progress_bar() as progress:
        task = progress.add_task("mask statistics", total=store.num_images, info="")
        for i in range(store.num_images):
            arrays = store.read(i)
            pred = arrays["prediction"].ravel()
            iu = arrays["instance_uncertainty"].ravel().astype(np.float64)
            entropy = arrays["entropy"].ravel().astype(np.float64)
            # argmax class ids 0..C-1 (uint16 beyond 256 classes): C bins, whatever was predicted
            pixels += np.bincount(pred, minlength=num_classes)[:num_classes]
            iu_sum += np.bincount(pred, weights=iu, minlength=num_classes)[:num_classes]
            entropy_sum += np.bincount(pred, weights=entropy, minlength=num_classes)[:num_classes]
            total += pred.size
            total_iu += float(iu.sum())
            total_entropy += float(entropy.sum())
            max_iu = max(max_iu, float(iu.max(initial=0.0)))
            max_entropy = max(max_entropy, float(entropy.max(initial=0.0)))
            progress.update(task, advance=1)

    def mean(sums):
        return [float(s / p) if p else None for s, p in zip(sums, pixels)]

    return {
        "format_version": STATS_FORMAT_VERSION,
        "store": str(store.path),
        "num_images": store.num_images,
        "class_names": names,
        "class_source": "prediction",
        "options": identity.get("options"),
        "total_pixels": int(total),
        "mean_entropy": total_entropy / total if total else None,
        "mean_iu": total_iu / total if total else None,
        "max_entropy": max_entropy,
        "max_iu": max_iu,
        "per_class": {
            "pixels": pixels.tolist(),
            "fraction": (pixels / total if total else np.zeros(num_classes)).tolist(),
            "mean_iu": mean(iu_sum),
            "mean_entropy": mean(entropy_sum),
        },
    }


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise IumaskError(f"{path}: cannot encode the PNG")
    try:
        path.write_bytes(buf.tobytes())
    except OSError as exc:
        raise IumaskError(f"{path}: cannot write the file ({exc.strerror}); choose a writable --out folder") from None
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
    """Bar chart of the pixels per class of :func:`label_statistics` ``stats`` (the paper's
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
# the `iumask stats` command


def write_statistics(
    data_root: str | Path,
    out: str | Path,
    split: str = "train",
    store_path: str | Path | None = None,
    connectivity: int = 8,
    cache_dir: str | Path | None = None,
    format: str = "auto",
    conditions: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Write ``stats.json`` and ``class_histogram.png`` (and, with a mask store, ``masks.png``)
    into ``out``; return the stats.json content. A store must have been made from this split."""
    from iumask.data.formats import open_dataset
    from iumask.store import MaskStore

    dataset = open_dataset(data_root, split, format, conditions)
    store = MaskStore.open(store_path) if store_path is not None else None
    fingerprint = dataset.fingerprint()
    if store is not None:
        store.check_identity({"image_ids": dataset.ids, "dataset_fingerprint": fingerprint}, fix=STORE_FIX)
    labels = cached_label_statistics(dataset, cache_dir, connectivity=connectivity, fingerprint=fingerprint)
    result = {
        "dataset": {"root": str(Path(data_root).resolve()), "split": split, "fingerprint": fingerprint},
        "labels": labels,
        "masks": mask_statistics(store) if store is not None else None,
    }
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / STATS_FILE, result)
    except OSError as exc:
        raise IumaskError(f"{out}: cannot write the statistics ({exc.strerror}); "
                          "choose a writable --out folder") from None
    class_histogram_png(labels, dataset.classes, out / HISTOGRAM_FILE)
    if store is not None:
        mask_gallery_png(dataset, store, out / GALLERY_FILE)
    return result


def statistics_table(result: dict) -> Table:
    """A rich table of :func:`write_statistics`' result: one row per class."""
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
