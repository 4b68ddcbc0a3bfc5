"""Progress in a log: with stderr not a terminal (nohup, a cluster job, pytest's capture) no live
bar but one plain, untruncated line per tenth of a loop; training prints its own line per epoch."""

from __future__ import annotations

from iumask.progress import progress_bar


def test_a_log_gets_one_plain_line_per_tenth_from_where_a_resumed_loop_starts(capsys):
    total, start = 367, 100
    with progress_bar() as progress:
        task = progress.add_task("make-masks", total=total, completed=start, info="")
        for _ in range(total - start):
            progress.advance(task)
    lines = capsys.readouterr().err.splitlines()
    crossings = [c for c in range(start + 1, total + 1) if 10 * c // total > 10 * (c - 1) // total]
    assert [line.split(",")[0] for line in lines] == [
        f"make-masks: {c}/{total} ({100 * c / total:.0f} %)" for c in crossings]
    assert len(lines) == 8 and all(line.endswith(" s") for line in lines)


def test_no_lines_where_the_loop_prints_its_own(capsys):
    with progress_bar(lines=False) as progress:
        task = progress.add_task("baseline", total=10, info="")
        for _ in range(10):
            progress.update(task, advance=1, info="epoch 1/1")
    assert capsys.readouterr().err == ""
