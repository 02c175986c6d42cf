"""benchmarks/throughput.py is a GPU benchmark: without CUDA it must say so and measure nothing.
Its driver (one process per backend, each result written as soon as it is known, the processes'
output streamed to a log) is checked on CPU too, where every backend's process fails."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


def load_throughput() -> ModuleType:
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_each_backend_is_written_down_as_soon_as_it_ends(tmp_path: Path) -> None:
    throughput = load_throughput()
    args = throughput.parse(["--preset", "tiny", "--timeout", "300"])
    # Without CUDA every backend's process exits 2; the driver reports it and goes on.
    results = throughput.run_all(["plain", "megatron"], args, tmp_path)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["backend"] for r in records] == ["plain", "megatron"]
    for record in records:
        assert record["error"] == "exit 2"
        assert "--preset=tiny" in record["args"]
        assert "needs a CUDA GPU" in record["stderr_tail"]  # read back from the log
        assert results[record["backend"]]["error"] == "exit 2"
    log = (tmp_path / "run.log").read_text()
    assert log.count("needs a CUDA GPU") == 2
    assert "--child plain" in log and "--child megatron" in log


def test_a_child_past_its_timeout_is_stopped(tmp_path: Path) -> None:
    throughput = load_throughput()
    pid_file, log = tmp_path / "pid", tmp_path / "run.log"
    child = (
        "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); "
        "print('started', flush=True); time.sleep(600)"
    )
    code = throughput.run_logged([sys.executable, "-c", child, str(pid_file)], {}, log, 10)
    assert code is None  # stopped, not finished
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(pid_file.read_text()), 0)
    assert "started" in log.read_text()  # its output was in the log as it ran


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_preset_runs_every_backend_on_a_gpu(tmp_path: Path) -> None:
    args = ["--preset", "tiny", "--seq-length", "256", "--steps", "3", "--out-dir", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )
    report = json.loads(proc.stdout)
    for backend in ("plain", "deepspeed", "megatron"):
        result = report["results"][backend]
        assert "error" not in result, result
        assert result["tokens_per_s"] > 0 and result["peak_memory_gib"] > 0
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["backend"] for line in lines] == ["plain", "deepspeed", "megatron"]
    assert proc.returncode == 0
