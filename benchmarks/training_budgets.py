"""The two time budgets of a real training run: data loading as a share of step time, and what
checkpoint saves cost the run. Prints JSON.

    .venv/bin/python benchmarks/training_budgets.py [--backend deepspeed|megatron]
        [--preset 1b|tiny] [--seq-length 2048] [--micro-batch 4] [--steps 600] [--interval 300]
        [--no-compile] [--dir DIR] [--timeout 480] [--out-dir DIR] [--only end-only|every]
    .venv/bin/python benchmarks/training_budgets.py --combine DIR_OR_FILE [DIR_OR_FILE ...]

midtrain's own training loop (``midtrain.training.loop.train``, one process, world size 1: NCCL
on a GPU, gloo on CPU) trains a new model of the preset's shape (``benchmarks/throughput.py``'s
presets) on the sample corpora, tokenized and sampled as in any run. It runs twice, each in a
fresh process: once saving every ``--interval`` steps (asynchronous saves, as by default) and
once saving only at the end. Both end with the same blocking final save.

* data loading: drawing batches from the mixture, as a share of step time, over the steps
  after ``--warmup`` (compilation happens in the first steps) of the run that saves only at the
  end. Goal: < 1% of step time.
* checkpoints: the loop's ``checkpoint_s`` counts only the time a save blocks the loop. An
  asynchronous save also writes in the background while training goes on, and the next save
  first waits for it. So the cost per save here is the difference in loop time between the two
  runs, from the end of step ``--warmup`` to the end of the final save (which waits for the last
  background write), divided by the number of intermediate saves: blocking, waiting and any
  slowdown of the steps the background write causes. The final save itself is in both runs and
  cancels out. The share of a run is projected from that cost and the median step time, for
  saving every ``--interval``, 500 and 1000 steps (the trainer's default ``checkpoint.interval``).
  Goal: < 2% of the run at 1000 steps. A cost within noise (<= 0) is reported as such, with no
  verdict.

Each save's size and write speed are read from the run's ``control/events.log``. Choose
``--interval`` (and the steps after the last one before the end) so that they take longer than
one save's write (see ``save_write_s``), or each save mostly waits for the previous one: then
``writes_outlast_interval`` is true, the verdict is null, and ``interval_needed`` says what to
rerun with. On a GPU the run is bf16 with ``torch.compile`` (DeepSpeed; ``--no-compile`` to turn
it off); on CPU fp32 without compile, for checking the code path with ``--preset tiny``.

Runs that do not fit one sitting (a 1B run takes minutes, and some machines stop a command
after 10) can be made one at a time: ``--only end-only`` or ``--only every`` makes that run alone
and prints its figures; ``--combine`` reads the two runs' ``results.jsonl`` (folders or files)
and prints the same JSON document as a run of both. With ``--out-dir DIR`` each run's figures are
appended to ``DIR/results.jsonl`` as soon as that run ends, and the training processes' output
goes to ``DIR/run.log`` as it is written. A run not finished after ``--timeout`` seconds is
stopped; its run folder (a 1B checkpoint is ~17 GB) is removed then too, and on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from throughput import (
    PRESETS,
    append_jsonl,
    exit_on_sigterm,
    free_port,
    init_single_process_group,
    log_tail,
    run_logged,
)
from train_cpu import prepare, sample_mixture

from midtrain.training.checkpointing import events_path
from midtrain.training.metrics import read_metrics

BACKENDS = ("deepspeed", "megatron")
RUNS = ("end-only", "every")  # saving only at the end; saving every --interval steps
# What the two runs must agree on to be compared (the command-line settings).
SETTINGS = (
    "backend",
    "preset",
    "seq_length",
    "micro_batch",
    "steps",
    "interval",
    "warmup",
    "compile",
)
PROJECT_INTERVALS = (500, 1000)  # steps between saves, for the projected share


def write_spec(root: Path, data: dict[str, str], args: argparse.Namespace, interval: int | None):
    cuda = torch.cuda.is_available()
    label = f"every-{interval}" if interval else "end-only"
    spec = {
        "run_dir": str(root / label),
        "model": {
            "tokenizer": data["tokenizer"],
            "config": PRESETS[args.preset],
            "compile": cuda and args.compile and args.backend == "deepspeed",
        },
        "mixture": sample_mixture(data, args.seq_length),
        "optimizer": {"lr": 3e-4},
        "schedule": {"kind": "constant"},
        "train": {
            "global_batch_size": args.micro_batch,
            "micro_batch_size": args.micro_batch,
            "max_steps": args.steps,
            "precision": "bf16" if cuda else "fp32",
            "deterministic": False,
            "backend": args.backend,
        },
        "checkpoint": {"interval": interval, "keep_last": 1, "async_save": True},
        "workers": 1,
    }
    path = root / f"{label}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def child(spec_path: str) -> None:
    """One training run in this process (world size 1), as a Ray worker would run it."""
    import torch.distributed as dist

    from midtrain.config import load_run_spec
    from midtrain.runtime_env import setup_process
    from midtrain.training.loop import train

    setup_process()
    init_single_process_group()
    train(load_run_spec(spec_path))
    dist.destroy_process_group()


# The checkpoint store's line for each committed save (midtrain/checkpoints/store.py).
SAVED = re.compile(r"saved \S+ \(([\d.]+) GB in ([\d.]+) s")


def run(spec_path: Path, warmup: int, timeout: float, log: Path) -> dict[str, Any]:
    """Train in a fresh process (megatron keeps its parallel state in module globals) with its
    output appended to ``log``, read the loop's timing, metrics and save events, and delete the
    run (a 1B run's checkpoint is ~17 GB), also when it fails or is interrupted."""
    env = {
        **os.environ,
        "MIDTRAIN_NO_PROGRESS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    run_dir = Path(yaml.safe_load(spec_path.read_text())["run_dir"])
    cmd = [sys.executable, __file__, "--child", str(spec_path)]
    start = log.stat().st_size if log.exists() else 0
    try:
        code = run_logged(cmd, env, log, timeout)
        if code != 0:
            stopped = f"stopped after {timeout:.0f} s" if code is None else f"exited {code}"
            raise RuntimeError(
                f"training run {spec_path.name} {stopped}; its output ({log}):\n"
                + log_tail(log, start)
            )
        timing = json.loads((run_dir / "control" / "status.json").read_text())["timing"]
        records = read_metrics(run_dir)
        saves = [tuple(map(float, m.groups())) for m in SAVED.finditer(events_text(run_dir))]
    finally:
        note_progress(run_dir, log)
        shutil.rmtree(run_dir, ignore_errors=True)
    steady = records[warmup:]
    warm_s = sum(r["step_time_s"] for r in records[:warmup])
    return {
        **timing,
        "after_warmup_s": round(timing["run_s"] - warm_s, 4),
        "median_step_s": round(statistics.median(r["step_time_s"] for r in steady), 4),
        "steady_data_s": round(sum(r["data_time_s"] for r in steady), 4),
        "steady_steps_s": round(sum(r["step_time_s"] for r in steady), 4),
        "saves": len(saves),
        "save_gb": saves[-1][0] if saves else None,
        "save_write_s": [s for _, s in saves],
    }


def note_progress(run_dir: Path, log: Path) -> None:
    """Append how far the run got (its last metrics record and its save events) to ``log``,
    before its folder goes: after a timeout or a SIGTERM that is all that is left of it."""
    records = read_metrics(run_dir)
    last = json.dumps(records[-1]) if records else "none"
    with log.open("a") as f:
        f.write(f"== {run_dir.name}: {len(records)} steps logged; the last: {last}\n")
        f.write(events_text(run_dir))


def events_text(run_dir: Path) -> str:
    path = events_path(run_dir)
    return path.read_text() if path.exists() else ""


def report(
    args: argparse.Namespace,
    every: dict[str, Any],
    end_only: dict[str, Any],
    device: str,
    torch_version: str,
) -> dict:
    saves = every["saves"] - 1  # the intermediate ones; both runs end with one final save
    step_s = end_only["median_step_s"]
    per_save = (every["after_warmup_s"] - end_only["after_warmup_s"]) / max(saves, 1)
    data_share = 100 * end_only["steady_data_s"] / end_only["steady_steps_s"]
    measured = per_save > 0  # a cost within the noise of two runs gives no verdict
    # A write that outlasts the steps until the next save (or the final one) makes that save
    # wait for it: a cost of the short run here, not of saving every 1000 steps: no verdict.
    longest_write = max(every["save_write_s"][:-1], default=0.0)
    tail = args.steps - (args.steps - 1) // args.interval * args.interval
    overlapped = longest_write > min(args.interval, tail) * step_s

    def share(interval: int) -> float | None:
        return round(100 * per_save / (interval * step_s + per_save), 4) if measured else None

    projected = {str(n): share(n) for n in (args.interval, *PROJECT_INTERVALS)}
    return {
        "benchmark": "training_budgets",
        "device": device,
        "torch": torch_version,
        "backend": args.backend,
        "preset": args.preset,
        "seq_length": args.seq_length,
        "micro_batch": args.micro_batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "interval": args.interval,
        "intermediate_saves": saves,
        "step_time_s": step_s,
        "data_loading_pct_of_step": round(data_share, 4),
        "checkpoint_cost_per_save_s": round(per_save, 4),
        "checkpoint_blocking_per_save_s": round(
            (every["checkpoint_s"] - end_only["checkpoint_s"]) / max(saves, 1), 4
        ),
        "final_save_s": end_only["checkpoint_s"],
        "save_gb": end_only["save_gb"],
        "save_write_s": every["save_write_s"],
        "checkpoint_pct_of_run_by_interval": projected,
        "writes_outlast_interval": overlapped,
        "interval_needed": math.ceil(1.5 * longest_write / step_s) if overlapped else None,
        "goals": {
            "data_loading_below_1pct": data_share < 1.0,
            "checkpoint_below_2pct_at_1000_steps": (
                projected["1000"] < 2.0
                if projected["1000"] is not None and not overlapped
                else None
            ),
        },
        "runs": {f"every_{args.interval}": every, "end_only": end_only},
    }


def run_record(args: argparse.Namespace, which: str, figures: dict[str, Any]) -> dict[str, Any]:
    """One run's line in ``results.jsonl``: its figures and what ``--combine`` needs besides."""
    return {
        "run": which,
        "settings": {name: getattr(args, name) for name in SETTINGS},
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "figures": figures,
    }


def read_records(paths: list[str]) -> list[dict[str, Any]]:
    """The run records in ``results.jsonl`` files, or in the ``results.jsonl`` of folders."""
    records = []
    for name in paths:
        path = Path(name)
        path = path / "results.jsonl" if path.is_dir() else path
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def combine(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The report from an end-only and an every-interval run with the same settings (the last
    record of each, where a file holds more)."""
    last = {r["run"]: r for r in records}
    missing = [which for which in RUNS if which not in last]
    if missing:
        raise ValueError(f"no {' and no '.join(missing)} run among the results")
    end_only, every = last["end-only"], last["every"]
    if end_only["settings"] != every["settings"]:
        raise ValueError(
            f"the runs' settings differ: end-only {end_only['settings']}, every {every['settings']}"
        )
    if end_only["device"] != every["device"]:
        raise ValueError(
            f"the runs ran on different devices: {end_only['device']}, {every['device']}"
        )
    args = argparse.Namespace(**end_only["settings"])
    return report(args, every["figures"], end_only["figures"], every["device"], every["torch"])


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="deepspeed")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, help="default: 600 on a GPU, 80 on CPU")
    parser.add_argument("--interval", type=int, help="default: 300 on a GPU, 30 on CPU")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--dir", help="where the data and runs go (default: a temporary folder)")
    parser.add_argument(
        "--timeout", type=float, default=480, help="seconds per training run (default: 480)"
    )
    parser.add_argument(
        "--out-dir", help="append each run's figures to results.jsonl here, its output to run.log"
    )
    parser.add_argument("--only", choices=RUNS, help="make this one of the two runs alone")
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="DIR_OR_FILE",
        help="report from the results.jsonl of an end-only and an every run; train nothing",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # On a GPU a 1B model's ~17 GB save takes 10-30 s to write (up to 200 steps of 0.15 s): the
    # steps after a save must outlast its write, or the next save waits for it. One save at 300
    # and the final one at 600 (~90 s of steps per run).
    gpu = torch.cuda.is_available()
    args.steps = args.steps or (600 if gpu else 80)
    args.interval = args.interval or (300 if gpu else 30)
    if not (args.child or args.combine) and not 0 < args.warmup < args.interval < args.steps:
        parser.error("need 0 < --warmup < --interval < --steps")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.child:
        child(args.child)
        return 0
    if args.combine:
        try:
            print(json.dumps(combine(read_records(args.combine)), indent=2))
        except (OSError, ValueError, KeyError) as exc:
            print(f"--combine: {exc}", file=sys.stderr)
            return 2
        return 0
    exit_on_sigterm()
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        log = (out_dir or root) / "run.log"
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
            data = prepare(root / "data")
        for which in [args.only] if args.only else RUNS:
            interval = args.interval if which == "every" else None
            figures = run(write_spec(root, data, args, interval), args.warmup, args.timeout, log)
            records.append(run_record(args, which, figures))
            if out_dir:
                append_jsonl(out_dir / "results.jsonl", records[-1])
    print(json.dumps(records[0] if args.only else combine(records), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
