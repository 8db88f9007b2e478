"""scripts/gpu_check.sh (issue 20): one command for the checks that need a GPU; --dry-run keeps it working on a
CPU (tiny phantom sizes) so that it does not rot before a GPU is at hand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_it_refuses_in_one_line_and_points_at_the_dry_run():
    done = _run(timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: no CUDA device (use --dry-run to check the script on a CPU)"
    ]


@pytest.mark.slow  # about 80 s on a loaded 2-core machine: plans 4 networks, trains, predicts
def test_dry_run_prints_the_figures_table(tmp_path):
    done = _run("--dry-run", "--scratch", str(tmp_path / "scratch"), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1].strip() == "figure"
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    for figure in (
        "training it/s (3d_fullres)",
        "training peak memory GB",
        "memory GB unet: planner estimate / measured",
        "memory GB resenc: planner estimate / measured",
        "memory GB vnet: planner estimate / measured",
        "predict seconds per case",
        "pytest -m cuda",
    ):
        assert figure in rows, figure
    assert float(rows["training it/s (3d_fullres)"].split("|")[2]) > 0
    assert "not run" in rows["nnU-Net training / predict"]
    assert "collected" in rows["pytest -m cuda"]  # the marker exists and selects the CUDA-path tests
