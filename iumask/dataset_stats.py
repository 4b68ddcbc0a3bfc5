"""Dataset and mask-store statistics: counting only (JSON-able results), and the label-statistics
cache. Tables of them are in :mod:`iumask.tables`, pictures in
:mod:`iumask.figures`.

* :func:`label_statistics` counts over a dataset's labels (pure counting, JSON-able output);
  class-weight computation (e.g. median frequency balancing) reads its per-class
  ``pixels`` and ``pixels_in_images_containing``.
* :func:`cached_label_statistics` computes that once per dataset content and options and keeps
  it in a JSON cache outside the dataset folder (which may be read-only).
* :func:`mask_statistics` gives per-class mean IU and entropy of a mask store.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from iumask.core import label_instances
from iumask.data.folder import resize_label
from iumask.errors import IumaskError
from iumask.files import CACHE_ENV, default_cache_dir, json_digest, write_json_atomic
from iumask.progress import console, progress_bar

STATS_FORMAT_VERSION = 1
CACHE_SUBDIR = "label-statistics"

# Instance sizes go into log2 bins: bin k holds sizes in [2^k, 2^(k+1)). 63 bins cover int64.
_SIZE_BINS = 63


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
    digest = json_digest(key)[:32]  # the cache file name
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / CACHE_SUBDIR / f"{digest}.json"
    if not refresh:
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if is_statistics_record(cached, key, dataset.classes):
                return cached["stats"]
        except (OSError, ValueError):
            pass  # missing, unreadable or corrupt: recompute
    stats = label_statistics(dataset, connectivity=connectivity, size=size)
    try:  # unique temporary names: concurrent writers of one cache entry are safe
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"key": key, "stats": stats})
    except (OSError, IumaskError) as exc:  # a failed cache write only costs a warning
        detail = (exc.strerror or exc) if isinstance(exc, OSError) else str(exc).split(";")[0]
        console.print(f"[yellow]warning:[/yellow] cannot cache label statistics in {path.parent} "
                      f"({detail}); set {CACHE_ENV} to a writable folder", highlight=False)
    return stats


def is_statistics_record(record: Any, key: dict, classes) -> bool:
    """Whether ``record`` is exactly what :func:`cached_label_statistics` writes for ``key`` and
    ``classes`` (a :class:`~iumask.data.folder.ClassInfo`): every field present, of its type and
    length, nothing else. Anything else (an empty ``stats``, a count that is a string, a list one
    class short) is a cache miss, recomputed, never a crash in a caller."""
    if not (isinstance(record, dict) and set(record) == {"key", "stats"} and record["key"] == key):
        return False
    stats = record["stats"]
    num_classes = classes.num_classes
    scalars = ("num_images", "total_pixels", "ignored_pixels", "labelled_pixels")
    if not (isinstance(stats, dict) and set(stats) == _STATS_FIELDS
            and stats["format_version"] == STATS_FORMAT_VERSION and stats["num_classes"] == num_classes
            and stats["class_names"] == list(classes.names) and stats["ignore_index"] == classes.ignore_index
            and stats["connectivity"] == key["connectivity"] and stats["size"] == key["size"]
            and all(_is_count(stats[name]) for name in scalars)
            and stats["labelled_pixels"] + stats["ignored_pixels"] == stats["total_pixels"]
            and _counts(stats["instance_size_bins"], None)):
        return False
    per_class = stats["per_class"]
    if not (isinstance(per_class, dict) and set(per_class) == _PER_CLASS_FIELDS):
        return False
    bins = len(stats["instance_size_bins"])
    return (all(_counts(per_class[name], num_classes) for name in _PER_CLASS_COUNTS)
            and _numbers(per_class["fraction"], num_classes, optional=False)
            and all(_numbers(per_class[name], num_classes, optional=True) for name in _PER_CLASS_SIZES)
            and _counts(per_class["instance_size_histogram"], num_classes, nested=bins))


_PER_CLASS_COUNTS = ("pixels", "images", "pixels_in_images_containing", "total_pixels_in_images_containing",
                     "instances")
_PER_CLASS_SIZES = ("instance_size_mean", "instance_size_median", "instance_size_min", "instance_size_max")
_PER_CLASS_FIELDS = {*_PER_CLASS_COUNTS, *_PER_CLASS_SIZES, "fraction", "instance_size_histogram"}
_STATS_FIELDS = {"format_version", "num_images", "num_classes", "class_names", "ignore_index", "connectivity",
                 "size", "total_pixels", "ignored_pixels", "labelled_pixels", "instance_size_bins", "per_class"}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _counts(values: Any, length: int | None, nested: int | None = None) -> bool:
    """A list of ``length`` (any, if None) counts, or with ``nested`` of lists of ``nested`` counts."""
    if not isinstance(values, list) or (length is not None and len(values) != length):
        return False
    if nested is not None:
        return all(_counts(row, nested) for row in values)
    return all(_is_count(v) for v in values)


def _numbers(values: Any, length: int, optional: bool) -> bool:
    """A list of ``length`` finite numbers (or None where ``optional``)."""
    def ok(v):
        if v is None:
            return optional
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return isinstance(values, list) and len(values) == length and all(ok(v) for v in values)


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
        for _, arrays in store.read_all():
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
