"""The mask store: per training image, the ensemble's pixel entropy, the instance-uncertainty
(IU) mask and the argmax prediction, in a chunked, compressed zarr v3 directory store.
:class:`MaskStore` opens a store, reads it, writes it image by image or shard by shard, and holds
its identity (the inputs it was made from). The rest of the store is in three modules of its own:

* :mod:`iumask.store_layout`: what a store is on disk (format versions, arrays, dtypes, shards,
  identity keys, which files are a store's), without reading or writing one;
* :mod:`iumask.store_lifecycle`: how a store comes to be (created staged beside its path under the
  writer lock, resumed, committed, swapped in over an old one), which :class:`MaskStore` extends;
* :mod:`iumask.store_writer`: buffered writes that write each shard once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from iumask.artifacts import StoreAdvice, require_same_inputs
from iumask.errors import IumaskError, StoreMismatchError
from iumask.files import LOCK_FILE, WriterLock, json_normal
from iumask.store_layout import (
    ARRAYS,
    FLOAT_ARRAYS,
    IDENTITY_KEYS,
    IMAGE_ARRAYS,
    PREDICTION_DTYPES,
    SHARDED_VERSIONS,
    content_identity,
    default_images_per_shard,
    layout_problem,
)
from iumask.store_lifecycle import StoreLifecycle
from iumask.store_writer import ShardWriter

# Byte shuffle groups the float16 high bytes (sign/exponent, which vary slowly) apart from the
# noisy low bytes; on smooth entropy fields it beat noshuffle and bitshuffle (about 1.1-1.2 vs
# 1.3-1.7 bytes/pixel). Shuffle is a no-op for 1-byte predictions, so they use noshuffle.
_FLOAT_CODEC = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
_BYTE_CODEC = BloscCodec(cname="zstd", clevel=5, shuffle="noshuffle")



class MaskStore(StoreLifecycle):
    """A mask store on disk. Build with ``create``, ``open`` or ``open_or_create``."""

    def __init__(self, path: Path, group: zarr.Group, mode: str):
        self._mode = mode
        self._bind(path, group)
        attrs = dict(group.attrs)
        self.image_ids: list[str] = list(attrs["image_ids"])
        self.image_shapes: list[tuple[int, int]] = [(int(h), int(w)) for h, w in attrs["image_shapes"]]
        self._index = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self._shard_locks: dict[int, threading.Lock] = {}  # this process's writers of one shard take turns
        self._shard_locks_lock = threading.Lock()
        self._locks: list[WriterLock] = []
        self._replaces: tuple[Path, WriterLock] | None = None  # (old store, its lock) that commit() replaces
        self.advice = StoreAdvice()  # what its messages tell the user to do (a command passes its own)

    def _bind(self, path: Path, group: zarr.Group | None = None) -> None:
        """Point at the store in ``path`` (after it was renamed there)."""
        self.path = Path(path)
        self._group = group if group is not None else zarr.open_group(self.path, mode=self._mode, zarr_format=3)
        self._arrays = {name: self._group[name] for name in ARRAYS}
        shards = self._arrays["entropy"].shards
        self.images_per_shard: int = shards[0] if shards else 1  # 1: unsharded (a file per image)
        self._directory = os.stat(self.path).st_ino  # renames keep it; a swapped-in store has another

    # ------------------------------------------------------------------ construction
    @classmethod
    def _new(cls, path: Path, identity: dict, images_per_shard: int | None) -> "MaskStore":
        """Write an empty store into the (locked, otherwise empty) folder ``path``."""
        shapes = identity["image_shapes"]
        n = len(shapes)
        hmax = max((h for h, _ in shapes), default=1)
        wmax = max((w for _, w in shapes), default=1)
        dtype = PREDICTION_DTYPES[identity["format_version"]]
        if images_per_shard is None:
            images_per_shard = default_images_per_shard(n, hmax, wmax, dtype.itemsize)
        per_shard = max(1, min(images_per_shard, n))
        attributes = identity
        if per_shard > 1:
            attributes = dict(identity, format_version=SHARDED_VERSIONS[identity["format_version"]])
        group = zarr.create_group(path, zarr_format=3, attributes=attributes)

        def shards(*inner: int) -> tuple[int, ...] | None:
            return (per_shard, *inner) if per_shard > 1 else None

        for name in FLOAT_ARRAYS:
            group.create_array(name, shape=(n, hmax, wmax), chunks=(1, hmax, wmax), shards=shards(hmax, wmax),
                               dtype="float16", compressors=_FLOAT_CODEC, fill_value=0)
        # 2-byte class ids: shuffle puts their high bytes (nearly all alike) together
        group.create_array("prediction", shape=(n, hmax, wmax), chunks=(1, hmax, wmax), shards=shards(hmax, wmax),
                           dtype=dtype, compressors=_BYTE_CODEC if dtype.itemsize == 1 else _FLOAT_CODEC,
                           fill_value=0)
        # Uncompressed bytes, one chunk per shard (written whole with it) or per image (unsharded):
        # a sharded store's flags are read from one small file per shard, not as N inner chunks.
        group.create_array("complete", shape=(n,), chunks=(per_shard,), dtype="bool", compressors=None,
                           fill_value=False)
        return cls(path, group, "r+")

    @classmethod
    def open(cls, path, mode: str = "r", advice: StoreAdvice = StoreAdvice()) -> "MaskStore":
        """Open an existing store for reading (``"r"``) or resuming (``"r+"``), without the writer
        lock (for readers, and the ranks of a job whose rank 0 holds it). ``advice``: see :meth:`create`."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        path = Path(path)
        if not path.is_dir():
            raise IumaskError(f"mask store {path} does not exist; {advice.missing}")
        try:
            group = zarr.open_group(path, mode=mode, zarr_format=3)
            problem = layout_problem(group)
            if problem is None:
                store = cls(path, group, mode)
                store.advice = advice
        except Exception as exc:  # corrupt JSON, not a zarr group, unreadable files, ...
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            problem = f"is unreadable or not a mask store ({type(exc).__name__}: {reason})"
        if problem:
            raise IumaskError(f"mask store {path} {problem}; {advice.remake}")
        return store

    # ------------------------------------------------------------------ metadata
    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def prediction_dtype(self) -> np.dtype:
        """uint8, or uint16 for more than 256 classes (see :func:`format_version`)."""
        return np.dtype(self._arrays["prediction"].dtype)

    @property
    def attrs(self) -> dict:
        """A copy of all group attributes."""
        return json_normal(dict(self._group.attrs))

    @property
    def identity(self) -> dict:
        """The inputs the store was made from (``format_version``: the content version, 1 or 2)."""
        attrs = content_identity(self.attrs)
        return {k: attrs[k] for k in IDENTITY_KEYS}

    def set_attrs(self, **values) -> None:
        """Set free-form attributes (not identity keys). Call from one process only."""
        if self._mode == "r":
            raise ValueError(f"mask store {self.path} was opened read-only")
        clash = set(values) & set(IDENTITY_KEYS)
        if clash:
            raise ValueError(f"identity attributes cannot be changed: {', '.join(sorted(clash))}")
        self._group.attrs.update(json_normal(values))

    def recorded(self, keys) -> dict:
        """The stored identity's entries of ``keys`` (those it has)."""
        return {key: value for key, value in content_identity(self.attrs).items() if key in keys}

    def check_identity(self, expected: dict, fix: str | None = None) -> None:
        """Raise StoreMismatchError if any key in ``expected`` differs from the stored value (``fix``:
        what to do, by default the store's advice to overwrite it or use another path)."""
        fix = fix or f"{self.advice.overwrite} or {self.advice.other_path}"
        require_same_inputs(self.recorded(expected), json_normal(dict(expected)), f"mask store {self.path}", fix,
                            StoreMismatchError)

    def index_of(self, image_id: str) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise IumaskError(
                f"image {image_id!r} is not in mask store {self.path}; {self.advice.remake} for this dataset"
            ) from None

    # ------------------------------------------------------------------ data
    def write(self, index: int, entropy, instance_uncertainty, prediction) -> None:
        """Store one image's arrays, then mark it complete (so a crash leaves it incomplete). In a
        sharded store this rewrites the image's whole shard: for many images use :meth:`writes`."""
        self.write_shard(self.shard_of(index), {index: self.checked_arrays(index, entropy, instance_uncertainty,
                                                                          prediction)})

    def shard_of(self, index: int) -> int:
        return index // self.images_per_shard

    def checked_arrays(self, index: int, entropy, instance_uncertainty, prediction) -> tuple[np.ndarray, ...]:
        """One image's arrays checked (shape, class ids) and cast as stored: (entropy, IU, prediction)."""
        shape = self.image_shapes[index]
        values = {"entropy": entropy, "instance_uncertainty": instance_uncertainty, "prediction": prediction}
        for name, value in values.items():
            if np.shape(value) != shape:
                raise ValueError(f"{name} for image {index} has shape {np.shape(value)}, expected {shape}")
        pred = np.asarray(prediction)
        top = np.iinfo(self.prediction_dtype).max
        if not np.issubdtype(pred.dtype, np.integer) or pred.min() < 0 or pred.max() > top:
            raise ValueError(f"prediction for image {index} must hold integer class ids in 0..{top} "
                             f"(this store's {self.prediction_dtype})")
        return (np.asarray(entropy, dtype=np.float16), np.asarray(instance_uncertainty, dtype=np.float16),
                pred.astype(self.prediction_dtype))

    def write_shard(self, shard: int, images: dict[int, tuple[np.ndarray, ...]]) -> None:
        """Write ``images`` (index -> :meth:`checked_arrays`, all in shard ``shard``) with one write of
        the whole shard per array, then their completion flags; the shard's other finished images
        are kept. Threads of this process take turns per shard; other processes must not write it."""
        start = shard * self.images_per_shard
        stop = min(start + self.images_per_shard, self.num_images)
        if any(not start <= i < stop for i in images):
            raise ValueError(f"images {sorted(images)} are not all in shard {shard} (images {start}..{stop - 1})")
        with self._shard_lock(shard):
            complete = self._arrays["complete"]
            flags = np.asarray(complete[start:stop], dtype=bool)
            written = [i - start for i in images]
            keep = flags.copy()
            keep[written] = False
            if flags[written].any():  # rewriting finished images: invalid until all three arrays are written
                complete[start:stop] = keep
            for k, name in enumerate(IMAGE_ARRAYS):
                array = self._arrays[name]
                # Whole-shard writes replace the file without reading it, unless finished images stay.
                block = array[start:stop] if keep.any() else np.zeros((stop - start, *array.shape[1:]), array.dtype)
                for index, values in images.items():
                    h, w = self.image_shapes[index]
                    block[index - start] = 0
                    block[index - start, :h, :w] = values[k]
                array[start:stop] = block
            keep[written] = True
            complete[start:stop] = keep

    def _shard_lock(self, shard: int) -> threading.Lock:
        with self._shard_locks_lock:
            return self._shard_locks.setdefault(shard, threading.Lock())

    def writes(self, pending: Iterable[int]) -> ShardWriter:
        """A buffered writer of this process's images ``pending`` (see :class:`~iumask.store_writer.ShardWriter`)."""
        return ShardWriter(self, pending)

    def is_complete(self, index: int) -> bool:
        return bool(self._arrays["complete"][index])

    def completed(self) -> np.ndarray:
        """Completion flags of all images, bool (N,), read fresh from disk."""
        return np.asarray(self._arrays["complete"][:], dtype=bool)

    def _check_complete(self, start: int, stop: int | None = None) -> None:
        """Refuse to read images ``start`` (to ``stop``) unless they are complete in this very store."""
        stop = start + 1 if stop is None else stop
        try:
            same = os.stat(self.path).st_ino == self._directory
        except FileNotFoundError:
            same = False
        if not same:  # e.g. make-masks --overwrite swapped a new store in under a running train-weighted
            raise IumaskError(f"mask store {self.path} was replaced or removed while it was being read; rerun this "
                              "command to use the current store")
        flags = np.asarray(self._arrays["complete"][start:stop], dtype=bool)
        if not flags.all():
            raise IumaskError(
                f"image {self.image_ids[start + int(np.argmin(flags))]!r} in mask store {self.path} is not complete; "
                "finish iumask make-masks (rerun it to resume)"
            )

    def read(self, index: int) -> dict:
        """``{"entropy", "instance_uncertainty"}`` as float32 and ``"prediction"`` in the store's
        :attr:`prediction_dtype`, (H, W)."""
        self._check_complete(index)
        h, w = self.image_shapes[index]
        out = {name: self._arrays[name][index, :h, :w].astype(np.float32) for name in FLOAT_ARRAYS}
        out["prediction"] = np.asarray(self._arrays["prediction"][index, :h, :w], dtype=self.prediction_dtype)
        return out

    def read_all(self, names: tuple[str, ...] = IMAGE_ARRAYS) -> Iterator[tuple[int, dict]]:
        """``(index, arrays)`` for every image in order, the arrays ``names`` as :meth:`read` gives
        them, read many images at a time (whole shards, about :data:`SHARD_BYTES` of arrays per
        read): one file read per shard and array instead of one per image."""
        hmax, wmax = self._arrays["entropy"].shape[1:]
        budget = default_images_per_shard(self.num_images, hmax, wmax, self.prediction_dtype.itemsize)
        per_shard = self.images_per_shard
        step = (budget // per_shard) * per_shard if per_shard <= budget else budget  # whole shards if they fit
        dtypes = {name: np.float32 for name in FLOAT_ARRAYS} | {"prediction": self.prediction_dtype}
        for start in range(0, self.num_images, step):
            stop = min(start + step, self.num_images)
            self._check_complete(start, stop)
            blocks = {name: self._arrays[name][start:stop] for name in names}
            for index in range(start, stop):
                h, w = self.image_shapes[index]
                yield index, {name: block[index - start, :h, :w].astype(dtypes[name]) for name, block in blocks.items()}

    def read_iu(self, index: int) -> np.ndarray:
        """The IU mask of one image, float32 (H, W)."""
        self._check_complete(index)
        h, w = self.image_shapes[index]
        return self._arrays["instance_uncertainty"][index, :h, :w].astype(np.float32)

    def nbytes_stored(self) -> int:
        """Bytes on disk of the chunk files (metadata and the lock file excluded)."""
        return sum(
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(self.path)
            for name in names
            if name not in ("zarr.json", LOCK_FILE)
        )

    def __repr__(self) -> str:
        return f"MaskStore({str(self.path)!r}, {self.num_images} images, mode={self._mode!r})"


def refuse_mislabelled_precision(path, requested: str, used: str, fix: str) -> None:
    """Refuse the store at ``path`` when its identity records the autocast mode ``requested`` that
    this run cannot use (it computes at ``used``: fp16 asked on a CPU runs float32). Earlier iumask
    versions, whose identities recorded the precision asked for, wrote such stores with ``amp: fp16`` though
    their masks were float32; a store recording fp16 may also hold real fp16 masks made on a GPU,
    and nothing in it tells which, so it is neither reused nor relabelled (docs/store.md)."""
    path = Path(path)
    if requested == used or not path.is_dir():
        return
    try:
        recorded = MaskStore.open(path).identity["options"].get("amp")
    except IumaskError:
        return  # not a readable store: opening it for writing says what is wrong
    if recorded == requested:
        runs = "float32" if used == "off" else used
        raise StoreMismatchError(
            f"mask store {path} records amp {requested}, which runs as {runs} on this device, and earlier iumask "
            f"versions recorded {requested} for stores they computed in float32 on a CPU, so whether it holds "
            f"{requested} or float32 masks is unknown; {fix}")


class StoreMaskReader:
    """Picklable ``masks(index) -> IU mask`` over a store, for a training dataset (each DataLoader
    worker opens the store for itself)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._store: MaskStore | None = None

    def __call__(self, index: int) -> np.ndarray:
        if self._store is None:
            self._store = MaskStore.open(self.path)
        return self._store.read_iu(index)

    def __getstate__(self):
        return {"path": self.path, "_store": None}
