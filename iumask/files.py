"""File primitives: atomic writes, strict JSON, writer locks and digests. Nothing here knows what
a model, a store or a results file is (that is :mod:`iumask.artifacts`, :mod:`iumask.store`).

Every file iumask writes itself (JSON, CSV, weights, checkpoints, figures, predicted images, the
synthetic dataset, the statistics cache) goes through :func:`atomic_write`: the content is written
to a temporary file beside the target with a name of its own (``<name>.<random>.tmp``, so two
writers of one file never share one) and renamed over it, so a crash never leaves half a file; a
failed write (full disk, read-only folder) removes the temporary file and raises
:class:`IumaskError` naming the path. A target the user made read-only (no write bit) is refused,
not replaced (:func:`refuse_read_only`). Files get the permissions the user's umask gives new files
(some writers, e.g. safetensors, create private 0600 files). Two kinds of files are written by
libraries instead: the mask store's chunks (zarr; an image counts only once its completion flag is
set, :mod:`iumask.store`) and TensorBoard's event files.

Locks are ``fcntl.flock`` (:class:`WriterLock`, :func:`folder_lock`), not the ``filelock``
package: on Linux and macOS ``filelock`` takes the same ``flock``, so it would add a dependency
for no new guarantee here; the one it would add, Windows, iumask does not target (use WSL). What
matters is kept by ``flock``: the kernel drops a lock when its holder dies, so there is never a
stale lock to remove by hand.

Folders that must appear whole (a mask store, a downloaded dataset) are built in a hidden sibling
and renamed into place in one step (:class:`StagedDirectory`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import shlex
import shutil
import socket
import sys
import tempfile
from enum import Enum
from pathlib import Path
from stat import S_IMODE, S_ISREG
from typing import Callable, Iterator

from iumask.errors import IumaskError

TEMP_SUFFIX = ".tmp"
LOCK_FILE = ".iumask-writer.lock"

THRESHOLD_KEYS = ("train_mean_entropy", "train_mean_entropy_weights_sha256")


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc), else by setting
    and restoring it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def describe_os_error(exc: OSError, path: str | os.PathLike | None = None, action: str | None = "write") -> str:
    """One line naming the path, the problem and the fix, e.g. for a full disk. ``action`` None:
    the failing operation is unknown (a read or a write)."""
    where = path if path is not None else (exc.filename or "a file")
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space or write elsewhere"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "choose a writable folder (e.g. another --out, --store or --output)"
    else:
        fix = "check the path and the disk"
    return f"{'cannot ' + action + ' ' if action else ''}{where}: {reason}; {fix}"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; rename it over ``path`` on
    success, remove it on any failure (the old ``path``, if any, is left as it was)."""
    path = Path(path)
    refuse_read_only(path)
    tmp = None
    try:
        # A unique name (``<name>.<random>.tmp``), so concurrent writers of one file never write
        # into each other's temporary file; the last rename wins, each file whole.
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TEMP_SUFFIX)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        cause = _os_error_in(exc)
        if cause is not None:
            raise IumaskError(describe_os_error(cause, path)) from exc
        raise


