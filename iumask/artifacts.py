"""Artifacts: what iumask builds and how it decides to build, reuse or resume one, and the model
folders themselves.

Every artifact records an *identity*: everything its content depends on (the inputs' content
digests and the options), compared before any work in one normal form (:func:`comparable_identity`).
One decision, :func:`reuse_decision`, says what to do with what is there (:class:`Reuse`): nothing
there: build it; the same identity and a finished artifact: a cache hit; the same identity and an
unfinished one: resume it; another identity: refused with the differences listed
(:func:`require_same_inputs`) unless ``--overwrite`` is given, and even then the old artifact is
replaced only once the new one is complete. Member folders (:func:`member_reuse`), checkpoints
(:meth:`iumask.engine.Checkpoint.resume`) and mask stores (:meth:`iumask.store.MaskStore.open_or_create`)
decide with it; results files are merged instead (an entry per model, data and options,
:mod:`iumask.stages.evaluate`) and the statistics cache is keyed by the identity's digest, so
neither can be overwritten by other inputs.

A member is a folder holding ``model.safetensors`` and ``manifest.json`` (architecture, encoder,
classes, normalisation, image size, the inputs it was trained from, history, and the weights'
SHA-256). An ensemble is an ``ensemble.json`` naming member folders beside it. Files are written
with :mod:`iumask.files`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

from iumask.errors import IumaskError
from iumask.files import file_sha256, file_stamp, json_normal, read_json, write_json_atomic

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
ENSEMBLE_FILE = "ensemble.json"
CHECKPOINT_FILE = "checkpoint.pt"
# The cached PAvPU threshold and the members' weights it was computed with: retrained members
# (other weights) never inherit the old value.
THRESHOLD_KEYS = ("train_mean_entropy", "train_mean_entropy_weights_sha256")


def model_key(model_path: str | os.PathLike) -> str:
    """One spelling per model: an ensemble's ensemble.json, a member's folder (absolute)."""
    path = Path(model_path).resolve()
    if path.is_dir() and (path / ENSEMBLE_FILE).is_file():
        return str(path / ENSEMBLE_FILE)
    if path.is_file() and path.name == MANIFEST_FILE:
        return str(path.parent)
    return str(path)



def weights_problem(folder: Path, manifest: dict) -> str | None:
    """Why the weights in ``folder`` cannot be used with ``manifest`` (missing, or another SHA-256
    than recorded: corrupt, truncated or replaced), or None when they match."""
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        return "weights file missing"
    recorded = manifest.get("weights_sha256")
    if recorded is None:
        return "manifest records no weights_sha256"
    if file_sha256(weights) != recorded:
        return "weights file does not match the SHA-256 in its manifest (corrupt, truncated or replaced)"
    return None


def checked_manifest(folder: Path) -> dict:
    """A member's manifest, after checking that it finished training and that its weights are the
    ones it recorded (so a corrupt or replaced file is found before any work starts)."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST_FILE, "model manifest")
    if not manifest.get("complete"):
        raise IumaskError(f"{folder}: training of this model did not finish; rerun its train command to resume")
    check_weights(folder, manifest)
    return manifest


def check_weights(folder: Path, manifest: dict) -> None:
    """Refuse weights in ``folder`` that are not the ones ``manifest`` recorded (:func:`weights_problem`;
    the SHA-256 of an unchanged file is computed once per process)."""
    problem = weights_problem(folder, manifest)
    if problem:
        raise IumaskError(f"{Path(folder) / WEIGHTS_FILE}: {problem}; rerun the train command that made it with "
                          "the same options (it retrains this member)")


class ModelFiles(NamedTuple):
    """What a model path names: for an ensemble its manifest's path, content and
    :func:`~iumask.files.file_stamp` (taken before it was read), None for one member; the member folders."""

    ensemble_path: Path | None
    ensemble: dict | None
    ensemble_stamp: tuple | None
    folders: list[Path]


