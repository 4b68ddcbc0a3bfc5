"""Run the iumask CLI in-process, exactly as the console script does, and check its exit code."""

from __future__ import annotations

import sys

from iumask.cli import main


def iumask(*args, expect: int = 0) -> None:
    argv = sys.argv
    sys.argv = ["iumask", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        sys.argv = argv
    assert code == expect, f"iumask {' '.join(map(str, args))} exited {code}, expected {expect}"


# The training options of the tiny runs most CLI tests make: one mobilenet_v2 member, one epoch.
TINY_TRAIN = ["--encoder", "mobilenet_v2", "--epochs", "1", "--batch-size", "2", "--lr", "1e-3",
              "--backbone-lr-factor", "1", "--device", "cpu", "--no-augment"]
