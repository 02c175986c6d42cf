"""Learning-rate schedules: warmup -> stable -> decay (WSD), cosine, linear, constant, and re-warm.

A schedule is a pure function of the optimizer step: ``lr(step)`` is the LR used *for* step
``step`` (0-based, ``0 <= step < total_steps``). Nothing about it has to be saved to resume
exactly: the step and the config rebuild it. ``state_dict()`` holds the few numbers that define
it, so the trainer can store them in ``trainer_state.json`` and report what changed.

Conventions, the same for every kind:

* Warmup runs over steps ``[0, W)``: linear from the start LR (``warmup_start_ratio x peak``,
  or for a re-warm the LR the start checkpoint was at) at step 0 to the peak at step ``W``, the
  first step after warmup. A re-warm is thus continuous with the checkpoint it branches from.
* Decay runs over steps ``[decay_start, total_steps)`` and reaches ``min_lr`` exactly at the
  run's last step (progress ``1/D`` at its first step, ``1`` at its last), so every decay step is
  strictly below the peak and no step of the run is wasted at the floor before the end.
* ``cosine`` and ``linear`` are warmup followed by a decay over the whole rest of the run (a WSD
  without a stable phase): the peak is where the warmup line ends, and step ``W`` is already the
  first decay step, one decay step below it. ``constant`` has no decay.

The learning-rate settings of the run being built always win over anything a checkpoint carries:
``init_from`` uses the checkpoint's LR only as the re-warm's starting point, and a saved
``state_dict()`` is compared (``changes()``), never loaded. On ``resume`` (the same run) pass the
saved ``rewarm_from_lr`` back to ``build`` so the re-warm is rebuilt as it was.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from midtrain.config_io import Float, Int, StrictModel
from midtrain.errors import ConfigError
from midtrain.fileio import atomic_write_bytes

Kind = Literal["constant", "wsd", "cosine", "linear"]
DecayShape = Literal["linear", "cosine", "1-sqrt"]
Phase = Literal["warmup", "rewarm", "stable", "decay"]

# Decay shapes: progress p in [0, 1] -> fraction of (peak - min) still left; 1 at p=0, 0 at p=1.
_DECAY: dict[str, Callable[[float], float]] = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    # Haegele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training
    # Durations"): the 1-sqrt cooldown matches cosine's final loss with a short WSD decay.
    "1-sqrt": lambda p: 1.0 - math.sqrt(p),
}


class ScheduleConfig(StrictModel):
    """The run spec's ``schedule:`` section. The peak LR is ``optimizer.lr``."""

    kind: Kind = Field(
        default="wsd",
        description="wsd: warmup, constant, decay over the last decay_fraction; cosine/linear: "
        "warmup then decay over the whole rest; constant: warmup then constant",
    )
    warmup_steps: Int = Field(default=0, ge=0, description="linear warmup to the peak")
    warmup_start_ratio: Float = Field(
        default=0.0, ge=0, le=1, description="LR at step 0 as a fraction of the peak"
    )
    decay_fraction: Float = Field(
        default=0.2, ge=0, le=1, description="wsd: the decay spans this fraction of the run"
    )
    decay_shape: DecayShape = Field(default="linear", description="wsd: the decay's shape")
    min_lr_ratio: Float = Field(
        default=0.0, ge=0, le=1, description="LR at the last step as a fraction of the peak"
    )
    rewarm_steps: Int | None = Field(
        default=None,
        ge=0,
        description="re-warm linearly from the start checkpoint's LR to the peak over this "
        "many steps; replaces warmup_steps and warmup_start_ratio",
    )

    @model_validator(mode="after")
    def _no_ignored_settings(self) -> ScheduleConfig:
        # A value the chosen kind would silently ignore is almost always a mistake.
        defaults = {name: f.default for name, f in type(self).model_fields.items()}
        ignored = []  # (setting, why it is unused)
        by_kind = f"is not used by kind {self.kind!r}: remove it or change kind"
        if self.kind != "wsd":
            ignored += [("decay_fraction", by_kind), ("decay_shape", by_kind)]
        if self.kind == "constant":
            ignored.append(("min_lr_ratio", by_kind))
        if self.rewarm_steps is not None:
            by_rewarm = (
                "is not used with rewarm_steps (the re-warm replaces the warmup): remove one"
            )
            ignored += [("warmup_steps", by_rewarm), ("warmup_start_ratio", by_rewarm)]
        for name, why in ignored:
            if getattr(self, name) != defaults[name]:
                raise ValueError(f"schedule.{name} ({getattr(self, name)!r}) {why}")
        return self

    def steps_error(self, total_steps: int) -> str | None:
        """Why this schedule cannot fit a run of ``total_steps`` steps, or None when it fits.

        A separate check so that the run spec can reject it at load time (``ValueError(msg)`` in
        a model validator), before anything starts; ``build`` raises it as a ``ConfigError``.
        """
        key = "schedule.rewarm_steps" if self.rewarm_steps is not None else "schedule.warmup_steps"
        warmup = self._warmup_steps
        if self.kind == "constant" and warmup > total_steps:
            return f"{key} ({warmup}) is longer than the run ({total_steps} steps)"
        if self.kind in ("cosine", "linear") and warmup >= total_steps:
            return (
                f"{key} ({warmup}) leaves no step to decay in: kind {self.kind!r} needs it "
                f"shorter than the run ({total_steps} steps)"
            )
        if self.kind == "wsd":
            decay = self._decay_steps(total_steps)
            if warmup + decay > total_steps:
                return (
                    f"{key} ({warmup}) + the decay (schedule.decay_fraction {self.decay_fraction}"
                    f" x {total_steps} steps = {decay} steps) is {warmup + decay} steps, longer "
                    f"than the run ({total_steps} steps)"
                )
        return None

    def build(
        self, peak_lr: float, total_steps: int, rewarm_from_lr: float | None = None
    ) -> LRSchedule:
        """The schedule of a run of ``total_steps`` optimizer steps peaking at ``peak_lr``.

        ``rewarm_from_lr`` is the LR the start checkpoint was at (None: unknown, re-warm from 0);
        it is used only when ``rewarm_steps`` is set.
        """
        if not 0 < peak_lr < math.inf:
            raise ValueError(f"peak_lr must be a positive number, got {peak_lr}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        if rewarm_from_lr is not None and not 0 <= rewarm_from_lr < math.inf:  # NaN fails too
            raise ValueError(f"rewarm_from_lr must be a number >= 0, got {rewarm_from_lr}")
        if (msg := self.steps_error(total_steps)) is not None:
            raise ConfigError(msg)

        rewarm = self.rewarm_steps is not None
        if not rewarm:
            rewarm_from_lr = None  # only a re-warm starts from the checkpoint's LR
        start_lr = (rewarm_from_lr or 0.0) if rewarm else self.warmup_start_ratio * peak_lr
        warmup = self._warmup_steps
        decay_start = {
            "constant": total_steps,
            "wsd": total_steps - self._decay_steps(total_steps),
            "cosine": warmup,
            "linear": warmup,
        }[self.kind]
        shape = {"cosine": "cosine", "linear": "linear"}.get(self.kind, self.decay_shape)
        return LRSchedule(
            kind=self.kind,
            peak_lr=peak_lr,
            total_steps=total_steps,
            warmup_steps=warmup,
            warmup_start_lr=start_lr,
            rewarm=rewarm,
            rewarm_from_lr=rewarm_from_lr,
            decay_start=decay_start,
            decay_shape=shape,
            min_lr=0.0 if self.kind == "constant" else self.min_lr_ratio * peak_lr,
        )

    @property
    def _warmup_steps(self) -> int:
        return self.rewarm_steps if self.rewarm_steps is not None else self.warmup_steps

    def _decay_steps(self, total_steps: int) -> int:
        # Nearest whole step, and at least one: a decay that was asked for never rounds away.
        steps = round(self.decay_fraction * total_steps)
        return max(steps, 1) if self.decay_fraction > 0 else 0


@dataclass(frozen=True)
class LRSchedule:
    """A built schedule: a pure function of the optimizer step. Build it with ``ScheduleConfig``."""

    kind: Kind
    peak_lr: float
    total_steps: int
    warmup_steps: int  # the re-warm's length when rewarm
    warmup_start_lr: float  # LR at step 0
    rewarm: bool
    rewarm_from_lr: float | None  # the checkpoint LR this run re-warmed from (None: not given)
    decay_start: int  # first decay step; total_steps when nothing decays
    decay_shape: DecayShape
    min_lr: float  # LR at the last step when the run decays

    def lr(self, step: int) -> float:
        """The learning rate for optimizer step ``step``."""
        self._check(step)
        if step < self.warmup_steps:
            frac = step / self.warmup_steps
            return self.warmup_start_lr + (self.peak_lr - self.warmup_start_lr) * frac
        if step < self.decay_start:
            return self.peak_lr
        progress = (step - self.decay_start + 1) / (self.total_steps - self.decay_start)
        left = _DECAY[self.decay_shape](progress)
        # min() guards the last ulp: cos(pi * p) rounds to 1 for p ~ 1e-8.
        return min(self.peak_lr, self.min_lr + (self.peak_lr - self.min_lr) * left)

    def phase(self, step: int) -> Phase:
        """The phase of optimizer step ``step``: warmup (rewarm, from a start checkpoint's LR),
        stable or decay."""
        self._check(step)
        if step < self.warmup_steps:
            return self._warmup_phase
        return "stable" if step < self.decay_start else "decay"

    def segments(self) -> list[tuple[Phase, int, int]]:
        """The non-empty phases in order, as (phase, first step, end step exclusive)."""
        bounds: list[tuple[Phase, int, int]] = [
            (self._warmup_phase, 0, self.warmup_steps),
            ("stable", self.warmup_steps, self.decay_start),
            ("decay", self.decay_start, self.total_steps),
        ]
        return [(phase, a, b) for phase, a, b in bounds if b > a]

    def apply(self, param_groups: Iterable[dict[str, Any]], step: int) -> float:
        """Set the LR of every param group for ``step`` (call before each optimizer step).

        Setting it each step, rather than through a torch LRScheduler, leaves no scheduler state
        to save, and overrides any LR an optimizer state loaded from a checkpoint carried.
        """
        lr = self.lr(step)
        for group in param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        """The numbers that define the schedule (JSON-ready), for trainer_state.json."""
        return dataclasses.asdict(self)

    def changes(self, saved: Mapping[str, Any]) -> list[str]:
        """Lines "key: saved -> now" for what differs from a saved ``state_dict()``.

        For reporting only: the schedule being built wins, whatever a checkpoint holds.
        """
        now = self.state_dict()
        return [
            f"{key}: {saved.get(key, '<absent>')!r} -> {value!r}"
            for key, value in now.items()
            if saved.get(key, object()) != value
        ]

    @property
    def _warmup_phase(self) -> Phase:
        return "rewarm" if self.rewarm else "warmup"

    def _check(self, step: int) -> None:
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} is outside the run's steps [0, {self.total_steps})")