def resolve_model_files(path: Path) -> ModelFiles:
    """A model folder, a member manifest, or an ensemble manifest → :class:`ModelFiles` (the
    ensemble manifest read once)."""
    path = Path(path)
    if path.is_dir() and (path / ENSEMBLE_FILE).is_file():
        path = path / ENSEMBLE_FILE
    if path.is_file() and path.name == MANIFEST_FILE:
        return ModelFiles(None, None, None, [path.parent])
    if path.is_dir() and (path / MANIFEST_FILE).is_file():
        return ModelFiles(None, None, None, [path])
    if path.is_file():
        stamp = file_stamp(path)
        ensemble = read_json(path, "ensemble manifest")
        if "members" not in ensemble:
            raise IumaskError(f"{path}: not an ensemble manifest (no 'members'); give an ensemble.json or a "
                              "model folder")
        return ModelFiles(path, ensemble, stamp, [(path.parent / m).resolve() for m in ensemble["members"]])
    if not path.exists():
        raise IumaskError(f"{path}: no model here (no such file or folder); train one first (iumask "
                          "train-baseline --out FOLDER) or give a model folder, its manifest.json or an ensemble.json")
    raise IumaskError(f"{path}: no model here; give a model folder, its manifest.json or an ensemble.json")


# Training options that manifests and checkpoints of earlier versions recorded in their identity,
# since found not to change the result (iumask.config.RUNTIME_OPTIONS): ignored when comparing.
RETIRED_TRAIN_OPTIONS = ("num_workers",)


def comparable_identity(stored: dict) -> dict:
    """An identity in the one form identities are compared in: as stored in JSON
    (:func:`~iumask.files.json_normal`), without the training options that no longer count (an
    artifact made with ``--workers 0`` by an earlier version stays a cache hit and resumes)."""
    stored = json_normal(stored)
    options = stored.get("train_options")
    if not isinstance(options, dict) or not any(k in options for k in RETIRED_TRAIN_OPTIONS):
        return stored
    return dict(stored, train_options={k: v for k, v in options.items() if k not in RETIRED_TRAIN_OPTIONS})


def identity_differences(stored: dict, given: dict) -> list[str]:
    """How a recorded identity differs from this run's: one short phrase per differing entry, with
    nested keys dotted (``train_options.lr: stored 0.001, given 0.01``); empty when they are equal.
    Training options retired from identities (:data:`RETIRED_TRAIN_OPTIONS`) do not count."""
    stored, given = comparable_identity(stored), comparable_identity(given)
    missing = object()
    out: list[str] = []
    for key in sorted(set(stored) | set(given)):
        out += _describe(key, stored.get(key, missing), given.get(key, missing), missing)
    return out


def require_same_inputs(stored: dict, given: dict, what: str, fix: str,
                        error: type[IumaskError] = IumaskError) -> None:
    """The one refusal of every artifact made from other inputs: ``<what> was made from other inputs
    (<differences>); <fix>``, raised as ``error``."""
    differences = identity_differences(stored, given)
    if differences:
        raise error(f"{what} was made from other inputs ({'; '.join(differences)}); {fix}")


def same_identity(stored: dict, given: dict) -> bool:
    """Whether a recorded identity is this run's (compared in :func:`comparable_identity`'s form)."""
    return comparable_identity(stored) == comparable_identity(given)


@dataclass(frozen=True)
class StoreAdvice:
    """What a mask store's messages (:mod:`iumask.store`) tell the user to do. The store speaks the
    Python API's words by default; a command passes its own (make-masks names its store option,
    predict and ``run`` their output folder: :data:`iumask.config.MAKE_MASKS_ADVICE`), so no
    command's option name is written in the store. Here, not in the store, so that the commands'
    configuration names it without importing zarr."""

    other_path: str = "use another path"  # a path the store cannot be written to
    overwrite: str = "pass overwrite=True to recompute it"  # a store made from other inputs is there
    remake: str = "make it again with overwrite=True (or at another path)"  # unreadable
    missing: str = "make it first or fix the path"  # nothing there


