"""The training stages: baseline (plain CE), weighted (IU masks from a store) and online (members
trained jointly, masks computed every step). All three share the data preparation, the member
folders and the engine's loop; only the loss and where the masks come from differ.

* ``train_baseline``: one member per encoder, cross-entropy (docs/method.md §9) or a peer loss (§10).
* ``train_weighted``: the same with CE·(1 + IU)^γ, each image's IU mask read from the store.
* ``train_online`` (docs/method.md §5 item 2; paper section 4): every step, every member runs on
  the same batch in train mode; p̄ is the mean of their *detached* softmax; its entropy is averaged
  over the instances of the ensemble's prediction (or the label); each member's loss is
  CE·(1 + IU)^γ with those masks. One ``checkpoint.pt`` holds all members; the time spent in the
  members' passes and in the masks is recorded (``timing``).

Each writes one folder per member and an ``ensemble.json``; a member whose manifest records the
same inputs (and whose weights match their SHA-256) is a cache hit. While training, every member
folder gets ``metrics.csv`` and ``curves.png`` after each epoch (:class:`EpochLog`), and with
``tensorboard`` TensorBoard events in ``<member>/tensorboard/``; with a tracker
(:mod:`iumask.tracking`) each member's run gets the same rows, and its files once it is saved.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from iumask import distributed
from iumask.artifacts import CHECKPOINT_FILE, MANIFEST_FILE, Reuse, member_reuse, write_ensemble
from iumask.config import (
    FORMAT_VERSION,
    MAKE_MASKS_ADVICE,
    AugmentConfig,
    DataConfig,
    LossConfig,
    MaskConfig,
    ModelConfig,
    TrainConfig,
    UncertaintyKind,
    artifact_identity,
)
from iumask.core import class_weights, mean_softmax
from iumask.data.dataset import SegmentationDataset
from iumask.data.folder import IMAGENET_MEAN, IMAGENET_STD, ClassInfo, PairedDataset
from iumask.dataset_stats import cached_label_statistics
from iumask.device import Precision, resolve_amp, resolve_device
from iumask.engine import (
    Checkpoint,
    fit,
    make_member,
    seed_everything,
    steps_per_epoch,
)
from iumask.errors import IumaskError
from iumask.figures import training_curves_png
from iumask.files import folder_writer_lock, json_digest, read_json
from iumask.inference import InstanceUncertainty, pixel_maps
from iumask.losses import LossFn, build_loss, ohem_note
from iumask.models import build_model, encoder_weights_identity, predict_logits, save_member
from iumask.overlap import BackgroundPool, background_threads
from iumask.progress import console, print_cache_hit, warn
from iumask.store import MaskStore, StoreMaskReader
from iumask.tracking import NO_RUN, NO_TRACKER, WEIGHTS_TAG, RunLog, Tracker
from iumask.training_log import (
    CURVES_FILE,
    METRICS_FILE,
    TENSORBOARD_DIR,
    TensorBoardLog,
    epoch_rows,
    read_metrics_csv,
    require_tensorboard,
    write_metrics_csv,
)
from iumask.transfer import to_device, to_host

ONLINE_STAGE = "online"


# ----------------------------------------------------------------------------- shared preparation


SIZE_FIX = "pass --size HxW to train at one size (or --crop HxW with augmentation)"
# Offline weighted training runs at the store's size, which is the baseline's training size.
STORE_SIZE_FIX = ("the mask store was made at each image's own size (a baseline trained without --size): pass "
                  "--crop HxW (with augmentation), or retrain the baseline with --size HxW and rerun make-masks")


class TrainingInputs:
    """What every train stage prepares before its first expensive step: the datasets (every file
    header read), the class weights, the augmentation and the identity parts they contribute."""

    def __init__(self, data: DataConfig, train: TrainConfig, loss: LossConfig, augment: AugmentConfig,
                 masks: Path | None = None, valid_mask: bool = False, size_fix: str = SIZE_FIX,
                 connectivity: int = 8):
        train_folder = data.open(data.train_split)
        val_folder = data.open(data.val_split)
        self.classes = train_folder.classes
        # Every file's header now, not a corrupt file after the first epoch.
        shapes = train_folder.check_headers()
        val_folder.check_headers()
        # The validation split is first read after an epoch: check it now (under a second for
        # CamVid), so a truncated file or a label outside the classes is found before any training.
        val_folder.check_pixels()
        if data.size is None and not (augment.enabled and augment.crop):
            require_one_shape(train_folder, shapes, size_fix)
        sample = augment.crop if augment.enabled and augment.crop else data.size or shapes[0]
        note = ohem_note(loss, sample)
        if note is not None and distributed.is_main():
            warn(note)
        self.fingerprint = train_folder.fingerprint()
        weights = class_weight_values(train_folder, loss, self.fingerprint)
        self.loss = {**loss.identity(), "class_weight_values": None if weights is None else weights.tolist()}
        transform = augment.transform(self.classes.ignore_index)
        self.augmentation = None if transform is None else transform.describe()
        mask_fn = StoreMaskReader(masks) if masks is not None else None
        self.connectivity = connectivity  # of the IU images shown in TensorBoard
        self.train_set = SegmentationDataset(train_folder, data.size, masks=mask_fn, transform=transform,
                                             seed=train.seed, valid_mask=valid_mask)
        self.val_set = SegmentationDataset(val_folder, data.size)

    def loss_fn(self, config: LossConfig, iu_weighted: bool) -> LossFn:
        return build_loss(config, self.loss["class_weight_values"], self.classes.ignore_index, iu_weighted)

    def manifest_extras(self, data: DataConfig) -> dict:
        """What every member manifest records beside its identity."""
        return {"normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                "image_size": list(data.size) if data.size else None, "train_data": data.source(data.train_split)}

    def ensemble_manifest(self, stage: str, names: list[str], data: DataConfig, **extra) -> dict:
        return {"format_version": FORMAT_VERSION, "stage": stage, "members": names,
                "classes": self.classes.to_dict(), "image_size": list(data.size) if data.size else None,
                "train_data": data.source(data.train_split), **extra}


def require_one_shape(folder: PairedDataset, shapes: list[tuple[int, int]], fix: str = SIZE_FIX) -> None:
    """Training batches stack samples, so without --size (or a crop) the images must share one size."""
    first = shapes[0] if shapes else None
    for i, shape in enumerate(shapes):
        if shape != first:
            raise IumaskError(
                f"{folder.root}: the {folder.split} images differ in size ({folder.ids[0]} is {first[1]}x{first[0]}, "
                f"{folder.ids[i]} is {shape[1]}x{shape[0]}, WxH); {fix}")


def class_weight_values(folder: PairedDataset, loss: LossConfig, fingerprint: str) -> np.ndarray | None:
    """Class weights from the training labels' counts (computed once per dataset, cached)."""
    if loss.class_weights == "none":
        return None
    stats = cached_label_statistics(folder, fingerprint=fingerprint)["per_class"]
    # Eigen & Fergus: all pixels of the images that contain c (as in CamVid's published weights).
    return class_weights(stats["pixels"], loss.class_weights, stats["total_pixels_in_images_containing"],
                         loss.effective_number_beta, warn=warn)


