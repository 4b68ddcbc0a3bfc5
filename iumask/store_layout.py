"""The mask store's layout, without reading or writing one (:mod:`iumask.store` does that): its
format versions, dtypes and arrays, how many images share a shard file, the identity a store
records and its checks, and which files in a folder a store's writer makes (so that iumask deletes
only those).

Format versions: 1 (uint8 predictions, up to 256 classes) and 2 (uint16), one chunk file per image
and array; 3 and 4, the same contents sharded (zarr v3's sharding codec: the chunks of
``images_per_shard`` consecutive images share one file per array). The identity records the
content version (1 or 2), so a sharded and an unsharded store of the same inputs are both cache
hits.
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
