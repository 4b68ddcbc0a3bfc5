"""A member's training log, from the engine's epoch records: ``metrics.csv`` (one row per epoch),
and TensorBoard events with a few validation images (:class:`TensorBoardLog`; ``curves.png`` is
drawn by :func:`iumask.figures.training_curves_png`).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from iumask.errors import IumaskError
from iumask.figures import heat_rgb, label_colors
from iumask.files import write_bytes_atomic

METRICS_FILE = "metrics.csv"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_FIX = "pip install iumask[tensorboard]"


# --------------------------------------------------------------------------------------------
# training log


def _lr_names(count: int) -> list[str]:
    # iumask's optimizers have two groups: the encoder and the rest (decoder and head).
    return ["lr_encoder", "lr_decoder"] if count == 2 else [f"lr_{i}" for i in range(count)]


def epoch_rows(records: list[dict], class_names: list[str]) -> list[dict]:
    """The engine's epoch records (see :data:`iumask.engine.EpochCallback`) as the rows of
    ``metrics.csv``: per epoch ``{column: value}`` in column order (None: not measured). What
    :func:`write_metrics_csv` writes and :func:`read_metrics_csv` reads back, so the file and a
    tracker (:mod:`iumask.tracking`) name the same values alike."""
    ensemble = any(r.get("ensemble_val_miou") is not None for r in records)
    rows = []
    for r in records:
        row = {"epoch": r["epoch"], "step": r["step"], "loss": r["loss"], **dict(zip(_lr_names(len(r["lr"])), r["lr"])),
               "val_miou": r["val_miou"]}
        if ensemble:
            row["ensemble_val_miou"] = r.get("ensemble_val_miou")
        row.update({f"iou_{name}": iou for name, iou in zip(class_names, r["val_iou"])})
        row["seconds"] = r["seconds"]
        rows.append(row)
    return rows


def _cell(value) -> str:
    return "" if value is None else repr(float(value))


def write_metrics_csv(path: str | Path, records: list[dict], class_names: list[str]) -> Path:
    """``metrics.csv``: one row per epoch of the engine's records (see :func:`epoch_rows`): epoch,
    global step, mean training loss, learning rates at the end of the epoch, validation mIoU (and
    the ensemble's, for members trained together), per-class validation IoU (``iou_<class>``,
    ``nan`` for a class absent from the split and the predictions) and the epoch's seconds. Floats
    are written exactly (``repr``)."""
    rows = epoch_rows(records, class_names)
    header = list(rows[0]) if rows else ["epoch", "step", "loss", *_lr_names(2), "val_miou",
                                         *(f"iou_{name}" for name in class_names), "seconds"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([row["epoch"], row["step"], *(_cell(row[k]) for k in header[2:-1]), f"{row['seconds']:.3f}"])
    return write_bytes_atomic(path, buffer.getvalue().encode())


def read_metrics_csv(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.csv`` (as :func:`epoch_rows` gives them: epoch and step integers,
    the other columns floats or None); no rows when the file is missing (a member trained before
    iumask wrote one)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: int(v) if k in ("epoch", "step") else (float(v) if v != "" else None) for k, v in row.items()}
                for row in csv.DictReader(f)]


def require_tensorboard() -> None:
    """Fail before training starts when ``--tensorboard`` is given without the package."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise IumaskError(f"--tensorboard needs the tensorboard package: {TENSORBOARD_FIX}") from None


class TensorBoardLog:
    """One member's TensorBoard events in ``log_dir``: per epoch the loss, learning rates,
    validation mIoU (the ensemble's too) and per-class IoU, and a few validation images as rows of
    image | prediction | pixel entropy | IU (entropy and IU on the fixed scale [0, ln C]).

    The writer opens at the first epoch logged with ``purge_step`` set to it, so events a killed
    run wrote after its last checkpoint are dropped on resume."""

    def __init__(self, log_dir: Path, class_names: list[str], palette: np.ndarray):
        self.log_dir, self.class_names, self.palette = Path(log_dir), list(class_names), palette
        self.writer = None

    def log(self, record: dict, images: list[dict] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        epoch = record["epoch"]
        if self.writer is None:
            self.writer = SummaryWriter(str(self.log_dir), purge_step=epoch)
        w = self.writer
        w.add_scalar("train/loss", record["loss"], epoch)
        for name, lr in zip(_lr_names(len(record["lr"])), record["lr"]):
            w.add_scalar(f"train/{name}", lr, epoch)
        w.add_scalar("val/miou", record["val_miou"], epoch)
        if record.get("ensemble_val_miou") is not None:
            w.add_scalar("val/ensemble_miou", record["ensemble_val_miou"], epoch)
        for name, iou in zip(self.class_names, record["val_iou"]):
            if not math.isnan(iou):
                w.add_scalar(f"val_iou/{name}", iou, epoch)
        w.add_scalar("train/seconds_per_epoch", record["seconds"], epoch)
        vmax = math.log(max(len(self.class_names), 2))
        for k, sample in enumerate(images or []):
            row = np.concatenate([sample["image"], label_colors(sample["prediction"], self.palette),
                                  heat_rgb(sample["entropy"], vmax), heat_rgb(sample["iu"], vmax)], axis=1)
            w.add_image(f"val/{k}: image | prediction | entropy | IU", row, epoch, dataformats="HWC")
        w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

