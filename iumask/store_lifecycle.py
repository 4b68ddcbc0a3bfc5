"""A mask store's life on disk: created, opened, resumed or replaced under its writer lock, never
built in place. :class:`StoreLifecycle` is the part of :class:`iumask.store.MaskStore` that decides
what to do with what is at a store's path and keeps it whole; the store itself reads and writes.

A store is created in a hidden sibling ``.<name>.iumask-new`` (:class:`~iumask.files.StagedDirectory`)
and renamed into place once created (empty), or, when it replaces an existing store, once finished
(:meth:`StoreLifecycle.commit`: the old store is renamed to ``.<name>.iumask-old``, the new one into
place, then the old one removed). A run killed at any point leaves either no store or a whole one,
and the old store survives a failed replacement: the next writer puts it back if a swap was cut
short, and resumes a staged store made from the same inputs. What to do with a store that is there
is the one reuse decision (:func:`~iumask.artifacts.reuse_decision`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Self

from iumask.artifacts import Progress, Reuse, State, StoreAdvice, reuse_decision, same_identity
from iumask.errors import IumaskError, StoreMismatchError
from iumask.files import LOCK_FILE, StagedDirectory, WriterLock
from iumask.store_layout import checked_identity, looks_like_store, only_own

STAGED, ASIDE = "new", "old"  # suffixes of the hidden siblings: .<name>.iumask-new / -old


def sibling(path: Path, kind: str) -> StagedDirectory:
    """The hidden folder beside ``path`` where a store is staged (``new``) or set aside (``old``):
    iumask's to delete only when it holds nothing but a store's files."""
    return StagedDirectory(path, kind, only_own)


def discard_staged(path: Path, advice: StoreAdvice) -> None:
    """Remove a replacement of ``path`` that an earlier ``--overwrite`` left unfinished (e.g. it
    stopped on bad data) once the store in place is kept: it would never be swapped in. A writer
    still building it holds its lock, and then this stops with the lock's message."""
    staged = sibling(path, STAGED)
    if not staged.path.is_dir():
        return
    lock = store_lock(staged.path, path, advice)
    try:
        staged.remove()
    finally:
        lock.close()


def recover_swap(path: Path, advice: StoreAdvice = StoreAdvice()) -> None:
    """Clean up after a replacement of ``path`` killed inside :meth:`StoreLifecycle.commit`: if the old
    store is set aside and the new one not yet in place, the old one goes back (the commit did not
    happen; a rerun resumes the finished replacement from its staging folder); if the new one is in
    place, the old one is removed."""
    aside = sibling(path, ASIDE)
    if not aside.path.is_dir():
        return
    lock = store_lock(aside.path, path, advice)  # a live process in the middle of the swap holds it
    try:
        if path.exists() or path.is_symlink():
            aside.remove()
        else:
            aside.rename_into_place("a store appeared there while the old one was put back; rerun the command")
    finally:
        lock.close()


def store_lock(directory: Path, store: Path, advice: StoreAdvice) -> WriterLock:
    """The writer lock of the store ``store`` (held in ``directory``: the store or a sibling)."""
    return WriterLock(directory, f"mask store {store}", advice.other_path)



