"""Stage 4, evaluate: per-class IoU, mIoU, pixel accuracy, PAvPU and calibration (ECE, Brier, NLL)
of models or ensembles on a split (docs/method.md §8), and the results files (JSON + CSV, merged
across runs, and beside them the per-image counts: :func:`read_image_counts`).

The PAvPU threshold defaults to the evaluated model's training-set mean pixel entropy, computed
once and cached in its manifest with the weights it belongs to (:mod:`iumask.artifacts`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from iumask import distributed
from iumask.artifacts import same_identity
from iumask.config import DataConfig, EvalConfig
from iumask.core import SegmentationMetrics
from iumask.core.metrics import IMAGE_COUNTS, fit_temperature, scale_temperature
from iumask.data.dataset import SegmentationDataset, shape_batches
from iumask.data.formats import open_dataset
from iumask.device import Precision, resolve_amp, resolve_device
from iumask.errors import IumaskError
from iumask.files import (
    atomic_write,
    check_writable,
    describe_os_error,
    folder_lock,
    json_normal,
    nan_to_none,
    refuse_read_only,
    write_json_atomic,
)
from iumask.inference import UncertaintySource, probability_batches
from iumask.model import Model, require_model
from iumask.progress import print_cache_hit, progress_bar, warn
from iumask.tables import result_labels
from iumask.transfer import host_tensor

# What tells results apart in a results file: evaluating the same model on the same data, split
# and resolution again replaces its entry; anything else is added beside the earlier entries.
RESULT_KEY = ("path", "data", "split", "resolution", "inference")
# Scalar metrics added after the first results files (NaN in the CSV for entries merged from those).
NEWER_METRICS = ("mean_accuracy", "per_image_miou", "worst_10pct_miou", "instance_recall", "instance_recall_small",
                 "instance_recall_medium", "instance_recall_large", "aurc", "augrc", "risk_at_80_coverage",
                 "temperature", "ece_scaled", "brier_scaled", "nll_scaled", "per_image_miou_label_or_prediction",
                 "worst_10pct_miou_label_or_prediction", "temperature_pixels", "temperature_split_pixels")
# What the metrics mean, in the evaluation identity: 2 = per-image mIoU over the label's classes, the
# worst max(1, floor(n/10)) images, COCO's absolute instance sizes, per-image counts in an images
# file. Results of another version (or none: before) are evaluated again, not cache hits.
METRICS_VERSION = 2


class EvaluationResult(dict):
    """One results entry (a dict, as results.json holds it) that also carries its per-image counts
    (``image_counts``: :func:`read_image_counts`' arrays, or None) from :func:`evaluate` to
    :func:`write_results`, which puts them in the images file, never into the JSON."""

    def __init__(self, entry: dict, image_counts: dict[str, np.ndarray] | None = None):
        super().__init__(entry)
        self.image_counts = image_counts


@torch.no_grad()
def predict_split(source: UncertaintySource, dataset: SegmentationDataset, device: torch.device, label: str,
                  metrics: SegmentationMetrics | None, inference: str = "resize", workers: int | str = 0,
                  amp: str = "off", scaled: tuple[SegmentationMetrics, float] | None = None,
                  on_batch=None, across_ranks: bool = False, batch_size: int = 4) -> float:
    """Run ``source`` over a dataset (batches of ``batch_size`` images of one shape, ``workers``
    loader processes, ``amp`` autocast); feed ``metrics`` (and ``scaled = (metrics, T)`` with the
    probabilities at temperature T); hand each batch's ``(probs, labels)`` to ``on_batch``; return
    the mean pixel entropy.

    ``across_ranks`` (under torchrun): each rank predicts every world_size-th batch (the batches of
    one process), the metrics are reduced over the ranks and the mean entropy is summed in batch
    order, so every rank ends with the single-process numbers."""
    batches = shape_batches(range(len(dataset)), dataset.sample_shape, batch_size)
    order = list(range(len(batches)))
    if across_ranks:
        order = distributed.shard(order)
    sums = []  # (batch, Σ entropy, pixels) of this rank's batches
    with progress_bar() as progress:
        task = progress.add_task(label, total=len(dataset), info="")
        # MC dropout evaluates every batch with the draws of seed 0 (unseeded), as it always has.
        for b, batch in zip(order, probability_batches(source, dataset, [batches[b] for b in order], device,
                                                       Precision.resolve(amp, device), inference, workers=workers,
                                                       seeded=False)):
            entropy, prediction = host_tensor(batch.maps.entropy), host_tensor(batch.maps.prediction)
            labels = batch.items["label"]
            sums.append((b, float(entropy.double().sum()), entropy.numel()))
            if metrics is not None:  # calibration streams on the device; IoU and PAvPU on the host
                metrics.update(prediction, labels, entropy, batch.probs, image_ids=batch.indices)
            if scaled is not None:
                scaled[0].update(prediction, labels, None, scale_temperature(batch.probs, scaled[1]))
            if on_batch is not None:
                on_batch(batch.probs, labels)
            progress.update(task, advance=len(batch.indices) * (distributed.world_size() if across_ranks else 1))
    if across_ranks:
        for reduced in (metrics, scaled[0] if scaled else None):
            if reduced is not None:
                reduced.sync(distributed.all_reduce_sum, distributed.all_gather_object)
        sums = sorted(s for part in distributed.all_gather_object(sums) for s in part)
    total = pixels = 0
    for _, batch_sum, batch_pixels in sums:  # in batch order, as one process adds them
        total, pixels = total + batch_sum, pixels + batch_pixels
    return total / max(pixels, 1)


# Temperature scaling is fitted on at most this many valid pixels (a fixed random sample): all of
# CamVid's val split (17 M pixels × 11 classes) would need gigabytes in float64.
TEMPERATURE_PIXELS = 2_000_000


def split_temperature(source: UncertaintySource, folder, eval_size, options: EvalConfig, device: torch.device,
                      name: str) -> tuple[float, int, int]:
    """The temperature that minimises the NLL of the model's probabilities on ``folder`` (a fixed
    random sample of at most TEMPERATURE_PIXELS valid pixels, spread evenly over the images), the
    number of pixels it was fitted on and the number of valid pixels of ``folder``."""
    dataset = SegmentationDataset(folder, eval_size)
    per_image = max(1, TEMPERATURE_PIXELS // max(len(dataset), 1))
    generator = torch.Generator().manual_seed(0)
    chosen_logp, chosen_labels, available = [], [], [0]

    def keep(probs: torch.Tensor, labels: torch.Tensor) -> None:
        logp = torch.log(probs.float().clamp_min(1e-12)).movedim(1, -1).cpu()
        for image_logp, image_labels in zip(logp, labels):
            valid = image_labels != folder.classes.ignore_index
            z, y = image_logp[valid], image_labels[valid]
            available[0] += len(y)
            pick = torch.randperm(len(y), generator=generator)[:per_image]
            chosen_logp.append(z[pick])
            chosen_labels.append(y[pick])

    predict_split(source, dataset, device, f"temperature {name} ({folder.split})", None,
                  inference=options.inference, workers=options.num_workers, amp=options.amp, on_batch=keep,
                  batch_size=options.batch_size)
    if not chosen_labels or sum(len(y) for y in chosen_labels) == 0:
        raise IumaskError(f"{folder.root} ({folder.split}): no labelled pixel to fit a temperature on; choose "
                          "another --temperature-split")
    labels = torch.cat(chosen_labels)
    return fit_temperature(torch.cat(chosen_logp), labels), len(labels), available[0]


def train_mean_entropy(model: Model, source: UncertaintySource, device: torch.device,
                       workers: int | str = 0, across_ranks: bool = False) -> float:
    """The model's training-set mean pixel entropy (the default PAvPU threshold), cached in its
    manifest (member manifest.json or ensemble.json) with the weights it belongs to, once computed.
    A manifest that cannot be written (read-only folder) only loses the cache: a warning.
    ``across_ranks``: the ranks share the work (:func:`predict_split`) and rank 0 writes the cache."""
    cached = model.cached_threshold()
    if across_ranks:  # every rank takes rank 0's answer, read before rank 0 may write the cache
        cached = distributed.all_gather_object(cached)[0]
    if cached is not None:
        return cached
    train = model.record.get("train_data") or model.manifests[0].get("train_data")
    if not train or not Path(train["root"]).is_dir():
        raise IumaskError(f"{model.record_path}: the model's training data is not available to compute the PAvPU "
                          "threshold; pass --pavpu-threshold")
    dataset = SegmentationDataset(
        open_dataset(train["root"], train["split"], train.get("format", "auto"), train.get("conditions")), source.size)
    mean = predict_split(source, dataset, device, "train-set entropy", None, workers=workers,  # float32 always
                         across_ranks=across_ranks)
    if not distributed.is_main():
        return mean
    try:
        model.cache_threshold(mean)
    except IumaskError as exc:
        # e.g. a model on a read-only mount: the results are complete, only the cache is lost
        warn(f"PAvPU threshold not cached ({str(exc).split(';')[0]}); it is computed again next time")
    return mean


def evaluate(models: list[Model], data: DataConfig, options: EvalConfig = EvalConfig(),
             device: str = "auto", before_work: Callable[[], None] | None = None,
             across_ranks: bool = False) -> list[dict]:
    """Per-class IoU, mIoU, PAvPU, ECE, Brier and NLL of each model (or ensemble) on ``data``'s
    ``options.split``. Each result is an :class:`EvaluationResult`: it also carries its per-image
    counts, which :func:`write_results` puts in the images file. ``models``: :class:`Model`
    objects (:meth:`Model.resolve`).

    ``resolution="native"`` (default, for reporting) scores predictions at each label's own size
    (``inference`` says how a model trained at a reduced size gets there: ``resize`` the image
    and upsample the logits, or ``slide`` windows over the full-resolution image);
    ``"train"`` resizes images and labels (nearest) to the training size. ``before_work`` runs once
    the models and data are checked, before the first model is run (e.g. to create the output folder).

    ``across_ranks``: started by torchrun, every rank calls this; they share the images and each
    returns the single-process results (``run`` and ``experiment`` evaluate on rank 0 alone instead).
    """
    dev = distributed.init(resolve_device(device)) if across_ranks else resolve_device(device)
    across_ranks = across_ranks and distributed.is_distributed()
    options = resolve_amp(options, dev)  # the results record the precision actually used
    folder = data.open(options.split)
    shapes = folder.check_headers()
    temperature_folder = None
    if options.temperature_split is not None:
        temperature_folder = data.open(options.temperature_split)
        temperature_folder.check_headers()
    models = [require_model(model) for model in models]
    for model in models:
        model.check_classes(folder)
        size = model.size if options.resolution == "train" else None
        check_pavpu_window(options.pavpu_window, [tuple(size)] * len(shapes) if size else shapes, folder)
    if before_work is not None and distributed.is_main():
        before_work()
    results = []
    for model in models:
        source = model.source("ensemble", dev)
        threshold = options.pavpu_threshold
        if threshold is None:
            threshold = train_mean_entropy(model, source, dev, options.num_workers, across_ranks)
        metrics = SegmentationMetrics(folder.classes.num_classes, folder.classes.ignore_index,
                                      pavpu_window=options.pavpu_window, pavpu_threshold=threshold,
                                      pavpu_stride=options.pavpu_stride)
        name = display_name(source.manifests)
        eval_size = source.size if options.resolution == "train" else None
        scaled, extra = None, {}
        if temperature_folder is not None:
            temperature, used, available = split_temperature(source, temperature_folder, eval_size, options, dev, name)
            scaled = (SegmentationMetrics(folder.classes.num_classes, folder.classes.ignore_index), temperature)
        predict_split(source, SegmentationDataset(folder, eval_size), dev, f"evaluate {name}", metrics,
                      inference=options.inference, workers=options.num_workers, amp=options.amp, scaled=scaled,
                      across_ranks=across_ranks, batch_size=options.batch_size)
        if scaled is not None:
            after = scaled[0].compute()
            extra = {"temperature": scaled[1], "temperature_split": options.temperature_split,
                     "temperature_pixels": used, "temperature_split_pixels": available,
                     **{f"{k}_scaled": after[k] for k in ("ece", "brier", "nll")}}
        if int(metrics.confusion.sum()) == 0:
            warn(f"{folder.root} ({options.split}): every label pixel is the ignore label "
                 f"{folder.classes.ignore_index}, so IoU, accuracy, PAvPU and calibration are undefined (NaN); "
                 "check the labels or the --split")
        size = source.size
        counts = metrics.image_counts()
        image_counts = {**{k: counts[k] for k in IMAGE_COUNTS},
                        "images": np.array([folder.ids[i] for i in counts["image_ids"]], dtype=str)}
        results.append(EvaluationResult(nan_to_none({  # the results file's form: null (None) for undefined values
            "model": name, "path": model.key, "split": options.split,
            "data": str(data.root.resolve()), "classes": list(folder.classes.names),
            "image_size": list(size) if size else None, "resolution": options.resolution,
            "inference": options.inference if size and options.resolution == "native" else None,
            **metrics.compute(), **extra}), image_counts))
    return results


def check_pavpu_window(window: int, shapes: list[tuple[int, int]], folder) -> None:
    """Refuse a PAvPU window that fits in none of the evaluated images (PAvPU would have no patch),
    before any work. Images smaller than the window in one side contribute no patch (patches that
    overhang an edge are left out), so PAvPU is then over the other images."""
    if shapes and all(window > min(h, w) for h, w in shapes):
        h, w = max(shapes, key=min)
        raise IumaskError(f"--pavpu-window {window}: larger than every evaluated image of {folder.root} "
                          f"({folder.split}; the largest is {w}x{h}, WxH), so PAvPU would have no patch; choose a "
                          f"window of at most {min(h, w)}")


def display_name(manifests: list[dict]) -> str:
    """E.g. ``baseline mobilenet_v2``, ``baseline+inverse mobilenet_v2``, ``baseline+focal resnet18``,
    ``weighted ensemble``."""
    stage = manifests[0].get("stage", "model")
    loss = manifests[0].get("loss", {})
    for part in (loss.get("method", "cross-entropy"), loss.get("class_weights", "none")):
        if part not in ("cross-entropy", "none"):
            stage = f"{stage}+{part}"
    if len(manifests) > 1:
        return f"{stage} ensemble"
    return f"{stage} {manifests[0].get('name', manifests[0]['encoder'])}"


def merge_results(json_path: Path, results: list[dict],
                  classes: list[str] | None = None) -> tuple[list[dict], int, int]:
    """``results`` merged into those already in ``json_path`` (if any): returns the merged list,
    the number of earlier entries kept and replaced. Refuses a file that is not an iumask results
    file or holds results over other classes than ``results`` (or ``classes``: a check before any
    evaluation), since one CSV header serves all rows, and a read-only file or CSV beside it."""
    for path in (json_path, json_path.with_suffix(".csv")):
        refuse_read_only(path)
    if not json_path.exists():
        return results, 0, 0
    classes = results[0]["classes"] if results else classes
    previous = read_results_file(json_path)
    new_keys = {tuple(r.get(k) for k in RESULT_KEY) for r in results}
    counts = read_image_counts(json_path) or [None] * len(previous["results"])
    kept = [EvaluationResult(r, c) for r, c in zip(previous["results"], counts)
            if tuple(r.get(k) for k in RESULT_KEY) not in new_keys]
    if kept and classes is not None and any(r.get("classes") != classes for r in kept):
        raise IumaskError(f"{json_path}: holds results over other classes; choose another --output to keep both")
    return kept + results, len(kept), len(previous["results"]) - len(kept)


def read_results_file(json_path: Path) -> dict:
    """An existing results file (``{"identity": ..., "results": [{...}, ...]}``); anything else (not
    JSON, other JSON) is one error with one advice: iumask does not replace files it did not write."""
    problem = None
    try:
        previous = json.loads(Path(json_path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        problem = "not JSON"
    except OSError as exc:
        raise IumaskError(describe_os_error(exc, json_path, action="read")) from None
    else:
        if not isinstance(previous, dict) or not isinstance(previous.get("results"), list):
            problem = "JSON without a list of results"
        elif not all(isinstance(r, dict) and isinstance(r.get("classes"), list) for r in previous["results"]):
            problem = "its results are not iumask results"
    if problem:
        raise IumaskError(f"{json_path}: not an iumask results file ({problem}), so it is not replaced; choose "
                          "another --output, or delete the file if it is yours to discard")
    return previous


def images_path(json_path: Path) -> Path:
    """The images file beside a results file: ``results.json`` → ``results.images.npz``."""
    return json_path.with_suffix(".images.npz")


def write_results(results: list[dict], json_path: Path, identity: dict | None = None) -> Path:
    """Results as JSON and, beside it, a CSV with one row per model (both written atomically) and,
    when every entry has its per-image counts (:class:`EvaluationResult`), the images file
    (:func:`images_path`, written first; the JSON records its SHA-256, so a file that does not
    belong to the JSON is never read as its counts)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    counts = [getattr(r, "image_counts", None) for r in results]
    images = None
    if results and all(c is not None for c in counts):
        arrays = {f"{name}_{i}": c[name] for i, c in enumerate(counts) for name in (*IMAGE_COUNTS, "images")}
        buffer = io.BytesIO()
        np.savez_compressed(buffer, models=np.int64(len(counts)), **arrays)
        data = buffer.getvalue()
        with atomic_write(images_path(json_path)) as tmp:
            tmp.write_bytes(data)
        images = {"file": images_path(json_path).name, "sha256": hashlib.sha256(data).hexdigest()}
    write_json_atomic(json_path, {"identity": identity, "results": results, "images": images})
    csv_path = json_path.with_suffix(".csv")
    classes = results[0]["classes"] if results else []
    # ``label`` is distinct per row; model path, data, split, resolution and inference make it unique.
    header = ["label", "model", *RESULT_KEY, *[f"iou_{c}" for c in classes], "miou", "pixel_accuracy", "pavpu",
              "p_accurate_given_certain", "p_uncertain_given_inaccurate", "pavpu_threshold", "ece", "brier", "nll",
              *NEWER_METRICS]
    with atomic_write(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        for label, r in zip(result_labels(results), results):
            keys = ("" if r.get(k) is None else r[k] for k in RESULT_KEY)
            row = [label, r["model"], *keys, *r["iou"], r["miou"], r["pixel_accuracy"], r["pavpu"],
                   r["p_accurate_given_certain"], r["p_uncertain_given_inaccurate"], r["pavpu_threshold"],
                   # NaN for entries merged from a results file written before these existed
                   *(r.get(k, float("nan")) for k in ("ece", "brier", "nll", *NEWER_METRICS))]
            writer.writerow([f"{v:.6f}" if isinstance(v, float) else "nan" if v is None else str(v) for v in row])
    return csv_path


def read_image_counts(json_path: Path) -> list[dict[str, np.ndarray]] | None:
    """The per-image counts of the results in ``json_path``, one dict per entry of its "results" list
    in that order: ``"intersection"``, ``"union"`` and ``"label_pixels"`` (int64, (images, classes):
    per class TP, TP + FP + FN and TP + FN over the image's valid pixels at the scoring resolution;
    summed over images they give the results' dataset-level IoU) and ``"images"`` (the images' names,
    in the split's order). None when the file has no images file, or one that is missing or not the
    one the JSON was written with."""
    json_path = Path(json_path)
    try:
        recorded = json.loads(json_path.read_text()).get("images")
        if not isinstance(recorded, dict):
            return None
        data = images_path(json_path).read_bytes()
    except (OSError, ValueError, AttributeError):  # no file, not JSON, or not a results file
        return None
    if hashlib.sha256(data).hexdigest() != recorded.get("sha256"):
        return None
    with np.load(io.BytesIO(data), allow_pickle=False) as stored:
        return [{name: stored[f"{name}_{i}"] for name in (*IMAGE_COUNTS, "images")}
                for i in range(int(stored["models"]))]


def evaluate_into(models: list[Model], data: DataConfig, options: EvalConfig, output: Path, device: str = "auto",
                  on_results: Callable[[list[dict]], None] = lambda results: None) -> tuple[list[dict], int, int]:
    """``iumask evaluate``: :func:`evaluate` ``models`` and merge their results into ``output`` (and
    the CSV and images file beside it) under the folder's lock, so evaluates into one file keep each
    other's entries. A foreign or read-only ``output``, or one over other classes, is refused before
    any work; its folder is created once the models and data are checked. ``on_results`` sees the
    results before they are written (shown even if the file then cannot be). Returns the results
    and the number of earlier entries kept and replaced; under torchrun the ranks share the images
    and rank 0 writes (the others return their results with nothing kept or replaced)."""
    merge_results(output, [], classes=list(data.open(options.split).classes.names))
    results = evaluate(models, data, options, device, before_work=lambda: check_writable(output.parent),
                       across_ranks=True)
    if not distributed.is_main():
        return results, 0, 0
    on_results(results)
    with folder_lock(output.parent):
        merged, kept, replaced = merge_results(output, results)
        write_results(merged, output)
    return results, kept, replaced


def cached_evaluate(models: list[Model], data: DataConfig, options: EvalConfig, json_path: Path,
                    device: str = "auto", across_ranks: bool = False) -> list[dict]:
    """:func:`evaluate`, skipped when ``json_path`` holds results for the same weights, data and options
    (and its images file, :func:`read_image_counts`).

    ``across_ranks``: under torchrun every rank calls this and shares the images (rank 0's view of the
    cache decides for all, rank 0 writes), so no rank waits in a collective while another evaluates
    alone, however long the evaluation takes."""
    models = [require_model(model) for model in models]
    options = resolve_amp(options, resolve_device(device))  # the identity records the precision actually used
    identity = evaluation_identity(models, data, options)
    previous = cached_results(json_path, identity) if distributed.is_main() else None
    if across_ranks and distributed.is_distributed():
        previous = distributed.all_gather_object(previous)[0]
    if previous is not None:
        print_cache_hit(json_path)
        return previous
    results = evaluate(models, data, options, device, across_ranks=across_ranks)
    if distributed.is_main():
        write_results(results, json_path, identity)
    return results


def evaluation_identity(models: list[Model], data: DataConfig, options: EvalConfig) -> dict:
    """What results of ``models`` on ``data`` with ``options`` depend on: the weights, the split's
    content and the options (not where the models are: a model moved elsewhere keeps its results)."""
    weights = [digest for model in models for digest in require_model(model).weights_sha256]
    return json_normal({"weights_sha256": weights, "data": data.open(options.split).fingerprint(),
                        "split": options.split, "metrics_version": METRICS_VERSION,
                        "options": {"format": data.format,
                                    "conditions": list(data.conditions) if data.conditions else None,
                                    "evaluation": options.identity()}})


def cached_results(json_path: Path, identity: dict) -> list[dict] | None:
    """The results in ``json_path`` if they were computed for ``identity`` and their images file is
    there and theirs (:func:`read_image_counts`), else None."""
    if json_path.is_file():
        previous = read_results_file(json_path)
        if isinstance(previous.get("identity"), dict) and same_identity(previous["identity"], identity):
            counts = read_image_counts(json_path)
            if counts is not None and len(counts) == len(previous["results"]):
                return previous["results"]
    return None