def _start(model: ModelConfig, train: TrainConfig, device: str,
           tensorboard: bool = False) -> tuple[torch.device, TrainConfig]:
    """Join the process group (torchrun) and settle the precision; with ``tensorboard`` check
    first that the package is installed."""
    if tensorboard:
        require_tensorboard()
    dev = distributed.init(resolve_device(device))
    return dev, resolve_amp(train, dev)


def _weights_identity(model: ModelConfig) -> dict:
    """What the manifests of jointly trained members record of their initialisation: the value
    (and a local file's SHA-256), per encoder when each has its own."""
    if not isinstance(model.encoder_weights, tuple):
        return {"encoder_weights": model.encoder_weights, **encoder_weights_identity(model.encoder_weights)}
    table = {e: model.weights_for(e) for e in model.encoders}
    return {"encoder_weights": table,
            "encoder_weights_sha256": {e: encoder_weights_identity(w).get("encoder_weights_sha256")
                                       for e, w in table.items()}}


# ----------------------------------------------------------------------------- baseline and weighted


def _train_members(stage: str, iu_weighted: bool, data: DataConfig, model: ModelConfig, train: TrainConfig,
                   loss: LossConfig, augment: AugmentConfig, out: Path, device: str, overwrite: bool,
                   masks: Path | None = None, extra_identity: dict | None = None, tensorboard: bool = False,
                   connectivity: int = 8, tracker: Tracker = NO_TRACKER) -> Path:
    """Train one member per encoder into ``out/<name>/`` and write ``out/ensemble.json``
    (``connectivity``: of the IU in TensorBoard's images, the mask store's for weighted training)."""
    dev, train = _start(model, train, device, tensorboard)
    inputs = TrainingInputs(data, train, loss, augment, masks, size_fix=SIZE_FIX if masks is None else STORE_SIZE_FIX,
                            connectivity=connectivity)
    with out_lock(out):
        return _train_locked_members(stage, iu_weighted, inputs, data, model, train, loss, out, dev, overwrite,
                                     extra_identity, tensorboard, tracker)


