"""Inference: where the class probabilities p̄ come from, and the maps every stage makes of them.

The one interface make-masks, evaluate, predict and training's TensorBoard images and online masks
use; it does not import the training engine (device and precision helpers: :mod:`iumask.device`).

An :class:`UncertaintySource` returns the mean class probabilities of a batch of images, at the
images' resolution, from several stochastic or independent predictions (docs/method.md §1):

* :class:`EnsembleSource`: the equal-weight mean softmax of k trained members (the paper's method);
* :class:`MCDropoutSource`: one trained model run T times with its dropout active and BatchNorm
  in eval mode (MC dropout, the pixel-wise uncertainty the paper compares against). It needs no
  ensemble: one trained model makes IU masks, at T forward passes per image.

The maps of p̄ are made in one place: :func:`pixel_maps` (on p̄'s device: the pixel entropy and the
predicted class ids) and :class:`InstanceUncertainty` (the IU of one image or a batch, with the
instances of the prediction or of the labels, at a connectivity): the numerical core's functions
with the choices of a run applied the same way everywhere.

Both sources share the handling of image sizes: a model trained at a reduced size sees either the image
resized to that size (logits upsampled back, ``inference="resize"``) or windows of that size slid
over the full image (``"slide"``). Online training averages its members' training-mode softmax
with the same rule (:func:`iumask.core.mean_softmax`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from iumask.artifacts import check_ensemble_members, checked_manifest, resolve_models
from iumask.core import instance_uncertainty, instance_uncertainty_batch, mean_softmax, pixel_entropy, top_class
from iumask.data.folder import PairedDataset, class_differences
from iumask.errors import IumaskError
from iumask.models import load_member, predict_logits
from iumask.transfer import class_id_dtype

INFERENCE_MODES = ("resize", "slide")
DROPOUT_LAYERS = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout)


class UncertaintySource:
    """Mean class probabilities of image batches from one or several trained models.

    ``manifests`` are the models' manifests (empty for models of your own), ``size`` the (H, W)
    they were trained at (None: they run on the images as they are).
    """

    kind = "abstract"

    def __init__(self, models: list[torch.nn.Module], manifests: list[dict] = (), path: Path | str = ".",
                 size: tuple[int, int] | None = None):
        self.models, self.manifests, self.path = list(models), list(manifests), Path(path)
        self.size = tuple(size) if size else None

    def passes(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The logits whose softmax are averaged (one per member, or one per stochastic pass)."""
        raise NotImplementedError

    @torch.no_grad()
    def probs(self, images: torch.Tensor, inference: str = "resize", seed: int = 0) -> torch.Tensor:
        """p̄ (B, C, H, W) at the images' resolution (see the module docstring for ``inference``);
        ``seed`` makes a stochastic source's draws reproducible (ignored by deterministic ones)."""
        if inference not in INFERENCE_MODES:
            raise IumaskError(f"--inference must be one of {', '.join(INFERENCE_MODES)}, got {inference!r}")
        if images.is_cuda:  # cuDNN's convolutions are faster in NHWC, above all under autocast
            images = images.contiguous(memory_format=torch.channels_last)
        size = tuple(images.shape[-2:])
        if self.size is None or tuple(self.size) == size:
            return mean_softmax(self.passes(images))
        if inference == "slide":
            return self._sliding_probs(images, tuple(self.size))
        small = F.interpolate(images, size=tuple(self.size), mode="bilinear", align_corners=False)
        return mean_softmax([F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
                             for logits in self.passes(small)])

    def _sliding_probs(self, images: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
        h, w = images.shape[-2:]
        total = count = None
        for y in window_starts(h, window[0]):
            for x in window_starts(w, window[1]):
                crop = images[..., y:y + window[0], x:x + window[1]]
                probs = mean_softmax(self.passes(crop))
                if total is None:
                    total = images.new_zeros((images.shape[0], probs.shape[1], h, w))
                    count = images.new_zeros((1, 1, h, w))
                total[..., y:y + crop.shape[-2], x:x + crop.shape[-1]] += probs
                count[..., y:y + crop.shape[-2], x:x + crop.shape[-1]] += 1
        return total / count

    def member_sha256(self) -> dict[str, str]:
        """Each model's weights SHA-256 by name (what a mask store records of its source)."""
        return {m.get("name", m["encoder"]): m["weights_sha256"] for m in self.manifests}


class EnsembleSource(UncertaintySource):
    """The members' equal-weight mean softmax; members run in eval mode."""

    kind = "ensemble"

    def passes(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [predict_logits(model, images) for model in self.models]


class MCDropoutSource(UncertaintySource):
    """One model, ``passes`` forward passes with dropout active (BatchNorm stays in eval mode).

    Each :meth:`probs` call draws its dropout masks from the global RNG seeded with
    ``self.seed + seed`` inside a forked RNG state (the caller's random state is untouched), so the
    same batch with the same ``seed`` gives the same p̄.
    """

    kind = "mc-dropout"

    def __init__(self, model: torch.nn.Module, manifest: dict, path: Path, size: tuple[int, int] | None = None,
                 passes: int = 8, seed: int = 0):
        super().__init__([model], [manifest], path, size)
        if passes < 2:
            raise IumaskError(f"--passes must be at least 2 for MC dropout, got {passes}")
        self.num_passes, self.seed = passes, seed
        self.dropout = [m for m in model.modules() if isinstance(m, DROPOUT_LAYERS) and m.p > 0]
        if not self.dropout:
            raise IumaskError(f"{path}: this model ({type(model).__name__}) has no dropout layer, so MC dropout "
                              "would repeat one prediction; use --source ensemble, or a model with dropout (e.g. "
                              "--arch deeplabv3plus or fpn)")

    def passes(self, images: torch.Tensor) -> list[torch.Tensor]:
        model = self.models[0]
        model.eval()
        for layer in self.dropout:
            layer.train()  # only dropout is stochastic; BatchNorm keeps its running statistics
        try:
            return [predict_logits(model, images) for _ in range(self.num_passes)]
        finally:
            model.eval()

    @torch.no_grad()
    def probs(self, images: torch.Tensor, inference: str = "resize", seed: int = 0) -> torch.Tensor:
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + seed)
            return super().probs(images, inference)


def window_starts(length: int, window: int) -> list[int]:
    """Sliding-window starts along one side: stride ⌊2·window/3⌋ (overlap 1/3), last window flush."""
    if length <= window:
        return [0]
    stride = max(1, (2 * window) // 3)
    starts = list(range(0, length - window, stride))
    return starts + [length - window]


# ----------------------------------------------------------------------------- maps of p̄


class PixelMaps(NamedTuple):
    """The per-pixel maps of a batch's p̄ (B, C, H, W), on p̄'s device."""

    entropy: torch.Tensor  # (B, H, W) float32, natural log (÷ ln C when normalised)
    prediction: torch.Tensor  # (B, H, W) argmax class ids in the narrowest dtype (transfer.class_id_dtype)


def pixel_maps(probs: torch.Tensor, normalize: bool = False) -> PixelMaps:
    """Entropy (float32 whatever precision p̄ was computed in) and predicted class of every pixel."""
    probs = probs.float()
    return PixelMaps(pixel_entropy(probs, normalize=normalize), top_class(probs).to(class_id_dtype(probs.shape[1])))


@dataclass(frozen=True)
class InstanceUncertainty:
    """How a run turns pixel entropy into IU (docs/method.md §3): instances are the connected
    components (``connectivity`` 4 or 8) of each class in the prediction or in the labels
    (``instances_from``); ``ignore_index`` pixels join no instance and get IU 0."""

    num_classes: int
    ignore_index: int
    connectivity: int = 8
    instances_from: str = "prediction"

    def _instances(self, prediction, label):
        if self.instances_from == "prediction":
            return prediction
        if label is None:
            raise ValueError("instances_from='label' needs the labels")
        return label

    def image(self, prediction: np.ndarray, entropy: np.ndarray, label: np.ndarray | None = None) -> np.ndarray:
        """The (H, W) float32 IU map of one image (host arrays)."""
        return instance_uncertainty(self._instances(prediction, label), entropy, self.num_classes,
                                    self.connectivity, self.ignore_index)

    def batch(self, maps: PixelMaps, label: torch.Tensor | None = None, valid: torch.Tensor | None = None,
              map_fn=map) -> torch.Tensor:
        """The (B, H, W) float32 IU maps of a batch, on the entropy's device. ``valid`` (bool) is
        False on pixels outside the image (augmentation padding): they join no instance.
        ``map_fn`` spreads the images over threads (the result is the same)."""
        instances = self._instances(maps.prediction, label)
        if valid is not None:
            instances = instances.long().masked_fill(~valid.to(instances.device), self.ignore_index)
        return instance_uncertainty_batch(instances, maps.entropy, self.num_classes, self.connectivity,
                                          self.ignore_index, map_fn)


# ----------------------------------------------------------------------------- loading


def model_size(manifests: list[dict], path: Path) -> tuple[int, int] | None:
    """The (H, W) all ``manifests``' models were trained at (None: native sizes)."""
    sizes = {tuple(m["image_size"]) if m.get("image_size") else None for m in manifests}
    if len(sizes) > 1:
        raise IumaskError(f"{path}: members were trained at different sizes {sorted(map(str, sizes))}; "
                          "use members of one size")
    return sizes.pop()


def check_models(model_path: Path, folder: PairedDataset | None = None) -> list[dict]:
    """The manifests of a model or ensemble, checked without loading it: finished, weights present
    and matching their SHA-256, one class list (that of ``folder`` when given), one size."""
    return check_consistent([checked_manifest(member) for member in resolve_models(model_path)], model_path, folder)


def check_consistent(manifests: list[dict], model_path: Path, folder: PairedDataset | None = None) -> list[dict]:
    """Members of one class list (that of ``folder`` when given) and one training size, and (for an
    ensemble.json) the very members it was written with."""
    check_ensemble_members(model_path, manifests)
    if len({tuple(m["classes"]["names"]) for m in manifests}) > 1:
        raise IumaskError(f"{model_path}: members were trained on different classes; build the ensemble from "
                          "models of one dataset")
    if folder is not None:
        model_names = list(manifests[0]["classes"]["names"])
        if model_names != list(folder.classes.names):
            raise IumaskError(
                f"{folder.root}: the dataset's classes differ from those of {model_path} "
                f"({class_differences(list(folder.classes.names), model_names)}); use a dataset with the same "
                "class names and order"
            )
    model_size(manifests, model_path)
    return manifests


def load_source(model_path: Path, kind: str = "ensemble", device: torch.device | str = "cpu", passes: int = 8,
                seed: int = 0) -> UncertaintySource:
    """An uncertainty source from a model folder or an ensemble manifest (``kind``: ``ensemble``
    or ``mc-dropout``, which takes exactly one model). On CUDA the models are channels-last."""
    folders = resolve_models(model_path)
    source = _load_source(folders, model_path, kind, device, passes, seed)
    if torch.device(device).type == "cuda":
        source.models = [model.to(memory_format=torch.channels_last) for model in source.models]
    return source


def _load_source(folders: list[Path], model_path: Path, kind: str, device, passes: int,
                 seed: int) -> UncertaintySource:
    if kind == "mc-dropout":
        if len(folders) != 1:
            raise IumaskError(f"{model_path}: --source mc-dropout takes one model, this names {len(folders)}; "
                              "give one member's folder")
        model, manifest = load_member(folders[0], device)
        return MCDropoutSource(model, manifest, model_path, model_size([manifest], model_path), passes, seed)
    if kind != "ensemble":
        raise IumaskError(f"--source must be ensemble or mc-dropout, got {kind!r}")
    loaded = [load_member(folder, device) for folder in folders]  # checks each one's weights SHA-256
    manifests = check_consistent([manifest for _, manifest in loaded], model_path)
    return EnsembleSource([model for model, _ in loaded], manifests, model_path, model_size(manifests, model_path))


def ensemble_probs(models: list[torch.nn.Module], images: torch.Tensor, model_size: tuple[int, int] | None = None,
                   mode: str = "resize") -> torch.Tensor:
    """p̄ of ``models`` (in eval mode) trained at ``model_size``: :class:`EnsembleSource` for
    models already in memory (e.g. your own)."""
    return EnsembleSource(models, size=model_size).probs(images, mode)
