"""``midtrain demo``: the whole product on this machine, with the same commands a user runs.

Each step prints the command it runs, so the demo doubles as the tutorial (docs/quickstart.md):
prepare two corpora from text already on the machine, pretrain a tiny base model that publishes
intermediate checkpoints, continue pretraining from one of them on a customer/curated mixture
(and, for comparison, from the final checkpoint on customer data only), then evaluate and report.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

from midtrain.console import console
from midtrain.errors import MidtrainError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(step: str, args: list[str], cwd: Path) -> None:
    console.print(f"\n[bold]{step}[/bold]\n$ midtrain {shlex.join(args)}")
    proc = subprocess.run([sys.executable, "-m", "midtrain.cli", *args], cwd=cwd)
    if proc.returncode != 0:
        raise MidtrainError(
            f"demo step failed: midtrain {shlex.join(args)} (exit {proc.returncode})"
        )


def run_demo(out: Path, customer_share: float = 0.8) -> Path:
    """Run the demo in ``out``; returns the report directory."""
    if not EXAMPLES.is_dir():
        raise MidtrainError(f"{EXAMPLES}: the examples folder is missing (run from a checkout)")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    pretrain, cont, cust = (
        str(EXAMPLES / n) for n in ("pretrain.yaml", "continue.yaml", "continue_customer_only.yaml")
    )
    general = round(1 - customer_share, 6)

    _run(
        "1. Corpora from text on this machine",
        ["data", "sample-corpora", "--output", "data/raw", "--max-chars", "1500000"],
        out,
    )
    _run(
        "   A tokenizer for them",
        [
            "tokenizer",
            "train",
            "--input",
            "data/raw/general.jsonl",
            "--input",
            "data/raw/legal.jsonl",
            "--vocab-size",
            "2048",
            "--output",
            "data/tok",
        ],
        out,
    )
    for name in ("general", "legal"):
        _run(
            f"   Tokenize the {name} corpus",
            [
                "data",
                "prepare",
                "--input",
                f"data/raw/{name}.jsonl",
                "--tokenizer",
                "data/tok",
                "--output",
                f"data/{name}",
                "--holdout-fraction",
                "0.05",
            ],
            out,
        )
    _run(
        "2. Pretrain a base model (WSD); stable-phase checkpoints are kept",
        ["train", pretrain],
        out,
    )
    _run("   The catalog of its checkpoints", ["ckpt", "list", "runs/base"], out)
    mix = [f"mixture.sources.0.weight={customer_share}", f"mixture.sources.1.weight={general}"]
    _run("3. Plan the continued-pretraining mixture", ["mix", "plan", cont, *mix], out)
    _run("   Continue from an intermediate checkpoint on the mixture", ["train", cont, *mix], out)
    _run("   For comparison: from the final checkpoint, customer data only", ["train", cust], out)
    console.print(f"\ndemo finished in {time.time() - started:.0f} s; runs are in {out / 'runs'}")
    return out
