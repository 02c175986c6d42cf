"""``midtrain demo``: the whole product on this machine, with the same commands a user runs.

Each step prints the command it runs, so the demo doubles as the tutorial (docs/quickstart.md):
prepare two corpora from text already on the machine, pretrain a tiny base model that publishes
intermediate checkpoints, continue pretraining from one of them on a customer/curated mixture
(and, for comparison, from the final checkpoint on customer data only), then evaluate and report.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from midtrain.console import console, print_table, table
from midtrain.errors import MidtrainError
from midtrain.fileio import project_path

# In a checkout, or (from a wheel) where the environment's share/midtrain/examples holds them.
EXAMPLES = project_path("examples")
# Marks a folder the demo wrote, which a later demo may replace.
MARKER = ".midtrain-demo"
OUTPUTS = ("data", "runs", "reports")


def _run(step: str, args: list[str], cwd: Path) -> None:
    console.print(f"\n[bold]{step}[/bold]\n$ midtrain {shlex.join(args)}")
    proc = subprocess.run([sys.executable, "-m", "midtrain.cli", *args], cwd=cwd)
    if proc.returncode != 0:
        raise MidtrainError(
            f"demo step failed: midtrain {shlex.join(args)} (exit {proc.returncode})"
        )


def run_demo(out: Path, customer_share: float = 0.8) -> Path:
    """Run the demo in ``out``; returns the report directory."""
    if EXAMPLES is None:
        raise MidtrainError("the examples folder was not found next to midtrain nor in share/")
    prepare_output_dir(out)
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
    # The base model is the pretraining run's final (decayed) checkpoint.
    base_steps = yaml.safe_load(Path(pretrain).read_text(encoding="utf-8"))["train"]["max_steps"]
    base = f"runs/base/checkpoints/step_{base_steps:08d}"
    _run(
        "4. Evaluate every run against the base model; report with plots",
        ["report", "runs/continue", "runs/customer_only", "runs/base", "--baseline", base]
        + ["--out", "reports/compare"],
        out,
    )
    report = out / "reports" / "compare"
    print_results(json.loads((report / "report.json").read_text(encoding="utf-8")))
    console.print(
        f"\ndemo finished in {time.time() - started:.0f} s; runs are in {out / 'runs'}, "
        f"the report is {report / 'report.md'}"
    )
    return report


def prepare_output_dir(out: Path) -> None:
    """An empty folder for the demo. A previous demo's output is replaced (so `make demo` runs
    again); any other non-empty folder is refused, since its runs would be refused or mixed in."""
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise MidtrainError(
                f"{out}: not empty, and not a demo's output; give --out a new or empty folder"
            )
        console.print(f"{out}: replacing the previous demo's {', '.join(OUTPUTS)}")
        for name in OUTPUTS:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(
        "Written by `midtrain demo`: the next demo into this folder replaces its data, runs and "
        "reports.\n",
        encoding="utf-8",
    )


def final_perplexities(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Model -> source -> held-out perplexity: the baseline and each run's final checkpoint."""
    first = report["runs"][0]
    out = {"base (final)": _ppl(first["baseline"])}
    for run in report["runs"]:
        if run["name"] != "base":
            out[run["name"]] = _ppl(run["checkpoints"][-1])
    return out


def _ppl(checkpoint: dict[str, Any]) -> dict[str, float]:
    return {name: s["perplexity"] for name, s in checkpoint["sources"].items()}


def print_results(report: dict[str, Any]) -> None:
    ppl = final_perplexities(report)
    base = ppl["base (final)"]
    rows = [
        (
            model,
            f"{p['legal']:.2f}",
            f"{p['general']:.2f}",
            "" if model.startswith("base") else f"{100 * (p['legal'] / base['legal'] - 1):+.1f}%",
            ""
            if model.startswith("base")
            else f"{100 * (p['general'] / base['general'] - 1):+.1f}%",
        )
        for model, p in ppl.items()
    ]
    columns = ("model", "legal ppl", "general ppl", "legal vs. base", "general vs. base")
    title = "Held-out perplexity, lower is better (legal: the domain; general: curated)"
    print_table(table(title, columns, rows))