class State(Enum):
    """How far an artifact got, from its files alone (what a plan shows; whether it is reused is
    :func:`reuse_decision`'s, which also compares the identity)."""

    MISSING = "missing"
    PARTIAL = "partial"  # begun: a rerun resumes it
    DONE = "done"


class Progress(NamedTuple):
    """An artifact's :class:`State` and how many of its parts (members, images) are done."""

    state: State
    done: int
    total: int


def ensemble_progress(folder: Path, names: list[str]) -> Progress:
    """A training's progress in ``folder``: done once its ensemble.json is written; partial while a
    checkpoint (the group's in ``folder``, or a member's) or a finished member is there."""
    if (folder / ENSEMBLE_FILE).is_file():
        return Progress(State.DONE, len(names), len(names))
    done = sum((folder / name / MANIFEST_FILE).is_file() for name in names)
    begun = done or (folder / CHECKPOINT_FILE).is_file() or any((folder / n / CHECKPOINT_FILE).is_file() for n in names)
    return Progress(State.PARTIAL if begun else State.MISSING, done, len(names))


class Reuse(Enum):
    """What to do with the artifact that is there (:func:`reuse_decision`)."""

    HIT = "hit"  # finished, made from these inputs: used as it is
    RESUME = "resume"  # unfinished, made from these inputs: continued where it stopped
    FRESH = "fresh"  # nothing usable there: built
    REPLACE = "replace"  # made from other inputs, --overwrite: built anew; the old one stays until then


def reuse_decision(stored: dict | None, given: dict, finished: bool, overwrite: bool, what: str, fix: str,
                   error: type[IumaskError] = IumaskError) -> Reuse:
    """The one reuse decision of every artifact. ``stored``: the identity it records (None: nothing
    there); ``finished``: whether it is complete. The same inputs: a cache hit when finished, else
    resumed, with or without ``overwrite`` (which replaces artifacts of *other* inputs only); other
    inputs: replaced with ``overwrite``, else the one refusal (:func:`require_same_inputs`:
    ``<what> was made from other inputs (...); <fix>``)."""
    if stored is None:
        return Reuse.FRESH
    if same_identity(stored, given):
        return Reuse.HIT if finished else Reuse.RESUME
    if not overwrite:
        require_same_inputs(stored, given, what, fix, error)
    return Reuse.REPLACE


def _describe(key: str, stored: Any, given: Any, missing: object) -> list[str]:
    """Short human descriptions of how ``stored`` and ``given`` differ (empty if equal)."""
    if stored == given:
        return []
    if isinstance(stored, dict) and isinstance(given, dict):
        out = []
        for sub in sorted(set(stored) | set(given)):
            out += _describe(f"{key}.{sub}", stored.get(sub, missing), given.get(sub, missing), missing)
        return out
    text = [("none" if v is missing else json.dumps(v)) for v in (stored, given)]
    if max(len(t) for t in text) <= 40:
        return [f"{key}: stored {text[0]}, given {text[1]}"]
    if isinstance(stored, list) and isinstance(given, list):
        if len(stored) != len(given):
            return [f"{key} differ ({len(stored)} stored vs {len(given)} given)"]
        n = sum(a != b for a, b in zip(stored, given))
        return [f"{key} differ ({n} of {len(stored)} entries)"]
    return [f"{key} differs"]


def member_reuse(folder: Path, identity: dict, overwrite: bool, warn) -> Reuse:
    """What to do with the member in ``folder`` (:func:`reuse_decision`): HIT only when it is
    finished, made from ``identity`` and its weights match their SHA-256.

    Nothing is removed here: with ``overwrite`` the old member stays in place (and usable) until
    the finished new one replaces it (:func:`iumask.models.save_member`); where training resumes
    from is the checkpoint's own decision. ``warn(message)`` reports damaged weights."""
    manifest_path = folder / MANIFEST_FILE
    manifest = read_json(manifest_path, "model manifest") if manifest_path.is_file() else None
    stored = None if manifest is None else {k: manifest.get(k) for k in identity}
    finished = bool(manifest and manifest.get("complete"))
    if finished and same_identity(stored, identity):
        problem = weights_problem(folder, manifest)
        if problem is not None:
            # Same inputs, unusable weights: not finished, so trained again without --overwrite.
            warn(f"{folder}: {problem}; training this member again")
            finished = False
    return reuse_decision(stored, identity, finished, overwrite, f"the model in {folder}",
                          "pass --overwrite to replace it or choose another --out")


