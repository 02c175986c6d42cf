"""What `midtrain eval` and `midtrain report` do: find the checkpoints and the held-out data, build
one evaluation set, score every model on it (each baseline once), and collect the results.

``eval CKPT`` scores one checkpoint; ``eval RUN_DIR`` every checkpoint of the run (curves);
``report RUN_DIR...`` every checkpoint of each run (curves side by side; the final table is
each run's last checkpoint). The held-out sources come from
``--mixture``, ``--data``, or else the run spec saved with the (first) run or checkpoint, so every
run of a report is scored on the same windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from midtrain import console
from midtrain.checkpoints import (
    Checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
)
from midtrain.checkpoints.layout import CHECKPOINTS_DIR, MANIFEST, RUN_SPEC
from midtrain.checkpoints.manifest import read_manifest
from midtrain.config_io import load_yaml_mapping, validate
from midtrain.data_mixing.mixture import MixtureConfig, load_mixture
from midtrain.data_mixing.tokenizer import load_tokenizer
from midtrain.errors import CheckpointError, ConfigError, MidtrainError
from midtrain.evaluation.compare import Comparison, compare
from midtrain.evaluation.heldout import (
    DEFAULT_MAX_TOKENS,
    EvalSet,
    SourceSpec,
    build_eval_set,
    sources_from_mixture,
    sources_from_prefixes,
)
from midtrain.evaluation.perplexity import (
    DEFAULT_BATCH_SIZE,
    CheckpointScores,
    check_positions,
    check_tokenizer,
    check_vocab,
    eval_dtype,
    pick_device,
    score_checked,
)
from midtrain.training.metrics import read_metrics


@dataclass
class RunEval:
    """One run's (or one stand-alone checkpoint's) scores, with its training metrics."""

    name: str
    run_dir: Path | None
    checkpoints: list[CheckpointScores]
    baseline: CheckpointScores | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> CheckpointScores:
        return self.checkpoints[-1]

    def comparisons(self) -> list[Comparison]:
        """Per checkpoint, against the baseline (empty without one)."""
        if self.baseline is None:
            return []
        return [compare(c.scores, self.baseline.scores) for c in self.checkpoints]


@dataclass
class Evaluation:
    eval_set: EvalSet
    runs: list[RunEval]


@dataclass
class Target:
    name: str
    run_dir: Path | None
    checkpoints: list[Path]
    baseline: Path | None = None


@dataclass
class EvalOptions:
    mixture: str | None = None
    data: list[str] = field(default_factory=list)
    seq_length: int | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    batch_size: int = DEFAULT_BATCH_SIZE
    device: str | None = None


# --- finding checkpoints, run specs and sources ---------------------------------------------------


def run_dir_of(ckpt_dir: Path) -> Path | None:
    return ckpt_dir.parent.parent if ckpt_dir.parent.name == CHECKPOINTS_DIR else None


def find_target(path: str | Path, all_checkpoints: bool) -> Target:
    """A checkpoint dir -> that checkpoint; a run dir -> all its checkpoints (or the last one).

    Saves in progress are skipped; a damaged checkpoint is kept, so that loading it names the bad
    file rather than silently leaving it out of the curves."""
    path = Path(path).expanduser().absolute()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if (path / MANIFEST).exists():
        run_dir = run_dir_of(path)
        return Target(path.name if run_dir is None else run_dir.name, run_dir, [path])
    infos = [i for i in list_checkpoints(path) if not i.staging]
    runs = {i.run_dir for i in infos}
    if len(runs) > 1:
        raise CheckpointError(f"{path}: holds several runs; name each run directory")
    if not infos:
        raise CheckpointError(f"{path}: no checkpoints to evaluate")
    run_dir = infos[0].run_dir or path
    ckpts = [i.path for i in infos]
    return Target(run_dir.name, run_dir, ckpts if all_checkpoints else ckpts[-1:])


def run_spec_data(target: Target) -> tuple[dict[str, Any], str] | None:
    """The run spec saved in the target's newest checkpoint, else the run's ``run_spec.yaml``."""
    candidates = [target.checkpoints[-1] / RUN_SPEC]
    if target.run_dir is not None:
        candidates.append(target.run_dir / RUN_SPEC)
    for path in candidates:
        if path.is_file():
            return load_yaml_mapping(path), str(path)
    return None


def mixture_of(target: Target) -> MixtureConfig | None:
    """The mixture saved in a run's spec (validated as a mixture only)."""
    found = run_spec_data(target)
    if found is None or not isinstance(found[0].get("mixture"), dict):
        return None
    data, source = found
    return validate(MixtureConfig, data["mixture"], f"{source}: mixture")


def start_checkpoint_of(target: Target) -> Path | None:
    """The checkpoint a run started from (``init_from``), when it is still there. Its checkpoints
    record which one (``parent``): the spec may name a run directory, whose ``latest`` has moved
    on since the branch."""
    found = run_spec_data(target)
    init = found[0].get("init_from") if found else None
    if not isinstance(init, dict) or not init.get("checkpoint"):
        return None
    try:
        parent = read_manifest(target.checkpoints[-1]).parent
    except MidtrainError:
        parent = None
    try:
        return resolve_checkpoint(parent or init["checkpoint"])
    except CheckpointError:
        return None  # deleted or moved since: the run is reported without a baseline


