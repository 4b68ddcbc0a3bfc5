"""Online IU training (docs/method.md §5 item 2; paper section 4): the members are trained jointly and
the masks are computed on the fly, so no baseline ensemble and no mask store are needed.

Every step, every member runs forward on the same (augmented) batch in train mode; p̄ is the mean of
the members' *detached* softmax; its pixel entropy is averaged over the instances of the ensemble's
argmax prediction (default, as in the authors' code) or of the label; each member's loss is
``CE · (1 + IU)^γ`` with those batch masks, and each member has its own optimizer and schedule.

The loop is :func:`iumask.engine.fit` (the one every train command uses: same data order, exact
resume, torchrun, AMP); one ``checkpoint.pt`` in the output folder holds all members. The result
is one folder per member (manifest stage ``online``) and an ``ensemble.json`` that ``evaluate``
and ``make-masks`` accept. The time spent in the members' forward/backward passes and in the mask
computation is measured and recorded (``timing`` in the manifests).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from iumask import distributed
from iumask.artifacts import check_writable, read_json, write_json_atomic
from iumask.core import instance_uncertainty_batch, mean_softmax, pixel_entropy, uncertainty_weighted_cross_entropy
from iumask.data.folder import IMAGENET_MEAN, IMAGENET_STD
from iumask.engine import Precision, fit, make_member, resolve_amp, steps_per_epoch
from iumask.models import ARCHITECTURE, ENSEMBLE_FILE, build_model, save_member
from iumask.pipeline import (
    FORMAT_VERSION,
    DataOptions,
    _json_normal,
    _member_names,
    _prepare_member_folder,
    _training_sets,
    check_mask_options,
    check_train_inputs,
)
from iumask.progress import console
from iumask.training import CHECKPOINT_FILE, TrainOptions, resolve_device, seed_everything

STAGE = "online"


def train_online(data: DataOptions, out: Path, encoders: list[str], options: TrainOptions, exponent: float = 2.0,
                 instances_from: str = "prediction", connectivity: int = 8, normalize: bool = False,
                 device: str = "auto", encoder_weights: str | None = None, overwrite: bool = False,
                 class_weighting: str = "none", augment: dict | None = None) -> Path:
    """Train the members jointly with online IU masks into ``out/<name>/``; return ``out/ensemble.json``.

    Member ``k`` is initialised from seed ``options.seed + k``; all members see the same batches
    (data order and augmentation from ``options.seed``).
    """
    check_mask_options(instances_from, connectivity)
    dev = distributed.init(resolve_device(device))
    options = resolve_amp(options, dev)
    weights_identity = check_train_inputs(encoders, encoder_weights)
    train_set, val_set, fingerprint, loss, augment = _training_sets(
        data, options.seed, {"exponent": float(exponent), "class_weights": class_weighting}, None, augment,
        valid_mask=True)
    classes = train_set.folder.classes
    names = _member_names(encoders)
    identity = _json_normal({
        "format_version": FORMAT_VERSION, "stage": STAGE, "architecture": ARCHITECTURE,
        "members": names, "encoders": list(encoders), "encoder_weights": encoder_weights,
        "classes": classes.to_dict(), "dataset_fingerprint": fingerprint, "data": data.to_dict(),
        "train_options": options.to_dict(), "loss": loss, "augmentation": augment,
        "online_masks": {"instances_from": instances_from, "connectivity": connectivity, "normalize": normalize},
        "world_size": distributed.world_size(), **weights_identity,
    })
    check_writable(out)
    checkpoint_path = out / CHECKPOINT_FILE
    member_identities = [dict(identity, name=name, encoder=encoder) for name, encoder in zip(names, encoders)]
    todo = [_prepare_member_folder(out / name, ident, overwrite) for name, ident in zip(names, member_identities)]
    ensemble_path = out / ENSEMBLE_FILE
    if not any(todo) and ensemble_path.is_file():
        console.print(f"[green]cache hit[/green]: {out} holds online members trained with these inputs")
        return ensemble_path

    if any(todo):
        models = []
        for k, encoder in enumerate(encoders):
            seed_everything(options.seed + k)  # member k's initialisation
            models.append(build_model(encoder, classes.num_classes, encoder_weights))
        precision = Precision(options.amp, dev)
        total_steps = options.epochs * steps_per_epoch(len(train_set), options.batch_size, distributed.world_size())
        members = [make_member(name, model, encoder, options, dev, total_steps, precision)
                   for name, model, encoder in zip(names, models, encoders)]
        weights = loss["class_weight_values"]
        step = OnlineStep(members, precision, classes.num_classes, classes.ignore_index, exponent, instances_from,
                          connectivity, normalize, None if weights is None else torch.tensor(weights), dev)
        result = fit(members, step, train_set, val_set, options, checkpoint_path, identity, classes.num_classes,
                     classes.ignore_index, dev, f"online ×{len(members)}", precision, extra=step.timing)
        timing = summarize_timing(step.timing)
        if distributed.is_main():
            for member, ident, history in zip(members, member_identities, result.histories):
                manifest = dict(ident, complete=True, history=history, ensemble_history=result.ensemble_history,
                                init_seed=options.seed + names.index(member.name), timing=timing,
                                normalization={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                                image_size=list(data.size) if data.size else None,
                                train_data=data.source(data.train_split))
                save_member(out / member.name, member.model.cpu(), manifest)
        print_timing(timing, len(members))
    else:
        timing = read_json(out / names[0] / "manifest.json", "model manifest").get("timing")
    if distributed.is_main():
        write_json_atomic(ensemble_path, {
            "format_version": FORMAT_VERSION, "stage": STAGE, "members": names, "classes": classes.to_dict(),
            "image_size": list(data.size) if data.size else None, "train_data": data.source(data.train_split),
            "timing": timing,
        })
        checkpoint_path.unlink(missing_ok=True)
    distributed.barrier()
    return ensemble_path


class OnlineStep:
    """One optimizer step of every member with masks from the batch's ensemble prediction."""

    def __init__(self, members, precision: Precision, num_classes: int, ignore_index: int, exponent: float,
                 instances_from: str, connectivity: int, normalize: bool, class_weights: torch.Tensor | None,
                 device: torch.device):
        self.members, self.precision = members, precision
        self.num_classes, self.ignore_index, self.exponent = num_classes, ignore_index, exponent
        self.instances_from, self.connectivity, self.normalize = instances_from, connectivity, normalize
        self.class_weights = class_weights
        self.device = device
        # Cumulative over the run (saved in the checkpoint, so a resumed run keeps counting).
        self.timing = {"forward_backward_s": 0.0, "masks_s": 0.0, "steps": 0}

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # GPU work is asynchronous: time it where it ends
        return time.perf_counter()

    def masks(self, logits: list[torch.Tensor], label: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """IU masks of the batch: entropy of the members' detached mean softmax, averaged per instance.

        ``valid`` (bool, B×H×W) is False on augmentation padding: those pixels are outside the image,
        so they join no instance (else their entropy would leak into real instances touching the
        padding); they carry no loss either (ignore label)."""
        with torch.no_grad():
            probs = mean_softmax([x.detach() for x in logits])
            entropy = pixel_entropy(probs, normalize=self.normalize)
            source = probs.argmax(1) if self.instances_from == "prediction" else label
            if valid is not None:
                source = source.masked_fill(~valid, self.ignore_index)
            return instance_uncertainty_batch(source, entropy, self.num_classes, self.connectivity, self.ignore_index)

    def __call__(self, batch: dict) -> list[float]:
        start = self._now()
        with self.precision.autocast():
            logits = [member.forward(batch["image"]) for member in self.members]
        forward_done = self._now()
        iu = self.masks(logits, batch["label"], batch.get("valid"))
        masks_done = self._now()
        losses = []
        for member, member_logits in zip(self.members, logits):
            loss = uncertainty_weighted_cross_entropy(member_logits.float(), batch["label"], iu, self.exponent,
                                                      self.ignore_index, self.class_weights)
            member.step(loss)
            losses.append(loss.item())
        end = self._now()
        self.timing["forward_backward_s"] += (forward_done - start) + (end - masks_done)
        self.timing["masks_s"] += masks_done - forward_done
        self.timing["steps"] += 1
        return losses


def summarize_timing(timing: dict) -> dict:
    steps = max(int(timing["steps"]), 1)
    total = timing["forward_backward_s"] + timing["masks_s"]
    return {"forward_backward_s": round(timing["forward_backward_s"], 4), "masks_s": round(timing["masks_s"], 4),
            "steps": int(timing["steps"]),
            "forward_backward_s_per_step": round(timing["forward_backward_s"] / steps, 5),
            "masks_s_per_step": round(timing["masks_s"] / steps, 5),
            "masks_fraction": round(timing["masks_s"] / total, 4) if total else None}


def print_timing(timing: dict, num_members: int) -> None:
    if not timing["steps"]:
        return
    console.print(
        f"online step time over {timing['steps']} steps (rank 0): forward+backward of {num_members} members "
        f"{timing['forward_backward_s']:.2f} s ({1000 * timing['forward_backward_s_per_step']:.1f} ms/step), "
        f"masks (entropy + instance uncertainty) {timing['masks_s']:.2f} s "
        f"({1000 * timing['masks_s_per_step']:.1f} ms/step, {100 * timing['masks_fraction']:.1f} %)",
        highlight=False)
