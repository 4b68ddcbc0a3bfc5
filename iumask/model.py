"""The model object: a trained model or ensemble resolved once from a path (:class:`Model`).

Every stage takes a :class:`Model`, never a path: :meth:`Model.resolve` reads the ensemble manifest
and each member's manifest once and runs every check when the object is made (finished training,
weights matching their SHA-256, an ensemble naming the very members it was written with, one class
list, one training size). The object knows its one key (in results files, stores and predictions),
its classes, size and weight digests, and loads itself into an uncertainty source
(:meth:`Model.source`). Importing this module imports no torch: a stage can decide a cache hit from
the model's manifests before it pays for torch, segmentation-models-pytorch and timm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from iumask.artifacts import (
    MANIFEST_FILE,
    cache_threshold,
    cached_threshold,
    check_ensemble_members,
    checked_manifest,
    member_digests,
    model_key,
    model_size,
    resolve_model_files,
)
from iumask.data.folder import ClassInfo, PairedDataset, class_differences
from iumask.errors import IumaskError
from iumask.files import file_stamp


class ModelMember(NamedTuple):
    """One member of a :class:`Model`: its folder, its manifest (read and checked once) and the
    manifest file's :func:`~iumask.files.file_stamp` taken before it was read."""

    folder: Path
    manifest: dict
    stamp: tuple | None


@dataclass(frozen=True, eq=False)
class Model:
    """A trained model or ensemble, resolved once from a path (:meth:`resolve`): every stage takes
    this object, and nothing reads its manifests again.

    Made by :meth:`resolve`, which runs every check: each member finished training and its weights
    match their SHA-256, an ensemble.json names the very members it was written with, and all
    members share one class list and one training size. ``key`` is the model's one spelling
    (absolute: an ensemble's ensemble.json, a member's folder) in results files and stores.
    ``record`` is the manifest that caches the PAvPU threshold (the ensemble.json, or the member's
    manifest.json) as read from ``record_path``. The manifests are plain dicts: do not change them.
    """

    key: str
    members: tuple[ModelMember, ...]
    size: tuple[int, int] | None  # the (H, W) the members were trained at (None: native sizes)
    record_path: Path
    record: dict = field(repr=False)
    record_stamp: tuple | None = field(repr=False, default=None)

    @classmethod
    def resolve(cls, path: str | os.PathLike) -> "Model":
        """The model at ``path`` (a model folder, its manifest.json, a folder with an ensemble.json
        or an ensemble manifest), checked; reads the ensemble manifest and each member's manifest once."""
        files = resolve_model_files(Path(path))
        if not files.folders:
            raise IumaskError(f"{path}: this ensemble names no members; rerun the train command that made it")
        members = tuple(ModelMember(folder, *_checked_stamped(folder)) for folder in files.folders)
        manifests = [member.manifest for member in members]
        if files.ensemble is not None:
            check_ensemble_members(files.ensemble_path, files.ensemble, manifests)
        if len({tuple(m["classes"]["names"]) for m in manifests}) > 1:
            raise IumaskError(f"{path}: members were trained on different classes; build the ensemble from "
                              "models of one dataset")
        model = cls(model_key(path), members, model_size(manifests, path), members[0].folder / MANIFEST_FILE,
                    members[0].manifest, members[0].stamp)
        if files.ensemble is None:
            return model
        return replace(model, record_path=files.ensemble_path, record=files.ensemble, record_stamp=files.ensemble_stamp)

    def member_models(self) -> list["Model"]:
        """Each member as a model of its own (from the manifests already read: nothing is read)."""
        return [Model(model_key(m.folder), (m,), self.size, m.folder / MANIFEST_FILE, m.manifest, m.stamp)
                for m in self.members]

    @property
    def manifests(self) -> list[dict]:
        return [member.manifest for member in self.members]

    @property
    def classes(self) -> ClassInfo:
        return ClassInfo.from_dict(self.members[0].manifest["classes"], source=self.key)

    @property
    def weights_sha256(self) -> list[str]:
        """The members' weights SHA-256, in member order (what an evaluation's identity records)."""
        return [member.manifest["weights_sha256"] for member in self.members]

    def member_sha256(self) -> dict[str, str]:
        """Each member's weights SHA-256 by name (what a mask store records of its source)."""
        return member_digests(self.manifests)

    def check_classes(self, folder: PairedDataset) -> None:
        """Refuse a dataset whose class names or order differ from the model's."""
        model_names = list(self.members[0].manifest["classes"]["names"])
        if model_names != list(folder.classes.names):
            raise IumaskError(
                f"{folder.root}: the dataset's classes differ from those of {self.key} "
                f"({class_differences(list(folder.classes.names), model_names)}); use a dataset with the same "
                "class names and order"
            )

    def source(self, kind: str = "ensemble", device="cpu", passes: int = 8, seed: int = 0):
        """The model loaded into an :class:`~iumask.inference.UncertaintySource` (``kind``:
        ``ensemble``, or ``mc-dropout``, which takes exactly one member, ``passes`` passes). On CUDA
        the models are channels-last. Imports torch (nothing else here does)."""
        from iumask.inference import load_uncertainty_source

        self.check_source(kind)
        return load_uncertainty_source([(m.folder, m.manifest) for m in self.members], kind, device, passes, seed,
                                       Path(self.key), self.size)

    def check_source(self, kind: str) -> None:
        """Refuse an uncertainty source this model cannot be (before anything is loaded or written)."""
        if kind not in ("ensemble", "mc-dropout"):
            raise IumaskError(f"--source must be ensemble or mc-dropout, got {kind!r}")
        if kind == "mc-dropout" and len(self.members) != 1:
            raise IumaskError(f"{self.key}: --source mc-dropout takes one model, this names {len(self.members)}; "
                              "give one member's folder")

    def cached_threshold(self) -> float | None:
        """The cached PAvPU threshold if it was computed with these members' weights, else None."""
        return cached_threshold(self.record, self.weights_sha256)

    def cache_threshold(self, value: float) -> None:
        """Cache the PAvPU threshold ``value`` (computed with these members' weights) in ``record_path``."""
        cache_threshold(self.record_path, self.record, self.record_stamp, self.weights_sha256, value)


def _checked_stamped(folder: Path) -> tuple[dict, tuple | None]:
    """A member's checked manifest and the stamp of its file, taken before reading it."""
    try:
        stamp = file_stamp(folder / MANIFEST_FILE)
    except OSError:
        stamp = None  # checked_manifest says what is wrong
    return checked_manifest(folder), stamp


def require_model(model: Model) -> Model:
    """``model``, refusing anything else: stages take models resolved once (:meth:`Model.resolve`),
    never a path that each would resolve again."""
    if not isinstance(model, Model):
        raise TypeError(f"a stage takes a Model, not {type(model).__name__} {model!r}: pass "
                        "iumask.model.Model.resolve(path)")
    return model


def load_source(model_path: Path, kind: str = "ensemble", device="cpu", passes: int = 8, seed: int = 0):
    """An uncertainty source from a model folder or an ensemble manifest: ``Model.resolve(path).source(...)``."""
    return Model.resolve(model_path).source(kind, device, passes, seed)
