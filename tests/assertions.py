"""Assertions the tests share: about iumask's errors (one line, naming what is wrong) and about the
files a command opens (:func:`opened`, counted with an audit hook on ``open``)."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest

from iumask.errors import DataError


def error_line(capsys) -> str:
    """The one ``error:`` line a failed CLI command printed (no traceback, no second error)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@contextlib.contextmanager
def raises_naming(*fragments: str, error: type[Exception] = DataError):
    """The block raises ``error`` whose message is one line containing every fragment."""
    with pytest.raises(error) as info:
        yield info
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


_OPENED: list[str] | None = None  # paths opened while recording (an audit hook cannot be removed)


def _record_open(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.path.abspath(os.fsdecode(args[0])))


sys.addaudithook(_record_open)


@contextlib.contextmanager
def opened():
    """The absolute paths of every file opened inside the block (one entry per open)."""
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None
