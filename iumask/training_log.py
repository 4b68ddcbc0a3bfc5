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


def _cell(value) -> str:
    return "" if value is None else repr(float(value))


def write_metrics_csv(path: str | Path, records: list[dict], class_names: list[str]) -> Path:
    """``metrics.csv``: one row per epoch of the engine's records (see
    :data:`iumask.engine.EpochCallback`): epoch, global step, mean training loss, learning rates
    at the end of the epoch, validation mIoU (and the ensemble's, for members trained together),
    per-class validation IoU (``iou_<class>``, ``nan`` for a class absent from the split and the
    predictions) and the epoch's seconds. Floats are written exactly (``repr``)."""
    lr_count = len(records[0]["lr"]) if records else 2
    ensemble = any(r.get("ensemble_val_miou") is not None for r in records)
    header = ["epoch", "step", "loss", *_lr_names(lr_count), "val_miou", *(["ensemble_val_miou"] if ensemble else []),
              *(f"iou_{name}" for name in class_names), "seconds"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in records:
        writer.writerow([r["epoch"], r["step"], _cell(r["loss"]), *map(_cell, r["lr"]), _cell(r["val_miou"]),
                         *([_cell(r["ensemble_val_miou"])] if ensemble else []), *map(_cell, r["val_iou"]),
                         f"{r['seconds']:.3f}"])
    return write_bytes_atomic(path, buffer.getvalue().encode())



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

