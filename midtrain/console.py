"""Terminal output: one rich console, progress bars and summary tables, quiet by default."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

# Progress and tables go to stderr so that --json output on stdout stays machine-readable.
console = Console(stderr=True, highlight=False, soft_wrap=True)
stdout = Console(highlight=False, soft_wrap=True)


def progress_enabled() -> bool:
    return os.environ.get("MIDTRAIN_NO_PROGRESS", "") == "" and console.is_terminal


def make_progress(transient: bool = False) -> Progress:
    """A progress bar that degrades to nothing when stderr is not a terminal (CI logs stay short)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[extra]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=not progress_enabled(),
    )


PROGRESS_LINE_S = 30.0


class ProgressLines:
    """Where stderr is not a terminal (a Slurm or nohup log) there is no progress bar: instead, a
    plain line at most every ``PROGRESS_LINE_S`` seconds, the first after that long (a short
    run prints none). Off, like the bar, with ``MIDTRAIN_NO_PROGRESS``."""

    def __init__(self) -> None:
        self.enabled = os.environ.get("MIDTRAIN_NO_PROGRESS", "") == "" and not console.is_terminal
        self._last = time.monotonic()

    def due(self) -> bool:
        return self.enabled and time.monotonic() - self._last >= PROGRESS_LINE_S

    def print(self, line: str) -> None:
        self._last = time.monotonic()
        console.print(line, markup=False)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    # Text, not markup: a path like runs/sweep[lr] must print as it is, not as runs/sweep.
    t = Table(title=Text(title), title_justify="left", show_edge=False)
    for i, col in enumerate(columns):
        t.add_column(Text(col), justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*(Text(fmt(v)) for v in row))
    return t


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return "" if value is None else str(value)


def json_text(obj: Any) -> str:
    """``--json`` output: strict JSON, so NaN and infinity (a diverged loss) become null; other
    tools' parsers reject Python's ``NaN``. Values JSON has no type for are printed as strings."""
    return json.dumps(finite_json(obj), indent=2, default=str, allow_nan=False)


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float (in dicts, lists and tuples) replaced by null:
    JSON has no such numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def short_count(n: float) -> str:
    """A count in three significant figures: 950, 12.3k, 4.57M, 1.2B."""
    n = float(f"{n:.3g}")  # rounded first, so that 999_999 reads 1M, not 1e+03k
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def print_table(t: Table) -> None:
    console.print(t)


def info(message: str) -> None:
    console.print(message)


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