def out_lock(out: Path):
    """The writer lock of a train command's ``--out`` (rank 0 takes it for its whole torchrun job)."""
    return folder_writer_lock(out, f"model folder {out}", "use another --out", enabled=distributed.is_main())


def _train_locked_members(stage: str, iu_weighted: bool, inputs: TrainingInputs, data: DataConfig, model: ModelConfig,
                          train: TrainConfig, loss: LossConfig, out: Path, dev: torch.device, overwrite: bool,
                          extra_identity: dict | None, tensorboard: bool, tracker: Tracker) -> Path:
    classes = inputs.classes
    names = model.names
    for index, (name, encoder) in enumerate(zip(names, model.encoders)):
        # One group of one member: its own seed (initial weights and data order), its own checkpoint.
        member_train = replace(train, seed=train.seed + index)
        identity = artifact_identity(
            stage, architecture=model.architecture, encoder=encoder, encoder_weights=model.weights_for(encoder),
            classes=classes.to_dict(), dataset_fingerprint=inputs.fingerprint, data=data, train_options=member_train,
            loss=inputs.loss, augmentation=inputs.augmentation, world_size=distributed.world_size(),
            **encoder_weights_identity(model.weights_for(encoder)), **(extra_identity or {}))
        group = MemberGroup(
            names=[name], encoders=[encoder], folders=[out / name], identities=[identity],
            checkpoint=out / name / CHECKPOINT_FILE, checkpoint_identity=identity, train=member_train,
            init_seeds=[member_train.seed], titles=[f"{stage} {name}"],
            tags=[member_tags(stage, name, encoder, member_train.seed)], label=f"{stage} {name}",
            connectivity=inputs.connectivity)
        if not train_group(group, inputs, model, inputs.loss_fn(loss, iu_weighted), data, dev, overwrite, tensorboard,
                           tracker):
            print_cache_hit(out / name)
        distributed.barrier()
    if distributed.is_main():
        write_ensemble(out, inputs.ensemble_manifest(stage, names, data))
    distributed.barrier()
    return out / "ensemble.json"


def train_baseline(data: DataConfig, model: ModelConfig, train: TrainConfig, loss: LossConfig,
                   augment: AugmentConfig, out: Path, device: str = "auto", overwrite: bool = False,
                   tensorboard: bool = False, tracker: Tracker = NO_TRACKER) -> Path:
    """Stage 1: an ensemble trained without IU masks: cross-entropy (the paper's baseline) or the
    peer method ``loss.loss``, optionally class-weighted (``loss.exponent`` is not used). Returns
    its ensemble.json. ``tracker``: where each member's run is mirrored (:mod:`iumask.tracking`)."""
    return _train_members("baseline", False, data, model, train, loss.plain(), augment, Path(out),
                          device, overwrite, tensorboard=tensorboard, tracker=tracker)


def train_weighted(data: DataConfig, model: ModelConfig, train: TrainConfig, loss: LossConfig,
                   augment: AugmentConfig, store_path: Path, out: Path, device: str = "auto",
                   overwrite: bool = False, tensorboard: bool = False, tracker: Tracker = NO_TRACKER) -> Path:
    """Stage 3: models trained with the IU-weighted loss, each image's mask read from the store
    (checked to belong to this dataset and to be complete; training runs at the store's size)."""
    loss.check_iu_weighting()
    if tensorboard:
        require_tensorboard()
    store, size = checked_mask_store(data, store_path)
    return _train_members("weighted", True, data.with_size(size), model, train, loss, augment, Path(out),
                          device, overwrite, masks=Path(store_path),
                          extra_identity={"mask_store_sha256": json_digest(store.identity)}, tensorboard=tensorboard,
                          connectivity=store.identity["options"].get("connectivity", 8), tracker=tracker)


