"""The ``iumask stats`` command: count a dataset split's labels (and a mask store's IU and
entropy) with :mod:`iumask.dataset_stats`, draw them with :mod:`iumask.figures`, and write ``stats.json``
and the PNGs into one folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iumask.config import MAKE_MASKS_ADVICE
from iumask.data.formats import open_dataset
from iumask.dataset_stats import cached_label_statistics, mask_statistics
from iumask.errors import IumaskError
from iumask.figures import class_histogram_png, mask_gallery_png
from iumask.files import write_json_atomic
from iumask.store import MaskStore

STATS_FILE = "stats.json"
HISTOGRAM_FILE = "class_histogram.png"
GALLERY_FILE = "masks.png"
STORE_FIX = "run iumask make-masks on this dataset"


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
    dataset = open_dataset(data_root, split, format, conditions)
    store = MaskStore.open(store_path, advice=MAKE_MASKS_ADVICE) if store_path is not None else None
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
    except OSError as exc:
        raise IumaskError(f"{out}: cannot write the statistics ({exc.strerror}); "
                          "choose a writable --out folder") from None
    write_json_atomic(out / STATS_FILE, result)  # an OSError becomes an IumaskError naming the file
    class_histogram_png(labels, dataset.classes, out / HISTOGRAM_FILE)
    if store is not None:
        mask_gallery_png(dataset, store, out / GALLERY_FILE)
    return result

