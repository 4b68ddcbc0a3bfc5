"""The mask store's layout, without reading or writing one (:mod:`iumask.store` does that): its
format versions, dtypes and arrays, how many images share a shard file, the identity a store
records and its checks, and which files in a folder a store's writer makes (so that iumask deletes
only those).

Format versions: 1 (uint8 predictions, up to 256 classes) and 2 (uint16), one chunk file per image
and array; 3 and 4, the same contents sharded (zarr v3's sharding codec: the chunks of
``images_per_shard`` consecutive images share one file per array). The identity records the
content version (1 or 2), so a sharded and an unsharded store of the same inputs are both cache
hits.

Layout (one group):

* ``entropy``, ``instance_uncertainty`` (float16) and ``prediction`` (uint8, or uint16 when the
  class ids do not fit in a byte: more than 256 classes), shape (N, Hmax, Wmax), one chunk per
  image so an image is read without touching the others. An image of shape (H, W) sits in the
  top-left corner of its slot; reads crop it.
* ``complete`` (bool, shape (N,)), one chunk per image (per shard in a sharded store): set only
  after an image's three arrays are written, so an interrupted write reads as incomplete and is
  recomputed.
* Sharding (zarr v3's sharding codec, format versions 3 and 4): the chunks of
  ``images_per_shard`` consecutive images share one file per array, so a store of 100k images
  has hundreds of files, not 400k. zarr rewrites a whole shard file on every write to it, and two
  concurrent writers of one shard lose each other's images silently, so every shard has exactly
  one writer: :meth:`iumask.store.MaskStore.writes` buffers a process's images and writes each shard in one
  go once its images are all there (threads share the buffer), and make-masks gives each torchrun
  rank whole shards. An unsharded store (versions 1 and 2, one file per image and array, what
  ``--images-per-shard 1`` writes) is read, resumed and written the same way. Several processes may write one store
  concurrently when they write disjoint sets of shards. Group attributes are one file, so only
  one process (rank 0) should call ``set_attrs``.
* Group attributes: the store's identity (``IDENTITY_KEYS``) plus free-form values set later
  (``mean_entropy``, ``num_complete``, ``finished``, ...).
* ``.iumask-writer.lock``: the writer lock. :meth:`iumask.store.MaskStore.create` and
  :meth:`iumask.store.MaskStore.open_or_create` (one writer, e.g. the make-masks run or its rank 0) hold an OS
  lock (``flock``) on it until :meth:`iumask.store.MaskStore.close`; the file names the holder (PID, host,
  command) for the error another writer gets. The OS drops the lock when the holder dies, so a
  killed run's lock needs no cleaning up. Other ranks of the same job open the store unlocked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from iumask.files import LOCK_FILE, json_normal

# Version 2 stores have 16-bit predictions (more than 256 classes). Stores whose class ids fit in
# a byte stay version 1, the same layout as before, so older iumask still reads them; it would
# cut 16-bit class ids to 8 bits without a word, so it must refuse version 2.
STORE_FORMAT_VERSION = 1
WIDE_FORMAT_VERSION = 2
PREDICTION_DTYPES = {STORE_FORMAT_VERSION: np.dtype(np.uint8), WIDE_FORMAT_VERSION: np.dtype(np.uint16)}
# Sharded stores are versions 3 (8-bit) and 4 (16-bit): iumask before sharding refuses them, as it
# would resume one with per-image writes from several threads, which lose data in a shared shard.
# The identity records the content version (1 or 2): a sharded store and an unsharded one made
# from the same inputs hold the same values, so either is a cache hit.
SHARDED_VERSIONS = {STORE_FORMAT_VERSION: 3, WIDE_FORMAT_VERSION: 4}
CONTENT_VERSIONS = {**{v: v for v in PREDICTION_DTYPES}, **{s: v for v, s in SHARDED_VERSIONS.items()}}
# Images per shard by default: about this many uncompressed bytes (the buffer a writer holds per
# shard in flight), and at most MAX_IMAGES_PER_SHARD images (what a kill can cost to recompute).
SHARD_BYTES = 64 << 20
MAX_IMAGES_PER_SHARD = 1024
IDENTITY_KEYS = (
    "format_version",
    "image_ids",
    "image_shapes",
    "class_names",
    "options",
    "member_sha256",
    "dataset_fingerprint",
)
FLOAT_ARRAYS = ("entropy", "instance_uncertainty")
IMAGE_ARRAYS = (*FLOAT_ARRAYS, "prediction")  # per image, (N, Hmax, Wmax)
ARRAYS = (*IMAGE_ARRAYS, "complete")
# zarr writes metadata atomically through "zarr.<uuid hex>.partial", which a kill leaves behind.
ZARR_PARTIAL = re.compile(r"zarr\.[0-9a-f]{32}\.partial")
def format_version(num_classes: int) -> int:
    """The store format for ``num_classes``: 1 (uint8 predictions) up to 256 classes, else 2 (uint16)."""
    if num_classes > 1 << 16:
        raise ValueError(f"a mask store holds at most {1 << 16} classes, not {num_classes}")
    return STORE_FORMAT_VERSION if num_classes <= 1 << 8 else WIDE_FORMAT_VERSION


def default_images_per_shard(num_images: int, height: int, width: int, prediction_bytes: int = 1) -> int:
    """Images per shard for slots of ``height`` x ``width``: :data:`SHARD_BYTES` of uncompressed
    arrays (two float16 and the prediction), between 1 and :data:`MAX_IMAGES_PER_SHARD`."""
    slot = height * width * (2 + 2 + prediction_bytes)
    return max(1, min(num_images, MAX_IMAGES_PER_SHARD, SHARD_BYTES // max(slot, 1)))


def content_identity(attrs: dict) -> dict:
    """Stored attributes with ``format_version`` as the content version (sharded or not: 1 or 2)."""
    version = attrs.get("format_version")
    return dict(attrs, format_version=CONTENT_VERSIONS[version]) if version in CONTENT_VERSIONS else attrs


def checked_identity(identity: dict) -> dict:
    """The identity as stored (JSON-normal, ``format_version`` added for its class count), checked."""
    identity = json_normal(dict(identity))
    missing = [k for k in IDENTITY_KEYS if k not in identity and k != "format_version"]
    if missing:
        raise ValueError(f"mask store identity lacks {', '.join(missing)}")
    version = format_version(len(identity["class_names"]))
    if identity.setdefault("format_version", version) != version:
        raise ValueError(f"format_version must be {version} for {len(identity['class_names'])} classes")
    ids, shapes = identity["image_ids"], identity["image_shapes"]
    if len(ids) != len(shapes) or len(set(ids)) != len(ids):
        raise ValueError("image_ids must be unique and match image_shapes one to one")
    if any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError("image_shapes must be [H, W] pairs of positive integers")
    return identity


def consistent_layout(group, sharded: bool) -> bool:
    """Whether the arrays are laid out as :meth:`iumask.store.MaskStore.create` makes them: image arrays in shards
    of S images and one flag chunk per shard (sharded), or one chunk per image (unsharded)."""
    shards = {group[name].shards for name in IMAGE_ARRAYS}
    if len(shards) != 1:
        return False
    (shard,) = shards
    if (shard is not None) != sharded:
        return False
    return group["complete"].shards is None and group["complete"].chunks == ((shard[0] if shard else 1),)


def layout_problem(group) -> str | None:
    """What makes the opened zarr ``group`` no mask store this iumask reads ("has format_version 7,
    expected one of ...", to follow "mask store PATH"), or None: its version, identity attributes,
    arrays, prediction dtype, sharding and image count are checked, its values are not."""
    attrs = dict(group.attrs)
    version = attrs.get("format_version")
    content = CONTENT_VERSIONS.get(version)
    if content is None:
        return f"has format_version {version}, expected one of {', '.join(map(str, CONTENT_VERSIONS))}"
    if any(k not in attrs for k in IDENTITY_KEYS):
        return "lacks identity attributes"
    if content != format_version(len(attrs["class_names"])):
        return (f"has format_version {version} for {len(attrs['class_names'])} classes (8-bit predictions "
                "cannot hold class ids above 255)")
    if any(name not in group for name in ARRAYS):
        return "lacks the mask arrays"
    if np.dtype(group["prediction"].dtype) != PREDICTION_DTYPES[content]:
        return f"has {group['prediction'].dtype} predictions, expected {PREDICTION_DTYPES[content]}"
    if not consistent_layout(group, version in SHARDED_VERSIONS.values()):
        return f"has format_version {version} but arrays sharded otherwise"
    if any(group[name].shape[0] != len(attrs["image_ids"]) for name in ARRAYS):
        return "has arrays that do not match its image list"
    return None


def is_own(name: str) -> bool:
    """Whether a top-level entry is one that writing a store makes (zarr's files, the lock, leftovers)."""
    return name in ("zarr.json", LOCK_FILE, *ARRAYS) or bool(ZARR_PARTIAL.fullmatch(name))


def only_own(path: Path) -> bool:
    return all(map(is_own, os.listdir(path)))


def looks_like_store(path: Path) -> bool:
    """True for a directory holding nothing but a store's files, or what a killed writer left of them
    (even if corrupt or incomplete), or nothing at all: safe to delete. Array folders alone do not
    tell a store from a user's folder (one may be called ``prediction``): zarr's metadata must be there."""
    names = set(os.listdir(path)) - {LOCK_FILE}
    metadata = any(n == "zarr.json" or ZARR_PARTIAL.fullmatch(n) for n in names)
    return not names or (metadata and all(map(is_own, names)))
