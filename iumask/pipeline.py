"""The four stages (train-baseline, make-masks, train-weighted, evaluate) and ``run``.

Each stage writes an artifact that records the inputs it was made from. Running a stage again
with the same inputs is a cache hit (nothing recomputed); an interrupted stage resumes; an
artifact made from other inputs is never silently replaced: the stage stops and says to pass
``--overwrite`` or choose another output path.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from iumask import distributed
from iumask.artifacts import atomic_write, check_writable, json_digest, read_json, write_json_atomic
from iumask.core import (
    CLASS_WEIGHTINGS,
    SegmentationMetrics,
    class_weights,
    instance_uncertainty,
    pixel_entropy,
    uncertainty_weighted_cross_entropy,
)
from iumask.data.augment import JointAugment
from iumask.data.folder import IMAGENET_MEAN, IMAGENET_STD, PairedDataset, SegmentationDataset
from iumask.data.formats import open_dataset
from iumask.engine import resolve_amp
from iumask.errors import IumaskError
from iumask.models import (
    ARCHITECTURE,
    ENSEMBLE_FILE,
    INFERENCE_MODES,
    MANIFEST_FILE,
    build_model,
    check_encoder,
    checked_manifest,
    encoder_weights_identity,
    ensemble_probs,
    load_member,
    resolve_models,
    save_member,
    weights_problem,
)
from iumask.progress import console, progress_bar
from iumask.statistics import cached_label_statistics
from iumask.store import MaskStore
from iumask.training import CHECKPOINT_FILE, TrainOptions, resolve_device, seed_everything, train_model

FORMAT_VERSION = 1


@dataclass(frozen=True)
class DataOptions:
    root: Path
    train_split: str = "train"
    val_split: str = "val"
    size: tuple[int, int] | None = None  # (H, W); None keeps each image's own size
    format: str = "auto"  # folder, cityscapes, acdc, camvid (see iumask.data.formats)
    conditions: tuple[str, ...] | None = None  # ACDC conditions

    def open(self, split: str) -> PairedDataset:
        return open_dataset(self.root, split, self.format, self.conditions)

    def source(self, split: str) -> dict:
        """What a manifest records to reopen a split later (e.g. for the PAvPU threshold)."""
        return {"root": str(Path(self.root).resolve()), "split": split, "format": self.format,
                "conditions": list(self.conditions) if self.conditions else None}

    def to_dict(self) -> dict:
        return {"root": str(Path(self.root).resolve()), "train_split": self.train_split,
                "val_split": self.val_split, "size": list(self.size) if self.size else None,
                "format": self.format, "conditions": list(self.conditions) if self.conditions else None}


INSTANCE_SOURCES = ("prediction", "label")
CONNECTIVITIES = (4, 8)


def check_mask_options(instances_from: str, connectivity: int) -> None:
    """The IU mask options (make-masks, online training, run), checked before any work."""
    if instances_from not in INSTANCE_SOURCES:
        raise IumaskError(f"--instances-from must be one of {', '.join(INSTANCE_SOURCES)}, got {instances_from!r}")
    if connectivity not in CONNECTIVITIES:
        raise IumaskError(f"--connectivity must be 4 or 8 (pixel neighbourhood of instances), got {connectivity}")


def _json_normal(value: Any) -> Any:
    """Tuples → lists etc., so identities compare equal after a JSON round trip."""
    return json.loads(json.dumps(value))


def _mismatch_keys(stored: dict, given: dict) -> list[str]:
    return sorted(k for k in set(stored) | set(given) if stored.get(k) != given.get(k))


class _StoreMasks:
    """Picklable ``masks(index)`` for :class:`SegmentationDataset` (DataLoader workers)."""

    def __init__(self, path: Path):
        self.path = path
        self._store: MaskStore | None = None

    def __call__(self, index: int) -> np.ndarray:
        if self._store is None:
            self._store = MaskStore.open(self.path)
        return self._store.read_iu(index)

    def __getstate__(self):
        return {"path": self.path, "_store": None}


# ----------------------------------------------------------------------------- training stages


def _member_names(encoders: list[str]) -> list[str]:
    names, seen = [], {}
    for encoder in encoders:
        seen[encoder] = seen.get(encoder, 0) + 1
        names.append(encoder if seen[encoder] == 1 else f"{encoder}-{seen[encoder]}")
    return names


def _training_sets(data: DataOptions, seed: int, loss: dict, masks: Path | None, augment: dict | None,
                   valid_mask: bool = False):
    """The training and validation sets of a train command (offline and online), the ``loss``
    with its class-weight values, and the augmentation's description. ``valid_mask``: training
    samples carry ``valid`` (False on augmentation padding)."""
    train_folder = data.open(data.train_split)
    val_folder = data.open(data.val_split)
    classes = train_folder.classes
    # Every file's header now, not a corrupt file after the first epoch.
    train_shapes = train_folder.check_headers()
    val_folder.check_headers()
    if data.size is None and not (augment and augment.get("crop")):
        _require_one_shape(train_folder, train_shapes)
    fingerprint = train_folder.fingerprint()
    weights = _class_weight_values(train_folder, loss["class_weights"], fingerprint)
    loss = dict(loss, class_weight_values=None if weights is None else weights.tolist())
    transform = None
    if augment is not None:
        transform = JointAugment.from_options(augment, ignore_index=classes.ignore_index)
        augment = transform.describe()
    mask_fn = _StoreMasks(masks) if masks is not None else None
    train_set = SegmentationDataset(train_folder, data.size, masks=mask_fn, transform=transform, seed=seed,
                                    valid_mask=valid_mask)
    val_set = SegmentationDataset(val_folder, data.size)
    return train_set, val_set, fingerprint, loss, augment


def _require_one_shape(folder: PairedDataset, shapes: list[tuple[int, int]]) -> None:
    """Training batches stack samples, so without --size (or a crop) the images must share one size."""
    first = shapes[0] if shapes else None
    for i, shape in enumerate(shapes):
        if shape != first:
            raise IumaskError(
                f"{folder.root}: the {folder.split} images differ in size ({folder.ids[0]} is {first[1]}x{first[0]}, "
                f"{folder.ids[i]} is {shape[1]}x{shape[0]}, WxH); pass --size HxW to train at one size "
                "(or --crop HxW with augmentation)")


def check_train_inputs(encoders: list[str], encoder_weights: str | None) -> dict:
    """Encoder names and the encoder-weights file, checked before anything is trained or removed;
    returns what the identity records of the weights file."""
    if not encoders:
        raise IumaskError("give at least one --encoder")
    for encoder in encoders:
        check_encoder(encoder)
    return encoder_weights_identity(encoder_weights)


def _train_members(
    kind: str,
    data: DataOptions,
    out: Path,
    encoders: list[str],
    options: TrainOptions,
    device: str,
    encoder_weights: str | None,
    overwrite: bool,
    loss: dict,
    masks: Path | None,
    extra_identity: dict,
    augment: dict | None = None,
) -> Path:
    """Train one member per encoder into ``out/<name>/`` and write ``out/ensemble.json``.

    ``loss`` holds the exponent γ and the class weighting (none, inverse, median); ``augment``
    the :class:`JointAugment` options (None: no augmentation)."""
    dev = distributed.init(resolve_device(device))  # joins the process group under torchrun
    options = resolve_amp(options, dev)
    weights_identity = check_train_inputs(encoders, encoder_weights)
    train_set, val_set, fingerprint, loss, augment = _training_sets(data, options.seed, loss, masks, augment)
    classes = train_set.folder.classes
    weights = loss["class_weight_values"]
    check_writable(out)
    names = _member_names(encoders)
    for index, (name, encoder) in enumerate(zip(names, encoders)):
        folder = out / name
        identity = _json_normal({
            "format_version": FORMAT_VERSION, "stage": kind, "architecture": ARCHITECTURE,
            "encoder": encoder, "encoder_weights": encoder_weights, "classes": classes.to_dict(),
            "dataset_fingerprint": fingerprint, "data": data.to_dict(),
            "train_options": dict(options.to_dict(), seed=options.seed + index), "loss": loss,
            "augmentation": augment, "world_size": distributed.world_size(), **weights_identity,
            **extra_identity,
        })
        if not _prepare_member_folder(folder, identity, overwrite):
            console.print(f"[green]cache hit[/green]: {folder} is trained with these inputs")
            continue
        member_options = replace(options, seed=options.seed + index)
        seed_everything(member_options.seed)  # the initial weights depend on the seed only
        model = build_model(encoder, classes.num_classes, encoder_weights)
        class_weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        exponent = loss["exponent"]

        def loss_fn(logits, batch, exponent=exponent, class_weights=class_weights):
            return uncertainty_weighted_cross_entropy(
                logits, batch["label"], batch.get("iu"), exponent=exponent,
                ignore_index=classes.ignore_index, class_weights=class_weights)

        history = train_model(model, encoder, train_set, val_set, loss_fn, member_options, folder, identity,
                              classes.num_classes, classes.ignore_index, dev, label=f"{kind} {name}")
        manifest = dict(identity, name=name, complete=True, history=history,
                        normalization={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                        image_size=list(data.size) if data.size else None,
                        train_data=data.source(data.train_split))
        if distributed.is_main():  # under torchrun rank 0 writes, the others wait
            save_member(folder, model.cpu(), manifest)
            (folder / CHECKPOINT_FILE).unlink(missing_ok=True)
        distributed.barrier()
    ensemble = {"format_version": FORMAT_VERSION, "stage": kind, "members": names,
                "classes": classes.to_dict(), "image_size": list(data.size) if data.size else None,
                "train_data": data.source(data.train_split)}
    old = out / ENSEMBLE_FILE
    if old.is_file():
        # The PAvPU threshold computed for these very members (same weights) stays valid.
        previous = read_json(old, "ensemble manifest")
        cached = {k: previous[k] for k in THRESHOLD_KEYS if k in previous}
        if len(cached) == len(THRESHOLD_KEYS) and cached[THRESHOLD_KEYS[1]] == _weights_key(out, names):
            ensemble.update(cached)
    if distributed.is_main():
        write_json_atomic(out / ENSEMBLE_FILE, ensemble)
    distributed.barrier()
    return out / ENSEMBLE_FILE


def _class_weight_values(folder: PairedDataset, method: str, fingerprint: str) -> np.ndarray | None:
    """Class weights from the training labels' counts (computed once per dataset, cached)."""
    if method == "none":
        return None
    if method not in CLASS_WEIGHTINGS:
        raise IumaskError(f"--class-weights must be one of {', '.join(CLASS_WEIGHTINGS)}, got {method!r}")
    stats = cached_label_statistics(folder, fingerprint=fingerprint)["per_class"]
    # Eigen & Fergus: all pixels of the images that contain c (as in CamVid's published weights).
    return class_weights(stats["pixels"], method, stats["total_pixels_in_images_containing"])


