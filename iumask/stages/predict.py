"""``iumask predict``: apply a trained model or ensemble to unlabeled images and write, per image at
its own resolution, the predicted labels, their colours, an overlay, and pixel-entropy and
instance-uncertainty heat maps (and with ``save_arrays`` the raw arrays in a zarr store of the mask
store's layout).

Inputs are a folder (searched recursively), a glob or one file; outputs keep each input's path
relative to the folder (or the glob's fixed prefix): ``OUT/<kind>/<relative path>.png`` (``.jpg`` for
overlays). Every file is written atomically, so an image whose outputs all exist is complete and a
rerun skips it (``overwrite`` redoes it). An unreadable input is reported, skipped, and listed in
the result; the other images are still written.

``OUT/prediction.json`` records the identity of the outputs (the members' weights digests and the
options that change a pixel): a rerun with the same model skips the images whose files exist and
predicts the rest; another model or other options are refused unless ``overwrite``. Then every
image is predicted again: the record takes the time it was written (the file system's clock) and,
until the run finishes, only files written after it count as done, so a killed replacement resumes.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import torch
from torch.utils.data import Dataset

from iumask.artifacts import Reuse, StoreAdvice, reuse_decision
from iumask.config import PredictConfig
from iumask.data.dataset import shape_batches
from iumask.data.folder import IMAGENET_MEAN, IMAGENET_STD, ClassInfo, image_header_shape, read_rgb
from iumask.device import Precision, resolve_amp, resolve_device
from iumask.errors import DataError, IumaskError
from iumask.files import WriterLock, atomic_write, check_writable, describe_os_error, read_json, write_json_atomic
from iumask.inference import InstanceUncertainty, probability_batches
from iumask.model import Model, require_model
from iumask.overlap import BackgroundPool, background_threads
from iumask.progress import console, progress_bar, warn
from iumask.store import MaskStore, refuse_mislabelled_precision
from iumask.transfer import to_host

INPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
OUTPUT_KINDS = ("labels", "color", "overlay", "entropy", "iu")
STORE_NAME = "arrays.zarr"
# What model and options made the images' files: a folder's outputs are skipped on a rerun only when
# they are known to be this model's (prediction_identity).
RECORD_FILE = "prediction.json"
OTHER_OUTPUTS_FIX = "pass --overwrite to predict every image again, or use another --out folder"
OVERLAY_ALPHA = 0.5  # weight of the class colours over the image
HEAT_COLORMAP = "magma"
_MAGIC = "*?["
# What to do about an arrays store that records an autocast mode this device cannot run (docs/store.md).
# predict --save-arrays keeps its store in --out, and its --overwrite predicts every image again.
STORE_ADVICE = StoreAdvice(other_path="use another --out folder",
                           overwrite="pass --overwrite to predict every image again",
                           remake="rerun iumask predict with --save-arrays --overwrite (or use another --out folder)",
                           missing="run iumask predict with --save-arrays first")
PRECISION_FIX = ("rerun with --overwrite to predict every image again (recorded as the precision used), or on a "
                 "CUDA device to reuse it")


@dataclass
class PredictResult:
    """What a predict run did: images written, skipped because their outputs existed, and the
    inputs that could not be read (path, reason)."""

    out: Path
    done: int = 0
    existing: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------- inputs and outputs


def find_inputs(path: Path | str, exclude: Path | None = None) -> list[tuple[Path, Path]]:
    """(file, path relative to the input root) of every image named by ``path``: a file, a folder
    (recursively) or a glob (relative to its fixed prefix). Hidden files and files under
    ``exclude`` (the output folder) are left out."""
    text, path = str(path), Path(path)
    if path.is_file():
        return [(path, Path(path.name))]
    if path.is_dir():
        base, files = path, sorted(p for p in path.rglob("*") if p.is_file())
    elif any(c in text for c in _MAGIC):
        parts = Path(text).parts
        fixed = next(i for i, part in enumerate(parts) if any(c in part for c in _MAGIC))
        base = Path(*parts[:fixed]) if fixed else Path(".")
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
    else:
        raise IumaskError(f"--input {text}: no such file or folder; give an image, a folder of images or a glob")
    skip = Path(os.path.abspath(exclude)) if exclude is not None else None
    found = []
    for file in files:
        rel = Path(os.path.relpath(file, base))
        if file.suffix.lower() not in INPUT_SUFFIXES or any(part.startswith(".") for part in rel.parts):
            continue
        if skip is not None and Path(os.path.abspath(file)).is_relative_to(skip):
            continue
        found.append((file, rel))
    if not found:
        raise IumaskError(f"--input {text}: no images found ({', '.join(s[1:] for s in INPUT_SUFFIXES)})")
    stems: dict[Path, Path] = {}
    for file, rel in found:
        other = stems.setdefault(rel.with_suffix(""), file)
        if other != file:
            raise IumaskError(f"--input {text}: {other} and {file} would write the same outputs; rename one or "
                              "predict them separately")
    return found


def output_paths(out: Path, rel: Path) -> dict[str, Path]:
    """The files written for the input at relative path ``rel``, by kind."""
    return {kind: out / kind / rel.with_suffix(".jpg" if kind == "overlay" else ".png") for kind in OUTPUT_KINDS}


@functools.lru_cache(maxsize=None)
def heat_lut(name: str = HEAT_COLORMAP) -> np.ndarray:
    """(256, 3) uint8 RGB table of a matplotlib colormap."""
    return (np.asarray(matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256)))[:, :3] * 255).round().astype(np.uint8)


def heat_map(values: np.ndarray, top: float) -> np.ndarray:
    """``values`` as an RGB heat map on the fixed scale [0, ``top``] (values above it saturate)."""
    index = np.clip(np.nan_to_num(values) / top, 0.0, 1.0) * 255
    return heat_lut()[index.round().astype(np.uint8)]


def _write_png_or_jpg(path: Path, array: np.ndarray, rgb: bool = True) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if path.suffix == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, buf = cv2.imencode(path.suffix, cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if rgb else array, params)
    if not ok:
        raise IumaskError(f"{path}: could not encode the image")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_bytes(buf.tobytes())


def write_outputs(paths: dict[str, Path], image: np.ndarray, prediction: np.ndarray, entropy: np.ndarray,
                  iu: np.ndarray, palette: np.ndarray, top: float) -> None:
    """One image's five files (labels last: an image counts as done once all exist)."""
    color = palette[prediction.astype(np.intp) % len(palette)]  # beyond 256 classes the colours repeat
    overlay = (OVERLAY_ALPHA * color + (1 - OVERLAY_ALPHA) * image).round().astype(np.uint8)
    _write_png_or_jpg(paths["color"], color)
    _write_png_or_jpg(paths["overlay"], overlay)
    _write_png_or_jpg(paths["entropy"], heat_map(entropy, top))
    _write_png_or_jpg(paths["iu"], heat_map(iu, top))
    _write_png_or_jpg(paths["labels"], prediction, rgb=False)


