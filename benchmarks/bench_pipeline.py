"""Benchmark of the pipeline's throughput: does everything that is not the network hide behind it?

Measured in one run, on the same images and models, each figure printed with its ratio:

1. bare ensemble inference (forward passes only, images already in memory) in images/s, against
   ``make-masks`` end to end on the same images (decoding, entropy, IU, store writes), overlapped
   (loader workers + background pool) and serial (``--workers 0``, no pool): the ratio
   make-masks / bare (goal on a GPU: >= 0.95); then the steady state on a dataset large enough
   that start-up is a small share: make-masks images/s after its first tenth (a child process
   running the CLI, timed from its plain progress lines) against bare inference on the same
   images in the same run (goal on a CPU: >= 0.85), and the share of each part of the per-image
   work done one after another (read + decode, inference, entropy/argmax, IU, store write), from
   which the bottleneck on a GPU can be predicted (inference shrinks, the rest stays on the CPU);
2. data loading images/s for 0, 1, 2, ... loader workers, on CamVid (360 x 480, when present) and on
   synthetic 2048 x 1024 images (how many workers a GPU needs);
3. a plain cross-entropy training step against the IU-weighted step, same model and batch (goal:
   <= 1.05);
4. the online step split: the members' forward and backward against the mask computation (goal:
   masks <= 10 % of the step);
5. make-masks peak memory (RSS of a fresh process) for N and 4N images (goal: flat).

Usage::

    python benchmarks/bench_pipeline.py --quick            # a few minutes on a 2-core CPU machine
    python benchmarks/bench_pipeline.py --device cuda      # the full version on a GPU

Timings are wall-clock medians where repeated; on a shared machine run it when nothing else runs.
The goals are printed beside the figures; the exit status is 0 whatever they are (a benchmark
reports, it does not gate).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from camvid_location import find_camvid

ROOT = Path(__file__).resolve().parents[1]
CAMVID = find_camvid() or ROOT / "data" / "camvid"


def log(text: str) -> None:
    print(text, flush=True)


def timed(fn, repeats: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls (seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- fixtures


def make_ensemble(work: Path, args) -> tuple[Path, Path]:
    """A synthetic dataset of ``args.images`` training images and an ensemble trained on it for one
    epoch (the weights do not matter for speed; the stages do the real work)."""
    from iumask.config import AugmentConfig, DataConfig, LossConfig, ModelConfig, TrainConfig
    from iumask.data.synthetic import generate_synthetic
    from iumask.stages.train import train_baseline

    h, w = args.size
    data = generate_synthetic(work / "data", num_train=args.images, num_val=2, height=h, width=w, seed=1)
    ensemble = train_baseline(DataConfig(data), ModelConfig(tuple(args.encoders)),
                              TrainConfig(epochs=1, batch_size=4, lr=1e-3, num_workers=0),
                              LossConfig(exponent=0.0), AugmentConfig(enabled=False), work / "ensemble",
                              device=args.device)
    return ensemble, data


# ----------------------------------------------------------------------------- 1. inference vs make-masks


@contextlib.contextmanager
def background_threads(value: str | None):
    """$IUMASK_BACKGROUND_THREADS set to ``value`` inside the block (None: as it was)."""
    from iumask.overlap import THREADS_VARIABLE

    before = os.environ.get(THREADS_VARIABLE)
    if value is not None:
        os.environ[THREADS_VARIABLE] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(THREADS_VARIABLE, None)
        else:
            os.environ[THREADS_VARIABLE] = before


def bench_make_masks(ensemble: Path, data: Path, work: Path, args) -> None:
    from iumask.config import DataConfig, MaskConfig
    from iumask.data.dataset import SegmentationDataset
    from iumask.model import Model, load_source
    from iumask.stages.masks import make_masks
    from iumask.transfer import to_device

    device = torch.device(args.device)
    source = load_source(ensemble, "ensemble", device)
    dataset = SegmentationDataset(DataConfig(data).open("train"), source.size)
    batch = args.batch
    images = [torch.stack([dataset[i]["image"] for i in range(k, min(k + batch, len(dataset)))])
              for k in range(0, len(dataset), batch)]
    images = [to_device(x, device) for x in images]

    def bare():
        with torch.no_grad():
            for x in images:
                source.probs(x)
        sync(device)

    bare()  # warm-up
    bare_s = timed(bare, args.repeats)
    n = len(dataset)
    # serial: no loader workers and no background pool ($IUMASK_BACKGROUND_THREADS=0)
    variants = {"overlapped": (MaskConfig(batch_size=batch), None),
                "serial": (MaskConfig(batch_size=batch, num_workers=0), "0")}
    seconds: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
        for name, (options, threads) in variants.items():
            store = work / f"masks-{name}-{time.perf_counter_ns()}.zarr"
            with background_threads(threads):
                seconds.setdefault(name, []).append(
                    timed(lambda o=options, s=store: make_masks(Model.resolve(ensemble), DataConfig(data), o, s,
                                                                device=args.device)))
    runs = {name: statistics.median(values) for name, values in seconds.items()}
    log(f"\n1. ensemble of {len(args.encoders)} ({', '.join(args.encoders)}), {n} images of "
        f"{args.size[0]}x{args.size[1]}, batch {batch}, device {device}")
    log(f"   bare ensemble inference      {n / bare_s:8.2f} images/s")
    for name, seconds in runs.items():
        log(f"   make-masks {name:<12}      {n / seconds:8.2f} images/s   ratio to bare inference "
            f"{bare_s / seconds:.3f}")
    log(f"   overlapped / serial make-masks: {runs['serial'] / runs['overlapped']:.3f}x   "
        "(goal on a GPU: make-masks >= 0.95 of bare inference)")
    log("   (make-masks end to end: loading the models, reading every header, creating the store included)")


def bench_steady_state(ensemble: Path, work: Path, args) -> None:
    """Steady-state make-masks against bare inference on the same images, and the per-part shares."""
    from bench_scale import startup_and_rate
    from bench_scale import timed as timed_cli

    from iumask.config import DataConfig
    from iumask.data.dataset import SegmentationDataset
    from iumask.data.synthetic import generate_synthetic
    from iumask.inference import InstanceUncertainty, pixel_maps
    from iumask.model import load_source
    from iumask.store import MaskStore
    from iumask.transfer import to_device, to_host

    h, w = args.size
    n = args.steady_images
    data = generate_synthetic(work / "steady", num_train=n, num_val=1, height=h, width=w, seed=4)
    report = timed_cli(["make-masks", "--model", str(ensemble), "--data", str(data), "--store",
                        str(work / "steady.zarr"), "--device", args.device, "--batch-size", str(args.batch)])
    startup, masks_rate = startup_and_rate(report, n)

    device = torch.device(args.device)
    source = load_source(ensemble, "ensemble", device)
    folder = DataConfig(data).open("train")
    dataset = SegmentationDataset(folder, source.size)
    parts = dict.fromkeys(("read + decode", "inference", "entropy/argmax", "IU", "store write"), 0.0)
    batches = []
    for k in range(0, n, args.batch):
        start = time.perf_counter()
        samples = [dataset[i] for i in range(k, min(k + args.batch, n))]
        parts["read + decode"] += time.perf_counter() - start
        batches.append((torch.stack([s["image"] for s in samples]), [s["label"].numpy() for s in samples]))

    def bare() -> None:
        with torch.no_grad():
            for images, _ in batches:
                source.probs(to_device(images, device))
        sync(device)

    bare()  # warm-up
    bare_s = timed(bare, args.repeats)

    iu_of = InstanceUncertainty(folder.classes.num_classes, folder.classes.ignore_index)
    identity = {"image_ids": folder.ids, "image_shapes": [[h, w]] * n, "class_names": list(folder.classes.names),
                "options": {}, "member_sha256": [], "dataset_fingerprint": None}
    store = MaskStore.create(work / "parts.zarr", identity)
    index = 0
    with torch.no_grad(), store.writes(range(n)) as out:
        for images, labels in batches:
            start = time.perf_counter()
            probs = source.probs(to_device(images, device))
            sync(device)
            parts["inference"] += time.perf_counter() - start
            start = time.perf_counter()
            maps = pixel_maps(probs)
            entropy, prediction = to_host(maps.entropy), to_host(maps.prediction)
            parts["entropy/argmax"] += time.perf_counter() - start
            for k, label in enumerate(labels):
                start = time.perf_counter()
                iu = iu_of.image(prediction[k], entropy[k], label)
                parts["IU"] += time.perf_counter() - start
                start = time.perf_counter()
                out.write(index, entropy[k], iu, prediction[k])
                parts["store write"] += time.perf_counter() - start
                index += 1
        start = time.perf_counter()
    parts["store write"] += time.perf_counter() - start  # the last shard, written on leaving the block
    total = sum(parts.values())
    log(f"\n   steady state, {n} images of {h}x{w} (make-masks CLI in a child process, start-up {startup:.1f} s "
        "excluded)")
    log(f"   bare ensemble inference      {n / bare_s:8.2f} images/s")
    log(f"   make-masks steady state      {masks_rate:8.2f} images/s   ratio to bare inference "
        f"{masks_rate * bare_s / n:.3f}   (goal on a CPU: >= 0.85)")
    log(f"   per-image work done one part after another: {1000 * total / n:.1f} ms/image")
    for name, seconds in parts.items():
        log(f"     {name:<16} {1000 * seconds / n:7.2f} ms/image   {100 * seconds / total:5.1f} %")
    host = parts["read + decode"] + parts["IU"] + parts["store write"]  # on the CPU whatever the device
    log(f"   host parts (read + decode, IU, store write): {1000 * host / n:.1f} ms/image; on a device where "
        f"inference and entropy/argmax take less, they bound make-masks at about {n / host:.0f} images/s per "
        "CPU core they get (loader workers and background threads run them beside the device)")


# ----------------------------------------------------------------------------- 2. data loading


def bench_loading(work: Path, args) -> None:
    from torch.utils.data import DataLoader

    from iumask.data.dataset import SegmentationDataset
    from iumask.data.formats import open_dataset
    from iumask.data.synthetic import generate_synthetic

    sets = []
    if (CAMVID / "trainannot").is_dir():
        folder = open_dataset(CAMVID, "train", "camvid")
        sets.append(("CamVid 360x480", SegmentationDataset(folder, None), min(len(folder), args.load_images)))
    big = generate_synthetic(work / "big", num_train=args.big_images, num_val=1, height=1024, width=2048, seed=2)
    sets.append(("synthetic 1024x2048", SegmentationDataset(open_dataset(big, "train"), None), args.big_images))
    log("\n2. data loading (decode + normalise), images/s by loader workers")
    for name, dataset, count in sets:
        subset = torch.utils.data.Subset(dataset, list(range(count)))
        figures = []
        for workers in args.workers:
            loader = DataLoader(subset, batch_size=1, num_workers=workers)
            seconds = timed(lambda loader=loader: [None for _ in loader])
            figures.append(f"{workers}: {count / seconds:7.2f}")
        log(f"   {name:<22} " + "   ".join(figures))


# ----------------------------------------------------------------------------- 3. CE vs IU step


def bench_loss_step(args) -> None:
    from iumask.config import LossConfig
    from iumask.losses import build_loss
    from iumask.models import build_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.encoders[0], 11).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    h, w = args.size
    images = torch.randn(args.batch, 3, h, w, device=device)
    labels = torch.randint(0, 11, (args.batch, h, w), device=device)
    iu = torch.rand(args.batch, h, w, device=device) * 2
    losses = {"cross-entropy": (build_loss(LossConfig(exponent=0.0), None, 255, iu_weighted=False), None),
              "iu-weighted": (build_loss(LossConfig(exponent=2.0), None, 255, iu_weighted=True), iu)}

    def step(name):
        fn, masks = losses[name]
        optimizer.zero_grad(set_to_none=True)
        fn(model(images), labels, masks).backward()
        optimizer.step()
        sync(device)

    for name in losses:
        step(name)  # warm-up
    seconds = {}
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        for name in losses:
            seconds.setdefault(name, []).append(timed(lambda name=name: step(name)))
    ce, weighted = (statistics.median(seconds[n]) for n in losses)
    log(f"\n3. training step, {args.encoders[0]}, batch {args.batch} of {h}x{w}")
    log(f"   cross-entropy {1000 * ce:8.1f} ms   IU-weighted {1000 * weighted:8.1f} ms   ratio {weighted / ce:.3f} "
        "(goal <= 1.05)")


# ----------------------------------------------------------------------------- 4. online step split


def bench_online(data: Path, work: Path, args) -> None:
    from iumask.config import AugmentConfig, DataConfig, LossConfig, MaskConfig, ModelConfig, TrainConfig
    from iumask.stages.train import train_online

    ensemble = train_online(DataConfig(data), ModelConfig(tuple(args.encoders)),
                            TrainConfig(epochs=1, batch_size=args.batch, lr=1e-3, num_workers=0),
                            LossConfig(), AugmentConfig(enabled=False), MaskConfig(), work / "online",
                            device=args.device)
    timing = json.loads(ensemble.read_text())["timing"]
    log(f"\n4. online step ({len(args.encoders)} members, batch {args.batch}), over {timing['steps']} steps")
    log(f"   members' forward+backward {1000 * timing['forward_backward_s_per_step']:8.1f} ms/step   masks "
        f"{1000 * timing['masks_s_per_step']:7.1f} ms/step   masks share {100 * timing['masks_fraction']:.1f} % "
        "(goal <= 10 %)")


# ----------------------------------------------------------------------------- 5. memory


MEMORY_CODE = """
import resource, sys
from pathlib import Path
from iumask.config import DataConfig, MaskConfig
from iumask.data.synthetic import generate_synthetic
from iumask.model import Model
from iumask.stages.masks import make_masks
ensemble, work, n, h, w, device = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \\
    int(sys.argv[5]), sys.argv[6]
