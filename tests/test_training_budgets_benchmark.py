"""benchmarks/training_budgets.py measures the two run-time budgets from real training runs. On
CPU (tiny model) it checks that the measuring itself works: two real runs, one JSON document on
stdout, figures that agree with each other; the runs made one at a time and combined; what a
killed benchmark leaves behind."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "training_budgets.py"
TINY = ["--preset", "tiny", "--seq-length", "64", "--steps", "12", "--interval", "5"]
TINY += ["--warmup", "2"]


def budgets(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
    )


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The benchmark run once, both runs in one process: (its --dir, --out-dir, stdout)."""
    root = tmp_path_factory.mktemp("budgets")
    work, out = root / "work", root / "out"
    work.mkdir()
    proc = budgets(*TINY, "--dir", str(work), "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, out, proc.stdout


@pytest.mark.slow
def test_budgets_from_two_real_runs(two_runs: tuple[Path, Path, str]) -> None:
    work, out, stdout = two_runs
    report = json.loads(stdout)  # stdout is the JSON document and nothing else
    every, end_only = report["runs"]["every_5"], report["runs"]["end_only"]
    # Counted from the runs' own save events: steps 5, 10 and the final 12; the final 12 alone.
    assert (every["saves"], end_only["saves"], report["intermediate_saves"]) == (3, 1, 2)
    assert len(report["save_write_s"]) == 3 and report["save_gb"] > 0
    for timing in (every, end_only):
        assert 0 < timing["data_s"] < timing["steps_s"] < timing["run_s"]
        assert 0 < timing["after_warmup_s"] < timing["run_s"]
        assert 0 < timing["steady_data_s"] < timing["steady_steps_s"] < timing["steps_s"]
        assert timing["checkpoint_s"] > 0  # every run ends with a blocking save
    assert report["final_save_s"] == end_only["checkpoint_s"]

    share = report["data_loading_pct_of_step"]
    expected = 100 * end_only["steady_data_s"] / end_only["steady_steps_s"]
    assert share == pytest.approx(expected, abs=1e-3)
    assert report["goals"]["data_loading_below_1pct"] == (share < 1)
    shares = report["checkpoint_pct_of_run_by_interval"]
    assert list(shares) == ["5", "500", "1000"]
    # A save whose write outlasts the steps after it (5 to the next save, 2 from step 10 to the
    # end): the verdict would be the short run's, so there is none, and the interval to rerun
    # with (as --interval N --steps 2N) outlasts every write.
    overlapped = max(every["save_write_s"][:-1]) > 2 * report["step_time_s"]
    assert report["writes_outlast_interval"] == overlapped
    if overlapped:
        needed = report["interval_needed"]
        assert needed * report["step_time_s"] > max(every["save_write_s"][:-1])
        assert report["goals"]["checkpoint_below_2pct_at_1000_steps"] is None
    else:
        assert report["interval_needed"] is None
    if report["checkpoint_cost_per_save_s"] > 0:
        # Saving less often costs a smaller share of the run (the same cost per save).
        assert shares["5"] >= shares["500"] >= shares["1000"] >= 0
        if not overlapped:
            assert report["goals"]["checkpoint_below_2pct_at_1000_steps"] == (shares["1000"] < 2)
    else:  # within the noise of two runs: no figure and no verdict
        assert set(shares.values()) == {None}
        assert report["goals"]["checkpoint_below_2pct_at_1000_steps"] is None
    assert not list(work.iterdir())  # runs and data went into a temporary folder, now gone

    # Each run's figures, as written when it ended, are the report's.
    records = jsonl(out / "results.jsonl")
    assert [r["run"] for r in records] == ["end-only", "every"]
    assert [r["figures"] for r in records] == [end_only, every]
    log = (out / "run.log").read_text()  # the training processes' output, and how far they got
    assert "end-only.yaml" in log and "every-5.yaml" in log
    assert "end-only: 12 steps logged" in log and "every-5: 12 steps logged" in log
    # --combine makes the same document from the written figures, without training.
    combined = budgets("--combine", str(out), timeout=120)
    assert combined.returncode == 0, combined.stderr
    assert json.loads(combined.stdout) == report


@pytest.mark.slow
def test_one_run_at_a_time_then_combined(tmp_path: Path, two_runs: tuple[Path, Path, str]) -> None:
    # The end-only run as one of the two-run benchmark wrote it; the every-N run on its own.
    (tmp_path / "end-only").mkdir()
    written = [r for r in jsonl(two_runs[1] / "results.jsonl") if r["run"] == "end-only"]
    (tmp_path / "end-only" / "results.jsonl").write_text(json.dumps(written[0]) + "\n")
    which = "every"
    proc = budgets(
        *TINY, "--only", which, "--dir", str(tmp_path), "--out-dir", str(tmp_path / which)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = jsonl(tmp_path / which / "results.jsonl")  # this run alone
    assert json.loads(proc.stdout) == record and record["run"] == which
    assert record["settings"]["steps"] == 12 and record["settings"]["interval"] == 5
    end_only = jsonl(tmp_path / "end-only" / "results.jsonl")[0]
    every_file = tmp_path / "every" / "results.jsonl"
    every = jsonl(every_file)[0]
    assert (end_only["figures"]["saves"], every["figures"]["saves"]) == (1, 3)

    proc = budgets("--combine", str(tmp_path / "end-only"), str(every_file), timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["runs"] == {"every_5": every["figures"], "end_only": end_only["figures"]}
    assert report["intermediate_saves"] == 2 and report["steps"] == 12
    assert report["device"] == end_only["device"]  # the runs', not this process's

    # Runs that cannot be compared, or a missing run, are refused.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({**every, "settings": {**every["settings"], "steps": 20}}) + "\n")
    for args, message in [
        ([str(tmp_path / "end-only"), str(other)], "settings differ"),
        ([str(tmp_path / "end-only")], "no every run"),
    ]:
        proc = budgets("--combine", *args, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr
        assert proc.stdout == ""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_benchmark_keeps_the_runs_it_finished(tmp_path: Path, sig: signal.Signals) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    args = ["--preset", "tiny", "--seq-length", "64", "--steps", "200", "--interval", "100"]
    cmd = [sys.executable, str(SCRIPT), *args, "--dir", str(work), "--out-dir", str(out)]
    results = out / "results.jsonl"
    # A process group of its own, so that a SIGKILL reaches the training process too.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 500
        log = out / "run.log"
        # Until the first run's figures are written and the second run has started.
        while not (log.exists() and "every-100.yaml" in log.read_text()) and proc.poll() is None:
            assert time.monotonic() < deadline, "the second run did not start"
            time.sleep(0.2)
        assert proc.poll() is None, "the benchmark ended before it could be killed"
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, sig)  # as a machine's time limit would
        else:
            proc.send_signal(sig)  # as `timeout` would: the benchmark stops its training run
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    expected = -sig if sig == signal.SIGKILL else 128 + sig  # SIGTERM: an orderly exit
    assert proc.returncode == expected
    assert stdout == b""  # no report: it had only one of the two runs
    (record,) = jsonl(results)  # the run that finished, whole
    assert record["run"] == "end-only" and record["figures"]["saves"] == 1
    assert "end-only: 200 steps logged" in log.read_text()
    if sig == signal.SIGTERM:
        # The second run was stopped, how far it got noted, and its folder, the data and the run
        # specs removed.
        assert "every-100:" in log.read_text()
        assert not list(work.iterdir())


def test_refuses_an_interval_outside_the_run() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "10", "--interval", "10"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--interval" in proc.stderr
    assert proc.stdout == ""


def _run_figures(after_warmup_s: float, saves: int, writes: list[float]) -> dict[str, float]:
    return {
        "after_warmup_s": after_warmup_s,
        "median_step_s": 0.1,
        "steady_data_s": 0.01,
        "steady_steps_s": 10.0,
        "checkpoint_s": 0.5,
        "saves": saves,
        "save_gb": 17.0,
        "save_write_s": writes,
    }


@pytest.mark.parametrize(("write_s", "verdict"), [(1.5, True), (25.0, None)])
def test_a_write_longer_than_the_interval_gets_no_verdict(
    write_s: float, verdict: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # it imports its sibling throughput.py
    spec = importlib.util.spec_from_file_location("training_budgets", SCRIPT)
    assert spec is not None and spec.loader is not None
    budgets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(budgets)
    args = budgets.parse(["--steps", "450", "--interval", "200", "--preset", "tiny"])
    # Two intermediate saves, each 1 s of loop time; 200 steps of 0.1 s = 20 s between saves.
    every = _run_figures(52.0, 3, [write_s, write_s, 20.0])
    report = budgets.report(args, every, _run_figures(50.0, 1, [20.0]), "cpu", "2.13.0")
    assert report["checkpoint_cost_per_save_s"] == pytest.approx(1.0)
    assert report["checkpoint_pct_of_run_by_interval"]["1000"] == pytest.approx(
        100 * 1.0 / (1000 * 0.1 + 1.0), abs=1e-3
    )
    assert report["writes_outlast_interval"] == (verdict is None)
    assert report["goals"]["checkpoint_below_2pct_at_1000_steps"] is verdict
    if verdict is None:  # 1.5 x the longest write, in steps of 0.1 s
        assert report["interval_needed"] == 375
    else:
        assert report["interval_needed"] is None
