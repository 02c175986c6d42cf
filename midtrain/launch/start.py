"""Before any worker starts: decide new run vs. resume, check the spec, the data and the start point.

Everything that can be wrong with the user's input is found here, in the driver, so that a bad
run spec costs seconds, not a Ray start-up and a failed worker group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from midtrain.checkpoints.layout import RUN_SPEC
from midtrain.checkpoints.store import latest_checkpoint
from midtrain.config import (
    RunSpec,
    apply_run_overrides,
    breaks_exactness,
    diff_specs,
    load_run_spec,
    run_spec_from_yaml,
    validate_run_spec,
)
from midtrain.console import console
from midtrain.data_mixing.plan import MixturePlan, plan_mixture
from midtrain.errors import ConfigError
from midtrain.training.checkpointing import check_start


@dataclass
class PreparedRun:
    spec: RunSpec
    resuming: bool
    plan: MixturePlan


def _saved_spec(run_dir: Path) -> tuple[Path, RunSpec]:
    """The spec saved with the run's latest checkpoint: (its file, the spec)."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise ConfigError(f"{run_dir}: no complete checkpoint to resume from")
    path = latest / RUN_SPEC
    return path, run_spec_from_yaml(path.read_text(encoding="utf-8"), str(path))


def prepare_run(
    spec_path: str | None,
    overrides: list[str],
    resume_dir: str | None = None,
    allow_changed_spec: bool = False,
    auto_resume: bool = False,
    verify_start: bool = True,
) -> PreparedRun:
    """Resolve what to run. ``resume_dir`` or ``resume: true`` continues a run exactly.
    ``verify_start=False`` checks the start checkpoint's file sizes but does not hash them."""
    if spec_path is None and resume_dir is None:
        raise ConfigError("give a run spec, or --resume RUN_DIR")
    if spec_path is not None:
        spec = load_run_spec(spec_path, overrides)
        run_dir = Path(resume_dir).resolve() if resume_dir else Path(spec.run_dir)
        if resume_dir and Path(spec.run_dir).resolve() != run_dir:  # symlinks too
            raise ConfigError(
                f"--resume {resume_dir} names another run_dir than the spec ({spec.run_dir})"
            )
    else:
        run_dir = Path(resume_dir).resolve()
        saved_file, spec = _saved_spec(run_dir)
        spec_path = str(saved_file)  # what errors in it name
        # The run may have been moved or copied since it was saved: it continues where it is.
        spec = spec.model_copy(update={"run_dir": str(run_dir)})
        if overrides:
            data = spec.model_dump(mode="json")
            source = f"{run_dir} (saved spec + overrides)"
            spec = validate_run_spec(data, source, apply_run_overrides(data, overrides, source))

    has_checkpoint = latest_checkpoint(run_dir) is not None
    resuming = bool(resume_dir) or spec.resume or (auto_resume and has_checkpoint)
    if resuming:
        saved_file, saved = _saved_spec(run_dir)
        # A run keeps the start it was given. A branched run (init_from) stays one: the workers
        # resume it from its own latest checkpoint all the same, and its spec, saved again with
        # every checkpoint, must stay valid (init_from and resume: true cannot be combined).
        branched = saved.init_from is not None
        spec = spec.model_copy(update={"resume": not branched, "init_from": saved.init_from})
        _check_changes(saved, spec, saved_file.parent, allow_changed_spec)
    elif has_checkpoint:
        raise ConfigError(
            f"{run_dir} already holds checkpoints of a run: continue it with "
            f"`midtrain train --resume {run_dir}`, or choose a new run_dir (nothing was overwritten)"
        )
    if spec.train.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                "train.tensorboard: the tensorboard package is not installed "
                "(pip install 'midtrain[tensorboard]')"
            ) from None
    # An inline mixture has no file of its own: its errors name the run spec.
    where = spec.mixture.source_file or f"{spec_path}: mixture"
    plan = plan_mixture(spec.mixture, total_sequences=spec.total_sequences, where=where)
    check_start(spec, resuming, verify_start)
    return PreparedRun(spec, resuming, plan)


def _check_changes(saved: RunSpec, new: RunSpec, where: Path, allow: bool) -> None:
    ignore = {"resume", "run_dir"}
    diffs = [d for d in diff_specs(saved, new) if d[0] not in ignore]
    if not diffs:
        return
    console.print(f"The run spec differs from the one saved in {where}:")
    for key, old, value in diffs:
        mark = "  (breaks exact resume)" if breaks_exactness(key) else ""
        console.print(f"  {key}: {old!r} -> {value!r}{mark}")
    breaking = [key for key, _, _ in diffs if breaks_exactness(key)]
    if breaking and not allow:
        raise ConfigError(
            "refusing to resume with changes that break exactness ("
            + ", ".join(breaking)
            + "); pass --allow-changed-spec to resume anyway"
        )