class _Images(Dataset):
    """Decoded, normalised images; an unreadable one comes back as its error instead."""

    def __init__(self, files: list[Path], mean, std):
        self.files = files
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        try:
            rgb = read_rgb(self.files[i])
        except DataError as exc:
            return {"index": i, "error": str(exc)}
        image = (rgb.astype(np.float32) / 255.0 - self.mean) / self.std
        return {"index": i, "rgb": rgb, "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))}


def _decoded_batches(items: list[dict]) -> list[dict]:
    """A loader batch as stacked batches of one decoded shape each (a decoded image may differ from
    its header's shape), with the unreadable images' ``(index, error)`` in the first one's
    ``"failed"`` (a batch without ``"image"`` when none could be read)."""
    groups: dict[tuple, list[dict]] = {}
    for item in items:
        if "error" not in item:
            groups.setdefault(tuple(item["rgb"].shape), []).append(item)
    stacked = [{"index": torch.tensor([item["index"] for item in group]),
                "image": torch.stack([item["image"] for item in group]),
                "rgb": [item["rgb"] for item in group], "failed": []} for group in groups.values()]
    stacked = stacked or [{"index": torch.zeros(0, dtype=torch.long), "failed": []}]
    stacked[0]["failed"] = [(item["index"], item["error"]) for item in items if "error" in item]
    return stacked


# ----------------------------------------------------------------------------- the stage


def predict(model: Model, inputs: Path | str, out: Path, options: PredictConfig = PredictConfig(),
            device: str = "auto") -> PredictResult:
    """Predict every image named by ``inputs`` (file, folder or glob) with ``model`` (a model or
    ensemble, resolved once: :meth:`~iumask.model.Model.resolve`) and write the
    outputs under ``out`` (see the module docstring). Unreadable inputs are skipped and listed in
    the result's ``failed``."""
    out = Path(out)
    found = find_inputs(inputs, exclude=out)
    dev = resolve_device(device)
    model = require_model(model)
    model.check_source(options.source)
    classes = model.classes
    resolved = resolve_amp(options, dev)  # the arrays' identity records the precision actually used
    if options.save_arrays and not options.overwrite:
        refuse_mislabelled_precision(out / STORE_NAME, options.amp, resolved.amp, PRECISION_FIX)
    options = resolved
    check_writable(out)  # after the model checks: a bad --model leaves no empty output folder
    with WriterLock(out, f"prediction folder {out}", "use another --out"):
        result = PredictResult(out)

        shapes: dict[int, tuple[int, int]] = {}
        for i, (file, _) in enumerate(found):
            try:
                shapes[i] = image_header_shape(file)
            except DataError as exc:
                result.failed.append((file, str(exc)))
                warn(f"skipped {exc}")
        paths = [output_paths(out, rel) for _, rel in found]
        identity = prediction_identity(model, options)
        trusted = _trusted_outputs(out, paths, identity, options.overwrite)
        store = _open_store(out, found, shapes, classes, identity, options) if options.save_arrays else None
        slot = {i: k for k, i in enumerate(sorted(shapes))}  # image index -> store index
        try:
            trusted = _record(out, identity, trusted)
            todo = [i for i in sorted(shapes) if not _is_done(paths[i], store, slot.get(i), trusted)]
            result.existing = len(shapes) - len(todo)
            if todo:  # the members are loaded only when there is an image to predict
                _run(model.source(options.source, dev, options.passes), found, todo, shapes, paths, store, slot,
                     classes, options, dev, result)
            write_json_atomic(out / RECORD_FILE, {"identity": identity, "finished": True, "trusted_after_ns": None})
            if store is not None:
                if store.completed().all():
                    store.set_attrs(finished=True, num_complete=store.num_images, ensemble=model.key)
                store.commit()
        except OSError as exc:
            raise IumaskError(describe_os_error(exc, out)) from exc
        finally:
            if store is not None:
                store.close()
        return result


def prediction_identity(model: Model, options: PredictConfig) -> dict:
    """What the outputs depend on besides the images: the members' weights and the options that
    change a pixel (the uncertainty source, inference mode, precision actually used, connectivity)."""
    return {"member_sha256": model.member_sha256(),
            "options": {**options.identity(), "image_size": list(model.size) if model.size else None}}


# A replacement trusts only files written this long after its record (file times are coarse: a
# file written in the same clock tick as the record could be the other model's).
RACY_NS = 2_000_000_000
REPLACING = -1  # trusted_after_ns of a replacement whose reference time is not recorded yet: trust none


def _trusted_outputs(out: Path, paths: list[dict[str, Path]], identity: dict, overwrite: bool) -> int | None:
    """Which image files already in ``out`` count as this run's (:func:`~iumask.artifacts.reuse_decision`
    on the folder's record), as a ``trusted_after_ns``: None, every file (the record's identity,
    or an empty folder); a time, only files modified after it (an unfinished replacement, resumed);
    :data:`REPLACING`, none (``overwrite``: every image is predicted again). Outputs of another
    model or other options, or with no record (written by an earlier iumask), are refused without
    ``overwrite``."""
    record = out / RECORD_FILE
    if record.is_file():
        stored = read_json(record, "prediction record")
        decision = reuse_decision(stored.get("identity"), identity, stored.get("finished", False), overwrite,
                                  f"prediction folder {out}", OTHER_OUTPUTS_FIX)
        if decision in (Reuse.HIT, Reuse.RESUME) and not overwrite:
            trusted = stored.get("trusted_after_ns", REPLACING)
            return trusted if trusted is None or isinstance(trusted, int) else REPLACING
        return REPLACING
    if not any(file.is_file() for image in paths for file in image.values()):
        return None  # nothing there yet: what this run writes is this identity's
    if not overwrite:
        raise IumaskError(f"{out}: holds predictions with no {RECORD_FILE} naming the model that made them; "
                          f"{OTHER_OUTPUTS_FIX}")
    return REPLACING


def _record(out: Path, identity: dict, trusted: int | None) -> int | None:
    """Write the folder's record of an unfinished run and return its ``trusted_after_ns``. A new
    replacement takes its reference time from the record file's own modification time (the file
    system's clock, the one the outputs' times come from): files written before it are the other
    model's, files written :data:`RACY_NS` after it this run's, so a killed replacement resumes."""
    record = out / RECORD_FILE
    write_json_atomic(record, {"identity": identity, "finished": False, "trusted_after_ns": trusted})
    if trusted != REPLACING:
        return trusted
    trusted = record.stat().st_mtime_ns + RACY_NS
    write_json_atomic(record, {"identity": identity, "finished": False, "trusted_after_ns": trusted})
    return trusted


def _is_done(paths: dict[str, Path], store: MaskStore | None, index: int | None, trusted: int | None) -> bool:
    """Whether an image's outputs are all there, written by this identity (``trusted``: see
    :func:`_trusted_outputs`), and its arrays complete in the store."""
    try:
        times = [p.stat().st_mtime_ns for p in paths.values()]
    except FileNotFoundError:
        return False
    if trusted is not None and (trusted == REPLACING or min(times) <= trusted):
        return False
    return store is None or store.is_complete(index)


def _open_store(out: Path, found, shapes, classes: ClassInfo, outputs: dict, options: PredictConfig) -> MaskStore:
    """The ``--save-arrays`` store: one slot per input whose header could be read; ``outputs`` is
    the folder's :func:`prediction_identity`."""
    identity = {
        "image_ids": [found[i][1].as_posix() for i in sorted(shapes)],
        "image_shapes": [list(shapes[i]) for i in sorted(shapes)],
        "class_names": list(classes.names),
        "options": outputs["options"],
        "member_sha256": outputs["member_sha256"],
        "dataset_fingerprint": None,  # unlabeled inputs: the image ids and shapes identify them
    }
    out.mkdir(parents=True, exist_ok=True)
    return MaskStore.open_or_create(out / STORE_NAME, identity, overwrite=options.overwrite, advice=STORE_ADVICE)


def _run(source, found, todo, shapes, paths, store, slot, classes: ClassInfo, options: PredictConfig, dev,
         result: PredictResult) -> None:
    norm = source.manifests[0].get("normalization") or {}
    dataset = _Images([file for file, _ in found], norm.get("mean", IMAGENET_MEAN), norm.get("std", IMAGENET_STD))
    batches = shape_batches(todo, shapes.__getitem__, options.batch_size)
    num_classes, top = classes.num_classes, math.log(max(classes.num_classes, 2))
    label_dtype = np.uint8 if num_classes <= 256 else np.uint16
    palette = classes.palette()
    start = time.perf_counter()

    iu_of = InstanceUncertainty(num_classes, classes.ignore_index, options.connectivity)
    # Store entries are buffered per shard (one write per shard file); leaving the block drains the
    # pool, then writes what is buffered.
    writes = store.writes(slot[i] for i in todo) if store is not None else contextlib.nullcontext()

    def finish(out, i: int, rgb: np.ndarray, entropy: np.ndarray, prediction: np.ndarray) -> None:
        # Background: the image's IU, its store entry and its files.
        iu = iu_of.image(prediction, entropy)
        if out is not None:
            out.write(slot[i], entropy, iu, prediction)
        write_outputs(paths[i], rgb, prediction, entropy, iu, palette, top)

    with progress_bar() as progress, writes as out, BackgroundPool(background_threads()) as pool:
        task = progress.add_task("predict", total=len(found), completed=result.existing + len(result.failed),
                                 info="")
        for batch in probability_batches(source, dataset, batches, dev, Precision.resolve(options.amp, dev),
                                         options.inference, workers=options.num_workers, collate=_decoded_batches):
            for index, error in batch.items["failed"]:
                result.failed.append((found[index][0], error))
                warn(f"skipped {error}")
            if batch.maps is not None:
                entropy = to_host(batch.maps.entropy)
                prediction = to_host(batch.maps.prediction).astype(label_dtype)
                for k, (index, rgb) in enumerate(zip(batch.indices, batch.items["rgb"])):
                    pool.submit(finish, out, index, rgb, entropy[k], prediction[k])
                result.done += len(batch.indices)
            progress.update(task, advance=len(batch.indices) + len(batch.items["failed"]))
    result.seconds = time.perf_counter() - start


def print_summary(result: PredictResult) -> None:
    """One line: images predicted, skipped because done, unreadable, and the speed."""
    parts = [f"{result.done} predicted", f"{result.existing} already done (skipped)"]
    if result.failed:
        parts.append(f"{len(result.failed)} unreadable (skipped)")
    speed = f", {result.images_per_second:.2f} images/s" if result.done else ""
    console.print(f"predict: {', '.join(parts)}{speed}; outputs in {result.out}")