def _prepare_member_folder(folder: Path, identity: dict, overwrite: bool) -> bool:
    """True when the member must be (re)trained; False on a cache hit.

    Nothing is removed here: with ``overwrite`` the old member stays in place (and usable) until
    :func:`save_member` replaces it with the finished new one; a checkpoint of other inputs is
    never resumed (its identity differs) and is replaced by the new run's first checkpoint."""
    manifest_path = folder / MANIFEST_FILE
    if manifest_path.is_file():
        manifest = read_json(manifest_path, "model manifest")
        stored = {k: manifest.get(k) for k in identity}
        if stored == identity and manifest.get("complete"):
            problem = weights_problem(folder, manifest)
            if problem is None:
                return False
            # Same inputs, unusable weights: nothing worth keeping, so retrain without --overwrite.
            console.print(f"[yellow]warning[/yellow]: {folder}: {problem}; training this member again",
                          highlight=False)
            return True
        if not overwrite:
            differ = ", ".join(_mismatch_keys(stored, identity))
            raise IumaskError(
                f"{folder}: holds a model trained with other inputs ({differ}); pass --overwrite to "
                "replace it or choose another --out"
            )
    return True


def train_baseline(data: DataOptions, out: Path, encoders: list[str], options: TrainOptions,
                   device: str = "auto", encoder_weights: str | None = None, overwrite: bool = False,
                   class_weighting: str = "none", augment: dict | None = None) -> Path:
    """Stage 1: an ensemble trained with plain (optionally class-weighted) cross-entropy.
    Returns its ensemble.json."""
    return _train_members("baseline", data, out, encoders, options, device, encoder_weights, overwrite,
                          loss={"exponent": 0.0, "class_weights": class_weighting}, masks=None,
                          extra_identity={}, augment=augment)


