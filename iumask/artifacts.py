"""Writing and reading artifact files safely: atomic replacement, JSON, SHA-256.

Every file iumask writes goes through :func:`atomic_write`: the content is written to a temporary
file beside the target and renamed over it, so a crash never leaves half a file; a failed write
(full disk, read-only folder) removes the temporary file and raises :class:`IumaskError` naming
the path. Files get the permissions the user's umask gives new files (some writers, e.g.
safetensors, create private 0600 files).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from iumask.errors import IumaskError

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; restored at once
    os.umask(mask)
    return mask


def describe_os_error(exc: OSError, path: str | os.PathLike | None = None) -> str:
    """One line naming the path, the problem and the fix, e.g. for a full disk."""
    where = path if path is not None else (exc.filename or "a file")
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space or write elsewhere"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "choose a writable folder (e.g. another --out, --store or --output)"
    else:
        fix = "check the path and the disk"
    return f"cannot write {where}: {reason}; {fix}"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; rename it over ``path`` on
    success, remove it on any failure (the old ``path``, if any, is left as it was)."""
    path = Path(path)
    tmp = path.with_name(path.name + TEMP_SUFFIX)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = _os_error_in(exc)
        if cause is not None:
            raise IumaskError(describe_os_error(cause, path)) from exc
        raise


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


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write JSON atomically (see :func:`atomic_write`)."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise IumaskError(f"{path}: {what} not found; check the path or run the stage that makes it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IumaskError(f"{path}: {what} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); "
                          "delete it and rerun the stage that makes it") from None


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def json_digest(value) -> str:
    """SHA-256 of a JSON value (keys sorted), e.g. to identify a store by its identity."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