class StoreLifecycle:
    """How a :class:`~iumask.store.MaskStore` comes to be at its path and goes (the class extends
    this): :meth:`create`, :meth:`open_or_create` (each holding the writer lock until
    :meth:`close`), :meth:`commit` of a staged replacement, and the read-only decisions
    :meth:`finished` and :meth:`progress`. The store supplies ``open``, ``_new`` (an empty store in
    a locked folder) and ``_bind`` (point at a path after a rename)."""

    @classmethod
    def create(cls, path, identity: dict, overwrite: bool = False, images_per_shard: int | None = None,
               advice: StoreAdvice = StoreAdvice()) -> Self:
        """Create an empty store (all images incomplete); ``format_version`` is added here. An existing
        store is replaced only with ``overwrite``. ``images_per_shard``: 1 for one file per image and
        array (unsharded), None for :func:`default_images_per_shard`. Holds the writer lock until
        :meth:`close`. ``advice``: what its messages tell the user (the calling command's options)."""
        path = Path(path)
        identity = checked_identity(identity)
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise IumaskError(f"mask store {path} already exists; {advice.overwrite} or {advice.other_path}")
        store = cls._writer(path, identity, overwrite=True, resume=False, images_per_shard=images_per_shard,
                            advice=advice)
        store.commit()  # an empty store is finished: it replaces the old one at once
        return store

    @classmethod
    def open_or_create(cls, path, identity: dict, overwrite: bool = False,
                       images_per_shard: int | None = None, advice: StoreAdvice = StoreAdvice()) -> Self:
        """The writer's store, holding the writer lock until :meth:`close`: the store at ``path`` if it
        was made from the same identity (to resume), else a new one (replacing a store needs
        ``overwrite``). A replacement is built beside the old store, which stays in place until
        :meth:`commit` swaps them; ``path`` of the returned store is then that staging folder, and a
        rerun resumes the replacement made from the same identity. ``images_per_shard`` (see
        :meth:`create`) applies to a new store; a resumed one keeps its own. ``advice``: see :meth:`create`."""
        return cls._writer(Path(path), checked_identity(identity), overwrite, resume=True,
                           images_per_shard=images_per_shard, advice=advice)

    @classmethod
    def _writer(cls, path: Path, identity: dict, overwrite: bool, resume: bool,
                images_per_shard: int | None, advice: StoreAdvice) -> Self:
        """The locked store to write (see :meth:`open_or_create`); ``resume=False`` always starts afresh."""
        recover_swap(path, advice)
        lock = store = None
        try:
            replaces = False
            if path.is_dir():
                lock = store_lock(path, path, advice)
                replaces = (path / "zarr.json").exists()
                # (create() starts afresh whatever is there: resume=False.)
                store = cls._kept(path, identity, overwrite, advice) if replaces and resume else None
                if store is not None:  # resumed, or a cache hit once finished
                    store._locks = [lock]
                    discard_staged(path, advice)
                    return store
                if path.is_symlink():
                    raise IumaskError(f"{path} is a symbolic link, so iumask will not replace it; remove it yourself "
                                      f"or {advice.other_path}")
                if not looks_like_store(path):
                    raise IumaskError(f"{path} is not a mask store (it holds other files), so iumask will not "
                                      f"replace it; {advice.other_path}")
            elif path.exists() or path.is_symlink():
                raise IumaskError(f"{path} is not a directory; remove it yourself or {advice.other_path}")
            staged = sibling(path, STAGED)
            store = cls._staged(staged.path, path, identity, resume, images_per_shard, advice)
            if replaces:
                store._replaces = (path, lock)
            else:  # nothing there, or debris of a store killed while being created: the new store goes in now
                if path.is_dir():
                    shutil.rmtree(path)
                staged.rename_into_place("a mask store was created there by another process meanwhile; rerun "
                                         "the command")
                store._bind(path)
                if lock is not None:
                    lock.close()
            return store
        except BaseException:
            if store is not None:
                store.close()
            if lock is not None:
                lock.close()
            raise

    @classmethod
    def _kept(cls, path: Path, identity: dict, overwrite: bool, advice: StoreAdvice) -> Self | None:
        """The store at ``path`` opened to resume (or a cache hit once finished) when it was made
        from ``identity``; None when it is to be replaced (``overwrite`` and other inputs, or
        unreadable). The one reuse decision (:func:`~iumask.artifacts.reuse_decision`): without
        ``overwrite`` a store of other inputs is refused (StoreMismatchError) and an unreadable
        one says what is wrong."""
        try:
            store = cls.open(path, mode="r+", advice=advice)
        except IumaskError:
            if overwrite:
                return None
            raise
        try:
            decision = reuse_decision(store.recorded(identity), identity, bool(store.attrs.get("finished")),
                                      overwrite, f"mask store {path}", f"{advice.overwrite} or {advice.other_path}",
                                      StoreMismatchError)
        except BaseException:
            store.close()
            raise
        if decision in (Reuse.HIT, Reuse.RESUME):
            return store
        store.close()
        return None

    @classmethod
    def _staged(cls, staged: Path, target: Path, identity: dict, resume: bool,
                images_per_shard: int | None, advice: StoreAdvice) -> Self:
        """The locked store in the staging folder: the one there if made from ``identity`` and
        ``resume``, else a new one."""
        staged.mkdir(parents=True, exist_ok=True)
        lock = store_lock(staged, target, advice)
        try:
            if not only_own(staged):
                raise IumaskError(f"{staged} holds files iumask did not write (iumask builds {target} there); "
                                  "move them elsewhere and rerun")
            store = None
            if resume and (staged / "zarr.json").exists():
                try:
                    store = cls.open(staged, mode="r+", advice=advice)
                except IumaskError:
                    store = None  # a broken store: start over
                if store is not None and not same_identity(store.recorded(identity), identity):
                    store = None  # another run's: start over
            if store is None:
                for entry in os.scandir(staged):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    elif entry.name != LOCK_FILE:
                        os.unlink(entry.path)
                store = cls._new(staged, identity, images_per_shard)
                store.advice = advice
            store._locks = [lock]
            return store
        except BaseException:
            lock.close()
            raise

    @classmethod
    def finished(cls, path, identity: dict, advice: StoreAdvice = StoreAdvice()) -> Self | None:
        """The finished store at ``path`` made from ``identity`` (the reuse decision's cache hit),
        opened read-only without the writer lock; None when there is nothing there, it is unreadable,
        unfinished or of other inputs, or a replacement is staged beside it: then
        :meth:`open_or_create` decides under the lock and says what is wrong. How a rerun finds its
        cache hit before it loads a model."""
        path = Path(path)
        if not (path / "zarr.json").is_file() or any(sibling(path, kind).exists() for kind in (STAGED, ASIDE)):
            return None
        try:
            store = cls.open(path, advice=advice)
        except IumaskError:
            return None
        decision = reuse_decision(store.recorded(identity), identity, bool(store.attrs.get("finished")), True,
                                  f"mask store {path}", advice.overwrite)  # overwrite=True: decides, never refuses
        return store if decision is Reuse.HIT else None

    @classmethod
    def progress(cls, path) -> Progress:
        """The store's progress from its files: missing, partial (the images whose completion flag
        is set; an unreadable store counts as begun: a rerun resumes or rebuilds it) or done."""
        path = Path(path)
        if not path.exists():
            return Progress(State.MISSING, 0, 0)
        try:
            store = cls.open(path)
        except IumaskError:
            return Progress(State.PARTIAL, 0, 0)
        done = int(store.completed().sum())
        return Progress(State.DONE if store.attrs.get("finished") else State.PARTIAL, done, store.num_images)

    def commit(self) -> None:
        """Put a replacement built beside the old store (see :meth:`open_or_create`) in its place:
        rename the old store aside, this one into place, remove the old one (after a kill in between,
        the next writer puts the old one back or removes it). Nothing to do for a store that replaces none."""
        if self._replaces is None:
            return
        target, old_lock = self._replaces
        aside = sibling(target, ASIDE).path
        os.rename(target, aside)
        sibling(target, STAGED).rename_into_place("a store appeared there during the swap; rerun the command")
        shutil.rmtree(aside)
        old_lock.close()
        self._replaces = None
        self._bind(target)

    def close(self) -> None:
        """Release the writer lock (if this store holds it); the store stays usable."""
        for lock in self._locks:
            lock.close()
        if self._replaces is not None:
            self._replaces[1].close()
        self._locks = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
