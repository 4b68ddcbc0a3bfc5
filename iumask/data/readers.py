"""The readers of the public dataset layouts (Cityscapes, ACDC, CamVid), all with
:class:`~iumask.data.folder.FolderDataset`'s interface; :mod:`iumask.data.formats` registers them
(with the folder format) and opens a split by format name.

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
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from iumask.data.folder import ClassInfo, LabelTable, PairedDataset, list_images, match_labels
from iumask.data.layout import ACDC_CONDITIONS, camvid_splits, subdirs
from iumask.errors import DataError

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


def _require_split(split_dir: Path, fix: str) -> None:
    """A missing split folder: say which splits exist next to it."""
    if split_dir.is_dir():
        return
    parent = split_dir.parent
    if not parent.is_dir():
        raise DataError(f"{split_dir}: split folder not found (no {parent.name}/ folder either); {fix}")
    splits = ", ".join(p.name for p in subdirs(parent)) or "none"
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
        for city in subdirs(image_dir):
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
            for seq in subdirs(image_root / cond / split):
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
            splits = ", ".join(camvid_splits(root)) or "none"
            raise DataError(
                f"{image_dir}: split folder not found (CamVid splits present: {splits}); check the split name"
            )
        # The folder format's listing and matching rules apply unchanged (same file name in both folders).
        ids, images = list_images(image_dir)
        labels = match_labels(label_dir, ids, images)
        definition = _definition("camvid", CAMVID_CLASSES, [CAMVID_LABELS])
        super().__init__(root, split, CAMVID_CLASSES, ids, images, labels, CAMVID_LABELS, definition=definition)
