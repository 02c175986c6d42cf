"""Retention: keep the newest ``keep_last`` complete checkpoints, those marked ``keep``, and the one
``latest`` names; delete the rest. Staging directories (saves in progress) and damaged checkpoints
(files missing or of the wrong size) are never touched, and never count as one of the newest."""

from __future__ import annotations

import os
from pathlib import Path

from midtrain.checkpoints.layout import (
    STAGING_PREFIX,
    TRASH_PREFIX,
    checkpoints_dir_of,
    is_step_dir,
    parse_step,
    read_latest,
    resolve_checkpoint,
)
from midtrain.checkpoints.manifest import check_files, read_manifest, write_manifest
from midtrain.checkpoints.staging import remove_tree
from midtrain.errors import CheckpointError, MidtrainError


def prunable(checkpoints_dir: Path, keep_last: int) -> list[Path]:
    """Complete checkpoints that retention would delete, oldest first."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    # Read `latest` before and after listing: a save that commits meanwhile moves it forward, and
    # neither the old nor the new target may be deleted.
    protected = {read_latest(checkpoints_dir)}
    complete: list[tuple[int, Path, bool]] = []
    for path in sorted(checkpoints_dir.iterdir()):
        if not is_step_dir(path):
            continue
        try:
            manifest = read_manifest(path)
        except MidtrainError:
            continue  # incomplete or unreadable: not ours to judge here; `ckpt list` shows it
        if check_files(path, manifest, hash_files=False):
            continue  # damaged: keeping it must not cost an intact one its place
        step = parse_step(path.name)
        assert step is not None
        complete.append((step, path, manifest.keep))
    protected.add(read_latest(checkpoints_dir))
    complete.sort()
    newest = {path for _, path, _ in complete[-keep_last:]}
    return [p for _, p, keep in complete if not keep and p not in newest and p not in protected]


def apply_retention(checkpoints_dir: Path, keep_last: int) -> list[Path]:
    victims = prunable(checkpoints_dir, keep_last)
    for path in victims:
        remove_tree(path)
    return victims


def prune(run_dir: str | os.PathLike[str], keep_last: int, *, dry_run: bool = False) -> list[Path]:
    """Delete the checkpoints of a run that retention does not keep; returns them (oldest first).
    ``run_dir`` may also be its ``checkpoints/`` directory."""
    path = Path(run_dir).expanduser()
    ckpts = checkpoints_dir_of(path) if path.is_dir() else None
    if ckpts is None:
        raise CheckpointError(f"{path}: not a run directory (no checkpoints/ inside)")
    return prunable(ckpts, keep_last) if dry_run else apply_retention(ckpts, keep_last)


def remove_leftovers(checkpoints_dir: Path, before_step: int) -> None:
    """Delete what crashed saves left: trash, and staging dirs of steps before ``before_step``
    (at most one save of a run is in flight, so older staging dirs belong to no live save)."""
    for path in checkpoints_dir.iterdir():
        if path.name.startswith(TRASH_PREFIX):
            remove_tree(path)
        elif path.name.startswith(STAGING_PREFIX):
            step = parse_step(path.name)
            if step is not None and step < before_step:
                remove_tree(path)


def mark_keep(ckpt: str | os.PathLike[str], keep: bool = True) -> Path:
    """Set or clear a checkpoint's ``keep`` flag (an atomic rewrite of its manifest)."""
    path = resolve_checkpoint(ckpt)
    manifest = read_manifest(path)
    if manifest.keep != keep:
        write_manifest(path, manifest.model_copy(update={"keep": keep}))
    return path
