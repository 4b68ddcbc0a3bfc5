"""Readers for public dataset layouts, all with :class:`~iumask.data.folder.FolderDataset`'s interface.

:func:`open_dataset` opens one split; ``format="auto"`` picks the layout with :func:`detect_format`.

Layouts (ROOT is the folder passed in)::

    folder      ROOT/classes.json, ROOT/images/<split>/<id>.png|jpg, ROOT/labels/<split>/<id>.png
    cityscapes  ROOT/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png
                ROOT/gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png   (preferred, used as is)
                                          or <stem>_gtFine_labelIds.png       (mapped labelId -> trainId)
                ids "<city>/<stem>"
    acdc        ROOT/rgb_anon/<condition>/<split>/<sequence>/<stem>_rgb_anon.png
                ROOT/gt/<condition>/<split>/<sequence>/<stem>_gt_labelTrainIds.png  (preferred)
                                                             or <stem>_gt_labelIds.png
                conditions fog, night, rain, snow; ids "<condition>/<sequence>/<stem>"
    camvid      ROOT/<split>/<name>.png with ROOT/<split>annot/<name>.png (SegNet's 11-class CamVid)

Cityscapes and ACDC share one :class:`ClassInfo` (the 19 Cityscapes train classes, ignore 255), so a
model trained on one is evaluated on the other. CamVid stores void as 11; it is mapped to 255 on read
so that the rest of iumask sees a single ignore index. Every problem raises
:class:`~iumask.errors.DataError` with a one-line message naming the path and the fix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iumask.data.folder import (
    CLASSES_FILE,
    ClassInfo,
    FolderDataset,
    LabelTable,
    PairedDataset,
    list_images,
    match_labels,
)
from iumask.errors import DataError

ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
IGNORE_INDEX = 255

# ---------------------------------------------------------------- Cityscapes / ACDC classes

# (name, labelId, RGB colour) of the 19 train classes, in trainId order (cityscapesScripts labels.py).
_CITYSCAPES_TRAIN_CLASSES = (
    ("road", 7, (128, 64, 128)),
    ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)),
    ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)),
    ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
)

CITYSCAPES_CLASSES = ClassInfo(
    names=tuple(name for name, _, _ in _CITYSCAPES_TRAIN_CLASSES),
    colors=tuple(color for _, _, color in _CITYSCAPES_TRAIN_CLASSES),
    ignore_index=IGNORE_INDEX,
)
ACDC_CLASSES = CITYSCAPES_CLASSES  # ACDC is annotated with the Cityscapes label set


def _cityscapes_label_ids_table() -> LabelTable:
    table = np.full(256, -1, dtype=np.int16)
    table[:34] = IGNORE_INDEX  # labelIds 0..33: void/unused classes are ignored ...
    for train_id, (_, label_id, _) in enumerate(_CITYSCAPES_TRAIN_CLASSES):
        table[label_id] = train_id  # ... except the 19 train classes
    # License plate has labelId -1, which an 8-bit PNG stores as 255.
    table[255] = IGNORE_INDEX
    return LabelTable("cityscapes-labelIds-to-trainIds-v1", table, "labelIds 0..33, or 255 for license plate -1")


CITYSCAPES_LABEL_IDS = _cityscapes_label_ids_table()

# ---------------------------------------------------------------- CamVid classes

CAMVID_CLASSES = ClassInfo(
    names=("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
           "Pedestrian", "Bicyclist"),
    colors=((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
            (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)),
    ignore_index=IGNORE_INDEX,
)
CAMVID_VOID = 11


def _camvid_table() -> LabelTable:
    table = np.full(256, -1, dtype=np.int16)
    table[:CAMVID_VOID] = np.arange(CAMVID_VOID)
    table[CAMVID_VOID] = IGNORE_INDEX  # SegNet's void label 11 becomes iumask's ignore index
    return LabelTable("camvid-segnet11-v1", table, "0..10, or 11 for void")


CAMVID_LABELS = _camvid_table()

# ---------------------------------------------------------------- datasets


def _definition(fmt: str, classes: ClassInfo, tables: Iterable[LabelTable]) -> bytes:
    """Bytes naming the format, classes and mapping tables, hashed into the fingerprint."""
    desc = {
        "format": fmt,
        "classes": classes.to_dict(),
        "label_tables": {t.name: hashlib.sha256(t.table.astype("<i2").tobytes()).hexdigest() for t in tables},
    }
    return json.dumps(desc, sort_keys=True).encode("utf-8")


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _require_split(split_dir: Path, fix: str) -> None:
    """A missing split folder: say which splits exist next to it."""
    if split_dir.is_dir():
        return
    parent = split_dir.parent
    if not parent.is_dir():
        raise DataError(f"{split_dir}: split folder not found (no {parent.name}/ folder either); {fix}")
    splits = ", ".join(p.name for p in _subdirs(parent)) or "none"
    raise DataError(f"{split_dir}: split folder not found (splits present: {splits}); use one of those, or {fix}")


def _pick_label(label_dir: Path, prefix: str, image: Path) -> Path:
    """``<prefix>_labelTrainIds.png`` if present (no mapping needed), else ``<prefix>_labelIds.png``."""
    train_ids = label_dir / f"{prefix}_labelTrainIds.png"
    if train_ids.is_file():
        return train_ids
    label_ids = label_dir / f"{prefix}_labelIds.png"
    if label_ids.is_file():
        return label_ids
    raise DataError(f"{image}: no label file {train_ids} (or {label_ids.name}); add it or remove the image")


class _CityscapesLabels(PairedDataset):
    """Cityscapes-style labels: trainIds files used directly, labelIds files mapped per file."""

    def label_table_for(self, i: int) -> LabelTable | None:
        return CITYSCAPES_LABEL_IDS if self.label_paths[i].name.endswith("_labelIds.png") else None

    def _label_fix_hint(self) -> str:
        return "labelTrainIds files must hold trainIds 0..18 or 255; fix or re-export the label file"


class CityscapesDataset(_CityscapesLabels):
    """One split of Cityscapes (``leftImg8bit`` + ``gtFine``), with the 19 train classes."""

    def __init__(self, root: str | Path, split: str) -> None:
        root = Path(root)
        image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        _require_split(image_dir, "point ROOT at the folder holding leftImg8bit/ and gtFine/")
        _require_split(label_dir, f"put the gtFine labels of split {split!r} there")
        entries = []
        for city in _subdirs(image_dir):
            for image in city.glob("*_leftImg8bit.png"):
                stem = image.name[: -len("_leftImg8bit.png")]
                label = _pick_label(label_dir / city.name, f"{stem}_gtFine", image)
                entries.append((f"{city.name}/{stem}", image, label))
        if not entries:
            raise DataError(f"{image_dir}: no <city>/*_leftImg8bit.png images found; add the images of this split")
        entries.sort()
        ids, images, labels = (list(x) for x in zip(*entries))
        definition = _definition("cityscapes", CITYSCAPES_CLASSES, [CITYSCAPES_LABEL_IDS])
        super().__init__(root, split, CITYSCAPES_CLASSES, ids, images, labels, definition=definition)


class ACDCDataset(_CityscapesLabels):
    """One split of ACDC (``rgb_anon`` + ``gt``) for some adverse conditions, with Cityscapes classes."""

    def __init__(self, root: str | Path, split: str, conditions: str | Iterable[str] | None = None) -> None:
        root = Path(root)
        image_root, label_root = root / "rgb_anon", root / "gt"
        if not image_root.is_dir():
            raise DataError(f"{image_root}: folder not found; point ROOT at the folder holding rgb_anon/ and gt/")
        available = [c for c in ACDC_CONDITIONS if (image_root / c / split).is_dir()]
        self.conditions = _select_conditions(conditions, available, image_root, split)
        entries = []
        for cond in self.conditions:
            label_split = label_root / cond / split
            _require_split(label_split, f"put the ACDC {cond} labels of split {split!r} there")
            for seq in _subdirs(image_root / cond / split):
                for image in seq.glob("*_rgb_anon.png"):
                    stem = image.name[: -len("_rgb_anon.png")]
                    label = _pick_label(label_split / seq.name, f"{stem}_gt", image)
                    entries.append((f"{cond}/{seq.name}/{stem}", image, label))
        if not entries:
            where = ", ".join(str(image_root / c / split) for c in self.conditions)
            raise DataError(f"{where}: no <sequence>/*_rgb_anon.png images found; add the images of this split")
        entries.sort()
        ids, images, labels = (list(x) for x in zip(*entries))
        definition = _definition("acdc", ACDC_CLASSES, [CITYSCAPES_LABEL_IDS])
        super().__init__(root, split, ACDC_CLASSES, ids, images, labels, definition=definition)


def _select_conditions(
    conditions: str | Iterable[str] | None, available: list[str], image_root: Path, split: str
) -> list[str]:
    """The requested ACDC conditions (a list or comma-separated string), or all present ones."""
    present = ", ".join(available) or "none"
    if conditions is None:
        if not available:
            raise DataError(
                f"{image_root}: no <condition>/{split} folder for any of {', '.join(ACDC_CONDITIONS)}; "
                "check the split name (ACDC has train, val, test)"
            )
        return available
    names = conditions.split(",") if isinstance(conditions, str) else list(conditions)
    wanted = []
    for name in (str(n).strip().lower() for n in names):
        if name not in ACDC_CONDITIONS:
            raise DataError(
                f"{image_root}: unknown ACDC condition {name!r}; choose from {', '.join(ACDC_CONDITIONS)} "
                f"(present for split {split!r}: {present})"
            )
        if name not in available:
            raise DataError(
                f"{image_root / name / split}: ACDC condition {name!r} not found for split {split!r}; "
                f"available: {present}"
            )
        if name not in wanted:
            wanted.append(name)
    if not wanted:
        raise DataError(f"{image_root}: no ACDC condition selected; choose from {present}")
    return sorted(wanted, key=ACDC_CONDITIONS.index)


class CamVidDataset(PairedDataset):
    """One split of SegNet's 11-class CamVid (``<split>/`` + ``<split>annot/``, same file names).

    The files store void as 11; :meth:`read_label` maps it to ignore index 255 (and 0..10 to
    themselves), so ``classes.ignore_index`` is 255 like every other iumask dataset. Any other
    stored value raises :class:`DataError`.
    """

    def __init__(self, root: str | Path, split: str) -> None:
        root = Path(root)
        image_dir, label_dir = root / split, root / f"{split}annot"
        if not image_dir.is_dir():
            splits = ", ".join(_camvid_splits(root)) or "none"
            raise DataError(
                f"{image_dir}: split folder not found (CamVid splits present: {splits}); check the split name"
            )
        # The folder format's listing and matching rules apply unchanged (same file name in both folders).
        ids, images = list_images(image_dir)
        labels = match_labels(label_dir, ids, images)
        definition = _definition("camvid", CAMVID_CLASSES, [CAMVID_LABELS])
        super().__init__(root, split, CAMVID_CLASSES, ids, images, labels, CAMVID_LABELS, definition=definition)


def _camvid_splits(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return [p.name for p in _subdirs(root) if (root / f"{p.name}annot").is_dir()]


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


def _folder_names(folder: Path) -> list[str]:
    return [p.name for p in _subdirs(folder)] if folder.is_dir() else []


def _acdc_splits(root: Path) -> list[str]:
    """Splits with images and labels for some condition (ACDC's test split has no public labels)."""
    return sorted({split for cond in ACDC_CONDITIONS for split in _folder_names(root / "rgb_anon" / cond)
                   if (root / "gt" / cond / split).is_dir()})


register_format(DatasetFormat(
    "folder", "classes.json + images/",
    lambda root: (root / CLASSES_FILE).is_file() and (root / "images").is_dir(),
    lambda root, split, conditions: FolderDataset(root, split),
    splits=lambda root: _folder_names(root / "images")))
register_format(DatasetFormat(
    "cityscapes", "leftImg8bit/ + gtFine/",
    lambda root: (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir(),
    lambda root, split, conditions: CityscapesDataset(root, split),
    splits=lambda root: _folder_names(root / "leftImg8bit")))
register_format(DatasetFormat(
    "acdc", "rgb_anon/ + gt/",
    lambda root: (root / "rgb_anon").is_dir() and (root / "gt").is_dir(),
    ACDCDataset, takes_conditions=True, splits=_acdc_splits))
register_format(DatasetFormat(
    "camvid", "train/ + trainannot/ (or another <split>/ + <split>annot/)",
    lambda root: bool(_camvid_splits(root)),
    lambda root, split, conditions: CamVidDataset(root, split),
    splits=_camvid_splits))

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
    """Open one split of the dataset at ``root`` in the given format (one of :data:`FORMATS`).

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
