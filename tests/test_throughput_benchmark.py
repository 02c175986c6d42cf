"""benchmarks/throughput.py is a GPU benchmark: without CUDA it must say so and measure nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_refuses_without_cuda() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--backends", "plain", "--preset", "tiny"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "Nothing was measured" in proc.stderr
    assert proc.stdout == ""  # no JSON that could pass for figures


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_preset_runs_every_backend_on_a_gpu() -> None:
    import json

    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--seq-length", "256", "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(proc.stdout)
    for backend in ("plain", "deepspeed", "megatron"):
        result = report["results"][backend]
        assert "error" not in result, result
        assert result["tokens_per_s"] > 0 and result["peak_memory_gib"] > 0
    assert proc.returncode == 0
