"""Shared fixtures: the CamVid location, tiny synthetic datasets, the tiny baseline trained once per
session, one intra-op thread for the modules that train, and the in-process CLI runner.

Plain helpers live in modules that tests import directly: ``testdata`` (CamVid labels, reading a
dataset folder, label-map transformations), ``reference`` (slow independent reference
implementations) and ``cli_runner`` (``iumask(*args, expect=0)``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from testdata import camvid_root, skip_without_camvid


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory):
    """The suite's own IUMASK_CACHE (label statistics, dataset fingerprints), never the user's;
    child processes inherit it. Tests that need a cache of their own set it again."""
    before = os.environ.get("IUMASK_CACHE")
    os.environ["IUMASK_CACHE"] = str(tmp_path_factory.mktemp("iumask-cache"))
    yield
    if before is None:
        os.environ.pop("IUMASK_CACHE", None)
    else:
        os.environ["IUMASK_CACHE"] = before


@pytest.fixture(scope="session")
def camvid_dir() -> Path:
    """The CamVid folder (``train/``, ``trainannot/``, ...); skips the test when it has no labels."""
    skip_without_camvid()
    return camvid_root()


@pytest.fixture(scope="session")
def make_synthetic(tmp_path_factory):
    """A factory: ``make_synthetic(name, **options)`` writes a synthetic dataset with
    ``iumask.data.synthetic.generate_synthetic`` into a fresh temporary folder ``<name>N/data`` and
    returns its root. Tiny by default (4 train and 2 val images of 32x32); any option of
    ``generate_synthetic`` may be given."""

    def make(name: str = "synthetic", **options) -> Path:
        from iumask.data.synthetic import generate_synthetic

        options = {"num_train": 4, "num_val": 2, "height": 32, "width": 32, **options}
        return generate_synthetic(tmp_path_factory.mktemp(name) / "data", **options)

    return make


@pytest.fixture(scope="session")
def tiny_baseline(make_synthetic, tmp_path_factory):
    """A factory: ``tiny_baseline(folder)`` returns the session's tiny dataset (4 train and 2 val
    synthetic 32x32 images) and a copy, in ``folder/baseline``, of the one-member baseline trained
    on it with ``TINY_TRAIN``. Trained once, on first use. Every caller gets its own copy of the
    baseline, so a test that damages, retrains or caches into it changes nothing another test sees;
    the dataset is shared (manifests record its path): a test that changes data copies it first."""
    from cli_runner import TINY_TRAIN, iumask

    trained: list[tuple[Path, Path]] = []

    def copy(folder: Path) -> tuple[Path, Path]:
        if not trained:
            data = make_synthetic("tiny")
            baseline = tmp_path_factory.mktemp("tiny-baseline") / "baseline"
            before = torch.get_num_threads()
            torch.set_num_threads(1)  # see one_thread
            try:
                iumask("train-baseline", "--data", data, "--out", baseline, *TINY_TRAIN)
            finally:
                torch.set_num_threads(before)
            trained.append((data, baseline))
        data, baseline = trained[0]
        return data, Path(shutil.copytree(baseline, folder / "baseline"))

    return copy


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread while a module trains and predicts: on a machine whose cores are busy
    with other work, two spinning OpenMP threads made one tiny training take 1 s or 25 s at random.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cli():
    """``cli_runner.iumask``: run the iumask CLI in-process and check its exit code."""
    from cli_runner import iumask

    return iumask
