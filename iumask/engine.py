"""The training engine every train command shares: device, seeds, optimizer and schedule, data
order, precision, checkpoints and the loop (:func:`fit`), which trains a group of members together
(one member for baseline and IU-weighted training, k for online training: the training stages'
one path, :func:`iumask.stages.train.train_group`; docs/method.md §4, §9).

* **Data order.** An epoch's order is a permutation drawn from a ``torch.Generator`` seeded by
  ``(seed, epoch)`` only (:class:`EpochBatchSampler`). A resumed epoch starts the sampler at the
  saved position, so the batches already done are never loaded again. Under torchrun global step
  ``s`` takes the permutation's slice ``[s·B·W, (s+1)·B·W)`` and rank ``r`` its ``r``-th block of
  ``B`` images (``--batch-size`` is per process; the effective batch is ``B·W``).
* **Checkpoints.** ``checkpoint.pt`` holds the models, optimizers, schedules and AMP scalers of all
  members trained together, the epoch and the position in it, every rank's RNG state (torch CPU
  and CUDA: dropout in DeepLabV3+'s ASPP draws from them; python/numpy RNGs are not used during
  training) and running loss sums, the history, and caller state (e.g. online timings). Written
  by rank 0 through a temporary file and ``os.replace`` every ``checkpoint_every`` steps and at the
  end of every epoch; read once, with ``torch.load(weights_only=True)``, by :meth:`Checkpoint.resume`
  before the models are built. A checkpoint is resumed only when its identity (all inputs of the
  result) and world size match; one of other inputs is refused, or replaced with ``--overwrite``.
* **Exactness.** No global RNG is consumed outside the training steps (data loaders get their own
  generator), so a run killed at any point and resumed ends bitwise equal to an uninterrupted run
  on CPU (deterministic algorithms are switched on for the duration of the loop on CPU). On GPUs
  the resume restores the same states, but some CUDA kernels (e.g. bilinear upsampling's
  backward) are not bitwise deterministic.
* **Epoch log.** Besides the history (loss, validation mIoU) :func:`fit` keeps one record per member
  and epoch (step, loss, learning rates, validation mIoU and per-class IoU, the ensemble's mIoU,
  seconds), saved in the checkpoint, and hands the records to an ``on_epoch`` callback on rank 0
  after every epoch and once at a resume, so a log written from them (``metrics.csv``) always
  matches the checkpointed state: rows written before a kill are rewritten, never duplicated.
* **Precision.** ``amp``: ``off``, ``bf16`` autocast (CUDA and CPU) or ``fp16`` autocast (CUDA,
  with a gradient scaler); fp16 on a CPU is switched off with a warning
  (:meth:`iumask.device.Precision.resolve`) and the manifest records ``off``.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from iumask import distributed
from iumask.artifacts import Reuse, reuse_decision
from iumask.config import TrainConfig
from iumask.core import mean_softmax, top_class
from iumask.core.metrics import ConfusionMatrix
from iumask.data.dataset import shape_batches
from iumask.device import Precision
from iumask.errors import IumaskError
from iumask.files import atomic_write
from iumask.models import predict_logits
from iumask.overlap import resolve_workers
from iumask.progress import console, progress_bar, warn
from iumask.transfer import class_id_dtype, host_tensor, to_device

CHECKPOINT_FORMAT = 2
# Rank r > 0 draws its dropout masks from seed + r · this (rank 0 keeps the single-process stream).
_RANK_SEED_STRIDE = 1_000_003


# ----------------------------------------------------------------------------- data order


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch: full global batches of ``batch_size · world_size`` images (the
    remainder is left out, as BatchNorm needs batches of 2+). A single process with fewer images
    than one batch trains on one short batch per epoch."""
    global_batch = batch_size * world_size
    if num_samples >= global_batch:
        return num_samples // global_batch
    if world_size == 1 and num_samples > 0:
        return 1
    raise IumaskError(f"the training split has {num_samples} images, fewer than one batch of {batch_size} per "
                      f"process × {world_size} processes; lower --batch-size or use fewer processes")


