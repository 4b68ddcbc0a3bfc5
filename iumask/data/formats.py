"""The dataset-format registry: :func:`open_dataset` opens one split of a dataset by format name;
``format="auto"`` picks the layout with :func:`detect_format`. A format is one
:func:`register_format` call: a name, how to recognise its layout, how to open a split and list the
splits. The built-in formats are ``folder`` (:class:`~iumask.data.folder.FolderDataset`) and the
public layouts of :mod:`iumask.data.readers` (``cityscapes``, ``acdc``, ``camvid``; their layouts
are described there).

This module imports no reader, numpy or OpenCV until a split is opened, so the CLI lists the
formats (``--format``'s choices) and checks a configuration without them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from iumask.data.layout import ACDC_CONDITIONS, CLASSES_FILE, acdc_splits, camvid_splits, folder_names
from iumask.errors import DataError

__all__ = ["ACDC_CONDITIONS", "DATASET_FORMATS", "FORMATS", "DatasetFormat", "dataset_splits", "detect_format",
           "format_names", "open_dataset", "register_format"]

if TYPE_CHECKING:
    from iumask.data.folder import PairedDataset

# ---------------------------------------------------------------- the registry: detection and opening


@dataclass(frozen=True)
class DatasetFormat:
    """One dataset layout: how to recognise it and how to open a split. A new format is one
    :func:`register_format` call."""

    name: str
    layout: str  # what detection looks for, for messages
    detect: Callable[[Path], bool]
    open: Callable[[Path, str, Iterable[str] | str | None], PairedDataset]
    takes_conditions: bool = False
    # The splits present at a root (for ``iumask check-data``); None: train and val, iumask's defaults.
    splits: Callable[[Path], list[str]] | None = None


DATASET_FORMATS: dict[str, DatasetFormat] = {}


def register_format(fmt: DatasetFormat) -> DatasetFormat:
    DATASET_FORMATS[fmt.name] = fmt
    return fmt


def _open_folder(root: Path, split: str, conditions) -> PairedDataset:
    from iumask.data.folder import FolderDataset

    return FolderDataset(root, split)


def _open_cityscapes(root: Path, split: str, conditions) -> PairedDataset:
    from iumask.data.readers import CityscapesDataset

    return CityscapesDataset(root, split)


def _open_acdc(root: Path, split: str, conditions) -> PairedDataset:
    from iumask.data.readers import ACDCDataset

    return ACDCDataset(root, split, conditions)


def _open_camvid(root: Path, split: str, conditions) -> PairedDataset:
    from iumask.data.readers import CamVidDataset

    return CamVidDataset(root, split)


register_format(DatasetFormat(
    "folder", "classes.json + images/",
    lambda root: (root / CLASSES_FILE).is_file() and (root / "images").is_dir(),
    _open_folder, splits=lambda root: folder_names(root / "images")))
register_format(DatasetFormat(
    "cityscapes", "leftImg8bit/ + gtFine/",
    lambda root: (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir(),
    _open_cityscapes, splits=lambda root: folder_names(root / "leftImg8bit")))
register_format(DatasetFormat(
    "acdc", "rgb_anon/ + gt/",
    lambda root: (root / "rgb_anon").is_dir() and (root / "gt").is_dir(),
    _open_acdc, takes_conditions=True, splits=acdc_splits))
register_format(DatasetFormat(
    "camvid", "train/ + trainannot/ (or another <split>/ + <split>annot/)",
    lambda root: bool(camvid_splits(root)), _open_camvid, splits=camvid_splits))

FORMATS = ("auto", *DATASET_FORMATS)  # the built-in --format choices (the CLI's, fixed at import)


def format_names() -> tuple[str, ...]:
    """``auto`` and every registered format, read when called: a format registered after import
    (your own, with :func:`register_format`) is usable by name in configs and :func:`open_dataset`."""
    return ("auto", *DATASET_FORMATS)


def dataset_splits(root: str | Path, format: str) -> list[str]:  # noqa: A002 - the user-facing option name
    """The splits of the ``format`` dataset at ``root`` (train and val for a format that does not
    say how to list them)."""
    fmt = DATASET_FORMATS[format]
    return fmt.splits(Path(root)) if fmt.splits is not None else ["train", "val"]


def detect_format(root: str | Path) -> str:
    """The format of the dataset at ``root`` when exactly one layout matches, else :class:`DataError`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found; check the path")
    matches = [name for name, fmt in DATASET_FORMATS.items() if fmt.detect(root)]
    if len(matches) == 1:
        return matches[0]
    looked = "; ".join(f"{fmt.layout} ({name})" for name, fmt in DATASET_FORMATS.items())
    if not matches:
        raise DataError(
            f"{root}: cannot tell the dataset format, looked for {looked}; fix the layout or pass the format"
        )
    raise DataError(f"{root}: ambiguous dataset layout, matches {' and '.join(matches)}; pass the format explicitly")


def open_dataset(
    root: str | Path,
    split: str,
    format: str = "auto",  # noqa: A002 - the user-facing option name
    conditions: str | Iterable[str] | None = None,
) -> PairedDataset:
    """Open one split of the dataset at ``root`` in the given format (one of :func:`format_names`).

    ``conditions`` (ACDC only) selects among fog, night, rain, snow, as a list or a comma-separated
    string; the default is every condition present for the split.
    """
    if format not in format_names():
        raise DataError(f"unknown dataset format {format!r}; choose from {', '.join(format_names())}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found; check the path")
    fmt = DATASET_FORMATS[detect_format(root) if format == "auto" else format]
    if conditions is not None and not fmt.takes_conditions:
        raise DataError(f"{root}: conditions apply only to ACDC, but this is a {fmt.name} dataset; drop the conditions")
    return fmt.open(root, split, conditions)


# Names code imported from here when this module held the readers (and imported the folder
# format's): given on first use, so importing the registry still imports no reader.
_READER_NAMES = ("ACDC_CLASSES", "CAMVID_CLASSES", "CAMVID_LABELS", "CAMVID_VOID", "CITYSCAPES_CLASSES",
                 "CITYSCAPES_LABEL_IDS", "IGNORE_INDEX", "ACDCDataset", "CamVidDataset", "CityscapesDataset")
_FOLDER_NAMES = ("ClassInfo", "FolderDataset", "LabelTable", "PairedDataset", "list_images", "match_labels")


def __getattr__(name: str):
    if name in _READER_NAMES:
        from iumask.data import readers

        return getattr(readers, name)
    if name in _FOLDER_NAMES:
        from iumask.data import folder

        return getattr(folder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