def resolve_sources(opts: EvalOptions, first: Target) -> tuple[list[SourceSpec], int]:
    """Sources and window length: --mixture, --data, or the first target's saved mixture."""
    if opts.mixture and opts.data:
        raise ConfigError("give --mixture or --data, not both")
    mixture = load_mixture(opts.mixture) if opts.mixture else mixture_of(first)
    if opts.data:
        specs = sources_from_prefixes(opts.data)
    elif mixture is not None:
        specs = sources_from_mixture(mixture)
    else:
        raise ConfigError(
            f"{first.checkpoints[-1]}: no run_spec.yaml with a mixture; give --mixture or --data"
        )
    seq_length = opts.seq_length or (mixture.seq_length if mixture is not None else None)
    if seq_length is None:
        raise ConfigError("no mixture to take seq_length from; give --seq-length")
    return specs, seq_length


# --- scoring --------------------------------------------------------------------------------------


def evaluate(
    paths: list[str | Path],
    opts: EvalOptions,
    *,
    baseline: str | Path | None = None,
    all_checkpoints: bool = True,
) -> Evaluation:
    """Score the checkpoints of ``paths`` (and their baselines) on one evaluation set.

    ``baseline``: compared with every run; without it, a run that started from a checkpoint
    (``init_from``) that still exists is compared with that one."""
    if not paths:
        raise ConfigError("nothing to evaluate: give a checkpoint or run directory")
    targets = [find_target(p, all_checkpoints) for p in paths]
    _unique_names(targets)
    base = resolve_checkpoint(Path(baseline).expanduser().absolute()) if baseline else None
    for t in targets:
        t.baseline = base if base is not None else start_checkpoint_of(t)
        if base is None and t.baseline is not None:
            console.info(f"{t.name}: comparing with its start checkpoint {t.baseline}")
    specs, seq_length = resolve_sources(opts, targets[0])
    if opts.max_tokens < seq_length:
        raise ConfigError(
            f"--max-tokens {opts.max_tokens} is less than one window (seq_length {seq_length}); "
            f"give --max-tokens {seq_length} or more, or a smaller --seq-length"
        )
    device = pick_device(opts.device)

    # Every model is verified (sha256, once) and checked before anything is scored, so that a bad
    # checkpoint late in a run stops the command at once rather than after the others are scored.
    # Baselines first: they are scored first too.
    to_score = [c for t in targets for c in t.checkpoints]
    to_score = sorted({t.baseline for t in targets if t.baseline} - set(to_score)) + to_score
    ckpts = {p: load_checkpoint(p) for p in to_score}
    for ckpt in ckpts.values():
        check_positions(ckpt, seq_length)
        check_tokenizer(ckpt, specs)
    # The first model's tokenizer decodes the held-out text for byte counts (all were just
    # matched with the data's).
    first = ckpts[targets[0].checkpoints[0]]
    eval_set = build_eval_set(specs, seq_length, opts.max_tokens, load_tokenizer(first.path))
    eval_set.device, eval_set.dtype = str(device), str(eval_dtype(device)).removeprefix("torch.")
    for ckpt in ckpts.values():
        check_vocab(ckpt, eval_set)
    for source in eval_set.sources:
        if source.target_tokens < seq_length:
            console.info(
                f"warning: {source.name}: its held-out split has only {source.target_tokens} "
                f"tokens to predict, less than one window of {seq_length}; its numbers rest on "
                "those tokens alone (prepare it with a larger --holdout-fraction)"
            )

    scores = _score_all(ckpts, eval_set, opts.batch_size, device)
    runs = [
        RunEval(
            name=t.name,
            run_dir=t.run_dir,
            checkpoints=[scores[c] for c in t.checkpoints],
            baseline=scores[t.baseline] if t.baseline is not None else None,
            metrics=read_metrics(t.run_dir) if t.run_dir is not None else [],
        )
        for t in targets
    ]
    return Evaluation(eval_set, runs)


def _unique_names(targets: list[Target]) -> None:
    """Suffix repeated run names -2, -3, ...; a suffixed name may itself be taken (``legal,
    legal, legal-2``), so count on until it is free."""
    taken: set[str] = set()
    for t in targets:
        name, n = t.name, 1
        while name in taken:
            n += 1
            name = f"{t.name}-{n}"
        taken.add(name)
        t.name = name


def _score_all(
    ckpts: dict[Path, Checkpoint], eval_set: EvalSet, batch_size: int, device: torch.device
) -> dict[Path, CheckpointScores]:
    """Score each verified and checked checkpoint, by the path it was found at."""
    per_model = sum(len(s.windows) for s in eval_set.sources)
    out: dict[Path, CheckpointScores] = {}
    with console.make_progress() as progress:
        task = progress.add_task("evaluating", total=per_model * len(ckpts), extra="")
        for path, ckpt in ckpts.items():
            progress.update(task, extra=f"{path.name} on {device}")
            out[path] = score_checked(
                ckpt,
                eval_set,
                batch_size=batch_size,
                device=device,
                advance=lambda n: progress.advance(task, n),
            )
    return out