_PHASE_COLOURS = {
    "warmup": "tab:orange",
    "rewarm": "tab:orange",
    "stable": "tab:green",
    "decay": "tab:blue",
}


def plot_schedule(
    schedule: LRSchedule,
    total_steps: int | None,
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Write a PNG of the LR over steps ``[0, total_steps)`` (None: the whole run), phases shaded.

    The file appears complete or not at all (written to a temporary name, then renamed).
    """
    # Figure + Agg canvas, not pyplot: no global backend or figure state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = schedule.total_steps if total_steps is None else total_steps
    if not 1 <= n <= schedule.total_steps:
        raise ValueError(f"total_steps must be in [1, {schedule.total_steps}], got {total_steps}")

    # The LR is piecewise smooth: a few thousand samples plus every phase boundary draw it exactly.
    steps = {round(i * (n - 1) / 2000) for i in range(2001)}
    for _, a, b in schedule.segments():
        steps.update(s for s in (a - 1, a, b - 1, b) if 0 <= s < n)
    xs = sorted(steps)
    ys = [schedule.lr(s) for s in xs]

    fig = Figure(figsize=(8, 4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for phase, a, b in schedule.segments():
        if a >= n:
            break
        label = "re-warm" if phase == "rewarm" else phase
        ax.axvspan(a, min(b, n), color=_PHASE_COLOURS[phase], alpha=0.15, lw=0, label=label)
    ax.plot(xs, ys, color="black", lw=1.5)
    if schedule.rewarm and schedule.warmup_steps > 0:
        ax.plot([0], [schedule.warmup_start_lr], "o", color="tab:red", ms=5)
        ax.annotate(
            f"re-warm from {schedule.warmup_start_lr:.3g}",
            (0, schedule.warmup_start_lr),
            xytext=(8, 8),
            textcoords="offset points",
            color="tab:red",
        )
    ax.axhline(schedule.peak_lr, color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, n)
    ax.set_ylim(0, max(ys + [schedule.peak_lr]) * 1.08)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.legend(loc="outside lower center", ncols=3, frameon=False)
    kind = f"wsd ({schedule.decay_shape} decay)" if schedule.kind == "wsd" else schedule.kind
    ax.set_title(title or f"{kind}: peak {schedule.peak_lr:.3g}, {schedule.total_steps} steps")

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
