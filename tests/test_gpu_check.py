"""benchmarks/gpu_check.py without a GPU: ``--help`` documents every check, and with CUDA hidden
(``CUDA_VISIBLE_DEVICES=""``, so this holds on a GPU machine too) it lists what it would check, runs
nothing, prints no figure or verdict, and exits 0. What it does on a GPU is not tested here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
CHECKS = ("train-fp32", "train-fp16", "train-bf16", "resume", "masks-off", "masks-fp16", "masks-bf16",
          "channels-last", "pinned-memory", "steady-state", "nccl", "camvid")


def gpu_check(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", IUMASK_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=tmp_path)


def test_help_documents_the_checks_and_options(tmp_path):
    result = gpu_check("--help", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    for text in (*CHECKS, "--device", "--quick", "--out", "--camvid", "--timeout", "Exit status"):
        assert text in result.stdout, text


def test_without_cuda_it_lists_the_checks_and_pretends_nothing(tmp_path):
    out = tmp_path / "kept"
    result = gpu_check("--out", str(out), "--camvid", str(tmp_path / "no-camvid"), tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout + result.stderr
    assert "no CUDA device here" in text and "nothing was run" in text
    for name in CHECKS:
        assert f"  - {name}: " in text, name
    assert "not found (that check would be skipped)" in text  # the --camvid given has no CamVid
    # No verdict, no figure, no artifact: it did not run anything.
    assert "PASS" not in text and "FAIL" not in text and "SKIP" not in text
    assert not [line for line in text.splitlines() if line.startswith(("CHECK ", "summary"))]
    assert not re.search(r"\d images/s|ratio \d|loss \d", text)
    assert not out.exists()