def train_weighted(data: DataOptions, store_path: Path, out: Path, encoders: list[str], options: TrainOptions,
                   exponent: float = 2.0, device: str = "auto", encoder_weights: str | None = None,
                   overwrite: bool = False, class_weighting: str = "none", augment: dict | None = None) -> Path:
    """Stage 3: models trained with the IU-weighted loss, reading masks from the store."""
    store = MaskStore.open(store_path)
    train_folder = data.open(data.train_split)
    size = store.identity["options"].get("image_size")
    size = tuple(size) if size else None
    if data.size is not None and size != tuple(data.size):
        raise IumaskError(f"{store_path}: masks were made at size {size}, not {tuple(data.size)}; "
                          "train at the store's size or rebuild the store with that --size")
    shapes = [list(train_folder.image_shape(i)) if size is None else list(size) for i in range(len(train_folder))]
    store.check_identity(
        {"image_ids": train_folder.ids, "image_shapes": shapes, "class_names": list(train_folder.classes.names),
         "dataset_fingerprint": train_folder.fingerprint()},
        fix="the store was made from other data: run iumask make-masks on this dataset",
    )
    if not store.attrs.get("finished") or not store.completed().all():
        raise IumaskError(f"{store_path}: the mask store is incomplete; finish it with iumask make-masks")
    data = DataOptions(data.root, data.train_split, data.val_split, size, data.format, data.conditions)
    return _train_members("weighted", data, out, encoders, options, device, encoder_weights, overwrite,
                          loss={"exponent": float(exponent), "class_weights": class_weighting},
                          masks=Path(store_path), extra_identity={"mask_store_sha256": json_digest(store.identity)},
                          augment=augment)


