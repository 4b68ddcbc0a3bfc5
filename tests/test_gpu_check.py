"""benchmarks/gpu_check.py without a GPU: ``--help`` documents every check, and with CUDA hidden
(``CUDA_VISIBLE_DEVICES=""``, so this holds on a GPU machine too) it lists what it would check, runs
nothing, prints no figure or verdict, and exits 0. With ``--device cpu`` (a self-test of the script,
not of a GPU) its cheap checks run to a pass. What it does on a GPU is not tested here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
CHECKS = ("train-fp32", "train-fp16", "train-bf16", "resume", "masks-off", "masks-fp16", "masks-bf16",
          "channels-last", "pinned-memory", "steady-state", "nccl", "camvid")


def gpu_check(*args: str, tmp_path: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", IUMASK_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
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


# The checks cheap enough for the suite; the others run the same code paths with other options.
SELF_TESTED = ("train-fp32", "masks-off", "channels-last", "pinned-memory")


@pytest.mark.slow
def test_the_cpu_self_test_runs_the_cheap_checks_to_a_pass(tmp_path):
    """With --device cpu the script checks the CPU against the CPU: its figures say nothing about a
    GPU, but its code runs, so a refactor that breaks a check (a loader it no longer finds, an option
    that no longer exists) fails here instead of on the day a GPU is lent."""
    skipped = [arg for name in CHECKS if name not in SELF_TESTED for arg in ("--skip", name)]
    result = gpu_check("--device", "cpu", "--quick", *skipped, tmp_path=tmp_path, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("CHECK ")]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in SELF_TESTED:
        assert any(line.startswith(f"CHECK {name}: PASS") for line in lines), (name, lines)
    assert f"{len(SELF_TESTED)} passed, 0 failed" in result.stdout


@pytest.mark.slow
def test_the_pipeline_benchmark_behind_the_steady_state_check_runs(tmp_path):
    """bench_pipeline's make-masks comparison (what steady-state runs), on 16 images."""
    result = subprocess.run([sys.executable, str(SCRIPT.parent / "bench_pipeline.py"), "--quick", "--only", "1",
                             "--device", "cpu", "--steady-images", "16"], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path, env=dict(os.environ, IUMASK_CACHE=str(tmp_path / "cache")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"make-masks serial .* ratio to bare inference \d", result.stdout)
    assert re.search(r"make-masks steady state .* ratio to bare inference \d", result.stdout)
