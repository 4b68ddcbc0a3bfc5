"""Benchmark of the training augmentation (``iumask.data.augment.JointAugment``): what one sample costs
in a data-loader worker, and which step costs it.

Measured in one run, on the same random 768 x 768 sample (uint8 image, uint8 label of 20 classes,
float32 IU mask: the paper's training size), each figure printed with its ratio:

1. the default augmentation with a 768 x 768 crop (scale 0.5-2, crop/pad, flip, jitter 0.2): median
   and 90th percentile ms per sample and samples/s, against the goal (<= 20 ms per sample, the
   budget a former unit test asserted: a loader worker then keeps up with a GPU step of a batch of 8
   with room to spare);
2. each step alone (jitter, scale + crop/pad, flip) and the identity (the sample check and copies
   only), as a share of the whole;
3. for reference, decoding the same sample from PNG files (image and label, as the loader does
   before augmenting): augmentation / decoding.

Every setting is timed over the same seeds (``--repeats`` rngs, one call each, after a warm-up), the
settings interleaved so that drift on a shared machine hits them alike.

Usage::

    python benchmarks/bench_augment.py --quick        # seconds
    python benchmarks/bench_augment.py                # more repeats, and 1024 x 2048 (Cityscapes) too

Timings are wall-clock; on a shared machine run it when nothing else runs. The goal is printed
beside the figures; the exit status is 0 whatever they are (a benchmark reports, it does not gate).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from iumask.data.augment import JointAugment

GOAL_MS = 20.0


def log(text: str) -> None:
    print(text, flush=True)


def make_sample(h: int, w: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A random sample of the dataset's kind: uint8 RGB image, uint8 label (20 classes), float32 mask."""
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            "label": rng.integers(0, 20, (h, w), dtype=np.uint8),
            "iu": rng.random((h, w), dtype=np.float32)}


def settings(h: int, w: int) -> dict[str, JointAugment]:
    """The whole default augmentation with an (h, w) crop, each of its steps alone, and the identity."""
    return {
        "all (default, crop = size)": JointAugment(crop=(h, w)),
        "jitter 0.2 only": JointAugment(scale=(1, 1), crop=None, flip=False, jitter=0.2),
        "scale 0.5-2 + crop/pad only": JointAugment(scale=(0.5, 2.0), crop=(h, w), flip=False, jitter=0.0),
        "flip only": JointAugment(scale=(1, 1), crop=None, flip=True, jitter=0.0),
        "identity (check + copy)": JointAugment(scale=(1, 1), crop=None, flip=False, jitter=0.0),
    }


def measure(calls: dict[str, Callable[[int], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each entry, ``repeats`` times, interleaved; call(k) gets the repeat index."""
    for call in calls.values():
        call(-1)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for k in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call(k)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def decoder(sample: dict[str, np.ndarray], work: Path):
    """Decoding the sample from PNG files as the data loader does (colour image and label)."""
    image, label = work / "image.png", work / "label.png"
    cv2.imwrite(str(image), cv2.cvtColor(sample["image"], cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(label), sample["label"])

    def decode(_: int) -> None:
        cv2.cvtColor(cv2.imread(str(image), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        cv2.imread(str(label), cv2.IMREAD_UNCHANGED)

    return decode


def bench_size(h: int, w: int, repeats: int, work: Path) -> None:
    sample = make_sample(h, w)
    augments = settings(h, w)
    calls = {name: (lambda k, aug=aug: aug(dict(sample), np.random.default_rng(k + 1)))
             for name, aug in augments.items()}
    calls["decode image + label PNG"] = decoder(sample, work)
    seconds = measure(calls, repeats)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    whole = median["all (default, crop = size)"]
    log(f"\n{h}x{w}, {repeats} samples per setting")
    log(f"   {'setting':<30} {'median ms':>10} {'p90 ms':>8} {'samples/s':>10}   ratio")
    for name, values in seconds.items():
        p90 = float(np.percentile(values, 90))
        if name.startswith("decode"):
            ratio = f"augmentation / decoding {whole / median[name]:.2f}"
        elif name.startswith("all"):
            ratio = f"to the goal {GOAL_MS:.0f} ms: {1000 * whole / GOAL_MS:.2f}"
        else:
            ratio = f"share of all {median[name] / whole:.2f}"
        log(f"   {name:<30} {1000 * median[name]:10.2f} {1000 * p90:8.2f} {1 / median[name]:10.1f}   {ratio}")
    verdict = "within" if 1000 * whole <= GOAL_MS * (h * w) / (768 * 768) else "over"
    log(f"   whole augmentation {1000 * whole:.2f} ms: {verdict} the goal ({GOAL_MS:.0f} ms at 768x768, "
        "scaled by the pixel count for other sizes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="768x768 only, fewer repeats: seconds")
    parser.add_argument("--repeats", type=int, help="samples per setting (default 20 quick, 100 full)")
    args = parser.parse_args()
    sizes = [(768, 768)] if args.quick else [(768, 768), (1024, 2048)]
    repeats = args.repeats or (20 if args.quick else 100)
    log(f"bench_augment: OpenCV {cv2.__version__} with {cv2.getNumThreads()} threads, CPUs "
        f"{len(os.sched_getaffinity(0))}, {'quick' if args.quick else 'full'}")
    with tempfile.TemporaryDirectory(prefix="iumask-bench-") as tmp:
        for h, w in sizes:
            bench_size(h, w, repeats, Path(tmp))


if __name__ == "__main__":
    main()
