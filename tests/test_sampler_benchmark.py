"""benchmarks/sampler.py runs and prints its figures as JSON (the figures themselves are for
docs/performance.md, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sampler.py"


def test_sampler_benchmark_prints_one_row_per_document_length(tmp_path: Path) -> None:
    args = ["--dir", str(tmp_path), "--tokens", "200000", "--seq-length", "64", "--rows", "50"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    rows = report["results"]
    assert [r["mean_document_tokens"] for r in rows] == [8, 100, 1000, 10_000]
    assert all(r["rows"] == 49 and r["ms_per_row"] > 0 for r in rows)
    assert rows[0]["documents"] > rows[-1]["documents"]
    assert list(tmp_path.iterdir()) == []  # its corpora are removed