# ----------------------------------------------------------------------------- masks


def check_models(model_path: Path, folder: PairedDataset | None = None) -> list[dict]:
    """The manifests of a model or ensemble, checked without loading it: finished, weights
    present and matching their SHA-256, one class list (that of ``folder`` when given), one size."""
    manifests = [checked_manifest(member) for member in resolve_models(model_path)]
    if len({tuple(m["classes"]["names"]) for m in manifests}) > 1:
        raise IumaskError(f"{model_path}: members were trained on different classes; build the ensemble from "
                          "models of one dataset")
    if folder is not None:
        _check_classes(manifests, folder, model_path)
    _model_size(manifests, model_path)
    return manifests


def _load_ensemble(model_path: Path, device) -> tuple[list[torch.nn.Module], list[dict]]:
    loaded = [load_member(folder, device) for folder in resolve_models(model_path)]
    models, manifests = [m for m, _ in loaded], [m for _, m in loaded]
    names = {tuple(m["classes"]["names"]) for m in manifests}
    if len(names) > 1:
        raise IumaskError(f"{model_path}: members were trained on different classes; build the ensemble from "
                          "models of one dataset")
    return models, manifests


def _model_size(manifests: list[dict], path: Path) -> tuple[int, int] | None:
    sizes = {tuple(m["image_size"]) if m.get("image_size") else None for m in manifests}
    if len(sizes) > 1:
        raise IumaskError(f"{path}: members were trained at different sizes {sorted(map(str, sizes))}; "
                          "use members of one size")
    return sizes.pop()


def _check_classes(manifests: list[dict], folder: PairedDataset, model_path: Path) -> None:
    model_names = list(manifests[0]["classes"]["names"])
    if model_names != list(folder.classes.names):
        raise IumaskError(
            f"{folder.root}: the dataset's classes {list(folder.classes.names)[:4]}... differ from those of "
            f"{model_path} ({model_names[:4]}...); evaluate on a dataset with the same class names and order"
        )


