"""``python -m iumask``: the same command line as the ``iumask`` script."""

from iumask.cli import main

main()
