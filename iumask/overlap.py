"""Host work that overlaps the accelerator: a small thread pool fed through a bounded queue.

make-masks, evaluate, predict and online training hand per-image host work (instance
uncertainty, store and file writes) to a :class:`BackgroundPool` and go on with the next batch on
the device. OpenCV, numpy and zarr's I/O release the GIL, so threads run in parallel. At most
``max_pending`` tasks wait or run at once: :meth:`BackgroundPool.submit` blocks beyond that, so a
slow disk slows the producer down instead of growing memory (back-pressure). The first error of a
task is raised in the producer at its next ``submit`` or at :meth:`BackgroundPool.drain`.

``threads = 0`` runs every task at once in the caller: the serial path (what tests compare with).

:func:`resolve_workers` turns ``--workers auto`` into a number of data-loader processes.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from iumask.errors import IumaskError

AUTO = "auto"
MAX_AUTO_WORKERS = 8


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under a batch scheduler)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_workers(workers: int | str, world_size: int = 1) -> int:
    """``auto``: the CPUs of this rank (available CPUs / processes on the machine) less two (the
    main process: the model's host side and the background pool), at most 8; 0 on small
    machines, where workers would only compete with the main process. An int is kept."""
    if workers != AUTO:
        return int(workers)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or 1)
    return max(0, min(MAX_AUTO_WORKERS, available_cpus() // max(local, 1) - 2))


THREADS_VARIABLE = "IUMASK_BACKGROUND_THREADS"


def background_threads() -> int:
    """Threads of the background pool of make-masks, predict and online training (IU and store
    writes beside the model): ``$IUMASK_BACKGROUND_THREADS`` if set (0: none, every task runs in
    the main thread, e.g. to debug or to profile), else 2 where there are CPUs to spare, else 1."""
    value = os.environ.get(THREADS_VARIABLE, "").strip()
    if not value:
        return 2 if available_cpus() >= 4 else 1
    if not value.isdigit():
        raise IumaskError(f"${THREADS_VARIABLE} must be an integer >= 0 (threads of the background pool), "
                          f"got {value!r}; set it to a number or unset it")
    return int(value)


class BackgroundPool:
    """A bounded pool of ``threads`` threads (0: run tasks in the caller)."""

    def __init__(self, threads: int, max_pending: int | None = None):
        self.threads = threads
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="iumask-bg") if threads else None
        self._slots = threading.BoundedSemaphore(max_pending or 2 * max(threads, 1))
        self._futures: list[Future] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the background, blocking while ``max_pending`` tasks are in flight."""
        self._raise_done()
        if self._executor is None:
            fn(*args)
            return
        self._slots.acquire()
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)

    def map(self, fn: Callable[..., Any], *iterables) -> list:
        """``list(map(fn, *iterables))`` on the pool's threads (in the caller without threads)."""
        if self._executor is None:
            return list(map(fn, *iterables))
        return list(self._executor.map(fn, *iterables))

    def _raise_done(self) -> None:
        pending = []
        for future in self._futures:
            if future.done():
                future.result()  # raises the task's error
            else:
                pending.append(future)
        self._futures = pending

    def drain(self) -> None:
        """Wait for every task; raise the first error."""
        futures, self._futures = self._futures, []
        for future in futures:
            future.result()

    def close(self, cancel: bool = False) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self) -> BackgroundPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            # On an error the queued tasks are dropped (their images stay incomplete); running
            # ones finish, so nothing is left half-written by this process.
            self.close(cancel=exc_type is not None)