def make_masks(model_path: Path, data_root: Path, store_path: Path, split: str = "train",
               instances_from: str = "prediction", connectivity: int = 8, normalize: bool = False,
               batch_size: int = 4, device: str = "auto", overwrite: bool = False, format: str = "auto",
               conditions: tuple[str, ...] | None = None) -> MaskStore:
    """Stage 2: entropy, IU mask and prediction of every training image into a zarr store."""
    check_mask_options(instances_from, connectivity)
    if batch_size < 1:
        raise IumaskError(f"--batch-size must be at least 1, got {batch_size}")
    dev = distributed.init(resolve_device(device))  # joins the process group under torchrun
    folder = open_dataset(data_root, split, format, conditions)
    check_models(model_path, folder)  # members usable and of these classes, before the store is touched
    folder.check_headers()
    models, manifests = _load_ensemble(model_path, dev)
    size = _model_size(manifests, model_path)
    dataset = SegmentationDataset(folder, size)
    shapes = [list(dataset.sample_shape(i)) for i in range(len(folder))]
    identity = {
        "image_ids": folder.ids, "image_shapes": shapes, "class_names": list(folder.classes.names),
        "options": {"connectivity": connectivity, "instances_from": instances_from, "normalize": normalize,
                    "image_size": list(size) if size else None, "split": split,
                    "ignore_index": folder.classes.ignore_index},
        "member_sha256": {m["name"]: m["weights_sha256"] for m in manifests},
        "dataset_fingerprint": folder.fingerprint(),
    }
    # Under torchrun rank 0 takes the store's writer lock and opens, creates or stages it (an
    # --overwrite replacement is built beside the old store); the other ranks open what it opened.
    writer = MaskStore.open_or_create(store_path, identity, overwrite=overwrite) if distributed.is_main() else None
    try:
        path = distributed.all_gather_object(writer.path if writer else None)[0]  # rank 0's
        store = writer or MaskStore.open(path, mode="r+")
        todo = [i for i, done in enumerate(store.completed()) if not done]
        distributed.barrier()  # every rank has read the completion flags before any rank writes
        if not todo:
            console.print(f"[green]cache hit[/green]: {store_path} holds every mask for these inputs")
        num_classes, ignore = folder.classes.num_classes, folder.classes.ignore_index
        # Same-shape batches only (images without --size may differ in size): batch size 1 then.
        # Each rank takes every world_size-th batch of the images to do; each image owns its chunks.
        step = batch_size if size else 1
        batches = distributed.shard([todo[i:i + step] for i in range(0, len(todo), step)])
        loader = DataLoader(dataset, batch_sampler=batches, pin_memory=dev.type == "cuda")
        with progress_bar() as progress:
            task = progress.add_task("make-masks", total=len(folder), completed=len(folder) - len(todo), info="")
            for batch in loader:
                probs = ensemble_probs(models, batch["image"].to(dev))
                entropy = pixel_entropy(probs, normalize=normalize).cpu().numpy()
                prediction = probs.argmax(1).cpu().numpy()  # int64: the store checks the range
                labels = batch["label"].numpy()
                for k, index in enumerate(batch["index"].tolist()):
                    # In the store's dtype (uint8 up to 256 classes: instance_uncertainty's fast path)
                    source = (prediction[k].astype(store.prediction_dtype) if instances_from == "prediction"
                              else labels[k])
                    iu = instance_uncertainty(source, entropy[k], num_classes, connectivity, ignore)
                    store.write(index, entropy[k], iu, prediction[k])
                    progress.update(task, advance=distributed.world_size())  # rank 0 shows an estimate
        distributed.barrier()  # every rank's images are written
        if writer:
            if not writer.attrs.get("finished"):
                if not writer.completed().all():
                    raise IumaskError(f"{store_path}: {int((~writer.completed()).sum())} images were not written; "
                                      "rerun iumask make-masks to finish the store")
                writer.set_attrs(mean_entropy=_store_mean_entropy(writer), num_complete=writer.num_images,
                                 finished=True, ensemble=str(Path(model_path).resolve()))
            writer.commit()  # a finished --overwrite replacement takes the old store's place
    finally:
        if writer:
            writer.close()
    distributed.barrier()  # rank 0 has set the final attributes and swapped the store in
    return MaskStore.open(store_path)  # fresh attributes on every rank