def checked_mask_store(data: DataConfig, store_path: Path) -> tuple[MaskStore, tuple[int, int] | None]:
    """The finished mask store of ``data``'s training split, opened for reading, and the image size
    it was made at (None: each image's own): train-weighted's check before any training."""
    store = MaskStore.open(store_path, advice=MAKE_MASKS_ADVICE)
    train_folder = data.open(data.train_split)
    identity = store.identity
    size = identity["options"].get("image_size")
    size = tuple(size) if size else None
    if data.size is not None and size != tuple(data.size):
        raise IumaskError(f"{store_path}: masks were made at size {size} (the baseline's training size), not "
                          f"{tuple(data.size)}; omit --size (offline training runs at the store's size), or "
                          "retrain the baseline with that --size and rerun make-masks")
    shapes = [list(size or shape) for shape in train_folder.check_headers()]
    store.check_identity(
        {"image_ids": train_folder.ids, "image_shapes": shapes, "class_names": list(train_folder.classes.names),
         "dataset_fingerprint": train_folder.fingerprint()},
        fix="the store was made from other data: run iumask make-masks on this dataset",
    )
    if not store.attrs.get("finished") or not store.completed().all():
        raise IumaskError(f"{store_path}: the mask store is incomplete; finish it with iumask make-masks")
    return store, size


# ----------------------------------------------------------------------------- online


def train_online(data: DataConfig, model: ModelConfig, train: TrainConfig, loss: LossConfig,
                 augment: AugmentConfig, masks: MaskConfig, out: Path, device: str = "auto",
                 overwrite: bool = False, tensorboard: bool = False, tracker: Tracker = NO_TRACKER) -> Path:
    """Train the members jointly with online IU masks into ``out/<name>/``; return ``out/ensemble.json``.

    Member ``k`` is initialised from seed ``train.seed + k``; all members see the same batches
    (data order and augmentation from ``train.seed``).
    """
    loss.check_iu_weighting()
    if masks.source != UncertaintyKind.ENSEMBLE.value:
        raise IumaskError("--source: online training uses its members as the ensemble; --source mc-dropout "
                          "applies to make-masks")
    out = Path(out)
    dev, train = _start(model, train, device, tensorboard)
    inputs = TrainingInputs(data, train, loss, augment, valid_mask=True)
    classes = inputs.classes
    names = model.names
    identity = artifact_identity(
        ONLINE_STAGE, architecture=model.architecture, members=names, encoders=list(model.encoders),
        classes=classes.to_dict(), dataset_fingerprint=inputs.fingerprint,
        data=data, train_options=train, loss=inputs.loss, augmentation=inputs.augmentation, online_masks=masks,
        world_size=distributed.world_size(), **_weights_identity(model))
    with out_lock(out):
        return _train_online_locked(identity, inputs, data, model, train, loss, masks, out, dev, overwrite,
                                    tensorboard, tracker)


