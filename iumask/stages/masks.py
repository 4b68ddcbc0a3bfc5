"""Stage 2, make-masks: pixel entropy, IU mask and prediction of every training image into a zarr
store (docs/method.md §2, §3), from an ensemble or from one model with MC dropout.

The store is opened, created or staged by :meth:`MaskStore.open_or_create` under its writer lock;
an interrupted run resumes from the store's completion flags; a finished store with the same
inputs is a cache hit; under torchrun each rank writes its share of the images (whole shards of a
sharded store: one writer per shard file).

A rerun of a finished store is decided from the model's manifests, the images' headers and the
data's fingerprint before torch is imported (:meth:`MaskStore.finished`), so it costs a fraction
of a second of imports instead of seconds; the work path imports torch, the models and the device.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from iumask import distributed
from iumask.artifacts import StoreAdvice
from iumask.config import MAKE_MASKS_ADVICE, DataConfig, MaskConfig
from iumask.errors import IumaskError
from iumask.files import describe_os_error
from iumask.model import Model, require_model
from iumask.progress import print_cache_hit
from iumask.store import MaskStore

# What to do about a store that records an autocast mode this device cannot run (docs/store.md).
PRECISION_FIX = ("rerun with --overwrite to compute it again (recorded as the precision used), or on a CUDA device "
                 "to reuse it")


def make_masks(model: Model, data: DataConfig, masks: MaskConfig, store_path: Path, device: str = "auto",
               overwrite: bool = False, advice: StoreAdvice = MAKE_MASKS_ADVICE) -> MaskStore:
    """Masks of every image of ``data.train_split`` into the store at ``store_path``; returns it
    (opened read-only). ``model``: an ensemble or one model (``masks.source`` ``ensemble``), or one
    model (``mc-dropout``, ``masks.passes`` passes per image), resolved once
    (:meth:`~iumask.model.Model.resolve`). ``advice``: what the store's messages tell the user to do
    (:class:`~iumask.artifacts.StoreAdvice`; ``run`` and ``experiment`` keep the store in their ``--out``)."""
    model = require_model(model)
    folder = data.open(data.train_split)
    model.check_classes(folder)  # members usable and of these classes, before the store is touched
    model.check_source(masks.source)
    image_shapes = folder.check_headers()
    identity = mask_identity(model, folder, masks, data, image_shapes)
    # float32 runs on every device, so the identity is known now. A well-formed --device is enough
    # for a cache hit (nothing runs on it); a work path resolves it and says what is wrong.
    if masks.amp == "off" and distributed.env_world_size() == 1 and DEVICE_NAME.fullmatch(device):
        store = MaskStore.finished(store_path, identity, advice)
        if store is not None:  # a cache hit decided from the manifests and headers: no torch imported
            print_cache_hit(store_path)
            return store
    # Work to do (or a decision that needs the device): torch, the models and the device from here.
    from iumask.device import resolve_amp, resolve_device
    from iumask.store import refuse_mislabelled_precision

    dev = distributed.init(resolve_device(device))  # joins the process group under torchrun
    resolved = resolve_amp(masks, dev)  # the identity records the precision actually used
    if not overwrite:
        refuse_mislabelled_precision(store_path, masks.amp, resolved.amp, PRECISION_FIX)
    if resolved is not masks:  # another precision than asked for (fp16 on a CPU): recorded as used
        masks, identity = resolved, mask_identity(model, folder, resolved, data, image_shapes)
    # Under torchrun rank 0 takes the store's writer lock and opens, creates or stages it (an
    # --overwrite replacement is built beside the old store); the other ranks open what it opened.
    try:
        return _write_masks(model, folder, masks, identity, store_path, dev, overwrite, advice)
    except OSError as exc:  # a full disk or a read-only folder while the store is written (zarr names no file)
        raise IumaskError(describe_os_error(exc, store_path)) from exc


DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def mask_identity(model: Model, folder, masks: MaskConfig, data: DataConfig, image_shapes: list) -> dict:
    """What a mask store records of its inputs: the images (ids, shapes at the model's size), the
    classes, the mask options (the precision used), the members' weights and the data's content."""
    return {
        "image_ids": folder.ids,
        "image_shapes": [list(model.size or shape) for shape in image_shapes],  # as dataset.sample_shape
        "class_names": list(folder.classes.names),
        "options": {**masks.identity(), "image_size": list(model.size) if model.size else None,
                    "split": data.train_split, "ignore_index": folder.classes.ignore_index},
        "member_sha256": model.member_sha256(),
        "dataset_fingerprint": folder.fingerprint(),
    }


def _write_masks(model: Model, folder, masks: MaskConfig, identity: dict, store_path: Path, dev,
                 overwrite: bool, advice: StoreAdvice) -> MaskStore:
    from iumask.data.dataset import SegmentationDataset
    from iumask.device import Precision
    from iumask.inference import InstanceUncertainty, probability_batches
    from iumask.overlap import BackgroundPool, background_threads
    from iumask.progress import progress_bar
    from iumask.transfer import to_host

    dataset = SegmentationDataset(folder, model.size)
    writer = (MaskStore.open_or_create(store_path, identity, overwrite=overwrite,
                                       images_per_shard=masks.images_per_shard, advice=advice)
              if distributed.is_main() else None)
    try:
        path = distributed.all_gather_object(writer.path if writer else None)[0]  # rank 0's
        store = writer or MaskStore.open(path, mode="r+", advice=advice)
        todo = [i for i, done in enumerate(store.completed()) if not done]
        distributed.barrier()  # every rank has read the completion flags before any rank writes
        if not todo:
            print_cache_hit(store_path)
        # The members' weights are loaded only when there is an image to compute: a cache hit
        # decides from the manifests (the identity records their weights' digests).
        source = model.source(masks.source, dev, masks.passes) if todo else None
        num_classes, ignore = folder.classes.num_classes, folder.classes.ignore_index
        batches = rank_batches(todo, lambda i: identity["image_shapes"][i], masks.batch_size, store.images_per_shard)
        iu_of = InstanceUncertainty(num_classes, ignore, masks.connectivity, masks.instances_from)
        # Leaving the block drains the pool, then writes the shards still buffered.
        with progress_bar() as progress, store.writes(i for b in batches for i in b) as out, \
                BackgroundPool(background_threads()) as pool:

            def finish(index: int, entropy: np.ndarray, prediction: np.ndarray, label: np.ndarray, advance) -> None:
                # Background: IU of one image, then its arrays and completion flag (once its shard is whole).
                out.write(index, entropy, iu_of.image(prediction, entropy, label), prediction)
                advance()

            task = progress.add_task("make-masks", total=len(folder), completed=len(folder) - len(todo), info="")
            advance = functools.partial(progress.update, task, advance=distributed.world_size())  # rank 0: estimate
            for batch in (probability_batches(source, dataset, batches, dev, Precision.resolve(masks.amp, dev),
                                              normalize=masks.normalize, workers=masks.num_workers)
                          if source is not None else ()):
                # Entropy and argmax on the device; the class ids cross to the host as uint8 (up to
                # 256 classes). The entropy crosses in float32: IU averages full-precision values
                # (as the serial path always did); the store rounds both to float16.
                entropy, prediction = to_host(batch.maps.entropy), to_host(batch.maps.prediction)
                labels = batch.items["label"].numpy()
                for k, index in enumerate(batch.indices):
                    pool.submit(finish, index, entropy[k], prediction[k], labels[k], advance)
        distributed.barrier()  # every rank's images are written
        if writer:
            if not writer.attrs.get("finished"):
                if not writer.completed().all():
                    raise IumaskError(f"{store_path}: {int((~writer.completed()).sum())} images were not written; "
                                      "rerun the command to finish the store")
                writer.set_attrs(mean_entropy=store_mean_entropy(writer), num_complete=writer.num_images,
                                 finished=True, ensemble=model.key)
            writer.commit()  # a finished --overwrite replacement takes the old store's place
    finally:
        if writer:
            writer.close()
    distributed.barrier()  # rank 0 has set the final attributes and swapped the store in
    return MaskStore.open(store_path, advice=advice)  # fresh attributes on every rank


def rank_batches(todo: list[int], shape_of, step: int, images_per_shard: int) -> list[list[int]]:
    """This rank's batches of the images ``todo`` (:func:`~iumask.data.dataset.shape_batches`: at most
    ``step`` images of one shape), every world_size-th one. Under torchrun with a sharded store,
    whole shards go to each rank instead (every world_size-th shard, in batches that stop at shard
    ends), as one shard file has one writer."""
    from iumask.data.dataset import shape_batches

    if distributed.world_size() == 1 or images_per_shard == 1:  # the batches a single process makes
        return distributed.shard(shape_batches(todo, shape_of, step))
    shards: dict[int, list[int]] = {}
    for index in todo:
        shards.setdefault(index // images_per_shard, []).append(index)
    return [batch for images in distributed.shard(list(shards.values()))
            for batch in shape_batches(images, shape_of, step)]


def store_mean_entropy(store: MaskStore) -> float:
    """Mean stored pixel entropy over all images (float64 sums of the float16 values)."""
    total, pixels = 0.0, 0
    for _, arrays in store.read_all(("entropy",)):
        entropy = arrays["entropy"]
        total, pixels = total + float(entropy.sum(dtype=np.float64)), pixels + entropy.size
    return total / max(pixels, 1)