def _store_mean_entropy(store: MaskStore) -> float:
    total, pixels = 0.0, 0
    for i in range(store.num_images):
        entropy = store.read(i)["entropy"]
        total, pixels = total + float(entropy.sum(dtype=np.float64)), pixels + entropy.size
    return total / max(pixels, 1)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def _predict_split(models, dataset: SegmentationDataset, dev, label: str, metrics: SegmentationMetrics | None,
                   model_size: tuple[int, int] | None = None, inference: str = "resize"):
    """Run models over a dataset; feed ``metrics``; return the mean pixel entropy."""
    total, pixels = 0.0, 0
    loader = DataLoader(dataset, batch_size=4 if dataset.uniform_shape() else 1)
    with progress_bar() as progress:
        task = progress.add_task(label, total=len(dataset), info="")
        for batch in loader:
            probs = ensemble_probs(models, batch["image"].to(dev), model_size, inference)
            entropy = pixel_entropy(probs).cpu()
            total, pixels = total + float(entropy.double().sum()), pixels + entropy.numel()
            if metrics is not None:
                metrics.update(probs.argmax(1).cpu(), batch["label"], entropy)
            progress.update(task, advance=len(batch["index"]))
    return total / max(pixels, 1)


# The cached PAvPU threshold and the members' weights it was computed with: retrained members
# (other weights) never inherit the old value.
THRESHOLD_KEYS = ("train_mean_entropy", "train_mean_entropy_weights_sha256")


def _weights_key(out: Path, names: list[str]) -> list[str | None]:
    return [read_json(out / name / MANIFEST_FILE, "model manifest").get("weights_sha256") for name in names]


def _train_mean_entropy(model_path: Path, models, manifests, size, dev) -> float:
    """The model's training-set mean pixel entropy (the default PAvPU threshold), cached in its
    manifest (member manifest.json or ensemble.json) with the weights it belongs to, once computed.
    A manifest that cannot be written (read-only folder) only loses the cache: a warning."""
    path = Path(model_path)
    record = path / ENSEMBLE_FILE if path.is_dir() and (path / ENSEMBLE_FILE).is_file() else (
        path if path.is_file() else path / MANIFEST_FILE)
    manifest = read_json(record, "model manifest")
    weights = [m["weights_sha256"] for m in manifests]
    if manifest.get(THRESHOLD_KEYS[0]) is not None and manifest.get(THRESHOLD_KEYS[1]) == weights:
        return float(manifest[THRESHOLD_KEYS[0]])
    train = manifest.get("train_data") or manifests[0].get("train_data")
    if not train or not Path(train["root"]).is_dir():
        raise IumaskError(f"{record}: the model's training data is not available to compute the PAvPU "
                          "threshold; pass --pavpu-threshold")
    dataset = SegmentationDataset(
        open_dataset(train["root"], train["split"], train.get("format", "auto"), train.get("conditions")), size)
    mean = _predict_split(models, dataset, dev, "train-set entropy", None)
    try:
        write_json_atomic(record, dict(manifest, **dict(zip(THRESHOLD_KEYS, (mean, weights)))))
    except IumaskError as exc:
        console.print(f"[yellow]warning[/yellow]: PAvPU threshold not cached ({exc})", highlight=False)
    return mean


RESOLUTIONS = ("native", "train")