class EpochBatchSampler(Sampler[list[int]]):
    """The batches (lists of dataset indices) of one epoch for this rank, from step ``start`` on.

    The epoch's order depends only on ``(seed, epoch)``; skipping to ``start`` touches no data.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, start: int = 0):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.steps = steps_per_epoch(num_samples, batch_size, world_size)
        if not 0 <= start <= self.steps:
            raise ValueError(f"start {start} is outside 0..{self.steps}")
        self.start = start

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        global_batch = self.batch_size * self.world_size
        for step in range(self.start, self.steps):
            chunk = order[step * global_batch:(step + 1) * global_batch]
            if len(chunk) < global_batch:  # one process, fewer images than a batch
                yield chunk
            else:
                yield chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]


def _loader(dataset, device: torch.device, num_workers: int | str, **kwargs) -> DataLoader:
    # An own generator: the loader must not draw from the global RNG (dropout's), or a resumed
    # run would see other dropout masks than an uninterrupted one. Samples do not depend on the
    # worker that loads them (augmentation draws from (seed, epoch, index)).
    return DataLoader(dataset, num_workers=resolve_workers(num_workers, distributed.world_size()),
                      pin_memory=device.type == "cuda", generator=torch.Generator(), **kwargs)


# ----------------------------------------------------------------------------- seeds, optimizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, encoder: str, options: TrainConfig):
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


# ----------------------------------------------------------------------------- determinism


@contextlib.contextmanager
def _deterministic(device: torch.device):
    """Deterministic algorithms on CPU for the duration of training (restored afterwards)."""
    if device.type != "cpu":
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# ----------------------------------------------------------------------------- members


@dataclass
class TrainMember:
    """One model being trained: its optimizer, schedule and gradient scaler."""

    name: str
    model: torch.nn.Module  # trained in place; what is saved
    module: torch.nn.Module  # ``model`` wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return predict_logits(self.module, images)

    def step(self, loss: torch.Tensor) -> None:
        """Backward, optimizer step (through the scaler) and schedule step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])


def make_member(name: str, model: torch.nn.Module, encoder: str, options: TrainConfig, device: torch.device,
                total_steps: int, precision: Precision) -> TrainMember:
    """Move ``model`` to ``device``, give it Adam (lower encoder lr) and the poly schedule, and wrap
    it in DistributedDataParallel under torchrun."""
    model.to(device)
    optimizer = make_optimizer(model, encoder, options)
    scheduler = poly_schedule(optimizer, total_steps, options.poly_power)
    module = model
    if distributed.is_distributed():
        # DDP waits for a gradient of every trainable parameter; ones the output never depends on
        # never get one (and are never updated in a single process either): freeze them.
        for parameter in unused_parameters(model, device).values():
            parameter.requires_grad_(False)
        module = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return TrainMember(name, model, module, optimizer, scheduler, precision.scaler())


