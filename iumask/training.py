"""One training loop for every train command: only the loss differs (method.md §4, §9).

Adam with a lower backbone learning rate, a poly schedule, per-epoch validation mIoU, and a
checkpoint after every epoch (written atomically) so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from iumask.core import SegmentationMetrics
from iumask.models import predict_logits
from iumask.progress import progress_bar

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class TrainOptions:
    """Optimisation settings; defaults are the authors' (method.md §9) except where noted."""

    epochs: int = 60
    batch_size: int = 2
    lr: float | None = None  # None: 1e-3 for MobileNet encoders, 1e-4 otherwise (authors)
    backbone_lr_factor: float = 0.1
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    seed: int = 0
    num_workers: int = 0

    def lr_for(self, encoder: str) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if "mobilenet" in encoder else 1e-4

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, encoder: str, options: TrainOptions):
    lr = options.lr_for(encoder)
    encoder_params = list(model.encoder.parameters())
    encoder_ids = {id(p) for p in encoder_params}
    rest = [p for p in model.parameters() if id(p) not in encoder_ids]
    return torch.optim.Adam(
        [{"params": encoder_params, "lr": lr * options.backbone_lr_factor}, {"params": rest, "lr": lr}],
        weight_decay=options.weight_decay,
    )


def poly_schedule(optimizer, total_steps: int, power: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / max(1, total_steps)) ** power
    )


@torch.no_grad()
def validate(model, loader, num_classes: int, ignore_index: int, device) -> float:
    model.eval()
    metrics = SegmentationMetrics(num_classes, ignore_index)
    for batch in loader:
        logits = predict_logits(model, batch["image"].to(device))
        metrics.update(logits.argmax(1).cpu(), batch["label"])
    return metrics.compute()["miou"]


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash while writing leaves the previous checkpoint intact


def train_model(
    model: torch.nn.Module,
    encoder: str,
    train_set,
    val_set,
    loss_fn: Callable[[torch.Tensor, dict], torch.Tensor],
    options: TrainOptions,
    folder: Path,
    identity: dict,
    num_classes: int,
    ignore_index: int,
    device: torch.device,
    label: str,
) -> list[dict]:
    """Train ``model`` in place; return the per-epoch history (loss, validation mIoU).

    ``identity`` describes everything the result depends on; a checkpoint in ``folder`` with the
    same identity is resumed, one with another identity is ignored and replaced.
    """
    seed_everything(options.seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.to(device)
    optimizer = make_optimizer(model, encoder, options)
    drop_last = len(train_set) > options.batch_size  # BatchNorm in ASPP needs batches of 2+
    steps_per_epoch = len(train_set) // options.batch_size if drop_last else 1
    scheduler = poly_schedule(optimizer, options.epochs * steps_per_epoch, options.poly_power)
    history: list[dict] = []
    start_epoch = 0
    checkpoint_path = folder / CHECKPOINT_FILE
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        if state.get("identity") == identity:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            history, start_epoch = state["history"], state["epoch"]

    val_loader = DataLoader(val_set, batch_size=options.batch_size, num_workers=options.num_workers)
    with progress_bar() as progress:
        task = progress.add_task(label, total=options.epochs * steps_per_epoch,
                                 completed=start_epoch * steps_per_epoch, info="")
        for epoch in range(start_epoch, options.epochs):
            # The data order depends only on (seed, epoch): a resumed run sees the same batches.
            order = torch.Generator().manual_seed(options.seed * 100_003 + epoch)
            if hasattr(train_set, "set_epoch"):
                train_set.set_epoch(epoch)  # fresh augmentations, reproducible per (seed, epoch)
            loader = DataLoader(train_set, batch_size=options.batch_size, shuffle=True, generator=order,
                                drop_last=drop_last, num_workers=options.num_workers,
                                pin_memory=device.type == "cuda")
            model.train()
            total, count = 0.0, 0
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                logits = model(batch["image"])
                loss = loss_fn(logits, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total, count = total + loss.item(), count + 1
                progress.update(task, advance=1, info=f"epoch {epoch + 1}/{options.epochs} loss {total / count:.3f}")
            miou = validate(model, val_loader, num_classes, ignore_index, device) if len(val_set) else float("nan")
            history.append({"epoch": epoch + 1, "loss": total / max(count, 1), "val_miou": miou})
            progress.update(task, info=f"epoch {epoch + 1}/{options.epochs} loss {total / max(count, 1):.3f} val mIoU {miou:.3f}")
            _save_checkpoint(checkpoint_path, {
                "identity": identity, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                "history": history, "epoch": epoch + 1,
            })
    return history
