"""Where a dataset layout keeps its files, read with :mod:`pathlib` only (no numpy, OpenCV or PIL),
so that the format registry (:mod:`iumask.data.formats`) and the CLI's ``--format`` and
``--conditions`` choices need none of the readers: which splits a root has, the ACDC conditions,
the folder format's classes file.
"""

from __future__ import annotations

from pathlib import Path

CLASSES_FILE = "classes.json"
ACDC_CONDITIONS = ("fog", "night", "rain", "snow")


def subdirs(folder: Path) -> list[Path]:
    """The visible sub-folders of ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_names(folder: Path) -> list[str]:
    """The names of :func:`subdirs`, or none when ``folder`` is missing."""
    return [p.name for p in subdirs(folder)] if folder.is_dir() else []


def camvid_splits(root: Path) -> list[str]:
    """The ``<split>/`` folders of a CamVid root that have a ``<split>annot/`` beside them."""
    if not root.is_dir():
        return []
    return [p.name for p in subdirs(root) if (root / f"{p.name}annot").is_dir()]


def acdc_splits(root: Path) -> list[str]:
    """Splits with images and labels for some condition (ACDC's test split has no public labels)."""
    return sorted({split for cond in ACDC_CONDITIONS for split in folder_names(root / "rgb_anon" / cond)
                   if (root / "gt" / cond / split).is_dir()})
