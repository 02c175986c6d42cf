"""The evaluation report: ``report.json`` (every number), ``report.md`` (tables, linked charts) and
the PNG charts, in one output directory.

The files are written into a temporary directory beside it, then moved in with report.md last;
a previous report's files that the new one lacks are removed. So report.md always describes the
files beside it, and a failure before the move leaves the previous report as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from midtrain import console
from midtrain.console import fmt
from midtrain.errors import ConfigError
from midtrain.evaluation.compare import Comparison
from midtrain.evaluation.evaluate import Evaluation, RunEval
from midtrain.evaluation.plots import write_plots
from midtrain.fileio import atomic_write_json, atomic_write_text, fsync_dir

REPORT_FORMAT = "midtrain.eval/1"

PLOT_TITLES = {
    "training_loss.png": "Training loss per source",
    "learning_rate.png": "Learning rate",
    "heldout_perplexity.png": "Held-out perplexity per source and checkpoint",
    "gain_vs_forgetting.png": "Domain gain vs. forgetting",
}
REPORT_FILES = frozenset({"report.md", "report.json", *PLOT_TITLES})


def report_json(ev: Evaluation, plots: list[str]) -> dict[str, Any]:
    runs = []
    for run in ev.runs:
        comparisons = run.comparisons() or [None] * len(run.checkpoints)
        checkpoints = []
        for scores, comparison in zip(run.checkpoints, comparisons, strict=True):
            entry = scores.to_json()
            entry["comparison"] = comparison.to_json() if comparison is not None else None
            checkpoints.append(entry)
        runs.append(
            {
                "name": run.name,
                "run_dir": None if run.run_dir is None else str(run.run_dir),
                "baseline": run.baseline.to_json() if run.baseline is not None else None,
                "checkpoints": checkpoints,
            }
        )
    return console.finite_json(
        {"format": REPORT_FORMAT, "eval_set": ev.eval_set.to_json(), "runs": runs, "plots": plots}
    )


def _table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _signed(x: float | None) -> str:
    if x is None:
        return ""
    return f"{0.0 if abs(x) < 5e-5 else x:+.4f}"  # no "-0.0000" for a model against itself


def _summary(ev: Evaluation) -> str:
    rows = []
    for run in ev.runs:
        c = compare_final(run)
        rows.append(
            [
                run.name,
                run.final.step,
                run.final.tokens,
                _signed(c.domain_gain if c else None),
                _signed(c.forgetting if c else None),
                "" if run.baseline is None else str(run.baseline.path),
            ]
        )
    columns = ["run", "step", "tokens", "domain gain", "forgetting", "baseline"]
    return _table(columns, rows)


def compare_final(run: RunEval) -> Comparison | None:
    comparisons = run.comparisons()
    return comparisons[-1] if comparisons else None


def _final_detail(run: RunEval) -> str:
    c = compare_final(run)
    rows = []
    for name, s in run.final.scores.items():
        change = c.changes.get(name) if c else None
        rows.append(
            [
                name,
                s.kind or "",
                s.loss,
                s.perplexity,
                s.bits_per_byte,
                run.baseline.scores[name].perplexity if run.baseline else None,
                change.metric if change else "",
                _signed(change.value if change else None),
                f"{change.perplexity_change_pct:+.1f}%" if change else "",
            ]
        )
    columns = ["source", "kind", "loss", "perplexity", "bits/byte", "baseline ppl"]
    return _table(columns + ["metric", "value", "ppl change"], rows)


def _curve(run: RunEval, names: list[str]) -> str:
    rows = [[c.step, c.tokens, *(c.scores[n].perplexity for n in names)] for c in run.checkpoints]
    if run.baseline is not None:
        rows.insert(
            0,
            ["baseline", run.baseline.tokens, *(run.baseline.scores[n].perplexity for n in names)],
        )
    return _table(["step", "tokens", *(f"{n} ppl" for n in names)], rows)


def report_markdown(ev: Evaluation, plots: list[str]) -> str:
    es = ev.eval_set
    names = [s.name for s in es.sources]
    parts = [
        "# midtrain evaluation report",
        "",
        f"Held-out windows of {es.seq_length + 1} tokens (seq_length {es.seq_length}), at most "
        f"{es.max_tokens:,} predicted tokens per source; every model below is scored on the same "
        f"windows (same sha256), on {es.device or '?'} in {es.dtype or '?'}. Loss is in nats per "
        "token; perplexity = exp(loss); bits per byte = total nats / (ln 2 x UTF-8 bytes of the "
        "predicted text). Reports compare when the hashes, seq_length and dtype match.",
        "",
        _table(
            ["source", "kind", "tokens", "bytes", "windows", "sha256"],
            [
                [
                    s.name,
                    s.kind or "",
                    s.target_tokens,
                    s.target_bytes,
                    len(s.windows),
                    s.digest[:12],
                ]
                for s in es.sources
            ],
        ),
        *(
            f"\nNote: {s.name}'s held-out split is shorter than one window: {s.target_tokens} "
            "predicted tokens only."
            for s in es.sources
            if s.target_tokens < es.seq_length
        ),
        "",
        "## Summary",
        "",
        "Final checkpoint of each run against its baseline. Domain gain = baseline loss - model "
        "loss on customer sources (higher is better); forgetting = model loss - baseline loss on "
        "curated sources (lower is better); both averaged over sources, in nats/token.",
        "",
        _summary(ev),
    ]
    for run in ev.runs:
        parts += [
            "",
            f"## {run.name}",
            "",
            f"Final checkpoint: `{run.final.path}` (step {run.final.step}).",
            "",
            _final_detail(run),
        ]
        if len(run.checkpoints) > 1 or run.baseline is not None:
            parts += ["", "Held-out perplexity per checkpoint:", "", _curve(run, names)]
    if plots:
        parts += ["", "## Charts"]
        for name in plots:
            parts += ["", f"### {PLOT_TITLES.get(name, name)}", "", f"![{name}]({name})"]
    return "\n".join(parts) + "\n"


def check_report_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as an absolute path, if it can take a report: refused (before anything is
    evaluated) when it is a file, holds files that are not a report's, or cannot be written."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file, not a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES)
        if foreign:
            listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise ConfigError(
                f"--out {out}: holds files that are not a midtrain report's ({listed}); "
                "give a new or empty directory"
            )
    # The report is written beside `out`, then moved into it: both places must take files.
    where = out.parent
    while not where.exists():
        where = where.parent
    for place in {where, out} if out.is_dir() else {where}:
        try:
            tempfile.TemporaryDirectory(dir=place).cleanup()
        except OSError as exc:
            raise ConfigError(f"--out {out}: cannot write in {place} ({exc.strerror})") from None
    return out


def write_report(ev: Evaluation, out_dir: str | Path) -> Path:
    """Write the charts, report.json and report.md into ``out_dir`` (see the module's docstring);
    returns report.md."""
    out = check_report_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        plots = sorted(write_plots(ev, new), key=list(PLOT_TITLES).index)
        atomic_write_json(new / "report.json", report_json(ev, plots))
        atomic_write_text(new / "report.md", report_markdown(ev, plots))
        _move_in(new, out)
    finally:
        shutil.rmtree(new, ignore_errors=True)
    return out / "report.md"


def _move_in(new: Path, out: Path) -> None:
    out.mkdir(exist_ok=True)
    names = {p.name for p in new.iterdir()}
    # The old report.md goes first: until the new one lands, none describes a mix of files.
    (out / "report.md").unlink(missing_ok=True)
    for name in sorted(names - {"report.md"}):
        os.replace(new / name, out / name)
    for old in out.iterdir():
        if old.name in REPORT_FILES and old.name not in names:
            old.unlink()
    os.replace(new / "report.md", out / "report.md")
    fsync_dir(out)


def print_summary(ev: Evaluation) -> None:
    """The final checkpoint of each run, per source, as a table on stderr."""
    for run in ev.runs:
        c = compare_final(run)
        rows = []
        for name, s in run.final.scores.items():
            change = c.changes.get(name) if c else None
            rows.append(
                (
                    name,
                    s.kind or "",
                    s.loss,
                    s.perplexity,
                    s.bits_per_byte,
                    change.metric if change else "",
                    _signed(change.value if change else None),
                )
            )
        columns = ("source", "kind", "loss", "ppl", "bits/byte", "vs. baseline", "nats/token")
        title = f"{run.name} (step {run.final.step})"
        console.print_table(console.table(title, columns, rows))