data = generate_synthetic(work / f"data-{n}", num_train=n, num_val=1, height=h, width=w, seed=3)
make_masks(Model.resolve(ensemble), DataConfig(data), MaskConfig(), work / f"memory-{n}.zarr", device=device)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bench_memory(ensemble: Path, work: Path, args) -> None:
    h, w = args.size
    peaks = {}
    for n in (args.memory_images, 4 * args.memory_images):
        out = subprocess.run([sys.executable, "-c", MEMORY_CODE, str(ensemble), str(work), str(n), str(h), str(w),
                              args.device], capture_output=True, text=True, check=True)
        peaks[n] = int(out.stdout.strip().splitlines()[-1]) / 1024  # KiB -> MiB
    (n1, m1), (n4, m4) = peaks.items()
    log(f"\n5. make-masks peak memory (fresh process, images of {h}x{w})")
    log(f"   {n1} images {m1:8.0f} MiB   {n4} images {m4:8.0f} MiB   ratio {m4 / m1:.3f} (goal: flat, ~1.0)")


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a reduced version: a few minutes on 2 CPU cores")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--only", type=int, nargs="*", help="run only these parts (1-5)")
    parser.add_argument("--steady-images", type=int, help="images of the steady-state run (default 400)")
    args = parser.parse_args()
    steady_images = args.steady_images
    if args.quick:
        args.images, args.size, args.batch, args.repeats, args.steady_images = 48, (96, 128), 4, 3, 400
        args.encoders = ["mobilenet_v2", "resnet18"]
        args.load_images, args.big_images, args.workers, args.memory_images = 32, 6, [0, 1, 2], 24
    else:
        args.images, args.size, args.batch, args.repeats, args.steady_images = 96, (384, 768), 4, 3, 400
        args.encoders = ["mobilenet_v2", "resnet50", "resnet101"]
        args.load_images, args.big_images, args.workers, args.memory_images = 96, 24, [0, 1, 2, 4, 8], 32
    args.steady_images = steady_images or args.steady_images
    parts = set(args.only or range(1, 6))
    log(f"bench_pipeline: device {args.device}, torch threads {torch.get_num_threads()}, CPUs "
        f"{len(os.sched_getaffinity(0))}, {'quick' if args.quick else 'full'}")
    with tempfile.TemporaryDirectory(prefix="iumask-bench-") as tmp:
        work = Path(tmp)
        ensemble, data = make_ensemble(work, args) if parts & {1, 4, 5} else (None, None)
        if 1 in parts:
            bench_make_masks(ensemble, data, work, args)
            bench_steady_state(ensemble, work, args)
        if 2 in parts:
            bench_loading(work, args)
        if 3 in parts:
            bench_loss_step(args)
        if 4 in parts:
            bench_online(data, work, args)
        if 5 in parts:
            bench_memory(ensemble, work, args)


if __name__ == "__main__":
    main()
