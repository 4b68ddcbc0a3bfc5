"""Where the benchmarks find CamVid, as the tests do: ``$IUMASK_CAMVID``, the repository's
``data/camvid`` (where ``iumask download camvid --out data/camvid`` puts it), or
``../shared/data/camvid`` beside the repository. Imports nothing heavy (bench_startup times the CLI's
start)."""

from __future__ import annotations

import os
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
CAMVID_PLACES = (os.environ.get("IUMASK_CAMVID"), REPOSITORY / "data" / "camvid",
                 REPOSITORY.parent / "shared" / "data" / "camvid")


def find_camvid(given: str | os.PathLike | None = None) -> Path | None:
    """``given`` if it holds CamVid's ``trainannot/``, else (when ``given`` is None) the first of
    :data:`CAMVID_PLACES` that does; None when none does."""
    places = [given] if given else CAMVID_PLACES
    return next((Path(p) for p in places if p and (Path(p) / "trainannot").is_dir()), None)
