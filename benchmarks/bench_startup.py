"""How long the ``iumask`` command takes to start: commands that need no model (``--help``,
``--version``, a mistyped command, ``download``, ``check-data``) beside bare Python start-up
(``python -c pass``) and ``python -c "import torch"``, in one run on the same machine.

Each command runs in a fresh child process (the console script ``iumask`` beside this Python, or
``python -m iumask``), its output discarded; the figure is the median wall time of ``--repeat``
runs after one warm-up run (which fills the page cache and iumask's cache of dataset
fingerprints, headers and checked pixels, in a temporary ``$IUMASK_CACHE``; the line "check-data
CamVid (1st)" runs each time with an empty one), of its wall time and of its CPU time
(user + system, all its threads). Goals (issue 28): ``--help`` and ``--version`` within 0.3 s of
bare Python start-up, ``check-data`` on CamVid under 1 s. PASS/FAIL judges ``--help`` and
``--version`` by their CPU time over ``python -c pass``'s: on a machine where other processes run,
a child waits for a core and its wall time says more about the load than about iumask, and for a
single-threaded command the two agree on an idle machine. ``check-data`` reads in two threads, so
its CPU time exceeds the time a user waits: it is judged by its wall time, which means something
only on an idle machine (a warning is printed when the load average says otherwise).

``--compare DIR`` runs the same commands with another source checkout of iumask first on
``PYTHONPATH`` (e.g. a ``git worktree`` of an earlier commit), printed beside this one's: a
before/after in one run. ``--also "ARGS"`` times another iumask command line the same way (e.g.
make-masks' cache hit on a store that ``bench_scale.py --work DIR`` made).

Usage::

    python benchmarks/bench_startup.py [--camvid DIR] [--repeat 7] [--compare DIR] [--also "ARGS" ...]
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from camvid_location import find_camvid

REPOSITORY = Path(__file__).resolve().parents[1]
# Goals: seconds above bare Python start-up (--help, --version) or in all (check-data).
ABOVE_PYTHON_GOAL = 0.3
CHECK_DATA_GOAL = 1.0
# check-data of a dataset iumask has not seen (empty cache: every pixel decoded); the other
# check-data lines are reruns on the unchanged dataset (its pass is cached with its fingerprint).
COLD_CHECK = "iumask check-data CamVid (1st)"


def iumask_command() -> list[str]:
    """The console script installed beside this Python, else ``python -m iumask``."""
    script = Path(sys.executable).parent / "iumask"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "iumask"]


def median_seconds(argv: list[str], env: dict[str, str], repeat: int,
                   cold: bool = False) -> tuple[float, float, int]:
    """Median wall seconds and median CPU seconds (user + system, of the child and its threads) of
    ``repeat`` runs after one warm-up, and the exit code. ``cold``: every run with an empty
    ``$IUMASK_CACHE`` (a dataset iumask has not seen: nothing of it is cached)."""
    walls, cpus, code = [], [], 0
    for run in range(repeat + 1):
        if cold:
            env = dict(env, IUMASK_CACHE=tempfile.mkdtemp(prefix="iumask-cold-"))
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        code = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
        if run:  # the first run warms the page cache and iumask's cache
            walls.append(wall)
            cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus), code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--camvid", type=Path, default=find_camvid(),
                        help="CamVid folder for check-data (default: $IUMASK_CAMVID, data/camvid or "
                             "../shared/data/camvid)")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs of each command (median)")
    parser.add_argument("--compare", type=Path, default=None,
                        help="another iumask source checkout, run the same way (first on PYTHONPATH)")
    parser.add_argument("--also", action="append", default=[], metavar="ARGS",
                        help="another iumask command line to time the same way, e.g. a make-masks cache hit on "
                             "a store bench_scale.py --work DIR made (repeatable)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="iumask-startup-"))
    base_env = dict(os.environ, IUMASK_CACHE=str(work / "cache"))
    base_env.pop("PYTHONPATH", None)
    iumask = iumask_command()
    baselines = [("python -c pass", [sys.executable, "-c", "pass"]),
                 ('python -c "import torch"', [sys.executable, "-c", "import torch"])]
    commands: list[tuple[str, list[str], str]] = [  # (label, arguments, goal: "python", "total" or none)
        ("iumask --help", ["--help"], "python"),
        ("iumask --version", ["--version"], "python"),
        ("iumask trian-baseline (a typo)", ["trian-baseline"], ""),
        ("iumask download cityscapes", ["download", "cityscapes", "--out", str(work / "cityscapes")], ""),
    ]
    if args.camvid is not None:
        commands += [(COLD_CHECK, ["check-data", str(args.camvid)], "total"),
                     ("iumask check-data CamVid", ["check-data", str(args.camvid)], "total"),
                     ("iumask check-data CamVid --quick", ["check-data", str(args.camvid), "--quick"], "total")]
    else:
        print("CamVid not found: check-data not measured (give --camvid DIR)")
    commands += [(f"iumask {' '.join(shlex.split(line)[:1])} ({i})", shlex.split(line), "")
                 for i, line in enumerate(args.also, 1)]
    versions = [("this checkout", base_env)]
    if args.compare is not None:
        versions.append((f"--compare {args.compare}", dict(base_env, PYTHONPATH=str(args.compare.resolve()))))

    print(f"bench_startup: {sys.executable} (Python {sys.version.split()[0]}), {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; median of {args.repeat} runs after a warm-up")
    print(f"iumask command: {' '.join(iumask)}" + (f"; CamVid: {args.camvid}" if args.camvid else ""))
    if os.getloadavg()[0] > 0.75 * (os.cpu_count() or 1):
        print("warning: the machine is busy (load average above): wall times are inflated, and check-data's "
              "verdict, which judges its wall time, says little")
    for i, line in enumerate(args.also, 1):
        print(f"({i}): iumask {line}")
    header = f"  {'command':34s} {'wall s':>7s} {'CPU s':>7s} {'wall/python':>12s} {'wall/torch':>11s}"
    print("\n" + header)
    medians = {}
    for label, argv in baselines:
        medians[label] = median_seconds(argv, base_env, args.repeat)
        print(f"  {label:34s} {medians[label][0]:7.3f} {medians[label][1]:7.3f}", flush=True)
    (python, python_cpu, _), (torch, _, _) = (medians[label] for label, _ in baselines)

    verdicts = {}
    for name, env in versions:
        print(f"\n{name}\n{header}")
        for label, arguments, goal in commands:
            wall, cpu, code = median_seconds([*iumask, *arguments], env, args.repeat, cold=label == COLD_CHECK)
            line = f"  {label:34s} {wall:7.3f} {cpu:7.3f} {wall / python:11.1f}x {wall / torch:10.2f}x"
            if goal == "python":
                ok = cpu - python_cpu <= ABOVE_PYTHON_GOAL
                line += (f"  CPU +{cpu - python_cpu:.3f} s over python's "
                         f"[{'PASS' if ok else 'FAIL'} <= {ABOVE_PYTHON_GOAL} s]")
                verdicts.setdefault(name, []).append(ok)
            elif goal == "total":
                ok = wall < CHECK_DATA_GOAL
                line += f"  wall [{'PASS' if ok else 'FAIL'} < {CHECK_DATA_GOAL} s]"
                verdicts.setdefault(name, []).append(ok)
            if code != (2 if "typo" in label else 0):
                line += f"  (exit {code})"
            print(line, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print("\n" + "; ".join(f"{name}: {'PASS' if all(ok) else 'FAIL'}" for name, ok in verdicts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
