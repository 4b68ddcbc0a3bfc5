"""The mask store: per training image, the ensemble's pixel entropy, the instance-uncertainty
(IU) mask and the argmax prediction, in a chunked, compressed zarr v3 directory store.

Layout (one group):

* ``entropy``, ``instance_uncertainty`` (float16) and ``prediction`` (uint8), shape
  (N, Hmax, Wmax), one chunk per image so an image is read or written without touching the
  others. An image of shape (H, W) sits in the top-left corner of its slot; reads crop it.
* ``complete`` (bool, shape (N,)), one chunk per image: set only after an image's three arrays
  are written, so an interrupted write reads as incomplete and is recomputed. Because every
  image owns its own chunk files, several processes (e.g. torch distributed ranks) may write
  disjoint sets of images into one store concurrently. Group attributes are one file, so only
  one process (rank 0) should call ``set_attrs``.
* Group attributes: the store's identity (``IDENTITY_KEYS``) plus free-form values set later
  (``mean_entropy``, ``num_complete``, ``finished``, ...).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from iumask.errors import IumaskError, StoreMismatchError

STORE_FORMAT_VERSION = 1
IDENTITY_KEYS = (
    "format_version",
    "image_ids",
    "image_shapes",
    "class_names",
    "options",
    "member_sha256",
    "dataset_fingerprint",
)
_FLOAT_ARRAYS = ("entropy", "instance_uncertainty")
_ARRAYS = (*_FLOAT_ARRAYS, "prediction", "complete")
# Byte shuffle groups the float16 high bytes (sign/exponent, which vary slowly) apart from the
# noisy low bytes; on smooth entropy fields it beat noshuffle and bitshuffle (about 1.1-1.2 vs
# 1.3-1.7 bytes/pixel). Shuffle is a no-op for 1-byte predictions, so they use noshuffle.
_FLOAT_CODEC = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
_BYTE_CODEC = BloscCodec(cname="zstd", clevel=5, shuffle="noshuffle")
_RECREATE_FIX = "rerun iumask make-masks with --overwrite (or use another --store path)"


def _to_json(value: Any) -> Any:
    """Normalise a value the way storing it as JSON would (tuples -> lists, numpy -> Python)."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, os.PathLike):
            return os.fspath(obj)
        raise TypeError(f"cannot store {type(obj).__name__} in mask store attributes")

    return json.loads(json.dumps(value, default=default))


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


def _looks_like_store(path: Path) -> bool:
    """True for a directory holding only a zarr group's files (even if corrupt) - safe to delete."""
    names = set(os.listdir(path))
    return "zarr.json" in names and names <= {"zarr.json", *_ARRAYS}