def _train_online_locked(identity: dict, inputs: TrainingInputs, data: DataConfig, model: ModelConfig,
                         train: TrainConfig, loss: LossConfig, masks: MaskConfig, out: Path, dev: torch.device,
                         overwrite: bool, tensorboard: bool, tracker: Tracker) -> Path:
    names = model.names
    # One group of k members: the same batches (data order from train.seed), member k initialised
    # from seed + k, one checkpoint in out/, masks from the group's prediction every step.
    group = MemberGroup(
        names=names, encoders=list(model.encoders), folders=[out / name for name in names],
        identities=[dict(identity, name=name, encoder=encoder) for name, encoder in zip(names, model.encoders)],
        checkpoint=out / CHECKPOINT_FILE, checkpoint_identity=identity, train=train,
        init_seeds=[train.seed + k for k in range(len(names))], titles=[f"online {name}" for name in names],
        tags=[member_tags(ONLINE_STAGE, name, encoder, train.seed + k)
              for k, (name, encoder) in enumerate(zip(names, model.encoders))],
        label=f"online ×{len(names)}", connectivity=masks.connectivity, online_masks=masks)
    ensemble_path = out / "ensemble.json"
    trained = train_group(group, inputs, model, inputs.loss_fn(loss, iu_weighted=True), data, dev, overwrite,
                          tensorboard, tracker)
    distributed.barrier()  # every rank looks for ensemble.json before rank 0 may write it below
    if not trained and ensemble_path.is_file():
        print_cache_hit(out)
        return ensemble_path
    if distributed.is_main():
        # The members' manifests record the online masks' timing: written just now, or by a run
        # killed before it wrote the ensemble (every member then a cache hit).
        timing = read_json(out / names[0] / MANIFEST_FILE, "model manifest").get("timing")
        if trained:
            print_timing(timing, len(names))
        write_ensemble(out, inputs.ensemble_manifest(ONLINE_STAGE, names, data, timing=timing))
        group.checkpoint.unlink(missing_ok=True)
    distributed.barrier()
    return ensemble_path


# ----------------------------------------------------------------------------- one training path


@dataclass(frozen=True)
class MemberGroup:
    """Members trained together in one loop, with one checkpoint: the baseline and IU-weighted
    stages train k groups of one member (each from its own seed: initial weights and data order),
    online training one group of k (the same batches; member k initialised from seed + k; masks
    computed from the group's prediction every step, ``online_masks``)."""

    names: list[str]
    encoders: list[str]
    folders: list[Path]
    identities: list[dict]  # each member's: what its manifest records and its cache hit compares
    checkpoint: Path  # the group's checkpoint.pt
    checkpoint_identity: dict
    train: TrainConfig  # the loop's options (its seed: the data order)
    init_seeds: list[int]  # each member's initial weights
    titles: list[str]  # of each member's curves and tracked run
    tags: list[dict]  # of each member's tracked run
    label: str  # of the progress bar
    connectivity: int = 8  # of the IU in TensorBoard's images
    online_masks: MaskConfig | None = None


def train_group(group: MemberGroup, inputs: TrainingInputs, model: ModelConfig, loss_fn: LossFn, data: DataConfig,
                dev: torch.device, overwrite: bool, tensorboard: bool, tracker: Tracker) -> bool:
    """The one training path: train ``group``'s members together (resuming its checkpoint) and save
    each into its folder (its manifest records the history, and an online group's timing); False
    when every member is a cache hit (each decided by :func:`~iumask.artifacts.member_reuse`), with
    their tracked runs completed from their files."""
    classes = inputs.classes
    reuse = [member_reuse(folder, ident, overwrite, warn) for folder, ident in zip(group.folders, group.identities)]
    tracked = list(zip(group.folders, group.identities, group.titles, group.tags))
    if all(decision is Reuse.HIT for decision in reuse):
        for member in tracked:
            track_cached_member(tracker, *member)
        return False
    checkpoint = Checkpoint.resume(group.checkpoint, group.checkpoint_identity, overwrite)
    nets = []
    for seed, encoder in zip(group.init_seeds, group.encoders):
        seed_everything(seed)  # the initial weights depend on the seed only
        nets.append(build_model(encoder, classes.num_classes, model.weights_for(encoder), model.architecture))
    precision = Precision.resolve(group.train.amp, dev)
    total_steps = group.train.epochs * steps_per_epoch(len(inputs.train_set), group.train.batch_size,
                                                       distributed.world_size())
    members = [make_member(name, net, encoder, group.train, dev, total_steps, precision)
               for name, net, encoder in zip(group.names, nets, group.encoders)]
    step = GroupStep(members, precision, loss_fn, classes, dev, group.online_masks)
    created = not group.checkpoint.parent.exists()
    group.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as open_runs:
        runs = [open_runs.enter_context(tracker.member(*member)) for member in tracked]
        log = EpochLog(group.folders, group.titles, classes, inputs.val_set, dev, tensorboard, group.connectivity,
                       runs)
        try:
            result = fit(members, step, inputs.train_set, inputs.val_set, group.train, checkpoint,
                         classes.num_classes, classes.ignore_index, dev, group.label, precision, extra=step.timing,
                         on_epoch=log)
        except BaseException:
            if created:  # a failure before anything was written there leaves no empty folder
                with contextlib.suppress(OSError):
                    group.checkpoint.parent.rmdir()
            raise
        finally:
            log.close()
            step.close()
        timing = summarize_timing(step.timing) if group.online_masks is not None else None
        if distributed.is_main():  # under torchrun rank 0 writes, the others wait
            for k, (member, folder, ident, history, run) in enumerate(
                    zip(members, group.folders, group.identities, result.histories, runs)):
                manifest = dict(ident, name=member.name, complete=True, history=history)
                if group.online_masks is not None:  # online members, however many, as always recorded
                    manifest.update(ensemble_history=result.ensemble_history, init_seed=group.init_seeds[k],
                                    timing=timing)
                save_member(folder, member.model.cpu(), dict(manifest, **inputs.manifest_extras(data)))
                track_saved_member(run, folder)
            if group.online_masks is None:  # an online group keeps its checkpoint until the ensemble is written
                group.checkpoint.unlink(missing_ok=True)
    return True