def unused_parameters(model: torch.nn.Module, device: torch.device) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters the output does not depend on (e.g. smp's EfficientNet encoders keep a
    head convolution they never run). Found with one eval-mode forward/backward on a blank image:
    no dropout (no RNG draw), no BatchNorm statistics update, gradients cleared afterwards."""
    training = model.training
    model.eval()
    try:
        predict_logits(model, torch.zeros(1, 3, 64, 64, device=device)).float().sum().backward()
        unused = {n: p for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    finally:
        model.zero_grad(set_to_none=True)
        model.train(training)
    return unused


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash or a full disk while writing leaves the previous checkpoint intact
    and no temporary file."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:  # our handle: closed even when the write fails
        torch.save(state, f)


@dataclass
class Checkpoint:
    """A training run's checkpoint: where it is written, the identity it records, and the state the
    run resumes from (None: a fresh start). Build it with :meth:`resume`, before the models."""

    path: Path
    identity: dict
    state: dict | None = None

    @classmethod
    def resume(cls, path: Path, identity: dict, overwrite: bool) -> "Checkpoint":
        """The checkpoint at ``path``, read once and decided on by the one reuse decision
        (:func:`~iumask.artifacts.reuse_decision`; the world size counts as an input): made from
        these inputs, it is resumed; none there, unreadable (a warning) or of an older format, the
        run starts fresh; made from other inputs, it is refused unless ``overwrite`` (then this
        run's first checkpoint replaces it), as the user may have changed an option by mistake and
        want to resume instead."""
        path = Path(path)
        if not path.is_file():
            return cls(path, identity)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or foreign file: start over rather than fail
            warn(f"{path} is unreadable ({exc.__class__.__name__}); starting over")
            return cls(path, identity)
        decision = reuse_decision(dict(state.get("identity") or {}, world_size=state.get("world_size")),
                                  dict(identity, world_size=distributed.world_size()), False, overwrite,
                                  f"the unfinished run in {path}",
                                  "rerun with the same options to resume it, or pass --overwrite to discard it")
        resumable = decision is Reuse.RESUME and state.get("format") == CHECKPOINT_FORMAT
        return cls(path, identity, state if resumable else None)


def _rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------- validation


@dataclass
class Validation:
    """Validation scores of models trained together: mIoU and per-class IoU (NaN for a class
    absent from labels and predictions) of each model and, for several, of their ensemble."""

    mious: list[float]
    ious: list[list[float]]
    ensemble_miou: float | None = None
    ensemble_ious: list[float] | None = None


@torch.no_grad()
def validate_members(models: list[torch.nn.Module], val_set, options: TrainConfig, num_classes: int,
                     ignore_index: int, device: torch.device, precision: Precision) -> Validation:
    """Validation mIoU and per-class IoU of each model and (for several) of their ensemble (mean
    softmax). Under torchrun each rank predicts its share of the images and the confusion matrices
    are reduced (summed)."""
    if not len(val_set):
        nan, several = float("nan"), len(models) > 1
        return Validation([nan] * len(models), [[nan] * num_classes for _ in models],
                          nan if several else None, [nan] * num_classes if several else None)
    for model in models:
        model.eval()
    metrics = [ConfusionMatrix(num_classes, ignore_index) for _ in range(len(models) + (len(models) > 1))]
    mine = distributed.shard(list(range(len(val_set))))  # this rank's images
    # Batches of one shape (images of several sizes without --size are batched by size).
    batches = shape_batches(mine, val_set.sample_shape, options.batch_size)
    for batch in _loader(val_set, device, options.num_workers, batch_sampler=batches):
        images = to_device(batch["image"], device)
        with precision.autocast():
            logits = [predict_logits(model, images) for model in models]
        ids = class_id_dtype(num_classes)
        for m, member_logits in zip(metrics, logits):
            m.update(host_tensor(top_class(member_logits), ids), batch["label"])
        if len(models) > 1:
            metrics[-1].update(host_tensor(top_class(mean_softmax(logits)), ids), batch["label"])
    for m in metrics:
        m.sync(distributed.all_reduce_sum, distributed.all_gather_object)
    scores = [m.compute() for m in metrics]
    mious = [s["miou"] for s in scores]
    ious = [[float(v) for v in s["iou"]] for s in scores]
    several = len(models) > 1
    return Validation(mious[:len(models)], ious[:len(models)], mious[-1] if several else None,
                      ious[-1] if several else None)


# ----------------------------------------------------------------------------- the loop


@dataclass
class FitResult:
    histories: list[list[dict]]  # per member: [{"epoch", "loss", "val_miou"}, ...]
    ensemble_history: list[dict] = field(default_factory=list)  # several members: [{"epoch", "val_miou"}]


@dataclass
class LoopState:
    """Where a training loop is, which with the members' states is its checkpoint: the epoch and the
    step in it, the histories and epoch records, the seconds spent in the current epoch up to the
    checkpoint, the caller's state (``extra``, updated in place) and this rank's running loss sums
    of the epoch (each rank's, gathered into the checkpoint's ``ranks`` with its RNG states)."""

    histories: list[list[dict]]  # per member: [{"epoch", "loss", "val_miou"}, ...]
    records: list[list[dict]]  # per member: the epoch records (see EpochCallback)
    extra: dict
    ensemble_history: list[dict] = field(default_factory=list)
    epoch: int = 0
    step: int = 0
    seconds: float = 0.0
    loss_sums: list[float] = field(default_factory=list)
    loss_count: int = 0

    @classmethod
    def fresh(cls, members: int, extra: dict) -> "LoopState":
        return cls([[] for _ in range(members)], [[] for _ in range(members)], extra, loss_sums=[0.0] * members)

    @classmethod
    def restored(cls, saved: dict, rank: int, extra: dict) -> "LoopState":
        """The state a checkpoint (``saved``, as :meth:`Checkpoint.resume` read it) holds for ``rank``;
        ``extra`` is updated with the caller's state saved in it."""
        extra.update(saved["extra"])
        own, members = saved["ranks"][rank], len(saved["members"])
        # A checkpoint of an earlier iumask has no epoch records: its log restarts at the resume.
        return cls(saved["histories"], saved.get("records", [[] for _ in range(members)]), extra,
                   saved["ensemble_history"], saved["epoch"], saved["step"], saved.get("seconds", 0.0),
                   list(own["loss_sums"]), own["loss_count"])

    def new_epoch(self, epoch: int) -> None:
        self.epoch, self.step = epoch, 0
        self.loss_sums, self.loss_count, self.seconds = [0.0] * len(self.histories), 0, 0.0

    def add_losses(self, losses: list[float]) -> None:
        self.loss_sums = [s + v for s, v in zip(self.loss_sums, losses)]
        self.loss_count += 1

    def rank_state(self, device: torch.device) -> dict:
        """This rank's part of the checkpoint: its RNG states and running loss sums."""
        return {"rng": _rng_state(device), "loss_sums": list(self.loss_sums), "loss_count": self.loss_count}

    def checkpoint(self, checkpoint: "Checkpoint", world: int, members: list[TrainMember], ranks: list[dict],
                   elapsed: float) -> dict:
        """The checkpoint's content (format :data:`CHECKPOINT_FORMAT`); ``elapsed``: seconds since
        :attr:`seconds` was last brought up to date."""
        return {"format": CHECKPOINT_FORMAT, "identity": checkpoint.identity, "world_size": world,
                "epoch": self.epoch, "step": self.step, "members": [m.state_dict() for m in members],
                "histories": self.histories, "ensemble_history": self.ensemble_history, "extra": self.extra,
                "ranks": ranks, "records": self.records, "seconds": self.seconds + elapsed}


StepFn = Callable[[dict], list[float]]
# ``on_epoch(records, models)``: per member the epoch records so far ({"epoch", "step", "loss", "lr",
# "val_miou", "val_iou", "ensemble_val_miou", "seconds"}), and the members' models after an epoch
# (the callback may put them in eval mode; fit puts them back in train mode) or None at a resume
# (nothing new: just rewrite what is logged from the records). Called on rank 0 only.
EpochCallback = Callable[[list[list[dict]], list[torch.nn.Module]], None]


def fit(members: list[TrainMember], train_step: StepFn, train_set, val_set, options: TrainConfig,
        checkpoint: Checkpoint, num_classes: int, ignore_index: int, device: torch.device,
        label: str, precision: Precision, extra: dict | None = None,
        on_epoch: EpochCallback | None = None) -> FitResult:
    """Train ``members`` together for ``options.epochs``; ``train_step(batch)`` does one optimizer
    step of every member on a batch (already on ``device``) and returns their losses.

    ``extra`` is caller state (a dict of plain values, updated in place by ``train_step``) that is
    saved in and restored from the checkpoint. Resumes from ``checkpoint.state`` when there is
    one (:meth:`Checkpoint.resume`) and checkpoints to ``checkpoint.path``. ``on_epoch`` receives the epoch records (see
    :data:`EpochCallback`) after every epoch, before its checkpoint, and once at a resume.
    """
    world, rank = distributed.world_size(), distributed.rank()
    steps = steps_per_epoch(len(train_set), options.batch_size, world)
    k = len(members)
    extra = {} if extra is None else extra
    if checkpoint.state is not None:
        for member, member_state in zip(members, checkpoint.state["members"]):
            member.load_state_dict(member_state)
        loop = LoopState.restored(checkpoint.state, rank, extra)
        _set_rng_state(checkpoint.state["ranks"][rank]["rng"], device)
        if loop.epoch < options.epochs:
            console.print(f"{label}: resuming at epoch {loop.epoch + 1}, step {loop.step}/{steps}")
    else:
        loop = LoopState.fresh(k, extra)
        seed_everything(options.seed)
        if rank:
            torch.manual_seed(options.seed + _RANK_SEED_STRIDE * rank)  # own dropout masks per rank
    distributed.barrier()  # every rank has read the checkpoint before rank 0 may replace it
    if checkpoint.state is not None and on_epoch is not None and distributed.is_main():
        on_epoch(loop.records, None)  # rewrite the log from the checkpoint: drops rows logged after it
    clock = time.perf_counter()

    def save() -> None:
        ranks = distributed.all_gather_object(loop.rank_state(device))
        if distributed.is_main():
            save_checkpoint(checkpoint.path, loop.checkpoint(checkpoint, world, members, ranks,
                                                             time.perf_counter() - clock))

    every = max(0, options.checkpoint_every)
    with _deterministic(device), progress_bar(lines=False) as progress:  # a log gets a line per epoch
        task = progress.add_task(label, total=options.epochs * steps, completed=loop.epoch * steps + loop.step,
                                 info="")
        for epoch in range(loop.epoch, options.epochs):
            first = loop.step if epoch == loop.epoch else 0
            if first == 0:
                loop.new_epoch(epoch)
                clock = time.perf_counter()
            if hasattr(train_set, "set_epoch"):
                train_set.set_epoch(epoch)  # augmentations reproducible per (seed, epoch, index)
            sampler = EpochBatchSampler(len(train_set), options.batch_size, options.seed, epoch, rank, world, first)
            for member in members:
                member.module.train()
            for step, batch in enumerate(_loader(train_set, device, options.num_workers, batch_sampler=sampler),
                                         start=first + 1):
                loop.add_losses(train_step(to_device(batch, device)))
                loop.epoch, loop.step = epoch, step
                progress.update(task, advance=1, info=f"epoch {epoch + 1}/{options.epochs} "
                                f"loss {sum(loop.loss_sums) / k / loop.loss_count:.3f}")
                if every and (epoch * steps + step) % every == 0 and step < steps:
                    save()
            totals = distributed.all_reduce_sum(torch.tensor([*loop.loss_sums, loop.loss_count], dtype=torch.float64))
            epoch_losses = (totals[:k] / totals[k].clamp_min(1)).tolist()
            scores = validate_members([m.model for m in members], val_set, options, num_classes, ignore_index,
                                      device, precision)
            mious, ensemble_miou = scores.mious, scores.ensemble_miou
            elapsed = loop.seconds + time.perf_counter() - clock
            for history, record, member, loss, miou, ious in zip(loop.histories, loop.records, members, epoch_losses,
                                                                 mious, scores.ious):
                history.append({"epoch": epoch + 1, "loss": loss, "val_miou": miou})
                record.append({"epoch": epoch + 1, "step": (epoch + 1) * steps, "loss": loss,
                               "lr": [float(g["lr"]) for g in member.optimizer.param_groups], "val_miou": miou,
                               "val_iou": ious, "ensemble_val_miou": ensemble_miou, "seconds": elapsed})
            shown = f"val mIoU {mious[0]:.3f}" if k == 1 else f"ensemble val mIoU {ensemble_miou:.3f}"
            if k > 1:
                loop.ensemble_history.append({"epoch": epoch + 1, "val_miou": ensemble_miou})
            summary = f"epoch {epoch + 1}/{options.epochs} loss {sum(epoch_losses) / k:.3f} {shown}"
            progress.update(task, info=summary)
            if not console.is_terminal:  # a log file (nohup, a cluster job) gets a line per epoch
                console.print(f"{label}: {summary} ({elapsed:.0f} s)", highlight=False, soft_wrap=True)
            if on_epoch is not None and distributed.is_main():
                on_epoch(loop.records, [m.model for m in members])
                for member in members:
                    member.module.train()
            loop.epoch, loop.step, loop.seconds, clock = epoch + 1, 0, 0.0, time.perf_counter()
            save()
    return FitResult(loop.histories, loop.ensemble_history)