def evaluate(model_paths: list[Path], data_root: Path, split: str = "val", pavpu_threshold: float | None = None,
             pavpu_window: int = 4, pavpu_stride: int | None = None, device: str = "auto",
             resolution: str = "native", inference: str = "resize", format: str = "auto",
             conditions: tuple[str, ...] | None = None) -> list[dict]:
    """Stage 4: per-class IoU, mIoU and PAvPU of each model (or ensemble) on a split.

    ``resolution="native"`` (default, for reporting) scores predictions at each label's own size
    (``inference`` says how a model trained at a reduced size gets there: ``resize`` the image
    and upsample the logits, or ``slide`` windows over the full-resolution image);
    ``"train"`` resizes images and labels (nearest) to the training size.
    """
    if resolution not in RESOLUTIONS:
        raise IumaskError(f"--resolution must be one of {', '.join(RESOLUTIONS)}, got {resolution!r}")
    if inference not in INFERENCE_MODES:
        raise IumaskError(f"--inference must be one of {', '.join(INFERENCE_MODES)}, got {inference!r}")
    if pavpu_window < 1 or (pavpu_stride is not None and pavpu_stride < 1):
        raise IumaskError("--pavpu-window and --pavpu-stride must be at least 1 pixel")
    if pavpu_threshold is not None and not (math.isfinite(pavpu_threshold) and pavpu_threshold >= 0):
        raise IumaskError(f"--pavpu-threshold must be a finite entropy >= 0, got {pavpu_threshold}")
    dev = resolve_device(device)
    folder = open_dataset(data_root, split, format, conditions)
    folder.check_headers()
    for model_path in model_paths:  # every model usable before the first is evaluated
        check_models(model_path, folder)
    results = []
    for model_path in model_paths:
        models, manifests = _load_ensemble(model_path, dev)
        _check_classes(manifests, folder, model_path)
        size = _model_size(manifests, model_path)
        threshold = pavpu_threshold
        if threshold is None:
            threshold = _train_mean_entropy(model_path, models, manifests, size, dev)
        metrics = SegmentationMetrics(folder.classes.num_classes, folder.classes.ignore_index,
                                      pavpu_window=pavpu_window, pavpu_threshold=threshold, pavpu_stride=pavpu_stride)
        name = _display_name(Path(model_path), manifests)
        eval_size = size if resolution == "train" else None
        _predict_split(models, SegmentationDataset(folder, eval_size), dev, f"evaluate {name}", metrics,
                       model_size=size, inference=inference)
        result = metrics.compute()
        results.append({"model": name, "path": str(Path(model_path).resolve()), "split": split,
                        "data": str(Path(data_root).resolve()), "classes": list(folder.classes.names),
                        "image_size": list(size) if size else None, "resolution": resolution,
                        "inference": inference if size and resolution == "native" else None, **result})
    return results


def _display_name(path: Path, manifests: list[dict]) -> str:
    """E.g. ``baseline mobilenet_v2``, ``baseline+inverse mobilenet_v2``, ``weighted ensemble``."""
    stage = manifests[0].get("stage", "model")
    weighting = manifests[0].get("loss", {}).get("class_weights", "none")
    if weighting != "none":
        stage = f"{stage}+{weighting}"
    if len(manifests) > 1:
        return f"{stage} ensemble"
    return f"{stage} {manifests[0].get('name', manifests[0]['encoder'])}"


# What tells results apart in a results file: evaluating the same model on the same data, split
# and resolution again replaces its entry; anything else is added beside the earlier entries.
RESULT_KEY = ("path", "data", "split", "resolution", "inference")


def merge_results(json_path: Path, results: list[dict]) -> tuple[list[dict], int, int]:
    """``results`` merged into those already in ``json_path`` (if any): returns the merged list,
    the number of earlier entries kept and replaced. Refuses a file that is not an iumask results
    file or holds results over other classes (one CSV header serves all rows)."""
    if not json_path.exists():
        return results, 0, 0
    previous = read_json(json_path, "results file")
    if not isinstance(previous.get("results"), list):
        raise IumaskError(f"{json_path}: not an iumask results file, so it is not replaced; choose another --output")
    new_keys = {tuple(r.get(k) for k in RESULT_KEY) for r in results}
    kept = [r for r in previous["results"] if tuple(r.get(k) for k in RESULT_KEY) not in new_keys]
    if kept and results and any(r.get("classes") != results[0]["classes"] for r in kept):
        raise IumaskError(f"{json_path}: holds results over other classes; choose another --output to keep both")
    return kept + results, len(kept), len(previous["results"]) - len(kept)


