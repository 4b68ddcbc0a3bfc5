"""The ``iumask check-data`` command: is a folder a dataset iumask can use?

It opens every split of the folder with the format's own reader (:func:`iumask.data.formats.open_dataset`,
the code every other command reads data with) and reads each pair: the image checked whole, and
the label checked against the image's size and the classes (with ``quick``, the headers only). Per split it
reports the images and labels found and the first problem. Without a format it tries every
registered format whose layout the folder has, and says which one matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from iumask.data.folder import PairedDataset
from iumask.data.formats import DATASET_FORMATS, dataset_splits, detect_format, open_dataset
from iumask.errors import DataError, printable
from iumask.progress import progress_bar


@dataclass(frozen=True)
class SplitCheck:
    split: str
    pairs: int | None  # image-label pairs found (every image has its label); None: the split did not open
    problem: str | None  # the first problem, None when every pair was read


@dataclass(frozen=True)
class FormatCheck:
    format: str
    splits: tuple[SplitCheck, ...]

    @property
    def problem(self) -> str | None:
        """The first problem (naming its split), or None when the dataset is usable."""
        if not self.splits:
            return f"no split found (the {self.format} layout: {DATASET_FORMATS[self.format].layout})"
        return next((f"split {s.split}: {s.problem}" for s in self.splits if s.problem), None)


def check_data(root: str | Path, format: str = "auto", quick: bool = False) -> list[FormatCheck]:  # noqa: A002
    """Check the dataset at ``root`` as ``format``, or (``auto``) as every format whose layout it has.
    A folder that matches no layout raises :class:`DataError` saying what was looked for."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found; check the path")
    if format == "auto":
        names = [name for name, fmt in DATASET_FORMATS.items() if fmt.detect(root)]
        if not names:
            detect_format(root)  # raises, naming every layout it looked for
    else:
        names = [format]
    return [FormatCheck(name, tuple(_check_split(root, name, split, quick) for split in dataset_splits(root, name)))
            for name in names]


def _check_split(root: Path, format: str, split: str, quick: bool) -> SplitCheck:  # noqa: A002
    try:
        dataset = open_dataset(root, split, format)
    except DataError as exc:  # e.g. an image without its label
        return SplitCheck(split, None, str(exc))
    try:
        if quick:
            dataset.check_headers()
        else:
            _read_pairs(dataset, f"{format} {split}")
    except DataError as exc:
        return SplitCheck(split, len(dataset), str(exc))
    return SplitCheck(split, len(dataset), None)


def _read_pairs(dataset: PairedDataset, what: str) -> None:
    """Check every image and label (:meth:`~iumask.data.folder.PairedDataset.check_pixels`: stops at
    the first problem; a split that passed before and has not changed is not read again)."""
    with progress_bar(lines=False) as progress:  # a bar on a terminal, nothing in a log
        task = progress.add_task(what, total=len(dataset), info="")
        dataset.check_pixels(on_pair=lambda: progress.advance(task))


def print_check(root: Path, checks: list[FormatCheck]) -> None:
    """Per format and split: the pairs found and the first problem (to stdout)."""
    out = Console(highlight=False, soft_wrap=True)
    for check in checks:
        verdict = "usable" if check.problem is None else "not usable"
        out.print(f"{escape(printable(root))}: {check.format} layout ({escape(DATASET_FORMATS[check.format].layout)}): "
                  f"{verdict}")
        if not check.splits:
            out.print(f"  {escape(check.problem)}")
        for split in check.splits:
            found = "?" if split.pairs is None else f"{split.pairs} images, {split.pairs} labels"
            status = "ok" if split.problem is None else f"first problem: {split.problem}"
            out.print(f"  {escape(split.split)}: {found}; {escape(status)}")
    usable = [c.format for c in checks if c.problem is None]
    if len(checks) > 1 and usable:
        out.print(f"matches several layouts ({', '.join(c.format for c in checks)}): pass --format "
                  f"{usable[0]} to the other commands")


def unusable_reason(root: Path, checks: list[FormatCheck]) -> str | None:
    """The one-line error of a folder no format can use, or None when one can."""
    if any(c.problem is None for c in checks):
        return None
    first = checks[0]
    return f"{root}: not a usable {first.format} dataset: {first.problem}"
