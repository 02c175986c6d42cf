"""Names and places: where a run's checkpoints live, and which directory a path means.

A run keeps its checkpoints in ``RUN_DIR/checkpoints/step_XXXXXXXX``; a save in progress writes to
``checkpoints/.staging-step_XXXXXXXX`` (the same name on every rank, so all ranks write into one
directory) and deleted checkpoints pass through ``.trash-*`` so that no half-deleted directory ever
carries a checkpoint's name. ``checkpoints/latest`` names the newest complete checkpoint.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from midtrain.errors import CheckpointError, checkpoint_write_error
from midtrain.fileio import atomic_write_text

FORMAT_VERSION = 1

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.json"
RUN_SPEC = "run_spec.yaml"
OPTIMIZER_DIR = "optimizer"
OPTIMIZER_INDEX = f"{OPTIMIZER_DIR}/optimizer.index.json"
RANK_STATE_DIR = "rank_state"
MODEL_FILE = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"

# Llama-family output embeddings tied to the input ones: saved once, as Hugging Face does.
TIED_WEIGHTS = {"lm_head.weight": "model.embed_tokens.weight"}

STEP_PREFIX = "step_"
STAGING_PREFIX = ".staging-"
# Held (flock) by the one process that saves a run's checkpoints, for as long as it may save.
SAVER_LOCK = ".saver.lock"
TRASH_PREFIX = ".trash-"

# Files a tokenizer directory may hold; only these are copied (never code, never weights).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)

_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def parse_step(name: str) -> int | None:
    """``step_00000020`` -> 20; ``.staging-step_00000020`` -> 20; anything else -> None."""
    if name.startswith(STAGING_PREFIX):
        name = name[len(STAGING_PREFIX) :]
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def is_step_dir(path: Path) -> bool:
    return path.is_dir() and _STEP_RE.match(path.name) is not None


def is_staging_dir(path: Path) -> bool:
    return path.is_dir() and path.name.startswith(STAGING_PREFIX)


def staging_dir(checkpoints_dir: Path, step: int) -> Path:
    return checkpoints_dir / f"{STAGING_PREFIX}{step_dir_name(step)}"


def model_shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def optimizer_shard_name(rank: int, world_size: int) -> str:
    return f"optimizer-{rank:05d}-of-{world_size:05d}.safetensors"


def rank_state_name(rank: int) -> str:
    return f"{RANK_STATE_DIR}/rank-{rank:05d}.json"


def read_latest(checkpoints_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when there is no ``latest`` file."""
    pointer = checkpoints_dir / LATEST
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer}: cannot read the latest pointer ({exc})") from None
    # A bare directory name, never a path: the pointer must not lead outside checkpoints/.
    if not _STEP_RE.match(name):
        raise CheckpointError(f"{pointer}: expected a name like step_00000020, got {name[:60]!r}")
    return checkpoints_dir / name


def write_latest(checkpoints_dir: Path, name: str) -> None:
    """Point ``latest`` at ``name`` atomically (write a temporary file, fsync, rename)."""
    try:
        atomic_write_text(checkpoints_dir / LATEST, name + "\n")
    except OSError as exc:
        raise checkpoint_write_error(checkpoints_dir / LATEST, exc) from None


def checkpoints_dir_of(path: Path) -> Path | None:
    """The ``checkpoints/`` directory that ``path`` (a run dir or that directory itself) means."""
    if (path / CHECKPOINTS_DIR).is_dir():
        return path / CHECKPOINTS_DIR
    if path.name == CHECKPOINTS_DIR or (path / LATEST).is_file():
        return path
    if any(parse_step(p.name) is not None for p in _subdirs(path)):
        return path
    return None


def is_midtrain_path(path: Path) -> bool:
    """Whether ``path`` is (or was meant to be) a checkpoint of ours, or a run or checkpoints
    directory: such a path is read through ``load_checkpoint``, with its checks, never as a plain
    Hugging Face directory, even when its manifest is missing."""
    return (
        (path / MANIFEST).exists()
        or (path / TRAINER_STATE).exists()
        or path.name.startswith((STAGING_PREFIX, TRASH_PREFIX))
        or is_step_dir(path)
        or checkpoints_dir_of(path) is not None
    )


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory, a run directory (follows ``latest``) or its ``checkpoints/`` dir ->
    the checkpoint directory. Raises CheckpointError naming what is missing."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint, run or checkpoints directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if path.name.startswith(STAGING_PREFIX):
        # A save in progress, or one that crashed (even after writing its manifest): never loaded.
        raise CheckpointError(f"{path}: a staging directory, not a checkpoint; never loaded")
    if path.name.startswith(TRASH_PREFIX):
        raise CheckpointError(f"{path}: a checkpoint being deleted; never loaded")
    if (path / MANIFEST).exists():
        return path
    if is_step_dir(path):
        raise CheckpointError(f"{path / MANIFEST}: missing; the checkpoint is incomplete")
    ckpts = checkpoints_dir_of(path)
    if ckpts is None:
        raise CheckpointError(
            f"{path}: not a checkpoint (no {MANIFEST}), a run directory or a checkpoints directory"
        )
    target = read_latest(ckpts)
    if target is None:
        raise CheckpointError(
            f"{ckpts / LATEST}: missing; {ckpts} holds no complete checkpoint to resume from"
        )
    if not target.is_dir():
        raise CheckpointError(
            f"{ckpts / LATEST}: names {target.name}, which does not exist; "
            "pass a checkpoint directory explicitly"
        )
    return target


def _subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except OSError:
        return []