# ----------------------------------------------------------------------------- training log


def member_tags(stage: str, name: str, encoder: str, seed: int) -> dict:
    """The tags of a member's tracked run, by which MLflow's views group and line runs up."""
    return {"stage": stage, "member": name, "encoder": encoder, "seed": seed}


def track_saved_member(run: RunLog, folder: Path) -> None:
    """A saved member's tracked run: the epochs of its metrics.csv the run lacks (none, when it was
    logged while training), its files, and its weights' digest, by which its evaluation finds it."""
    if run is NO_RUN:
        return
    run.log_epochs(read_metrics_csv(folder / METRICS_FILE))
    run.set_tags({WEIGHTS_TAG: read_json(folder / MANIFEST_FILE, "model manifest").get("weights_sha256")})
    run.log_files([folder / MANIFEST_FILE, folder / METRICS_FILE, folder / CURVES_FILE])


def track_cached_member(tracker: Tracker, folder: Path, identity: dict, title: str, tags: dict) -> None:
    """A cache hit: nothing is logged when its run is finished; a member trained untracked (or
    whose tracker failed before the end) gets its run completed from its files."""
    with tracker.member(folder, identity, title, tags, cached=True) as run:
        track_saved_member(run, folder)


class EpochLog:
    """The engine's ``on_epoch`` callback (rank 0): rewrites ``metrics.csv`` and ``curves.png`` in
    every member folder from the checkpointed epoch records (so a resumed run ends with the rows of
    an uninterrupted one), hands the rows to each member's tracked run (``runs``: it logs the
    epochs it lacks), and with ``tensorboard`` logs the new epoch's scalars and a few validation
    images (prediction, entropy, IU of each member's own softmax) per member."""

    IMAGES = 3

    def __init__(self, folders: list[Path], titles: list[str], classes: ClassInfo, val_set, device: torch.device,
                 tensorboard: bool = False, connectivity: int = 8, runs: list[RunLog] | None = None):
        self.folders, self.titles, self.classes = folders, titles, classes
        self.runs = runs if runs is not None else [NO_RUN] * len(folders)
        self.iu_of = InstanceUncertainty(classes.num_classes, classes.ignore_index, connectivity)
        self.val_set, self.device = val_set, device
        self.boards = [TensorBoardLog(f / TENSORBOARD_DIR, classes.names, classes.palette()) for f in folders] \
            if tensorboard else None

    def __call__(self, records: list[list[dict]], models: list[torch.nn.Module] | None) -> None:
        for folder, title, rows, run in zip(self.folders, self.titles, records, self.runs):
            write_metrics_csv(folder / METRICS_FILE, rows, list(self.classes.names))
            if rows:
                training_curves_png(folder / CURVES_FILE, rows, title)
            run.log_epochs(epoch_rows(rows, list(self.classes.names)))
        if self.boards is None or models is None:  # models None: a resume, nothing new to log
            return
        for board, model, rows in zip(self.boards, models, records):
            board.log(rows[-1], validation_maps(model, self.val_set, self.IMAGES, self.iu_of, self.device))

    def close(self) -> None:
        for board in self.boards or []:
            board.close()