def refuse_read_only(path: str | os.PathLike) -> None:
    """Refuse to replace a file the user made read-only (no write permission bit, e.g. ``chmod
    444``, or one this process may not write): a rename over it would succeed and give it the
    umask's mode, undoing what the ``chmod`` meant. The bits are read rather than tried, since root
    writes any file. A missing file (or one that cannot be stat'ed: the write says why) passes."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if S_ISREG(mode) and (not mode & 0o222 or not os.access(path, os.W_OK)):
        raise IumaskError(f"{path}: the file is read-only (mode {S_IMODE(mode):04o}), so iumask does not "
                          f"replace it; make it writable (chmod u+w {shlex.quote(str(path))}) or write elsewhere")


def temporary_target(name: str) -> str | None:
    """The file name whose :func:`atomic_write` temporary file ``name`` is (``a.json`` for
    ``a.json.k3x_9q.tmp``), else None: how a crashed write's leftover is recognised."""
    if not name.endswith(TEMP_SUFFIX):
        return None
    target, dot, _ = name[:-len(TEMP_SUFFIX)].rpartition(".")
    return target if dot and target else None


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``, if any (torch.save, for one, reports a failed write of its file
    object as a RuntimeError raised while handling the OSError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class StagedDirectory:
    """The hidden folder beside ``target`` (``.<name>.iumask-<kind>``) where iumask builds what goes to
    ``target`` (or sets an old version aside), renamed onto it in one step once complete, so that
    ``target`` is never seen half-made. ``owned(path)`` proves that a folder found there is iumask's
    own leftover (a marker file, or nothing but files iumask writes): only such a folder is ever
    deleted. The mask store (:mod:`iumask.store`) and the CamVid download (:mod:`iumask.download`)
    stage this way."""

    def __init__(self, target: str | os.PathLike, kind: str, owned: Callable[[Path], bool]):
        target = Path(os.path.abspath(target))
        self.target, self.owned = target, owned
        self.path = target.with_name(f".{target.name}.iumask-{kind}")

    def exists(self) -> bool:
        return self.path.exists() or self.path.is_symlink()

    def remove(self) -> None:
        """Delete the folder, refusing (one line, nothing deleted) one iumask did not make."""
        if self.path.is_symlink() or not self.path.is_dir() or not self.owned(self.path):
            raise IumaskError(f"{self.path} holds files iumask did not write (iumask builds {self.target} there), so "
                              "iumask will not delete it; move it elsewhere and rerun")
        shutil.rmtree(self.path)

    def fresh(self) -> Path:
        """An empty folder, after removing a leftover of an interrupted run (only one that is owned)."""
        if self.exists():
            self.remove()
        self.path.mkdir()
        return self.path

    def rename_into_place(self, taken: str) -> None:
        """Rename the folder onto ``target`` in one step (an empty folder there is replaced); when
        something else appeared at ``target`` meanwhile, nothing is changed and ``taken`` (what to
        say and do) is raised."""
        try:
            os.rename(self.path, self.target)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise IumaskError(f"{self.target}: {taken}") from None
            raise


def check_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` if needed and check that a file can be written there, before the work
    whose results go there starts."""
    folder = Path(folder)
    probe = folder / f".iumask-write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
    except OSError as exc:
        raise IumaskError(describe_os_error(exc, folder)) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive OS lock on ``folder`` (waiting for it), e.g. while a results file there is
    read, merged and rewritten, so that concurrent commands do not lose each other's entries."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class LockHeld(IumaskError):
    """:class:`WriterLock`'s error when another process holds the lock: ``what`` names the folder,
    ``holder`` the process (PID, host, command), so that a caller may skip the folder or wait."""

    def __init__(self, message: str, what: str = "", holder: str = ""):
        super().__init__(message)
        self.what, self.holder = what, holder


class WriterLock:
    """An exclusive, non-blocking ``flock`` on ``directory/.iumask-writer.lock``, whose content names
    the holder (PID, host, command) for the error another writer gets: one writer per artifact
    folder (a mask store, a train command's ``--out``, an experiment, a predict output). With
    ``shared`` a shared lock instead: any number of shared holders, but never with an exclusive one
    (``iumask experiment --worker`` processes share a folder that a plain experiment owns alone).

    The OS releases it when the holder exits or is killed, so a dead holder's lock is simply taken
    (no stale lock to clean up). It excludes other processes; within one process, handles on one
    folder share it (reference-counted), so a stage may lock a folder its caller already holds.
    ``what`` names the folder in messages (e.g. ``mask store runs/masks.zarr``), ``fix`` says what
    else the user can do (e.g. ``use another --store path``).
    """

    def __init__(self, directory: str | os.PathLike, what: str, fix: str, shared: bool = False):
        self._key: tuple[int, int] | None = None
        file = Path(directory) / LOCK_FILE
        try:
            fd, writable = os.open(file, os.O_RDWR | os.O_CREAT, 0o666), True
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            if not file.is_file():
                return  # a folder this process cannot write to: it cannot write the artifact either
            fd, writable = os.open(file, os.O_RDONLY), False
        try:
            stat = os.fstat(fd)
            key = (stat.st_dev, stat.st_ino)
            held = _HELD_LOCKS.get(key)
            if held is not None and held[2] == os.getpid():
                os.close(fd)
                held[1] += 1
                self._key = key
                return
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = lock_holder(fd)
                raise LockHeld(f"{what} is being written by another process ({holder}); wait for it to finish or "
                               f"stop it, or {fix}", what, holder) from None
            except OSError as exc:  # e.g. NFS v3 without its lock daemon: ENOLCK
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                raise IumaskError(f"cannot lock {file}: the file system does not support flock ({exc.strerror}); "
                                  "write to a local disk or a file system with locks (e.g. NFS v4)") from None
            try:
                same = os.path.samestat(stat, os.stat(file))
            except FileNotFoundError:
                same = False
            if not same:  # the folder was swapped or removed between opening and locking
                raise IumaskError(f"{what} was replaced by another process while this one was locking it; "
                                  "rerun the command")
            if writable:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(_holder_info()).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        _HELD_LOCKS[key] = [fd, 1, os.getpid()]
        self._key = key

    def close(self) -> None:
        if self._key is not None:
            held = _HELD_LOCKS[self._key]
            held[1] -= 1
            if held[1] == 0:
                os.close(held[0])
                del _HELD_LOCKS[self._key]
            self._key = None

    __del__ = close

    def __enter__(self) -> "WriterLock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Lock files this process holds: (st_dev, st_ino) -> [fd, handles, pid]. An inode stays unique
# while its file is open, even after the file is deleted.
_HELD_LOCKS: dict[tuple[int, int], list[int]] = {}


def _holder_info() -> dict:
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"
    command = " ".join(command.split())  # one line
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "command": command if len(command) <= 300 else command[:297] + "..."}


def lock_holder(fd: int) -> str:
    """Who holds the lock file open as ``fd``, as written by its holder (for messages)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"pid {info['pid']} on {info['host']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown process"


def folder_writer_lock(folder: str | os.PathLike, what: str, fix: str, enabled: bool = True, shared: bool = False):
    """:class:`WriterLock` on ``folder`` (created if needed) when ``enabled`` (e.g. on rank 0 of a
    torchrun job only: its other ranks write under rank 0's lock), else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    check_writable(folder)
    return WriterLock(folder, what, fix, shared)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`), creating its folder; a
    failure (full disk, read-only folder) is a one-line IumaskError naming the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IumaskError(describe_os_error(exc, path.parent)) from None
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return path


