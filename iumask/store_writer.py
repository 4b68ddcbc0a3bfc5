"""Buffered writing into a sharded mask store: a process's images are kept until their shard is
whole, then the shard is written at once. zarr rewrites a whole shard file on every write to it, so
writing a sharded store image by image would rewrite each shard once per image, and two writers of
one shard would lose each other's images; :class:`ShardWriter` writes each shard once, from one
process (:meth:`iumask.store.MaskStore.writes` makes one).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Protocol

import numpy as np

MAX_BUFFERED_SHARDS = 2  # shards a ShardWriter keeps in memory at once


class ShardedStore(Protocol):
    """What a :class:`ShardWriter` needs of a store (:class:`iumask.store.MaskStore` has it)."""

    def shard_of(self, index: int) -> int: ...

    def checked_arrays(self, index: int, entropy, instance_uncertainty, prediction) -> tuple[np.ndarray, ...]: ...

    def write_shard(self, shard: int, images: dict[int, tuple[np.ndarray, ...]]) -> None: ...


class ShardWriter:
    """Writes of one process into a store, shard by shard: :meth:`write` (thread-safe) keeps an
    image until every image of ``pending`` in its shard has come, then writes the shard at once
    (:meth:`~iumask.store.MaskStore.write_shard`; in an unsharded store, each image at once). Leaving the
    ``with`` block writes what is buffered (after an error too, so finished images are kept; a
    kill loses at most the shards in flight, which a rerun recomputes). At most
    :data:`MAX_BUFFERED_SHARDS` shards wait in memory: when images come in another order than the
    shards' (predict batches by image shape) or one never comes (an unreadable image), the shard
    waiting longest is written as it is, its finished images kept when the rest arrives. The
    process must own every shard it writes: no other process may write images of those shards
    meanwhile."""

    def __init__(self, store: ShardedStore, pending: Iterable[int]):
        self.store = store
        self._waiting: dict[int, set[int]] = {}  # shard -> its pending images not yet written
        for index in pending:
            self._waiting.setdefault(store.shard_of(index), set()).add(index)
        self._buffered: dict[int, dict[int, tuple[np.ndarray, ...]]] = {}
        self._lock = threading.Lock()

    def write(self, index: int, entropy, instance_uncertainty, prediction) -> None:
        values = self.store.checked_arrays(index, entropy, instance_uncertainty, prediction)
        shard = self.store.shard_of(index)
        ready = []
        with self._lock:
            images = self._buffered.setdefault(shard, {})
            images[index] = values
            waiting = self._waiting.get(shard, set())
            waiting.discard(index)
            if not waiting:
                ready.append((shard, self._buffered.pop(shard)))
                self._waiting.pop(shard, None)
            while len(self._buffered) > MAX_BUFFERED_SHARDS:  # the oldest, partly: memory stays bounded
                oldest = next(iter(self._buffered))
                ready.append((oldest, self._buffered.pop(oldest)))
        for number, shard_images in ready:
            self.store.write_shard(number, shard_images)

    def flush(self) -> None:
        """Write every buffered image (shards still waiting for others are written as they are)."""
        with self._lock:
            buffered, self._buffered = self._buffered, {}
        for shard, images in buffered.items():
            self.store.write_shard(shard, images)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        try:
            self.flush()
        except Exception:
            if kind is None:
                raise
            # else the error that ended the block is the one to report
