"""Where the tests' data comes from: the real CamVid labels (optional) and the files of a synthetic
dataset, plus small label-map transformations shared by several test files.

Real data: CamVid label maps (SegNet 11-class version, 360x480, 11 = void). They are looked up at
``$IUMASK_CAMVID`` or else at ``<repo>/../shared/data/camvid`` (``train/``, ``trainannot/``, ...); the
tests that need them are skipped when they are absent. The ``camvid_dir`` fixture of ``conftest.py``
is the fixture form of the same lookup.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

CAMVID_CLASSES = 11
CAMVID_VOID = 11


# --------------------------------------------------------------------------------------------
# CamVid
# --------------------------------------------------------------------------------------------

def camvid_root() -> Path:
    """``$IUMASK_CAMVID``, else ``<repository>/data/camvid`` (where ``iumask download camvid --out
    data/camvid`` puts it) if it has labels, else ``../shared/data/camvid`` beside the repository."""
    env = os.environ.get("IUMASK_CAMVID")
    if env:
        return Path(env)
    repository = Path(__file__).resolve().parents[1]
    downloaded = repository / "data" / "camvid"
    if (downloaded / "trainannot").is_dir():
        return downloaded
    return repository.parent / "shared" / "data" / "camvid"


def camvid_label_files(count: int | None = None) -> list[Path]:
    """All CamVid training label files, or ``count`` of them spread evenly over the sequences;
    [] when fewer than ``count`` (or none) exist."""
    folder = camvid_root() / "trainannot"
    files = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if count is None:
        return files
    if len(files) < count:
        return []
    return [files[i] for i in np.linspace(0, len(files) - 1, count).round().astype(int)]


def skip_without_camvid(count: int = 1) -> None:
    """Skip the calling test (or fixture) when fewer than ``count`` CamVid training labels exist."""
    if not camvid_label_files(count):
        pytest.skip(
            f"CamVid labels not found under {camvid_root() / 'trainannot'} "
            "(set IUMASK_CAMVID to the camvid folder holding trainannot/)"
        )


@lru_cache(maxsize=None)
def load_camvid_labels(count: int) -> tuple[np.ndarray, ...]:
    """``count`` CamVid training labels spread over the sequences (uint8, 11 = void); () without CamVid."""
    labels = []
    for path in camvid_label_files(count):
        label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert label is not None and label.dtype == np.uint8 and label.ndim == 2, path
        assert label.max() <= CAMVID_VOID
        labels.append(label)
    return tuple(labels)


def camvid_labels(count: int = 5) -> list[np.ndarray]:
    """Copies of ``load_camvid_labels(count)``; skips the calling test without CamVid."""
    skip_without_camvid(count)
    return [label.copy() for label in load_camvid_labels(count)]


# --------------------------------------------------------------------------------------------
# label maps
# --------------------------------------------------------------------------------------------

def downsample(label: np.ndarray, height: int, width: int) -> np.ndarray:
    return cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)


def perturb_to_prediction(label: np.ndarray, rng: np.random.Generator, num_classes: int = 11) -> np.ndarray:
    """A plausible 'prediction' from a ground-truth map: shifted, with wrong-class rectangles,
    salt noise, and no void (void pixels get random classes)."""
    h, w = label.shape
    pred = np.roll(label, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), axis=(0, 1)).copy()
    for _ in range(12):
        rh, rw = int(rng.integers(2, h // 6)), int(rng.integers(2, w // 6))
        y, x = int(rng.integers(0, h - rh)), int(rng.integers(0, w - rw))
        pred[y:y + rh, x:x + rw] = rng.integers(0, num_classes)
    noise = rng.random(label.shape) < 0.01
    pred[noise] = rng.integers(0, num_classes, int(noise.sum()))
    void = pred >= num_classes
    pred[void] = rng.integers(0, num_classes, int(void.sum()))
    return pred.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# a dataset folder (images/<split>/<id>.png, labels/<split>/<id>.png), read without iumask
# --------------------------------------------------------------------------------------------

def ids_of(root: Path, split: str) -> list[str]:
    return sorted(p.stem for p in (root / "images" / split).glob("*.png"))


def read_label(root: Path, split: str, image_id: str) -> np.ndarray:
    return np.array(Image.open(root / "labels" / split / f"{image_id}.png"))


@contextlib.contextmanager
def small_tmpfs(target: Path, size: str = "300k"):
    """A real size-limited tmpfs at ``target``; the test is skipped where mounting is not allowed.
    Unmounted afterwards (lazily if something still holds it)."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({exc}); needs root (or a mount namespace)")
    try:
        yield target
    finally:
        if os.path.ismount(target) and subprocess.run(["umount", str(target)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(target)], check=False)