@torch.no_grad()
def validation_maps(model: torch.nn.Module, val_set, count: int, iu_of: InstanceUncertainty,
                    device: torch.device) -> list[dict]:
    """A few validation images (evenly spread) with ``model``'s prediction, pixel entropy and IU
    (instances of the prediction, at the run's connectivity), as numpy arrays for display. Eval
    mode: no RNG is drawn."""
    model.eval()
    n = len(val_set)
    picks = sorted(set(np.linspace(0, n - 1, min(count, n)).round().astype(int).tolist())) if n else []
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    maps = []
    for i in picks:
        image = val_set[i]["image"]
        pixel = pixel_maps(torch.softmax(predict_logits(model, to_device(image[None], device)).float(), 1))
        iu = iu_of.batch(pixel)
        rgb = ((image * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        maps.append({"image": rgb, "prediction": to_host(pixel.prediction[0]), "entropy": to_host(pixel.entropy[0]),
                     "iu": to_host(iu[0])})
    return maps


def online_masks(logits: list[torch.Tensor], label: torch.Tensor, masks: MaskConfig, num_classes: int,
                 ignore_index: int, valid: torch.Tensor | None = None, map_fn=map) -> torch.Tensor:
    """IU masks of a batch from its members' logits: entropy of their detached mean softmax,
    averaged per instance (of the prediction or the label).

    ``valid`` (bool, B×H×W) is False on augmentation padding: those pixels are outside the image,
    so they join no instance (else their entropy would leak into real instances touching the
    padding); they carry no loss either (ignore label). ``map_fn`` spreads the images over threads."""
    with torch.no_grad():
        maps = pixel_maps(mean_softmax([x.detach() for x in logits]), masks.normalize)
        iu_of = InstanceUncertainty(num_classes, ignore_index, masks.connectivity, masks.instances_from)
        return iu_of.batch(maps, label, valid, map_fn)


class GroupStep:
    """One optimizer step of every member of a group on a batch: each member's loss with the
    batch's IU masks (read from the store with the batch, or none), or with ``online_masks`` the
    masks computed from the group's prediction (the time spent in the members' passes and in the
    masks is then counted in ``timing``, which the checkpoint keeps)."""

    def __init__(self, members, precision: Precision, loss_fn: LossFn, classes: ClassInfo, device: torch.device,
                 online_masks: MaskConfig | None = None):
        self.members, self.precision, self.loss_fn, self.masks = members, precision, loss_fn, online_masks
        self.num_classes, self.ignore_index, self.device = classes.num_classes, classes.ignore_index, device
        # The batch's images get their instances in parallel (the result does not depend on it).
        self.pool = BackgroundPool(background_threads()) if online_masks is not None else None
        # Cumulative over the run (saved in the checkpoint, so a resumed run keeps counting).
        self.timing = {"forward_backward_s": 0.0, "masks_s": 0.0, "steps": 0} if online_masks is not None else {}

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # GPU work is asynchronous: time it where it ends
        return time.perf_counter()

    def __call__(self, batch: dict) -> list[float]:
        if self.masks is None:
            return self._step(batch, batch.get("iu"))
        start = self._now()
        with self.precision.autocast():
            logits = [member.forward(batch["image"]) for member in self.members]
        forward_done = self._now()
        iu = online_masks(logits, batch["label"], self.masks, self.num_classes, self.ignore_index, batch.get("valid"),
                          self.pool.map)
        masks_done = self._now()
        losses = self._losses(logits, batch, iu)
        end = self._now()
        self.timing["forward_backward_s"] += (forward_done - start) + (end - masks_done)
        self.timing["masks_s"] += masks_done - forward_done
        self.timing["steps"] += 1
        return losses

    def _step(self, batch: dict, iu: torch.Tensor | None) -> list[float]:
        with self.precision.autocast():
            logits = [member.forward(batch["image"]) for member in self.members]
        return self._losses(logits, batch, iu)

    def _losses(self, logits: list[torch.Tensor], batch: dict, iu: torch.Tensor | None) -> list[float]:
        losses = []
        for member, member_logits in zip(self.members, logits):
            loss = self.loss_fn(member_logits.float(), batch["label"], iu)
            member.step(loss)
            losses.append(loss.item())
        return losses

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


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
