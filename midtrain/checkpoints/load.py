"""Loading a checkpoint: the manifest is checked (format version, every file's size and sha256)
before anything else is read; then safetensors and JSON only, never pickle."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from midtrain.checkpoints.layout import (
    CONFIG,
    OPTIMIZER_DIR,
    OPTIMIZER_INDEX,
    RUN_SPEC,
    TIED_WEIGHTS,
    TRAINER_STATE,
    rank_state_name,
    resolve_checkpoint,
)
from midtrain.checkpoints.manifest import Manifest, check_files, read_manifest
from midtrain.checkpoints.tensorfile import (
    LazyTensors,
    model_weight_files,
    read_json,
    read_safetensors,
    safetensors_keys,
)
from midtrain.errors import CheckpointError

KeySelector = Iterable[str] | Callable[[str], bool] | None
"""Which optimizer tensors to read: keys, a predicate on keys, or None for all."""


@dataclass
class Checkpoint:
    """A verified checkpoint. Small parts are read at load; tensors when asked for."""

    path: Path
    manifest: Manifest
    config: dict[str, Any]
    trainer_state: dict[str, Any]
    run_spec: str | None
    _optimizer_index: dict[str, str] | None = field(default=None, init=False, repr=False)

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def tokens(self) -> int:
        return self.manifest.tokens

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """All model tensors by Hugging Face name. With tied embeddings ``lm_head.weight`` is the
        same tensor as the input embedding, so ``load_state_dict(strict=True)`` works."""
        tensors = self.model_tensors()
        state = {name: tensors[name] for name in tensors.files}
        state.update({alias: state[name] for alias, name in tensors.aliases.items()})
        return state

    def model_tensors(self) -> LazyTensors:
        """The model tensors by Hugging Face name, each read when looked up (``model_state_dict``
        reads them all; a megatron rank reads its part)."""
        files: dict[str, Path] = {}
        for name, keys in model_weight_files(self.path, self.manifest.files).items():
            held = safetensors_keys(self.path / name)
            if keys and set(keys) != set(held):
                raise CheckpointError(
                    f"{self.path / name}: holds other tensors than its index lists"
                )
            files.update(dict.fromkeys(held, self.path / name))
        tied = TIED_WEIGHTS if self.config.get("tie_word_embeddings") else {}
        return LazyTensors(files, tied)

    @property
    def has_optimizer(self) -> bool:
        return OPTIMIZER_INDEX in self.manifest.files

    def optimizer_keys(self) -> list[str]:
        return sorted(self._index())

    def optimizer_tensors(self, select: KeySelector = None) -> dict[str, torch.Tensor]:
        """Optimizer tensors (full, unsharded) for the selected keys, reading only those from the
        shards; works whatever the number of ranks that wrote them or that read them."""
        index = self._index()
        if select is None:
            keys = list(index)
        elif callable(select):
            keys = [k for k in index if select(k)]
        else:
            keys = list(select)
            unknown = [k for k in keys if k not in index]
            if unknown:
                raise CheckpointError(
                    f"{self.path / OPTIMIZER_INDEX}: no optimizer state for {unknown[:5]}"
                )
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(index[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for name, file_keys in sorted(by_file.items()):
            out.update(read_safetensors(self.path / OPTIMIZER_DIR / name, file_keys))
        return out

    def rank_state(self, rank: int) -> dict[str, Any] | None:
        """The JSON state rank ``rank`` saved for itself, if it saved one."""
        name = rank_state_name(rank)
        return read_json(self.path / name) if name in self.manifest.files else None

    def _index(self) -> dict[str, str]:
        if self._optimizer_index is None:
            path = self.path / OPTIMIZER_INDEX
            if not self.has_optimizer:
                raise CheckpointError(f"{self.path}: holds no optimizer state")
            data = read_json(path)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{path}: no weight_map object")
            for key, name in weight_map.items():
                rel = f"{OPTIMIZER_DIR}/{name}"
                if not isinstance(name, str) or PurePosixPath(name).name != name:
                    raise CheckpointError(f"{path}: {key!r} maps to {name!r}, not a shard name")
                if rel not in self.manifest.files:
                    raise CheckpointError(f"{path}: {key!r} maps to {rel}, not in the manifest")
            self._optimizer_index = weight_map
        return self._optimizer_index


def load_checkpoint(path: str | os.PathLike[str], *, verify: bool = True) -> Checkpoint:
    """Open a checkpoint (a checkpoint dir, a run dir or its ``checkpoints/`` dir: follows
    ``latest``). Checks the manifest first: every file's size, and with ``verify`` (the default)
    its sha256; any problem raises CheckpointError naming each bad file, and nothing is read."""
    ckpt_dir = resolve_checkpoint(path)
    manifest = read_manifest(ckpt_dir)
    problems = check_files(ckpt_dir, manifest, hash_files=verify)
    if problems:
        raise CheckpointError(
            f"{ckpt_dir}: refusing to load a damaged checkpoint:\n  " + "\n  ".join(problems)
        )
    for required in (CONFIG, TRAINER_STATE):
        if required not in manifest.files:
            raise CheckpointError(f"{ckpt_dir / 'manifest.json'}: lists no {required}")
    config = read_json(ckpt_dir / CONFIG)
    trainer_state = read_json(ckpt_dir / TRAINER_STATE)
    for name, value in ((CONFIG, config), (TRAINER_STATE, trainer_state)):
        if not isinstance(value, dict):
            raise CheckpointError(f"{ckpt_dir / name}: expected a JSON object")
    run_spec = None
    if RUN_SPEC in manifest.files:
        try:
            run_spec = (ckpt_dir / RUN_SPEC).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{ckpt_dir / RUN_SPEC}: not UTF-8 text") from None
    return Checkpoint(ckpt_dir, manifest, config, trainer_state, run_spec)
