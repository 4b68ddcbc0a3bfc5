"""How iumask's cost grows with the number of images: make-masks and evaluate on generated folder
datasets of N small images (64 × 64), N = 1k, 5k and 20k by default (100k more with ``--full``).

For each N it runs the real CLI in a child process (stderr is not a terminal, so make-masks prints
a plain line per tenth of its images) and reports:

* make-masks start-up: seconds from the process start to its first image, estimated from the
  times of the 10 % and 20 % lines (start-up = t10 − (t20 − t10)); steady-state images/s between
  the 10 % line and the end;
* the cache-hit rerun of make-masks (same inputs: nothing recomputed), seconds;
* evaluate's start-up and images/s the same way, stopped at 30 % (evaluate has no cache: it always
  scores, so its rerun says nothing new);
* train-weighted's check of the store before it trains (open the store, read the dataset's
  headers, its fingerprint, the identity and the completion flags:
  :func:`iumask.stages.train.checked_mask_store`), seconds, in a fresh process;
* the store's file count and bytes on disk;
* peak RSS of the make-masks process.

and at the end how each grows from the smallest N to the largest (work should grow linearly,
start-up and cache hits sub-linearly, memory not at all). The default sizes take about 5 minutes
on 2 CPU cores. The model is one untrained-quality
member (MobileNetV2 FPN, one epoch on 16 images): its weights do not change the cost.

Usage::

    python benchmarks/bench_scale.py [--sizes 1000,5000,20000] [--full] [--work DIR] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from iumask.data.synthetic import generate_synthetic

# Runs argv[2:], timing its stderr lines; with argv[1] > 0, stops it at its line for that percentage.
REPORT = ("import json, re, resource, subprocess, sys, time\n"
          "start = time.perf_counter()\n"
          "stop_at, stopped, lines = int(sys.argv[1]), False, []\n"
          "child = subprocess.Popen(sys.argv[2:], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)\n"
          "for line in child.stderr:\n"
          "    lines.append((time.perf_counter() - start, line.rstrip()))\n"
          "    m = re.search(r'\\((\\d+) %\\)', line)\n"
          "    if stop_at and m and int(m.group(1)) >= stop_at and not stopped:\n"
          "        child.terminate()\n"
          "        stopped = True\n"
          "code = child.wait()\n"
          "print(json.dumps({'code': 0 if stopped else code, 'seconds': time.perf_counter() - start,\n"
          "                  'lines': lines, 'max_rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")
STORE_CHECK = ("import json, sys, time\n"
               "from iumask.config import DataConfig\n"
               "from iumask.stages.train import checked_mask_store\n"
               "start = time.perf_counter()\n"
               "checked_mask_store(DataConfig(sys.argv[1]), sys.argv[2])\n"
               "print(json.dumps({'seconds': time.perf_counter() - start}))\n")
TENTH = re.compile(r"^.+: (\d+)/(\d+) \((\d+) %\), ")  # a loop's line per tenth of its images


def timed(args: list[str], stop_at_percent: int = 0) -> dict:
    """Run ``iumask args`` in a child process; its wall seconds, stderr lines with their times and
    peak RSS. With ``stop_at_percent``, the child is stopped once its progress line reaches it."""
    result = subprocess.run([sys.executable, "-c", REPORT, str(stop_at_percent), sys.executable, "-m", "iumask",
                             *args],
                            capture_output=True, text=True, check=True)
    report = json.loads(result.stdout)
    if report["code"] != 0:
        sys.exit(f"iumask {' '.join(args)} failed:\n" + "\n".join(line for _, line in report["lines"]))
    return report


def files_and_bytes(folder: Path) -> tuple[int, int]:
    count = size = 0
    for path in folder.rglob("*"):
        if path.is_file():
            count += 1
            size += path.stat().st_size
    return count, size


def startup_and_rate(report: dict, n: int) -> tuple[float, float]:
    """Seconds before the first image (t10 − (t20 − t10), from the 10 % and 20 % lines) and
    images/s from the 10 % line to the last line."""
    tenths = [(t, int(m.group(1))) for t, line in report["lines"] if (m := TENTH.match(line))]
    t10, done10 = next((t, done) for t, done in tenths if done >= 0.1 * n)
    t20 = next(t for t, done in tenths if done >= 0.2 * n)
    t_end, done_end = tenths[-1]
    return max(t10 - (t20 - t10), 0.0), ((done_end - done10) / (t_end - t10) if t_end > t10 else float("nan"))


def measure(n: int, work: Path, model: Path, device: str) -> dict:
    data = work / f"data-{n}"
    if not (data / "synthetic.json").is_file():
        t = time.perf_counter()
        generate_synthetic(data, num_train=n, num_val=max(8, n // 50), height=64, width=64, seed=1)
        print(f"  generated {n} images in {time.perf_counter() - t:.1f} s", flush=True)
    store = work / f"masks-{n}.zarr"
    masks = ["make-masks", "--model", str(model), "--data", str(data), "--store", str(store), "--device", device,
             "--batch-size", "32", "--overwrite"]
    first = timed(masks)
    startup, steady = startup_and_rate(first, n)
    rerun = timed(masks[:-1])  # no --overwrite: the same inputs, a cache hit
    check = subprocess.run([sys.executable, "-c", STORE_CHECK, str(data), str(store)], capture_output=True,
                           text=True, check=True)
    files, size = files_and_bytes(store)
    results = work / f"results-{n}.json"
    evaluate = ["evaluate", "--model", str(model), "--data", str(data), "--split", "train", "--output", str(results),
                "--device", device, "--pavpu-threshold", "1"]
    eval_first = timed(evaluate, stop_at_percent=30)  # enough for its start-up and rate
    eval_startup, eval_rate = startup_and_rate(eval_first, n)
    return {"n": n, "masks_seconds": first["seconds"], "startup_s": startup, "images_per_s": steady,
            "masks_rerun_s": rerun["seconds"], "store_check_s": json.loads(check.stdout)["seconds"],
            "store_files": files, "store_mb": size / 2**20,
            "peak_rss_mb": first["max_rss_kb"] / 1024,
            "evaluate_startup_s": eval_startup, "evaluate_images_per_s": eval_rate}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,5000,20000", help="comma-separated image counts")
    parser.add_argument("--full", action="store_true", help="add 100000 images")
    parser.add_argument("--work", type=Path, default=None, help="folder for the datasets and stores (kept)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")] + ([100_000] if args.full else [])
    work = args.work or Path(tempfile.mkdtemp(prefix="iumask-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("IUMASK_CACHE", str(work / "cache"))
    print(f"work folder {work}; {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)

    model = work / "model"
    if not (model / "ensemble.json").is_file():
        small = generate_synthetic(work / "data-train", num_train=16, num_val=4, height=64, width=64, seed=0,
                                   overwrite=True)
        subprocess.run([sys.executable, "-m", "iumask", "train-baseline", "--data", str(small), "--out", str(model),
                        "--encoder", "mobilenet_v2", "--arch", "fpn", "--epochs", "1", "--batch-size", "8",
                        "--no-augment", "--device", args.device], check=True, stderr=subprocess.DEVNULL)

    rows = []
    for n in sizes:
        print(f"N = {n}", flush=True)
        rows.append(measure(n, work, model, args.device))
        print("  " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}),
              flush=True)

    header = ("images", "make-masks s", "start-up s", "images/s", "cache-hit rerun s", "train-weighted check s",
              "store files", "store MB", "peak RSS MB", "evaluate start-up s", "evaluate images/s")
    keys = ("n", "masks_seconds", "startup_s", "images_per_s", "masks_rerun_s", "store_check_s", "store_files",
            "store_mb", "peak_rss_mb", "evaluate_startup_s", "evaluate_images_per_s")
    print("\n| " + " | ".join(header) + " |\n|" + "--:|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        print(f"\nfrom {a['n']} to {b['n']} images ({b['n'] / a['n']:.0f}x):")
        for key, label in (("masks_seconds", "make-masks seconds"), ("startup_s", "make-masks start-up"),
                           ("masks_rerun_s", "make-masks cache-hit rerun"),
                           ("store_check_s", "train-weighted store check"), ("store_files", "store files"),
                           ("peak_rss_mb", "peak RSS"), ("evaluate_startup_s", "evaluate start-up")):
            print(f"  {label:28s} x{b[key] / a[key]:.2f}" if a[key] else f"  {label:28s} (0 at {a['n']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
