"""One exception type for every user-facing failure.

The CLI prints ``error: <message>`` on one line and exits non-zero. Messages name the file
involved and say how to fix the problem, so they read well without a traceback.
"""

from __future__ import annotations

import os


class IumaskError(Exception):
    """A problem with the user's input or artifacts (not a bug in iumask).

    An error raised in a DataLoader worker process reaches the main process re-created by torch
    from one string, "Caught DataError in DataLoader worker process N. Original Traceback ...",
    ending in the original "iumask.errors.DataError: <message>" line. The constructor keeps only
    that message, so the user sees the same one line with ``--workers 0`` or ``--workers 4``.
    """

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (printable(_worker_message(type(self), args[0])),)
        super().__init__(*args)


def printable(text: str | os.PathLike) -> str:
    """``text`` (a path, or a message naming one) as a string any terminal, log or JSON file takes:
    the bytes of a file name that are not UTF-8 (which Linux allows, e.g. ``train_\\xff06.png``;
    Python holds them as lone surrogates) are shown as ``\\xff``, everything else is kept."""
    text = os.fspath(text)
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name decodes to (not one byte's): shown as \udxxx
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def _worker_message(kind: type, text: str) -> str:
    """The original message inside torch's re-raised worker error ``text`` (``text`` itself when it
    is not one)."""
    if not text.startswith(f"Caught {kind.__name__} in DataLoader worker"):
        return text
    prefix = f"{kind.__module__}.{kind.__qualname__}: "
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(prefix):  # the traceback's last entry, possibly continued on more lines
            return "\n".join([lines[i][len(prefix):], *lines[i + 1:]]).strip()
    return text


class DataError(IumaskError):
    """A dataset file is missing, unreadable, of the wrong size or has labels out of range."""


class StoreMismatchError(IumaskError):
    """A mask store was made from other data, another ensemble or other options."""