class MaskStore:
    """A mask store on disk. Build with ``create``, ``open`` or ``open_or_create``."""

    def __init__(self, path: Path, group: zarr.Group, mode: str):
        self.path = path
        self._group = group
        self._mode = mode
        self._arrays = {name: group[name] for name in _ARRAYS}
        attrs = dict(group.attrs)
        self.image_ids: list[str] = list(attrs["image_ids"])
        self.image_shapes: list[tuple[int, int]] = [(int(h), int(w)) for h, w in attrs["image_shapes"]]
        self._index = {image_id: i for i, image_id in enumerate(self.image_ids)}

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, path, identity: dict, overwrite: bool = False) -> "MaskStore":
        """Create an empty store (all images incomplete); ``format_version`` is added here."""
        path = Path(path)
        identity = _to_json(dict(identity))
        if identity.setdefault("format_version", STORE_FORMAT_VERSION) != STORE_FORMAT_VERSION:
            raise ValueError(f"format_version must be {STORE_FORMAT_VERSION}")
        missing = [k for k in IDENTITY_KEYS if k not in identity]
        if missing:
            raise ValueError(f"mask store identity lacks {', '.join(missing)}")
        ids, shapes = identity["image_ids"], identity["image_shapes"]
        if len(ids) != len(shapes) or len(set(ids)) != len(ids):
            raise ValueError("image_ids must be unique and match image_shapes one to one")
        if any(len(s) != 2 or min(s) < 1 for s in shapes):
            raise ValueError("image_shapes must be [H, W] pairs of positive integers")

        if path.exists() or path.is_symlink():
            if not overwrite:
                raise IumaskError(f"mask store {path} already exists; pass --overwrite to replace it or use another --store path")
            if not path.is_dir() or path.is_symlink():
                raise IumaskError(f"{path} is not a directory; remove it yourself or use another --store path")
            if os.listdir(path) and not _looks_like_store(path):
                raise IumaskError(
                    f"{path} is not a mask store (it holds other files), so --overwrite will not delete it; use another --store path"
                )
            shutil.rmtree(path)

        n = len(ids)
        hmax = max((h for h, _ in shapes), default=1)
        wmax = max((w for _, w in shapes), default=1)
        group = zarr.open_group(path, mode="w-", zarr_format=3, attributes=identity)
        for name in _FLOAT_ARRAYS:
            group.create_array(name, shape=(n, hmax, wmax), chunks=(1, hmax, wmax), dtype="float16",
                               compressors=_FLOAT_CODEC, fill_value=0)
        group.create_array("prediction", shape=(n, hmax, wmax), chunks=(1, hmax, wmax), dtype="uint8",
                           compressors=_BYTE_CODEC, fill_value=0)
        # Uncompressed: each flag chunk is a single byte on disk.
        group.create_array("complete", shape=(n,), chunks=(1,), dtype="bool", compressors=None, fill_value=False)
        return cls(path, group, "r+")

    @classmethod
    def open(cls, path, mode: str = "r") -> "MaskStore":
        """Open an existing store for reading (``"r"``) or resuming (``"r+"``)."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        path = Path(path)
        if not path.is_dir():
            raise IumaskError(f"mask store {path} does not exist; run iumask make-masks first or fix the --store path")
        try:
            group = zarr.open_group(path, mode=mode, zarr_format=3)
            attrs = dict(group.attrs)
            version = attrs.get("format_version")
            problem = None
            if version != STORE_FORMAT_VERSION:
                problem = f"has format_version {version}, expected {STORE_FORMAT_VERSION}"
            elif any(k not in attrs for k in IDENTITY_KEYS):
                problem = "lacks identity attributes"
            elif any(name not in group for name in _ARRAYS):
                problem = "lacks the mask arrays"
            else:
                store = cls(path, group, mode)
                if any(a.shape[0] != len(store.image_ids) for a in store._arrays.values()):
                    problem = "has arrays that do not match its image list"
        except Exception as exc:  # corrupt JSON, not a zarr group, unreadable files, ...
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            problem = f"is unreadable or not a mask store ({type(exc).__name__}: {reason})"
        if problem:
            raise IumaskError(f"mask store {path} {problem}; {_RECREATE_FIX}")
        return store

    @classmethod
    def open_or_create(cls, path, identity: dict, overwrite: bool = False) -> "MaskStore":
        """Resume a store made from the same identity, else create (or recreate with overwrite)."""
        path = Path(path)
        if not path.exists():
            return cls.create(path, identity)
        if overwrite:
            return cls.create(path, identity, overwrite=True)
        store = cls.open(path, mode="r+")
        store.check_identity({"format_version": STORE_FORMAT_VERSION, **identity})
        return store

    # ------------------------------------------------------------------ metadata
    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def attrs(self) -> dict:
        """A copy of all group attributes."""
        return _to_json(dict(self._group.attrs))

    @property
    def identity(self) -> dict:
        attrs = self.attrs
        return {k: attrs[k] for k in IDENTITY_KEYS}

    def set_attrs(self, **values) -> None:
        """Set free-form attributes (not identity keys). Call from one process only."""
        if self._mode == "r":
            raise ValueError(f"mask store {self.path} was opened read-only")
        clash = set(values) & set(IDENTITY_KEYS)
        if clash:
            raise ValueError(f"identity attributes cannot be changed: {', '.join(sorted(clash))}")
        self._group.attrs.update(_to_json(values))

    def check_identity(self, expected: dict, fix: str = "pass --overwrite to recompute it or use another --store path") -> None:
        """Raise StoreMismatchError if any key in ``expected`` differs from the stored value."""
        missing = object()
        stored, expected = self.attrs, _to_json(dict(expected))
        diffs = []
        for key in expected:
            diffs += _describe(key, stored.get(key, missing), expected[key], missing)
        if diffs:
            raise StoreMismatchError(
                f"mask store {self.path} was made from other inputs ({'; '.join(diffs)}); {fix}"
            )

    def index_of(self, image_id: str) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise IumaskError(
                f"image {image_id!r} is not in mask store {self.path}; {_RECREATE_FIX} for this dataset"
            ) from None

    # ------------------------------------------------------------------ data
    def write(self, index: int, entropy, instance_uncertainty, prediction) -> None:
        """Store one image's arrays, then mark it complete (so a crash leaves it incomplete)."""
        shape = self.image_shapes[index]
        values = {"entropy": entropy, "instance_uncertainty": instance_uncertainty, "prediction": prediction}
        for name, value in values.items():
            if np.shape(value) != shape:
                raise ValueError(f"{name} for image {index} has shape {np.shape(value)}, expected {shape}")
        pred = np.asarray(prediction)
        if pred.min() < 0 or pred.max() > 255:
            raise ValueError(f"prediction for image {index} has class ids outside 0..255")
        h, w = shape
        complete = self._arrays["complete"]
        complete[index] = False  # rewriting a finished image: invalid until all three are written
        for name in _FLOAT_ARRAYS:
            self._arrays[name][index, :h, :w] = np.asarray(values[name], dtype=np.float16)
        self._arrays["prediction"][index, :h, :w] = pred.astype(np.uint8)
        complete[index] = True

    def is_complete(self, index: int) -> bool:
        return bool(self._arrays["complete"][index])

    def completed(self) -> np.ndarray:
        """Completion flags of all images, bool (N,), read fresh from disk."""
        return np.asarray(self._arrays["complete"][:], dtype=bool)

    def _check_complete(self, index: int) -> None:
        if not self.is_complete(index):
            raise IumaskError(
                f"image {self.image_ids[index]!r} in mask store {self.path} is not complete; "
                "finish iumask make-masks (rerun it to resume)"
            )

    def read(self, index: int) -> dict:
        """``{"entropy", "instance_uncertainty"}`` as float32 and ``"prediction"`` as uint8, (H, W)."""
        self._check_complete(index)
        h, w = self.image_shapes[index]
        out = {name: self._arrays[name][index, :h, :w].astype(np.float32) for name in _FLOAT_ARRAYS}
        out["prediction"] = np.asarray(self._arrays["prediction"][index, :h, :w], dtype=np.uint8)
        return out

    def read_iu(self, index: int) -> np.ndarray:
        """The IU mask of one image, float32 (H, W)."""
        self._check_complete(index)
        h, w = self.image_shapes[index]
        return self._arrays["instance_uncertainty"][index, :h, :w].astype(np.float32)

    def nbytes_stored(self) -> int:
        """Bytes on disk of the chunk files (metadata excluded)."""
        return sum(
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(self.path)
            for name in names
            if name != "zarr.json"
        )

    def __repr__(self) -> str:
        return f"MaskStore({str(self.path)!r}, {self.num_images} images, mode={self._mode!r})"