def nan_to_none(value):
    """NaN and ±inf → None throughout, so JSON written from it is strict (``null``, not ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_none(v) for v in value]
    return value


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write strict JSON atomically (see :func:`atomic_write`): undefined values (NaN) are written as
    ``null``, which every JSON parser reads (bare ``NaN`` is not JSON)."""
    text = json.dumps(nan_to_none(data), indent=2, sort_keys=False, allow_nan=False) + "\n"
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def create_json_once(path: str | os.PathLike, data: dict) -> bool:
    """Write strict JSON to ``path`` unless it exists, atomically: a whole temporary file (named as
    :func:`atomic_write`'s) is hard-linked to ``path``, so of several processes exactly one creates
    it. Returns whether this one did."""
    path = Path(path)
    text = json.dumps(nan_to_none(data), indent=2, sort_keys=False, allow_nan=False) + "\n"
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.link(name, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(name)


def read_json(path: str | os.PathLike, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise IumaskError(f"{path}: {what} not found; check the path or run the stage that makes it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IumaskError(f"{path}: {what} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); "
                          "delete it and rerun the stage that makes it") from None


# SHA-256 by (path, inode, size, modification time in ns): a command checks each weights file
# several times (before any work, then when loading) and hashes it once.
_SHA256_CACHE: dict[tuple, str] = {}


def file_stamp(path: str | os.PathLike) -> tuple:
    """(real path, inode, size, modification time in ns): changes whenever the file is rewritten
    or replaced (an atomic write is a new inode), without reading it."""
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns


def file_sha256(path: str | os.PathLike) -> str:
    key = file_stamp(path)
    if key not in _SHA256_CACHE:
        with open(path, "rb") as f:
            _SHA256_CACHE[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _SHA256_CACHE[key]


CACHE_ENV = "IUMASK_CACHE"


def default_cache_dir() -> Path:
    """Where iumask keeps what it can recompute (label statistics, dataset fingerprints):
    ``$IUMASK_CACHE`` if set, else ``~/.cache/iumask``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "iumask"


def json_normal(value):
    """``value`` as a JSON round trip gives it back (tuples → lists, enums → their values, paths →
    strings, numpy scalars and arrays → Python numbers and lists): the one normal form in which
    identities are stored and compared."""

    def default(obj):
        if isinstance(obj, Enum):
            return obj.value
        if isinstance(obj, os.PathLike):
            return os.fspath(obj)
        if hasattr(obj, "tolist") and type(obj).__module__ == "numpy":  # without importing numpy here
            return obj.tolist()
        raise TypeError(f"{type(obj).__name__} is not JSON")

    return json.loads(json.dumps(value, default=default))


def json_digest(value) -> str:
    """SHA-256 of a JSON value (keys sorted), e.g. to identify a store by its identity."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- members and ensembles
