"""The report's PNG charts. Each function draws one chart from an `Evaluation` and returns the file it
wrote, or None when there is nothing to draw (no metrics, no baseline, ...).

Figures are built with ``Figure`` + the Agg canvas, never pyplot: no global backend or figure state.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from midtrain.evaluation.evaluate import Evaluation, RunEval
from midtrain.evaluation.perplexity import CheckpointScores
from midtrain.fileio import atomic_write_bytes

LINE_STYLES = ("-", "--", ":", "-.")


def _figure(width: float = 8.0, height: float = 4.5) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _styles(runs: list[RunEval]) -> Iterator[tuple[RunEval, str]]:
    for i, run in enumerate(runs):
        yield run, LINE_STYLES[i % len(LINE_STYLES)]


def _label(run: RunEval, what: str, runs: list[RunEval]) -> str:
    return what if len(runs) == 1 else f"{run.name}: {what}"


def plot_training_loss(ev: Evaluation, path: Path) -> Path | None:
    """Training loss per source (and overall) against the step, from each run's metrics.jsonl."""
    runs = [r for r in ev.runs if r.metrics]
    if not runs:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    colours: dict[str, str] = {}
    for run, style in _styles(runs):
        steps = [m["step"] for m in run.metrics]
        ax.plot(
            steps,
            [m["loss"] for m in run.metrics],
            ls=style,
            color="0.35",
            lw=2.5,
            alpha=0.5,  # wide and pale: a source's line on top of it stays visible
            label=_label(run, "all sources", runs),
        )
        names = sorted({n for m in run.metrics for n in m.get("loss_by_source", {})})
        for name in names:
            points = [
                (m["step"], m["loss_by_source"][name])
                for m in run.metrics
                if m.get("loss_by_source", {}).get(name) is not None
            ]
            if not points:
                continue
            colour = colours.setdefault(name, f"C{len(colours)}")
            ax.plot(
                *zip(*points, strict=True),
                ls=style,
                color=colour,
                lw=1.0,
                label=_label(run, name, runs),
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("training loss per source")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_learning_rate(ev: Evaluation, path: Path) -> Path | None:
    runs = [r for r in ev.runs if r.metrics]
    if not runs:
        return None
    fig = _figure(8.0, 3.5)
    ax = fig.add_subplot()
    for run, style in _styles(runs):
        ax.plot(
            [m["step"] for m in run.metrics],
            [m["lr"] for m in run.metrics],
            ls=style,
            label=run.name,
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_title("learning rate")
    if len(runs) > 1:
        ax.legend(fontsize="small")
    return _save(fig, path)


def _baselines(ev: Evaluation) -> list[tuple[str, CheckpointScores]]:
    """Each distinct baseline once, labelled "baseline" when the runs share one."""
    distinct: dict[Path, tuple[str, CheckpointScores]] = {}
    for run in ev.runs:
        if run.baseline is not None and run.baseline.path not in distinct:
            distinct[run.baseline.path] = (f"{run.name}: baseline", run.baseline)
    if len(distinct) == 1:
        return [("baseline", b) for _, b in distinct.values()]
    return list(distinct.values())


def plot_heldout_perplexity(ev: Evaluation, path: Path) -> Path | None:
    """Held-out perplexity per source: against the checkpoint step when a run has several
    checkpoints (baselines dashed), else bars per source (baselines first)."""
    if all(len(r.checkpoints) == 1 for r in ev.runs):
        return _perplexity_bars(ev, path)
    sources = ev.eval_set.sources
    cols, rows = min(len(sources), 3), (len(sources) + 2) // 3
    fig = _figure(4.0 * cols, 3.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).flat
    baselines = _baselines(ev)
    for source, ax in zip(sources, axes, strict=False):  # sources first: no axis skipped
        for i, run in enumerate(ev.runs):
            steps = [c.step for c in run.checkpoints]
            ppl = [c.scores[source.name].perplexity for c in run.checkpoints]
            ax.plot(steps, ppl, marker="o", color=f"C{i}", label=run.name)
        for j, (label, base) in enumerate(baselines):
            ppl = base.scores[source.name].perplexity
            ax.axhline(ppl, color="grey", ls=LINE_STYLES[1 + j % 3], lw=0.9, label=label)
        ax.set_title(f"{source.name} ({source.kind or 'held-out'})")
        ax.set_xlabel("checkpoint step")
        ax.set_ylabel("perplexity")
        ax.legend(fontsize="x-small")
    for ax in axes:  # the grid's unused cells
        ax.set_visible(False)
    fig.suptitle("held-out perplexity per source")
    return _save(fig, path)


def _perplexity_bars(ev: Evaluation, path: Path) -> Path:
    names = [s.name for s in ev.eval_set.sources]
    models = [(label, b, "grey") for label, b in _baselines(ev)]
    models += [(f"{r.name} (step {r.final.step})", r.final, f"C{i}") for i, r in enumerate(ev.runs)]
    fig = _figure(max(6.0, 1.2 * len(names) * len(models) ** 0.5 + 3), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    for k, (label, scores, colour) in enumerate(models):
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(names))]
        ppl = [scores.scores[n].perplexity for n in names]
        ax.bar(xs, ppl, width, label=label, color=colour, alpha=0.6 if colour == "grey" else 1)
    kinds = {s.name: s.kind for s in ev.eval_set.sources}
    ax.set_xticks(range(len(names)), [f"{n}\n({kinds[n] or 'held-out'})" for n in names])
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("held-out perplexity per source")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_gain_vs_forgetting(ev: Evaluation, path: Path) -> Path | None:
    """Mean domain gain (customer) against mean forgetting (curated), per run: one point per
    checkpoint joined in step order, the final one labelled. Up and to the left is better."""
    series = []
    for run in ev.runs:
        points = [(c.forgetting, c.domain_gain) for c in run.comparisons()]
        points = [(x, y) for x, y in points if x is not None and y is not None]
        if points:
            series.append((run, points))
    if not series:
        return None
    fig = _figure(6.5, 5.0)
    ax = fig.add_subplot()
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    for i, (run, points) in enumerate(series):
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", color=f"C{i}", lw=1.0, ms=4, alpha=0.8)
        ax.plot(xs[-1:], ys[-1:], marker="*", ms=14, color=f"C{i}", ls="")
        ax.annotate(
            f"{run.name} (step {run.final.step})",
            (xs[-1], ys[-1]),
            xytext=(6, 6),
            textcoords="offset points",
            fontsize="small",
        )
    ax.set_xlabel("forgetting on curated sources (nats/token, lower is better)")
    ax.set_ylabel("domain gain on customer sources (nats/token, higher is better)")
    ax.set_title("domain gain vs. forgetting against the baseline")
    ax.margins(0.25)
    return _save(fig, path)


PLOTS = {
    "training_loss.png": plot_training_loss,
    "learning_rate.png": plot_learning_rate,
    "heldout_perplexity.png": plot_heldout_perplexity,
    "gain_vs_forgetting.png": plot_gain_vs_forgetting,
}


def write_plots(ev: Evaluation, out_dir: Path) -> dict[str, Path]:
    """Every chart that has data, by file name."""
    written = {}
    for name, draw in PLOTS.items():
        path = draw(ev, out_dir / name)
        if path is not None:
            written[name] = path
    return written