def write_results(results: list[dict], json_path: Path, identity: dict | None = None) -> Path:
    """Results as JSON and, beside it, a CSV with one row per model (both written atomically)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_path, {"identity": identity, "results": results})
    csv_path = json_path.with_suffix(".csv")
    classes = results[0]["classes"] if results else []
    header = ["model", "split", *[f"iou_{c}" for c in classes], "miou", "pixel_accuracy", "pavpu",
              "p_accurate_given_certain", "p_uncertain_given_inaccurate", "pavpu_threshold"]
    with atomic_write(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        for r in results:
            row = [r["model"], r["split"], *r["iou"], r["miou"], r["pixel_accuracy"], r["pavpu"],
                   r["p_accurate_given_certain"], r["p_uncertain_given_inaccurate"], r["pavpu_threshold"]]
            writer.writerow([f"{v:.6f}" if isinstance(v, float) else str(v) for v in row])
    return csv_path


# ----------------------------------------------------------------------------- all stages


@dataclass
class RunOptions:
    out: Path
    data: Path | None = None
    encoders: tuple[str, ...] = ("mobilenet_v2", "resnet18", "resnet34")
    train: TrainOptions = field(default_factory=TrainOptions)
    size: tuple[int, int] | None = None
    exponent: float = 2.0
    instances_from: str = "prediction"
    connectivity: int = 8
    eval_split: str = "val"
    device: str = "auto"
    encoder_weights: str | None = None
    overwrite: bool = False
    synthetic: dict = field(default_factory=dict)
    format: str = "auto"
    conditions: tuple[str, ...] | None = None
    class_weighting: str = "none"
    augment: dict | None = None
    online: bool = False  # stage 3 trains the members jointly with on-the-fly masks (no stage 2)


def run(options: RunOptions) -> list[dict]:
    """All four stages in order, each a cache hit when its artifact matches its inputs."""
    from iumask.data.synthetic import generate_synthetic

    out = Path(options.out)
    check_mask_options(options.instances_from, options.connectivity)  # stage 2/3 options, before stage 1
    check_train_inputs(list(options.encoders), options.encoder_weights)
    distributed.init(resolve_device(options.device))
    data_root = options.data
    if data_root is None:
        make_data = lambda: generate_synthetic(out / "data", overwrite=options.overwrite, **options.synthetic)  # noqa: E731
        data_root = distributed.main_first(make_data, make_data)  # rank 0 writes, the others reuse it
        console.print(f"data: embedded synthetic dataset in {data_root}")
    data = DataOptions(Path(data_root), size=options.size, format=options.format, conditions=options.conditions)
    console.rule("1/4 train-baseline")
    baseline = train_baseline(data, out / "baseline", list(options.encoders), options.train, options.device,
                              options.encoder_weights, options.overwrite, options.class_weighting, options.augment)
    if options.online:
        from iumask.online import train_online

        console.rule("2/4 make-masks: skipped (--online computes the masks during training)")
        console.rule("3/4 train-weighted --online")
        weighted = train_online(data, out / "online", list(options.encoders), options.train, options.exponent,
                                options.instances_from, options.connectivity, device=options.device,
                                encoder_weights=options.encoder_weights, overwrite=options.overwrite,
                                class_weighting=options.class_weighting, augment=options.augment)
    else:
        console.rule("2/4 make-masks")
        store_path = out / "masks.zarr"
        make_masks(baseline, data.root, store_path, data.train_split, options.instances_from, options.connectivity,
                   device=options.device, overwrite=options.overwrite, format=data.format, conditions=data.conditions)
        console.rule("3/4 train-weighted")
        weighted = train_weighted(data, store_path, out / "weighted", list(options.encoders), options.train,
                                  options.exponent, options.device, options.encoder_weights, options.overwrite,
                                  options.class_weighting, options.augment)
    if not distributed.is_main():
        return []  # under torchrun rank 0 evaluates
    console.rule("4/4 evaluate")
    models = [*(baseline.parent / m for m in read_json(baseline, "ensemble manifest")["members"]), baseline,
              *(weighted.parent / m for m in read_json(weighted, "ensemble manifest")["members"]),
              *([weighted] if options.online else [])]
    return cached_evaluate(models, data.root, options.eval_split, out / "results.json", options.device,
                           format=data.format, conditions=list(data.conditions) if data.conditions else None)


def cached_evaluate(models: list[Path], data_root: Path, split: str, json_path: Path, device: str = "auto",
                    **kwargs) -> list[dict]:
    """:func:`evaluate`, skipped when ``json_path`` holds results for the same weights, data and options."""
    weights = [read_json(folder / MANIFEST_FILE, "model manifest")["weights_sha256"]
               for path in models for folder in resolve_models(path)]
    identity = {"weights_sha256": weights,
                "data": open_dataset(data_root, split, kwargs.get("format", "auto"), kwargs.get("conditions")).fingerprint(),
                "split": split, "options": _json_normal(kwargs)}
    if json_path.is_file():
        previous = read_json(json_path, "results file")
        if previous.get("identity") == identity:
            console.print(f"[green]cache hit[/green]: {json_path} holds these results")
            return previous["results"]
    results = evaluate(models, data_root, split, device=device, **kwargs)
    write_results(results, json_path, identity)
    return results