def members_weights(folder: Path, names: list[str]) -> list[str | None]:
    """The recorded weights SHA-256 of the members ``names`` in ``folder``."""
    return [read_json(folder / name / MANIFEST_FILE, "model manifest").get("weights_sha256") for name in names]


def write_ensemble(out: Path, manifest: dict) -> Path:
    """Write ``out/ensemble.json`` with its members' weights SHA-256 (``member_sha256``), keeping a
    cached PAvPU threshold only when it was computed for exactly these members' weights."""
    path = out / ENSEMBLE_FILE
    weights = members_weights(out, manifest["members"])
    manifest = dict(manifest, member_sha256=dict(zip(manifest["members"], weights)))
    if path.is_file():
        previous = read_json(path, "ensemble manifest")
        cached = {k: previous[k] for k in THRESHOLD_KEYS if k in previous}
        if len(cached) == len(THRESHOLD_KEYS) and cached[THRESHOLD_KEYS[1]] == weights:
            manifest = dict(manifest, **cached)
    write_json_atomic(path, manifest)
    return path


def check_ensemble_members(path: Path, ensemble: dict, manifests: list[dict]) -> None:
    """Refuse an ensemble (``ensemble``, the content of the ensemble manifest at ``path``) whose
    members' weights are no longer the ones it was written with: a retrain with --overwrite that was
    interrupted after replacing some members, or a member copied in from another run. (Ensembles
    written before iumask recorded ``member_sha256`` pass.)"""
    recorded = ensemble.get("member_sha256")
    if recorded is None:
        return
    changed = [name for name, manifest in zip(ensemble["members"], manifests)
               if recorded.get(name) != manifest.get("weights_sha256")]
    if changed:
        raise IumaskError(f"{path}: member(s) {', '.join(changed)} changed since this ensemble was written (an "
                          "interrupted --overwrite retrain, or a member copied in); rerun the train command that "
                          "made it to finish the ensemble")


def cached_threshold(record: dict, weights: list[str]) -> float | None:
    """The PAvPU threshold cached in ``record`` (a model's ensemble.json or member manifest.json, as
    read) if it was computed with exactly these members' ``weights``, else None."""
    if record.get(THRESHOLD_KEYS[0]) is not None and record.get(THRESHOLD_KEYS[1]) == weights:
        return float(record[THRESHOLD_KEYS[0]])
    return None


def cache_threshold(path: Path, record: dict, stamp: tuple | None, weights: list[str], value: float) -> None:
    """Cache a PAvPU threshold in the manifest at ``path``. ``record`` is its content as read when its
    file had ``stamp`` (:func:`iumask.files.file_stamp`, taken before reading; None: unknown); a file
    changed since is read again, so what another process wrote there is kept."""
    if file_stamp(path) != stamp:
        record = read_json(path, "model manifest")
    write_json_atomic(path, dict(record, **dict(zip(THRESHOLD_KEYS, (value, weights)))))


def member_digests(manifests: list[dict]) -> dict[str, str]:
    """Each manifest's weights SHA-256 by member name (the encoder for models without one)."""
    return {m.get("name", m["encoder"]): m["weights_sha256"] for m in manifests}


def model_size(manifests: list[dict], path: Path) -> tuple[int, int] | None:
    """The (H, W) all ``manifests``' models were trained at (None: native sizes)."""
    sizes = {tuple(m["image_size"]) if m.get("image_size") else None for m in manifests}
    if len(sizes) > 1:
        raise IumaskError(f"{path}: members were trained at different sizes {sorted(map(str, sizes))}; "
                          "use members of one size")
    return sizes.pop()
