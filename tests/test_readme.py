"""The README's quick start runs as written, in a fresh folder laid out like a clone: each command of
its ``bash`` blocks, with only what makes it take seconds added (tiny training for ``run``;
``--dry-run`` for the 2-hour experiment, which still reads the spec and the downloaded data), and
``iumask download camvid`` fetching a miniature CamVid from a server on 127.0.0.1 that the test
starts (``IUMASK_CAMVID_URL``). A README command the CLI no longer takes fails here."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from cli_runner import iumask
from test_download import SUMS, Server, without_proxy

from iumask import download

REPOSITORY = Path(__file__).resolve().parents[1]
# Added to each command so that it runs in seconds; everything the README writes is kept.
TINY = {
    "run": ["--encoder", "mobilenet_v2", "--epochs", "1", "--size", "32x32", "--batch-size", "8",
            "--no-augment", "--device", "cpu"],
    "download": [],
    "experiment": ["--dry-run", "--device", "cpu"],
}


def quick_start_commands() -> list[str]:
    """Every command line of the ``bash`` blocks under the README's "Quick start" heading."""
    text = (REPOSITORY / "README.md").read_text()
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line.split(" #")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_readme_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    commands = quick_start_commands()
    assert commands and all(c.startswith("iumask ") for c in commands), commands
    clone = tmp_path / "clone"
    shutil.copytree(REPOSITORY / "examples", clone / "examples")
    monkeypatch.chdir(clone)
    server = Server()
    try:
        without_proxy(monkeypatch)
        monkeypatch.setenv("IUMASK_CAMVID_URL", server.url)
        monkeypatch.setattr(download, "camvid_sums", lambda: SUMS)  # the miniature's own sums
        for command in commands:
            args = shlex.split(command)[1:]
            assert args[0] in TINY, f"README command {command!r}: add its tiny settings to TINY"
            capsys.readouterr()
            iumask(*args, *TINY[args[0]])
    finally:
        server.close()
    assert json.loads((clone / "iumask-run" / "results.json").read_text())["results"]
    assert (clone / "data" / "camvid" / "SHA256SUMS").is_file()
    plan = capsys.readouterr().out
    assert "regular" in plan and "iu" in plan  # the experiment's plan names its arms
