"""Assertions the tests share about iumask's errors: one line, naming what is wrong."""

from __future__ import annotations

import contextlib

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
