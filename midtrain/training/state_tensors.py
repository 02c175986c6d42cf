"""What both backends put in a checkpoint's optimizer state.

Optimizer state is saved per parameter under its Hugging Face name: ``<name>/master`` (fp32
master weights) and the AdamW moments ``<name>/exp_avg``, ``<name>/exp_avg_sq``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from midtrain.checkpoints import Checkpoint
from midtrain.errors import CheckpointError

ADAM_STATES = ("exp_avg", "exp_avg_sq")
STATE_KEYS = ("master", *ADAM_STATES)


def dealt(names: Sequence[str], ranks: int, index: int) -> set[str]:
    """The names that rank ``index`` of ``ranks`` saves: dealt round-robin, so every rank writes
    about the same amount of optimizer state."""
    return {name for i, name in enumerate(names) if i % ranks == index}


def check_optimizer_keys(ckpt: Checkpoint, names: Iterable[str]) -> None:
    """Refuse a checkpoint whose optimizer state lacks a tensor of one of ``names`` (HF parameter
    names). Every rank checks before any collective, so a bad checkpoint fails everywhere."""
    available = set(ckpt.optimizer_keys())
    missing = [f"{n}/{k}" for n in names for k in STATE_KEYS if f"{n}/{k}" not in available]
    if missing:
        raise CheckpointError(
            f"{ckpt.path}: optimizer state lacks {len(missing)} tensors (first: {missing[0]})"
        )
