"""One exception type for every user-facing failure.

The CLI prints ``error: <message>`` on one line and exits non-zero. Messages name the file
involved and say how to fix the problem, so they read well without a traceback.
"""

from __future__ import annotations


class IumaskError(Exception):
    """A problem with the user's input or artifacts (not a bug in iumask)."""


class DataError(IumaskError):
    """A dataset file is missing, unreadable, of the wrong size or has labels out of range."""


class StoreMismatchError(IumaskError):
    """A mask store was made from other data, another ensemble or other options."""
