"""One training loop for every train command: only the loss differs (docs/method.md §4, §9).

Adam with a lower backbone learning rate, a poly schedule, per-epoch validation mIoU, and
checkpoints (written atomically) every ``checkpoint_every`` steps and after every epoch, so an
interrupted run resumes exactly where it stopped. The loop itself, shared with the online
ensemble training, is :func:`iumask.engine.fit`.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from iumask.errors import IumaskError

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class TrainOptions:
    """Optimisation settings; defaults are the authors' (docs/method.md §9) except where noted."""

    epochs: int = 60
    batch_size: int = 2
    lr: float | None = None  # None: 1e-3 for MobileNet encoders, 1e-4 otherwise (authors)
    backbone_lr_factor: float = 0.1
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    seed: int = 0
    num_workers: int = 0
    amp: str = "off"  # off, bf16 or fp16 autocast (CUDA only; see iumask.engine.resolve_amp)
    # Steps between mid-epoch checkpoints (0: only at epoch ends). Not part of the result's
    # identity: resuming is exact wherever the checkpoint was taken.
    checkpoint_every: int = 500

    def lr_for(self, encoder: str) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if "mobilenet" in encoder else 1e-4

    def to_dict(self) -> dict:
        """The options the trained weights depend on (recorded in manifests, compared for cache hits)."""
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME_OPTIONS}


# TrainOptions fields that do not change the result.
RUNTIME_OPTIONS = ("checkpoint_every",)


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; checked before any work starts."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise IumaskError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise IumaskError(f"--device {device!r}: iumask runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise IumaskError(f"--device {device!r}: no CUDA GPU is available here; use --device cpu (or auto)")
        if resolved.index is not None and resolved.index >= count:
            raise IumaskError(f"--device {device!r}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    return resolved


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
    same identity is resumed (exactly, mid-epoch too), one with another identity is replaced.
    """
    from iumask import distributed
    from iumask.engine import Precision, fit, make_member, steps_per_epoch

    folder.mkdir(parents=True, exist_ok=True)
    precision = Precision(options.amp, device)
    total_steps = options.epochs * steps_per_epoch(len(train_set), options.batch_size, distributed.world_size())
    member = make_member(label, model, encoder, options, device, total_steps, precision)

    def train_step(batch: dict) -> list[float]:
        with precision.autocast():
            logits = member.forward(batch["image"])
        loss = loss_fn(logits.float(), batch)
        member.step(loss)
        return [loss.item()]

    result = fit([member], train_step, train_set, val_set, options, folder / CHECKPOINT_FILE, identity,
                 num_classes, ignore_index, device, label, precision)
    return result.histories[0]
