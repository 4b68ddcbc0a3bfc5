"""Rich progress bars and console shared by every long loop."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def warn(message: str) -> None:
    """One line on stderr (not wrapped, not read as markup), like the CLI's errors."""
    console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


def print_cache_hit(artifact) -> None:
    """The one cache-hit line, for every artifact that is reused as it is (a trained member or
    ensemble, a mask store, a results file): ``cache hit: <path> was made from these inputs``."""
    console.print(f"[green]cache hit[/green]: {escape(str(artifact))} was made from these inputs", highlight=False,
                  soft_wrap=True)


class LoggedProgress(Progress):
    """A live bar on a terminal. In a log (nohup, a cluster job: stderr is not a terminal) no bar,
    which would print one truncated line at the end, but with ``lines`` one plain, untruncated line
    each time a task passes another tenth of its total, e.g. ``make-masks: 120/367 (33 %), 42 s``."""

    def __init__(self, lines: bool = True):
        super().__init__(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=False,
            disable=not console.is_terminal,
        )
        self.lines = lines and not console.is_terminal
        self.tenths: dict[TaskID, int] = {}  # per task: the last tenth logged

    def add_task(self, *args, **kwargs) -> TaskID:
        task_id = super().add_task(*args, **kwargs)
        self.tenths[task_id] = self._tenth(task_id)  # a resumed task starts where it was
        return task_id

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _task(self, task_id: TaskID) -> Task:
        return next(task for task in self.tasks if task.id == task_id)

    def _tenth(self, task_id: TaskID) -> int:
        task = self._task(task_id)
        return int(10 * task.completed / task.total) if task.total else 0

    def _log(self, task_id: TaskID) -> None:
        if not self.lines:
            return
        tenth = self._tenth(task_id)
        if tenth > self.tenths.get(task_id, 0):
            self.tenths[task_id] = tenth
            task = self._task(task_id)
            console.print(f"{task.description}: {task.completed:.0f}/{task.total:.0f} "
                          f"({100 * task.completed / task.total:.0f} %), {task.elapsed or 0:.0f} s",
                          highlight=False, soft_wrap=True, markup=False)


def progress_bar(lines: bool = True) -> LoggedProgress:
    """The progress display of every long loop (see :class:`LoggedProgress`); ``lines=False`` where
    the loop prints its own lines in a log (training: one per epoch)."""
    return LoggedProgress(lines)
