"""A checkpoint under construction: files written into a staging directory with their sha256 and
size recorded, then made durable and renamed into place in one step."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from midtrain.checkpoints import tensorfile
from midtrain.checkpoints.layout import TRASH_PREFIX
from midtrain.checkpoints.manifest import FileEntry, Manifest, write_manifest
from midtrain.checkpoints.tensorfile import ProgressFn
from midtrain.errors import CheckpointError, checkpoint_write_error
from midtrain.fileio import exchange_paths, fsync_dir


class StagingDir:
    """Writes files under ``path`` and remembers ``{relative name: FileEntry}`` for the manifest."""

    def __init__(self, path: Path, progress: ProgressFn | None = None) -> None:
        self.path = path
        self.progress = progress
        self.records: dict[str, FileEntry] = {}

    @classmethod
    def fresh(cls, path: Path, progress: ProgressFn | None = None) -> StagingDir:
        """Create ``path`` empty, removing what a crashed earlier attempt left there."""
        remove_tree(path)
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise checkpoint_write_error(path, exc) from None
        return cls(path, progress)

    def _target(self, name: str) -> Path:
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def add_bytes(self, name: str, data: bytes) -> None:
        self.records[name] = tensorfile.write_bytes(self._target(name), data, self.progress)

    def add_json(self, name: str, obj: Any) -> None:
        self.records[name] = tensorfile.write_json(self._target(name), obj)

    def copy_in(self, name: str, src: Path) -> None:
        self.records[name] = tensorfile.copy_file(src, self._target(name), self.progress)

    def add_tensors(
        self,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.records[name] = tensorfile.write_safetensors(
            self._target(name), tensors, metadata, self.progress
        )

    def add_model(self, shards: Sequence[Callable[[], Mapping[str, torch.Tensor]]]) -> None:
        self.records.update(tensorfile.write_model_weights(self.path, shards, self.progress))

    def discard(self) -> None:
        remove_tree(self.path)


def commit(staging: Path, final: Path, manifest: Manifest | None, *, replace: bool) -> None:
    """Write the manifest (when given), make every file and directory durable, then rename
    ``staging`` to ``final``. Until the rename, ``final`` is untouched; after it, complete."""
    if manifest is not None:
        write_manifest(staging, manifest)
    fsync_tree(staging)
    trash = None
    if final.exists():
        if not replace:
            raise CheckpointError(f"{final}: already exists; remove it or choose another name")
        if exchange_paths(staging, final):
            # One atomic swap: ``final`` is the old checkpoint or the new one, never missing.
            fsync_dir(final.parent)
            remove_tree(staging)  # now the old checkpoint
            return
        # No atomic exchange here: move the old one aside first (rename cannot replace a
        # non-empty directory). A crash between the two renames leaves ``final`` missing.
        trash = trash_name(final)
        os.rename(final, trash)
    os.rename(staging, final)
    fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def trash_name(path: Path) -> Path:
    return path.parent / f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{time.time_ns()}"


def fsync_tree(root: Path) -> None:
    """fsync every directory under ``root`` (files were fsynced as they were closed)."""
    for dirpath, _dirs, _files in os.walk(root):
        fsync_dir(dirpath)


def remove_tree(path: Path) -> None:
    """Delete a directory so that it never looks like a partial checkpoint: rename, then delete."""
    if not path.exists():
        return
    if path.name.startswith(TRASH_PREFIX):
        shutil.rmtree(path, ignore_errors=True)
        return
    trash = trash_name(path)
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return  # someone else removed it first
    shutil.rmtree(trash, ignore_errors=True)
